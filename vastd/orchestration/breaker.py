"""The rental circuit breaker: stop paying for instances that never become ready.

A config that cannot work anywhere (a `[[prepare]]` step that fails on every host, an
image without sshd) would otherwise rent, fail, destroy and rent the next offer for as
long as offers last. So rentals that were given up before they ever became READY are
counted in a row (`Snapshot.failed_rentals`); at `[fleet] max_failed_rentals` renting
pauses for `[fleet] rent_pause_s` (`renting_paused`, shown by `vastd status`). The pause
and the count are in the snapshot, so a restart does not lift it.

When the pause is over the breaker is half-open: one rental at a time is tried until one
becomes ready (which resets the count) or fails (which pauses again at once). A rental
that becomes ready at any time resets the count and lifts a pause.
"""

from __future__ import annotations

from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.orchestration.context import Context
from vastd.utils.logging import get_logger

log = get_logger("vastd.fleet")

# Teardowns vastd decided on its own: not a sign the rentals cannot work.
_NOT_A_FAILURE = ("spend cap", "drained", "preempted", "idle")


def never_ready(inst: InstanceRecord) -> bool:
    """An owned instance that has not been READY once (READY sets `prepared_hash`)."""
    return inst.owned and inst.prepared_hash is None


def counts_as_failed_rental(inst: InstanceRecord, reason: str) -> bool:
    """Whether tearing `inst` down for `reason` is a rental that never became ready."""
    return never_ready(inst) and not reason.startswith(_NOT_A_FAILURE)


def paused_until(ctx: Context, now: float) -> float | None:
    """When the pause ends, or None when renting is not paused now."""
    until = ctx.store.snapshot.rent_paused_until
    return until if until is not None and until > now else None


def half_open(ctx: Context) -> bool:
    """The count is at the limit but the pause is over: try one rental at a time."""
    limit = ctx.settings.fleet.max_failed_rentals
    return limit > 0 and ctx.store.snapshot.failed_rentals >= limit


def note_rental_failed(ctx: Context, inst: InstanceRecord, reason: str, now: float) -> None:
    """Count a rental given up before it was ever ready; pause renting at the limit."""
    snap = ctx.store.snapshot
    snap.failed_rentals += 1
    ctx.store.mark_dirty()
    limit = ctx.settings.fleet.max_failed_rentals
    log.info("rental_failed", instance=inst.id, reason=reason, in_a_row=snap.failed_rentals)
    if limit <= 0 or snap.failed_rentals < limit:
        return
    pause_s = ctx.settings.fleet.rent_pause_s
    snap.rent_paused_until = now + pause_s
    snap.rent_pause_reason = (
        f"{snap.failed_rentals} rentals in a row never became ready "
        f"(last: instance {inst.id}, {reason})"
    )
    log.warning(
        "renting_paused",
        reason=snap.rent_pause_reason,
        failed_rentals=snap.failed_rentals,
        pause_s=pause_s,
        until=snap.rent_paused_until,
    )


def note_rental_ready(ctx: Context, inst: InstanceRecord) -> None:
    """An owned rental became ready: the count starts again and any pause is lifted."""
    snap = ctx.store.snapshot
    if not inst.owned or (snap.failed_rentals == 0 and snap.rent_paused_until is None):
        return
    if snap.rent_paused_until is not None:
        log.info("renting_resumed", instance=inst.id, reason="a rental became ready")
    snap.failed_rentals = 0
    snap.rent_paused_until = None
    snap.rent_pause_reason = None
    ctx.store.mark_dirty()


def rentals_allowed(ctx: Context, need: int, now: float) -> int:
    """How many of `need` rentals the breaker lets through now."""
    if paused_until(ctx, now) is not None:
        return 0
    if not half_open(ctx):
        return need
    probing = any(
        never_ready(i) and i.status not in (InstanceStatus.DESTROYING, InstanceStatus.DESTROYED)
        for i in ctx.store.instances.values()
    )
    return 0 if probing or ctx.store.snapshot.rent_intents else min(need, 1)
