"""What an OpenAI-style request may contain, checked field by field, with a limit on everything.

A request body becomes a ``GenerationRequest`` or an ``InvalidRequestError`` naming the field at
fault. The sampling values go through ``GenerationOptions``, so the server accepts exactly the
ranges `ovchat run` does; the OpenAI-specific fields (messages, tools, response_format, n,
logprobs, penalties...) are checked here. Every list and string has a bound (``LIMITS``), so no
request can make the server do unbounded work before it is refused: 50,000 stop strings are a
400 in microseconds, not a minute of matching. Fields this module does not know are ignored, as
OpenAI-compatible servers do; fields it knows but cannot honour are refused, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ovchat.errors import InvalidRequestError, OptionError
from ovchat.options import GenerationOptions
from ovchat.structured import ResponseFormat, parse_response_format
from ovchat.toolcalls import Tool, parse_tool_choice, parse_tools

# The bounds of a request (a body is at most 1 MiB besides).
LIMITS = {
    "messages": 1024,          # messages in a conversation
    "stop": 16,                # stop strings (OpenAI allows 4)
    "stop_length": 256,        # characters of one stop string
    "n": 8,                    # choices per request
    "tool_calls": 64,          # tool calls carried by one assistant message
    "inputs": 2048,            # texts (or token-id lists) of one embeddings request, as OpenAI allows
}
_OPTION_FIELDS = {  # OpenAI field -> GenerationOptions field (top_k, repetition_penalty: vLLM's)
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
}
_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")  # the newer spelling wins
_PENALTY_FIELDS = ("frequency_penalty", "presence_penalty")
_SPECULATION_FIELDS = {"num_assistant_tokens": 32, "max_ngram_size": 16}  # field -> largest value
_PENALTY_RANGE = (-2.0, 2.0)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: a chat (``messages``) or a raw ``prompt``, and how to answer it."""

    options: GenerationOptions
    max_tokens: Optional[int]  # None: as many as the context window leaves
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    messages: Optional[List[Dict[str, Any]]] = None
    prompt: Optional[str] = None
    penalties: Dict[str, float] = field(default_factory=dict)
    n: int = 1
    logprobs: bool = False
    response_format: Optional[ResponseFormat] = None
    tools: Tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # auto, none, required, or the name of the function to call
    parallel_tool_calls: bool = True  # false: at most one call per reply (the first)
    # Speculative decoding per request (OpenVINO Model Server's field names): tokens proposed per
    # step and prompt lookup's n-gram size; only for a server started with a lever.
    speculation: Dict[str, int] = field(default_factory=dict)
    add_generation_prompt: bool = True  # /tokenize may count a conversation without it
    think: Optional[bool] = None  # ollama's think: the template's enable_thinking, where it has one
    context_limit: Optional[int] = None  # ollama's num_ctx: a smaller window for this request
    extra_settings: Dict[str, Any] = field(default_factory=dict)  # more GenerationSettings fields (min_p)



