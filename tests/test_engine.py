"""ChatSession, the Python API, with the real demo model on the CPU."""

import json
import threading

import pytest

from ovchat.errors import ContextOverflowError, InputError, ModelNotFoundError, OptionError

pytestmark = pytest.mark.slow


def test_send_answers_and_reports_metrics(session):
    reply = session.send("What is the capital of France?")
    assert "Paris" in reply
    m = session.last_metrics
    assert m.prompt_tokens > 5 and 0 < m.generated_tokens < 1024 and m.finish_reason == "stop"
    assert m.ttft_s > 0 and m.decode_tokens_per_s > 0 and m.load_s > 0
    assert m.context_limit == 8192 and m.context_used >= m.prompt_tokens
    assert [x["role"] for x in session.messages] == ["user", "assistant"]


def test_stream_yields_the_same_text_in_pieces(session):
    chunks = list(session.stream("What is the capital of France?"))
    assert len(chunks) > 1
    assert "".join(chunks) == session.messages[-1]["content"]


def test_history_carries_context_and_reset_forgets_it(session):
    session.send("My name is Zork.", max_new_tokens=32)
    assert "Zork" in session.send("What is my name?", max_new_tokens=32)
    session.reset()
    assert session.messages == []
    assert "Zork" not in session.send("What is my name?", max_new_tokens=32)


def test_per_turn_overrides_do_not_stick(session):
    session.send("Tell me a story.", max_new_tokens=5)
    assert session.last_metrics.generated_tokens == 5 and session.last_metrics.finish_reason == "length"
    assert session.options.max_new_tokens == 1024
    with pytest.raises(OptionError):
        session.send("hi", temperature=-1)


def test_closing_the_stream_stops_the_reply_and_keeps_the_partial_text(session):
    stream = session.stream("Write a very long story about a dragon, at least 2000 words.")
    got = [next(stream) for _ in range(4)]
    stream.close()
    m = session.last_metrics
    assert m.finish_reason == "cancelled" and m.generated_tokens < 40
    assert session.messages[-1]["content"].startswith("".join(got))


def test_cancel_from_another_thread(session):
    stream = session.stream("Write a very long story about a dragon, at least 2000 words.")
    next(stream)
    threading.Timer(0.2, session.cancel).start()
    rest = list(stream)
    assert session.last_metrics.finish_reason == "cancelled"
    assert session.last_metrics.generated_tokens < 300
    assert rest is not None


def test_old_turns_are_dropped_to_fit_the_window_but_never_the_system_prompt(session):
    notices = []
    session._notice = notices.append
    session.set_system("You are terse.")
    session.context_limit = 160
    for i in range(6):
        session.send(f"Remember the number {i}. Say OK.", max_new_tokens=16)
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert session.messages[0] == {"role": "system", "content": "You are terse."}
    assert "Remember the number 0. Say OK." not in users and users[-1].startswith("Remember the number 5")
    assert notices and "to fit the 160-token context window" in notices[0]
    assert session.context_used() <= 160


def test_a_message_that_cannot_fit_alone_is_an_error(session):
    session.context_limit = 64
    with pytest.raises(ContextOverflowError, match="context window is 64"):
        session.send("word " * 200)
    assert session.messages == []


def test_empty_prompt_is_rejected(session):
    with pytest.raises(InputError, match="empty"):
        session.send("   \n")


def test_save_and_load_round_trip(session, tmp_path):
    session.set_system("Be brief.")
    session.send("My name is Zork.", max_new_tokens=16)
    path = tmp_path / "conv.json"
    session.save(path)
    saved = json.loads(path.read_text())
    assert saved["format"] == "ovchat-conversation" and saved["messages"] == session.messages
    before = session.messages
    session.reset()
    session.load(path)
    assert session.messages == before
    path.write_text('{"format": "ovchat-conversation", "messages": [{"role": "robot"}]}')
    with pytest.raises(InputError, match="malformed"):
        session.load(path)
    path.write_text("not json")
    with pytest.raises(InputError, match="not a conversation"):
        session.load(path)


def test_unknown_model_and_incomplete_directory(tmp_path):
    from ovchat.session import ChatSession

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ChatSession(tmp_path / "nope")
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(ModelNotFoundError, match="missing openvino_model.bin"):
        ChatSession(tmp_path)
