"""The fleet autopilot (`[fleet] mode = "autoscale"`): rent to the queue, tear down what idles.

One step, `fleet_once(ctx)`, run every `[vast] poll_interval_s` by `run_fleet(ctx)`:

1. money: accrue each owned instance's `dph` x time since its last accrual into
   `spend_total` (from rent to the confirmed destroy);
2. housekeeping: expired machine blocks and stale rent intents are dropped;
3. verdicts on owned instances: boot deadline, failure while booting, preemption,
   loss, SSH silent past `[ssh] unreachable_grace_s`, preparation failing again and
   again, drained and empty, idle with an empty queue (or with too few GPUs for any
   job), spend cap -> destroy;
4. destroys under way are sent and confirmed (retried with back-off);
5. scale up: rent cheapest-first until live instances that can take a job (booting
   ones and pending intents included) reach min(max_instances, jobs waiting + running,
   less those a drained instance finishes), never past `max_total_dph` nor
   `max_instances` live, never on a blocked machine, one we already rent or one with
   too few GPUs for a job, and not while the circuit breaker (breaker.py) pauses
   renting after rentals that never got ready.

Policies: a preempted (stopped, outbid) interruptible instance has its jobs requeued (not
an attempt) and is destroyed, or with `on_outbid = "rebid"` re-bid up to `max_bid_dph`
(market.py); a replacement comes from the scaling rule. A machine whose instance failed to boot (timeout, or
exited/unknown/offline while booting) or later went exited/offline is blocked for
MACHINE_BLOCK_S (6 h). Instances vastd did not rent are never destroyed here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from vastd.core import gpus
from vastd.core import state as st
from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.instances.provider import ApiState, Offer
from vastd.instances.vast_status import api_state
from vastd.orchestration import breaker, market
from vastd.orchestration.context import Context
from vastd.orchestration.inventory import claim_unknown_instance as claim_unknown_instance
from vastd.orchestration.renting import (
    accrue_instance,
    attach_public_key,
    billing,
    cleanup_failed_instance,
    confirm_destroy,
    current_dph,
    listed_after_destroy,
    offer_dph,
    rent_instance,
)
from vastd.utils.exceptions import VastAIError
from vastd.utils.logging import get_logger
from vastd.utils.offer_query import parse_offer_query
from vastd.utils.supervise import run_loop

log = get_logger("vastd.fleet")

# Still on their way to work: they count toward the target.
LIVE = frozenset(
    {
        InstanceStatus.BOOTING,
        InstanceStatus.DISCOVERED,
        InstanceStatus.PREPARING,
        InstanceStatus.READY,
        InstanceStatus.UNREACHABLE,
    }
)
INTENT_TTL_S = 600.0  # an intent with no instance this long after a listing is dropped
INTENT_KEEP_S = 86400.0  # a dropped intent still claims an instance listed this long after it
DESTROYED_KEEP_S = 86400.0  # destroyed records stay visible in `status` this long
PREPARE_FAILURES_MAX = 5
OFFER_LIMIT = 64


@dataclass
class FleetReport:
    """What one fleet step saw and did (for tests and logs)."""

    desired: int = 0
    live: int = 0
    pending_intents: int = 0
    dph_now: float = 0.0
    rented: list[str] = field(default_factory=list)
    destroying: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)


# --- accounting (billing, current_dph: renting.py, which market.py reads too) -----------------
def accrue_spend(ctx: Context, now: float) -> float:
    """Accrue every owned instance up to `now`; returns the dollars added."""
    return sum(accrue_instance(ctx, i, now) for i in ctx.store.instances.values())


def spend_exhausted(ctx: Context) -> bool:
    cap = ctx.settings.fleet.max_total_spend
    return cap is not None and ctx.store.snapshot.spend_total >= cap


def jobs_on(ctx: Context, inst: InstanceRecord) -> int:
    """Jobs still tied to this instance (running, or results not yet collected)."""
    return len(st.jobs_on_instance(ctx.store, inst.id))


def desired_instances(ctx: Context) -> int:
    """min(max_instances, instances the waiting + running work could use)."""
    if spend_exhausted(ctx):
        return 0
    counts = ctx.store.counts()
    # a staged job ([job] stage_ahead) waits for a slot it already holds: no instance for it
    staged = sum(1 for j in ctx.store.jobs_in(st.JobState.RUNNING) if j.staged)
    # a drained instance's jobs finish there: they are served, no instance for them either
    draining = sum(
        1
        for i in ctx.store.instances.values()
        if i.status is InstanceStatus.DRAINING
        for j in st.jobs_on_instance(ctx.store, i.id)
        if not j.staged
    )
    work = counts["queued"] + counts["running"] - staged + counts["collecting"] - draining
    return min(ctx.settings.fleet.max_instances, -(-work // slots_per_instance(ctx)))


def slots_per_instance(ctx: Context) -> int:
    """The jobs one instance takes: `[job] jobs_per_instance`, or with one job per GPU
    the mean slots of the live instances that can take a job (1 before any is known)."""
    job = ctx.settings.job
    if isinstance(job.jobs_per_instance, int):
        return job.jobs_per_instance
    known = [gpus.slots(job, i) for i in serving_instances(ctx)]
    return max(1, round(sum(known) / len(known))) if known else 1


def live_instances(ctx: Context) -> list[InstanceRecord]:
    return [i for i in ctx.store.instances.values() if i.status in LIVE]


def serving_instances(ctx: Context) -> list[InstanceRecord]:
    """Live instances that can take a job: one with fewer GPUs than `[job] gpus_per_job`
    (no slot, `instance_too_few_gpus`) is no capacity, whatever waits."""
    job = ctx.settings.job
    return [i for i in live_instances(ctx) if gpus.slots(job, i) > 0]


def expire_rent_intents(ctx: Context, now: float) -> int:
    """Drop intents that a listing long after them did not show an instance for.

    Kept aside (`dropped_intents`) for INTENT_KEEP_S: an instance listed later with one is
    still claimed as owned, not left billing unknown to vastd (a listing can lag).
    """
    snap = ctx.store.snapshot
    listed = snap.last_discovery_at
    if listed is None:
        return 0
    stale = [
        k for k, v in snap.rent_intents.items() if listed - float(v.get("at") or 0) > INTENT_TTL_S
    ]
    for key in stale:
        intent = snap.dropped_intents[key] = snap.rent_intents.pop(key)
        log.warning("rent_intent_dropped", intent=key, offer=intent.get("offer_id"))
    old = [
        k for k, v in snap.dropped_intents.items() if now - float(v.get("at") or 0) > INTENT_KEEP_S
    ]
    for key in old:
        del snap.dropped_intents[key]
    if stale or old:
        ctx.store.mark_dirty()
    return len(stale)


def prune(ctx: Context, now: float) -> None:
    """Expired machine blocks and long-destroyed records go."""
    snap = ctx.store.snapshot
    for machine, until in list(snap.blocked_machines.items()):
        if until <= now:
            del snap.blocked_machines[machine]
            ctx.store.mark_dirty()
    for iid, inst in list(snap.instances.items()):
        # never while the API still lists it (listed_after_destroy: it is destroyed again)
        if (
            inst.status is InstanceStatus.DESTROYED
            and not listed_after_destroy(inst)
            and now - (inst.destroyed_at or now) > DESTROYED_KEEP_S
        ):
            del snap.instances[iid]
            ctx.store.mark_dirty()


# --- verdicts on owned instances --------------------------------------------------------------
def teardown_reason(
    ctx: Context, inst: InstanceRecord, now: float, queued: int
) -> tuple[str, bool] | None:
    """Why an owned instance must go now, and whether to block its machine; or None."""
    fleet = ctx.settings.fleet
    booting = inst.booting_since is not None
    if inst.status is InstanceStatus.LOST:
        if api_state(inst.api_status) is ApiState.STOPPED:
            if market.awaiting_resume(ctx, inst, now):
                return None  # outbid and re-bid: it may run again
            return market.stopped_reason(inst), False
        if api_state(inst.api_status) is ApiState.GONE:
            return f"lost ({inst.api_status})", True
        if (
            api_state(inst.api_status) in (ApiState.PENDING, ApiState.RUNNING)
            and inst.rebid_at is not None
            and now - inst.rebid_at < fleet.boot_timeout_s
        ):
            return None  # re-bid and on its way back (scheduling, loading): not lost for good
        return "lost", booting
    if booting and api_state(inst.api_status) is ApiState.GONE:
        return f"{inst.api_status} while booting", True
    if inst.booting_since is not None and now - inst.booting_since > fleet.boot_timeout_s:
        return f"not ready within {fleet.boot_timeout_s:g}s", True
    if inst.prepare_failures >= PREPARE_FAILURES_MAX:
        return "preparation keeps failing", True
    grace = ctx.settings.ssh.unreachable_grace_s
    # (a drained one stays DRAINING when its SSH fails: the clock runs all the same)
    if (
        inst.status in (InstanceStatus.UNREACHABLE, InstanceStatus.DRAINING)
        and inst.unreachable_since is not None
        and now - inst.unreachable_since > grace
    ):
        return f"SSH silent for more than {grace:g}s", True
    # (an orphaned run counts: it may still bring results, and a destroy would lose them)
    orphaned = bool(st.orphans_on(ctx.store, inst.id))
    busy = jobs_on(ctx, inst) > 0 or bool(inst.current_jobs) or orphaned
    if inst.status is InstanceStatus.DRAINING and not busy:
        return f"drained ({inst.drain_reason or 'no reason'})", False
    if spend_exhausted(ctx):
        if inst.status is InstanceStatus.READY and not busy:
            return "spend cap reached", False
        if booting:
            return "spend cap reached", False
    # (one with too few GPUs for a job gets none, whatever waits: idle all the same)
    no_slot = gpus.slots(ctx.settings.job, inst) == 0
    if inst.status is InstanceStatus.READY and not busy and (queued == 0 or no_slot):
        if inst.idle_since is None:
            inst.idle_since = now
        if now - inst.idle_since >= fleet.idle_timeout_s:
            if no_slot:
                # its machine is blocked: a rental there again would idle again
                return (
                    f"idle for {fleet.idle_timeout_s:g}s: fewer GPUs than "
                    f"gpus_per_job = {ctx.settings.job.gpus_per_job}",
                    True,
                )
            return f"idle for {fleet.idle_timeout_s:g}s with an empty queue", False
    return None


def judge_instances(ctx: Context, now: float) -> list[str]:
    """Start tearing down owned instances that must go; returns their ids."""
    queued = ctx.store.counts()["queued"]
    started: list[str] = []
    capped = spend_exhausted(ctx)
    for inst in list(ctx.store.instances.values()):
        if not inst.owned or inst.status in (InstanceStatus.DESTROYING, InstanceStatus.DESTROYED):
            continue
        # Boot is over once SSH has answered (vast_api.md: ready = running + SSH answers).
        if (
            inst.booting_since is not None
            and inst.last_contact is not None
            and inst.last_contact >= inst.booting_since
            and inst.status is not InstanceStatus.BOOTING
        ):
            inst.booting_since = None
            ctx.store.mark_dirty()
        if (
            capped
            and inst.status is InstanceStatus.READY
            and (jobs_on(ctx, inst) or inst.current_jobs)
        ):
            st.drain_instance(ctx.store, inst, "spend cap reached", requeue_jobs=False)
            continue
        verdict = teardown_reason(ctx, inst, now, queued)
        if verdict is None:
            continue
        reason, block = verdict
        failed_rental = breaker.counts_as_failed_rental(inst, reason)
        if cleanup_failed_instance(ctx, inst, reason, block=block):
            started.append(inst.id)
            if failed_rental:
                breaker.note_rental_failed(ctx, inst, reason, now)
    return started


async def advance_destroys(ctx: Context, now: float) -> list[str]:
    """Send and confirm the destroys that are due; returns the ids confirmed gone."""
    now = max(now, time.time())  # destroys decided in this very step are due
    due = [
        i
        for i in ctx.store.instances.values()
        if i.owned
        and (i.status is InstanceStatus.DESTROYING or listed_after_destroy(i))
        and (i.next_destroy_at is None or i.next_destroy_at <= now)
    ]
    if not due:
        return []
    results = await asyncio.gather(*(confirm_destroy(ctx, i) for i in due))
    return [i.id for i, ok in zip(due, results, strict=True) if ok]


async def attach_missing_keys(ctx: Context) -> None:
    """Retry the SSH key registration of owned instances where it failed."""
    for inst in list(ctx.store.instances.values()):
        if inst.owned and not inst.ssh_key_attached and inst.status in LIVE:
            await attach_public_key(ctx, inst)


# --- scaling up -------------------------------------------------------------------------------
def gpus_wanted(ctx: Context) -> int:
    """The GPUs an offer needs to take a job: `[job] gpus_per_job` with one job per GPU."""
    job = ctx.settings.job
    return job.gpus_per_job if gpus.per_gpu(job) else 1


def offer_query(ctx: Context) -> str:
    """`[fleet] offer_query`, asking for at least `gpus_wanted` GPUs where it asks for
    fewer (a stricter `num_gpus>=` of its own stays)."""
    query, wanted = ctx.settings.fleet.offer_query, gpus_wanted(ctx)
    if wanted <= 1:
        return query
    floor = parse_offer_query(query).get("num_gpus", {}).get("gte")
    if isinstance(floor, int | float) and floor >= wanted:
        return query
    return f"{query} num_gpus>={wanted}".strip()


async def choose_offers(ctx: Context, now: float) -> list[Offer]:
    """Offers for `offer_query` (with enough GPUs for a job), in `order`, minus blocked
    machines, machines we rent and offers ending before a job could finish
    (market.offer_fits)."""
    assert ctx.cloud is not None
    fleet = ctx.settings.fleet
    wanted = gpus_wanted(ctx)
    offers = await ctx.cloud.search_offers(
        offer_query(ctx),
        order=fleet.order,
        limit=OFFER_LIMIT,
        disk_gb=fleet.disk_gb,
        interruptible=fleet.interruptible,
    )
    snap = ctx.store.snapshot
    blocked = {m for m, until in snap.blocked_machines.items() if until > now}
    ours = {str(i.machine_id) for i in ctx.store.instances.values() if billing(i) and i.machine_id}
    ours |= {str(x.get("machine_id")) for x in snap.rent_intents.values()}
    return [
        o
        for o in offers
        if str(o.machine_id) not in blocked | ours
        and (wanted <= 1 or (o.num_gpus or 1) >= wanted)
        and market.offer_fits(ctx, o, now)
    ]


async def scale_up(ctx: Context, now: float, report: FleetReport) -> None:
    """Rent until the target is met, within `max_total_dph`."""
    need = report.desired - report.live - report.pending_intents
    # never past max_instances, counting the live instances that cannot take a job too
    room = ctx.settings.fleet.max_instances - len(live_instances(ctx)) - report.pending_intents
    need = min(need, room)
    if need <= 0:
        return
    need = breaker.rentals_allowed(ctx, need, now)
    if need <= 0:
        return  # the circuit breaker holds renting (renting_paused said why)
    budget = ctx.settings.fleet.max_total_dph
    dph = current_dph(ctx)
    try:
        offers = await choose_offers(ctx, now)
    except VastAIError as exc:
        ctx.repeats.failed(log, "offer_search_failed", "offer_search", str(exc))
        return
    ctx.repeats.recovered(log, "offer_search_recovered", "offer_search")
    wanted = gpus_wanted(ctx)
    if wanted > 1 and not offers:
        ctx.repeats.failed(
            log,
            "fleet_no_offer",
            "offer_gpus",
            f"no offer with the {wanted} GPUs a job needs ([job] gpus_per_job) to rent",
            field="reason",
            wanted=need,
        )
        return
    ctx.repeats.forget("offer_gpus")
    for offer in offers:
        if need <= 0:
            break
        cost = offer_dph(ctx, offer)
        if dph + cost > budget + 1e-9:
            continue
        try:
            inst = await rent_instance(ctx, offer)
        except VastAIError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                continue  # refused (taken meanwhile): nothing was created, try the next
            break  # may have been created: discovery reconciles before we rent again
        report.rented.append(inst.id)
        dph += inst.dph
        need -= 1
    if need > 0 and not report.rented:
        log.info("fleet_no_offer", wanted=need, dph_now=round(dph, 4), budget=budget)


# --- the step and the loop --------------------------------------------------------------------
async def fleet_once(ctx: Context) -> FleetReport:
    """One autopilot step (see the module docstring); returns what it saw and did."""
    now = time.time()
    accrue_spend(ctx, now)
    prune(ctx, now)
    expire_rent_intents(ctx, now)
    report = FleetReport()
    if ctx.cloud is not None:
        await market.rebid_outbid(ctx, now)
    report.destroying = judge_instances(ctx, now)
    if ctx.cloud is not None:
        report.destroyed = await advance_destroys(ctx, now)
        await attach_missing_keys(ctx)
    report.desired = desired_instances(ctx)
    report.live = len(serving_instances(ctx))
    report.pending_intents = len(ctx.store.snapshot.rent_intents)
    if ctx.cloud is not None and ctx.settings.fleet.mode == "autoscale":
        await scale_up(ctx, now, report)
    report.dph_now = round(current_dph(ctx), 6)
    if report.rented or report.destroying or report.destroyed:
        ctx.store.mark_dirty()
        ctx.wake_dispatch()
    return report


async def run_fleet(ctx: Context, *, interval_s: float | None = None) -> None:
    """The autopilot loop: `fleet_once` every `[vast] poll_interval_s`."""
    await run_loop(
        "fleet",
        lambda: fleet_once(ctx),
        interval_s=interval_s if interval_s is not None else ctx.settings.vast.poll_interval_s,
    )
