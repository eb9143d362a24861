"""The HTTP edge of `ovchat serve`: request bodies in, errors and streams out.

Domain errors (``ovchat.errors``) become HTTP statuses here and nowhere else (``to_api_error``),
in the shape of the API the client speaks: OpenAI's ``{"error": {"message", "type", "param",
"code"}}``, or ollama's ``{"error": "message"}`` under ``/api/``. Only a bug is a 500, and even
then the body is that shape without a traceback. ``Stream`` sends server-sent events (OpenAI) or
newline-delimited JSON (ollama) and stops the generation behind it as soon as the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ovchat.errors import (APIError, EngineUnavailableError, InsufficientMemoryError, RequestError, ServerBusyError)

log = logging.getLogger("ovchat.server")

T = TypeVar("T")
MAX_BODY_BYTES = 1024 * 1024
# A body (at most MAX_BODY_BYTES) that takes longer than this is a client holding a slot open.
BODY_TIMEOUT_S = 30.0
# Past this, an oversized body is no longer read to the end before the 413 is sent; reading it
# lets the client see the 413 instead of a reset connection, but not at any cost.
_DRAIN_LIMIT = 16 * MAX_BODY_BYTES
_DRAIN_TIMEOUT_S = 5.0
# nginx's status for "the client closed the connection before the answer": shows in the log only.
CLIENT_CLOSED = 499
TOKENS = "ovchat.tokens"  # scope key where a route leaves its token counts for the access log
LEFT = "ovchat.client_left"  # scope key set when a client left in the middle of a stream
MODEL = "ovchat.model"  # scope key where a route names the model it served (metrics)
FAILED = "ovchat.stream_failed"  # scope key: the status of the error a 200 stream ended with
OLLAMA_PREFIX = "/api/"


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def to_api_error(error: Exception) -> APIError:
    """A domain error as the HTTP answer it deserves."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ServerBusyError):
        return APIError(429, str(error), code=error.code, kind="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(error, InsufficientMemoryError):
        return APIError(507, str(error), param=error.param, code=error.code, kind="server_error")
    if isinstance(error, EngineUnavailableError):
        headers = {"Retry-After": "2"} if error.code in ("model_not_ready", "engine_restarting", "models_busy") else {}
        return APIError(503, str(error), code=error.code, kind="server_error", headers=headers)
    if isinstance(error, RequestError):
        return APIError(400, str(error), param=error.param, code=error.code)
    return APIError(500, "internal server error; see the server log", kind="server_error")


def error_body(error: APIError, path: str = "") -> Dict[str, Any]:
    if path.startswith(OLLAMA_PREFIX):
        return {"error": str(error)}
    return {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}}


def error_response(error: APIError, path: str = "") -> JSONResponse:
    status = error.status
    if path.startswith(OLLAMA_PREFIX) and error.code == "model_not_found":
        status = 404  # ollama's status for an unknown model (clients offer to pull it)
    return JSONResponse(error_body(error, path), status_code=status, headers=error.headers)


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body: 413 past ``max_bytes``, 415 unless it is sent as JSON, 400 for
    malformed JSON (and strings that are not Unicode text)."""
    from ovchat.server.schema import check_strings

    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > max_bytes:
        await _drain(request)
        raise too_large
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # ollama's clients send their JSON without a content type; only its routes accept that.
    if kind != "application/json" and not (kind == "" and request.url.path.startswith(OLLAMA_PREFIX)):
        await _drain(request)
        raise APIError(415, "send the body as JSON, with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                await _drain(request, len(body))
                raise too_large

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s "
                            f"({len(body)} bytes came)", code="request_timeout") from None
    try:
        value = json.loads(body)
    except ValueError as e:  # bad UTF-8 and bad JSON are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply (a few hundred levels are the most "
                            "this server reads)", code="invalid_json") from None
    check_strings(value)
    return value


async def _drain(request: Request, seen: int = 0) -> None:
    """Read what is left of a refused body (so the client sees the answer, not a reset), within
    limits of size and time."""

    async def drain() -> None:
        nonlocal seen
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_LIMIT:
                break

    # RuntimeError: already consumed
    with contextlib.suppress(ClientDisconnect, RuntimeError, asyncio.TimeoutError):
        await asyncio.wait_for(drain(), _DRAIN_TIMEOUT_S)


async def until_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect(request.receive))
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


def sse(event: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def ndjson(event: Dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Stream:
    """A streamed response that stops its source as soon as the client disconnects.

    ``kind`` "sse": server-sent events ending with ``data: [DONE]`` (OpenAI); "ndjson": one JSON
    object a line (ollama). The source is closed on every exit (done, client gone, server
    shutting down), which cancels the generation behind it; ``on_close`` then releases what the
    request held. An error after the 200 has gone out can only be a last event.
    """

    def __init__(self, events: AsyncIterator[Dict[str, Any]], on_close: Callable[[], None], *, kind: str = "sse",
                 path: str = ""):
        self.events, self.on_close, self.kind, self.path = events, on_close, kind, path

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        pump = asyncio.ensure_future(self._pump(send, scope))
        gone = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()  # raise what the pump raised, if anything
            else:
                scope[LEFT] = True
        finally:
            for task in (pump, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            self.on_close()

    async def _pump(self, send: Callable, scope: Dict[str, Any]) -> None:
        encode = sse if self.kind == "sse" else ndjson
        media = b"text/event-stream; charset=utf-8" if self.kind == "sse" else b"application/x-ndjson"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", media), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        async with contextlib.aclosing(self.events) as events:
            tail: Optional[bytes]
            try:
                async for event in events:
                    await send({"type": "http.response.body", "body": encode(event), "more_body": True})
                tail = b"data: [DONE]\n\n" if self.kind == "sse" else None
            except (RequestError, APIError) as e:
                error = to_api_error(e)
                scope[FAILED] = error.status  # the access log and the metrics count the error, not the 200
                log.warning("a stream ended with an error: %s", e)
                tail = encode(error_body(error, self.path))
        await send({"type": "http.response.body", "body": tail or b"", "more_body": False})
