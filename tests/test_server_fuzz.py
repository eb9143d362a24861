"""Fuzzing the server's request handling with hypothesis: no input is a 500 or a traceback.

Bodies are generated around the fields the API knows (messages, tools, response_format, stop,
logprobs, n, the sampling values...) with values of every JSON type, plus raw bytes and lone
surrogates. They go through the real Starlette app and the real schema; the engine behind it is
an empty directory that cannot load, so a valid request ends in a 503 instead of running the
model (running it would make each example take seconds; the live server tests cover generation).
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ovchat.errors import InvalidRequestError  # noqa: E402
from ovchat.server.schema import GenerationRequest, parse_chat, parse_completion  # noqa: E402

MODEL = "m"
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=20), st.sampled_from(["\ud800", "auto", "none", "required", "text",
                                                             "json_object", "json_schema", "function", "user",
                                                             "assistant", "tool", "system", MODEL]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=12), inner,
                                                                              max_size=4)), max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer",
                                                          "robot", 3])},
                                optional={"content": json_value, "tool_calls": json_value,
                                          "tool_call_id": json_value, "name": json_value})
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "other"])},
                             optional={"function": st.fixed_dictionaries({}, optional={
                                 "name": st.one_of(st.text(max_size=70), json_value),
                                 "description": json_value, "parameters": json_value})})
FIELDS = {
    "model": st.one_of(st.just(MODEL), json_value),
    "messages": st.one_of(st.lists(message, max_size=4), json_value),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3), json_value),
    "tools": st.one_of(st.lists(tool, max_size=3), json_value),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]),
                             st.fixed_dictionaries({"type": st.just("function"),
                                                    "function": st.fixed_dictionaries({"name": json_value})}),
                             json_value),
    "response_format": st.one_of(st.fixed_dictionaries({"type": json_leaf}, optional={"json_schema": json_value}),
                                 json_value),
    "stop": st.one_of(st.lists(st.text(max_size=5), max_size=20), json_value),
    "n": json_value, "logprobs": json_value, "top_logprobs": json_value, "max_tokens": json_value,
    "max_completion_tokens": json_value, "temperature": json_value, "top_p": json_value, "top_k": json_value,
    "seed": json_value, "stream": json_value, "stream_options": json_value, "presence_penalty": json_value,
    "frequency_penalty": json_value, "repetition_penalty": json_value, "echo": json_value, "suffix": json_value,
    "best_of": json_value, "parallel_tool_calls": json_value,
}
body = st.one_of(st.fixed_dictionaries({}, optional=FIELDS), json_value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body)
def test_the_schema_either_accepts_or_names_what_is_wrong(value):
    for parse in (parse_chat, parse_completion):
        try:
            parsed = parse(value)
        except InvalidRequestError as e:
            assert str(e)
            continue
        assert isinstance(parsed, GenerationRequest)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from starlette.testclient import TestClient

    from server_helpers import in_process_app

    return TestClient(in_process_app(tmp_path_factory.mktemp("m"), MODEL), raise_server_exceptions=False)


def _check(response) -> None:
    assert response.status_code in (400, 413, 415, 503), (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(body, st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_body_is_a_server_error(client, value, path):
    _check(client.post(path, content=json.dumps(value).encode(), headers={"Content-Type": "application/json"}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.sampled_from(["application/json", "text/plain", "", "application/json; x=1"]))
def test_no_bytes_are_a_server_error(client, raw, kind):
    _check(client.post("/v1/chat/completions", content=raw, headers={"Content-Type": kind} if kind else {}))
