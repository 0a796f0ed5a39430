"""The instances vastd knows: discovery (the vast.ai listing) and preparation (SSH).

Every status change is a transition of core/state.py. Discovery never reads a
failed listing as "no instances"; preparation ends READY only if nothing drained
or lost the instance meanwhile, and sweeps job folders nothing accounts for before
the instance gets a job.
"""

from __future__ import annotations

import asyncio
import time

from vastd.core import state as st
from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.instances.preparation import prepare_instance_for_jobs
from vastd.instances.provider import ApiState, ProviderInstance, machine_number
from vastd.orchestration import breaker, market
from vastd.orchestration.actions import (
    abandon_if_past_grace,
    instance_connection,
    mark_unreachable,
)
from vastd.orchestration.context import Context
from vastd.orchestration.coordinator import ensure_watcher
from vastd.orchestration.followups import sweep_remote_folders
from vastd.utils.exceptions import (
    HostKeyMismatchError,
    PreparationError,
    SSHConnectionError,
    VastAIError,
)
from vastd.utils.logging import get_logger
from vastd.utils.supervise import Backoff

log = get_logger("vastd.workflow")
# 4 s, 8 s, ... up to 10 min, jittered into the upper half
PREPARE_BACKOFF = Backoff(base_s=2.0, max_s=600.0, jitter="equal")
DISCOVERY_CHUNK = 64  # listed instances applied before the loop runs other tasks


# --- discovery ----------------------------------------------------------------------------------
def record_from_info(info: ProviderInstance, now: float) -> InstanceRecord:
    return InstanceRecord(id=info.id, label=info.label, first_seen=now)


def refresh_record(inst: InstanceRecord, info: ProviderInstance, now: float) -> None:
    proxy = (info.proxy.host, info.proxy.port) if info.proxy else (None, None)
    direct = (info.direct.host, info.direct.port) if info.direct else (None, None)
    listed: dict[str, object] = {
        "label": info.label,
        "api_status": info.raw_status,
        "ssh_host": proxy[0],
        "ssh_port": proxy[1],
        "public_ipaddr": direct[0],
        "direct_port": direct[1],
        "machine_id": machine_number(info.machine_id),
        "gpu_name": info.gpu_name,
        "num_gpus": info.num_gpus,
        "missing_since": None,
    }
    # The price counted in the budget and the ledger: what the listing says, except that
    # an instance vastd rented never counts less than it was rented (or re-bid) at. A
    # listing showing 0, or any lower figure, while the contract is unchanged let the fleet
    # rent past max_total_dph and stopped its spend accruing. A 0 is no price for any.
    # The floor is the rent's price, not the highest listed: one high listing (a glitch,
    # a temporary price) counts while it is listed, not for good.
    if info.dph:
        if inst.owned:
            if inst.rented_dph is None:  # saved before the floor was kept: what it counts
                inst.rented_dph = inst.dph or info.dph
            listed["dph"] = max(info.dph, inst.rented_dph)
        else:
            listed["dph"] = info.dph
    # Only what changed is assigned: every assignment tells the store (500 instances
    # listed every poll would otherwise make ~6,000 notices a pass).
    fields = inst.__dict__
    for name, value in listed.items():
        if fields[name] != value:
            setattr(inst, name, value)
    inst.last_seen = now


# --- reconciliation of rent intents -----------------------------------------------------------
def claim_unknown_instance(
    ctx: Context, info: ProviderInstance, now: float
) -> InstanceRecord | None:
    """A labelled instance the snapshot does not know: ours, adopted, or left alone.

    Ours when its `VASTD_INTENT` matches a saved rent intent (a crash or an ambiguous
    answer came between the rent and the save), or one dropped unanswered (listed only
    after INTENT_TTL_S: it was ignored for good, billing outside the budget): recorded as
    owned, billing since the intent; the fleet then uses it or tears it down. Its boot
    deadline counts from the intent, or from now for a dropped one (already past
    INTENT_TTL_S: a shorter `boot_timeout_s` would have it destroyed, its machine
    blocked, the moment it is claimed). Otherwise
    adopted (not owned) only in adopt mode or with `adopt_foreign_labelled`; else None:
    never touched.
    """
    fleet = ctx.settings.fleet
    snap = ctx.store.snapshot
    intent_id = info.intent
    intent = None
    dropped = False
    if intent_id:
        intent = snap.rent_intents.pop(intent_id, None)
        if intent is None:
            intent = snap.dropped_intents.pop(intent_id, None)
            dropped = intent is not None
    if intent is not None:
        at = float(intent.get("at") or now)
        rented_dph = float(intent.get("dph") or 0.0) or None
        inst = InstanceRecord(
            id=info.id,
            label=info.label,
            status=InstanceStatus.BOOTING,
            owned=True,
            first_seen=now,
            booting_since=now if dropped else at,
            rented_at=at,
            accrued_until=at,
            dph=max(info.dph or 0.0, rented_dph or 0.0),  # (as refresh_record)
            rented_dph=rented_dph,
            machine_id=machine_number(info.machine_id),
            intent_id=intent_id,
        )
        ctx.store.instances[inst.id] = inst
        ctx.store.mark_dirty()
        log.info(
            "instance_rented",
            instance=inst.id,
            machine=inst.machine_id,
            dph=inst.dph,
            reconciled=True,
            intent=intent_id,
        )
        return inst
    if fleet.mode == "adopt" or fleet.adopt_foreign_labelled:
        inst = record_from_info(info, now)
        ctx.store.instances[inst.id] = inst
        ctx.store.mark_dirty()
        log.info("instance_discovered", instance=inst.id, status=info.raw_status, dph=info.dph)
        return inst
    return None


