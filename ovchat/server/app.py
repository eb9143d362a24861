"""The HTTP side of `ovchat serve`: OpenAI's routes on Starlette, over a ``Backend``.

Every failure a client can cause is an ``APIError`` and leaves as OpenAI's error object
``{"error": {"message", "type", "param", "code"}}`` with its status; only a bug is a 500, and
even then the body is that object without a traceback. Requests pass, outermost first, through
the access log (one line each), the API-key check, and the route, which reads the body with a
size limit, validates it (``schema``), waits for a slot (``Admission``) and generates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Dict, Optional, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ovchat.errors import APIError, ModelLoadError
from ovchat.server.backend import Backend, Piece, Prompt
from ovchat.server.schema import GenerationRequest, parse_chat, parse_completion

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


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


# -- admission --------------------------------------------------------------------------------

class Admission:
    """At most ``running`` requests generate at once; up to ``waiting`` more wait their turn (FIFO).

    Past that a request is refused at once with 429 and Retry-After, so a burst cannot pile up
    unbounded work. A slot is released exactly once, and a waiter that gives up (its client
    left) passes on a slot it was handed in the same instant.
    """

    def __init__(self, running: int, waiting: int):
        self.running = running
        self.waiting = waiting
        self._free = running
        self._waiters: Deque[asyncio.Future] = collections.deque()

    @property
    def busy(self) -> int:
        return self.running - self._free

    async def acquire(self) -> "Slot":
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return Slot(self)
        if len(self._waiters) >= self.waiting:
            raise APIError(429, f"the server is busy ({self.running} requests running, {len(self._waiters)} "
                                "waiting); retry shortly", kind="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled():
                self._release()  # handed a slot just as we gave up: pass it on
            elif turn in self._waiters:  # _release may already have skipped and dropped it
                self._waiters.remove(turn)
            raise
        return Slot(self)

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
    """One log line per request: method, path, status, prompt+completion tokens, duration."""

    def __init__(self, app: Any):
        self.app = app

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
            access_log.info("%s %s %s tokens=%s %.3fs%s", scope["method"], scope["path"],
                            status.get("code", 500), f"{tokens[0]}+{tokens[1]}" if tokens else "-",
                            time.perf_counter() - start, " (client left mid-stream)" if scope.get(_LEFT) else "")


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
    the generation behind it; ``on_close`` then releases the request's slot.
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
            except APIError as e:  # after the 200 has gone out, an error can only be an event
                tail = _sse(error_body(e))
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

def create_app(backend: Backend, model_id: str, *, api_key: Optional[str] = None, max_concurrency: int = 4,
               max_queue: int = 16, max_body_bytes: int = MAX_BODY_BYTES,
               on_load_failed: Callable[[str], None] = lambda _: None) -> Starlette:
    """The ASGI app. The model starts loading (in a thread) when the app starts; until it has,
    /health answers 503 and the generation routes 503 with Retry-After."""
    admission = Admission(max_concurrency, max_queue)
    created = int(time.time())

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                             code="request_too_large")
        if declared.isdigit() and int(declared) > max_body_bytes:
            await _drain(request)
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                await _drain(request, len(body))
                raise too_large
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    async def _drain(request: Request, seen: int = 0) -> None:
        with contextlib.suppress(ClientDisconnect, RuntimeError):  # RuntimeError: already consumed
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > _DRAIN_LIMIT:
                    break

    def require_ready() -> None:
        if not backend.ready:
            message = backend.error or "the model is still loading; retry shortly"
            raise APIError(503, message, kind="server_error", code="model_not_ready",
                           headers={} if backend.error else {"Retry-After": "2"})

    async def generate(request: Request, parsed: GenerationRequest, encode: Callable[[], Prompt],
                       render: "Renderer") -> Response:
        require_ready()
        # Tokenizing runs beside the loop: a long prompt must not stall the other clients.
        prompt = await asyncio.to_thread(encode)
        max_new = backend.reply_budget(prompt, parsed.max_tokens)
        config = backend.config(parsed.options, max_new, parsed.penalties)
        request.scope[_TOKENS] = (prompt.tokens, 0)
        slot = await unless_client_leaves(request, admission.acquire())
        pieces = backend.generate(prompt, config)
        handed_over = False
        try:
            if not parsed.stream:
                text, tokens, finish = await unless_client_leaves(request, _gather(pieces))
                request.scope[_TOKENS] = (prompt.tokens, tokens)
                return JSONResponse(render.whole(text, finish, _usage(prompt.tokens, tokens)))
            # The first piece comes before the 200, so a request the scheduler refuses still gets
            # its status; it is also where a long prompt's prefill is spent.
            first = await unless_client_leaves(request, pieces.__anext__())

            def count(completion_tokens: int) -> None:
                request.scope[_TOKENS] = (prompt.tokens, completion_tokens)

            response = EventStream(render.stream(first, pieces, prompt.tokens, parsed.include_usage, count),
                                   on_close=slot.release)
            handed_over = True
            return response
        finally:
            if not handed_over:
                await pieces.aclose()
                slot.release()

    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(await read_json(request), model_id)
        return await generate(request, parsed, lambda: backend.encode_chat(parsed.messages),
                              Renderer("chat", model_id))

    async def completions(request: Request) -> Response:
        parsed = parse_completion(await read_json(request), model_id)
        return await generate(request, parsed, lambda: backend.encode_text(parsed.prompt),
                              Renderer("text", model_id))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model_id, created)]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(model_id, created))

    async def health(request: Request) -> Response:
        if backend.ready:
            return JSONResponse({"status": "ok", "model": model_id, "device": backend.device.name,
                                 "running": admission.busy})
        if backend.error:
            return JSONResponse({"status": "error", "error": backend.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    async def on_api_error(request: Request, error: APIError) -> Response:
        return error_response(error)

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        # Starlette's own 404/405 in OpenAI's shape, so clients parse every error the same way.
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code, headers=dict(error.headers or {})))

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log does

    async def on_bug(request: Request, error: Exception) -> Response:
        # The last resort for a bug (every expected failure is an APIError): the client gets
        # OpenAI's error shape and no traceback; Starlette still logs the traceback server-side.
        return error_response(APIError(500, "internal server error; see the server log", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A daemon thread: a server stopped while the model still compiles need not wait for it.
        threading.Thread(target=_load, args=(backend, on_load_failed), name="ovchat-load", daemon=True).start()
        try:
            yield
        finally:
            backend.close()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(AccessLog), Middleware(RequireKey, key=api_key)],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                            ClientGone: on_client_gone, ClientDisconnect: on_client_gone, Exception: on_bug},
        lifespan=lifespan,
    )


def _load(backend: Backend, on_failed: Callable[[str], None]) -> None:
    start = time.perf_counter()
    try:
        backend.load()
    except ModelLoadError:
        pass  # backend.error has the message, reported below
    finally:
        if backend.ready:
            log.info("model loaded on %s in %.1fs; ready", backend.device.name, time.perf_counter() - start)
        else:
            log.error("the model could not be loaded: %s", backend.error or "see above")
            on_failed(backend.error or "the model could not be loaded")


async def _gather(pieces: AsyncIterator[Piece]) -> tuple:
    text, last = [], None
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            text.append(piece.text)
            last = piece
    return "".join(text), last.completion_tokens, last.finish_reason


def _usage(prompt: int, completion: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _model_card(model_id: str, created: int) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ovchat"}


class Renderer:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: str, model_id: str):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.model = model_id
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra: Any) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, text: str, finish: str, usage: Dict[str, int]) -> Dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=usage)

    def _chunk(self, text: Optional[str], finish: Optional[str], include_usage: bool,
               first: bool = False) -> Dict[str, Any]:
        if self.chat:
            delta: Dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return self._envelope(obj, [choice], **({"usage": None} if include_usage else {}))

    async def stream(self, first: Piece, rest: AsyncIterator[Piece], prompt_tokens: int, include_usage: bool,
                     count: Callable[[int], None]) -> AsyncIterator[Dict[str, Any]]:
        """The events of a streamed reply: a role chunk (chat), text chunks, the finish chunk, usage."""
        async with contextlib.aclosing(rest):
            if self.chat:
                yield self._chunk(None, None, include_usage, first=True)
            piece = first
            while True:
                count(piece.completion_tokens)
                if piece.text:
                    yield self._chunk(piece.text, None, include_usage)
                if piece.finish_reason is not None:
                    yield self._chunk(None, piece.finish_reason, include_usage)
                    break
                piece = await rest.__anext__()
        if include_usage:
            yield self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                                 usage=_usage(prompt_tokens, piece.completion_tokens))
