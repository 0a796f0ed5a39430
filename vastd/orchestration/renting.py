"""Renting, destroying and billing owned instances: the fleet's steps on the snapshot.

- `rent_instance`: the rent intent is on disk before the PUT (a crash then cannot
  rent twice: discovery claims the instance through its `VASTD_INTENT`).
- `cleanup_failed_instance` decides a teardown (owned instances only) through
  core/state.py; `confirm_destroy` sends the DELETE only once that record is saved,
  and counts the instance destroyed only once the per-instance lookup AND a listing
  taken after the DELETE both say it is gone (one stale read confirms nothing); until
  then it is checked again every cycle. A confirmed instance a later listing shows
  again is destroyed again (`listed_after_destroy`).
- Spend is accrued per owned instance from its rent to its confirmed destroy.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncssh

from vastd.core import state as st
from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.instances.lifecycle import (
    DESTROY_BACKOFF_MAX_S,
    DESTROY_BACKOFF_S,
    MACHINE_BLOCK_S,
    public_key_line,
    terminate_instance,
)
from vastd.instances.provider import ApiState, Offer, machine_number
from vastd.instances.vast_status import api_state
from vastd.orchestration.context import Context
from vastd.utils.exceptions import VastAIError
from vastd.utils.logging import get_logger
from vastd.utils.supervise import Backoff

log = get_logger("vastd.lifecycle")
DESTROY_BACKOFF = Backoff(DESTROY_BACKOFF_S, DESTROY_BACKOFF_MAX_S, jitter="none")


def billing(inst: InstanceRecord) -> bool:
    """Whether this instance may still be costing money."""
    if inst.status is InstanceStatus.DESTROYED:
        return listed_after_destroy(inst)  # a stale confirmation: it may still bill
    if api_state(inst.api_status) is ApiState.STOPPED:
        return True  # stopped (outbid or not): its disk still bills
    return inst.owned or inst.status is not InstanceStatus.LOST


def current_dph(ctx: Context) -> float:
    """$/h of every instance that may bill, plus rents whose outcome is not known yet."""
    total = sum(i.dph for i in ctx.store.instances.values() if billing(i))
    total += sum(float(x.get("dph") or 0.0) for x in ctx.store.snapshot.rent_intents.values())
    return total


def offer_dph(ctx: Context, offer: Offer) -> float:
    """What renting this offer costs per hour: the bid when interruptible."""
    fleet = ctx.settings.fleet
    if fleet.interruptible:
        return round((offer.min_bid or offer.dph) * fleet.bid_markup, 6)
    return offer.dph


def blockmachine_number(ctx: Context, machine_id: int | None, reason: str, *, now: float) -> None:
    """Avoid a machine for MACHINE_BLOCK_S (persisted in the snapshot)."""
    if machine_id is None:
        return
    until = now + MACHINE_BLOCK_S
    ctx.store.snapshot.blocked_machines[str(machine_id)] = until
    ctx.store.mark_dirty()
    log.warning("machine_blocked", machine=machine_id, reason=reason, until=until)


# --- composites -------------------------------------------------------------------------------
async def rent_instance(ctx: Context, offer: Offer) -> InstanceRecord:
    """Rent `offer`: intent saved first, the record saved at once, then the SSH key attached.

    Raises VastAIError when the rent failed or may have failed; the intent then
    stays (unless the API clearly refused) and discovery reconciles it.
    """
    assert ctx.cloud is not None
    s = ctx.settings
    store = ctx.store
    intent_id = uuid.uuid4().hex
    dph = offer_dph(ctx, offer)
    machine_id = machine_number(offer.machine_id)
    store.snapshot.rent_intents[intent_id] = {
        "offer_id": offer.id,
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
        new_id = await ctx.cloud.rent(
            offer,
            image=s.fleet.image,
            disk_gb=s.fleet.disk_gb,
            label=s.vast.label,
            intent=intent_id,
            bid_dph=dph if s.fleet.interruptible else None,
        )
    except VastAIError as exc:
        refused = exc.status is not None and 400 <= exc.status < 500
        if refused:
            store.snapshot.rent_intents.pop(intent_id, None)
            store.mark_dirty()
        log.warning(
            "instance_rent_failed",
            offer=offer.id,
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
            rented_dph=dph,
            machine_id=machine_id,
            gpu_name=offer.gpu_name,
            num_gpus=offer.num_gpus,
            intent_id=intent_id,
            interruptible=s.fleet.interruptible,
            end_date=offer.end_date,
        )
        store.instances[iid] = inst
    # else: discovery claimed it through the intent while the PUT was answering.
    store.snapshot.rent_intents.pop(intent_id, None)
    store.mark_dirty()
    await store.flush()
    log.info(
        "instance_rented",
        instance=iid,
        offer=offer.id,
        machine=machine_id,
        dph=dph,
        gpu=offer.gpu_name,
        interruptible=s.fleet.interruptible,
    )
    await attach_public_key(ctx, inst)
    return inst


async def attach_public_key(ctx: Context, inst: InstanceRecord) -> bool:
    """Register `[ssh] key_file`'s public key through the API (never an onstart script)."""
    assert ctx.cloud is not None
    try:
        key = await asyncio.to_thread(public_key_line, ctx.settings.ssh.key_file)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        log.error("ssh_key_unreadable", instance=inst.id, error=str(exc))
        return False
    try:
        await ctx.cloud.attach_ssh_key(inst.id, key)
    except VastAIError as exc:
        log.warning("ssh_key_attach_failed", instance=inst.id, error=str(exc))
        return False
    inst.ssh_key_attached = True
    ctx.store.mark_dirty()
    return True


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
    task = ctx.preparing.pop(inst.id, None)
    if task is not None:
        task.cancel()  # its end would mark the instance ready again
    requeued = st.mark_instance_destroying(ctx.store, inst, reason)
    if block:
        blockmachine_number(ctx, inst.machine_id, reason, now=now)
    ctx.wake_dispatch()
    ctx.spawn(ctx.pool.drop(inst.id), name=f"drop:{inst.id}")
    log.info("instance_destroying", instance=inst.id, reason=reason, requeued=requeued)
    return True


