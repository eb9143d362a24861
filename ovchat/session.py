"""A conversation with a model: ``ChatSession``.

The session is the conversation (its messages, the system prompt, the options), the policy that
keeps it inside the context window, the tool plan of each turn, and what a turn leaves behind
(the reply in the conversation, ``last_reply``, ``last_metrics``). Counting tokens and
generating are a backend's (``ovchat.backend``): the model loaded here (``ovchat.local``) or a
running `ovchat serve` of it (``ovchat.remote``, the warm path). Both go through this same code,
so a turn is trimmed, shaped and recorded the same way wherever the model runs.

A turn is a ``Response``: iterate it for the text as it streams, and read its text, tool calls,
metrics and finish reason once it has ended. ``stream`` and ``send`` are thin over it. A model
without a chat template (a base model, such as Gemma 3 270M) cannot chat; ``complete`` continues a
plain text instead, outside the conversation.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ovchat.backend import Backend, Outcome, Request
from ovchat.errors import ContextOverflowError, InputError, NoChatTemplateError, OvchatError
from ovchat.options import GenerationOptions, check_text
from ovchat.progress import ProgressCallback, ignore
from ovchat.speculation import Speculation
from ovchat.structured import parse_response_format
from ovchat.toolcalls import ToolCall, ToolPlan

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_FORMAT = "ovchat-conversation"
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


class Response:
    """One reply being generated. Iterate it for its text as it streams (closing it early, or
    ``ChatSession.cancel()``, stops the reply); once it has ended, ``text``, ``tool_calls``,
    ``metrics`` and ``finish_reason`` describe it. ``wait()`` runs it to the end."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks
        self.text: Optional[str] = None
        self.tool_calls: Tuple[ToolCall, ...] = ()
        self.metrics: Optional[TurnMetrics] = None

    @property
    def finish_reason(self) -> Optional[str]:
        return self.metrics.finish_reason if self.metrics is not None else None

    def __iter__(self) -> "Response":
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def wait(self) -> "Response":
        for _ in self:
            pass
        return self

    def _ended(self, text: str, calls: Tuple[ToolCall, ...], metrics: TurnMetrics) -> None:
        self.text, self.tool_calls, self.metrics = text, calls, metrics


