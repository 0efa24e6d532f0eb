"""Metadata filters: ``key=value``, ``key>=value``, ``key__gte=value`` ... compiled to SQL over the
catalog's JSON metadata (keys written by ``imaging.image_metadata`` use expression indexes)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["FilterError", "parse_filter"]


class FilterError(ValueError):
    """A metadata filter that cannot be understood (bad key, operator or value)."""



_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_OPS = {">=": ">=", "<=": "<=", "!=": "!=", ">": ">", "<": "<", "=": "="}
_WORD_OPS = {"gte": ">=", "lte": "<=", "gt": ">", "lt": "<", "ne": "!=", "eq": "="}
_SPLIT = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")


def parse_filter(expressions: Iterable[str]) -> dict[str, Any]:
    """Parse command-line conditions like ``camera_make=Canon``, ``width>=1000``,
    ``date_taken>=2021-01-01`` or ``path=*/holiday/*`` into a filter dict. Numbers become numbers,
    ``true``/``false``/``null`` become JSON values, anything else stays text."""
    out: dict[str, Any] = {}
    for expr in expressions:
        match = _SPLIT.match(expr)
        if not match:
            raise FilterError(f"cannot read filter {expr!r}: write KEY=VALUE, KEY>=NUMBER, KEY<=NUMBER, KEY!=VALUE")
        key, op, raw = match.groups()
        value = _parse_value(raw)
        out[key if op == "=" else key + op] = value
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _compile_filter(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for raw_key, value in (filters or {}).items():
        key, op = _split_key(str(raw_key))
        if isinstance(value, dict):
            for word, v in value.items():
                if word == "in":
                    _add_clause(clauses, params, key, "in", v)
                elif word in _WORD_OPS:
                    _add_clause(clauses, params, key, _WORD_OPS[word], v)
                else:
                    raise FilterError(f"filter on {key!r}: unknown operator {word!r} (use {', '.join(_WORD_OPS)}, in)")
        elif isinstance(value, (list, tuple, set)) and op == "=":
            _add_clause(clauses, params, key, "in", list(value))
        else:
            _add_clause(clauses, params, key, op, value)
    return " AND ".join(clauses), params


def _split_key(raw: str) -> tuple[str, str]:
    for suffix in (">=", "<=", "!=", ">", "<", "="):
        if raw.endswith(suffix):
            key = raw[: -len(suffix)].strip()
            break
    else:
        key, suffix = raw.strip(), "="
    if not _KEY.match(key):
        raise FilterError(f"invalid filter key {raw!r}: use letters, digits, '_', '.', '-'")
    return key, _OPS[suffix]


def _add_clause(clauses: list[str], params: list[Any], key: str, op: str, value: Any) -> None:
    if key == "path":
        if op not in ("=", "!="):
            raise FilterError("filter on path: only path=GLOB or path!=GLOB")
        neg = "NOT " if op == "!=" else ""
        clauses.append(f"{neg}EXISTS (SELECT 1 FROM paths WHERE paths.image_id = images.id AND paths.path GLOB ?)")
        params.append(str(value))
        return
    column = {"id": "id", "hash": "hash", "size": "size", "added": "added"}.get(key)
    # The key is inlined (it matched _KEY, so it holds no quote) so SQLite can use the expression
    # indexes on INDEXED_KEYS; values are always bound parameters.
    expr = column or f"json_extract(metadata, '$.\"{key}\"')"
    key_params: list[Any] = []
    if op == "in":
        values = [_json_value(key, v) for v in value]
        if not values:
            clauses.append("0")
            return
        clauses.append(f"{expr} IN ({','.join('?' * len(values))})")
        params.extend(key_params + values)
    elif value is None:
        clauses.append(f"{expr} IS {'NOT ' if op == '!=' else ''}NULL")
        params.extend(key_params)
    else:
        if op in (">=", "<=", ">", "<") and isinstance(value, bool):
            raise FilterError(f"filter on {key!r}: a range needs a number or text, not {value!r}")
        clauses.append(f"{expr} {op} ?")
        params.extend(key_params + [_json_value(key, value)])


def _json_value(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise FilterError(f"filter on {key!r}: value {value!r} must be a number, text, true/false or null")
