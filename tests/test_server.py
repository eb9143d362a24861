"""`ovchat serve`: the real server in a subprocess on a free loopback port, the real demo model, and
the official openai client. One server (8 slots, an API key) serves most tests; a second one with a
single slot and no queue shows that a client leaving mid-stream frees its slot."""

from __future__ import annotations

import itertools
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from server_helpers import KEY, start_server

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
# A raw prompt the demo model continues until it is stopped (no end-of-sequence in sight).
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


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
    assert server.model in [m.id for m in server.client().models.list()]  # with the rest of the store
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
        (chat, {"body": {**ok, "messages": [{"role": "robot", "content": "x"}]}}, 400, "messages[0].role", None),
        (chat, {"body": {**ok, "messages": [{"role": "tool", "content": "x"}]}}, 400, "messages[0].tool_call_id", None),
        (chat, {"body": {**ok, "messages": [{"role": "user", "content": 5}]}}, 400, "messages[0].content", None),
        (chat, {"body": {**ok, "n": 2}}, 400, "n", None),  # greedy choices would all be the same
        (chat, {"body": {**ok, "n": 9, "temperature": 1}}, 400, "n", None),
        (chat, {"body": {**ok, "logprobs": True, "top_logprobs": 2}}, 400, "top_logprobs", "unsupported_parameter"),
        (chat, {"body": {**ok, "response_format": {"type": "xml"}}}, 400, "response_format", None),
        (chat, {"body": {**ok, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}}, 400,
         "tools[0].function.name", None),
        (chat, {"body": {**ok, "tool_choice": "required"}}, 400, "tool_choice", None),
        (chat, {"body": {**ok, "stop": ["x"] * 17}}, 400, "stop", None),
        (chat, {"content": json.dumps({**ok, "stop": ["\ud800"]}).encode()},  # a lone surrogate, escaped
         400, "stop[0]", "invalid_string"),
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
        (chat, {"body": {**ok, "num_assistant_tokens": 4}}, 400, "num_assistant_tokens", None),  # no lever
        (chat, {"body": {**ok, "messages": [{"role": "user", "content": "hello " * 9000}]}}, 400, "messages",
         "context_length_exceeded"),
        (chat, {"content": b'{"model": "' + b"x" * (1024 * 1024 + 10) + b'"}'}, 413, None, "request_too_large"),
        ("/v1/completions", {"body": {"model": server.model}}, 400, "prompt", None),
        ("/v1/completions", {"body": {"model": server.model, "prompt": ["a", "b"]}}, 400, "prompt", None),
        ("/v1/completions", {"body": {"model": server.model, "prompt": "a", "echo": True}}, 400, "echo", None),
        ("/v1/completions", {"content": b'{"model": "' + server.model.encode() + b'", "prompt": "\\udfff"}'}, 400,
         "prompt", "invalid_string"),
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


def test_health_is_503_until_the_model_is_loaded_and_a_model_that_cannot_load_says_why(tmp_path):
    """In-process, with a -m model that cannot load (an empty directory). The app's lifespan does
    not run here, so /health first sees the model not yet started."""
    from starlette.testclient import TestClient

    from server_helpers import in_process_app

    (tmp_path / "m").mkdir()
    client = TestClient(in_process_app(tmp_path / "m"))
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert health.headers["retry-after"]
    refused = client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION})
    error = assert_error(refused, 503, code="failed")
    assert error["message"].startswith("could not load ") and "\n" not in error["message"]
    failed = client.get("/health").json()
    assert failed["status"] == "error" and failed["error"] == error["message"]
    assert_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"}), 503, code="failed")
    assert_error(client.post("/v1/completions", json={"model": "other", "prompt": "x"}), 400, code="model_not_found")


