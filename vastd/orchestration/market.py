"""vast.ai as it really behaves: what each listed state, price and end date means.

The map of `actual_status` words is vastd/instances/vast_status.py; this module is
what vastd does about each ApiState, and about the market around it:

- PENDING (`null`, created, loading, scheduling, rebooting): wait, within `[fleet]
  boot_timeout_s`. An owned instance that was up and is listed pending again (a
  reboot, a host moving it) gets its boot deadline again; past it, it is destroyed.
- FROZEN: billing but unusable. Listed frozen for `[fleet] frozen_grace_s`, it is
  drained and its jobs run elsewhere (not an attempt); in autoscale mode, destroyed.
- STOPPED: the disk still bills. For an interruptible instance it means outbid: it is
  paused and may resume. Its jobs run elsewhere (not an attempt); then `[fleet]
  on_outbid = "destroy"` tears it down, while "rebid" raises the bid (by `bid_markup`,
  at least 10 %, never past `max_bid_dph` nor `max_total_dph`) and waits
  `boot_timeout_s` for it to run again before bidding again; at the cap, destroyed.
  A re-bid the API refuses is tried again with back-off (REBID_BACKOFF, never slower
  than `boot_timeout_s`); after REBID_FAILURES_MAX in a row, destroyed as outbid.
  Running again, it is prepared and used like any other.
- GONE (exited, unknown, offline): lost once the per-instance lookup says so too.
  `unknown` only says the host's heartbeat stopped: while SSH has answered within
  `[ssh] unreachable_grace_s`, the instance is not lost (nor looked up) and stays in
  use; once SSH is silent that long as well, it is lost as above.
- The price of a running contract is what the listing says now (validated at the
  provider boundary); a rise that takes the fleet past `max_total_dph` drains it. An
  instance vastd rented never counts less than it was rented (or re-bid) at
  (`rented_dph`), and a listed 0 is no price (inventory.refresh_record).
- A rental ends at its offer's end date: no job is dispatched that would run past
  it (see `estimated_run_s`), and the instance is drained once none would fit.
- A key that stopped working (SSH auth refused) is re-attached through the API and
  the connection tried once more before the instance counts as unreachable.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import UTC, datetime

from vastd.core import state as st
from vastd.core.state import InstanceRecord, InstanceStatus, JobState
from vastd.instances.provider import ApiState, Offer, ProviderInstance
from vastd.instances.vast_status import api_state, no_heartbeat
from vastd.orchestration.context import Context
from vastd.orchestration.renting import accrue_instance, attach_public_key, current_dph
from vastd.utils.exceptions import VastAIError
from vastd.utils.logging import get_logger
from vastd.utils.supervise import Backoff

log = get_logger("vastd.market")

ESTIMATE_SAMPLE = 200  # the most recent finished jobs the run-time estimate looks at
KEY_REATTACH_EVERY_S = 300.0  # at most one re-attach of the SSH key per instance this often
MIN_REBID_RAISE = 1.1  # each re-bid is at least 10 % above the bid that was outbid
REBID_FAILURES_MAX = 3  # failed re-bids in a row, then the outbid instance is torn down
# after a failed re-bid: 30 s, 60 s, ... (never more than `boot_timeout_s`)
REBID_BACKOFF = Backoff(base_s=30.0, max_s=600.0, jitter="none")
_EPS = 1e-9
FROZEN_DRAIN = "frozen for more than"  # how a frozen instance's drain reason starts
END_DRAIN = "its rental ends at"  # how the drain reason of a rental about to end starts


# --- one listing of one instance -----------------------------------------------------------
async def on_listed(
    ctx: Context, inst: InstanceRecord, info: ProviderInstance, old_dph: float, now: float
) -> str | None:
    """Apply what one listing says about a known instance; why it is lost now, or None.

    Called by discovery after the record was refreshed (`old_dph` is its $/h before);
    the caller marks it lost when a reason comes back (its jobs then run elsewhere).
    """
    inst.interruptible = info.interruptible
    if info.end_date is not None and info.end_date > inst.first_seen:
        inst.end_date = info.end_date  # (one before we first saw it is not a real end)
    if info.state is not ApiState.FROZEN:
        inst.frozen_since = None
    note_price(ctx, inst, old_dph, now)
    if info.state is ApiState.GONE:
        if no_heartbeat(info.raw_status) and ssh_answered_lately(ctx, inst, now):
            log.info(
                "instance_gone_unconfirmed",
                instance=inst.id,
                listed=inst.api_status,
                ssh_answered_s_ago=round(now - (inst.last_contact or now), 1),
            )
            return None
        return await confirm_gone(ctx, inst)
    if info.state is ApiState.STOPPED:
        return "outbid (stopped)" if inst.interruptible else "stopped (its disk still bills)"
    if info.state is ApiState.PENDING:
        restart_boot_deadline(ctx, inst, now)
    elif info.state is ApiState.FROZEN:
        drain_if_frozen(ctx, inst, now)
    else:
        undrain_if_thawed(ctx, inst)
        if inst.rebid_at is not None:
            log.info("instance_resumed", instance=inst.id, dph=inst.dph)
            inst.rebid_at = None
            inst.rebid_failures = 0
    drain_before_end(ctx, inst, now)
    ctx.store.mark_dirty()
    return None


async def confirm_gone(ctx: Context, inst: InstanceRecord) -> str | None:
    """Exited/unknown/offline in the listing: lost only if the per-instance lookup agrees.

    A listing can be stale; one that cannot be confirmed (the lookup failed, or says it
    runs) is looked at again on the next listing.
    """
    if inst.status in st.GONE or ctx.cloud is None:
        return None
    try:
        shown = await ctx.cloud.show_instance(inst.id)
    except VastAIError as exc:
        log.warning("instance_gone_unconfirmed", instance=inst.id, error=str(exc))
        return None
    if shown is None:
        return f"vast.ai reports it {inst.api_status}, and no longer has it"
    if shown.state is ApiState.GONE:
        return f"vast.ai reports it {shown.raw_status}"
    log.info(
        "instance_gone_unconfirmed",
        instance=inst.id,
        listed=inst.api_status,
        shown=shown.raw_status,
    )
    return None


def ssh_answered_lately(ctx: Context, inst: InstanceRecord, now: float) -> bool:
    """SSH answered within `[ssh] unreachable_grace_s` (a health check or a job poll):
    a listing without heartbeat (`unknown`) does not make such an instance lost. One
    vast.ai poll of `unknown` destroyed healthy instances and ran their jobs twice."""
    last = inst.last_contact
    return last is not None and now - last < ctx.settings.ssh.unreachable_grace_s


def restart_boot_deadline(ctx: Context, inst: InstanceRecord, now: float) -> None:
    """An owned instance that was up and is pending again waits within the boot deadline."""
    if not inst.owned or inst.status in st.GONE:
        return
    if inst.booting_since is not None or inst.last_contact is None:
        return  # still booting for the first time: that deadline already runs
    inst.booting_since = now
    log.warning(
        "instance_pending",
        instance=inst.id,
        status=inst.api_status,
        deadline_s=ctx.settings.fleet.boot_timeout_s,
    )


def drain_if_frozen(ctx: Context, inst: InstanceRecord, now: float) -> None:
    """Frozen past the grace: drained, its jobs requeued (it bills but runs nothing)."""
    if inst.status in st.GONE:
        return
    inst.frozen_since = inst.frozen_since or now
    grace = ctx.settings.fleet.frozen_grace_s
    if now - inst.frozen_since < grace:
        return
    reason = f"{FROZEN_DRAIN} {grace:g}s (billing but unusable)"
    st.drain_instance(ctx.store, inst, reason, requeue_jobs=True)
    ctx.wake_dispatch()


def undrain_if_thawed(ctx: Context, inst: InstanceRecord) -> None:
    """Drained for being frozen and running again (an adopted one: an owned one is
    destroyed once empty): prepared again, its job folders swept, then it gets jobs."""
    if inst.status is not InstanceStatus.DRAINING:
        return
    if not (inst.drain_reason or "").startswith(FROZEN_DRAIN):
        return
    st.note_resweep(ctx.store, inst, True)
    st.undrain_instance(ctx.store, inst, prepare_first=True)
    log.info("instance_thawed", instance=inst.id, status=inst.status.value)
    ctx.wake_dispatch()


# --- prices -------------------------------------------------------------------------------
def note_price(ctx: Context, inst: InstanceRecord, old_dph: float, now: float) -> None:
    """The host changed the price: log it; a rise past `max_total_dph` drains the instance.

    Drained, not destroyed: its running jobs finish (they are paid for already); in
    autoscale mode it is destroyed once empty, and nothing more is rented past the cap.
    """
    if abs(inst.dph - old_dph) <= _EPS:
        return
    # The time up to this listing is billed at the price it had (accrual reads inst.dph).
    new_dph, inst.dph = inst.dph, old_dph
    accrue_instance(ctx, inst, now)
    inst.dph = new_dph
    log.info("instance_price_changed", instance=inst.id, dph_was=old_dph, dph=inst.dph)
    if inst.dph < old_dph or inst.status in st.GONE or inst.status is InstanceStatus.DRAINING:
        return
    cap = ctx.settings.fleet.max_total_dph
    total = current_dph(ctx)
    before = total - inst.dph + old_dph
    # Adopted instances may be past the cap from the start (vastd did not rent them):
    # only the rise that crosses it drains one; an owned one, any rise past it.
    if total > cap + _EPS and (inst.owned or before <= cap + _EPS):
        reason = f"its price rose to {inst.dph:g} $/h: {total:g} $/h in all, past max_total_dph"
        st.drain_instance(ctx.store, inst, reason, requeue_jobs=False)
        ctx.wake_dispatch()


# --- outbid ---------------------------------------------------------------------------------
def next_bid(ctx: Context, inst: InstanceRecord) -> float | None:
    """The bid to try after an outbid, or None when the caps leave no higher one."""
    fleet = ctx.settings.fleet
    if fleet.max_bid_dph is None:
        return None
    bid = round(min(fleet.max_bid_dph, inst.dph * max(fleet.bid_markup, MIN_REBID_RAISE)), 6)
    if bid <= inst.dph + _EPS:
        return None
    if current_dph(ctx) - inst.dph + bid > fleet.max_total_dph + _EPS:
        return None
    return bid


def outbid(inst: InstanceRecord) -> bool:
    """Owned, interruptible and stopped: outbid, paused, may resume."""
    return (
        inst.owned
        and inst.interruptible
        and inst.status is InstanceStatus.LOST
        and api_state(inst.api_status) is ApiState.STOPPED
    )


def awaiting_resume(ctx: Context, inst: InstanceRecord, now: float) -> bool:
    """Re-bid (or trying to) and given time to run again (the fleet leaves it alone
    meanwhile); not once REBID_FAILURES_MAX re-bids in a row failed."""
    if ctx.settings.fleet.on_outbid != "rebid" or inst.rebid_at is None or not outbid(inst):
        return False
    if inst.rebid_failures >= REBID_FAILURES_MAX:
        return False
    return now - inst.rebid_at < ctx.settings.fleet.boot_timeout_s or (
        next_bid(ctx, inst) is not None
    )


def rebid_wait_s(ctx: Context, inst: InstanceRecord) -> float:
    """How long after `rebid_at` the next re-bid is due: `boot_timeout_s` after one that
    worked, REBID_BACKOFF (at most that) after a failed one."""
    boot = ctx.settings.fleet.boot_timeout_s
    if inst.rebid_failures == 0:
        return boot
    return min(boot, REBID_BACKOFF.delay_s(inst.rebid_failures - 1))


async def rebid_outbid(ctx: Context, now: float) -> list[str]:
    """With `on_outbid = "rebid"`: raise the bid of outbid instances that are due.

    Due: just outbid, re-bid `boot_timeout_s` ago and still stopped, or the last re-bid
    failed and its back-off is over. One whose bid cannot go higher, or whose last
    REBID_FAILURES_MAX re-bids failed, is left to the fleet's teardown.
    """
    fleet = ctx.settings.fleet
    if fleet.on_outbid != "rebid" or ctx.cloud is None:
        return []
    done: list[str] = []
    for inst in list(ctx.store.instances.values()):
        if not outbid(inst) or inst.rebid_failures >= REBID_FAILURES_MAX:
            continue
        if inst.rebid_at is not None and now - inst.rebid_at < rebid_wait_s(ctx, inst):
            continue
        bid = next_bid(ctx, inst)
        if bid is None:
            continue
        try:
            await ctx.cloud.set_bid(inst.id, bid)
        except VastAIError as exc:
            # 86 failed calls in 20 s, and the instance kept (stopped, its disk billing)
            # for good: a failed re-bid waits its back-off and counts toward the bound.
            inst.rebid_failures += 1
            inst.rebid_at = now
            ctx.store.mark_dirty()
            last = inst.rebid_failures >= REBID_FAILURES_MAX
            log.warning(
                "instance_rebid_failed",
                instance=inst.id,
                bid=bid,
                error=str(exc),
                failures=inst.rebid_failures,
                retry_in_s=None if last else round(rebid_wait_s(ctx, inst), 1),
            )
            continue
        log.info("instance_rebid", instance=inst.id, dph_was=inst.dph, bid=bid)
        inst.dph = inst.rented_dph = bid
        inst.rebid_at = now
        inst.rebid_failures = 0
        ctx.store.mark_dirty()
        done.append(inst.id)
    return done


def stopped_reason(inst: InstanceRecord) -> str:
    """Why an owned stopped instance is torn down."""
    return "preempted (outbid)" if inst.interruptible else "stopped (its disk still bills)"


# --- end dates ------------------------------------------------------------------------------
def estimated_run_s(ctx: Context) -> float:
    """How long the next job will hold an instance: the median time from dispatch to done
    of the campaign's last ESTIMATE_SAMPLE finished jobs (those still in the snapshot and
    the latest of history.jsonl), or `[job] timeout_s` before any has finished."""
    durations: list[float] = []
    for job in ctx.store.jobs_in(JobState.DONE):  # done, not yet moved to history.jsonl
        if job.finished_at is not None and job.dispatched_at is not None:
            durations.append(max(0.0, job.finished_at - job.dispatched_at))
    for entry in reversed(ctx.store.history.entries.values()):
        if entry.duration_s is not None and math.isfinite(entry.duration_s):
            durations.append(max(0.0, entry.duration_s))
            if len(durations) >= ESTIMATE_SAMPLE:
                break
    if not durations:
        return ctx.settings.job.timeout_s
    return statistics.median(durations)


def fits_before_end(ctx: Context, inst: InstanceRecord, now: float | None = None) -> bool:
    """Whether a job dispatched now would end before the instance's rental does."""
    if inst.end_date is None:
        return True
    now = time.time() if now is None else now
    return now + estimated_run_s(ctx) <= inst.end_date


