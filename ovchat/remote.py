"""The backend on a running `ovchat serve` of the model: the warm path.

Turns go to the server's OpenAI API as streamed requests (chat, or completions for a plain
text) and tokens are counted by its ``/tokenize``, so the session applies the same window policy
and the same tool plan as with a model loaded here; HTTP refusals come back as ovchat's own
errors. Only the standard library is used: a warm `ovchat run` never imports OpenVINO.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from ovchat import discovery
from ovchat.backend import Outcome, Request
from ovchat.devices import DeviceChoice
from ovchat.errors import ContextOverflowError, GenerationError, InputError, OvchatError
from ovchat.toolcalls import ToolCall, ToolPlan

_TIMEOUT_S = 3600.0  # a long reply of a big model on a small CPU


class RemoteBackend:
    """The model of a running server, reached over HTTP."""

    def __init__(self, info: discovery.ServerInfo, name: str, card: Dict[str, Any], model_path: Path,
                 api_key: Optional[str]):
        self.info = info
        self.name = name  # the model's name on that server
        self.api_key = api_key
        self.model_path = model_path
        loaded = (card.get("ovchat") or {}).get("loaded")
        self.device = DeviceChoice(info.device, f"the model is {'loaded already' if loaded else 'served'} by "
                                                f"ovchat serve at {info.url}", True)
        self.context_limit = card.get("max_model_len")
        self.prompt_limit = None  # the server refuses what its device cannot take
        self.has_chat_template = bool((card.get("ovchat") or {}).get("chat_template", True))
        self.load_s = 0.0

    @classmethod
    def connect(cls, model_path: Path, device: str) -> Optional["RemoteBackend"]:
        """The backend on a running server of ``model_path`` (on ``device`` unless auto) that
        answers and whose key, if it wants one, is in OVCHAT_API_KEY; None if there is none."""
        found = discovery.find(model_path, device=None if (device or "auto").lower() == "auto" else device)
        key = os.environ.get("OVCHAT_API_KEY")
        if found is None or (found[0].key_required and not key):
            return None
        info, name = found
        card = discovery.model_card(info, name, key)
        return None if card is None else cls(info, name, card, model_path, key)

    # -- counting -----------------------------------------------------------------------------------

    def count(self, messages: List[Dict[str, Any]], plan: ToolPlan, *, add_generation_prompt: bool = True) -> int:
        return self._tokenize({"messages": messages, "add_generation_prompt": add_generation_prompt,
                               **plan.as_request()})

    def count_text(self, text: str) -> int:
        return self._tokenize({"prompt": text, "add_special_tokens": True})

    def _tokenize(self, body: Dict[str, Any]) -> int:
        status, answer = self._post("/tokenize", {"model": self.name, **body})
        if status != 200:
            raise _error(status, answer)
        return int(json.loads(answer)["count"])

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, request: Request, cancel: threading.Event,
                 done: Callable[[Outcome], None]) -> Iterator[str]:
        body: Dict[str, Any] = {"model": self.name, "max_tokens": request.max_new_tokens,
                                "stream_options": {"include_usage": True}, **request.options.as_request()}
        if request.messages is None:
            path, body["prompt"] = "/v1/completions", request.prompt
        else:
            path, body["messages"] = "/v1/chat/completions", request.messages
            body.update(request.plan.as_request())
            if request.response_format is not None:
                body["response_format"] = request.response_format.as_request()
        parts: List[str] = []
        calls: List[ToolCall] = []
        usage: Dict[str, int] = {}
        finish, ticks = "stop", []
        start = time.perf_counter()
        events = self._stream(path, body)
        try:
            for event in events:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {"content": choice.get("text")}
                    for call in delta.get("tool_calls") or []:
                        function = call.get("function") or {}
                        calls.append(ToolCall(function.get("name", ""), json.loads(function.get("arguments") or "{}"),
                                              call.get("id", "")))
                    finish = choice.get("finish_reason") or finish
                    text = delta.get("content")
                    if text:
                        ticks.append(time.perf_counter())
                        parts.append(text)
                        yield text
        finally:
            events.close()
            if cancel.is_set() and finish != "cancelled":
                finish = "cancelled"
            generated = usage.get("completion_tokens", len(ticks))
            decode_s = ticks[-1] - ticks[0] if len(ticks) > 1 else 0.0
            done(Outcome("".join(parts), tuple(calls),
                         finish if finish in ("cancelled", "length") else "stop",
                         prompt_tokens=usage.get("prompt_tokens", 0), generated_tokens=generated,
                         ttft_s=(ticks[0] - start) if ticks else 0.0,
                         decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 else 0.0,
                         generate_s=time.perf_counter() - start))

    # -- HTTP ---------------------------------------------------------------------------------------

    def _connection(self) -> HTTPConnection:
        from urllib.parse import urlparse

        parsed = urlparse(self.info.url)
        return HTTPConnection(parsed.hostname, parsed.port, timeout=_TIMEOUT_S)

    def _headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _unreachable(self, e: Exception) -> OvchatError:
        return GenerationError(f"the ovchat server at {self.info.url} did not answer ({e}); run with --no-server "
                               "to load the model here")

    def _post(self, path: str, body: Dict[str, Any]) -> "tuple[int, bytes]":
        conn = self._connection()
        try:
            conn.request("POST", path, body=json.dumps(body), headers=self._headers())
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, HTTPException) as e:
            raise self._unreachable(e) from None
        finally:
            conn.close()

    def _stream(self, path: str, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """POST ``body`` (with ``stream`` true) and yield each event. Closing the iterator closes
        the connection, which cancels the request on the server."""
        conn = self._connection()
        try:
            try:
                conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers=self._headers())
                response = conn.getresponse()
            except (OSError, HTTPException) as e:
                raise self._unreachable(e) from None
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
                    raise GenerationError(f"the ovchat server stopped the reply: {event['error'].get('message')}")
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
    return GenerationError(f"the ovchat server answered {status}: {message}; run with --no-server to load the "
                           "model here")
