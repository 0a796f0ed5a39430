"""Instance lifecycle: rent, start, stop, restart, destroy (confirmed), block a machine.

Policies written down here because they cost money when wrong:

- Renting is not idempotent. `rent_instance` saves a rent intent (flushed to disk)
  before the PUT and tags the instance with `VASTD_INTENT=<intent id>` in its env, so
  after a crash discovery recognises the instance as ours (`claim_unknown_instance`
  in orchestration/fleet.py). An ambiguous failure (5xx, timeout, bad body) leaves
  the intent in place for discovery to reconcile; a 4xx (the request was refused)
  removes it.
- Teardown destroys, never stops: a stopped instance keeps billing its disk. A
  destroy is confirmed by asking the API for the instance afterwards.
- Only owned instances (rented by this vastd, or claimed through an intent) are ever
  destroyed by the fleet; `manage_instance_lifecycle` refuses the rest.
- `handle_instance_failure` (requeue an instance's jobs without counting an attempt)
  stays in orchestration/workflow.py, beside discovery which calls it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncssh

from vastd.core.state import InstanceRecord, InstanceStatus, JobState
from vastd.instances.vast_api import VastClient
from vastd.orchestration.context import Context
from vastd.utils.exceptions import VastAIError
from vastd.utils.logging import get_logger

log = get_logger("vastd.lifecycle")

INTENT_ENV = "VASTD_INTENT"
MACHINE_BLOCK_S = 6 * 3600.0  # a machine that failed to boot is avoided this long
DESTROY_BACKOFF_S = 1.0
DESTROY_BACKOFF_MAX_S = 60.0
RUNTYPE = "ssh_direc ssh_proxy"  # what the official CLI sends for `--ssh --direct`

_public_keys: dict[Path, str] = {}


# --- primitives -------------------------------------------------------------------------------
async def start_instance(client: VastClient, instance_id: int) -> bool:
    """Ask a stopped instance to run; False when the API refused."""
    try:
        await client.start_instance(instance_id)
    except VastAIError as exc:
        log.warning("instance_start_failed", instance=str(instance_id), error=str(exc))
        return False
    return True


async def stop_instance(client: VastClient, instance_id: int) -> bool:
    """Stop an instance. Its disk keeps billing: the fleet never uses this to save money."""
    try:
        await client.stop_instance(instance_id)
    except VastAIError as exc:
        log.warning("instance_stop_failed", instance=str(instance_id), error=str(exc))
        return False
    return True


async def restart_instance(client: VastClient, instance_id: int) -> bool:
    """Reboot an instance's container; False when the API refused."""
    try:
        await client.reboot_instance(instance_id)
    except VastAIError as exc:
        log.warning("instance_restart_failed", instance=str(instance_id), error=str(exc))
        return False
    return True


async def terminate_instance(
    client: VastClient,
    instance_id: int,
    *,
    attempts: int = 5,
    backoff_s: float = DESTROY_BACKOFF_S,
) -> bool:
    """Destroy an instance and confirm it is gone; True once confirmed.

    Each attempt sends the DELETE (a 404 means already gone) and then asks the API
    for the instance; only an answer without it counts. Attempts back off
    exponentially. False after `attempts` tries: the caller tries again later.
    """
    for attempt in range(max(1, attempts)):
        if attempt:
            await asyncio.sleep(min(DESTROY_BACKOFF_MAX_S, backoff_s * 2 ** (attempt - 1)))
        try:
            await client.destroy_instance(instance_id)
            if await client.show_instance(instance_id) is None:
                return True
            log.info("instance_destroy_unconfirmed", instance=str(instance_id))
        except VastAIError as exc:
            log.warning(
                "instance_destroy_failed",
                instance=str(instance_id),
                error=str(exc),
                attempt=attempt + 1,
            )
    return False


def public_key_line(key_file: Path) -> str:
    """The OpenSSH public key line of `[ssh] key_file` (never the private key)."""
    cached = _public_keys.get(key_file)
    if cached is None:
        key = asyncssh.read_private_key(key_file)
        cached = key.export_public_key().decode().strip()
        _public_keys[key_file] = cached
    return cached


def offer_dph(ctx: Context, offer: dict[str, Any]) -> float:
    """What renting this offer costs per hour: the bid when interruptible."""
    fleet = ctx.settings.fleet
    if fleet.interruptible:
        return round(
            float(offer.get("min_bid") or offer.get("dph_total") or 0.0) * fleet.bid_markup, 6
        )
    return float(offer.get("dph_total") or 0.0)


