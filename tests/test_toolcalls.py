"""Tool calls in each model family's format, streamed and whole; reasoning split from content;
and the same tools through ChatSession and `ovchat run` on the real demo model."""

from __future__ import annotations

import json
import random

import pytest

from ovchat.server.responses import Reasoning
from ovchat.toolcalls import Splitter, parse, parse_tools

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "set_light", "parameters": {
        "type": "object", "properties": {"room": {"type": "string"}, "on": {"type": "boolean"}}}}},
])
PARIS = {"city": "Paris"}
PORCH = {"room": "porch", "on": True}
FORMATS = {
    "hermes": ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
               '<tool_call>{"name": "set_light", "arguments": {"room": "porch", "on": true}}</tool_call>',
               "Let me check.", [("get_weather", PARIS), ("set_light", PORCH)], "<tool_call>"),
    "llama3-json": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", PARIS)], ""),
    "llama3-python-tag": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                          '{"name": "set_light", "parameters": {"room": "porch", "on": true}}', "",
                          [("get_weather", PARIS), ("set_light", PORCH)], "<|python_tag|>"),
    "pythonic": ('[get_weather(city="Paris"), set_light(room="porch", on=True)]', "",
                 [("get_weather", PARIS), ("set_light", PORCH)], ""),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
                [("get_weather", PARIS)], "[TOOL_CALLS]"),
    "phi4-mini": ('functools[{"name": "set_light", "arguments": {"room": "porch", "on": true}}]', "",
                  [("set_light", PORCH)], "functools"),
    "phi4-tag": ('<|tool_call|>[{"type": "function", "function": {"name": "get_weather", '
                 '"arguments": "{\\"city\\": \\"Paris\\"}"}}]<|/tool_call|>', "", [("get_weather", PARIS)],
                 "<|tool_call|>"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_parses_whole_and_streamed(fmt):
    text, content, calls, template = FORMATS[fmt]
    got_content, got = parse(text, TOOLS, template)
    assert got_content == content and [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got)
    rnd = random.Random(1)
    for _ in range(20):  # cut anywhere, markers included
        splitter, shown, at = Splitter(TOOLS, template), "", 0
        while at < len(text):
            step = rnd.randint(1, 7)
            shown += splitter.feed(text[at:at + step])
            at += step
        rest, streamed = splitter.finish()
        assert (shown + rest).strip() == content and [(c.name, c.arguments) for c in streamed] == calls


def test_plain_text_and_calls_of_unknown_functions_stay_text():
    for text in ("The weather in Paris is sunny.", "[1, 2, 3] are numbers", '{"a": 1}',
                 '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>', "<tool_call>not json"):
        content, calls = parse(text, TOOLS)
        assert calls == [] and content == text
        splitter = Splitter(TOOLS, "")
        shown = "".join(splitter.feed(ch) for ch in text)
        rest, streamed = splitter.finish()
        assert shown + rest == text and streamed == []


def test_reasoning_is_split_from_content_wherever_the_tags_are_cut():
    text = "<think>The user greets me.\nI should greet back.</think>\nHello there!"
    rnd = random.Random(2)
    for _ in range(30):
        reasoning, parts, at = Reasoning(), {"reasoning_content": "", "content": ""}, 0
        while at < len(text):
            step = rnd.randint(1, 5)
            for k, v in reasoning.feed(text[at:at + step]).items():
                parts[k] += v
            at += step
        for k, v in reasoning.flush().items():
            parts[k] += v
        assert parts == {"reasoning_content": "The user greets me.\nI should greet back.", "content": "Hello there!"}
    opened = Reasoning(thinking=True)  # the prompt ended with <think>
    assert opened.feed("pondering</think>answer") == {"reasoning_content": "pondering", "content": "answer"}
    assert Reasoning().feed("no tags here") == {"content": "no tags here"}


@pytest.mark.slow
def test_chat_session_forced_call_round_trip_and_json(session):
    lights = [{"type": "function", "function": {"name": "set_light", "description": "Turn a light on or off.",
                                                "parameters": {"type": "object", "properties": {
                                                    "room": {"type": "string", "enum": ["porch", "kitchen"]},
                                                    "on": {"type": "boolean"}}, "required": ["room", "on"],
                                                    "additionalProperties": False}}}]
    reply = session.send("Turn on the porch light.", tools=lights, tool_choice="set_light", max_new_tokens=60)
    assert reply == "" and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call.name == "set_light" and set(call.arguments) == {"room", "on"} and call.arguments["room"] in ("porch",
                                                                                                          "kitchen")
    assert session.messages[-1]["tool_calls"][0]["function"]["name"] == "set_light"
    session.add_tool_result(call, {"ok": True})
    after = session.send(max_new_tokens=20)
    assert after.tool_calls == () and session.messages[-2]["role"] == "tool"
    answer = session.send("Name a city and its country.", max_new_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
            "required": ["city", "country"], "additionalProperties": False}}})
    assert set(json.loads(answer)) == {"city", "country"}
    from ovchat.errors import InputError

    with pytest.raises(InputError, match="no place for tools"):
        session.send("hi", tools=lights)  # auto needs a template that shows tools


@pytest.mark.slow
def test_run_prints_forced_calls_as_json_lines(demo_model, tmp_path):
    from conftest import run_ovchat

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "set_light", "parameters": {
        "type": "object", "properties": {"room": {"type": "string", "enum": ["porch"]}, "on": {"type": "boolean"}},
        "required": ["room", "on"]}}}]))
    done = run_ovchat("run", "-m", str(demo_model), "Turn on the porch light", "--tools", str(tools),
                      "--tool-choice", "required")
    assert done.returncode == 0, done.stderr.decode()
    call = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert call["name"] == "set_light" and call["arguments"]["room"] == "porch" and call["id"].startswith("call_")
    json_reply = run_ovchat("run", "-m", str(demo_model), "Name a city", "--format", "json", "--max-new-tokens", "40",
                            "--json")
    assert json.loads(json_reply.stdout)["tool_calls"] == []
