"""Speculative decoding (prompt lookup, a draft model) changes how fast a reply comes, not what it
says: under greedy decoding the reply is the one plain decoding gives, on the real demo model, from
ChatSession, `ovchat run` and `ovchat serve`. The task copies a given text, whose tokens have wide
margins: in free chat, proposals scored together can flip a near-tie (rounding; see
ovchat.speculation), so equality is asserted only where the model is sure. Bad settings are
one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ovchat.errors import OptionError
from ovchat.speculation import Speculation

DOCUMENT = ("The lighthouse at Point Sur was built in 1889 on a volcanic rock 361 feet above the Pacific. "
            "Its first-order Fresnel lens could be seen 23 miles out to sea. The keepers and their families "
            "lived in a stone house beside the tower until the light was automated in 1972.")
EDIT = f"Repeat the following text exactly, changing nothing:\n\n{DOCUMENT}"


def ask(server, **fields):
    body = {"model": server.model, "messages": [{"role": "user", "content": EDIT}], **fields}
    return server.post("/v1/chat/completions", body, key=None)


@pytest.fixture(scope="module")
def plain(demo_model):
    from ovchat.session import ChatSession

    return ChatSession(demo_model, device="CPU").send(EDIT, max_new_tokens=96)


@pytest.mark.slow
@pytest.mark.parametrize("speculation", [Speculation("prompt-lookup"), Speculation("prompt-lookup", 2, 1)],
                         ids=["lookup-default", "lookup-2-from-1grams"])
def test_prompt_lookup_gives_the_plain_greedy_reply(demo_model, plain, speculation):
    from ovchat.session import ChatSession

    session = ChatSession(demo_model, device="CPU", speculation=speculation)
    assert session.send(EDIT, max_new_tokens=96) == plain
    assert session.last_metrics.generated_tokens > 20
    # and a second turn, with the first in the conversation, works as well
    assert session.send("Thank you.", max_new_tokens=16)


@pytest.mark.slow
def test_a_draft_model_gives_the_plain_greedy_reply(demo_model, plain):
    from ovchat.session import ChatSession

    # The model as its own draft: every proposal is accepted, and still nothing changes.
    session = ChatSession(demo_model, device="CPU", speculation=Speculation("draft", draft=demo_model))
    assert session.send(EDIT, max_new_tokens=96) == plain


@pytest.mark.slow
def test_run_and_serve_take_the_levers(demo_model, plain):
    done = subprocess.run([sys.executable, "-m", "ovchat.cli", "run", "-m", str(demo_model), "--no-server",
                           "--prompt-lookup", "--speculate-tokens", "4", "--max-new-tokens", "96", EDIT],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().rstrip("\n") == plain

    from server_helpers import start_server

    server = start_server(demo_model, "--prompt-lookup")
    try:
        reply = ask(server, max_tokens=96)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == plain
        # per request, with OpenVINO Model Server's field names
        own = ask(server, max_tokens=96, num_assistant_tokens=2, max_ngram_size=2)
        assert own.status_code == 200 and own.json()["choices"][0]["message"]["content"] == plain
        wrong = ask(server, num_assistant_tokens=0)
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "num_assistant_tokens"
    finally:
        server.proc.kill()


@pytest.mark.parametrize("args, needle", [
    (["--prompt-lookup", "--draft-model", "x"], "choose one"),
    (["--lookup-ngram", "2"], "--prompt-lookup only"),
    (["--speculate-tokens", "3"], "needs --prompt-lookup or --draft-model"),
    (["--prompt-lookup", "--speculate-tokens", "0"], "--speculate-tokens"),
])
def test_bad_lever_options_are_usage_errors(args, needle):
    from click.testing import CliRunner

    from ovchat.cli import main

    result = CliRunner().invoke(main, ["run", *args, "hi"])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_a_draft_model_that_does_not_exist_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ovchat.cli", "run", "--draft-model", str(tmp_path / "nope"), "hi"],
                          capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err and err.startswith("Error: "), err


@pytest.mark.parametrize("kwargs", [dict(kind="beam"), dict(kind="prompt-lookup", candidates=0),
                                    dict(kind="prompt-lookup", ngram=True), dict(kind="draft")])
def test_speculation_checks_its_settings(kwargs):
    with pytest.raises(OptionError):
        Speculation(**kwargs)
