"""The HTTP side of `ovchat serve`: OpenAI's routes on Starlette, over an ``EngineClient``.

Requests pass, outermost first, through the access log (one line each, and the metrics), the
Host check (a loopback server answers only loopback names: DNS rebinding), CORS (off unless
asked for), the API-key check, and the route: it reads the JSON body with a size limit, checks
it (``schema``), tokenizes it beside the event loop, waits for a slot (``Admission``), and
relays the engine's tokens as OpenAI's objects (``responses``), whole or as server-sent events.

Domain errors (``ovchat.errors.RequestError``) become HTTP statuses here and nowhere else, in
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; only a bug is a 500,
and even then the body is that object without a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Dict, List, Optional, Sequence, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ovchat import structured
from ovchat.errors import (APIError, EngineUnavailableError, InvalidRequestError, NoChatTemplateError, RequestError,
                           ServerBusyError, summary)
from ovchat.options import GenerationOptions, GenerationSettings
from ovchat.server.client import EngineClient
from ovchat.server.metrics import Metrics
from ovchat.server.responses import THINK_CLOSE, THINK_OPEN, Choice, Reasoning, Renderer, usage
from ovchat.server.schema import GenerationRequest, check_text, parse_chat, parse_completion, parse_tokenize
from ovchat.toolcalls import ToolPlan

log = logging.getLogger("ovchat.server")
access_log = logging.getLogger("ovchat.server.access")

T = TypeVar("T")
MAX_BODY_BYTES = 1024 * 1024
# Past this, an oversized body is no longer read to the end before the 413 is sent; reading it
# lets the client see the 413 instead of a reset connection, but not at any cost.
_DRAIN_LIMIT = 16 * MAX_BODY_BYTES
# nginx's status for "the client closed the connection before the answer": shows in the log only.
CLIENT_CLOSED = 499
_TOKENS = "ovchat.tokens"  # scope key where a route leaves its token counts for the access log
_LEFT = "ovchat.client_left"  # scope key set when a client left in the middle of a stream
_UNPROTECTED = ("/health",)
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def to_api_error(error: Exception) -> APIError:
    """A domain error as the HTTP answer it deserves."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ServerBusyError):
        return APIError(429, str(error), code=error.code, kind="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(error, EngineUnavailableError):
        headers = {"Retry-After": "2"} if error.code in ("model_not_ready", "engine_restarting") else {}
        return APIError(503, str(error), code=error.code, kind="server_error", headers=headers)
    if isinstance(error, RequestError):
        return APIError(400, str(error), param=error.param, code=error.code)
    return APIError(500, "internal server error; see the server log", kind="server_error")


# -- admission --------------------------------------------------------------------------------

class Admission:
    """At most ``running`` requests generate at once; up to ``waiting`` more wait their turn (FIFO).

    Past that a request is refused at once (ServerBusyError: 429 with Retry-After), so a burst
    cannot pile up unbounded work. A slot is released exactly once, and a waiter that gives up
    (its client left) passes on a slot it was handed in the same instant. ``close`` refuses
    every waiter and every newcomer (the server is shutting down).
    """

    def __init__(self, running: int, waiting: int):
        self.running = running
        self.waiting = waiting
        self._free = running
        self._waiters: Deque[asyncio.Future] = collections.deque()
        self._closed = False

    @property
    def busy(self) -> int:
        return self.running - self._free

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> "Slot":
        if self._closed:
            raise EngineUnavailableError("the server is shutting down", code="shutting_down")
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return Slot(self)
        if len(self._waiters) >= self.waiting:
            raise ServerBusyError(f"the server is busy ({self.running} requests running, {len(self._waiters)} "
                                  "waiting); retry shortly", code="server_busy")
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled() and turn.exception() is None:
                self._release()  # handed a slot just as we gave up: pass it on
            elif turn in self._waiters:  # _release may already have skipped and dropped it
                self._waiters.remove(turn)
            raise
        return Slot(self)

    def close(self) -> int:
        """Refuse every waiter now and every later request; returns how many waited."""
        self._closed = True
        refused = 0
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(EngineUnavailableError("the server is shutting down", code="shutting_down"))
                refused += 1
        return refused

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class Slot:
    def __init__(self, admission: Admission):
        self._admission: Optional[Admission] = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None


# -- middleware ---------------------------------------------------------------------------------

class AccessLog:
    """One log line per request: method, path, status, prompt+completion tokens, duration; and
    the request counters of /metrics."""

    def __init__(self, app: Any, metrics: Optional[Metrics] = None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: Dict[str, int] = {}

        async def send_status(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            tokens = scope.get(_TOKENS)
            seconds = time.perf_counter() - start
            code = status.get("code", 500)
            access_log.info("%s %s %s tokens=%s %.3fs%s", scope["method"], scope["path"], code,
                            f"{tokens[0]}+{tokens[1]}" if tokens else "-", seconds,
                            " (client left mid-stream)" if scope.get(_LEFT) else "")
            if self.metrics is not None and scope["path"].startswith("/v1/"):
                self.metrics.request_done(scope["path"], code, *(tokens or (0, 0)), seconds)


class HostCheck:
    """A server listening on a loopback address answers requests for loopback names only (403
    otherwise): a web page cannot reach it by rebinding a DNS name of its own to 127.0.0.1."""

    def __init__(self, app: Any, allowed: Optional[Sequence[str]]):
        self.app = app
        self.allowed = None if allowed is None else {h.lower() for h in allowed}

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        if _is_loopback_host(host) or _host_name(host) in self.allowed:
            return await self.app(scope, receive, send)
        response = error_response(APIError(403, f"requests for host {host or '(none)'!r} are not served here; this "
                                                "server answers loopback names (start it with --allow-host NAME "
                                                "to add one)", code="host_not_allowed"))
        await response(scope, receive, send)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_host(host: str) -> bool:
    name = _host_name(host)
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class CORS:
    """Cross-origin access for the configured origins only (none by default): preflights are
    answered and responses to those origins carry Access-Control-Allow-Origin."""

    def __init__(self, app: Any, origins: Sequence[str]):
        self.app = app
        self.origins = set(origins)

    def _allowed(self, origin: str) -> Optional[str]:
        if "*" in self.origins:
            return "*"
        return origin if origin in self.origins else None

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = dict(scope["headers"]).get(b"origin", b"").decode("latin-1")
        allowed = self._allowed(origin) if origin else None
        if scope["method"] == "OPTIONS" and allowed:
            response = Response(status_code=204, headers={
                "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"})
            return await response(scope, receive, send)

        async def send_with_origin(message: Dict[str, Any]) -> None:
            if allowed and message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"access-control-allow-origin", allowed.encode("latin-1")), (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, send_with_origin)


class RequireKey:
    """With an API key, every route but /health needs ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: Any, key: Optional[str]):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in _UNPROTECTED:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer KEY'" if not header
                   else "incorrect API key")
        response = error_response(APIError(401, message, code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)


# -- responses ----------------------------------------------------------------------------------

def error_body(error: APIError) -> Dict[str, Any]:
    return {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


class EventStream:
    """A server-sent-event response that stops its source as soon as the client disconnects.

    The source is closed on every exit (done, client gone, server shutting down), which cancels
    the generation behind it; ``on_close`` then releases the request's slot. An error after the
    200 has gone out can only be an event: the stream ends with it.
    """

    def __init__(self, events: AsyncIterator[Dict[str, Any]], on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()  # raise what the pump raised, if anything
            else:
                scope[_LEFT] = True
        finally:
            for task in (pump, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            self.on_close()

    async def _pump(self, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        async with contextlib.aclosing(self.events) as events:
            try:
                async for event in events:
                    await send({"type": "http.response.body", "body": _sse(event), "more_body": True})
                tail = b"data: [DONE]\n\n"
            except (RequestError, APIError) as e:
                log.warning("a stream ended with an error: %s", e)
                tail = _sse(error_body(to_api_error(e)))
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _sse(event: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _until_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


# -- the application ------------------------------------------------------------------------------

@dataclass
class ServerSettings:
    """What the HTTP side needs besides the engine."""

    model_id: str
    context_limit: Optional[int] = None
    api_key: Optional[str] = None
    max_concurrency: int = 4
    max_queue: int = 16
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_hosts: Optional[List[str]] = None  # None: no Host check (not bound to loopback)
    cors_origins: List[str] = field(default_factory=list)
    grace_s: float = 5.0
    keep_alive_s: Optional[float] = None  # unload the model after this long without a request


@dataclass
class _Prepared:
    """A request made ready for the engine."""

    ids: List[int]
    settings: GenerationSettings
    tools: ToolPlan
    thinking: Optional[bool]  # None: the model has no thinking tags; else whether the prompt opened them


def create_app(engine: EngineClient, settings: ServerSettings,
               on_stopped: Callable[[], None] = lambda: None) -> Starlette:
    """The ASGI app. The engine starts when the app starts; until it is ready /health answers
    503 and the generation routes 503 with Retry-After. ``app.state.drain()`` begins a graceful
    shutdown: waiters are refused at once, running streams get a final error event before the
    grace period ends."""
    admission = Admission(settings.max_concurrency, settings.max_queue)
    activity = {"last": time.monotonic(), "active": 0}  # for --keep-alive
    metrics = Metrics(settings.model_id, lambda: {
        "ovchat_requests_running": admission.busy, "ovchat_requests_waiting": admission.queued,
        "ovchat_kv_cache_usage_ratio": engine.stats.kv_cache_usage,
        "ovchat_engine_restarts_total": engine.restarts})
    created = int(time.time())
    model_id = settings.model_id

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes",
                             code="request_too_large")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            await _drain(request)
            raise too_large
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            await _drain(request)
            raise APIError(415, "send the body as JSON, with 'Content-Type: application/json'",
                           code="unsupported_media_type")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                await _drain(request, len(body))
                raise too_large
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        check_text(value)
        return value

    async def _drain(request: Request, seen: int = 0) -> None:
        with contextlib.suppress(ClientDisconnect, RuntimeError):  # RuntimeError: already consumed
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > _DRAIN_LIMIT:
                    break

    def prompt_ids(parsed: GenerationRequest, plan: ToolPlan) -> tuple:
        """The prompt's token ids (a chat through the template, with the plan's tools shown), and
        whether the prompt opened the model's thinking tags (None: it has none)."""
        tokenizer = engine.tokenizer
        template = tokenizer.chat_template or ""
        if parsed.messages is None:
            return _ids(tokenizer.encode(parsed.prompt, add_special_tokens=True)), None
        if not template:
            raise NoChatTemplateError(model_id)
        plan.check(template, model_id)
        try:
            text = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=parsed.add_generation_prompt,
                                                 tools=plan.template_tools(template))
        except RuntimeError as e:
            # Templates may refuse some orders of roles (e.g. two user messages in a row).
            raise InvalidRequestError(f"the model's chat template refused the messages: {summary(e)}",
                                      param="messages") from None
        thinking = None
        if THINK_OPEN in template or THINK_CLOSE in template:  # a reasoning model's template
            thinking = text.rstrip().endswith(THINK_OPEN)
        return _ids(tokenizer.encode(text, add_special_tokens=False)), thinking

    def prepare(parsed: GenerationRequest) -> _Prepared:
        """Template and tokenize (in a worker thread), fit the window, and say how to generate."""
        _check_speculation(parsed, engine.spec.speculation)
        plan = ToolPlan(parsed.tools, parsed.tool_choice)
        ids, thinking = prompt_ids(parsed, plan)
        max_new = reply_budget(len(ids), parsed.max_tokens, settings.context_limit, parsed)
        constraint = structured.settings(parsed.response_format, plan)
        return _Prepared(ids, to_settings(parsed.options, max_new, parsed, constraint), plan, thinking)

    async def generate(request: Request, parsed: GenerationRequest, kind: str) -> Response:
        activity["last"] = time.monotonic()
        activity["active"] += 1
        try:
            return await _generate(request, parsed, kind)
        finally:
            activity["active"] -= 1
            activity["last"] = time.monotonic()

    async def _generate(request: Request, parsed: GenerationRequest, kind: str) -> Response:
        await engine.ensure_loaded()
        engine.require_ready()
        arrived = time.perf_counter()
        prepared = await asyncio.to_thread(prepare, parsed)
        request.scope[_TOKENS] = (len(prepared.ids), 0)
        slot = await unless_client_leaves(request, admission.acquire())
        renderer = Renderer(kind, model_id, lambda t: engine.tokenizer.decode([t]))
        choices = [Choice(i, engine.tokenizer.decode, prepared.tools, engine.tokenizer.chat_template or "",
                          Reasoning(prepared.thinking) if prepared.thinking is not None else None,
                          [] if parsed.logprobs else None) for i in range(parsed.n)]
        outputs = engine.generate(prepared.ids, prepared.settings)
        clock = _Clock(arrived, metrics)
        handed_over = False
        try:
            if not parsed.stream:
                texts = await unless_client_leaves(request, _gather(outputs, choices, clock))
                completion = sum(c.tokens for c in choices)
                request.scope[_TOKENS] = (len(prepared.ids), completion)
                return JSONResponse(renderer.whole(choices, texts, usage(len(prepared.ids), completion)))
            # The first tokens come before the 200, so a request the engine refuses still gets its
            # status; they are also where a long prompt's prefill is spent.
            first = await unless_client_leaves(request, outputs.__anext__())

            def count() -> None:
                request.scope[_TOKENS] = (len(prepared.ids), sum(c.tokens for c in choices))

            events = _stream(renderer, first, outputs, choices, len(prepared.ids), parsed.include_usage, count,
                             clock)
            response = EventStream(events, on_close=slot.release)
            handed_over = True
            return response
        finally:
            if not handed_over:
                await outputs.aclose()
                slot.release()

    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(await read_json(request), model_id)
        return await generate(request, parsed, "chat")

    async def completions(request: Request) -> Response:
        parsed = parse_completion(await read_json(request), model_id)
        return await generate(request, parsed, "text")

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: the prompt's token count as a generation would see it (a chat through
        the template, or a plain text), with the window; ``ovchat run`` on the warm path counts
        its turns here."""
        parsed = parse_tokenize(await read_json(request), model_id)
        await engine.ensure_loaded()
        engine.require_ready()
        ids, _ = await asyncio.to_thread(prompt_ids, parsed, ToolPlan(parsed.tools, parsed.tool_choice))
        return JSONResponse({"count": len(ids), "max_model_len": settings.context_limit, "tokens": ids})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model_id, created)]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(model_id, created))

    async def health(request: Request) -> Response:
        detail = {"model": model_id, "context_limit": settings.context_limit,
                  "chat_template": bool(engine.tokenizer is not None and engine.tokenizer.chat_template),
                  "engine": {"state": engine.state, "pid": engine.pid, "restarts": engine.restarts}}
        if engine.ready or engine.state == "unloaded":
            return JSONResponse({"status": "ok", "device": engine.spec.device, "running": admission.busy,
                                 "waiting": admission.queued, **detail})
        if engine.state == "failed":
            return JSONResponse({"status": "error", "error": engine.error, **detail}, status_code=503)
        return JSONResponse({"status": engine.state, **detail}, status_code=503, headers={"Retry-After": "2"})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def on_request_error(request: Request, error: Exception) -> Response:
        return error_response(to_api_error(error))

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        # Starlette's own 404/405 in OpenAI's shape, so clients parse every error the same way.
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code, headers=dict(error.headers or {})))

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log does

    async def on_bug(request: Request, error: Exception) -> Response:
        # The last resort for a bug (every expected failure is a domain error or an APIError): the
        # client gets OpenAI's error shape and no traceback; Starlette still logs the traceback.
        return error_response(APIError(500, "internal server error; see the server log", kind="server_error"))

    async def keep_alive() -> None:
        """Unload the model once no request has come for ``settings.keep_alive_s``."""
        while True:
            await asyncio.sleep(min(5.0, max(0.5, settings.keep_alive_s / 4)))
            idle = time.monotonic() - activity["last"]
            if activity["active"] == 0 and idle >= settings.keep_alive_s and engine.ready:
                await asyncio.to_thread(engine.unload)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        watcher = asyncio.ensure_future(keep_alive()) if settings.keep_alive_s is not None else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(engine.close)
            on_stopped()

    def drain() -> None:
        """Begin the graceful shutdown (call on the event loop)."""
        refused = admission.close()
        if refused:
            log.info("shutting down: %d waiting request%s refused (503)", refused, "s" if refused != 1 else "")
        running = admission.busy
        if running:
            log.info("shutting down: %d running request%s get %.0f s to finish", running,
                     "s" if running != 1 else "", settings.grace_s)

            async def cut_off() -> None:
                await asyncio.sleep(max(0.0, settings.grace_s - 1.0))
                if admission.busy:
                    log.info("shutting down: %d request%s cut off", admission.busy, "s" if admission.busy != 1 else "")
                    engine.fail_all(EngineUnavailableError("the server is shutting down", code="shutting_down"))

            asyncio.ensure_future(cut_off())

    middleware = [Middleware(AccessLog, metrics=metrics), Middleware(HostCheck, allowed=settings.allowed_hosts)]
    if settings.cors_origins:
        middleware.append(Middleware(CORS, origins=settings.cors_origins))
    middleware.append(Middleware(RequireKey, key=settings.api_key))
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={APIError: on_request_error, RequestError: on_request_error, HTTPException: on_http_error,
                            ClientGone: on_client_gone, ClientDisconnect: on_client_gone, Exception: on_bug},
        lifespan=lifespan,
    )
    app.state.drain = drain
    app.state.metrics = metrics
    app.state.admission = admission
    return app


def _ids(encoded: Any) -> List[int]:
    return [int(i) for i in encoded.input_ids.data[0]]


def reply_budget(prompt_tokens: int, requested: Optional[int], limit: Optional[int],
                 parsed: GenerationRequest) -> int:
    """The most tokens a reply may have: what was asked, cut to the window; a prompt that leaves
    no room for a single token is refused (OpenAI's code)."""
    if limit is None:
        return requested or GenerationOptions().max_new_tokens
    room = limit - prompt_tokens
    if room < 1:
        raise InvalidRequestError(f"the prompt has {prompt_tokens} tokens, but the model's context window is {limit}; "
                                  "shorten it", param="messages" if parsed.messages is not None else "prompt",
                                  code="context_length_exceeded")
    return min(requested or room, room)


def _check_speculation(parsed: GenerationRequest, lever: Any) -> None:
    """A request's own speculation settings fit only the lever the server was started with."""
    if not parsed.speculation:
        return
    field_name = next(iter(parsed.speculation))
    if lever is None:
        raise InvalidRequestError(f"'{field_name}' needs a server started with --prompt-lookup or --draft-model",
                                  param=field_name)
    if "max_ngram_size" in parsed.speculation and lever.kind != "prompt-lookup":
        raise InvalidRequestError("'max_ngram_size' applies to prompt lookup; this server speculates with a draft "
                                  "model", param="max_ngram_size")


def to_settings(options: GenerationOptions, max_new: int, parsed: GenerationRequest,
                structured: Dict[str, Any]) -> GenerationSettings:
    return options.settings(max_new, presence_penalty=parsed.penalties.get("presence_penalty", 0.0),
                            frequency_penalty=parsed.penalties.get("frequency_penalty", 0.0),
                            logprobs=parsed.logprobs, n=parsed.n, **parsed.speculation, **structured)


class _Clock:
    """Time to first token and time per output token of one request, for /metrics."""

    def __init__(self, arrived: float, metrics: Metrics):
        self.arrived, self.metrics = arrived, metrics
        self.first: Optional[float] = None
        self.tokens = 0

    def tick(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.first is None and tokens:
            self.first = now
            self.metrics.first_token(now - self.arrived)
            tokens -= 1
        self.tokens += tokens

    def done(self) -> None:
        if self.first is not None:
            self.metrics.tokens_after_first(self.tokens, time.perf_counter() - self.first)


async def _gather(outputs: AsyncIterator[Any], choices: List[Choice], clock: _Clock) -> Dict[int, Dict[str, str]]:
    texts: Dict[int, Dict[str, str]] = {c.index: {} for c in choices}
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            clock.tick(len(out.ids))
            delta = choices[out.index].add(out.ids, out.logprobs, out.finish)
            delta.pop("_logprobs", None)
            for key in ("content", "reasoning_content"):
                if delta.get(key):
                    texts[out.index][key] = texts[out.index].get(key, "") + delta[key]
    clock.done()
    return texts


async def _stream(renderer: Renderer, first: Any, rest: AsyncIterator[Any], choices: List[Choice],
                  prompt_tokens: int, include_usage: bool, count: Callable[[], None],
                  clock: _Clock) -> AsyncIterator[Dict[str, Any]]:
    """The events of a streamed reply: a role chunk per choice (chat), deltas, finish chunks, usage."""
    async with contextlib.aclosing(rest):
        if renderer.chat:
            for c in choices:
                yield renderer.chunk(c.index, {}, None, include_usage, first=True)
        out = first
        while out is not None:
            clock.tick(len(out.ids))
            delta = choices[out.index].add(out.ids, out.logprobs, out.finish)
            count()
            if any(v for k, v in delta.items() if k != "_logprobs") or (delta.get("_logprobs") and out.finish is None):
                calls = delta.pop("tool_calls", None)
                if any(v for k, v in delta.items() if k != "_logprobs"):
                    yield renderer.chunk(out.index, delta, None, include_usage)
                if calls:
                    yield renderer.chunk(out.index, {"tool_calls": calls}, None, include_usage)
            if out.finish is not None:
                yield renderer.chunk(out.index, {}, choices[out.index].finish_reason, include_usage)
            out = await rest.__anext__() if any(c.finish_reason is None for c in choices) else None
    clock.done()
    if include_usage:
        yield renderer.usage_chunk(usage(prompt_tokens, sum(c.tokens for c in choices)))


def _model_card(model_id: str, created: int) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ovchat"}
