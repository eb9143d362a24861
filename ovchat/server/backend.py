"""Generation for the server: one ContinuousBatchingPipeline shared by every request.

Continuous batching is GenAI's scheduler: requests join and leave a running batch between
steps, and the KV cache is a fixed pool of blocks (``kv_cache_gb``) that the scheduler shares
out. One thread, the stepper, drives the pipeline: it alone adds and cancels requests, calls
``step()`` and reads each request's new tokens, so no scheduler call ever races another. The
asyncio side talks to it through a command queue and gets text back through one asyncio queue
per request. ``step()`` releases the GIL, so the event loop keeps serving while the model runs.
(The tokenizer, which GenAI makes safe to share between threads, is also used by the request
handlers to apply the chat template and count tokens.)

New tokens are detokenized incrementally, as vLLM does: a short window of already-sent tokens is
decoded with and without the new ones and only the difference is sent, so the tokenizer's
spacing comes out as in a whole decode, a multi-byte character cut between tokens waits for its
rest, and the cost per step does not grow with the reply. Streamed and non-streamed replies are
the same pieces joined. GenAI itself holds back tokens that may start a stop string, so text
that a stop string later removes is never streamed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from ovchat.devices import DeviceChoice, compile_properties, compile_with_fallback
from ovchat.errors import APIError, ModelLoadError, summary
from ovchat.options import GenerationOptions
from ovchat.store import compile_cache_dir

log = logging.getLogger(__name__)

# A text piece ending in U+FFFD is a multi-byte character cut between tokens: wait for the rest.
_PARTIAL_CHARACTER = "\ufffd"
_STOP = object()


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt: the ids tensor GenAI takes, and how many tokens it has."""

    ids: Any
    tokens: int


@dataclass(frozen=True)
class Piece:
    """New text of one request. ``finish_reason`` (stop or length) is set on the last piece."""

    text: str
    completion_tokens: int
    finish_reason: Optional[str] = None


