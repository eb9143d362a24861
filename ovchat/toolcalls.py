"""Tool calls: how a model's chat template offers tools, and how its replies call them (used by
ChatSession and by the server alike).

Models call functions in their own formats; the common ones are parsed here:

- Hermes / Qwen 2.5 / Qwen 3:  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (repeatable)
- Llama 3.1 JSON:              ``{"name": ..., "parameters": {...}}`` (optionally after <|python_tag|>)
- Llama 3.2 / 4 pythonic:      ``[get_weather(city="Paris"), ...]``
- Mistral:                     ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``
- Phi-4-mini:                  ``functools[{"name": ..., "arguments": {...}}]`` (or <|tool_call|>...)

``ToolPlan`` is a turn's tools and choice, and everything that follows from them, for
ChatSession and the server alike. With ``tool_choice`` auto the chat template decides how tools
are shown and the reply is parsed for whichever format it uses (the template's own first). With
``required`` or a named function the reply is forced by a grammar instead (``forced_output``),
so it is a call whose arguments match the function's parameters whatever the model and its
template.

``Splitter`` does the same on a stream: text is passed on as it comes until something that may
start a call appears; from there on the text is held back and parsed when the reply ends.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ovchat.errors import InvalidRequestError
from ovchat.schemacheck import check_schema

MAX_TOOLS = 128  # functions offered at once (OpenAI's limit)
MAX_SCHEMA_BYTES = 65536  # one function's parameters schema, as JSON
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")



@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: Dict[str, Any]

    def as_template_dict(self) -> Dict[str, Any]:
        """The OpenAI shape chat templates expect in ``tools``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Dict[str, Any]
    id: str = ""

    def as_openai(self, index: Optional[int] = None) -> Dict[str, Any]:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return call if index is None else {"index": index, **call}


