"""The metadata filter of a search, as a JSON Schema the server enforces word for word.

The collection understands ``{"key": value}``, ``{"key>=": 3}``, ``{"key": {"gte": 1, "lt": 5}}``,
``{"key": {"in": [..]}}``, ``{"key": [..]}`` and ``{"path": "*/holiday/*"}``. The schema below says
exactly that (so a generated client, or schemathesis, sends only filters the server takes), and
``check_filter`` applies the same rules before the collection sees the filter: a filter the schema
refuses is a 422 naming the key, never a 400 from deep inside.
"""

from __future__ import annotations

import re
from typing import Any


class FilterInvalid(ValueError):
    """A filter the schema refuses (becomes 422)."""

KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*(>=|<=|!=|>|<|=)?$"
MAX_NUMBER = 2**53 - 1  # numbers compared exactly as int and as float (JSON clients hold them exactly)
RANGE_OPS = ("gte", "lte", "gt", "lt")
_KEY = re.compile(KEY_PATTERN)
_RANGE_SUFFIX = re.compile(r"(>=|<=|>|<)$")

_NUMBER = {"type": "number", "minimum": -MAX_NUMBER, "maximum": MAX_NUMBER}
_ORDERED = {"anyOf": [{"type": "string"}, _NUMBER]}  # what a range compares with
_ITEM = {"anyOf": [{"type": "string"}, _NUMBER, {"type": "boolean"}]}
_SCALAR = {"anyOf": [*_ITEM["anyOf"], {"type": "null"}]}
_LIST = {"type": "array", "items": _ITEM, "maxItems": 1000}
_OPS = {"type": "object", "additionalProperties": False, "properties": {
    **{op: _ORDERED for op in RANGE_OPS}, "eq": _SCALAR, "ne": _SCALAR, "in": _LIST}}
_PATH_OPS = {"type": "object", "additionalProperties": False, "properties": {"eq": _SCALAR, "ne": _SCALAR}}

FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": 'Metadata conditions, all must hold: {"key": value}, {"key>=": 3}, {"key": {"gte": 1, "lt": 5}}, '
                   '{"key": {"in": [..]}} or {"key": [..]}, {"path": "*/holiday/*"} (a glob). Keys: letters, digits, '
                   "'_', '.', '-', optionally ending in >=, <=, >, <, != or =. Ranges take numbers or text.",
    "propertyNames": {"pattern": KEY_PATTERN},
    "maxProperties": 64,
    "patternProperties": {
        "(>=|<=|>|<)$": _ORDERED,
        "!=$": {"anyOf": [_SCALAR, _OPS]},
        r"^[A-Za-z_][A-Za-z0-9_.\-]*=?$": {"anyOf": [_SCALAR, _LIST, _OPS]},
        "^path(>=|<=|>|<)$": False,
        "^path(=|!=)?$": {"anyOf": [_SCALAR, _PATH_OPS]},
    },
    "examples": [{"split": "test", "width>=": 64}, {"camera_make": {"in": ["Canon", "Nikon"]}}],
}


def _bad(key: str, why: str) -> FilterInvalid:
    return FilterInvalid(f"filter on {key!r}: {why} (see the 'filter' schema in /docs)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and -MAX_NUMBER <= v <= MAX_NUMBER


def _is_item(v: Any) -> bool:
    return isinstance(v, (str, bool)) or _is_number(v)


def _check_ops(key: str, ops: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for op, v in ops.items():
        if op not in allowed:
            raise _bad(key, f"unknown operator {op!r}; use {', '.join(allowed)}")
        if op in RANGE_OPS and not (isinstance(v, str) or _is_number(v)):
            raise _bad(key, f"{op} needs a number or text, not {v!r}")
        if op in ("eq", "ne") and not (v is None or _is_item(v)):
            raise _bad(key, f"{op} needs a number, text, true/false or null, not {v!r}")
        if op == "in" and not (isinstance(v, list) and len(v) <= 1000 and all(_is_item(x) for x in v)):
            raise _bad(key, "'in' needs a list of at most 1000 numbers, texts or true/false")


def check_filter(value: Any) -> dict[str, Any] | None:
    """The filter if it follows ``FILTER_SCHEMA`` (keys stripped of surrounding blanks), else ``FilterInvalid``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FilterInvalid("'filter' must be a JSON object, e.g. {\"split\": \"test\"}")
    if len(value) > 64:
        raise FilterInvalid("'filter' may hold at most 64 conditions")
    out: dict[str, Any] = {}
    for key, v in value.items():
        if not _KEY.match(key):
            raise _bad(key, "a key is letters, digits, '_', '.', '-', optionally ending in >=, <=, >, <, != or =")
        name = key.strip()
        ranged = bool(_RANGE_SUFFIX.search(name))
        is_path = re.sub(r"(>=|<=|!=|>|<|=)$", "", name) == "path"
        if is_path and ranged:
            raise _bad(key, "a path is matched by glob: use path or path!= only")
        if ranged:
            if not (isinstance(v, str) or _is_number(v)):
                raise _bad(key, f"a range needs a number or text, not {v!r}")
        elif isinstance(v, dict):
            _check_ops(key, v, ("eq", "ne") if is_path else (*RANGE_OPS, "eq", "ne", "in"))
        elif isinstance(v, list):
            if name.endswith("!=") or is_path:
                raise _bad(key, "a list of values goes with key or key= (or use {\"in\": [...]})")
            _check_ops(key, {"in": v}, ("in",))
        elif not (v is None or _is_item(v)):
            raise _bad(key, f"value {v!r} must be a number, text, true/false or null")
        out[name] = v
    return out
