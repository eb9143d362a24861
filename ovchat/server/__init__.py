"""`ovchat serve`: the model behind an OpenAI-compatible HTTP API (the ``serve`` extra).

    schema.py   what a request may contain -> GenerationRequest, or a 400 naming the field
    backend.py  ContinuousBatchingPipeline driven by one stepper thread; text pieces per request
    app.py      Starlette routes, error shape, API key, access log, admission (429), SSE

``serve()`` binds the socket itself, so a taken port is an ordinary OvchatError rather than
uvicorn's exit, and runs uvicorn until it is stopped (Ctrl-C, SIGTERM) or the model fails to load.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable, Optional

from ovchat.devices import DeviceChoice
from ovchat.errors import InputError, ModelLoadError, OvchatError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_CONCURRENCY = 4
DEFAULT_KV_CACHE_GB = 2
# Waiting requests per running slot before new ones get 429.
QUEUE_PER_SLOT = 4


def model_id(path: Path) -> str:
    """The name clients use in "model": the store name (the directory's name), or a GGUF's stem."""
    path = Path(path)
    return path.stem if path.is_file() else path.name


def serve(model_path: Path, device: DeviceChoice, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: Optional[str] = None, max_concurrency: int = DEFAULT_CONCURRENCY,
          max_queue: Optional[int] = None, kv_cache_gb: int = DEFAULT_KV_CACHE_GB,
          context_limit: Optional[int] = None, on_notice: Callable[[str], None] = log.info) -> None:
    """Serve ``model_path`` until stopped. Raises ModelLoadError if the model cannot be loaded."""
    try:
        import uvicorn
        import starlette  # noqa: F401  (checked here so the message names the extra)
    except ImportError:
        raise OvchatError("the HTTP server needs the serve extra: pip install 'ovchat[serve]'") from None
    from ovchat.server.app import create_app
    from ovchat.server.backend import Backend

    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty; give a non-empty --api-key (or OVCHAT_API_KEY), or none")
    backend = Backend(model_path, device, context_limit=context_limit, max_running=max_concurrency,
                      kv_cache_gb=kv_cache_gb, on_notice=on_notice)
    failure: dict = {}

    def load_failed(message: str) -> None:
        failure["message"] = message
        server.should_exit = True  # uvicorn polls this; a server without its model is no use

    name = model_id(model_path)
    app = create_app(backend, name, api_key=api_key, max_concurrency=max_concurrency,
                     max_queue=QUEUE_PER_SLOT * max_concurrency if max_queue is None else max_queue,
                     on_load_failed=load_failed)
    # log_config=None: uvicorn's loggers go through the process's logging set-up like ours;
    # its access log is off because app.AccessLog writes one with token counts.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False)
    server = uvicorn.Server(config)
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    on_notice(f"listening on http://{shown}:{bound_port} (model {name!r}, {device.name}, "
              f"{max_concurrency} at once; loading the model)")
    if not api_key and not _loopback(bound_host):
        on_notice(f"no API key: anyone who can reach {bound_host}:{bound_port} can use the model "
                  "(set --api-key or OVCHAT_API_KEY)")
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise ModelLoadError(failure["message"])


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


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"
