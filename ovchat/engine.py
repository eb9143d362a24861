"""The chat engine: one model on one device, a conversation, streamed replies and their metrics.

``ChatSession`` owns an ``openvino_genai.LLMPipeline`` and the conversation as a list of
messages; each turn hands GenAI a fresh ``ChatHistory`` (the deprecated start_chat/finish_chat
pair is not used), so the session can trim, save and restore the conversation freely.

Generation runs in a worker thread and its text chunks come back through a queue, which turns
GenAI's callback streamer into a plain iterator and lets the caller stop a reply at any moment:
the streamer answers STOP at the next token.

A model without a chat template (a base model, such as Gemma 3 270M) cannot chat; ``complete``
continues a plain text instead, outside the conversation.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ovchat.devices import DeviceChoice, compile_with_fallback
from ovchat.errors import ContextOverflowError, InputError, ModelLoadError, OvchatError, summary
from ovchat.loading import plan
from ovchat.options import GenerationOptions, check_text
from ovchat.progress import ProgressCallback, ignore
from ovchat.remote import RemoteModel
from ovchat.speculation import Speculation
from ovchat.toolcalls import Splitter, Tool, ToolCall, forced_call, parse, parse_tool_choice, parse_tools, \
    template_offers_tools

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_FORMAT = "ovchat-conversation"
_DONE = object()
# Tokens reserved for the reply when deciding whether old turns must go: a quarter of the
# window, or max_new_tokens if that is smaller.
_REPLY_SHARE = 4


class Reply(str):
    """A reply's text, as a str, with the tool calls it makes (``tool_calls``, empty for a reply
    that calls nothing)."""

    tool_calls: Tuple[ToolCall, ...]

    def __new__(cls, text: str, tool_calls: Sequence[ToolCall] = ()) -> "Reply":
        reply = super().__new__(cls, text)
        reply.tool_calls = tuple(tool_calls)
        return reply


@dataclass(frozen=True)
class _Shape:
    """What a turn's reply may be: tools shown through the template (``offer``) or forced by a
    grammar (``structured``), or JSON; ``choice`` is auto, none, required or a function's name."""

    tools: Tuple[Tool, ...] = ()
    choice: str = "none"
    offer: bool = False
    structured: Dict[str, Any] = field(default_factory=dict)

    @property
    def forced(self) -> bool:
        return bool(self.tools) and self.choice not in ("auto", "none")