def listed_after_destroy(inst: InstanceRecord) -> bool:
    """A confirmed destroy that a later listing still showed: stale reads confirmed it,
    the instance may still bill. It is destroyed again and its record kept meanwhile."""
    return (
        inst.status is InstanceStatus.DESTROYED
        and inst.last_seen is not None
        and inst.destroyed_at is not None
        and inst.last_seen > inst.destroyed_at
    )


async def absent_from_listing(ctx: Context, instance_id: str, newer_than: float) -> bool:
    """Whether a listing whose request was sent after `newer_than` (the cycle's shared
    one when recent enough) lacks the instance; False when the listing fails."""
    assert ctx.cloud is not None
    try:
        listed = await ctx.listing.since(ctx.cloud, ctx.settings.vast.label, newer_than)
    except VastAIError as exc:
        log.warning(
            "instance_destroy_unconfirmed", instance=instance_id, by="listing", error=str(exc)
        )
        return False
    if any(i.id == instance_id for i in listed):
        log.info("instance_destroy_unconfirmed", instance=instance_id, by="listing")
        return False
    return True


async def confirm_destroy(ctx: Context, inst: InstanceRecord, now: float | None = None) -> bool:
    """One destroy + confirmation for a DESTROYING instance (or a destroyed one listed
    again); schedules the next try.

    Gone means both the per-instance lookup (after the DELETE) and a listing taken after
    the DELETE lack it: either alone may be a stale read. Write-ahead: the DELETE goes
    out only once the snapshot says DESTROYING (else a crash could forget an instance it
    destroyed halfway, or destroy one twice over).
    """
    assert ctx.cloud is not None
    if not await ctx.store.flush():
        log.warning("instance_destroy_deferred", instance=inst.id, reason=ctx.store.save_error)
        return False
    relisted = listed_after_destroy(inst)
    if inst.status is not InstanceStatus.DESTROYING and not relisted:
        return False
    sent_at = time.time()
    if await terminate_instance(ctx.cloud, inst.id, attempts=1) and await absent_from_listing(
        ctx, inst.id, sent_at
    ):
        now = time.time() if now is None else now
        if relisted:
            reconfirm_destroy(ctx, inst, now)
            return True
        accrue_instance(ctx, inst, now)
        st.mark_instance_destroyed(ctx.store, inst, now)
        log.info(
            "instance_destroyed",
            instance=inst.id,
            reason=inst.destroy_reason,
            attempts=inst.destroy_attempts + 1,
            owned_s=round(now - (inst.rented_at or inst.first_seen), 1),
        )
        return True
    inst.destroy_attempts += 1
    delay = DESTROY_BACKOFF.delay_s(inst.destroy_attempts - 1)
    inst.next_destroy_at = time.time() + delay
    ctx.store.mark_dirty()
    log.warning(
        "instance_destroy_retry", instance=inst.id, attempts=inst.destroy_attempts, retry_in_s=delay
    )
    return False


def reconfirm_destroy(ctx: Context, inst: InstanceRecord, now: float) -> None:
    """A destroyed instance that was listed again is gone now: what it billed since the
    first confirmation is spent, and the record may age out again."""
    since = inst.destroyed_at or now
    if inst.owned and now > since:
        ctx.store.snapshot.spend_total += inst.dph * (now - since) / 3600.0
    inst.destroyed_at = now
    inst.next_destroy_at = None
    inst.destroy_attempts += 1
    ctx.store.mark_dirty()
    log.info("instance_destroyed", instance=inst.id, reason=inst.destroy_reason, relisted=True)


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
