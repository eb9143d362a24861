"""The server's engine driven in this process (no pipe, no HTTP): requests in, steps, updates out.

``Engine`` is what the engine process runs; ``run`` only wraps it in a pipe loop. So batching,
cancellation and refusals are tested here directly on the real demo model.
"""

from __future__ import annotations

import numpy as np
import pytest

from ovchat.options import GenerationSettings
from ovchat.server import protocol

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(demo_model):
    from ovchat.devices import CPU_ACCURACY
    from ovchat.server.engine import Engine, EngineSpec

    return Engine(EngineSpec(demo_model, "CPU", dict(CPU_ACCURACY), max_running=4, kv_cache_gb=1))


def prompt(demo_model, text: str):
    import openvino_genai

    tokenizer = openvino_genai.Tokenizer(str(demo_model))
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tuple(int(i) for i in tokenizer.encode(templated, add_special_tokens=False).input_ids.data[0])


def run_all(engine, requests, *, cancel_after=None, add_at=None, steps=2000):
    """Add the requests, step until every one ended; the tokens and finish reasons by request.
    ``add_at``: (step, request) added once that many steps have run."""
    later = [add_at[1]] if add_at is not None else []
    tokens = {r.rid: [] for r in [*requests, *later]}
    finished, failures = {}, {}
    for r in requests:
        refused = engine.add(r)
        if refused is not None:
            failures[r.rid] = refused.failure
    for step in range(steps):
        if add_at is not None and step == add_at[0]:
            assert engine.add(add_at[1]) is None
        elif not engine.busy:
            break
        if cancel_after is not None and step == cancel_after[1]:
            engine.cancel(cancel_after[0])
            finished[cancel_after[0]] = "cancelled"
        for update in engine.step():
            for out in update.outputs.values():
                tokens[update.rid] += out.ids
            finished.update({update.rid: r for r in update.finished.values()})
            if update.failure is not None:
                failures[update.rid] = update.failure
    assert not engine.busy, "the engine never finished"
    return tokens, finished, failures


def test_requests_batched_in_one_engine_get_what_they_get_alone(engine, demo_model):
    ask = prompt(demo_model, "What is the capital of France?")
    story = prompt(demo_model, "Tell me a short story.")
    alone, _, _ = run_all(engine, [protocol.Add(1, ask, GenerationSettings(max_new_tokens=24))])
    together, finished, failures = run_all(engine, [protocol.Add(2, ask, GenerationSettings(max_new_tokens=24)),
                                                    protocol.Add(3, story, GenerationSettings(max_new_tokens=24))])
    assert not failures and together[2] == alone[1] and len(together[3]) > 0
    assert set(finished) == {2, 3}


def test_a_cancelled_request_stops_and_the_others_go_on(engine, demo_model):
    story = prompt(demo_model, "Write a very long story about a dragon.")
    long = GenerationSettings.forced(200)
    tokens, finished, failures = run_all(engine, [protocol.Add(4, story, long), protocol.Add(5, story, long)],
                                         cancel_after=(4, 10))
    assert not failures and finished[4] == "cancelled" and len(tokens[4]) < 20
    assert len(tokens[5]) == 200 and finished[5] == "length"


def test_settings_genai_refuses_fail_that_request_alone(engine, demo_model):
    ask = prompt(demo_model, "What is the capital of France?")
    # Several greedy outputs: GenAI refuses them when the request is added.
    tokens, finished, failures = run_all(engine, [protocol.Add(6, ask, GenerationSettings(max_new_tokens=8, n=2)),
                                                  protocol.Add(7, ask, GenerationSettings.forced(8))])
    assert failures[6].code == protocol.INVALID and failures[6].message
    assert 7 not in failures and finished[7] == "length" and len(tokens[7]) == 8


