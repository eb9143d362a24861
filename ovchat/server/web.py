"""The chat page of `ovchat serve`: one static page at ``/`` and its files under ``/web/``.

The page is plain HTML, CSS and JavaScript shipped inside the package (no build step, no CDN, no
external fonts: the box may be offline) and talks to the server's own OpenAI API. The files are
read once; only the names listed here are served, so no request path ever reaches the disk.
Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only
(none inline), requests to this origin only, no frames, no plugins. The model's replies are
untrusted text, and the page's own code never turns them into HTML (``markdown.js``).
"""

from __future__ import annotations

from importlib import resources
from typing import Dict, List, Tuple

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ovchat.errors import OvchatError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
# URL path -> (file in ovchat/server/web, media type)
FILES: Dict[str, Tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/web/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
    "/web/icon.svg": ("icon.svg", "image/svg+xml"),
}
# The page and its files hold no secret: they load without the API key, and then ask for it.
PATHS = tuple(FILES)


def _read(name: str) -> bytes:
    return resources.files("ovchat.server").joinpath("web", name).read_bytes()


def routes() -> List[Route]:
    """The page's routes; each file is read when the app is built, not per request."""
    out = []
    for path, (name, media) in FILES.items():
        try:
            body = _read(name)
        except OSError as e:  # a broken install: say so once, at start
            raise OvchatError(f"the chat page's {name} is missing from the installed package ({e}); reinstall "
                              "ovchat, or serve with --no-web") from None

        async def serve(request: Request, body: bytes = body, media: str = media) -> Response:
            return Response(body, media_type=media, headers=HEADERS)

        out.append(Route(path, serve, methods=["GET", "HEAD"]))
    return out
