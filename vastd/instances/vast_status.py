"""The one map of vast.ai's `actual_status` strings to ApiState.

Every reading of a status string goes through `api_state`; nothing else in vastd
compares `actual_status` with a literal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from vastd.instances.provider import ApiState
from vastd.utils.logging import get_logger

log = get_logger("vastd.vast_provider")

# vast.ai `actual_status` -> ApiState (reference/vast_api.md). `null` is provisioning;
# `unknown` is "no heartbeat", grouped with exited/offline: lost once confirmed (and, for
# `unknown`, once SSH is silent too: see NO_HEARTBEAT).
STATUS_MAP: Final[Mapping[str, ApiState]] = {
    "": ApiState.PENDING,
    "created": ApiState.PENDING,
    "loading": ApiState.PENDING,
    "scheduling": ApiState.PENDING,
    "rebooting": ApiState.PENDING,
    "running": ApiState.RUNNING,
    "frozen": ApiState.FROZEN,
    "stopped": ApiState.STOPPED,
    "exited": ApiState.GONE,
    "unknown": ApiState.GONE,
    "offline": ApiState.GONE,
}
# GONE words that say only that the host's heartbeat stopped: the container may still run
# (and answer SSH). vastd waits on these while SSH answers (orchestration/market.py).
NO_HEARTBEAT: Final = frozenset({"unknown"})
_unrecognised: set[str] = set()


def no_heartbeat(actual_status: str | None) -> bool:
    """Whether `actual_status` is GONE only for want of the host's heartbeat."""
    return (actual_status or "").strip().lower() in NO_HEARTBEAT


def api_state(actual_status: str | None) -> ApiState:
    """The ApiState of a vast.ai `actual_status` (case and surrounding spaces ignored).

    A string not in STATUS_MAP is PENDING, logged once: vastd then waits, and the
    boot deadline or the lost grace bounds what the wait costs. Reading it as GONE
    would destroy instances and requeue jobs whenever vast.ai adds a word; reading
    it as RUNNING would send jobs to a machine nobody said was up.
    """
    key = (actual_status or "").strip().lower()
    state = STATUS_MAP.get(key)
    if state is not None:
        return state
    if key not in _unrecognised and len(_unrecognised) < 100:
        _unrecognised.add(key)
        log.warning("api_status_unrecognised", status=actual_status, treated_as="pending")
    return ApiState.PENDING