def test_a_later_turn_reuses_the_cached_prefix(engine, demo_model):
    """Prefix caching: a prompt that starts with a finished request's prompt and reply is
    prefilled from where the cache ends. Counted in engine steps, not seconds: with 256-token
    chunks (the engine fixture's) an uncached 700-token prompt needs three steps to its first
    token, whatever else the machine is doing."""
    rng = np.random.default_rng(3)
    first = tuple(int(t) for t in rng.integers(100, 40000, size=640))
    tokens, _, _ = run_all(engine, [protocol.Add(20, first, GenerationSettings.forced(8))])
    later = first + tuple(tokens[20]) + tuple(int(t) for t in rng.integers(100, 40000, size=40))
    fresh = tuple(int(t) for t in rng.integers(100, 40000, size=len(later)))

    def steps_to_first_token(rid, ids):
        assert engine.add(protocol.Add(rid, ids, GenerationSettings.forced(2))) is None
        for step in range(1, 100):
            if any(u.rid == rid and u.outputs for u in engine.step()):
                while engine.busy:
                    engine.step()
                return step
        raise AssertionError("no first token in 100 steps")

    assert steps_to_first_token(21, later) == 1
    assert steps_to_first_token(22, fresh) >= 3


def test_a_short_prompt_is_not_held_behind_a_long_prefill(engine):
    """A long prompt is prefilled in turns of TURN_TOKENS, each queued behind what arrived
    meanwhile: a short prompt added while the first turn runs gets its first token long before
    the long prompt does (GenAI alone would prefill the long prompt whole first), and the long
    prompt still generates what it would alone."""
    from ovchat.server.engine import TURN_TOKENS

    rng = np.random.default_rng(4)
    long = tuple(int(t) for t in rng.integers(100, 40000, size=4 * TURN_TOKENS + 100))
    short = tuple(int(t) for t in rng.integers(100, 40000, size=15))
    assert engine.add(protocol.Add(31, long, GenerationSettings.forced(4))) is None
    engine.step()  # the long prompt's first turn is under way
    assert engine.add(protocol.Add(32, short, GenerationSettings.forced(4))) is None
    first, tokens, step = {}, {31: []}, 0
    while engine.busy:
        step += 1
        for update in engine.step():
            if update.outputs:
                first.setdefault(update.rid, step)
                if update.rid == 31:
                    tokens[31] += [t for out in update.outputs.values() for t in out.ids]
    assert first[32] < first[31] / 2, first
    alone, _, _ = run_all(engine, [protocol.Add(30, long, GenerationSettings.forced(4))])
    assert tokens[31] == alone[30]


def test_a_request_that_fails_inside_a_step_fails_alone(engine, demo_model):
    """A request whose grammar GenAI rejects only inside the step (the HTTP side refuses such a
    schema first; here it is sent to the engine directly) ends with engine_failed; the request
    that was already running is resumed where it was and its tokens are the ones it gets alone
    (greedy): its client sees one unbroken reply."""
    story = prompt(demo_model, "Write a very long story about a dragon.")
    alone, _, _ = run_all(engine, [protocol.Add(7, story, GenerationSettings.forced(40))])
    good = protocol.Add(8, story, GenerationSettings.forced(40))
    bad = protocol.Add(9, story, GenerationSettings(max_new_tokens=8, json_schema='{"type": 5}'))
    # The bad request is accepted (its grammar is compiled in a step) while the good one runs.
    tokens, finished, failures = run_all(engine, [good], add_at=(3, bad))
    assert failures.keys() == {9} and failures[9].code == protocol.ENGINE_FAILED
    assert finished[8] == "length" and tokens[8] == alone[7]
    # The engine is sound afterwards. (Its tokens are not compared: the prefix cache now holds
    # the resumed request's blocks, prefilled in one go rather than decoded one by one, and a
    # greedy near-tie may go the other way.)
    after, finished, failures = run_all(engine, [protocol.Add(10, story, GenerationSettings.forced(40))])
    assert not failures and len(after[10]) == 40 and finished[10] == "length"
