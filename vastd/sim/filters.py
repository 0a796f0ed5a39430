"""Row filtering and ordering as the vast.ai API applies them (offers and instances).

Filters are `{"field": {"op": value}}`, with values maybe strings; rows compare with
None first and fall back to string order when types differ.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any


def _coerce(value: Any, like: Any) -> Any:
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1")
        return bool(value)
    if isinstance(like, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    if isinstance(like, str) and value is not None:
        return str(value)
    return value


def _cmp(a: Any, b: Any) -> int:
    if a == b:
        return 0
    if a is None:
        return -1
    if b is None:
        return 1
    try:
        return -1 if a < b else 1
    except TypeError:
        return -1 if str(a) < str(b) else 1


def matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Whether a row passes every `{"field": {"op": value}}` filter."""
    for name, cond in filters.items():
        if not isinstance(cond, dict):
            cond = {"eq": cond}
        actual = row.get(name)
        for op, wanted in cond.items():
            if op in ("in", "notin"):
                items = wanted if isinstance(wanted, list) else [wanted]
                found = any(_coerce(w, actual) == actual for w in items)
                if found != (op == "in"):
                    return False
                continue
            target = _coerce(wanted, actual)
            if op == "eq":
                ok = actual == target
            elif op == "neq":
                ok = actual != target
            elif op in ("gt", "gte", "lt", "lte"):
                if actual is None or target is None:
                    return False
                c = _cmp(actual, target)
                ok = {"gt": c > 0, "gte": c >= 0, "lt": c < 0, "lte": c <= 0}[op]
            else:
                raise ValueError(f"unknown operator {op!r}")
            if not ok:
                return False
    return True


def sort_rows(rows: list[dict[str, Any]], order: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    order = list(order)

    def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
        for col, direction in order:
            c = _cmp(a.get(col), b.get(col))
            if c:
                return c if direction == "asc" else -c
        return 0

    return sorted(rows, key=functools.cmp_to_key(compare))