def check_strings(value: Any, where: str = "body") -> None:
    """Refuse strings that are not Unicode text: JSON can spell a lone surrogate (\\ud800), which
    no tokenizer can encode. Walks the whole parsed body (bounded by its 1 MiB)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"{path} holds a lone UTF-16 surrogate, which is not text", path,
                          "invalid_string") from None
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, path))
                stack.append((v, f"{path}.{k}" if path != "body" else k))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    """A /v1/chat/completions body -> GenerationRequest."""
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array of messages", "messages")
    if len(messages) > LIMITS["messages"]:
        raise InvalidRequestError(f"'messages' may hold at most {LIMITS['messages']} messages", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    if body.get("functions") or body.get("function_call"):
        raise InvalidRequestError("'functions' is OpenAI's old form; send 'tools' and 'tool_choice'", "functions",
                  "unsupported_parameter")
    tools = parse_tools(body.get("tools"))
    choice = parse_tool_choice(body.get("tool_choice"), tools)
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise InvalidRequestError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    fmt = parse_response_format(body.get("response_format"))
    if fmt is not None and tools and choice != "none":
        raise InvalidRequestError("'response_format' and 'tools' cannot be combined; ask for one or the other", "response_format")
    logprobs = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or top < 0 or top > 20:
            raise InvalidRequestError("'top_logprobs' must be a whole number from 0 to 20", "top_logprobs")
        if top > 0:
            raise InvalidRequestError("only the chosen token's log-probability is available here: 'top_logprobs' must be 0",
                      "top_logprobs", "unsupported_parameter")
        if not logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return _common(body, model=model, messages=parsed, tools=tools, tool_choice=choice, response_format=fmt,
                   logprobs=logprobs, parallel_tool_calls=body.get("parallel_tool_calls") is not False)


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    """A /v1/completions body -> GenerationRequest."""
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one is the same request
    if isinstance(prompt, list):
        raise InvalidRequestError("'prompt' must be one string; send one request per prompt", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequestError("'prompt' must be a non-empty string", "prompt")
    if body.get("echo"):
        raise InvalidRequestError("'echo' is not supported by this server", "echo", "unsupported_parameter")
    if body.get("suffix"):
        raise InvalidRequestError("'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5:
            raise InvalidRequestError("'logprobs' must be a whole number from 0 to 5", "logprobs")
        if logprobs > 0:
            raise InvalidRequestError("only the chosen token's log-probability is available here: 'logprobs' must be 0",
                      "logprobs", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise InvalidRequestError("'best_of' must equal 'n': this server returns every choice it generates", "best_of")
    fmt = parse_response_format(body.get("response_format"))
    return _common(body, model=model, prompt=prompt, logprobs=logprobs is not None and logprobs is not False,
                   response_format=fmt)


def parse_tokenize(body: Mapping[str, Any]) -> GenerationRequest:
    """A /tokenize body (vLLM's): a chat (``messages``, ``tools``, ``add_generation_prompt``) or a
    plain ``prompt`` (with the model's BOS) -> the GenerationRequest whose prompt is counted."""
    model = _model(body)
    if body.get("messages") is None:
        return parse_completion({"model": model, "prompt": body.get("prompt")})
    chat = parse_chat({k: body[k] for k in ("model", "messages", "tools", "tool_choice") if k in body})
    add = body.get("add_generation_prompt", True)
    if not isinstance(add, bool):
        raise InvalidRequestError("'add_generation_prompt' must be true or false", "add_generation_prompt")
    return replace(chat, add_generation_prompt=add)


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be given as a string (GET /v1/models lists them)", "model")
    if len(model) > 256:
        raise InvalidRequestError("'model' is longer than any model's name", "model", "model_not_found")
    return model


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, list):
        # The content-parts form: only text parts can reach a text-only model.
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequestError(f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}})",
                          f"{where}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    if not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string or an array of text parts", f"{where}.content")
    return content


