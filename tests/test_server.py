"""`ovchat serve`: the real server in a subprocess on a free loopback port, the real demo model, and
the official openai client. One server (8 slots, an API key) serves most tests; a second one with a
single slot and no queue shows that a client leaving mid-stream frees its slot."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from conftest import OvchatProcess

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
# A raw prompt the demo model continues until it is stopped (no end-of-sequence in sight).
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


class Server:
    def __init__(self, proc: OvchatProcess, url: str, model: str, health_at_start: int):
        self.proc, self.url, self.model, self.health_at_start = proc, url, model, health_at_start

    def client(self, key: str = KEY, **kw) -> "openai.OpenAI":
        # No retries: a 429 or 5xx must show up as it is, not be retried away.
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def post(self, path: str, body=None, *, content=None, key: str = KEY, **kw) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx2.post(self.url + path, json=body, content=content, headers=headers, timeout=120, **kw)

    def log(self) -> str:
        self.proc._drain()
        return self.proc.stderr_text


def start_server(model, *args: str) -> Server:
    proc = OvchatProcess("serve", "-m", str(model), "--device", "CPU", "--port", "0", *args)
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
            return Server(proc, url, model.name, first)
        assert status == 503, status
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server never became ready:\n{proc.stderr_text}")


@pytest.fixture(scope="module")
def server(demo_model):
    s = start_server(demo_model, "--api-key", KEY, "--max-concurrency", "8")
    yield s
    s.proc.kill()


def assert_error(response: httpx2.Response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- the happy paths ----------------------------------------------------------------------------

@pytest.mark.slow
def test_health_and_models(server):
    assert server.health_at_start in (503, 200)  # 503 while loading, if the first poll came early
    health = httpx2.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == server.model
    assert [m.id for m in server.client().models.list()] == [server.model]
    assert server.client().models.retrieve(server.model).id == server.model


@pytest.mark.slow
def test_streamed_chat_equals_non_streamed_under_greedy(server):
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=STORY, max_tokens=40)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 40
    assert whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 40

    chunks = list(client.chat.completions.create(model=server.model, messages=STORY, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    answer = client.chat.completions.create(model=server.model, messages=QUESTION)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_stop_strings_and_both_spellings_of_max_tokens(server):
    client = server.client()
    cut = client.chat.completions.create(model=server.model, messages=QUESTION, stop=["Paris"])
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    assert "capital" in cut.choices[0].message.content
    streamed = client.chat.completions.create(model=server.model, messages=QUESTION, stop="Paris", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    short = client.chat.completions.create(model=server.model, messages=QUESTION, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_completions_streamed_and_not(server):
    client = server.client()
    whole = client.completions.create(model=server.model, prompt=ENDLESS, max_tokens=12)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.choices[0].text.lstrip().startswith("11")
    streamed = client.completions.create(model=server.model, prompt=ENDLESS, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


@pytest.mark.slow
def test_eight_clients_at_once_all_get_paris(server):
    def ask(_):
        client = server.client()
        reply = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=30)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all("Paris" in a for a in answers), answers


@pytest.mark.slow
def test_concurrent_streams_are_batched_not_queued(server):
    """Behind a lock, stream k's first token would come after stream k-1 ended; batched, every
    stream has started before any has finished."""
    first, last = [], []
    barrier = threading.Barrier(4)

    def stream(_):
        barrier.wait()
        started = None
        for chunk in server.client().chat.completions.create(model=server.model, messages=STORY, max_tokens=40,
                                                               stream=True):
            if chunk.choices and chunk.choices[0].delta.content and started is None:
                started = time.monotonic()
        first.append(started)
        last.append(time.monotonic())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(stream, range(4)))
    assert max(first) < min(last)


# -- refusals ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_bad_request_gets_its_status_and_error_shape(server):
    chat = "/v1/chat/completions"
    ok = {"model": server.model, "messages": QUESTION}
    cases = [
        (chat, {"content": b"{not json"}, 400, None, "invalid_json"),
        (chat, {"content": b"\xff\xfe"}, 400, None, "invalid_json"),
        (chat, {"body": [1, 2]}, 400, None, None),
        (chat, {"body": {"messages": QUESTION}}, 400, "model", None),
        (chat, {"body": {**ok, "model": "gpt-4o"}}, 400, "model", "model_not_found"),
        (chat, {"body": {"model": server.model}}, 400, "messages", None),
        (chat, {"body": {**ok, "messages": "hi"}}, 400, "messages", None),
        (chat, {"body": {**ok, "messages": [{"role": "tool", "content": "x"}]}}, 400, "messages[0].role", None),
        (chat, {"body": {**ok, "messages": [{"role": "user", "content": 5}]}}, 400, "messages[0].content", None),
        (chat, {"body": {**ok, "n": 2}}, 400, "n", None),
        (chat, {"body": {**ok, "temperature": -1}}, 400, "temperature", None),
        (chat, {"body": {**ok, "temperature": "hot"}}, 400, "temperature", None),
        (chat, {"body": {**ok, "top_p": 1.5}}, 400, "top_p", None),
        (chat, {"body": {**ok, "max_tokens": 0}}, 400, "max_tokens", None),
        (chat, {"body": {**ok, "max_completion_tokens": "10"}}, 400, "max_completion_tokens", None),
        (chat, {"body": {**ok, "seed": -1}}, 400, "seed", None),
        (chat, {"body": {**ok, "temperature": 1, "top_k": 2**64}}, 400, "top_k", None),  # past GenAI's integers
        (chat, {"content": json.dumps({**ok, "temperature": float("nan")}).encode()}, 400, "temperature", None),
        (chat, {"body": {**ok, "stop": 5}}, 400, "stop", None),
        (chat, {"body": {**ok, "stream": "yes"}}, 400, "stream", None),
        (chat, {"body": {**ok, "stream_options": {"include_usage": True}}}, 400, "stream_options", None),
        (chat, {"body": {**ok, "presence_penalty": 3}}, 400, "presence_penalty", None),
        (chat, {"body": {**ok, "messages": [{"role": "user", "content": "hello " * 9000}]}}, 400, "messages",
         "context_length_exceeded"),
        (chat, {"content": b'{"model": "' + b"x" * (1024 * 1024 + 10) + b'"}'}, 413, None, "request_too_large"),
        ("/v1/completions", {"body": {"model": server.model}}, 400, "prompt", None),
        ("/v1/completions", {"body": {"model": server.model, "prompt": ["a", "b"]}}, 400, "prompt", None),
        ("/v1/completions", {"body": {"model": server.model, "prompt": "a", "echo": True}}, 400, "echo", None),
        ("/v1/nowhere", {"body": ok}, 404, None, "not_found"),
    ]
    for path, kw, status, param, code in cases:
        response = server.post(path, kw.get("body"), content=kw.get("content"))
        try:
            assert_error(response, status, param=param, code=code)
        except AssertionError as e:
            raise AssertionError(f"{path} {str(kw)[:120]}: {e}") from None
    assert_error(httpx2.get(server.url + chat, headers={"Authorization": f"Bearer {KEY}"}), 405)
    # The openai client sees the same refusals as its own exception types.
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(model=server.model, messages=QUESTION, n=3)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "n"
    # and the server is unharmed
    assert server.post(chat, ok).status_code == 200
    assert " 500 " not in server.log()


@pytest.mark.slow
def test_api_key_is_required_everywhere_but_health(server):
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 2}
    assert_error(server.post("/v1/chat/completions", body, key=None), 401, code="invalid_api_key")
    assert_error(server.post("/v1/chat/completions", body, key=KEY + "x"), 401, code="invalid_api_key")
    assert_error(httpx2.get(server.url + "/v1/models"), 401)
    assert_error(httpx2.get(server.url + "/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
    assert httpx2.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.post("/v1/chat/completions", body).status_code == 200


@pytest.mark.slow
def test_one_log_line_per_request_with_tokens(server):
    server.post("/v1/completions", {"model": server.model, "prompt": ENDLESS, "max_tokens": 5})
    server.post("/v1/chat/completions", {"model": server.model})
    deadline = time.monotonic() + 5
    while "POST /v1/chat/completions 400 tokens=" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"POST /v1/completions 200 tokens=\d+\+5 \d+\.\d+s", server.log())
    assert re.search(r"POST /v1/chat/completions 400 tokens=- ", server.log())


# -- limits --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_client_leaving_mid_stream_frees_its_slot(demo_model):
    """One slot, no queue: while a stream runs a second request gets 429; once its client leaves,
    the endless generation is cancelled and the next request is served at once."""
    single = start_server(demo_model, "--max-concurrency", "1", "--max-queue", "0")
    try:
        endless = {"model": single.model, "prompt": ENDLESS, "max_tokens": 4000, "stream": True}
        with httpx2.stream("POST", single.url + "/v1/completions", json=endless, timeout=60) as response:
            assert response.status_code == 200
            # Leaving iter_lines() early would close the connection: read on while the slot is asked for.
            lines = response.iter_lines()
            events = [json.loads(line[6:]) for line in itertools.islice(lines, 10) if line.startswith("data: {")]
            assert events and all(e["choices"][0]["finish_reason"] is None for e in events)
            busy = single.post("/v1/completions", {"model": single.model, "prompt": "Hi", "max_tokens": 2}, key=None)
            assert_error(busy, 429, code="server_busy")
            assert busy.headers["retry-after"] == "1"
            assert next(lines) is not None  # still streaming
        left = time.monotonic()  # the connection is closed here, mid-stream
        while True:
            served = single.post("/v1/completions", {"model": single.model, "prompt": "Hi", "max_tokens": 2}, key=None)
            if served.status_code != 429 or time.monotonic() - left > 10:
                break
            time.sleep(0.05)
        assert served.status_code == 200, served.text
        assert time.monotonic() - left < 10  # 4,000 tokens would take far longer than that
        log = single.log()
        line = re.search(r"POST /v1/completions 200 tokens=\d+\+(\d+) .*\(client left mid-stream\)", log)
        assert line and int(line.group(1)) < 4000, log
    finally:
        single.proc.kill()


@pytest.mark.slow
def test_a_model_that_cannot_load_stops_the_server_with_one_line(demo_model, tmp_path):
    import shutil

    from conftest import run_ovchat

    broken = tmp_path / "broken"
    shutil.copytree(demo_model, broken, ignore=shutil.ignore_patterns("ovchat.json"))
    (broken / "openvino_model.xml").write_text("<not a model")
    done = run_ovchat("serve", "-m", str(broken), "--port", "0", "--device", "CPU", timeout=120)
    assert done.returncode == 1
    assert done.stderr.decode().rstrip().splitlines()[-1].startswith("Error: could not load")
    assert b"Traceback" not in done.stderr


def test_health_is_503_and_generation_refused_until_the_model_is_loaded(tmp_path):
    """In-process, with a backend that is never loaded (the app's lifespan does not run here)."""
    from starlette.testclient import TestClient

    from ovchat.devices import DeviceChoice
    from ovchat.server.app import create_app
    from ovchat.server.backend import Backend

    backend = Backend(tmp_path, DeviceChoice("CPU", "test", False), context_limit=64, max_running=1,
                      kv_cache_gb=1)
    client = TestClient(create_app(backend, "m"))
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert health.headers["retry-after"]
    refused = client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION})
    assert_error(refused, 503, code="model_not_ready")
    assert refused.headers["retry-after"]
    backend.error = "could not load m on CPU: broken"
    assert client.get("/health").json() == {"status": "error", "error": backend.error}
    assert_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"}), 503, code="model_not_ready")