class IncrementalText:
    """One reply's token ids, turned into text piece by piece (see the module's docstring)."""

    def __init__(self, decode: Callable[[List[int]], str]):
        self._decode = decode
        self.ids: List[int] = []
        # ids[prefix:read] were sent already and give the window its context; ids[read:] were not.
        self._prefix = 0
        self._read = 0

    def add(self, ids: List[int]) -> None:
        self.ids.extend(ids)

    def take(self, *, final: bool = False) -> str:
        """The text the unsent ids add: "" while it ends in a cut character, unless ``final``."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(self.ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(_PARTIAL_CHARACTER)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]


@dataclass
class _Request:
    id: int
    prompt: Prompt
    config: Any
    loop: asyncio.AbstractEventLoop
    pieces: "asyncio.Queue[Any]"
    text: IncrementalText
    handle: Any = None


class Backend:
    """The model behind the server, loaded once and shared by all requests.

    ``max_running`` bounds the sequences the scheduler batches at once (the HTTP layer admits
    no more than that); ``context_limit`` is the window a prompt and its reply must fit in.
    """

    def __init__(self, model_path: Path, device: DeviceChoice, *, context_limit: Optional[int],
                 max_running: int, kv_cache_gb: int, on_notice: Callable[[str], None] = log.info,
                 pipeline_factory: Optional[Callable[..., Any]] = None):
        self.model_path = Path(model_path)
        self.device = device
        self.context_limit = context_limit
        self.max_running = max_running
        self.kv_cache_gb = kv_cache_gb
        self.load_s: Optional[float] = None
        self.error: Optional[str] = None
        self._notice = on_notice
        self._factory = pipeline_factory
        self._pipe: Any = None
        self._tokenizer: Any = None
        self._has_template = False
        self._ready = threading.Event()
        self._commands: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        # Held while a request is queued for the stepper and while the stepper shuts its queue,
        # so no request can be queued after the stepper has stopped reading.
        self._queue_lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count(1)
        self._stepper: Optional[threading.Thread] = None

    # -- loading ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Compile the model and start the stepper; raises ModelLoadError (also kept in ``error``)."""
        import openvino_genai

        start = time.perf_counter()
        try:
            self._pipe = self._compile(openvino_genai)
        except ModelLoadError as e:
            self.error = str(e)
            raise
        self._tokenizer = self._pipe.get_tokenizer()
        self._has_template = bool(self._tokenizer.chat_template)
        self.load_s = time.perf_counter() - start
        self._stepper = threading.Thread(target=self._run, name="ovchat-stepper", daemon=True)
        self._stepper.start()
        self._ready.set()

    def _compile(self, openvino_genai: Any) -> Any:
        factory = self._factory or openvino_genai.ContinuousBatchingPipeline
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size = self.kv_cache_gb
        scheduler.max_num_seqs = self.max_running
        # Prefix caching keeps finished requests' blocks; off, the pool holds only live requests.
        scheduler.enable_prefix_caching = False
        pipe, self.device = compile_with_fallback(
            lambda device: factory(str(self.model_path), scheduler, device.name,
                                   compile_properties(device, compile_cache_dir())),
            self.device, model=self.model_path, notice=self._notice)
        return pipe

    def close(self) -> None:
        """Stop the stepper; requests still running end with an error."""
        if self._stepper is not None:
            self._commands.put(_STOP)
            self._stepper.join(timeout=30)

    # -- preparing requests -------------------------------------------------------------------

    def encode_chat(self, messages: List[Dict[str, str]]) -> Prompt:
        """Messages through the model's chat template, tokenized (the template adds the specials)."""
        if not self._has_template:
            raise APIError(400, f"the model {self.model_path.name} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except RuntimeError as e:
            # Templates may refuse some orders of roles (e.g. two user messages in a row).
            raise APIError(400, f"the model's chat template refused the messages: {summary(e)}",
                           param="messages") from None
        return self._encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> Prompt:
        """A raw prompt, tokenized as the model expects plain text (with its BOS, if any)."""
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, *, add_special_tokens: bool) -> Prompt:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).input_ids
        return Prompt(ids, int(ids.shape[1]))

    def reply_budget(self, prompt: Prompt, requested: Optional[int]) -> int:
        """The most tokens a reply to ``prompt`` may have: what was asked, cut to the window.

        A prompt that leaves no room for a single token is refused (400, OpenAI's code).
        """
        limit = self.context_limit
        if limit is None:
            return requested or GenerationOptions().max_new_tokens
        room = limit - prompt.tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt.tokens} tokens, but the model's context window is "
                                f"{limit}; shorten it", param="messages", code="context_length_exceeded")
        return min(requested or room, room)

    def config(self, options: GenerationOptions, max_new_tokens: int, penalties: Dict[str, float]) -> Any:
        """The model's own GenerationConfig (its eos ids) with the request's options."""
        config = options.to_genai(self._pipe.get_config(), max_new_tokens=max_new_tokens)
        for name, value in penalties.items():
            setattr(config, name, value)
        return config

    # -- generating ---------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, config: Any) -> AsyncIterator[Piece]:
        """Yield the reply as pieces of text while the scheduler produces it.

        Leaving the iteration early (the client went away, the task was cancelled) cancels the
        request: the stepper drops its handle and the scheduler frees its KV blocks.
        """
        request = _Request(next(self._ids), prompt, config, asyncio.get_running_loop(), asyncio.Queue(),
                           IncrementalText(self._tokenizer.decode))
        with self._queue_lock:
            if self._closed:
                raise APIError(503, self.error or "the server is shutting down", kind="server_error")
            self._commands.put(("add", request))
        finished = False
        try:
            while True:
                item = await request.pieces.get()
                if isinstance(item, APIError):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("cancel", request))

    def _run(self) -> None:
        """The stepper: the only thread that adds, cancels, steps and reads requests."""
        active: Dict[int, _Request] = {}
        try:
            while True:
                idle = not active and not self._pipe.has_non_finished_requests()
                if not self._take_commands(active, block=idle):
                    break
                if self._pipe.has_non_finished_requests():
                    try:
                        self._pipe.step()
                    except RuntimeError as e:
                        self._fail(active, APIError(500, f"generation failed: {summary(e)}",
                                                    kind="server_error"))
                        continue
                for request in list(active.values()):
                    self._collect(request, active)
        finally:
            # Normal stop or a bug: either way nobody must wait for pieces that will never come.
            self.error = self.error or "the server is shutting down"
            self._ready.clear()
            with self._queue_lock:
                self._closed = True
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command is not _STOP and command[0] == "add":
                    active[command[1].id] = command[1]
            self._fail(active, APIError(503, self.error, kind="server_error"))

    def _take_commands(self, active: Dict[int, _Request], *, block: bool) -> bool:
        """Apply queued adds and cancels; False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is _STOP:
                return False
            action, request = command
            if action == "add":
                try:
                    request.handle = self._pipe.add_request(request.id, request.prompt.ids, request.config)
                except RuntimeError as e:  # GenAI's own check of the config
                    _deliver(request, APIError(400, summary(e)))
                    continue
                active[request.id] = request
            elif request.id in active:
                active.pop(request.id).handle.cancel()

    def _collect(self, request: _Request, active: Dict[int, _Request]) -> None:
        """Read a request's new tokens and send on the text they add."""
        import openvino_genai

        finish = None
        if request.handle.can_read():
            for output in request.handle.read().values():
                request.text.add(output.generated_ids)
                if output.finish_reason != openvino_genai.GenerationFinishReason.NONE:
                    finish = output.finish_reason
        status = request.handle.get_status()
        if finish is None and status == openvino_genai.GenerationStatus.RUNNING:
            text = request.text.take()
            if text:
                _deliver(request, Piece(text, len(request.text.ids)))
            return
        del active[request.id]
        if status == openvino_genai.GenerationStatus.IGNORED:
            _deliver(request, APIError(400, f"the request needs more KV cache than the server has; shorten it "
                                            f"or restart the server with more than {self.kv_cache_gb} GB "
                                            "(--kv-cache-gb)", code="kv_cache_exceeded"))
            return
        reason = "length" if finish == openvino_genai.GenerationFinishReason.LENGTH else "stop"
        _deliver(request, Piece(request.text.take(final=True), len(request.text.ids), reason))

    def _fail(self, active: Dict[int, _Request], error: APIError) -> None:
        for request in active.values():
            _deliver(request, error)
        active.clear()


def _deliver(request: _Request, item: Any) -> None:
    try:
        request.loop.call_soon_threadsafe(request.pieces.put_nowait, item)
    except RuntimeError:
        pass  # the event loop has closed: the server is gone and nobody is waiting

