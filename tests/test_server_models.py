"""One server, every model: the store's models loaded on demand through one endpoint, a memory
budget that unloads the least recently used idle model, keep-alive (the server's and a
request's own, 0 and -1 included), `ovchat ps` / `ovchat stop`, and the ollama API through the
official `ollama` client. Real servers, the real demo model and Qwen2.5-Coder-0.5B."""

from __future__ import annotations

import json
import time

import httpx2
import pytest

from conftest import run_ovchat
from server_helpers import start_server

ollama = pytest.importorskip("ollama")
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}


def loaded(server) -> dict:
    """Loaded model name -> its /api/ps row."""
    return {m["name"].removesuffix(":latest"): m for m in httpx2.get(server.url + "/api/ps", timeout=30).json()["models"]}


def wait_until(condition, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def store_server(demo_model, qwen_model):
    """Nothing loaded at start (no -m): both models load on first use; idle ones unload after 4 s."""
    s = start_server(None, "--keep-alive", "4s")
    yield s
    s.proc.kill()


def test_two_models_through_one_endpoint_loaded_on_first_use(store_server, demo_model, qwen_model):
    assert loaded(store_server) == {}
    names = {m.id for m in store_server.client().models.list()}
    assert {demo_model.name, qwen_model.name} <= names  # the store, loaded or not
    client = ollama.Client(host=store_server.url)
    for name in (demo_model.name, qwen_model.name, demo_model.name):
        reply = client.chat(model=name, messages=QUESTION)
        assert "Paris" in reply.message.content and reply.done_reason == "stop" and reply.eval_count > 0
        openai_reply = store_server.client().chat.completions.create(model=name, messages=QUESTION)
        assert openai_reply.choices[0].message.content == reply.message.content  # both greedy, one model
    # Each was loaded on its first use. (Whether both are still loaded now depends on how long the
    # last replies took against the 4 s keep-alive: on a busy machine qwen may have gone already.)
    log = store_server.log()
    assert "loading " + demo_model.name in log and "loading " + qwen_model.name in log


def test_keep_alive_counts_from_idle_and_a_request_can_set_its_own(store_server, demo_model, qwen_model):
    client = ollama.Client(host=store_server.url)
    client.generate(model=demo_model.name, prompt="Hi", options={"num_predict": 4})
    started_idle = time.monotonic()
    # The server's --keep-alive (4 s): unloaded once idle that long, not sooner.
    wait_until(lambda: demo_model.name not in loaded(store_server), 60, "the keep-alive unload")
    assert time.monotonic() - started_idle >= 3.0
    # A request's keep_alive -1 keeps the model; 0 unloads it as soon as the reply is done.
    client.generate(model=qwen_model.name, prompt="Hi", options={"num_predict": 4}, keep_alive=-1)
    time.sleep(6)
    row = loaded(store_server)[qwen_model.name]
    assert row["expires_at"].startswith("2318")  # ollama's 'forever'
    client.generate(model=qwen_model.name, prompt="Hi", options={"num_predict": 4}, keep_alive=0)
    wait_until(lambda: qwen_model.name not in loaded(store_server), 30, "keep_alive 0")
    # An empty prompt loads a model; with keep_alive 0, unloads it (ollama's own idiom).
    assert client.generate(model=demo_model.name, keep_alive="1m").done_reason == "load"
    assert demo_model.name in loaded(store_server)
    assert client.generate(model=demo_model.name, keep_alive=0).done_reason == "unload"
    assert demo_model.name not in loaded(store_server)


def test_ps_and_stop_commands(store_server, demo_model):
    client = ollama.Client(host=store_server.url)
    client.chat(model=demo_model.name, messages=QUESTION, keep_alive="10m")
    ps = run_ovchat("ps")
    assert ps.returncode == 0, ps.stderr
    line = next(line for line in ps.stdout.decode().splitlines() if line.startswith(demo_model.name))
    assert "CPU" in line and "in 10 minutes" in line and store_server.url in line and "MB" in line
    stopped = run_ovchat("stop", demo_model.name)
    assert stopped.returncode == 0, stopped.stderr
    assert demo_model.name not in loaded(store_server)
    again = run_ovchat("stop", demo_model.name)
    assert again.returncode == 1 and b"is not loaded" in again.stderr and b"Traceback" not in again.stderr


def test_tool_calls_and_a_format_schema_through_the_ollama_client(store_server, qwen_model):
    client = ollama.Client(host=store_server.url)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat(model=qwen_model.name, messages=ask, tools=[WEATHER])
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    # The round trip: the tool's answer goes back and the model answers in words.
    answer = client.chat(model=qwen_model.name, messages=ask + [reply.message, {
        "role": "tool", "tool_name": "get_weather", "content": json.dumps({"temperature_c": 21, "sky": "clear"})}])
    assert not answer.message.tool_calls and "21" in answer.message.content
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    place = client.chat(model=qwen_model.name, messages=[{"role": "user", "content": "Name a city and its country."}],
                        format=schema)
    assert set(json.loads(place.message.content)) == {"city", "country"}
    streamed = list(client.chat(model=qwen_model.name, messages=ask, tools=[WEATHER], stream=True))
    calls = [c for part in streamed for c in (part.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and streamed[-1].done


def test_the_ollama_api_plain_streamed_and_its_errors(store_server, demo_model):
    client = ollama.Client(host=store_server.url)
    whole = client.generate(model=demo_model.name + ":latest", prompt="Why is the sky blue?",
                            options={"num_predict": 12, "temperature": 0})
    assert whole.done_reason == "length" and whole.eval_count == 12 and whole.prompt_eval_count > 5
    assert whole.total_duration > whole.eval_duration > 0
    parts = list(client.generate(model=demo_model.name, prompt="Why is the sky blue?", stream=True,
                                 options={"num_predict": 12}))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done and not parts[0].done
    raw = client.generate(model=demo_model.name, prompt="1, 2, 3, 4,", raw=True, options={"num_predict": 3})
    assert "5" in raw.response
    tags = {m.model for m in client.list().models}
    assert demo_model.name + ":latest" in tags
    shown = client.show(demo_model.name)
    assert "{{" in shown.template or "{%" in shown.template
    assert shown.modelinfo["llama.context_length"] == 8192 and "completion" in shown.capabilities
    assert client.pull(demo_model.name).status == "success"  # already in the store
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=QUESTION)
    assert missing.value.status_code == 404 and "does not exist" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=demo_model.name, messages=QUESTION, options={"temperature": -1})
    assert bad.value.status_code == 400 and "temperature" in bad.value.error
    assert httpx2.get(store_server.url + "/api/version").json()["version"]


@pytest.fixture(scope="module")
def tight_server(demo_model, qwen_model):
    """A budget that holds either model alone but not both (estimates: demo ~0.4 GB, qwen ~1 GB)."""
    s = start_server(None, "--max-memory", "1200MB")
    yield s
    s.proc.kill()


def test_the_least_recently_used_idle_model_makes_room(tight_server, demo_model, qwen_model):
    client = tight_server.client()
    for name in (demo_model.name, qwen_model.name, demo_model.name):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=16)
        assert "Paris" in reply.choices[0].message.content
        assert set(loaded(tight_server)) == {name}  # the other one was unloaded to make room
    assert tight_server.log().count(f"unloading {qwen_model.name} to make room for {demo_model.name}") == 1


def test_a_model_bigger_than_the_budget_is_refused_in_one_line(demo_model):
    s = start_server(None, "--max-memory", "100MB")
    try:
        refused = s.post("/v1/chat/completions", {"model": demo_model.name, "messages": QUESTION}, key=None)
        assert refused.status_code == 507, refused.text
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory" and "--max-memory" in error["message"]
        assert "Killed" not in s.log() and loaded(s) == {}
    finally:
        s.proc.kill()