def test_incremental_text_adds_up_to_a_whole_decode(demo_model):
    """Pieces cut anywhere (inside multi-byte characters, between spaces) join into the whole decode."""
    import random

    import openvino_genai

    from ovchat.server.backend import IncrementalText

    tokenizer = openvino_genai.Tokenizer(str(demo_model))
    rnd = random.Random(0)
    for text in ["In the café, naïve résumés 😀🐉 こんにちは世界 －－ don't  double  spaces\n\n\ttabs end.",
                 "Hello world! It's 3.14 and   🎉🎉"]:
        ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]
        whole = tokenizer.decode(ids)
        for _ in range(10):
            pieces, at = IncrementalText(tokenizer.decode), 0
            out = ""
            while at < len(ids):
                step = rnd.randint(1, 3)
                pieces.add(ids[at:at + step])
                at += step
                piece = pieces.take()
                assert "\ufffd" not in piece
                out += piece
            assert out + pieces.take(final=True) == whole


def test_the_serve_extra_is_a_small_stack():
    from importlib.metadata import requires

    from test_cli_run import _installed_closure

    serve = _installed_closure(r.split(";")[0] for r in requires("ovchat")
                               if "extra ==" not in r or 'extra == "serve"' in r)
    assert {"starlette", "uvicorn"} <= serve
    assert not serve & {"torch", "transformers", "nncf", "fastapi", "pydantic", "uvloop", "httptools"}


def test_admission_queues_refuses_and_never_leaks_a_slot():
    import asyncio

    from ovchat.errors import APIError
    from ovchat.server.app import Admission

    async def scenario():
        admission = Admission(running=1, waiting=1)
        first = await admission.acquire()
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        with pytest.raises(APIError) as refused:
            await admission.acquire()
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        # The waiter gives up in the same instant the slot is handed to it: the slot passes on.
        waiter.cancel()
        first.release()
        first.release()  # a second release is a no-op
        await asyncio.sleep(0)
        assert waiter.cancelled() and admission.busy == 0
        # A waiter cancelled before the release is skipped, and the slot goes to the next one.
        holder = await admission.acquire()
        quitter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        quitter.cancel()
        await asyncio.sleep(0)
        patient = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        holder.release()
        (await patient).release()
        assert admission.busy == 0
        # Handed the slot first, then cancelled before it could run: it passes the slot on.
        holder = await admission.acquire()
        late = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        holder.release()
        late.cancel()
        await asyncio.sleep(0)
        assert late.cancelled() and admission.busy == 0

    asyncio.run(scenario())