async def discovery_once(ctx: Context) -> int:
    """List labelled instances and reconcile them with the store; returns how many are known."""
    assert ctx.cloud is not None
    label = ctx.settings.vast.label
    asked_at = time.time()  # no later than the request: a destroy confirmed meanwhile wins
    try:
        infos = await ctx.listing.fetch(ctx.cloud, label)
    except VastAIError as exc:
        # Never read a failed listing as "no instances".
        ctx.repeats.failed(log, "discovery_failed", "discovery", str(exc))
        return len(ctx.store.instances)
    ctx.repeats.recovered(log, "discovery_recovered", "discovery")
    now = time.time()
    ctx.store.snapshot.last_discovery_at = now
    seen: set[str] = set()
    for n, info in enumerate(infos, 1):
        if n % DISCOVERY_CHUNK == 0:
            # 500 listed instances applied in one go held the loop for about 46 ms,
            # every poll (a pinned bench_scale run): other tasks run between chunks.
            await asyncio.sleep(0)
        if info.label != label:
            continue  # never touch what is not ours
        iid = info.id
        seen.add(iid)
        inst = ctx.store.instances.get(iid)
        if inst is None:
            # Ours through a rent intent, adopted, or (None) left alone entirely.
            inst = claim_unknown_instance(ctx, info, now)
            if inst is None:
                continue
        if inst.status in (InstanceStatus.DESTROYED, InstanceStatus.DESTROYING):
            note_listed_after_destroy(inst, asked_at)
            continue
        await apply_listed(ctx, inst, info, now)
    missing = [
        i for i in ctx.store.instances.values() if i.id not in seen and i.status not in st.GONE
    ]
    if missing:
        await asyncio.gather(*(settle_missing(ctx, inst, now) for inst in missing))
    ctx.store.mark_dirty()
    return len(seen)


async def apply_listed(
    ctx: Context, inst: InstanceRecord, info: ProviderInstance, now: float
) -> None:
    """What the API says of a known instance (listed, or looked up) goes into its record,
    and through market.py's reading of it (price, frozen, outbid, end date, gone)."""
    # An adopted instance's first listing gives its price (its record had none); one
    # vastd rented has the price it was rented at, which a listing may raise (while it
    # lists more) but never lower.
    first = inst.last_seen is None and not inst.owned
    old_dph = info.dph if first and info.dph is not None else inst.dph
    refresh_record(inst, info, now)
    lost = await market.on_listed(ctx, inst, info, old_dph, now)
    if lost is not None:
        handle_instance_failure(ctx, inst, lost)
    elif info.state is ApiState.RUNNING and inst.status in (
        InstanceStatus.LOST,
        InstanceStatus.BOOTING,
    ):
        st.mark_instance_discovered(ctx.store, inst)


async def settle_missing(ctx: Context, inst: InstanceRecord, now: float) -> None:
    """An instance the listing lacks is looked up at once (listings may lag).

    Confirmed gone: lost now, its jobs requeued without counting an attempt (no wait for
    `lost_grace_s`). Still there: the listing was stale, the lookup's row is used. The
    lookup failing (an API error), or one never listed yet (rented a moment ago, the API
    may lag behind the rent): the grace decides, as without a lookup.
    """
    assert ctx.cloud is not None
    inst.missing_since = inst.missing_since or now
    try:
        info = await ctx.cloud.show_instance(inst.id)
    except (VastAIError, ValueError) as exc:
        log.warning("instance_lookup_failed", instance=inst.id, error=str(exc))
    else:
        if inst.status in st.GONE:
            return  # lost or torn down while the lookup ran
        if info is None and inst.last_seen is not None:
            log.info("instance_gone", instance=inst.id, by="listing and lookup")
            handle_instance_failure(ctx, inst, "gone from vast.ai (listing and lookup)")
            return
        if info is not None and info.label == ctx.settings.vast.label:
            await apply_listed(ctx, inst, info, now)
            return
        # never listed yet (rented a moment ago: the API may lag behind the rent), or
        # relabelled (no longer ours to use): the grace decides, as without a lookup
    if now - inst.missing_since >= ctx.settings.vast.lost_grace_s:
        handle_instance_failure(ctx, inst, "absent from the vast.ai list")


