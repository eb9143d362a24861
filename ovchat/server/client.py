"""The HTTP process's side of the engine: start it, talk to it, watch it, restart it.

``EngineClient`` spawns the engine process (``ovchat.server.engine.run``), sends it requests and
cancellations, and delivers what comes back to one asyncio queue per request. A reader thread
waits on the pipe and a sender thread writes to it (both release the GIL while they wait, and a
long prompt filling the pipe while the engine is busy with a step never blocks the event loop).
When the engine process dies, every request it held ends with ``EngineUnavailableError`` and a
new engine is started; until it is ready the state is "restarting" and new requests are refused
the same way. Tokenizing prompts and detokenizing replies happens here, in the HTTP process,
with the model's own tokenizer (GenAI makes one safe to share between threads).

Everything this class raises is a domain error (``ovchat.errors``); the HTTP layer maps them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from ovchat.errors import EngineUnavailableError, InvalidRequestError
from ovchat.options import GenerationSettings
from ovchat.server import engine as engine_process
from ovchat.server import protocol
from ovchat.server.engine import EngineSpec

log = logging.getLogger("ovchat.server")

# Restarts in a row that fail to load before the client gives up (a model that loaded once and
# then cannot be loaded again has a problem no retry will fix).
_MAX_FAILED_RESTARTS = 3


@dataclass
class Output:
    """New tokens of one choice of a request; ``finish`` (stop, length) is set on its last."""

    index: int
    ids: List[int]
    logprobs: List[float]
    finish: Optional[str] = None


@dataclass
class _Request:
    rid: int
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)


class EngineClient:
    """The engine process behind the server, and the model's tokenizer.

    ``state``: loading, ready, restarting, failed (the model cannot be loaded), stopped.
    """

    def __init__(self, spec: EngineSpec, *, on_ready: Callable[[], None] = lambda: None,
                 on_failed: Callable[[str], None] = lambda _: None):
        self.spec = spec
        self.state = "loading"
        self.error: Optional[str] = None
        self.load_s: Optional[float] = None
        self.restarts = 0
        self.pid: Optional[int] = None
        self.stats = protocol.Stats()
        self.tokenizer: Any = None
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._context = multiprocessing.get_context("spawn")  # never fork a process holding OpenVINO threads
        self._process: Any = None
        self._outbox: "Optional[queue.SimpleQueue[Any]]" = None
        self._requests: Dict[int, _Request] = {}
        self._requests_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closing = False
        self._failed_restarts = 0

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load a chat model's tokenizer here and start the engine process (returns at once; an
        embedding model tokenizes in its engine)."""
        if self.spec.kind == "chat":
            import openvino_genai

            from ovchat.templatecheck import vet_model

            vet_model(self.spec.model_path)  # its template is rendered in this process: never one that crashes it
            self.tokenizer = openvino_genai.Tokenizer(str(self.spec.model_path))
        self._spawn()

    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=engine_process.run, args=(child, self.spec), name="ovchat-engine",
                                        daemon=True)
        process.start()
        child.close()
        outbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._process, self._outbox = process, outbox
        self.pid = process.pid
        threading.Thread(target=self._read, args=(process, parent), name="ovchat-engine-reader", daemon=True).start()
        threading.Thread(target=_write, args=(outbox, parent), name="ovchat-engine-writer", daemon=True).start()

    def close(self, timeout: float = 10, *, reason: str = "the server is shutting down") -> None:
        """Stop the engine process (asking first, then killing it); requests in flight end with
        ``reason``."""
        self._closing = True
        self.fail_all(EngineUnavailableError(reason, code="shutting_down"), state="stopped")
        process = self._process
        if process is None:
            return
        self._outbox.put(protocol.Stop())
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(5)

    def _read(self, process: Any, conn: Any) -> None:
        """The reader thread of one engine process: its messages until it exits."""
        try:
            while True:
                message = conn.recv()
                if isinstance(message, protocol.Ready):
                    self.load_s = message.load_s
                    self.state, self.error = "ready", None
                    self._failed_restarts = 0
                    log.info("model loaded on %s in %.1fs (engine process %d); ready", message.device,
                             self.load_s, message.pid)
                    self._on_ready()
                elif isinstance(message, protocol.Fatal):
                    self.error = message.message
                    break
                elif isinstance(message, protocol.Step):
                    self.stats = message.stats
                    for update in message.updates:
                        self._deliver(update)
        except (EOFError, OSError):
            pass
        process.join(5)
        if process is self._process:
            self._outbox.put(None)  # ends this engine's writer
        if self._closing or process is not self._process:
            return
        self._engine_gone(process)

    def _engine_gone(self, process: Any) -> None:
        if self.error and self.state == "loading":  # the first load failed: nothing to restart
            self.state = "failed"
            log.error("the model could not be loaded: %s", self.error)
            self._on_failed(self.error)
            return
        if self.error and self.state == "restarting":
            self._failed_restarts += 1
        self.restarts += 1
        reason = self.error or f"exit code {process.exitcode}"
        log.error("the model engine (process %s) stopped unexpectedly (%s); restarting it", process.pid, reason)
        gave_up = self._failed_restarts >= _MAX_FAILED_RESTARTS
        self.fail_all(EngineUnavailableError(f"the model engine stopped unexpectedly ({reason}); it is restarting, "
                                             "retry shortly", code="engine_restarting"),
                      state="failed" if gave_up else "restarting")
        if gave_up:
            self._on_failed(f"the model engine failed {self._failed_restarts} times in a row: {reason}")
            return
        self.error = None
        self._spawn()

    # -- requests -------------------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        messages = {"loading": "the model is still loading; retry shortly",
                    "restarting": "the model engine is restarting after a failure; retry shortly",
                    "stopped": "the server is shutting down"}
        codes = {"loading": "model_not_ready", "restarting": "engine_restarting", "stopped": "shutting_down"}
        raise EngineUnavailableError(self.error if self.state == "failed" else messages.get(self.state, self.state),
                                     code=codes.get(self.state, self.state))

    async def generate(self, prompt_ids: List[int], settings: GenerationSettings) -> AsyncIterator[Output]:
        """Yield each choice's new tokens as the engine produces them.

        Leaving the iteration early (the client went away, the task was cancelled) cancels the
        request in the engine, which frees its KV-cache blocks.
        """
        rid = next(self._ids)
        request = _Request(rid, asyncio.get_running_loop())
        with self._requests_lock:  # against _engine_gone: either this request is failed, or refused
            self.require_ready()
            self._requests[rid] = request
            outbox = self._outbox
        outbox.put(protocol.Add(rid, tuple(prompt_ids), settings))
        remaining = settings.n
        try:
            while remaining:
                item = await request.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish is not None:
                    remaining -= 1
                yield item
        finally:
            with self._requests_lock:
                gone = self._requests.pop(rid, None) is not None
            if gone and remaining:
                self._outbox.put(protocol.Cancel(rid))

    async def embed(self, inputs: List[object], dimensions: Optional[int] = None) -> protocol.Embedded:
        """The vectors of ``inputs`` (texts or token-id lists), from an embedding model's engine."""
        rid = next(self._ids)
        request = _Request(rid, asyncio.get_running_loop())
        with self._requests_lock:
            self.require_ready()
            self._requests[rid] = request
            outbox = self._outbox
        outbox.put(protocol.Embed(rid, tuple(tuple(x) if isinstance(x, list) else x for x in inputs), dimensions))
        item: object = None
        try:
            item = await request.queue.get()
        finally:
            with self._requests_lock:
                self._requests.pop(rid, None)
            if item is None:  # the client went away first: the engine need not answer
                self._outbox.put(protocol.Cancel(rid))
        if isinstance(item, Exception):
            raise item
        return item

    def _deliver(self, update: protocol.Update) -> None:
        with self._requests_lock:
            request = self._requests.get(update.rid)
        if request is None:
            return
        if update.embedded is not None:
            _put(request, update.embedded)
            return
        items: List[Any] = [Output(i, list(t.ids), list(t.logprobs), update.finished.get(i))
                            for i, t in update.outputs.items()]
        items += [Output(i, [], [], reason) for i, reason in update.finished.items() if i not in update.outputs]
        if update.failure is not None:
            items.append(_domain_error(update.failure, self.spec))
        for item in items:
            _put(request, item)

    def fail_all(self, error: Exception, *, state: Optional[str] = None) -> None:
        """End every request in flight with ``error`` (the engine died, the server stops); with
        ``state``, enter it at the same moment, so no new request slips in between."""
        with self._requests_lock:
            requests, self._requests = list(self._requests.values()), {}
            if state is not None:
                self.state = state
        for request in requests:
            _put(request, error)


def _write(outbox: "queue.SimpleQueue[Any]", conn: Any) -> None:
    """The writer thread of one engine process: its commands, in order, until None."""
    while True:
        message = outbox.get()
        if message is None:
            return
        try:
            conn.send(message)
        except (OSError, ValueError):
            return  # the engine has gone; the reader notices and fails what it held


def _put(request: _Request, item: Any) -> None:
    try:
        request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
    except RuntimeError:
        pass  # the event loop has closed: the server is gone and nobody is waiting


def _domain_error(failure: protocol.Failure, spec: EngineSpec) -> Exception:
    if failure.code == protocol.KV_CACHE_EXCEEDED:
        return InvalidRequestError(f"the request needs more KV cache than the server has; shorten it or restart the "
                                   f"server with more than {spec.kv_cache_gb} GB (--kv-cache-gb)",
                                   code="kv_cache_exceeded")
    if failure.code == protocol.INVALID:
        return InvalidRequestError(failure.message or "the generation settings were refused")
    return EngineUnavailableError("a generation step failed in the model engine; retry", code="engine_failed")
