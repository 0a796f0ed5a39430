"""Text from outside (API answers, file names) made fit for UTF-8 JSON."""

from __future__ import annotations

from typing import Any


def is_utf8(text: str) -> bool:
    """Whether `text` is UTF-8 (no lone surrogate: an undecodable byte of a file name
    as os functions give it, a malformed escape in an API answer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scrub(value: Any) -> Any:
    """`value` with every str in it (dict keys and values, list items) made UTF-8: a lone
    surrogate (a malformed escape in an API answer, a name's undecodable byte) becomes
    U+FFFD. Anything else is returned as it is."""
    if isinstance(value, str):
        if is_utf8(value):
            return value
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