def note_listed_after_destroy(inst: InstanceRecord, now: float) -> None:
    """A destroyed (or destroying) instance the API still lists: its destroy is checked
    again. A confirmed one listed again was confirmed by stale reads: it may still bill,
    so it is destroyed again (renting.py) and its record is not pruned meanwhile."""
    inst.last_seen = now
    relisted = inst.status is InstanceStatus.DESTROYED and now > (inst.destroyed_at or now)
    if relisted and inst.owned and inst.next_destroy_at is None:
        log.warning("instance_destroy_relisted", instance=inst.id, status=inst.api_status)
        inst.next_destroy_at = now


def handle_instance_failure(ctx: Context, inst: InstanceRecord, reason: str) -> int:
    """The instance is gone: requeue its jobs (not an attempt). Returns how many."""
    if inst.status in st.GONE:
        return 0
    task = ctx.preparing.pop(inst.id, None)
    if task is not None:
        task.cancel()
    moved = st.mark_instance_lost(ctx.store, inst, reason)
    ctx.spawn(ctx.pool.drop(inst.id), name=f"drop:{inst.id}")
    ctx.wake_dispatch()
    return moved


# --- preparation --------------------------------------------------------------------------------
def coordinate_instance_preparation(ctx: Context) -> int:
    """Start preparing every discovered instance that is due; returns how many started."""
    now = time.time()
    started = 0
    for inst in ctx.store.instances.values():
        if inst.next_prepare_at and inst.next_prepare_at > now:
            continue
        started += start_preparation(ctx, inst)
    return started


def start_preparation(ctx: Context, inst: InstanceRecord) -> bool:
    """Prepare a discovered instance in the background, unless that is under way already."""
    if inst.status not in (InstanceStatus.DISCOVERED, InstanceStatus.PREPARING):
        return False
    if not ctx.endpoints(inst):
        # Listed running with no SSH endpoint (seen after a restart): nothing to try, so
        # no failure counts; an owned one waits within the boot deadline, as if pending.
        market.restart_boot_deadline(ctx, inst, time.time())
        return False
    task = ctx.preparing.get(inst.id)
    if task is not None and not task.done():
        return False
    ctx.preparing[inst.id] = ctx.spawn(
        run_instance_preparation_workflow(ctx, inst.id), name=f"prepare:{inst.id}"
    )
    return True


async def run_instance_preparation_workflow(ctx: Context, instance_id: str) -> bool:
    """SSH answers, then the [[prepare]] steps (skipped when the marker matches), then the
    sweep of job folders nothing accounts for; READY unless drained or lost meanwhile."""
    inst = ctx.store.instances[instance_id]
    s = ctx.settings
    try:
        conn = await instance_connection(ctx, inst)
        if inst.status is InstanceStatus.DISCOVERED:
            log.info("instance_ready", instance=inst.id)
            st.mark_instance_preparing(ctx.store, inst)
        marker = await prepare_instance_for_jobs(
            conn, s.prepare, s.remote.root, inst.id, timeout_s=s.ssh.command_timeout_s
        )
        if inst.status is InstanceStatus.PREPARING:
            # Nothing unaccounted may sit beside its next job: a sweep that could not
            # finish fails the preparation (retried with back-off), never READY.
            if not await sweep_remote_folders(ctx, inst, conn):
                raise PreparationError("could not sweep the job folders nothing accounts for")
            st.note_resweep(ctx.store, inst, False)
    except HostKeyMismatchError as exc:
        # Met first here (e.g. after a restart): drained, its jobs requeued, as anywhere.
        mark_unreachable(ctx, inst, exc)
        return False
    except (SSHConnectionError, PreparationError) as exc:
        same = inst.prepare_error == str(exc)
        inst.prepare_failures += 1
        inst.prepare_error = str(exc)
        delay = PREPARE_BACKOFF.delay_s(inst.prepare_failures)
        inst.next_prepare_at = time.time() + delay
        ctx.store.mark_dirty()
        if isinstance(exc, SSHConnectionError):
            # Silent: its jobs keep their run through the grace, then run elsewhere.
            mark_unreachable(ctx, inst, exc)
            abandon_if_past_grace(ctx, inst)
        # The same error on each back-off retry: warned once, then at debug.
        (log.debug if same else log.warning)(
            "instance_prepare_failed",
            instance=inst.id,
            error=str(exc),
            failures=inst.prepare_failures,
            retry_in_s=round(delay, 1),
        )
        return False
    already = inst.prepared_hash == marker
    if not st.mark_instance_ready(ctx.store, inst, marker):
        log.info("instance_prepare_superseded", instance=inst.id, status=inst.status.value)
        return False
    log.info("instance_prepared", instance=inst.id, marker=marker, already=already)
    breaker.note_rental_ready(ctx, inst)
    # Jobs the snapshot says run here, and runs given up here, are watched again.
    if st.running_jobs_on(ctx.store, inst.id) or st.orphans_on(ctx.store, inst.id):
        ensure_watcher(ctx, inst.id)
    ctx.wake_dispatch()
    return True