def test_incremental_text_adds_up_to_a_whole_decode(demo_model):
    """Pieces cut anywhere (inside multi-byte characters, between spaces) join into the whole decode."""
    import random

    import openvino_genai

    from ovchat.server.responses import IncrementalText

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

    from ovchat.errors import ServerBusyError
    from ovchat.server.admission import Admission
    from ovchat.server.http import to_api_error

    async def scenario():
        admission = Admission(running=1, waiting=1)
        first = await admission.acquire()
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        with pytest.raises(ServerBusyError) as refused:
            await admission.acquire()
        answer = to_api_error(refused.value)
        assert answer.status == 429 and answer.headers == {"Retry-After": "1"}
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
        # Shutting down: a waiter is refused at once, and so is every newcomer.
        holder = await admission.acquire()
        waiting = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        assert admission.close() == 1
        with pytest.raises(EngineUnavailableError):
            await waiting
        with pytest.raises(EngineUnavailableError):
            await admission.acquire()
        holder.release()

    from ovchat.errors import EngineUnavailableError

    asyncio.run(scenario())


# -- structured output, tools, logprobs, n -----------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
LIGHTS = {"type": "function", "function": {
    "name": "set_light", "description": "Turn a light on or off.",
    "parameters": {"type": "object", "properties": {
        "room": {"type": "string", "enum": ["porch", "kitchen", "bedroom"]}, "on": {"type": "boolean"}},
        "required": ["room", "on"], "additionalProperties": False}}}
# A Hermes-style template (as Qwen 2.5's), which shows the model its tools and their calls.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these functions. Answer with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> to call one.\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def _valid_arguments(arguments: str, tool: dict) -> dict:
    """The arguments as JSON, checked against the function's (small) parameter schema."""
    value = json.loads(arguments)
    schema = tool["function"]["parameters"]
    assert set(value) == set(schema["required"]), value
    for name, spec in schema["properties"].items():
        kind = {"string": str, "boolean": bool}[spec["type"]]
        assert isinstance(value[name], kind), value
        assert "enum" not in spec or value[name] in spec["enum"], value
        assert "maxLength" not in spec or len(value[name]) <= spec["maxLength"], value
    return value


@pytest.fixture(scope="module")
def tools_model(demo_model, tmp_path_factory):
    """The demo model with a chat template that renders tools (the demo's own has no place for them)."""
    import shutil

    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops)

    path = tmp_path_factory.mktemp("tools") / "smol-tools"
    shutil.copytree(demo_model, path, ignore=shutil.ignore_patterns("ovchat.json"))
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        model = ov.Core().read_model(path / name)
        model.set_rt_info(TOOLS_TEMPLATE, "chat_template")
        ov.save_model(model, path / f"new-{name}")
        (path / f"new-{name}").replace(path / name)
        (path / f"new-{name}".replace(".xml", ".bin")).replace(path / name.replace(".xml", ".bin"))
    return path


@pytest.fixture(scope="module")
def tools_server(tools_model):
    s = start_server(tools_model, "--max-concurrency", "4")
    yield s
    s.proc.kill()


@pytest.mark.slow
def test_json_schema_reply_validates_and_json_object_is_an_object(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "country", "capital"], "additionalProperties": False}
    reply = server.client().chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"city", "country", "capital"} and isinstance(value["capital"], bool)
    assert all(isinstance(value[k], str) and len(value[k]) <= 30 for k in ("city", "country"))
    whole = server.client().chat.completions.create(model=server.model, messages=QUESTION, max_tokens=60,
                                                    response_format={"type": "json_object"})
    assert whole.choices[0].finish_reason == "length" or isinstance(json.loads(whole.choices[0].message.content), dict)