def offer_fits(ctx: Context, offer: Offer, now: float) -> bool:
    """Whether an offer's end date leaves room for a job (else renting it buys nothing)."""
    return offer.end_date is None or now + estimated_run_s(ctx) <= offer.end_date


def drain_before_end(ctx: Context, inst: InstanceRecord, now: float) -> None:
    """Drained once no job would finish before the rental ends (running ones go on);
    undrained should one fit again (the host moved the date, or jobs turned out quicker
    than the first estimate, `[job] timeout_s`)."""
    if inst.end_date is None or inst.status in st.GONE:
        return
    ending = inst.status is InstanceStatus.DRAINING and (inst.drain_reason or "").startswith(
        END_DRAIN
    )
    if fits_before_end(ctx, inst, now):
        if ending:
            prepare_first = inst.prepared_hash is None or inst.resweep
            st.undrain_instance(ctx.store, inst, prepare_first=prepare_first)
            log.info("instance_undrained", instance=inst.id, status=inst.status.value)
            ctx.wake_dispatch()
        return
    if inst.status is InstanceStatus.DRAINING:
        return
    ends = datetime.fromtimestamp(inst.end_date, UTC).isoformat(timespec="seconds")
    st.drain_instance(ctx.store, inst, f"{END_DRAIN} {ends}", requeue_jobs=False)
    ctx.wake_dispatch()


# --- keys -----------------------------------------------------------------------------------
async def reattach_key(ctx: Context, inst: InstanceRecord, now: float) -> bool:
    """SSH refused our key on an instance it worked on before: re-attach the public key
    through the per-instance endpoint. True when the caller should connect once more.

    One re-attach at a time per instance, and one API call per KEY_REATTACH_EVERY_S:
    the loops that met the same refusal meanwhile reconnect after it without a call.
    """
    if ctx.cloud is None or inst.last_contact is None:
        return False
    async with ctx.key_locks.hold(inst.id):
        last = inst.key_reattached_at
        if last is not None and max(now, time.time()) - last < KEY_REATTACH_EVERY_S:
            return True  # just re-attached (by another loop, maybe while we waited)
        inst.key_reattached_at = time.time()
        ctx.store.mark_dirty()
        log.warning("ssh_key_reattach", instance=inst.id)
        return await attach_public_key(ctx, inst)
