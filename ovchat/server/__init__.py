"""`ovchat serve`: the model behind an OpenAI-compatible HTTP API (the ``serve`` extra).

    app.py        HTTP: routes, auth, Host check, CORS, admission, SSE, error mapping, /metrics
    schema.py     request bodies -> GenerationRequest (with a bound on everything), or a domain error
    responses.py  OpenAI's response objects from the token stream: text, reasoning, tool calls, logprobs
    client.py     the HTTP process's side of the engine: start, talk, watch, restart; the tokenizer
    protocol.py   the typed messages between the HTTP process and an engine process
    engine.py     Engine (ContinuousBatchingPipeline, steps, chunked prefill) and its process's loop
    metrics.py    counters and histograms in Prometheus' text format

Tool-call formats live in ovchat.toolcalls, shared with ChatSession.

``serve()`` binds the socket itself, so a taken port is an ordinary OvchatError rather than
uvicorn's exit, starts the engine process, and runs uvicorn until it is stopped (Ctrl-C,
SIGTERM: a graceful shutdown) or the model fails to load.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ovchat import discovery
from ovchat.devices import DeviceChoice
from ovchat.errors import InputError, ModelLoadError, OvchatError
from ovchat.speculation import Speculation

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_CONCURRENCY = 4
DEFAULT_KV_CACHE_GB = 2
DEFAULT_PREFILL_CHUNK = 256
# Waiting requests per running slot before new ones get 429.
QUEUE_PER_SLOT = 4
GRACE_S = 5.0


def model_id(path: Path) -> str:
    """The name clients use in "model": the store name (the directory's name), or a GGUF's stem."""
    path = Path(path)
    return path.stem if path.is_file() else path.name


@dataclass
class ServeOptions:
    """What `ovchat serve` was asked for, besides the model and the device."""

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
    keep_alive_s: Optional[float] = None  # unload the model after this long without a request; None: never
    speculation: Optional[Speculation] = None  # prompt lookup or a draft model, for every request


def serve(model_path: Path, device: DeviceChoice, properties: Dict[str, str], options: ServeOptions, *,
          on_notice: Callable[[str], None] = log.info) -> None:
    """Serve ``model_path`` until stopped. Raises ModelLoadError if the model cannot be loaded."""
    try:
        import uvicorn
        import starlette  # noqa: F401  (checked here so the message names the extra)
    except ImportError:
        raise OvchatError("the HTTP server needs the serve extra: pip install 'ovchat[serve]'") from None
    from ovchat.server.app import ServerSettings, create_app
    from ovchat.server.client import EngineClient
    from ovchat.server.engine import EngineSpec

    if options.api_key is not None and not options.api_key.strip():
        raise InputError("the API key is empty; give a non-empty --api-key (or OVCHAT_API_KEY), or none")
    failure: dict = {}

    def load_failed(message: str) -> None:
        failure["message"] = message
        server.should_exit = True  # uvicorn polls this; a server without its model is no use

    engine = EngineClient(EngineSpec(model_path=Path(model_path), device=device.name, properties=properties,
                                     max_running=options.max_concurrency, kv_cache_gb=options.kv_cache_gb,
                                     prefill_chunk=options.prefill_chunk, speculation=options.speculation),
                          on_failed=load_failed)
    sock = _bind(options.host, options.port)
    bound_host, bound_port = sock.getsockname()[:2]
    name = model_id(model_path)
    settings = ServerSettings(
        model_id=name, context_limit=options.context_limit, api_key=options.api_key,
        max_concurrency=options.max_concurrency,
        max_queue=QUEUE_PER_SLOT * options.max_concurrency if options.max_queue is None else options.max_queue,
        allowed_hosts=list(options.allow_hosts) if _loopback(bound_host) else (options.allow_hosts or None),
        cors_origins=list(options.cors_origins), grace_s=GRACE_S, keep_alive_s=options.keep_alive_s)
    # Announced so that `ovchat run` and `ovchat chat` of this model use it (the warm path), and
    # withdrawn when the app stops: uvicorn ends a SIGTERM'd process by re-raising the signal.
    announced = discovery.register(discovery.ServerInfo(
        url=f"http://{_client_host(bound_host)}:{bound_port}", pid=os.getpid(),
        model_path=str(Path(model_path).resolve()), model_id=name, key_required=bool(options.api_key),
        device=device.name))
    app = create_app(engine, settings, on_stopped=lambda: discovery.unregister(announced))
    # log_config=None: uvicorn's loggers go through the process's logging set-up like ours;
    # its access log is off because app.AccessLog writes one with token counts.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=GRACE_S,
                            server_header=False)
    server = _Server(config, drain=app.state.drain)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    on_notice(f"listening on http://{shown}:{bound_port} (model {name!r}, {device.name}, "
              f"{options.max_concurrency} at once; loading the model)")
    if not options.api_key and not _loopback(bound_host):
        on_notice(f"no API key: anyone who can reach {bound_host}:{bound_port} can use the model "
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