BAD_SCHEMAS = [{"type": "strnig"}, {"type": 5}, {"type": "integer", "minimum": 5, "maximum": 1},
               {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
               {"type": "string", "pattern": "(["},
               {"type": "array", "minItems": 3, "maxItems": 1}, {"type": "object", "properties": []}]


@pytest.mark.slow
def test_a_bad_schema_is_its_own_400_and_streams_beside_it_finish(server):
    """A schema GenAI's grammar compiler rejects used to fail the engine's whole step (a 503 to
    its sender, and every stream batched with it cut off): now it is refused when parsed."""
    body = {"model": server.model, "messages": [{"role": "user", "content": "Count from 1 to 40."}],
            "max_tokens": 60, "stream": True}
    with httpx2.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {KEY}"}) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        import ollama
        import openai

        chat = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
        for schema in BAD_SCHEMAS:
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            assert_error(server.post("/v1/chat/completions", {"model": server.model, "messages": QUESTION,
                                                              "response_format": fmt}),
                         400, param="response_format.json_schema.schema")
            # The official clients see the 400 as theirs (the openai client would otherwise retry a 503).
            with pytest.raises(openai.BadRequestError):
                server.client().chat.completions.create(model=server.model, messages=QUESTION, response_format=fmt)
            with pytest.raises(ollama.ResponseError) as refused:
                chat.chat(model=server.model, messages=QUESTION, format=schema)
            assert refused.value.status_code == 400 and "not a usable JSON schema" in str(refused.value)
            tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                  "properties": {"x": schema}}}}
            assert_error(server.post("/v1/chat/completions", {"model": server.model, "messages": QUESTION,
                                                              "tools": [tool], "tool_choice": "required"}),
                         400, param="tools[0].function.parameters")
            raw = server.post("/api/chat", {"model": server.model, "messages": QUESTION, "format": schema,
                                            "stream": False})
            assert raw.status_code == 400 and "not a usable JSON schema" in raw.json()["error"]
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), events[-1]
    assert not any("error" in e for e in events)


def test_small_protocol_points(demo_model, server):
    """The CORS preflight allows what the openai SDKs send; JSON nested 3,000 deep is called
    that, not invalid; a request target in absolute form is routed by its path."""
    import socket

    from starlette.testclient import TestClient

    from server_helpers import in_process_app

    client = TestClient(in_process_app(demo_model, cors_origins=["http://app.lan"]))
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://app.lan", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-headers"] == asked
    odd = client.options("/v1/chat/completions", headers={"Origin": "http://app.lan",
                                                         "Access-Control-Request-Headers": "x\r\ny: z"})
    assert odd.headers["access-control-allow-headers"] == "Authorization, Content-Type"
    deep = client.post("/v1/chat/completions", content="[" * 3000 + "]" * 3000,
                       headers={"Content-Type": "application/json"})
    assert_error(deep, 400, code="invalid_json")
    assert "nested too deeply" in deep.json()["error"]["message"]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {server.url}/health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # the authority is the host checked
        s.sendall(f"GET http://evil.example.com/health HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Connection: close\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 403")


def test_a_reply_cut_inside_a_character_and_parallel_tool_calls_false():
    """A byte-level tokenizer's tokens (bytes, as GPT-2's are) cut by max_tokens inside a
    character: the cut half is dropped, not shown as U+FFFD. With parallel_tool_calls false a
    reply that makes two calls returns the first."""
    from ovchat.server.responses import Choice, IncrementalText
    from ovchat.toolcalls import Tool, ToolPlan

    pieces = [b"caf", b"\xc3", b"\xa9 ", b"\xe2\x82"]  # "café " and two bytes of "€"

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    text = IncrementalText(decode)
    out = ""
    for i in range(len(pieces)):
        text.add([i])
        out += text.take(final=i == len(pieces) - 1)
    assert out == "café "
    tool = Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})
    reply = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    template = "{% if tools %}<tools></tools>{% endif %}<tool_call>"
    for parallel, cities in ((True, ["Paris", "Rome"]), (False, ["Paris"])):
        choice = Choice(0, lambda ids: reply if ids else "", ToolPlan((tool,), "auto", parallel=parallel), template)
        delta = choice.add([1], [], "stop")
        assert [json.loads(c["function"]["arguments"])["city"] for c in delta["tool_calls"]] == cities


