"""JSON schemas checked before GenAI compiles them into a grammar.

GenAI compiles a request's schema (``response_format``, a tool's ``parameters``, ollama's
``format``) inside the engine's step, where a schema its compiler rejects fails the whole step:
every request batched with it dies, not only the one that sent it. So the schema is checked when
the request is parsed, and a bad one is that request's 400. What is checked is what the grammar
compiler trips on: type names, the bounds of numbers, lengths and counts (min above max), regular
expressions that do not compile, ``$ref`` pointers that lead nowhere, and the shape of each
keyword that holds schemas. Keywords it does not know are left alone, as the compiler does.
"""

from __future__ import annotations

import re
from typing import Any, Dict

from ovchat.errors import InvalidRequestError

TYPES = frozenset(("string", "number", "integer", "boolean", "object", "array", "null"))
MAX_DEPTH = 64
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("not", "additionalProperties", "items", "contains", "propertyNames", "if", "then", "else",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_BOUNDS = (("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum"), ("minimum", "exclusiveMaximum"),
           ("exclusiveMinimum", "maximum"))
_COUNTS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
           ("minContains", "maxContains"))


def check_schema(schema: Any, where: str) -> None:
    """Raise InvalidRequestError (naming ``where`` and the place inside the schema) unless
    ``schema`` is one GenAI's grammar compiler takes."""
    _check(schema, schema, where, "", 0)


def _bad(where: str, at: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"{where} is not a usable JSON schema: {problem}" + (f" (at {at})" if at else ""), where)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(node: Any, root: Dict[str, Any], where: str, at: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _bad(where, at, f"a schema must be an object or true/false, not {type(node).__name__}")
    if depth > MAX_DEPTH:
        raise _bad(where, at, f"it is nested more than {MAX_DEPTH} levels deep")
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in TYPES for k in kinds):
            raise _bad(where, at, f"'type' is {kind!r}; it must be one of {', '.join(sorted(TYPES))} "
                                  "(or a list of them)")
    for low, high in _BOUNDS:
        for key in (low, high):
            if key in node and not _number(node[key]):
                raise _bad(where, at, f"'{key}' must be a number, not {node[key]!r}")
        if _number(node.get(low)) and _number(node.get(high)) and node[low] > node[high]:
            raise _bad(where, at, f"'{low}' ({node[low]}) is larger than '{high}' ({node[high]})")
    for low, high in _COUNTS:
        for key in (low, high):
            if key in node and (not isinstance(node[key], int) or isinstance(node[key], bool) or node[key] < 0):
                raise _bad(where, at, f"'{key}' must be a whole number of at least 0, not {node[key]!r}")
        if low in node and high in node and node[low] > node[high]:
            raise _bad(where, at, f"'{low}' ({node[low]}) is larger than '{high}' ({node[high]})")
    patterns = [node["pattern"]] if "pattern" in node else []
    if isinstance(node.get("patternProperties"), dict):
        patterns += list(node["patternProperties"])
    for pattern in patterns:
        try:
            if not isinstance(pattern, str):
                raise re.error("not a string")
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise _bad(where, at, f"the pattern {str(pattern)[:80]!r} is not a regular expression ({e})") from None
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise _bad(where, at, "'enum' must be a non-empty list")
    if "required" in node and (not isinstance(node["required"], list)
                               or not all(isinstance(r, str) for r in node["required"])):
        raise _bad(where, at, "'required' must be a list of property names")
    if "$ref" in node:
        _resolve(node["$ref"], root, where, at)
    for key in _SCHEMA_MAPS:
        if key in node:
            if not isinstance(node[key], dict):
                raise _bad(where, at, f"'{key}' must map names to schemas")
            for name, sub in node[key].items():
                _check(sub, root, where, f"{at}/{key}/{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in node:
            if not isinstance(node[key], list) or (key != "prefixItems" and not node[key]):
                raise _bad(where, at, f"'{key}' must be a non-empty list of schemas")
            for i, sub in enumerate(node[key]):
                _check(sub, root, where, f"{at}/{key}/{i}", depth + 1)
    for key in _SCHEMA_ONE:
        if key in node:
            value = node[key]
            subs = value if key == "items" and isinstance(value, list) else [value]  # old-style tuple items
            for i, sub in enumerate(subs):
                _check(sub, root, where, f"{at}/{key}" + (f"/{i}" if len(subs) > 1 else ""), depth + 1)


def _resolve(ref: Any, root: Dict[str, Any], where: str, at: str) -> None:
    """A local JSON pointer (``#``, ``#/$defs/x``) that leads to a schema; anything else is refused
    (the compiler fetches nothing)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _bad(where, at, f"'$ref' {str(ref)[:80]!r} is not a reference inside the schema (#/...)")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _bad(where, at, f"'$ref' {ref[:80]!r} points to nothing in the schema")
    if not isinstance(node, (dict, bool)):
        raise _bad(where, at, f"'$ref' {ref[:80]!r} points to something that is not a schema")
