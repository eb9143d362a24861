"""The middleware of `ovchat serve`, outermost first: the access log (and the request counters of
/metrics), the Host check (DNS rebinding), CORS (off unless asked for) and the API key."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time
from typing import Any, Callable, Dict, Optional, Sequence
from urllib.parse import urlsplit

from starlette.responses import Response

from ovchat.errors import APIError
from ovchat.server.http import FAILED, LEFT, MODEL, TOKENS, error_response
from ovchat.server.metrics import Metrics

access_log = logging.getLogger("ovchat.server.access")
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+){0,63}")


class AccessLog:
    """One log line per request: method, path, model, status, prompt+completion tokens, duration;
    and the request counters of /metrics, by route (``routes``: their paths, ``{param}`` parts
    matching anything), so that random paths cannot grow the series."""

    def __init__(self, app: Any, metrics: Optional[Metrics] = None, routes: Sequence[str] = ()):
        self.app = app
        self.metrics = metrics
        self._fixed = {r for r in routes if "{" not in r}
        self._prefixes = [(r.split("{", 1)[0], r) for r in routes if "{" in r]

    def route(self, path: str) -> str:
        if path in self._fixed:
            return path
        return next((route for prefix, route in self._prefixes if path.startswith(prefix)), "other")

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
            tokens = scope.get(TOKENS)
            seconds = time.perf_counter() - start
            code = scope.get(FAILED) or status.get("code", 500)
            model = scope.get(MODEL)
            note = " (client left mid-stream)" if scope.get(LEFT) else " (a 200 stream that ended in this error)" \
                if scope.get(FAILED) else ""
            failed = scope.get(FAILED) or (code >= 500 and scope["path"] != "/health")  # /health: 503 while loading
            (access_log.warning if failed else access_log.info)(
                "%s %s %s tokens=%s %.3fs%s%s", scope["method"], scope["path"], code,
                f"{tokens[0]}+{tokens[1]}" if tokens else "-", seconds, f" model={model}" if model else "", note)
            if self.metrics is not None:
                self.metrics.request_done(self.route(scope["path"]), code, *(tokens or (0, 0)), seconds)


class HostCheck:
    """A server listening on a loopback address answers requests for loopback names only (403
    otherwise): a web page cannot reach it by rebinding a DNS name of its own to 127.0.0.1.
    A request target in absolute form (``GET http://host/path``) is routed by its path."""

    def __init__(self, app: Any, allowed: Optional[Sequence[str]]):
        self.app = app
        self.allowed = None if allowed is None else {h.lower() for h in allowed}

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        if scope["path"].startswith(("http://", "https://")):
            # The absolute form of a request target (what proxies send): its authority is the
            # host (RFC 9112, 3.2.2) and its path the route.
            target = urlsplit(scope["path"])
            host = target.netloc.lower()
            scope = dict(scope, path=target.path or "/", raw_path=(target.path or "/").encode("latin-1"))
        if self.allowed is None:
            return await self.app(scope, receive, send)
        if _is_loopback_host(host) or _host_name(host) in self.allowed:
            return await self.app(scope, receive, send)
        response = error_response(APIError(403, f"requests for host {host or '(none)'!r} are not served here; this "
                                                "server answers loopback names (start it with --allow-host NAME "
                                                "to add one)", code="host_not_allowed"), scope["path"])
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
            # The headers the page asks to send (the openai SDKs add their X-Stainless-* ones), if
            # they are header names; the two every client needs otherwise.
            asked = dict(scope["headers"]).get(b"access-control-request-headers", b"").decode("latin-1")
            names = asked if asked and _HEADER_LIST.fullmatch(asked) else "Authorization, Content-Type"
            response = Response(status_code=204, headers={
                "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": names, "Access-Control-Max-Age": "600", "Vary": "Origin"})
            return await response(scope, receive, send)

        async def send_with_origin(message: Dict[str, Any]) -> None:
            if allowed and message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"access-control-allow-origin", allowed.encode("latin-1")), (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, send_with_origin)


class RequireKey:
    """With an API key, every route but ``open_paths`` (/health, the chat page's files) needs
    ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: Any, key: Optional[str], open_paths: Sequence[str] = ("/health",)):
        self.app = app
        self.key = key.encode() if key else None
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer KEY'" if not header
                   else "incorrect API key")
        response = error_response(APIError(401, message, code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"}), scope["path"])
        await response(scope, receive, send)
