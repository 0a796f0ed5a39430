"""Text from outside (API answers, file names) made fit for UTF-8 JSON."""

from __future__ import annotations

from typing import Any


def scrub(value: Any) -> Any:
    """`value` with every str in it (dict keys and values, list items) made UTF-8: a lone
    surrogate (a malformed escape in an API answer, a name's undecodable byte) becomes
    U+FFFD. Anything else is returned as it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
        return value
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