def parse_tools(tools: Any) -> Tuple[Tool, ...]:
    """OpenAI's ``tools`` (``[{'type': 'function', 'function': {...}}]``) as Tools, checked."""
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools")
    out: List[Tool] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'", f"{where}.function.name")
        if any(t.name == name for t in out):
            raise InvalidRequestError(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        description = function.get("description", "")
        if not isinstance(description, str) or len(description) > 4096:
            raise InvalidRequestError(f"{where}.function.description must be text of at most 4096 characters",
                      f"{where}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        if len(json.dumps(parameters)) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(f"{where}.function.parameters is larger than {MAX_SCHEMA_BYTES} bytes",
                      f"{where}.function.parameters")
        check_schema(parameters, f"{where}.function.parameters")
        out.append(Tool(name, description, parameters))
    return tuple(out)


def parse_tool_choice(choice: Any, tools: Tuple[Tool, ...]) -> str:
    """OpenAI's ``tool_choice`` as auto, none, required or a function's name."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise InvalidRequestError("'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
        return choice
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise InvalidRequestError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                  "{'name': ...}}", "tool_choice")
    if not any(t.name == name for t in tools):
        raise InvalidRequestError(f"'tool_choice' names {name!r}, which is not among 'tools'", "tool_choice")
    return name


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolPlan:
    """A turn's tools and how they may be used: ``choice`` is auto (the model decides; its reply
    is parsed for calls in its own format), required or a function's name (a call forced by a
    grammar), or none."""

    tools: Tuple[Tool, ...] = ()
    choice: str = "none"
    parallel: bool = True  # False: a reply's first call only (OpenAI's parallel_tool_calls)

    @classmethod
    def from_request(cls, tools: Any = None, tool_choice: Any = None) -> "ToolPlan":
        """OpenAI's ``tools`` (or Tools) and ``tool_choice``, checked. A bare function name is
        taken as that function, as `ovchat run --tool-choice NAME` gives it."""
        parsed = tuple(t for t in tools or () if isinstance(t, Tool)) + \
            parse_tools([t for t in tools or () if not isinstance(t, Tool)] if tools is not None else None)
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        return cls(parsed, parse_tool_choice(tool_choice, parsed))

    @property
    def forced(self) -> bool:
        return bool(self.tools) and self.choice not in ("auto", "none")

    @property
    def auto(self) -> bool:
        """The model may call: its reply is parsed for calls."""
        return bool(self.tools) and self.choice == "auto"

    def check(self, template: str, model: str) -> None:
        """Refuse ``auto`` where the chat template would not show the tools to the model."""
        if self.auto and not template_offers_tools(template):
            raise InvalidRequestError(
                f"the chat template of {model} has no place for tools, so the model cannot choose to call one; "
                "force a call with tool_choice 'required' or a function's name (a grammar makes it)",
                param="tool_choice", code="tools_not_supported")

    def template_tools(self, template: str) -> Optional[List[Dict[str, Any]]]:
        """The tools to render through the chat template, or None where none are shown."""
        if self.tools and self.choice != "none" and template_offers_tools(template):
            return [t.as_template_dict() for t in self.tools]
        return None

    def grammar(self) -> Dict[str, Any]:
        """GenerationSettings fields that force the call (none unless forced)."""
        return forced_output(self.tools, self.choice) if self.forced else {}

    def splitter(self, template: str) -> Optional["Splitter"]:
        """Where calls are parsed from a streamed reply, the splitter that holds them back."""
        return Splitter(self.tools, template) if self.auto else None

    def finish(self, text: str, template: str) -> Tuple[str, List[ToolCall]]:
        """A whole reply as (its text outside calls, the calls it makes)."""
        if self.forced:
            call = forced_call(text, self.tools, self.choice)
            return ("", [call]) if call is not None else (text, [])
        if self.auto:
            return parse(text, self.tools, template)
        return text, []

    def as_request(self) -> Dict[str, Any]:
        """The plan as OpenAI request fields (for a turn sent to `ovchat serve`)."""
        if not self.tools:
            return {}
        choice: Any = self.choice if self.choice in ("auto", "none", "required") else \
            {"type": "function", "function": {"name": self.choice}}
        return {"tools": [t.as_template_dict() for t in self.tools], "tool_choice": choice}


def template_offers_tools(template: str) -> bool:
    """Whether a chat template renders the ``tools`` it is given (a Jinja template that never
    mentions them would silently drop them)."""
    return bool(re.search(r"\btools\b", template or ""))


# Where a call may start, per format (the first marker found in the template is tried first).
_MARKERS = {
    "hermes": "<tool_call>",
    "mistral": "[TOOL_CALLS]",
    "phi4": "functools[",
    "phi4-tag": "<|tool_call|>",
    "llama3": "<|python_tag|>",
}


def _format_order(template: str) -> List[str]:
    order = [name for name, marker in _MARKERS.items() if marker in (template or "")]
    return order + [name for name in _MARKERS if name not in order]


def parse(text: str, tools: Sequence[Tool], template: str = "") -> Tuple[str, List[ToolCall]]:
    """The reply's text outside any calls, and the calls of offered functions it makes.

    A reply in none of the formats, or whose calls name no offered function or carry arguments
    that are not JSON objects, is plain text: the calls are [] and the text is unchanged.
    """
    names = {t.name for t in tools}
    for fmt in _format_order(template):
        marker = _MARKERS[fmt]
        at = text.find(marker)
        if at < 0:
            continue
        before, rest = text[:at], text[at + len(marker):]
        if fmt == "hermes":
            calls, after = _hermes(text[at:])
        elif fmt == "phi4-tag":
            body, _, after = rest.partition("<|/tool_call|>")
            calls = _json_calls(body)
        elif fmt == "phi4":
            body, after = _balanced("[" + rest)
            calls = _json_calls(body)
        else:
            calls, after = _json_calls(rest), ""
        calls = [c for c in calls if c.name in names]
        if calls:
            return (before + after).strip(), calls
    stripped = text.strip()
    if stripped.startswith("{") or stripped.startswith("["):
        calls = [c for c in _json_calls(stripped) or _pythonic(stripped) if c.name in names]
        if calls:
            return "", calls
    return text, []


def _hermes(text: str) -> Tuple[List[ToolCall], str]:
    calls, rest = [], text
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
        calls += _json_calls(m.group(1))
        rest = text[m.end():]
    return calls, rest


def _balanced(text: str) -> Tuple[str, str]:
    """The leading bracketed JSON of ``text`` and what follows it (naive about brackets in strings
    only as far as JSON's own escaping allows)."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return text[:i + 1], text[i + 1:]
    return text, ""


def _json_calls(text: str) -> List[ToolCall]:
    """Calls in a JSON object, an array of them, or objects separated by ';' (Llama 3.1)."""
    text = text.strip()
    candidates: List[Any] = []
    try:
        value = json.loads(text)
        candidates = value if isinstance(value, list) else [value]
    except ValueError:
        for part in text.split(";"):
            try:
                candidates.append(json.loads(part))
            except ValueError:
                return []
    calls = []
    for item in candidates:
        if not isinstance(item, dict):
            return []
        if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
            item = item["function"]
        name = item.get("name")
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return []
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return []
        calls.append(ToolCall(name, arguments, new_call_id()))
    return calls


def _pythonic(text: str) -> List[ToolCall]:
    """``[f(a=1, b="x"), g()]``: Python call syntax with literal keyword arguments."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return []
    items = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for item in items:
        if not isinstance(item, ast.Call) or not isinstance(item.func, ast.Name) or item.args:
            return []
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in item.keywords if kw.arg}
        except ValueError:
            return []
        calls.append(ToolCall(item.func.id, arguments, new_call_id()))
    return calls


class Splitter:
    """A streamed reply split into the text to pass on now and the calls found at the end.

    Text is passed on until a marker of a call format appears (or, at the very start of the
    reply, an opening bracket or brace, which may begin a JSON or pythonic call); the rest is
    held back and parsed by ``finish``. A marker cut between two pieces is held back too.
    """

    def __init__(self, tools: Sequence[Tool], template: str):
        self.tools, self.template = tools, template
        self._text = ""
        self._sent = 0
        self._holding = False

    def feed(self, piece: str) -> str:
        self._text += piece
        if self._holding:
            return ""
        start = self._text[self._sent:]
        if not self._text.strip():
            return ""
        if self._sent == 0 and self._text.lstrip()[:1] in "[{":
            self._holding = True
            return ""
        for marker in _MARKERS.values():
            at = self._text.find(marker, self._sent)
            if at >= 0:
                self._holding = True
                out, self._sent = self._text[self._sent:at], at
                return out
        # Keep back a tail that could be the beginning of a marker.
        keep = max((k for marker in _MARKERS.values() for k in range(1, len(marker))
                    if start.endswith(marker[:k])), default=0)
        end = len(self._text) - keep
        out, self._sent = self._text[self._sent:end], max(self._sent, end)
        return out

    def finish(self) -> Tuple[str, List[ToolCall]]:
        """The held-back text not part of a call, and the calls."""
        held = self._text[self._sent:]
        content, calls = parse(held, self.tools, self.template)
        return (content if calls else held), calls


def forced_output(tools: Sequence[Tool], choice: str) -> Dict[str, Any]:
    """The structured-output settings (``GenerationSettings`` fields) that force a call of
    ``choice`` (a function's name: the reply is its arguments, by their JSON schema) or, for
    ``required``, of any offered function: ``{"name": ..., "arguments": {...}}`` with the
    name and the JSON around the arguments fixed strings of the grammar (a JSON schema alone
    would let a small model wander into endless whitespace between its keys)."""
    if choice != "required":
        return {"json_schema": json.dumps(next(t.parameters for t in tools if t.name == choice))}
    return {"call_choices": [[t.name, json.dumps(t.parameters)] for t in tools]}


def call_prefix(name: str) -> str:
    """The fixed text before a forced call's arguments (``forced_output``'s ``required`` form)."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def forced_call(text: str, tools: Sequence[Tool], choice: str) -> Optional[ToolCall]:
    """The call a grammar-forced reply makes (None if the reply was cut short by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if choice != "required":
        return ToolCall(choice, value, new_call_id()) if isinstance(value, dict) else None
    if not isinstance(value, dict) or not isinstance(value.get("arguments"), dict):
        return None
    return ToolCall(value.get("name"), value["arguments"], new_call_id())