class ChatSession:
    """A conversation with a local model.

    >>> session = ChatSession(system="Answer in one sentence.")
    >>> session.send("What is the capital of France?")
    'The capital of France is Paris.'

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
        from ovchat.loading import check_max_context, plan
        from ovchat.store import resolve_model

        self.options = options or GenerationOptions()
        self._notice = on_notice
        self.speculation = speculation
        check_max_context(max_context)
        path = resolve_model(None if model is None else str(model), progress=progress)
        backend: Optional[Backend] = None
        if use_server and speculation is None:
            from ovchat.remote import RemoteBackend

            backend = RemoteBackend.connect(path, device)  # the warm path imports no OpenVINO
        if backend is None:
            from ovchat.local import LocalBackend

            loaded = plan(path, device=device, max_context=max_context, available_devices=available_devices,
                          progress=progress)
            backend = LocalBackend(loaded, speculation=speculation, notice=on_notice,
                                   pipeline_factory=pipeline_factory)
        self._backend = backend
        self.model_path: Path = backend.model_path
        self.device = backend.device
        self.load_s = backend.load_s
        self.has_chat_template = backend.has_chat_template
        self.context_limit = max_context or backend.context_limit
        self._messages: List[Dict[str, Any]] = []
        if system:
            self._messages.append({"role": "system", "content": check_text(system, "the system prompt")})
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self.last_metrics: Optional[TurnMetrics] = None
        self.last_reply: Reply = Reply("")

    @property
    def pipeline(self) -> Any:
        """The loaded ``openvino_genai.LLMPipeline`` (None on the warm path), for callers that
        drive it with token ids (``ovchat bench``); generating through it bypasses the conversation."""
        return getattr(self._backend, "pipeline", None)

    # -- conversation ---------------------------------------------------------------------------

    @property
    def messages(self) -> List[Dict[str, Any]]:
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
        from ovchat.userfiles import write_text

        write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def load(self, path: str | Path) -> None:
        """Replace the conversation (and options) with one written by ``save``."""
        from ovchat.userfiles import read_text

        path = Path(path).expanduser()
        text = read_text(path, what="conversation saved by ovchat")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"{path} is not a conversation saved by ovchat (not JSON, or nested too deeply)") from None
        if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
            raise InputError(f"{path} is not a conversation saved by ovchat")
        if data.get("version", 1) != 1:
            raise InputError(f"{path} was saved by another version of ovchat (format version "
                             f"{data.get('version')!r}; this one reads 1)")
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

    def add_tool_result(self, call: "ToolCall | str", content: Any) -> None:
        """Put the result of a tool call (a ToolCall of ``last_reply``, or its id) into the
        conversation, as text (anything else is written as JSON)."""
        call_id = call.id if isinstance(call, ToolCall) else str(call)
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        self._messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    # -- turns ----------------------------------------------------------------------------------

    def turn(self, prompt: Optional[str] = None, *, tools: Optional[Sequence[Any]] = None,
             tool_choice: Any = None, response_format: Optional[dict] = None, **options: Any) -> Response:
        """Send one user message and return the reply as a ``Response`` (generated as it is
        iterated).

        ``tools``: functions the model may call, in OpenAI's form (``{"type": "function",
        "function": {"name", "description", "parameters"}}``); ``tool_choice``: auto (the model
        decides; its chat template must show tools), required (a call of any of them, forced by a
        grammar), or a function's name (a call of that one). Calls are not streamed: they are in
        the Response (and ``last_reply``, and the conversation); answer them with
        ``add_tool_result`` and a turn without a prompt. ``response_format``: OpenAI's
        ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
        {...}}}``: the reply is JSON, by a grammar. Other keyword arguments override generation
        options for this turn only. Stopping the reply early keeps what was generated in the
        conversation.
        """
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError("the prompt is empty; type a message")
        if prompt is not None:
            check_text(prompt, "the message")
        if prompt is None and not (self._messages and self._messages[-1]["role"] == "tool"):
            raise InputError("give a prompt (a reply without one continues after tool results, and there are none)")
        if not self.has_chat_template:
            raise NoChatTemplateError(self.model_path.name)
        opts = self.options.with_changes(**options)
        plan = ToolPlan.from_request(tools, tool_choice)
        template = getattr(self._backend, "chat_template", None)
        if template is not None:  # a remote backend's server checks the plan against its template
            plan.check(template, self.model_path.name)
        self._refuse_if_busy()
        user = None if prompt is None else {"role": "user", "content": prompt}
        history, max_new, prompt_tokens = self._fit_turn(user, opts, plan)
        request = Request(opts, max_new, messages=history, plan=plan,
                          response_format=parse_response_format(response_format))
        return self._run(request, history, prompt_tokens)

    def stream(self, prompt: Optional[str] = None, **kwargs: Any) -> Iterator[str]:
        """Send one user message and yield the reply as text chunks while it is generated (see
        ``turn`` for the arguments). Closing the iterator early (or ``cancel()``) stops the reply."""
        return self.turn(prompt, **kwargs)

    def send(self, prompt: Optional[str] = None, **kwargs: Any) -> Reply:
        """Send one user message and return the whole reply: a ``Reply``, its text with the tool
        calls it makes in ``reply.tool_calls`` (see ``turn`` for the arguments)."""
        response = self.turn(prompt, **kwargs).wait()
        return Reply(response.text or "", response.tool_calls)

    def complete(self, text: str, **options: Any) -> Response:
        """Continue ``text`` as it is, without the chat template, and yield the continuation.

        This is how a base model (one without a chat template) is used; the conversation is
        neither read nor changed. The text is tokenized as the model expects plain text (with
        its BOS token, if it has one) and must leave room in the context window.
        """
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text to continue is empty; give some text")
        check_text(text, "the text to continue")
        opts = self.options.with_changes(**options)
        self._refuse_if_busy()
        count = self._backend.count_text(text)
        self._check_prompt_limit(count, "the text")
        max_new = opts.max_new_tokens
        if self.context_limit is not None:
            if count >= self.context_limit:
                raise ContextOverflowError(f"the text has {count} tokens, but the context window is "
                                           f"{self.context_limit}; shorten it or raise --max-context")
            max_new = min(max_new, self.context_limit - count)
        return self._run(Request(opts, max_new, prompt=text), None, count)

    def cancel(self) -> None:
        """Stop the reply being generated (from any thread); it ends at the next token."""
        self._cancel.set()

    def context_used(self) -> int:
        """Tokens the conversation takes in the window now."""
        if not self._messages or not self.has_chat_template:
            return 0
        return self._backend.count(self._messages, ToolPlan(), add_generation_prompt=False)

    # -- running a turn -------------------------------------------------------------------------

    def _refuse_if_busy(self) -> None:
        if self._busy.locked():
            raise OvchatError("this session is already generating a reply; wait for it or cancel it")

    def _run(self, request: Request, history: Optional[List[Dict[str, Any]]], prompt_tokens: int) -> Response:
        """The Response of ``request``: generated as it is iterated, recorded when it ends (in
        the conversation when ``history`` is a chat turn's)."""
        response: Response

        def ended(outcome: Outcome) -> None:
            self._record(history, outcome)
            prompt = outcome.prompt_tokens or prompt_tokens
            self.last_metrics = TurnMetrics(
                prompt_tokens=prompt, generated_tokens=outcome.generated_tokens, ttft_s=outcome.ttft_s,
                decode_tokens_per_s=outcome.decode_tokens_per_s, generate_s=outcome.generate_s, load_s=self.load_s,
                context_used=prompt + outcome.generated_tokens, context_limit=self.context_limit,
                finish_reason=outcome.finish_reason, tokens_per_step=outcome.tokens_per_step)
            response._ended(outcome.text, outcome.tool_calls, self.last_metrics)

        def chunks() -> Iterator[str]:
            if not self._busy.acquire(blocking=False):
                raise OvchatError("this session is already generating a reply; wait for it or cancel it")
            self._cancel.clear()
            try:
                yield from self._backend.generate(request, self._cancel, ended)
            finally:
                self._busy.release()

        response = Response(chunks())
        return response

    def _record(self, history: Optional[List[Dict[str, Any]]], outcome: Outcome) -> None:
        """Keep the reply as ``last_reply`` and, in a conversation, as its next assistant message
        (with OpenAI's ``tool_calls`` when the model called tools)."""
        self.last_reply = Reply(outcome.text, outcome.tool_calls)
        if history is None:  # raw completion: no conversation to extend
            return
        message: Dict[str, Any] = {"role": "assistant", "content": outcome.text}
        if outcome.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in outcome.tool_calls]
        self._messages = history + [message]

    # -- the context window -----------------------------------------------------------------------

    def _check_prompt_limit(self, count: int, what: str) -> None:
        """Refuse, before generating, a prompt longer than the device takes (the NPU's shapes are
        compiled for MAX_PROMPT_LEN tokens: a longer one would come back garbled, not refused)."""
        limit = getattr(self._backend, "prompt_limit", None)
        if limit is not None and count > limit:
            raise ContextOverflowError(
                f"{what} needs {count} tokens, but {self.device.name} was compiled for prompts of at most {limit} "
                f"(its window of {self.context_limit} less room for the reply); shorten it, or load the model "
                "with a larger --max-context")

    def _fit_turn(self, user: Optional[Dict[str, str]], opts: GenerationOptions, plan: ToolPlan) -> tuple:
        """The history for this turn, trimmed to the window, how many tokens the reply may use,
        and the prompt's tokens.

        While the prompt plus a reserve for the reply does not fit, the oldest exchange (a user
        message and the replies after it) is dropped; the system prompt never is. A message that
        leaves no room for even one token on its own is an error.
        """
        history = self._messages + ([user] if user is not None else [])
        count = self._backend.count(history, plan)
        limit = self.context_limit
        prompt_limit = getattr(self._backend, "prompt_limit", None)
        if limit is None:
            self._check_prompt_limit(count, "the message")
            return history, opts.max_new_tokens, count
        reserve = min(opts.max_new_tokens, max(1, limit // _REPLY_SHARE))
        dropped = 0
        while count + reserve > limit or (prompt_limit is not None and count > prompt_limit):
            first = next(i for i, m in enumerate(history) if m["role"] != "system")
            if first == len(history) - 1:
                break  # only the new message is left
            end = first + 1
            while end < len(history) - 1 and history[end]["role"] != "user":
                end += 1
            dropped += end - first
            history = history[:first] + history[end:]
            count = self._backend.count(history, plan)
        if count >= limit:
            raise ContextOverflowError(
                f"the message needs {count} tokens with the system prompt, but the context window is "
                f"{limit}; shorten it or raise --max-context")
        self._check_prompt_limit(count, "the message")
        if dropped:
            self._messages = history[:-1] if user is not None else history
            self._notice(f"dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit "
                         f"the {limit}-token context window")
        return history, min(opts.max_new_tokens, limit - count), count
