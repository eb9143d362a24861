"""`ovchat serve`: the store's models behind the OpenAI and ollama APIs (the ``serve`` extra).

    app.py         the ASGI app: middleware, routes, /health, /metrics, the pool's life, the drain
    openai.py      the OpenAI API (chat, completions, models, /tokenize)
    ollama.py      the ollama API (chat, generate, tags, show, ps, pull, version)
    http.py        the HTTP edge: JSON bodies in, domain errors to statuses, SSE/NDJSON streams out
    middleware.py  access log, Host check, CORS, API key
    connections.py a deadline for request heads, a cap on open connections (uvicorn has neither)
    web.py         the chat page at / (web/: its HTML, script and style, no build step)
    schema.py      OpenAI request bodies -> GenerationRequest (with a bound on everything)
    prepare.py     a GenerationRequest made ready for a model: template, tokens, window, settings
    relay.py       a request's generation: the model taken, a slot, the tokens turned into choices
    responses.py   choices from the token stream (text, reasoning, tool calls, logprobs); OpenAI's objects
    admission.py   per model: requests running at once, and a bounded queue
    models.py      the model pool: loaded on first use, a memory budget, LRU unloading, keep-alive
    client.py      the HTTP process's side of one engine process: start, talk, watch, restart; tokenizer
    protocol.py    the typed messages between the HTTP process and an engine process
    engine.py      Engine (ContinuousBatchingPipeline, steps, long prompts in turns) and its loop
    metrics.py     counters and histograms in Prometheus' text format

Tool-call formats live in ovchat.toolcalls, shared with ChatSession.

``serve()`` binds the socket itself, so a taken port is an ordinary OvchatError rather than
uvicorn's exit, starts the -m models' engines, and runs uvicorn until it is stopped (Ctrl-C,
SIGTERM: a graceful shutdown) or a -m model fails to load.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ovchat import discovery
from ovchat.devices import DeviceChoice
from ovchat.errors import InputError, ModelLoadError, OvchatError
from ovchat.speculation import Speculation

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_CONCURRENCY = 4
DEFAULT_KV_CACHE_GB = 0  # 0: the KV cache grows with the work (GenAI's dynamic allocation)
DEFAULT_PREFILL_CHUNK = 64
DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_MAX_LOADED = 3
DEFAULT_MEMORY_SHARE = 0.75  # of the machine's memory, for every loaded model together
# Waiting requests per running slot before new ones get 429.
QUEUE_PER_SLOT = 4
GRACE_S = 5.0


def model_id(path: Path) -> str:
    """The name clients use in "model": the store name (the directory's name), or a GGUF's stem."""
    path = Path(path)
    return path.stem if path.is_file() else path.name


@dataclass
class ServeOptions:
    """What `ovchat serve` was asked for, besides the models and the device."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: Optional[str] = None
    max_concurrency: int = DEFAULT_CONCURRENCY
    max_queue: Optional[int] = None
    kv_cache_gb: int = DEFAULT_KV_CACHE_GB
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    context_limit: Optional[int] = None
    allow_hosts: List[str] = field(default_factory=list)
    cors_origins: List[str] = field(default_factory=list)
    keep_alive_s: Optional[float] = DEFAULT_KEEP_ALIVE_S  # an idle model unloads after this long; None: never
    pinned_keep_alive_s: Optional[float] = None  # the same for the -m models; None: they stay
    max_memory: Optional[int] = None  # bytes for every loaded model together; None: a share of the machine's
    max_loaded: int = DEFAULT_MAX_LOADED
    niceness: int = 0  # > 0: the engines yield the CPU to everything else on the box
    prefix_cache: bool = True  # off: every request is prefilled from its first token (for measurements)
    speculation: Optional[Speculation] = None  # prompt lookup (every model) or a draft model (the -m model)
    web: bool = True  # the chat page at /
    max_connections: int = 1024  # open connections; past it new ones are closed as they come


def serve(models: Sequence[Path], device: DeviceChoice, properties: Dict[str, str], options: ServeOptions, *,
          on_notice: Callable[[str], None] = log.info) -> None:
    """Serve the store, and ``models`` (loaded at once), until stopped. Raises ModelLoadError if
    one of ``models`` cannot be loaded."""
    try:
        import uvicorn
        import starlette  # noqa: F401  (checked here so the message names the extra)
    except ImportError:
        raise OvchatError("the HTTP server needs the serve extra: pip install 'ovchat[serve]'") from None
    from ovchat.machine import memory_total
    from ovchat.server.app import ServerSettings, create_app
    from ovchat.server.engine import EngineSpec
    from ovchat.server.models import ModelPool, ModelSource, PoolSettings
    from ovchat.store import models_dir

    if options.api_key is not None and not options.api_key.strip():
        raise InputError("the API key is empty; give a non-empty --api-key (or OVCHAT_API_KEY), or none")
    pinned = [ModelSource(model_id(p), Path(p), pinned=True) for p in models]
    names = [s.name for s in pinned]
    if len(set(names)) != len(names):
        raise InputError(f"two -m models would both be called {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                         "serve one of them from another directory name")
    if options.speculation is not None and options.speculation.kind == "draft" and len(pinned) != 1:
        raise InputError("--draft-model speeds up one model: give exactly one -m with it")
    failure: dict = {}

    def load_failed(message: str) -> None:
        failure["message"] = message
        server.should_exit = True  # uvicorn polls this; a server without its -m model is no use

    def engine_spec(path: Path, kind: str) -> EngineSpec:
        speculation = options.speculation
        if kind != "chat" or (speculation is not None and speculation.kind == "draft" and Path(path) != pinned[0].path):
            speculation = None
        return EngineSpec(model_path=Path(path), device=device.name, properties=properties,
                          max_running=options.max_concurrency, kv_cache_gb=options.kv_cache_gb,
                          prefill_chunk=options.prefill_chunk, speculation=speculation, niceness=options.niceness,
                          prefix_cache=options.prefix_cache, kind=kind)

    budget = options.max_memory or int(memory_total() * DEFAULT_MEMORY_SHARE) or (8 << 30)
    pool = ModelPool(PoolSettings(
        max_memory=budget, max_loaded=options.max_loaded, keep_alive_s=options.keep_alive_s,
        pinned_keep_alive_s=options.pinned_keep_alive_s,
        max_concurrency=options.max_concurrency,
        max_queue=QUEUE_PER_SLOT * options.max_concurrency if options.max_queue is None else options.max_queue,
        engine_spec=engine_spec, context_limit=options.context_limit, on_pinned_failed=load_failed), pinned)
    sock = _bind(options.host, options.port)
    bound_host, bound_port = sock.getsockname()[:2]
    settings = ServerSettings(
        api_key=options.api_key,
        allowed_hosts=list(options.allow_hosts) if _loopback(bound_host) else (options.allow_hosts or None),
        cors_origins=list(options.cors_origins), grace_s=GRACE_S, web=options.web)
    # Announced so that `ovchat run` and `ovchat chat` of a model it serves use it (the warm path),
    # and withdrawn when the app stops: uvicorn ends a SIGTERM'd process by re-raising the signal.
    discovery_url = f"http://{_client_host(bound_host)}:{bound_port}"
    announced = discovery.register(discovery.ServerInfo(
        url=discovery_url, pid=os.getpid(),
        models={str(s.path.resolve()): s.name for s in pinned}, store=str(models_dir().resolve()),
        key_required=bool(options.api_key), device=device.name))
    app = create_app(pool, settings, on_stopped=lambda: discovery.unregister(announced))
    # log_config=None: uvicorn's loggers go through the process's logging set-up like ours;
    # its access log is off because middleware.AccessLog writes one with token counts.
    from ovchat.server.connections import connection_cap, protocol

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=GRACE_S,
                            server_header=False, http=protocol(connection_cap(options.max_connections)))
    server = _Server(config, drain=app.state.drain)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    loading = f"loading {', '.join(names)}" if names else "models load on first use"
    on_notice(f"listening on http://{shown}:{bound_port} (the store's models and the OpenAI and ollama APIs, "
              f"{device.name}, {options.max_concurrency} requests at once per model, memory budget "
              f"{budget >> 20} MB; {loading})")
    if options.web:
        page = f"{discovery_url}/"
        wildcard = bound_host in ("0.0.0.0", "::", "")
        on_notice(f"chat page: {page}" + (f" (from other machines: this box's address, port {bound_port})"
                                          if wildcard else ""))
    if not options.api_key and not _loopback(bound_host):
        on_notice(f"no API key: anyone who can reach {bound_host}:{bound_port} can use the models "
                  "(set --api-key or OVCHAT_API_KEY)")
    try:
        with sock:
            server.run(sockets=[sock])
    finally:
        discovery.unregister(announced)
    if failure:
        raise ModelLoadError(failure["message"])


class _Server:
    """uvicorn's server, told to drain (refuse waiters, cut off streams in time) when a stop
    signal arrives, before its own graceful shutdown begins."""

    def __new__(cls, config, drain: Callable[[], None]):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                if sig in (signal.SIGTERM, signal.SIGINT) and not self.should_exit:
                    loop = getattr(self, "_ovchat_loop", None)
                    if loop is not None:
                        loop.call_soon_threadsafe(drain)
                super().handle_exit(sig, frame)

            async def serve(self, sockets=None) -> None:
                import asyncio

                self._ovchat_loop = asyncio.get_running_loop()
                await super().serve(sockets=sockets)

        return Server(config)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
    return sock


def _client_host(host: str) -> str:
    """The address a local client connects to for a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
