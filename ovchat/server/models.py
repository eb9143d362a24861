"""The models a server serves: any in the store, loaded on first use, in a memory budget.

A ``ModelPool`` knows every model a request may name (the store's entries, by name, and the
models given with ``-m``, by their id), and keeps some of them loaded, each in an engine process
of its own (``client.EngineClient``). A request ``use``s a model: it is loaded if it is not
(requests meanwhile wait, the HTTP side stays responsive), and while any request uses it, it
stays. When a model must load and the budget (``max_memory`` bytes, ``max_loaded`` models) is
spent, the least recently used idle model is unloaded first; a model that cannot fit even alone
is refused (``InsufficientMemoryError``), never an out-of-memory kill. An idle model unloads
after its keep-alive (the server's default, or what its last request asked for; None: never),
counted from when it became idle. Models given with ``-m`` load at start and stay unless a
request says otherwise.

Memory is reckoned per model as the larger of an estimate made before loading (the weights'
size, plus the runtime) and the engine process's resident size once loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ovchat.errors import (EngineUnavailableError, InsufficientMemoryError, InvalidRequestError, OvchatError)
from ovchat.machine import resident_bytes
from ovchat.server.admission import Admission
from ovchat.server.client import EngineClient
from ovchat.server.engine import EngineSpec

log = logging.getLogger("ovchat.server")

# What an engine process holds besides the weights: the interpreter, OpenVINO's libraries, the
# compiled graph, a first KV cache. Measured on the 2-core Zen 2: the demo model (99 MB of
# weights) resident at 350-400 MB once warmed up, Qwen2.5-0.5B (470 MB) at 0.8-0.9 GB.
RUNTIME_BYTES = 300 << 20
WEIGHTS_FACTOR = 1.15
# How long a request waits for a busy model to become idle so that another one can load.
_ROOM_WAIT_S = 60.0
_LOAD_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class ModelSource:
    """A model a request may name: ``name`` is the id clients use."""

    name: str
    path: Path
    pinned: bool = False  # given with -m: loaded at start and kept unless a request says otherwise


@dataclass(frozen=True)
class PoolSettings:
    max_memory: int  # bytes every loaded model may take together
    max_loaded: int  # models loaded at once
    keep_alive_s: Optional[float]  # an idle model unloads after this long (None: never)
    max_concurrency: int  # per model
    max_queue: int  # per model
    engine_spec: Callable[[Path, str], EngineSpec]  # how to start an engine of a model (path, kind)
    pinned_keep_alive_s: Optional[float] = None  # the same for the -m models (None: they stay)
    context_limit: Optional[int] = None  # the window a user set (None: each model's own)
    on_pinned_failed: Callable[[str], None] = lambda message: None  # a -m model cannot be served


@dataclass
class ServedModel:
    """One model the server can serve, and what the pool knows of it while it is loaded."""

    source: ModelSource
    admission: Admission
    keep_alive_s: Optional[float]
    client: Optional[EngineClient] = None
    active: int = 0  # requests using it now (waiting or generating)
    last_used: float = 0.0  # monotonic
    idle_since: Optional[float] = None  # monotonic; None while in use or unloaded
    loaded_at: Optional[float] = None  # wall clock, for `ps`
    loads: int = 0  # times it was started
    error: Optional[str] = None  # why its last load failed
    context_limit: Optional[int] = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def state(self) -> str:
        return "unloaded" if self.client is None else self.client.state

    @property
    def estimate(self) -> int:
        return estimate_bytes(self.source.path)

    def memory(self) -> int:
        """Bytes this model is reckoned to hold: the estimate, or more once measured."""
        if self.client is None:
            return 0
        measured = resident_bytes(self.client.pid) if self.client.pid else 0
        return max(self.estimate, measured)

    def expires_at(self) -> Optional[float]:
        """Wall-clock time of the unload (None: never, or busy)."""
        if self.keep_alive_s is None or self.idle_since is None:
            return None
        return time.time() + (self.idle_since + self.keep_alive_s - time.monotonic())


class Lease:
    """A request's hold on a loaded model; ``release`` (once, idempotent) lets it go idle."""

    def __init__(self, pool: "ModelPool", model: ServedModel):
        self._pool: Optional[ModelPool] = pool
        self.model = model

    def release(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool._released(self.model)


@dataclass(frozen=True)
class Facts:
    """What the files of a model say, without loading it."""

    context_limit: Optional[int]  # the window requests get (the model's, or the server's smaller one)
    chat_template: str
    weights_bytes: int
    manifest: dict
    modified: float  # the directory's (or file's) mtime


def weights_bytes(path: Path) -> int:
    from ovchat.modelfiles import MODEL_BIN

    target = path / MODEL_BIN if path.is_dir() else path
    try:
        return target.stat().st_size
    except OSError:
        return 0


def estimate_bytes(path: Path) -> int:
    """What loading the model at ``path`` is expected to take, before it is measured."""
    return int(weights_bytes(path) * WEIGHTS_FACTOR) + RUNTIME_BYTES


class ModelPool:
    """Every model the server can serve; some loaded. Used from the event loop only."""

    def __init__(self, settings: PoolSettings, pinned: List[ModelSource]):
        self.settings = settings
        self._pinned = {s.name: s for s in pinned}
        self._models: Dict[str, ServedModel] = {}
        self._facts: Dict[str, Facts] = {}
        self._changed = asyncio.Condition()
        self._closing = False

    # -- which models exist ------------------------------------------------------------------------

    def sources(self) -> List[ModelSource]:
        """Every model a request may name: the -m models, then the store's intact entries."""
        from ovchat import store

        found = dict(self._pinned)
        for entry in store.list_entries():
            if entry.problem is None and entry.name not in found:
                found[entry.name] = ModelSource(entry.name, entry.path)
        return list(found.values())

    def source(self, name: str) -> ModelSource:
        """The model a request names, or InvalidRequestError (code model_not_found). ollama's
        clients add a tag (``name:latest``); the tag ``latest`` is the model itself."""
        from ovchat import store

        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' must name a model (GET /v1/models lists them)", "model")
        base = name[:-len(":latest")] if name.endswith(":latest") else name
        if base in self._pinned:
            return self._pinned[base]
        entry = store.get_entry(base) if store.valid_model_name(base) else None
        if entry is None:
            known = ", ".join(s.name for s in self.sources()) or "none yet: ovchat pull NAME"
            raise InvalidRequestError(f"the model {name!r} does not exist here; served: {known}", "model",
                                      "model_not_found")
        if entry.problem is not None:
            raise InvalidRequestError(f"the model {base!r} in the store is damaged ({entry.problem}); repair it: "
                                      f"{entry.repair}", "model", "model_damaged")
        return ModelSource(entry.name, entry.path)

    def served(self, name: str) -> ServedModel:
        source = self.source(name)
        model = self._models.get(source.name)
        if model is None:
            model = ServedModel(source, Admission(self.settings.max_concurrency, self.settings.max_queue),
                                keep_alive_s=self.settings.pinned_keep_alive_s if source.pinned
                                else self.settings.keep_alive_s)
            self._models[source.name] = model
        return model

    def facts(self, source: ModelSource) -> Facts:
        """What ``source``'s files say (read once per change of its directory)."""
        from ovchat.modelfiles import read_manifest
        from ovchat.store import chat_template

        try:
            modified = source.path.stat().st_mtime
        except OSError:
            modified = 0.0
        cached = self._facts.get(source.name)
        if cached is not None and cached.modified == modified:
            return cached
        try:
            manifest = read_manifest(source.path) if source.path.is_dir() else {}
        except OvchatError:
            manifest = {}
        facts = Facts(_window(source.path, self.settings.context_limit), chat_template(source.path),
                      weights_bytes(source.path), manifest, modified)
        self._facts[source.name] = facts
        return facts

    def require(self, name: str, kind: str) -> ModelSource:
        """The model ``name``, refused (before it is loaded) unless it is of ``kind``."""
        source = self.source(name)
        found = self.kind(source)
        if found != kind:
            use = "/v1/embeddings or /api/embed" if found == "embedding" else "/v1/chat/completions or /api/chat"
            raise InvalidRequestError(f"{source.name} is {'an embedding' if found == 'embedding' else 'a chat'} model, "
                                      f"not {'an embedding' if kind == 'embedding' else 'a chat'} model; use {use}",
                                      "model", f"not_{kind}_model")
        return source

    def kind(self, source: ModelSource) -> str:
        """``chat`` or ``embedding``, as the model's manifest says (a GGUF or a foreign IR: chat)."""
        return str(self.facts(source).manifest.get("kind") or "chat")

    def loaded(self) -> List[ServedModel]:
        return [m for m in self._models.values() if m.client is not None]

    def every(self) -> List[ServedModel]:
        """Every model a request has named so far, loaded or not."""
        return list(self._models.values())

    def first_pinned(self) -> Optional[ModelSource]:
        return next(iter(self._pinned.values()), None)

    # -- using a model ------------------------------------------------------------------------------

    async def acquire(self, name: str, *, keep_alive_s: "Optional[float] | str" = "default") -> "Lease":
        """The model ``name``, loaded and ready, held until the lease is released (a model in
        use is never unloaded for another). With ``keep_alive_s`` (seconds, None: forever, 0:
        unload once idle) the model keeps that from now on, as ollama's keep_alive does."""
        model = self.served(name)
        if keep_alive_s != "default":
            model.keep_alive_s = keep_alive_s  # type: ignore[assignment]
        model.active += 1
        model.idle_since = None
        lease = Lease(self, model)
        try:
            await self._ensure_loaded(model)
        except BaseException:
            lease.release()
            raise
        return lease

    def _released(self, model: ServedModel) -> None:
        model.active -= 1
        model.last_used = time.monotonic()
        if model.active == 0 and model.client is not None:
            model.idle_since = time.monotonic()
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _ensure_loaded(self, model: ServedModel) -> None:
        if self._closing:
            raise EngineUnavailableError("the server is shutting down", code="shutting_down")
        if model.client is None:
            await self._make_room(model)
            if model.client is None:  # another request may have started it meanwhile
                await self._start(model)
        try:
            await asyncio.wait_for(model.ready.wait(), _LOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"{model.name} took over {_LOAD_TIMEOUT_S:.0f} s to load",
                                         code="model_not_ready") from None
        client = model.client
        if client is None:
            raise EngineUnavailableError(f"{model.name} was unloaded while loading; retry", code="model_not_ready")
        if client.state == "failed" and not model.source.pinned:
            await self.unload(model.name)  # the next request tries again
        client.require_ready()
        model.error = None

    async def _start(self, model: ServedModel) -> None:
        """Start the model's engine process; ``model.ready`` is set once it is ready or failed."""
        loop = asyncio.get_running_loop()
        model.ready.clear()

        def settled(*_: object) -> None:
            loop.call_soon_threadsafe(model.ready.set)

        def failed(message: str) -> None:
            model.error = message
            settled()
            if model.source.pinned:
                self.settings.on_pinned_failed(message)

        client = EngineClient(self.settings.engine_spec(model.source.path, self.kind(model.source)),
                              on_ready=settled, on_failed=failed)
        model.client, model.loaded_at = client, time.time()
        model.loads += 1
        model.context_limit = _window(model.source.path, self.settings.context_limit)
        log.info("loading %s (%s)", model.name, model.source.path)
        try:
            await asyncio.to_thread(client.start)  # the tokenizer loads here, off the event loop
        except (RuntimeError, OvchatError) as e:
            from ovchat.errors import summary

            if model.client is client:
                model.client = None
            model.error = f"could not load {model.name}: {summary(e)}"
            model.ready.set()
            raise EngineUnavailableError(model.error, code="failed") from None

    async def _make_room(self, model: ServedModel) -> None:
        """Unload idle models, least recently used first, until ``model`` fits the budget."""
        need = model.estimate
        budget, most = self.settings.max_memory, self.settings.max_loaded
        if need > budget:
            raise InsufficientMemoryError(
                f"{model.name} needs about {need >> 20} MB, more than the server's memory budget of {budget >> 20} MB "
                "(--max-memory)", "model", "insufficient_memory")
        deadline = time.monotonic() + _ROOM_WAIT_S
        while True:
            others = [m for m in self.loaded() if m is not model]
            if len(others) < most and sum(m.memory() for m in others) + need <= budget:
                return
            idle = sorted((m for m in others if m.active == 0), key=lambda m: m.last_used)
            if idle:
                victim = idle[0]
                log.info("unloading %s to make room for %s (budget %d MB, %d models at most)", victim.name,
                         model.name, budget >> 20, most)
                await self.unload(victim.name)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineUnavailableError(
                    f"{model.name} cannot load while the loaded models are all busy and the memory budget is spent; "
                    "retry shortly", code="models_busy")
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def unload(self, name: str) -> bool:
        """Stop a model's engine (its requests, if any, end with 503). False if it was not loaded."""
        model = self._models.get(self.source(name).name)
        if model is None or model.client is None:
            return False
        client, model.client = model.client, None
        model.idle_since = model.loaded_at = None
        model.ready.set()  # anyone waiting for the load stops waiting
        log.info("unloaded %s", model.name)
        await asyncio.to_thread(client.close)
        async with self._changed:
            self._changed.notify_all()
        return True

    # -- keep-alive ---------------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Unload every idle model whose keep-alive has run out."""
        now = time.monotonic()
        for model in self.loaded():
            if model.active == 0 and model.idle_since is None and model.state == "ready":
                model.idle_since = now  # loaded with nobody left waiting: idle from now
            if (model.active == 0 and model.keep_alive_s is not None and model.idle_since is not None
                    and now - model.idle_since >= model.keep_alive_s):
                log.info("%s was idle for its keep-alive (%.0f s): unloading it", model.name, model.keep_alive_s)
                await self.unload(model.name)

    async def start_pinned(self) -> None:
        """Load the -m models (at start; their failures end the server, see serve())."""
        for source in self._pinned.values():
            model = self.served(source.name)
            try:
                await self._make_room(model)
                await self._start(model)
            except OvchatError as e:
                self.settings.on_pinned_failed(str(e))
                return

    async def close(self) -> None:
        self._closing = True
        for model in list(self.loaded()):
            await self.unload(model.name)

    # -- what `ovchat ps` shows ---------------------------------------------------------------------

    def status(self) -> List[dict]:
        """The loaded models: name, path, state, memory, device, until when, requests running."""
        out = []
        for model in sorted(self.loaded(), key=lambda m: m.name):
            client = model.client
            out.append({"name": model.name, "path": str(model.source.path), "state": model.state,
                        "memory_bytes": model.memory(), "weights_bytes": weights_bytes(model.source.path),
                        "device": client.spec.device if client else None, "pid": client.pid if client else None,
                        "requests": model.active, "expires_at": model.expires_at(),
                        "keep_alive_s": model.keep_alive_s, "loaded_at": model.loaded_at,
                        "context_limit": model.context_limit, "restarts": client.restarts if client else 0})
        return out


def _window(path: Path, limit: Optional[int]) -> Optional[int]:
    from ovchat.modelfiles import context_length

    own = context_length(path)
    return min(x for x in (limit, own) if x) if (limit or own) else None
