"""The client side of the warm path: a conversation's turns sent to a running `ovchat serve`.

``RemoteModel`` posts chat and completion requests to the server's OpenAI API and yields the
server-sent events of the streamed reply; HTTP refusals come back as ovchat's own errors, so
``ChatSession`` behaves the same whether its model is loaded in-process or by a server. Only the
standard library is used: a warm `ovchat run` never imports OpenVINO.
"""

from __future__ import annotations

import json
from http.client import HTTPConnection, HTTPException
from typing import Any, Dict, Iterator, Optional
from urllib.parse import urlparse

from ovchat.errors import ContextOverflowError, InputError, ModelLoadError, OvchatError
from ovchat.servers import ServerInfo

_TIMEOUT_S = 3600.0  # a long reply of a big model on a small CPU


class RemoteModel:
    """The model of a running server, reached over HTTP."""

    def __init__(self, info: ServerInfo, api_key: Optional[str] = None):
        self.info = info
        self.api_key = api_key
        self._conn: Optional[HTTPConnection] = None

    def stream(self, path: str, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """POST ``body`` (with ``stream`` true) to ``path`` and yield each event. Closing the
        iterator closes the connection, which cancels the request on the server."""
        parsed = urlparse(self.info.url)
        conn = HTTPConnection(parsed.hostname, parsed.port, timeout=_TIMEOUT_S)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            try:
                conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers=headers)
                response = conn.getresponse()
            except (OSError, HTTPException) as e:
                raise ModelLoadError(f"the ovchat server at {self.info.url} did not answer ({e}); run with "
                                     "--no-server to load the model here") from None
            if response.status != 200:
                raise _error(response.status, response.read())
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ModelLoadError(f"the ovchat server stopped the reply: {event['error'].get('message')}")
                yield event
        finally:
            conn.close()


def _error(status: int, body: bytes) -> OvchatError:
    try:
        error = json.loads(body)["error"]
        message, code = str(error.get("message")), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = body[:200].decode("utf-8", errors="replace"), None
    if code == "context_length_exceeded":
        return ContextOverflowError(f"{message} (or raise --max-context)")
    if status in (400, 404, 413, 415, 422):
        return InputError(message)
    return ModelLoadError(f"the ovchat server answered {status}: {message}; run with --no-server to load the "
                          "model here")
