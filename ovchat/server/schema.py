"""What an OpenAI-style request may contain, checked field by field.

A request body becomes a ``GenerationRequest`` or an ``APIError`` naming the field at fault
(400). The sampling values go through ``GenerationOptions``, so the server accepts exactly the
ranges `ovchat run` does; only the OpenAI-specific fields (messages, n, stream, penalties...) are
checked here. Fields this module does not know are ignored, as OpenAI-compatible servers do, so
newer clients that send extra fields keep working; fields it knows but cannot honour (n > 1,
tools, logprobs, echo...) are refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ovchat.errors import APIError, OptionError
from ovchat.options import GenerationOptions

# OpenAI request field -> GenerationOptions field. top_k and repetition_penalty are not OpenAI's
# but vLLM, llama-server and OVMS accept them too.
_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
}
# Both spellings of the reply length; max_completion_tokens is the newer one and wins.
_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
# OpenAI's ranges for the penalties GenerationOptions does not have.
_PENALTY_FIELDS = ("frequency_penalty", "presence_penalty")
_PENALTY_RANGE = (-2.0, 2.0)
# "developer" is what OpenAI's newer models call the system role.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated completion request: a chat (``messages``) or a raw ``prompt``."""

    options: GenerationOptions
    max_tokens: Optional[int]  # None: as many as the context window leaves
    stream: bool = False
    include_usage: bool = False
    messages: Optional[List[Dict[str, str]]] = None
    prompt: Optional[str] = None
    penalties: Dict[str, float] = field(default_factory=dict)


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_chat(body: Mapping[str, Any], model_id: str) -> GenerationRequest:
    """A /v1/chat/completions body -> GenerationRequest."""
    _check_model(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of messages", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("only the 'text' response_format is supported", "response_format", "unsupported_parameter")
    return _common(body, messages=parsed)


def parse_completion(body: Mapping[str, Any], model_id: str) -> GenerationRequest:
    """A /v1/completions body -> GenerationRequest."""
    _check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one is the same request
    if isinstance(prompt, list):
        raise bad("'prompt' must be one string; send one request per prompt", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string", "prompt")
    if body.get("echo"):
        raise bad("'echo' is not supported by this server", "echo", "unsupported_parameter")
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    if body.get("logprobs") is not None and body.get("logprobs") is not False:
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("'best_of' must be 1: this server returns one completion per request", "best_of")
    return _common(body, prompt=prompt)


def _check_model(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be given as a string (GET /v1/models lists it)", "model")
    if model != model_id:
        raise bad(f"the model {model!r} does not exist; this server serves {model_id!r}", "model",
                  "model_not_found")


def _message(m: Any, i: int) -> Dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{where} must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"{where}.role must be one of {', '.join(_ROLES)}, not {role!r}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):
        # The content-parts form: only text parts can reach a text-only model.
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}})",
                          f"{where}.content")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")
    return {"role": _ROLES[role], "content": content}


def _common(body: Mapping[str, Any], **what: Any) -> GenerationRequest:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("'n' must be 1: this server returns one choice per request", "n")
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        include_usage = _flag(stream_options, "include_usage", "stream_options.include_usage")
    options, max_tokens = _options(body)
    penalties = {}
    for name in _PENALTY_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        low, high = _PENALTY_RANGE
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad(f"'{name}' must be a number from {low} to {high}, not {value!r}", name)
        penalties[name] = float(value)
    return GenerationRequest(options=options, max_tokens=max_tokens, stream=stream,
                             include_usage=include_usage, penalties=penalties, **what)


def _flag(body: Mapping[str, Any], name: str, param: Optional[str] = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{param or name}' must be true or false, not {value!r}", param or name)
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
            raise bad(str(e).replace(option, f"'{name}'", 1), name) from None
    return options, (options.max_new_tokens if max_field else None)


def _stop(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad("'stop' must be a string or an array of strings", "stop")