def block_machine(ctx: Context, machine_id: int | None, reason: str, *, now: float) -> None:
    """Avoid a machine for MACHINE_BLOCK_S (persisted in the snapshot)."""
    if machine_id is None:
        return
    until = now + MACHINE_BLOCK_S
    ctx.store.snapshot.blocked_machines[str(machine_id)] = until
    ctx.store.mark_dirty()
    log.warning("machine_blocked", machine=machine_id, reason=reason, until=until)


# --- composites -------------------------------------------------------------------------------
async def rent_instance(ctx: Context, offer: dict[str, Any]) -> InstanceRecord:
    """Rent `offer`: intent saved first, the record saved at once, then the SSH key attached.

    Raises VastAIError when the rent failed or may have failed; the intent then
    stays (unless the API clearly refused) and discovery reconciles it.
    """
    assert ctx.api is not None
    s = ctx.settings
    store = ctx.store
    intent_id = uuid.uuid4().hex
    dph = offer_dph(ctx, offer)
    machine_id = offer.get("machine_id")
    store.snapshot.rent_intents[intent_id] = {
        "offer_id": int(offer["id"]),
        "machine_id": machine_id,
        "dph": dph,
        "at": time.time(),
    }
    store.mark_dirty()
    if not await store.flush():
        # Without the intent on disk a crash could rent twice: do not rent.
        store.snapshot.rent_intents.pop(intent_id, None)
        raise VastAIError("rent skipped: the rent intent could not be saved")
    try:
        new_id = await ctx.api.rent(
            int(offer["id"]),
            image=s.fleet.image,
            disk_gb=s.fleet.disk_gb,
            label=s.vast.label,
            env={INTENT_ENV: intent_id},
            price=dph if s.fleet.interruptible else None,
            runtype=RUNTYPE,
        )
    except VastAIError as exc:
        refused = exc.status is not None and 400 <= exc.status < 500
        if refused:
            store.snapshot.rent_intents.pop(intent_id, None)
            store.mark_dirty()
        log.warning(
            "instance_rent_failed",
            offer=offer.get("id"),
            error=str(exc),
            intent=None if refused else intent_id,
        )
        raise
    now = time.time()
    iid = str(new_id)
    inst = store.instances.get(iid)
    if inst is None:
        inst = InstanceRecord(
            id=iid,
            label=s.vast.label,
            status=InstanceStatus.BOOTING,
            owned=True,
            first_seen=now,
            booting_since=now,
            rented_at=now,
            accrued_until=now,
            dph=dph,
            machine_id=machine_id if isinstance(machine_id, int) else None,
            gpu_name=offer.get("gpu_name"),
            intent_id=intent_id,
        )
        store.instances[iid] = inst
    # else: discovery claimed it through the intent while the PUT was answering.
    store.snapshot.rent_intents.pop(intent_id, None)
    store.mark_dirty()
    await store.flush()
    log.info(
        "instance_rented",
        instance=iid,
        offer=offer.get("id"),
        machine=machine_id,
        dph=dph,
        gpu=offer.get("gpu_name"),
        interruptible=s.fleet.interruptible,
    )
    await attach_public_key(ctx, inst)
    return inst


async def attach_public_key(ctx: Context, inst: InstanceRecord) -> bool:
    """Register `[ssh] key_file`'s public key through the API (never an onstart script)."""
    assert ctx.api is not None
    try:
        key = await asyncio.to_thread(public_key_line, ctx.settings.ssh.key_file)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        log.error("ssh_key_unreadable", instance=inst.id, error=str(exc))
        return False
    try:
        await ctx.api.attach_ssh_key(int(inst.id), key)
    except VastAIError as exc:
        log.warning("ssh_key_attach_failed", instance=inst.id, error=str(exc))
        return False
    inst.ssh_key_attached = True
    ctx.store.mark_dirty()
    return True


def release_instance_jobs(ctx: Context, inst: InstanceRecord, reason: str) -> int:
    """Requeue the jobs an instance holds (not an attempt); returns how many."""
    from vastd.orchestration import coordinator as co

    moved = 0
    for job in list(ctx.store.jobs.values()):
        if job.instance == inst.id and job.state in (JobState.RUNNING, JobState.COLLECTING):
            co.requeue(ctx, job, reason=reason, count_attempt=False)
            moved += 1
    inst.current_jobs.clear()
    ctx.store.mark_dirty()
    return moved


