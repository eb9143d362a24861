"""A real `ovchat serve` in a subprocess on a free loopback port, for the tests that need one."""

from __future__ import annotations

import re
import time

import httpx2

from conftest import OvchatProcess

KEY = "test-key-0123456789"


class Server:
    def __init__(self, proc: OvchatProcess, url: str, model: str, health_at_start: int):
        self.proc, self.url, self.model, self.health_at_start = proc, url, model, health_at_start

    def client(self, key: str = KEY, **kw):
        import openai

        # No retries: a 429 or 5xx must show up as it is, not be retried away.
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def post(self, path: str, body=None, *, content=None, key: str = KEY, headers=None, **kw) -> httpx2.Response:
        sent = {"Authorization": f"Bearer {key}"} if key else {}
        if content is not None:
            sent["Content-Type"] = "application/json"  # as every client sends JSON
        sent.update(headers or {})
        return httpx2.post(self.url + path, json=body, content=content, headers=sent, timeout=120, **kw)

    def log(self) -> str:
        self.proc._drain()
        return self.proc.stderr_text


def in_process_app(model_dir, name: str = "m", **settings):
    """The server's app over one -m model at ``model_dir``, for Starlette's TestClient. Used without
    ``with``, the app's lifespan does not run: the model is not started until a request needs it."""
    from pathlib import Path

    from ovchat.server.app import ServerSettings, create_app
    from ovchat.server.engine import EngineSpec
    from ovchat.server.models import ModelPool, ModelSource, PoolSettings

    pool = ModelPool(PoolSettings(max_memory=8 << 30, max_loaded=2, keep_alive_s=None, max_concurrency=1, max_queue=4,
                                  engine_spec=lambda path, kind: EngineSpec(Path(path), "CPU", {}, max_running=1,
                                                                            kv_cache_gb=0, kind=kind),
                                  context_limit=64), [ModelSource(name, Path(model_dir), pinned=True)])
    return create_app(pool, ServerSettings(**settings))


def start_server(model, *args: str) -> Server:
    """``ovchat serve -m MODEL ARGS``, or with MODEL None the store alone (nothing loaded at start)."""
    proc = OvchatProcess("serve", *(["-m", str(model)] if model is not None else []), "--device", "CPU", "--port", "0",
                         *args)
    proc.wait_for("listening on http://", stream="stderr", timeout=120)
    url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", proc.stderr_text).group(1)
    first = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = httpx2.get(url + "/health", timeout=5).status_code
        except httpx2.TransportError:  # uvicorn not accepting yet
            time.sleep(0.05)
            continue
        first = first or status
        if status == 200:
            return Server(proc, url, model.name if model is not None else None, first)
        assert status == 503, status
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server never became ready:\n{proc.stderr_text}")