def _message(m: Any, i: int) -> Dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidRequestError(f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(f"{where}.role must be one of {', '.join(_ROLES)}, not {role!r}", f"{where}.role")
    out: Dict[str, Any] = {"role": _ROLES[role]}
    calls = m.get("tool_calls")
    if role == "assistant" and calls is not None:
        out["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        out["content"] = "" if m.get("content") is None else _text_content(m.get("content"), where)
    else:
        out["content"] = _text_content(m.get("content"), where)
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
            raise InvalidRequestError(f"{where}.tool_call_id must name the call this message answers", f"{where}.tool_call_id")
        out["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def _tool_calls(calls: Any, where: str) -> List[Dict[str, Any]]:
    """An assistant message's tool calls, with arguments as objects (what chat templates render)."""
    if not isinstance(calls, list) or len(calls) > LIMITS["tool_calls"]:
        raise InvalidRequestError(f"{where} must be an array of at most {LIMITS['tool_calls']} tool calls", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                      f"{where}[{j}]")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise InvalidRequestError(f"{where}[{j}].function.arguments is not JSON", f"{where}[{j}].function.arguments") from None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(f"{where}[{j}].function.arguments must be a JSON object", f"{where}[{j}].function.arguments")
        out.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _common(body: Mapping[str, Any], **what: Any) -> GenerationRequest:
    n = body.get("n")
    if n is None:
        n = 1
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= LIMITS["n"]:
        raise InvalidRequestError(f"'n' must be a whole number from 1 to {LIMITS['n']}", "n")
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise InvalidRequestError("'stream_options' must be an object", "stream_options")
        include_usage = _flag(stream_options, "include_usage", "stream_options.include_usage")
    options, max_tokens = _options(body)
    if n > 1 and options.temperature == 0:
        raise InvalidRequestError("'n' above 1 needs sampling: give a 'temperature' above 0 (greedy choices would all be "
                  "the same)", "n")
    penalties = {}
    for name in _PENALTY_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        low, high = _PENALTY_RANGE
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise InvalidRequestError(f"'{name}' must be a number from {low} to {high}, not {value!r}", name)
        penalties[name] = float(value)
    speculation = {}
    for name, high in _SPECULATION_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise InvalidRequestError(f"'{name}' must be a whole number from 1 to {high}, not {value!r}", name)
        speculation[name] = value
    return GenerationRequest(options=options, max_tokens=max_tokens, stream=stream, include_usage=include_usage,
                             penalties=penalties, n=n, speculation=speculation, **what)


def _flag(body: Mapping[str, Any], name: str, param: Optional[str] = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{param or name}' must be true or false, not {value!r}", param or name)
    return value


def _options(body: Mapping[str, Any]) -> Tuple[GenerationOptions, Optional[int]]:
    """The sampling fields, validated by GenerationOptions one at a time so an error names its field."""
    options = GenerationOptions()
    max_field = next((f for f in _MAX_TOKEN_FIELDS if body.get(f) is not None), None)
    fields = [(f, o) for f, o in _OPTION_FIELDS.items() if body.get(f) is not None]
    if max_field:
        fields.append((max_field, "max_new_tokens"))
    for name, option in fields:
        value = body[name]
        if option == "stop":
            value = _stop(value)
        try:
            options = options.with_changes(**{option: value})
        except OptionError as e:
            # GenerationOptions speaks of its own field names; say the one the client sent.
            raise InvalidRequestError(str(e).replace(option, f"'{name}'", 1), name) from None
    return options, (options.max_new_tokens if max_field else None)


def _stop(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequestError("'stop' must be a string or an array of strings", "stop")
    if len(value) > LIMITS["stop"] or any(len(s) > LIMITS["stop_length"] for s in value):
        raise InvalidRequestError(f"'stop' may hold at most {LIMITS['stop']} strings of at most {LIMITS['stop_length']} "
                  "characters", "stop")
    return tuple(value)


@dataclass(frozen=True)
class EmbeddingRequest:
    """A /v1/embeddings (or ollama /api/embed) body: texts or token-id lists, and how to answer."""

    model: str
    inputs: List[Any]  # str, or a list of token ids
    base64: bool = False
    dimensions: Optional[int] = None
    truncate: bool = True  # False: an input longer than the window is an error (ollama's truncate)


def parse_embeddings(body: Mapping[str, Any], *, field_name: str = "input") -> EmbeddingRequest:
    """OpenAI's embeddings body: ``input`` a string, a list of strings, a list of token ids or a
    list of such lists; ``encoding_format`` float or base64; ``dimensions``."""
    model = _model(body)
    value = body.get(field_name)
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"'{field_name}' must be a string, a list of strings or a list of token-id lists",
                                  field_name)
    if len(value) > LIMITS["inputs"]:
        raise InvalidRequestError(f"'{field_name}' holds {len(value)} inputs; send at most {LIMITS['inputs']} per "
                                  "request", field_name, "too_many_inputs")
    for i, item in enumerate(value):
        where = f"{field_name}[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise InvalidRequestError(f"{where} is empty; give some text", where)
        elif not (isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                              for t in item)):
            raise InvalidRequestError(f"{where} must be a non-empty string or a non-empty list of token ids", where)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise InvalidRequestError("'dimensions' must be a positive whole number", "dimensions")
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise InvalidRequestError("'truncate' must be true or false", "truncate")
    return EmbeddingRequest(model, value, fmt == "base64", dimensions, truncate)