@pytest.mark.slow
def test_unseeded_sampling_differs_and_a_seed_repeats(server):
    """'Regenerate' must regenerate: GenAI's default seed is a constant, so without a seed of its
    own every sampled reply was the same."""
    ask = {"model": server.model, "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
           "max_tokens": 24, "temperature": 1.0}
    replies = [server.client().chat.completions.create(**ask).choices[0].message.content for _ in range(3)]
    assert len(set(replies)) >= 2, replies
    seeded = [server.client().chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_metrics_series_stay_bounded_under_random_paths(server):
    import random
    import string

    for _ in range(300):
        path = "/" + "".join(random.choices(string.ascii_lowercase, k=12))
        assert httpx2.get(server.url + path, timeout=30).status_code == 401  # no key: refused, and counted
    text = httpx2.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    endpoints = set(re.findall(r'ovchat_requests_total\{endpoint="([^"]*)"', text))
    assert "other" in endpoints and len(endpoints) < 40, endpoints


def test_valid_schemas_pass_the_check():
    from ovchat.schemacheck import check_schema

    for schema in [True, {}, {"type": ["string", "null"]}, {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                   {"$defs": {"p": {"type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}}},
                    "anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]},
                   {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "format": "date"},
                   {"type": "array", "items": {"enum": ["a", 1, None]}, "minItems": 1, "maxItems": 1},
                   {"type": "object", "patternProperties": {"^x-": {}}, "additionalProperties": False,
                    "properties": {"type": {"type": "string"}}, "required": ["type"]}]:
        check_schema(schema, "s")


@pytest.mark.slow
def test_named_and_required_tool_calls_plain_and_streamed(server):
    """The demo's template has no place for tools, yet forced calls work: a grammar makes them."""
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
    named = client.chat.completions.create(model=server.model, messages=ask, tools=[WEATHER, LIGHTS], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _valid_arguments(call.function.arguments, WEATHER)

    lights = [{"role": "user", "content": "Turn on the porch light."}]
    required = client.chat.completions.create(model=server.model, messages=lights, tools=[WEATHER, LIGHTS],
                                              tool_choice="required", max_tokens=80)
    call = required.choices[0].message.tool_calls[0]
    assert required.choices[0].finish_reason == "tool_calls"
    _valid_arguments(call.function.arguments, WEATHER if call.function.name == "get_weather" else LIGHTS)

    chunks = list(client.chat.completions.create(model=server.model, messages=ask, tools=[WEATHER], stream=True,
                                                 tool_choice="required", max_tokens=80))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    arguments = "".join(d.function.arguments or "" for d in deltas)
    _valid_arguments(arguments, WEATHER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    refused = server.post("/v1/chat/completions", {"model": server.model, "messages": ask, "tools": [WEATHER]})
    assert_error(refused, 400, param="tool_choice", code="tools_not_supported")


@pytest.mark.slow
def test_a_tool_round_trip_call_result_answer(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
    first = client.chat.completions.create(model=server.model, messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model=server.model, messages=messages, max_tokens=40)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.slow
def test_auto_tools_through_a_template_that_renders_them(tools_server):
    client = tools_server.client()
    ask = [{"role": "user", "content": "Turn on the porch light."}]
    plain = client.chat.completions.create(model=tools_server.model, messages=ask, max_tokens=30)
    offered = client.chat.completions.create(model=tools_server.model, messages=ask, tools=[LIGHTS, WEATHER],
                                             max_tokens=60)
    # The template rendered the tools: the prompt grew by their descriptions.
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 60
    choice = offered.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            _valid_arguments(call.function.arguments, LIGHTS if call.function.name == "set_light" else WEATHER)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content is not None
    # A call written in the template's format comes back as a call, in the round trip's history too.
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "set_light", "arguments": '{"room": "porch", "on": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    after = client.chat.completions.create(model=tools_server.model, messages=history, tools=[LIGHTS], max_tokens=20)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
def test_logprobs_of_the_chosen_tokens_and_n_choices(server):
    client = server.client()
    reply = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=12, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and 0 < len(content) <= 12
    assert all(c.logprob <= 0 and c.top_logprobs == [] for c in content)
    assert "".join(c.token for c in content).strip() == reply.choices[0].message.content.strip()
    text = client.completions.create(model=server.model, prompt=ENDLESS, max_tokens=6, logprobs=0)
    assert len(text.choices[0].logprobs.token_logprobs) == 6

    two = client.chat.completions.create(model=server.model, messages=STORY, max_tokens=16, n=2, temperature=1.0,
                                         seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 32 and all(c.message.content for c in two.choices)
    chunks = list(client.chat.completions.create(model=server.model, messages=STORY, max_tokens=8, n=2,
                                                 temperature=1.0, stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


# -- the HTTP edge -------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.client().chat.completions.create(model=server.model, messages=QUESTION, max_tokens=4)
    families = {f.name: f for f in text_string_to_metric_families(httpx2.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text)}
    ok = [s for s in families["ovchat_requests"].samples
          if s.name == "ovchat_requests_total" and s.labels["status"] == "200"]
    assert ok and sum(s.value for s in ok) >= 1
    assert next(s for s in families["ovchat_generation_tokens"].samples).value >= 4
    ttft = families["ovchat_time_to_first_token_seconds"]
    assert next(s.value for s in ttft.samples if s.name.endswith("_count")) >= 1
    for gauge in ("ovchat_requests_running", "ovchat_requests_waiting", "ovchat_kv_cache_usage_ratio"):
        assert families[gauge].samples[0].value >= 0
    assert httpx2.get(server.url + "/metrics").status_code == 401  # behind the key, as the API


@pytest.mark.slow
def test_health_answers_at_once_while_a_long_prompt_is_prefilled(server):
    """The engine is a process of its own: a long prefill cannot hold the HTTP side's GIL, so
    /health keeps answering while it runs. Checked by order, not by time: if /health waited for
    the prefill, at most one answer could come back before the prefill's own response; here
    several must. Each attempt's prompt is new (the prefix cache must not shorten it), and up to
    three are made, as a starved machine can stall the test's own client for a while."""
    import uuid

    answered = []
    for attempt in range(3):
        long_prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 600  # ~6,000 tokens
        done = threading.Event()

        def prefill():
            server.post("/v1/completions", {"model": server.model, "prompt": long_prompt, "max_tokens": 2})
            done.set()

        worker = threading.Thread(target=prefill)
        worker.start()
        time.sleep(0.3)
        during = 0
        while not done.is_set() and during < 50:
            assert httpx2.get(server.url + "/health", timeout=30).status_code == 200
            during += 0 if done.is_set() else 1  # answered before the prefill's response came
            time.sleep(0.02)
        worker.join()
        answered.append(during)
        if during >= 3:
            break
    assert max(answered) >= 3, answered


@pytest.mark.slow
def test_fifty_thousand_stop_strings_are_refused_at_once(server):
    start = time.perf_counter()
    refused = server.post("/v1/chat/completions", {"model": server.model, "messages": QUESTION,
                                                   "stop": [f"s{i}" for i in range(50_000)]})
    assert_error(refused, 400, param="stop")
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_foreign_host_and_non_json_bodies_are_refused(server):
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 2}
    for host in ("evil.example.com", "127.0.0.1.nip.io", "attacker:8000"):
        assert_error(server.post("/v1/chat/completions", body, headers={"Host": host}), 403, code="host_not_allowed")
    for host in ("localhost", "127.0.0.1", "[::1]:8000", "localhost:1234"):
        assert server.post("/v1/chat/completions", body, headers={"Host": host}).status_code == 200, host
    plain = server.post("/v1/chat/completions", content=json.dumps(body).encode(), headers={"Content-Type": "text/plain"})
    assert_error(plain, 415, code="unsupported_media_type")
    assert "access-control-allow-origin" not in plain.headers  # CORS is off unless asked for


@pytest.mark.slow
def test_half_sent_requests_are_closed_and_others_are_served(server):
    """200 connections that send half a request line, one that declares a body and sends none,
    and one that declares 100 MB: the server keeps answering, closes the half-sent ones after
    the header deadline (10 s), answers the silent body with 408 after 30 s and the large one
    with 413 at once."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")

    def connect(data: bytes) -> socket.socket:
        s = socket.create_connection((host, int(port)), timeout=60)
        s.sendall(data)
        return s

    started = time.monotonic()
    half = [connect(b"GET /health HTTP/1.1\r\nHo") for _ in range(200)]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n")
    silent = connect(head.format(1000).encode())
    huge = connect(head.format(104857600).encode())
    try:
        assert httpx2.get(server.url + "/health", timeout=5).status_code == 200
        assert b" 413 " in huge.recv(4096).split(b"\r\n")[0] + b" "
        for s in half:
            assert s.recv(1024) == b""  # closed by the server (recv waits up to 60 s)
        closed_after = time.monotonic() - started
        assert 9 < closed_after < 40, closed_after
        answer = silent.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started >= 29
        assert httpx2.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        for s in [*half, silent, huge]:
            s.close()


@pytest.mark.slow
def test_past_the_connection_cap_new_connections_are_closed_at_once():
    """--max-connections 20 and 20 connections that send half a request: the next ones are
    closed as soon as they are accepted, while the 20 are still open (their head deadline has not
    come); once they go, the server answers again."""
    import socket

    s = start_server(None, "--max-connections", "20")
    host, port = s.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(20):
            c = socket.create_connection((host, int(port)), timeout=60)
            c.sendall(b"GET /health HTTP/1.1\r\nHo")
            held.append(c)
        time.sleep(0.5)  # let the server accept them all
        extra = []
        for _ in range(5):
            c = socket.create_connection((host, int(port)), timeout=60)
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.append(c)
        for c in extra:
            try:
                assert c.recv(1024) == b""  # closed, unanswered
            except ConnectionResetError:  # closed with the request unread: a reset, as closed
                pass
            c.close()
        for c in held:  # still open: a read finds nothing yet rather than the end
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1024)
        for c in held:
            c.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(s.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "more than 20 connections are open" in s.log()
    finally:
        for c in held:
            c.close()
        s.proc.kill()


@pytest.mark.slow
def test_allow_host_and_cors_origin_when_asked_for(demo_model):
    s = start_server(demo_model, "--allow-host", "ovchat.box.lan", "--cors-origin", "http://app.box.lan")
    try:
        body = {"model": s.model, "messages": QUESTION, "max_tokens": 2}
        assert s.post("/v1/chat/completions", body, headers={"Host": "ovchat.box.lan"}).status_code == 200
        assert_error(s.post("/v1/chat/completions", body, headers={"Host": "other.lan"}), 403)
        allowed = s.post("/v1/chat/completions", body, headers={"Origin": "http://app.box.lan"})
        assert allowed.headers["access-control-allow-origin"] == "http://app.box.lan"
        other = s.post("/v1/chat/completions", body, headers={"Origin": "http://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers
        preflight = httpx2.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://app.box.lan", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    finally:
        s.proc.kill()


@pytest.mark.slow
def test_a_killed_engine_is_reported_and_restarted(demo_model):
    import os
    import signal

    s = start_server(demo_model, "--max-concurrency", "2")
    try:
        pid = httpx2.get(s.url + "/health").json()["engine"]["pid"]
        endless = {"model": s.model, "prompt": ENDLESS, "max_tokens": 4000, "stream": True}
        with httpx2.stream("POST", s.url + "/v1/completions", json=endless, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            os.kill(pid, signal.SIGKILL)
            tail = [line for line in lines if line.startswith("data: ")]
        error = json.loads(tail[-1][6:])
        assert error["error"]["code"] == "engine_restarting" and error["error"]["type"] == "server_error"
        refused = s.post("/v1/completions", {"model": s.model, "prompt": "Hi", "max_tokens": 2}, key=None)
        if refused.status_code != 200:  # still restarting
            assert_error(refused, 503, code="engine_restarting" if "restarting" in refused.text else None)
        deadline = time.monotonic() + 120
        while httpx2.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = httpx2.get(s.url + "/health").json()
        assert health["status"] == "ok" and health["engine"]["restarts"] == 1 and health["engine"]["pid"] != pid
        assert s.post("/v1/completions", {"model": s.model, "prompt": "Hi", "max_tokens": 2}, key=None).status_code == 200
        assert "stopped unexpectedly" in s.log() and "Traceback" not in s.log()
    finally:
        s.proc.kill()


@pytest.mark.slow
def test_sigterm_refuses_the_queue_and_ends_streams_with_an_event(demo_model):
    s = start_server(demo_model, "--max-concurrency", "1", "--max-queue", "2")
    try:
        endless = {"model": s.model, "prompt": ENDLESS, "max_tokens": 4000, "stream": True}
        queued: dict = {}

        def wait_in_queue():
            queued["response"] = s.post("/v1/completions", {"model": s.model, "prompt": "Hi", "max_tokens": 2},
                                        key=None)

        with httpx2.stream("POST", s.url + "/v1/completions", json=endless, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            waiter = threading.Thread(target=wait_in_queue)
            waiter.start()
            time.sleep(0.5)  # the second request is waiting for the slot
            s.proc.proc.send_signal(signal.SIGTERM)
            waiter.join(timeout=10)
            assert queued["response"].status_code == 503 and "shutting down" in queued["response"].text
            start = time.monotonic()
            tail = [line for line in lines if line.startswith("data: ")]
            assert time.monotonic() - start < 10
        assert json.loads(tail[-1][6:])["error"]["code"] == "shutting_down"
        assert s.proc.proc.wait(timeout=30) is not None
        log = s.log()
        assert "waiting request refused" in log and "cut off" in log and "Traceback" not in log
        # The stream that was cut off is logged with its error's status, not the 200 it began with.
        assert re.search(r"POST /v1/completions 503 .*a 200 stream that ended in this error", log), log
    finally:
        s.proc.kill()


THINKING_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{%- endif %}")


@pytest.mark.slow
def test_a_thinking_template_gives_reasoning_content(tools_model, tmp_path_factory):
    """A template that opens <think> in the generation prompt (as reasoning models' do): what the
    model writes until </think> is reasoning_content. The demo never closes the tag, so all of
    its reply is reasoning; a model without thinking tags gets none (the other tests)."""
    import shutil

    import openvino as ov
    import openvino_tokenizers  # noqa: F401

    path = tmp_path_factory.mktemp("thinking") / "smol-thinking"
    shutil.copytree(tools_model, path)
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        model = ov.Core().read_model(path / name)
        model.set_rt_info(THINKING_TEMPLATE, "chat_template")
        ov.save_model(model, path / f"new-{name}")
        (path / f"new-{name}").replace(path / name)
        (path / f"new-{name}".replace(".xml", ".bin")).replace(path / name.replace(".xml", ".bin"))
    s = start_server(path)
    try:
        reply = s.post("/v1/chat/completions", {"model": s.model, "messages": QUESTION, "max_tokens": 12},
                       key=None).json()
        message = reply["choices"][0]["message"]
        assert message["reasoning_content"] and not message["content"]
        chunks = [json.loads(line[6:]) for line in httpx2.post(
            s.url + "/v1/chat/completions", json={"model": s.model, "messages": QUESTION, "max_tokens": 12,
                                                  "stream": True}, timeout=60).text.splitlines()
            if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
        assert streamed == message["reasoning_content"]
    finally:
        s.proc.kill()
