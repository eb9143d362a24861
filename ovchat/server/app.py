"""The ASGI app of `ovchat serve`: the middleware, the routes of both APIs, /health and /metrics,
and the life of the model pool (loading the -m models, keep-alive sweeps, a graceful drain).

Requests pass, outermost first, through the access log (one line each, and the metrics), the
Host check (a loopback server answers only loopback names: DNS rebinding), CORS (off unless asked
for), the API-key check, and the route (``openai``, ``ollama``, the chat page ``web``). Domain
errors become HTTP answers at the edge (``http``), in the shape of the API the client speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ovchat.errors import APIError, EngineUnavailableError, RequestError
from ovchat.server import ollama, openai
from ovchat.server.http import CLIENT_CLOSED, MAX_BODY_BYTES, ClientGone, error_response, to_api_error
from ovchat.server.metrics import Metrics
from ovchat.server.middleware import CORS, AccessLog, HostCheck, RequireKey
from ovchat.server.models import ModelPool

log = logging.getLogger("ovchat.server")
_SWEEP_S = 0.5


@dataclass
class ServerSettings:
    """What the HTTP side needs besides the models."""

    api_key: Optional[str] = None
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_hosts: Optional[List[str]] = None  # None: no Host check (not bound to loopback)
    cors_origins: List[str] = field(default_factory=list)
    grace_s: float = 5.0
    web: bool = True  # the chat page at /


@dataclass
class Server:
    """What the routes reach through ``request.app.state.server``."""

    pool: ModelPool
    settings: ServerSettings
    metrics: Metrics


async def health(request: Request) -> Response:
    """200 once the -m models are ready (503 while one loads, with Retry-After), with every loaded
    model's state; for a server of one -m model, that model's fields at the top level too."""
    pool = request.app.state.server.pool
    models = pool.status()
    body: Dict[str, Any] = {"status": "ok", "models": [{k: m[k] for k in ("name", "state", "device", "pid",
                                                                         "requests", "restarts")} for m in models]}
    first = pool.first_pinned()
    if first is not None:
        served = pool.served(first.name)
        client = served.client
        facts = pool.facts(first)
        body.update(model=first.name, device=client.spec.device if client else None,
                    context_limit=facts.context_limit, chat_template=bool(facts.chat_template),
                    running=served.admission.busy, waiting=served.admission.queued,
                    engine={"state": served.state, "pid": client.pid if client else None,
                            "restarts": client.restarts if client else 0})
        if served.state == "failed" or (served.error and served.state != "ready"):
            return JSONResponse({**body, "status": "error", "error": served.error or client.error}, status_code=503)
        starting = served.state == "unloaded" and served.loads == 0  # before the app has started it
        if served.state in ("loading", "restarting") or starting:
            return JSONResponse({**body, "status": "loading" if starting else served.state}, status_code=503,
                                headers={"Retry-After": "2"})
    return JSONResponse(body)


async def metrics_route(request: Request) -> Response:
    return PlainTextResponse(request.app.state.server.metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(pool: ModelPool, settings: ServerSettings, *, on_stopped: Callable[[], None] = lambda: None,
               extra_routes: Optional[List[Route]] = None) -> Starlette:
    """The ASGI app over ``pool``. The -m models start loading when the app starts.
    ``app.state.drain()`` begins a graceful shutdown: waiters are refused at once, running
    streams get a final error event before the grace period ends."""

    def gauges() -> Dict[str, Dict[str, float]]:
        out = {}
        for model in pool.loaded():
            stats = model.client.stats
            out[model.name] = {"ovchat_requests_running": model.admission.busy,
                               "ovchat_requests_waiting": model.admission.queued,
                               "ovchat_kv_cache_usage_ratio": stats.kv_cache_usage,
                               "ovchat_kv_cache_bytes": stats.kv_cache_bytes,
                               "ovchat_model_memory_bytes": model.memory(),
                               "ovchat_engine_restarts_total": model.client.restarts}
        return out

    metrics = Metrics(gauges)

    async def on_request_error(request: Request, error: Exception) -> Response:
        return error_response(to_api_error(error), request.url.path)

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        # Starlette's own 404/405 in the API's shape, so clients parse every error the same way.
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code, headers=dict(error.headers or {})), request.url.path)

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log does

    async def on_bug(request: Request, error: Exception) -> Response:
        # The last resort for a bug (every expected failure is a domain error or an APIError): the
        # client gets the API's error shape and no traceback; Starlette still logs the traceback.
        return error_response(APIError(500, "internal server error; see the server log", kind="server_error"),
                              request.url.path)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            await pool.sweep()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.ensure_future(sweep())
        try:
            await pool.start_pinned()
            yield
        finally:
            sweeper.cancel()
            await pool.close()
            on_stopped()

    def drain() -> None:
        """Begin the graceful shutdown (call on the event loop)."""
        refused = sum(m.admission.close() for m in pool.every())
        if refused:
            log.info("shutting down: %d waiting request%s refused (503)", refused, "s" if refused != 1 else "")
        running = sum(m.admission.busy for m in pool.every())
        if running:
            log.info("shutting down: %d running request%s get %.0f s to finish", running,
                     "s" if running != 1 else "", settings.grace_s)

            async def cut_off() -> None:
                await asyncio.sleep(max(0.0, settings.grace_s - 1.0))
                busy = [m for m in pool.loaded() if m.admission.busy]
                if busy:
                    log.info("shutting down: %d request%s cut off", sum(m.admission.busy for m in busy),
                             "s" if len(busy) != 1 else "")
                for model in busy:
                    model.client.fail_all(EngineUnavailableError("the server is shutting down", code="shutting_down"))

            asyncio.ensure_future(cut_off())

    routes = [*openai.ROUTES, *ollama.ROUTES, Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"]), *(extra_routes or [])]
    open_paths = ["/health"]
    if settings.web:
        from ovchat.server import web

        routes += web.routes()
        open_paths += web.PATHS
    middleware = [Middleware(AccessLog, metrics=metrics, routes=[r.path for r in routes]),
                  Middleware(HostCheck, allowed=settings.allowed_hosts)]
    if settings.cors_origins:
        middleware.append(Middleware(CORS, origins=settings.cors_origins))
    middleware.append(Middleware(RequireKey, key=settings.api_key, open_paths=open_paths))
    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={APIError: on_request_error, RequestError: on_request_error, HTTPException: on_http_error,
                            ClientGone: on_client_gone, ClientDisconnect: on_client_gone, Exception: on_bug})
    app.state.server = Server(pool, settings, metrics)
    app.state.drain = drain
    return app