def cleanup_failed_instance(
    ctx: Context, inst: InstanceRecord, reason: str, *, block: bool = True
) -> bool:
    """Start destroying an owned instance (jobs requeued), blocking its machine.

    The destroy itself is sent and confirmed by the fleet loop (`advance_destroys`),
    which retries with back-off until the API no longer lists the instance.
    Returns False for an instance vastd does not own (left alone).
    """
    if not inst.owned:
        log.warning("instance_not_owned", instance=inst.id, refused="destroy", reason=reason)
        return False
    if inst.status in (InstanceStatus.DESTROYING, InstanceStatus.DESTROYED):
        return True
    now = time.time()
    requeued = release_instance_jobs(ctx, inst, f"instance {inst.id} torn down: {reason}")
    task = ctx.preparing.pop(inst.id, None)
    if task is not None:
        task.cancel()  # its end would mark the instance ready again
    inst.status = InstanceStatus.DESTROYING
    inst.destroy_reason = reason
    inst.destroy_attempts = 0
    inst.next_destroy_at = now
    if block:
        block_machine(ctx, inst.machine_id, reason, now=now)
    ctx.store.mark_dirty()
    ctx.spawn(ctx.pool.drop(inst.id), name=f"drop:{inst.id}")
    log.info("instance_destroying", instance=inst.id, reason=reason, requeued=requeued)
    return True


async def confirm_destroy(ctx: Context, inst: InstanceRecord, now: float | None = None) -> bool:
    """One destroy + confirmation for a DESTROYING instance; schedules the next try."""
    assert ctx.api is not None
    if await terminate_instance(ctx.api, int(inst.id), attempts=1):
        now = time.time() if now is None else now
        accrue_instance(ctx, inst, now)
        inst.status = InstanceStatus.DESTROYED
        inst.destroyed_at = now
        inst.next_destroy_at = None
        inst.current_jobs.clear()
        ctx.store.mark_dirty()
        log.info(
            "instance_destroyed",
            instance=inst.id,
            reason=inst.destroy_reason,
            attempts=inst.destroy_attempts + 1,
            owned_s=round(now - (inst.rented_at or inst.first_seen), 1),
        )
        return True
    inst.destroy_attempts += 1
    delay = min(DESTROY_BACKOFF_MAX_S, DESTROY_BACKOFF_S * 2 ** (inst.destroy_attempts - 1))
    inst.next_destroy_at = time.time() + delay
    ctx.store.mark_dirty()
    log.warning(
        "instance_destroy_retry", instance=inst.id, attempts=inst.destroy_attempts, retry_in_s=delay
    )
    return False


def accrue_instance(ctx: Context, inst: InstanceRecord, now: float) -> float:
    """Add this instance's cost since its last accrual to `spend_total`; returns dollars."""
    if not inst.owned or inst.status is InstanceStatus.DESTROYED:
        return 0.0
    since = inst.accrued_until or inst.rented_at or inst.first_seen
    if now <= since:
        return 0.0
    dollars = inst.dph * (now - since) / 3600.0
    ctx.store.snapshot.spend_total += dollars
    inst.accrued_until = now
    ctx.store.mark_dirty()
    return dollars


async def manage_instance_lifecycle(
    ctx: Context, inst: InstanceRecord, desired: InstanceStatus
) -> bool:
    """Move an instance toward `desired`; True when the step was taken.

    DESTROYED: destroy and confirm (owned only). DRAINING: no new jobs.
    BOOTING: reboot the container. READY/DISCOVERED: start it if it is stopped.
    """
    assert ctx.api is not None
    if desired is InstanceStatus.DESTROYED:
        if not cleanup_failed_instance(ctx, inst, "requested", block=False):
            return False
        return await confirm_destroy(ctx, inst)
    if desired is InstanceStatus.DRAINING:
        if inst.status in (InstanceStatus.READY, InstanceStatus.UNREACHABLE):
            inst.status = InstanceStatus.DRAINING
            inst.drain_reason = inst.drain_reason or "requested"
            ctx.store.mark_dirty()
        return inst.status is InstanceStatus.DRAINING
    if desired is InstanceStatus.BOOTING:
        if await restart_instance(ctx.api, int(inst.id)):
            inst.status = InstanceStatus.BOOTING
            inst.booting_since = time.time()
            ctx.store.mark_dirty()
            return True
        return False
    if desired in (InstanceStatus.READY, InstanceStatus.DISCOVERED):
        if inst.api_status == "stopped":
            return await start_instance(ctx.api, int(inst.id))
        return True
    raise ValueError(f"cannot steer an instance to {desired.value}")
