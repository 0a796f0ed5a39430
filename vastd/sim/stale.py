"""Reads of the simulated vast.ai that lag behind what happened (issue 10, item 2 and 4).

The real API is eventually consistent: a listing may still show an instance destroyed a
moment ago, or miss one that runs; a per-instance lookup may say "no such instance" for
one that still bills; a DELETE may be answered and not take. `StaleReads` (one per
`SimCloud`, as `cloud.stale`) reproduces each for a given instance and number of reads:

- `hide(id, endpoint, reads)`: the next `reads` answers of `endpoint`
  (`list_instances` or `show_instance`) lack this instance although it exists;
- `lag_destroy(id, endpoint, reads)`: once it is destroyed, the next `reads` answers of
  `endpoint` still show it as it was;
- `ignore_destroy(id, count)`: the next `count` DELETEs of it answer success and leave
  it running (and billing).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

ENDPOINTS: Final = ("list_instances", "show_instance")


class StaleReads:
    """Per-instance stale reads and ignored destroys, consumed as the API answers."""

    def __init__(self) -> None:
        self._hidden: Counter[tuple[int, str]] = Counter()
        self._lagging: Counter[tuple[int, str]] = Counter()
        self._ignored: Counter[int] = Counter()
        self._destroyed_rows: dict[int, dict[str, Any]] = {}

    @staticmethod
    def _check(endpoint: str, reads: int) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
        if reads < 1:
            raise ValueError("reads must be >= 1")

    def hide(self, instance_id: int, endpoint: str = "list_instances", reads: int = 1) -> None:
        self._check(endpoint, reads)
        self._hidden[(instance_id, endpoint)] += reads

    def lag_destroy(
        self, instance_id: int, endpoint: str = "list_instances", reads: int = 1
    ) -> None:
        self._check(endpoint, reads)
        self._lagging[(instance_id, endpoint)] += reads

    def ignore_destroy(self, instance_id: int, count: int = 1) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self._ignored[instance_id] += count

    def take_ignored_destroy(self, instance_id: int) -> bool:
        """Whether this DELETE is to be answered without taking effect (consumes one)."""
        if self._ignored[instance_id] <= 0:
            return False
        self._ignored[instance_id] -= 1
        return True

    def destroyed(self, instance_id: int, row: dict[str, Any]) -> None:
        """Keep a destroyed instance's last row for lagging reads."""
        if any(k[0] == instance_id and n > 0 for k, n in self._lagging.items()):
            self._destroyed_rows[instance_id] = dict(row)

    def view(self, endpoint: str, rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """The instances one answer of `endpoint` shows, given what exists (`rows`)."""
        out = dict(rows)
        for key in [k for k, n in self._hidden.items() if k[1] == endpoint and n > 0]:
            if key[0] in out:
                del out[key[0]]
                self._hidden[key] -= 1
        for key in [k for k, n in self._lagging.items() if k[1] == endpoint and n > 0]:
            row = self._destroyed_rows.get(key[0])
            if row is not None and key[0] not in out:
                out[key[0]] = dict(row)
                self._lagging[key] -= 1
        return out

    def view_one(self, endpoint: str, instance_id: int, row: dict[str, Any] | None) -> Any:
        """What one per-instance answer shows for `instance_id` (None: no such instance)."""
        return self.view(endpoint, {instance_id: row} if row is not None else {}).get(instance_id)
