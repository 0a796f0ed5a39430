"""Fault injection for the simulated vast.ai API: what a request gets instead of the answer.

`Faults` holds the switchable rules (`Fault`); `fault_response` builds the reply a
fired rule stands for (an error status, an empty, HTML, wrong-shaped or raw body).
`json_response` is the JSON reply every simulated endpoint uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from aiohttp import web

_BODY_KINDS: Final = frozenset({"json", "empty", "html", "wrong_shape", "raw"})


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """JSON with Content-Type exactly `application/json` (the vastai CLI insists)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


@dataclass
class Fault:
    """One injected fault: which requests it hits and what they get instead.

    `endpoint` is a route name (`list_instances`, `show_instance`, `search_offers`,
    `rent`, `destroy`, `update_instance`, `reboot`, `attach_ssh`, `current_user`) or
    `*`. `count` hits then the fault removes itself (None: until cleared), each with
    `probability`. `status` None only delays. `after_effect`: do the real work first,
    then answer the fault (a rent that creates the instance but answers 500).
    `body`: json (`{"success": false, "error": error}`), empty, html, wrong_shape, raw.
    """

    endpoint: str = "*"
    method: str | None = None
    status: int | None = 500
    count: int | None = 1
    probability: float = 1.0
    retry_after: str | None = None
    error: str | None = None
    body: str = "json"
    raw_body: str | None = None
    json_body: Any = None
    delay_s: float = 0.0
    after_effect: bool = False
    id: int = 0
    hits: int = 0


class Faults:
    """The switchable set of faults; all changes take effect on the next request."""

    def __init__(self, seed: int = 0) -> None:
        self._rules: list[Fault] = []
        self._next_id = 1
        self._rng = random.Random(seed)

    def add(self, **kwargs: Any) -> int:
        """Add a fault (fields of `Fault`); return its id."""
        known = {f.name for f in fields(Fault)} - {"id", "hits"}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        rule = Fault(**kwargs)
        if rule.body not in _BODY_KINDS:
            raise ValueError(f"body must be one of {sorted(_BODY_KINDS)}")
        rule.id, self._next_id = self._next_id, self._next_id + 1
        self._rules.append(rule)
        return rule.id

    def remove(self, fault_id: int) -> None:
        self._rules = [r for r in self._rules if r.id != fault_id]

    def clear(self) -> None:
        self._rules.clear()

    def list(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self._rules]

    def pick(self, endpoint: str, method: str) -> Fault | None:
        """The first fault that fires for this request, counting it down."""
        for rule in self._rules:
            if rule.endpoint not in ("*", endpoint):
                continue
            if rule.method is not None and rule.method.upper() != method:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule.hits += 1
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.remove(rule.id)
            return rule
        return None


def fault_response(rule: Fault) -> web.Response:
    headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else None
    status = rule.status or 200
    if rule.body == "empty":
        return web.Response(body=b"", status=status, headers=headers)
    if rule.body == "html":
        html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(body=html, status=status, headers=headers, content_type="text/html")
    if rule.body == "raw":
        raw = (rule.raw_body or "").encode()
        return web.Response(body=raw, status=status, headers=headers)
    if rule.body == "wrong_shape":
        return json_response({"instances": "x", "offers": "x"}, status, headers)
    if rule.json_body is not None:
        return json_response(rule.json_body, status, headers)
    error = rule.error or ("rate_limited" if status == 429 else "server_error")
    return json_response({"success": False, "error": error, "msg": error}, status, headers)
