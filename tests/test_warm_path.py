"""The warm path: `ovchat run`, `ovchat chat` and `ChatSession(use_server=True)` hand their turns to
an `ovchat serve` of the same model already running on this machine, so they load nothing; and
`serve --keep-alive` gives the model's memory back when idle and loads it again on demand. Real
server processes and the real demo model throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from ovchat import discovery
from server_helpers import KEY, start_server

QUESTION = "What is the capital of France?"


def ovchat(*args: str, env=None, input: bytes = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovchat.cli", *args], capture_output=True, timeout=300,
                          env={**os.environ, **(env or {})}, input=input)


def requests_served(server, path: str = "/v1/chat/completions", *, expect: int = None) -> int:
    """Requests to ``path`` the server has logged (one access-log line each, written just after
    the reply ends: given ``expect``, wait a little for that many to show)."""
    deadline = time.monotonic() + 10
    while True:
        count = server.log().count(f"POST {path} ")
        if expect is None or count >= expect or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.fixture(scope="module")
def other_model(demo_model, tmp_path_factory):
    """The demo model at another path: a model no other server of this module serves."""
    import shutil

    return Path(shutil.copytree(demo_model, tmp_path_factory.mktemp("other") / "demo-copy"))


@pytest.fixture(scope="module")
def warm(demo_model):
    s = start_server(demo_model)
    yield s
    s.proc.kill()


@pytest.mark.slow
def test_run_uses_a_running_server_of_the_model_and_no_server_opts_out(warm, demo_model):
    assert discovery.find(demo_model) is not None  # the server announced itself under OVCHAT_HOME
    before = requests_served(warm)
    done = ovchat("run", "-m", str(demo_model), QUESTION)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.decode()
    assert "by ovchat serve at " + warm.url in done.stderr.decode()
    assert requests_served(warm, expect=before + 1) == before + 1

    alone = ovchat("run", "-m", str(demo_model), "--no-server", QUESTION)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout == done.stdout  # greedy: the same answer either way
    assert "ovchat serve" not in alone.stderr.decode() and requests_served(warm) == before + 1

    # The environment variable opts out too.
    by_env = ovchat("run", "-m", str(demo_model), QUESTION, env={"OVCHAT_NO_SERVER": "1"})
    assert by_env.stdout == done.stdout and requests_served(warm) == before + 1


@pytest.mark.slow
def test_a_served_chat_keeps_the_conversation_and_reports_errors_as_its_own(warm, demo_model):
    from ovchat.session import ChatSession
    from ovchat.errors import ContextOverflowError

    session = ChatSession(demo_model, use_server=True)
    assert session.load_s == 0.0 and "ovchat serve" in session.device.reason
    first = session.send("The secret word is banana. Remember it.", max_new_tokens=32)
    assert first and session.last_metrics.generated_tokens > 0
    second = session.send("What is the secret word?", max_new_tokens=32)
    assert "banana" in second  # only the first turn, sent again by the client, holds it
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(ContextOverflowError):
        session.send("word " * 9000)
    assert len(session.messages) == 4  # the refused turn left the conversation as it was

    local = ChatSession(demo_model, device="CPU")
    assert local.send(QUESTION) == ChatSession(demo_model, use_server=True).send(QUESTION)


LIGHTS = {"type": "function", "function": {"name": "set_light", "parameters": {
    "type": "object", "properties": {"room": {"type": "string", "enum": ["porch", "kitchen"]}, "on": {"type": "boolean"}},
    "required": ["room", "on"]}}}


@pytest.mark.slow
def test_the_same_tool_choices_give_the_same_turns_locally_and_on_the_warm_path(warm, demo_model):
    """One tool plan for both backends: each tool_choice a caller can give (a bare function name
    too, as `ovchat run --tool-choice NAME` passes it) gives the same calls, text or refusal
    whether the model is loaded here or in the running server."""
    from ovchat.errors import InputError
    from ovchat.session import ChatSession

    local = ChatSession(demo_model, device="CPU")
    remote = ChatSession(demo_model, use_server=True)
    assert remote.load_s == 0.0 and local.load_s > 0
    served = requests_served(warm)
    for choice in ["required", "set_light", {"type": "function", "function": {"name": "set_light"}}, "none", "auto"]:
        outcomes = []
        for session in (local, remote):
            session.reset()
            try:
                reply = session.send("Turn on the porch light.", tools=[LIGHTS], tool_choice=choice, max_new_tokens=60)
            except InputError as e:
                outcomes.append(("refused", str(e)))
                continue
            outcomes.append((str(reply), [(c.name, c.arguments) for c in reply.tool_calls],
                             session.messages[-1].get("tool_calls", [{}])[0].get("function")))
        assert outcomes[0] == outcomes[1], (choice, outcomes)
        if choice == "auto":
            assert outcomes[0][0] == "refused" and "no place for tools" in outcomes[0][1]
        elif choice == "none":
            assert outcomes[0][0] and not outcomes[0][1]
        else:
            assert outcomes[0][0] == "" and outcomes[0][1][0][0] == "set_light"
    assert requests_served(warm) > served  # the remote turns did go through the server


@pytest.mark.slow
def test_the_repl_and_raw_continuation_go_through_the_server(warm, demo_model):
    before = requests_served(warm, "/v1/completions")
    raw = ovchat("run", "-m", str(demo_model), "--raw", "--max-new-tokens", "8", "1, 2, 3, 4,")
    assert raw.returncode == 0 and " 5" in raw.stdout.decode(), raw.stderr
    assert requests_served(warm, "/v1/completions", expect=before + 1) == before + 1

    chats = requests_served(warm)
    done = ovchat("chat", "-m", str(demo_model), input=f"{QUESTION}\n/bye\n".encode())
    assert done.returncode == 0 and "Paris" in done.stdout.decode(), done.stderr
    assert requests_served(warm, expect=chats + 1) == chats + 1


@pytest.mark.slow
def test_a_server_with_a_key_is_used_only_with_the_key(other_model):
    keyed = start_server(other_model, "--api-key", KEY)
    try:
        before = requests_served(keyed)
        without = ovchat("run", "-m", str(other_model), "--max-new-tokens", "4", QUESTION,
                         env={"OVCHAT_API_KEY": ""})
        assert without.returncode == 0 and "ovchat serve" not in without.stderr.decode(), without.stderr
        assert requests_served(keyed) == before
        with_key = ovchat("run", "-m", str(other_model), "--max-new-tokens", "4", QUESTION,
                          env={"OVCHAT_API_KEY": KEY})
        assert with_key.returncode == 0, with_key.stderr
        assert requests_served(keyed, expect=before + 1) == before + 1
    finally:
        keyed.proc.kill()


@pytest.mark.slow
def test_a_killed_servers_announcement_is_ignored_and_removed(other_model, ovchat_home):
    dead = start_server(other_model)
    pid = dead.proc.proc.pid
    announcement = ovchat_home / "servers" / f"{pid}.json"
    assert json.loads(announcement.read_text())["url"] == dead.url
    dead.proc.proc.send_signal(signal.SIGKILL)
    dead.proc.proc.wait()
    done = ovchat("run", "-m", str(other_model), "--max-new-tokens", "4", QUESTION)
    assert done.returncode == 0 and "ovchat serve" not in done.stderr.decode(), done.stderr
    assert not announcement.exists()


@pytest.mark.slow
def test_a_stopped_server_withdraws_its_announcement(other_model, ovchat_home):
    s = start_server(other_model)
    announcement = ovchat_home / "servers" / f"{s.proc.proc.pid}.json"
    assert announcement.exists()
    s.proc.proc.send_signal(signal.SIGTERM)
    s.proc.proc.wait(timeout=60)  # uvicorn ends by re-raising the signal
    assert not announcement.exists()


def engine_state(server) -> dict:
    return httpx2.get(server.url + "/health", timeout=10).json()["engine"]


@pytest.mark.slow
def test_keep_alive_unloads_when_idle_and_the_next_request_loads_again(other_model):
    s = start_server(other_model, "--keep-alive", "2s")
    try:
        first_engine = engine_state(s)["pid"]
        answer = s.post("/v1/chat/completions", {"model": s.model, "messages": [{"role": "user", "content": QUESTION}]},
                        key=None)
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 60
        while engine_state(s)["state"] != "unloaded":
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.2)
        # The engine process, and its memory, go: /health says "unloaded" as the stop is sent, and
        # the process exits (and is reaped) moments later, later still on a busy machine.
        deadline = time.monotonic() + 30
        while True:
            try:
                os.kill(first_engine, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the engine process outlived its unload by 30 s"
            time.sleep(0.1)
        assert httpx2.get(s.url + "/health", timeout=10).status_code == 200  # idle is healthy
        again = s.post("/v1/chat/completions", {"model": s.model, "messages": [{"role": "user", "content": QUESTION}]},
                        key=None)
        assert again.status_code == 200 and again.json()["choices"] == answer.json()["choices"]
        assert engine_state(s)["state"] == "ready" and engine_state(s)["pid"] != first_engine
        assert "unloaded" in s.log()
    finally:
        s.proc.kill()


@pytest.mark.parametrize("value", ["soon", "1x", "5 m"])
def test_a_bad_keep_alive_is_a_usage_error(value):
    from click.testing import CliRunner

    from ovchat.cli import main

    result = CliRunner().invoke(main, ["serve", "--keep-alive", value])
    assert result.exit_code == 2 and "--keep-alive" in result.output and "Traceback" not in result.output


def resident_kb(pid: int, path: Path) -> int:
    """Resident kB of process ``pid``'s mappings of ``path``."""
    total, inside = 0, False
    for line in open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/smaps")
def test_the_servers_engine_does_not_hold_the_weights_twice(warm, demo_model):
    """As ChatSession does, the engine process's warm-up gives back the pages of the mapped weight
    file that the CPU plugin has copied into its own layout. Without it the whole file (110 MB)
    stays resident in the engine beside the plugin's copy."""
    bin_file = (demo_model / "openvino_model.bin").resolve()
    size_kb = bin_file.stat().st_size // 1024
    answer = warm.post("/v1/chat/completions", {"model": warm.model, "max_tokens": 16,
                                                "messages": [{"role": "user", "content": QUESTION}]})
    assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
    pid = httpx2.get(warm.url + "/health", timeout=10).json()["engine"]["pid"]
    assert resident_kb(pid, bin_file) < size_kb // 5
