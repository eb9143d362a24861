"""Constrained output: a reply that must be JSON (any object, or one following a schema), or a
forced tool call, enforced token by token by GenAI's structured output (a grammar).

``parse_response_format`` reads OpenAI's ``response_format``; ``settings`` turns it, or a forced
tool choice, into plain fields (``json_schema`` or ``call_choices``) that can cross a process
boundary; ``genai_config`` turns those into GenAI's StructuredOutputConfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from ovchat.errors import InvalidRequestError
from ovchat.schemacheck import check_schema
from ovchat.toolcalls import MAX_SCHEMA_BYTES, ToolPlan, call_prefix



@dataclass(frozen=True)
class ResponseFormat:
    """``json_object`` (any JSON object) or ``json_schema`` (this schema)."""

    kind: str
    schema: Optional[Dict[str, Any]] = None
    name: Optional[str] = None

    def as_request(self) -> Dict[str, Any]:
        """Back in OpenAI's request form (for a turn sent to `ovchat serve`)."""
        if self.kind == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name or "reply", "schema": self.schema}}


def parse_response_format(fmt: Any) -> Optional[ResponseFormat]:
    """OpenAI's ``response_format`` (text, json_object, json_schema), checked; None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError("'response_format.json_schema' must be {'name': ..., 'schema': {...}, 'strict': ...}",
                      "response_format.json_schema")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise InvalidRequestError("'response_format.json_schema.strict' must be true or false", "response_format.json_schema")
        if len(json.dumps(spec["schema"])) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(f"'response_format.json_schema.schema' is larger than {MAX_SCHEMA_BYTES} bytes",
                      "response_format.json_schema")
        check_schema(spec["schema"], "response_format.json_schema.schema")
        name = spec.get("name")
        return ResponseFormat("json_schema", spec["schema"], name if isinstance(name, str) else None)
    raise InvalidRequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")


def settings(response_format: Optional[ResponseFormat], plan: Optional[ToolPlan] = None) -> Dict[str, Any]:
    """The structured-output fields (GenerationSettings) of a turn: a forced call, a JSON reply,
    or nothing."""
    if plan is not None and plan.forced:
        return plan.grammar()
    if response_format is not None:
        schema = response_format.schema if response_format.kind == "json_schema" else {"type": "object"}
        return {"json_schema": json.dumps(schema)}
    return {}


def genai_config(*, json_schema: Optional[str] = None, call_choices: Optional[Sequence[Sequence[str]]] = None) -> Any:
    """GenAI's StructuredOutputConfig for a JSON schema, or for one of several forced calls
    (``toolcalls.forced_output``'s fields), or None."""
    import openvino_genai

    grammar = openvino_genai.StructuredOutputConfig
    if json_schema is not None:
        return grammar(json_schema=json_schema)
    if not call_choices:
        return None
    calls = [grammar.Concat(grammar.ConstString(call_prefix(name)), grammar.JSONSchema(schema), grammar.ConstString("}"))
             for name, schema in call_choices]
    return grammar(compound_grammar=calls[0] if len(calls) == 1 else grammar.Union(*calls))