@dataclass(frozen=True)
class TurnMetrics:
    """What one reply cost. Times in seconds; ``finish_reason`` is stop, length or cancelled."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    generate_s: float
    load_s: float
    context_used: int
    context_limit: Optional[int]
    finish_reason: str
    # Tokens per call of the model after the prompt: 1 without speculative decoding; with it,
    # 1 + the proposed tokens the model accepted per step (None where it is not known).
    tokens_per_step: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ChatSession:
    """A conversation with a local model.

    >>> session = ChatSession(system="Answer briefly.")
    >>> session.send("What is the capital of France?")
    'Paris.'

    ``model``: a model directory, a ``.gguf`` file or a known name; None is the default model.
    ``device``: auto (GPU if OpenVINO reports one, else CPU), CPU, GPU, GPU.N or NPU.
    ``max_context``: the context window in tokens; by default the model's own.
    ``on_notice``: called with a sentence when the session does something the user should know
    about (old turns dropped to fit the window, a device fallback).
    ``use_server``: if an `ovchat serve` of this model already runs on this machine, send the
    turns to it instead of loading the model here (the warm path: nothing to load, nothing to
    warm up); ``device``, if not auto, must then be the server's.
    ``speculation``: decode several tokens per model call (prompt lookup, or a draft model).
    """

    def __init__(
        self,
        model: Optional[str | Path] = None,
        *,
        device: str = "auto",
        system: Optional[str] = None,
        options: Optional[GenerationOptions] = None,
        max_context: Optional[int] = None,
        on_notice: Callable[[str], None] = lambda _: None,
        progress: ProgressCallback = ignore,
        available_devices: Optional[Sequence[str]] = None,
        pipeline_factory: Optional[Callable[..., Any]] = None,
        use_server: bool = False,
        speculation: Optional[Speculation] = None,
    ):
        self.options = options or GenerationOptions()
        self._notice = on_notice
        self.speculation = speculation
        self._remote: Optional[RemoteModel] = None
        self._pipe: Any = None
        self._tokenizer_: Any = None
        if not (use_server and speculation is None and self._connect(model, device, max_context, progress)):
            loaded = plan(model, device=device, max_context=max_context, available_devices=available_devices,
                          progress=progress)
            self.model_path = loaded.model_path
            self.context_limit = loaded.context_limit
            self.device = loaded.device
            self._pipe, self.load_s = self._load(loaded, pipeline_factory)
            self.has_chat_template = bool(self._tokenizer.chat_template)
        self._messages: List[Dict[str, Any]] = []
        if system:
            self._messages.append({"role": "system", "content": check_text(system, "the system prompt")})
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self.last_metrics: Optional[TurnMetrics] = None
        self.last_reply: Reply = Reply("")

    # -- loading --------------------------------------------------------------------------

    def _connect(self, model: Optional[str | Path], device: str, max_context: Optional[int],
                 progress: ProgressCallback) -> bool:
        """Use a running server of the model, if there is one; False if there is none."""
        from ovchat import servers
        from ovchat.store import resolve_model

        path = resolve_model(None if model is None else str(model), progress=progress)
        found = servers.find(path, device=None if (device or "auto").lower() == "auto" else device)
        key = os.environ.get("OVCHAT_API_KEY")
        health = servers.health(found) if found is not None and (key or not found.key_required) else None
        if health is None:
            return False
        self._remote = RemoteModel(found, key)
        self.model_path = path
        self.device = DeviceChoice(found.device, f"the model is loaded already, by ovchat serve at {found.url}", True)
        self.context_limit = max_context or health.get("context_limit")
        self.has_chat_template = bool(health.get("chat_template", True))
        self.load_s = 0.0
        return True

    @property
    def _tokenizer(self) -> Any:
        """The model's tokenizer (for a served model, loaded here only when counting needs it)."""
        if self._tokenizer_ is None:
            if self._pipe is not None:
                self._tokenizer_ = self._pipe.get_tokenizer()
            else:
                import openvino_genai

                self._tokenizer_ = openvino_genai.Tokenizer(str(self.model_path))
        return self._tokenizer_

    def _load(self, loaded, factory: Optional[Callable[..., Any]]) -> tuple:
        if factory is None:
            import openvino_genai

            factory = openvino_genai.LLMPipeline
        start = time.perf_counter()
        def compile(device: DeviceChoice) -> Any:
            props = loaded.properties(device)
            if self.speculation is not None:  # the draft model compiles with the main model's properties
                props = {**props, **self.speculation.pipeline_kwargs(device.name, props)}
            return factory(str(self.model_path), device.name, **props)

        pipe, self.device = compile_with_fallback(compile, self.device, model=self.model_path, notice=self._notice)
        if self.device.family == "CPU":
            self._warm_up(pipe)
        return pipe, time.perf_counter() - start

    def _warm_up(self, pipe: Any) -> None:
        """Repack the weights now rather than in the first reply, and give back the mapped
        weight pages that leaves resident (see ovchat.warmup): peak RSS 384 -> ~312 MB on the
        demo model, 5.39 -> 2.94 GB on Phi-3-mini int4."""
        from ovchat.warmup import warm_up

        try:
            warm_up(pipe, self.model_path, self.speculation)
        except RuntimeError as e:
            raise ModelLoadError(f"{self.model_path} was compiled on {self.device.name} but cannot run: "
                                 f"{summary(e)}") from None

    @property
    def pipeline(self) -> Any:
        """The loaded ``openvino_genai.LLMPipeline``, for callers that drive it with token ids
        (``ovchat bench``); generating through it bypasses the conversation."""
        return self._pipe

    # -- conversation ---------------------------------------------------------------------

    @property
    def messages(self) -> List[Dict[str, str]]:
        """A copy of the conversation so far, the system prompt first if there is one."""
        return [dict(m) for m in self._messages]

    @property
    def system(self) -> Optional[str]:
        return self._messages[0]["content"] if self._messages and self._messages[0]["role"] == "system" else None

    def set_system(self, text: Optional[str]) -> None:
        """Replace (or with None remove) the system prompt; the rest of the conversation stays."""
        rest = [m for m in self._messages if m["role"] != "system"]
        if text:
            check_text(text, "the system prompt")
        self._messages = ([{"role": "system", "content": text}] if text else []) + rest

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt."""
        self._messages = [m for m in self._messages if m["role"] == "system"]
        self.last_metrics = None

    def save(self, path: str | Path) -> None:
        """Write the conversation and options as JSON."""
        data = {"format": CONVERSATION_FORMAT, "version": 1, "model": str(self.model_path),
                "options": self.options.as_dict(), "messages": self._messages}
        path = Path(path).expanduser()
        partial = path.with_name(f".{path.name}.partial")
        try:
            # Written beside and renamed, so an existing file is never left half-overwritten.
            partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(partial, path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise InputError(f"could not write {path}: {e.strerror}") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation (and options) with one written by ``save``."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"could not read {path}: {e.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise InputError(f"{path} is not a conversation saved by ovchat (not JSON, or nested too deeply)") from None
        if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
            raise InputError(f"{path} is not a conversation saved by ovchat")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                and isinstance(m.get("tool_calls", []), list) for m in messages):
            raise InputError(f"{path} has malformed messages (each needs a role and a content)")
        try:
            options = GenerationOptions.from_mapping(data.get("options") or {})
        except OvchatError as e:
            raise InputError(f"{path} has unusable options: {e}") from None
        for i, m in enumerate(messages):
            try:
                check_text(m["content"], f"message {i + 1}")
            except OvchatError as e:
                raise InputError(f"{path}: {e}") from None
        keys = ("role", "content", "tool_calls", "tool_call_id")
        self._messages = [{k: m[k] for k in keys if k in m} for m in messages]
        self.options = options

    # -- generation -----------------------------------------------------------------------

    def send(self, prompt: Optional[str] = None, *, tools: Optional[Sequence[Any]] = None,
             tool_choice: Any = None, response_format: Optional[dict] = None, **options: Any) -> Reply:
        """Send one user message and return the whole reply (a ``Reply``: its text, and the
        tool calls it makes in ``reply.tool_calls``). See ``stream`` for the arguments."""
        chunks = self.stream(prompt, tools=tools, tool_choice=tool_choice, response_format=response_format,
                             **options)
        for _ in chunks:
            pass
        return self.last_reply

    def stream(self, prompt: Optional[str] = None, *, tools: Optional[Sequence[Any]] = None,
               tool_choice: Any = None, response_format: Optional[dict] = None, **options: Any) -> Iterator[str]:
        """Send one user message and yield the reply as text chunks while it is generated.

        ``tools``: functions the model may call, in OpenAI's form (``{"type": "function",
        "function": {"name", "description", "parameters"}}``); ``tool_choice``: auto (the model
        decides; its chat template must show tools), required (a call of any of them, forced by a
        grammar), or a function's name (a call of that one). Calls are not streamed: they are in
        ``last_reply.tool_calls`` (and in the conversation); answer them with ``add_tool_result``
        and ``send()`` without a prompt. ``response_format``: OpenAI's ``{"type": "json_object"}``
        or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: the reply is JSON, by a
        grammar. Other keyword arguments override generation options for this turn only. Closing
        the iterator early (or ``cancel()``) stops the reply; what was generated stays in the
        conversation.
        """
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError("the prompt is empty; type a message")
        if prompt is not None:
            check_text(prompt, "the message")
        if prompt is None and not (self._messages and self._messages[-1]["role"] == "tool"):
            raise InputError("give a prompt (a reply without one continues after tool results, and there are none)")
        if not self.has_chat_template:
            raise ModelLoadError(f"{self.model_path.name} has no chat template (a base model?), so it cannot "
                                 "chat; continue a text instead: ovchat run --raw, or ChatSession.complete()")
        opts = self.options.with_changes(**options)
        if self._busy.locked():
            raise OvchatError("this session is already generating a reply; wait for it or cancel it")
        user = None if prompt is None else {"role": "user", "content": prompt}
        if self._remote is not None:
            request = {"tools": tools, "tool_choice": tool_choice, "response_format": response_format}
            if not any(m["role"] == "assistant" for m in self._messages):
                # A first turn needs no trimming: the server refuses a prompt too long for the window.
                return self._generate_remote(self._messages + [user], opts, opts.max_new_tokens, request)
            history, max_new, _ = self._fit_turn(user, opts)
            return self._generate_remote(history, opts, max_new, request)
        shape = self._shape(tools, tool_choice, response_format)
        history, max_new, prompt_tokens = self._fit_turn(user, opts, shape)
        return self._generate(history, opts, max_new, prompt_tokens, shape=shape)

    def add_tool_result(self, call: "ToolCall | str", content: Any) -> None:
        """Put the result of a tool call (a ToolCall of ``last_reply``, or its id) into the
        conversation, as text (anything else is written as JSON)."""
        call_id = call.id if isinstance(call, ToolCall) else str(call)
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        self._messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def _shape(self, tools: Optional[Sequence[Any]], tool_choice: Any, response_format: Optional[dict]) -> _Shape:
        from ovchat import structured

        parsed = tuple(t if isinstance(t, Tool) else parse_tools([t])[0] for t in tools or ())
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        choice = parse_tool_choice(tool_choice, parsed)
        template = self._tokenizer.chat_template or ""
        if parsed and choice == "auto" and not template_offers_tools(template):
            raise InputError(f"the chat template of {self.model_path.name} has no place for tools, so the model "
                             "cannot choose to call one; force a call with tool_choice 'required' or a function's name")
        fmt = structured.parse_response_format(response_format)
        return _Shape(parsed, choice, offer=bool(parsed) and choice != "none" and template_offers_tools(template),
                      structured=structured.settings(fmt, parsed, choice))

    def complete(self, text: str, **options: Any) -> Iterator[str]:
        """Continue ``text`` as it is, without the chat template, and yield the continuation.

        This is how a base model (one without a chat template) is used; the conversation is
        neither read nor changed. The text is tokenized as the model expects plain text (with
        its BOS token, if it has one) and must leave room in the context window.
        """
        import openvino as ov
        import numpy as np

        if not isinstance(text, str) or not text.strip():
            raise InputError("the text to continue is empty; give some text")
        check_text(text, "the text to continue")
        opts = self.options.with_changes(**options)
        if self._remote is not None:
            return self._generate_remote(None, opts, opts.max_new_tokens, {"prompt": text})
        ids = self._tokenizer.encode(text, add_special_tokens=True).input_ids
        count = int(ids.shape[1])
        max_new = opts.max_new_tokens
        if self.context_limit is not None:
            if count >= self.context_limit:
                raise ContextOverflowError(f"the text has {count} tokens, but the context window is "
                                           f"{self.context_limit}; shorten it or raise --max-context")
            max_new = min(max_new, self.context_limit - count)
        prompt = ov.Tensor(np.array(ids.data, dtype=np.int64))
        return self._generate(None, opts, max_new, count, prompt=prompt)

    def cancel(self) -> None:
        """Stop the reply being generated (from any thread); it ends at the next token."""
        self._cancel.set()

    def context_used(self) -> int:
        """Tokens the conversation takes in the window now."""
        if not self._messages or not self.has_chat_template:
            return 0
        return self._count(self._messages, add_generation_prompt=False)

    def _generate(self, history: Optional[List[Dict[str, Any]]], opts: GenerationOptions, max_new: int,
                  prompt_tokens: int, prompt: Any = None, shape: _Shape = _Shape()) -> Iterator[str]:
        """Stream a reply to ``history`` (a chat turn, kept in the conversation) or, with
        ``history`` None, the continuation of the token ids ``prompt`` (kept nowhere)."""
        import openvino_genai

        config = opts.settings(max_new, **shape.structured).to_genai(self._pipe.get_generation_config(),
                                                                     self.speculation)
        splitter = Splitter(shape.tools, self._tokenizer.chat_template or "") if shape.choice == "auto" and \
            shape.tools else None
        chunks: "queue.Queue[object]" = queue.Queue()
        outcome: Dict[str, Any] = {}
        self._cancel.clear()
        running, stop = openvino_genai.StreamingStatus.RUNNING, openvino_genai.StreamingStatus.STOP

        def streamer(text: str) -> Any:
            chunks.put(text)
            return stop if self._cancel.is_set() else running

        def work() -> None:
            try:
                source = prompt if history is None else self._chat_history(history, shape)
                outcome["result"] = self._pipe.generate(source, config, streamer)
            except RuntimeError as e:
                outcome["error"] = e
            finally:
                chunks.put(_DONE)

        if not self._busy.acquire(blocking=False):
            raise OvchatError("this session is already generating a reply; wait for it or cancel it")
        worker = threading.Thread(target=work, name="ovchat-generate", daemon=True)
        parts: List[str] = []
        try:
            worker.start()
            while True:
                try:
                    item = chunks.get(timeout=0.1)  # a timeout keeps the main thread responsive to Ctrl-C
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                parts.append(item)  # type: ignore[arg-type]
                # Calls are not streamed: a forced one is all JSON, a chosen one is held back.
                shown = "" if shape.forced else splitter.feed(item) if splitter else item  # type: ignore[arg-type]
                if shown:
                    yield shown
        finally:
            cancelled = worker.is_alive()
            if cancelled:
                self._cancel.set()
            worker.join()
            self._finish_turn(history, parts, outcome, max_new, prompt_tokens, cancelled, shape)
            self._busy.release()
        if splitter is not None and "error" not in outcome:
            rest, _ = splitter.finish()
            if rest:
                yield rest
        if "error" in outcome:
            raise ModelLoadError(f"generation failed: {summary(outcome['error'])}")

    def _generate_remote(self, history: Optional[List[Dict[str, Any]]], opts: GenerationOptions, max_new: int,
                         request: Dict[str, Any]) -> Iterator[str]:
        """Stream a reply from the server: a chat turn (kept in the conversation) or, with
        ``history`` None, the continuation of ``request["prompt"]``."""
        body: Dict[str, Any] = {"model": self._remote.info.model_id, "max_tokens": max_new,
                                "stream_options": {"include_usage": True}, **opts.as_request()}
        if history is None:
            path, body["prompt"] = "/v1/completions", request["prompt"]
        else:
            path, body["messages"] = "/v1/chat/completions", history
            body.update({k: v for k, v in request.items() if v is not None})
        if not self._busy.acquire(blocking=False):
            raise OvchatError("this session is already generating a reply; wait for it or cancel it")
        self._cancel.clear()
        parts: List[str] = []
        calls: List[ToolCall] = []
        usage: Dict[str, int] = {}
        finish, ticks = "stop", []
        start = time.perf_counter()
        events = self._remote.stream(path, body)
        try:
            for event in events:
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {"content": choice.get("text")}
                    for call in delta.get("tool_calls") or []:
                        function = call.get("function") or {}
                        calls.append(ToolCall(function.get("name", ""), json.loads(function.get("arguments") or "{}"),
                                              call.get("id", "")))
                    finish = choice.get("finish_reason") or finish
                    text = delta.get("content")
                    if text:
                        ticks.append(time.perf_counter())
                        parts.append(text)
                        yield text
        finally:
            events.close()
            cancelled = finish == "cancelled"
            text = "".join(parts)
            self._record_reply(history, text, calls)
            generated = usage.get("completion_tokens", len(ticks))
            decode_s = ticks[-1] - ticks[0] if len(ticks) > 1 else 0.0
            self.last_metrics = TurnMetrics(
                prompt_tokens=usage.get("prompt_tokens", 0), generated_tokens=generated,
                ttft_s=(ticks[0] - start) if ticks else 0.0,
                decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 else 0.0,
                generate_s=time.perf_counter() - start, load_s=self.load_s,
                context_used=usage.get("total_tokens", 0), context_limit=self.context_limit,
                finish_reason="cancelled" if cancelled else ("length" if finish == "length" else "stop"))
            self._busy.release()

    def _chat_history(self, history: List[Dict[str, Any]], shape: _Shape) -> Any:
        import openvino_genai

        chat = openvino_genai.ChatHistory(history)
        if shape.offer:
            chat.set_tools([t.as_template_dict() for t in shape.tools])
        return chat

    def _finish_turn(self, history: Optional[List[Dict[str, Any]]], parts: List[str], outcome: Dict[str, Any],
                     max_new: int, prompt_tokens: int, cancelled: bool, shape: _Shape = _Shape()) -> None:
        result = outcome.get("result")
        text = result.texts[0] if result is not None and getattr(result, "texts", None) else "".join(parts)
        calls: List[ToolCall] = []
        if shape.forced:
            call = forced_call(text, shape.tools, shape.choice)
            calls, text = ([call], "") if call is not None else ([], text)
        elif shape.choice == "auto" and shape.tools:
            text, calls = parse(text, shape.tools, self._tokenizer.chat_template or "")
        self._record_reply(history, text, calls)
        if result is None:
            return
        perf = result.perf_metrics
        generated = perf.get_num_generated_tokens()
        tpot_ms = perf.get_tpot().mean
        steps = len(perf.raw_metrics.m_new_token_times) - 1  # one time per model call; the first is the prompt's
        if cancelled or self._cancel.is_set():
            finish = "cancelled"
        else:
            finish = "length" if generated >= max_new else "stop"
        self.last_metrics = TurnMetrics(
            prompt_tokens=perf.get_num_input_tokens() or prompt_tokens,
            generated_tokens=generated,
            ttft_s=perf.get_ttft().mean / 1000,
            decode_tokens_per_s=1000 / tpot_ms if tpot_ms > 0 else 0.0,
            generate_s=perf.get_generate_duration().mean / 1000,
            load_s=self.load_s,
            context_used=self.context_used() if history is not None else prompt_tokens + generated,
            context_limit=self.context_limit,
            finish_reason=finish,
            tokens_per_step=(generated - 1) / steps if steps > 0 else None,
        )

    # -- context window -------------------------------------------------------------------

    def _record_reply(self, history: Optional[List[Dict[str, Any]]], text: str, calls: List[ToolCall]) -> None:
        """Keep the reply as ``last_reply`` and, in a conversation, as its next assistant message
        (with OpenAI's ``tool_calls`` when the model called tools)."""
        self.last_reply = Reply(text, calls)
        if history is None:  # raw completion: no conversation to extend
            return
        message: Dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        self._messages = history + [message]

    def _count(self, messages: List[Dict[str, Any]], *, add_generation_prompt: bool = True,
               shape: _Shape = _Shape()) -> int:
        text = self._tokenizer.apply_chat_template(self._chat_history(messages, shape),
                                                   add_generation_prompt=add_generation_prompt)
        return int(self._tokenizer.encode(text, add_special_tokens=False).input_ids.shape[1])

    def _fit_turn(self, user: Optional[Dict[str, str]], opts: GenerationOptions, shape: _Shape = _Shape()) -> tuple:
        """The history for this turn, trimmed to the window, and how many tokens the reply may use.

        While the prompt plus a reserve for the reply does not fit, the oldest exchange (a user
        message and the replies after it) is dropped; the system prompt never is. A message that
        leaves no room for even one token on its own is an error.
        """
        history = self._messages + ([user] if user is not None else [])
        count = self._count(history, shape=shape)
        limit = self.context_limit
        if limit is None:
            return history, opts.max_new_tokens, count
        reserve = min(opts.max_new_tokens, max(1, limit // _REPLY_SHARE))
        dropped = 0
        while count + reserve > limit:
            first = next(i for i, m in enumerate(history) if m["role"] != "system")
            if first == len(history) - 1:
                break  # only the new message is left
            end = first + 1
            while end < len(history) - 1 and history[end]["role"] != "user":
                end += 1
            dropped += end - first
            history = history[:first] + history[end:]
            count = self._count(history, shape=shape)
        if count >= limit:
            raise ContextOverflowError(
                f"the message needs {count} tokens with the system prompt, but the context window is "
                f"{limit}; shorten it or raise --max-context")
        if dropped:
            self._messages = history[:-1] if user is not None else history
            self._notice(f"dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit "
                         f"the {limit}-token context window")
        return history, min(opts.max_new_tokens, limit - count), count
