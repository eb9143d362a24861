"""`ovchat chat` driven through a real subprocess and its stdin, with the real demo model."""

import json
import time

import pytest

from conftest import run_ovchat

pytestmark = pytest.mark.slow


def chat(script: str, *args: str):
    done = run_ovchat("chat", *args, input=script.encode())
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode(), done.stderr.decode()


def test_multi_turn_context_clear_save_and_load(demo_model, tmp_path):
    conv = tmp_path / "conv.json"
    out, err = chat(
        "My name is Zork.\n"
        "What is my name?\n"
        f"/save {conv}\n"
        "/clear\n"
        "What is my name?\n"
        f"/load {conv}\n"
        "What is my name?\n"
        "/bye\n",
        "--max-new-tokens", "24")
    _, after_clear = out.split("Conversation cleared.")
    forgotten, after_load = after_clear.split("Loaded 2 turns")
    assert "Zork" not in forgotten  # /clear forgot the name
    assert "Zork" in after_load  # /load brought it back
    saved = json.loads(conv.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == "My name is Zork."
    assert "Zork" in saved["messages"][3]["content"]  # the second turn used the first
    assert "Traceback" not in err


def test_save_and_load_refuse_hostile_paths_and_keep_the_conversation(demo_model, tmp_path):
    # Each bad /save or /load is one line on stderr; the REPL, the conversation and the files
    # already there all survive, and nothing reads without bound or waits on a FIFO.
    import os

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(precious)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": "ovchat-conversation", "version": 99, "messages": []}))
    good = tmp_path / "good.json"
    out, err = chat(
        "My name is Zork.\n"
        f"/save {a_file}/x.json\n"
        f"/save {link}\n"
        f"/save {tmp_path}\n"
        "/load /dev/zero\n"
        f"/load {fifo}\n"
        f"/load {future}\n"
        f"/save {good}\n"
        "/bye\n",
        "--max-new-tokens", "8")
    assert "Traceback" not in err
    assert "could not write" in err and "symbolic link" in err and "directory" in err
    assert err.count("not a regular file") == 2 and "another version of ovchat" in err
    assert precious.read_text() == "keep me" and link.is_symlink() and a_file.read_text() == "not a directory"
    saved = json.loads(good.read_text())
    assert saved["messages"][0]["content"] == "My name is Zork."  # the conversation survived it all
    assert not list(tmp_path.glob(".*partial*"))


def test_multiline_input_system_set_and_stats(demo_model):
    out, err = chat(
        '"""\nWhat is the capital\nof France?\n"""\n'
        "/system Always answer in French.\n"
        "/system\n"
        "/set max_new_tokens 7\n"
        "/set nonsense 1\n"
        "/stats\n"
        "/help\n"
        "/frobnicate\n")
    assert "Paris" in out
    assert "System prompt: Always answer in French." in out
    assert "Set max_new_tokens = 7" in out
    assert "unknown option 'nonsense'" in err
    assert "decode speed:" in out and "context window:" in out
    assert "/save FILE" in out
    assert "unknown command /frobnicate" in err


def test_a_small_window_drops_the_oldest_turn(demo_model):
    out, err = chat("".join(f"Remember the number {i}. Say OK.\n" for i in range(6)) + "/stats\n",
                    "--max-context", "160", "--max-new-tokens", "12")
    assert "oldest message" in err and "to fit the 160-token context window" in err
    used = int(out.split("context window:")[1].split("/")[0])
    assert used <= 160


def test_sigint_stops_a_long_reply_within_a_second_and_the_repl_goes_on(demo_model, ovchat_process):
    """Up to three replies are stopped, the first that stops within a second passes: a busy
    machine may delay one signal's delivery, and the claim is about ovchat, not the scheduler."""
    p = ovchat_process("chat", "--max-new-tokens", "4000")
    took = []
    for attempt in range(3):
        start = len(p.stdout_text)
        p.send("Write a very long story about a dragon, at least 2000 words.\n")
        p.wait_for_chars(start + 40, timeout=180)  # the reply is streaming (it runs to thousands of tokens)
        sent = time.monotonic()
        p.interrupt()
        stopped = p.wait_for("reply stopped", stream="stderr", timeout=30, start=len(p.stderr_text))
        took.append(stopped - sent)
        mark = len(p.stdout_text)
        time.sleep(0.3)
        p._drain()
        assert len(p.stdout_text) - mark <= 2  # nothing more streams after the stop (a newline at most)
        if took[-1] < 1.0:
            break
        p.send("/clear\n")
    assert min(took) < 1.0, f"took {', '.join(f'{t:.2f}' for t in took)} s to stop"
    p.send("/clear\nWhat is the capital of France?\n")
    p.wait_for("Paris", start=mark, timeout=120)
    assert p.finish() == 0


def test_ctrl_c_at_an_empty_prompt_exits_zero(demo_model, ovchat_process):
    p = ovchat_process("chat")
    p.send("/system Be brief.\n")
    p.wait_for("System prompt set.", timeout=180)
    p.interrupt()
    assert p.proc.wait(timeout=10) == 0


def test_ctrl_d_exits_zero(demo_model):
    out, err = chat("")
    assert "Traceback" not in err
