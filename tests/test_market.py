"""vast.ai as it really behaves (issue 10, items 10-14), end to end against the simulator:
frozen, pending again, exited until confirmed, stopped, outbid and re-bid, a price rise,
an end date and a key that stops working.

Reuses test_fleet's `sim_fleet`: the simulator's live asyncssh hosts and a Context built
as the daemon builds it, with tiny timings (polls 0.2 s, boot 0.2 s).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from tests.helpers import LoopTurns, longest_run
from tests.test_fleet import SimFleet, _close, _connect
from tests.test_fleet import sim_fleet as sim_fleet  # the fixture
from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.orchestration import fleet as fl
from vastd.orchestration import inventory, market
from vastd.orchestration.actions import instance_connection
from vastd.orchestration.workflow import discovery_once
from vastd.utils.config import FleetSettings, Settings, apply_live_keys, diff_settings
from vastd.utils.exceptions import SSHAuthError

pytestmark = pytest.mark.slow

Make = Callable[..., Awaitable[SimFleet]]


async def running_on(sf: SimFleet, job_id: str) -> InstanceRecord:
    """Wait for the job's run to have started; its instance."""
    jobs = sf.ctx.store.jobs
    await sf.wait(
        lambda: job_id in jobs and jobs[job_id].started_at is not None, msg=f"{job_id} started"
    )
    return sf.ctx.store.instances[jobs[job_id].instance or ""]


def attempts(sf: SimFleet, job_id: str) -> int:
    record = sf.ctx.store.record(job_id)
    assert record is not None
    return record.attempts


# --- a large listing -------------------------------------------------------------------------
async def test_a_large_listing_is_applied_in_chunks_between_other_tasks(
    sim_fleet: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 listed instances applied in one go held the loop for about 46 ms every poll:
    discovery lets the loop run other tasks after every `DISCOVERY_CHUNK` instances, and
    still adopts and refreshes every one of them."""
    sf = await sim_fleet(mode="adopt")
    listed = 3 * inventory.DISCOVERY_CHUNK + 10
    for _ in range(listed):
        await sf.cloud.add_instance(label="vastd", actual_status="loading")
    applied_at: list[int] = []
    real_apply = inventory.apply_listed
    async with LoopTurns() as turns:

        async def apply_counted(*args: Any, **kwargs: Any) -> None:
            applied_at.append(turns.count)
            await real_apply(*args, **kwargs)

        monkeypatch.setattr(inventory, "apply_listed", apply_counted)
        for _ in range(2):  # adopting them, then refreshing them
            applied_at.clear()
            assert await discovery_once(sf.ctx) == listed
            assert len(applied_at) == listed
            assert longest_run(applied_at) <= inventory.DISCOVERY_CHUNK
    assert len(sf.ctx.store.instances) == listed


# --- item 11: the deadlines per state -------------------------------------------------------
async def test_frozen_instance_is_drained_after_the_grace_and_its_job_runs_elsewhere(
    sim_fleet: Make,
) -> None:
    """`frozen` (billing, nothing answers): once listed so for `frozen_grace_s` the instance
    is drained (reason says frozen), its job requeued without an attempt, and, empty, it is
    destroyed while the job finishes on a replacement."""
    sf = await sim_fleet(job_s=3.0, max_instances=1, frozen_grace_s=0.5, idle_timeout_s=600.0)
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    await sf.cloud.freeze(int(inst.id))
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 15, "frozen one destroyed")
    assert inst.drain_reason is not None and inst.drain_reason.startswith("frozen for more")
    assert (inst.destroy_reason or "").startswith("drained (frozen")
    await sf.wait(sf.all_done, 20, "job done elsewhere")
    record = sf.ctx.store.record(job_id)
    assert record is not None and record.attempts == 0 and record.instance != inst.id


async def test_frozen_shorter_than_the_grace_is_waited_out(sim_fleet: Make) -> None:
    """Frozen for less than the grace, then running again: nothing is drained."""
    sf = await sim_fleet(mode="adopt", frozen_grace_s=60.0)
    iid = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    await sf.cloud.set_status(iid, "frozen")
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.frozen_since is not None and inst.status is not InstanceStatus.DRAINING
    await sf.cloud.set_status(iid, "running")
    await discovery_once(sf.ctx)
    assert inst.frozen_since is None and inst.status is not InstanceStatus.DRAINING


async def test_adopted_instance_drained_while_frozen_is_used_again_once_it_thaws(
    sim_fleet: Make,
) -> None:
    """Adopt mode: frozen past the grace, drained; listed running again, it goes back
    through preparation (its job folders swept first) instead of staying drained."""
    sf = await sim_fleet(mode="adopt", frozen_grace_s=0.0)
    iid = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    await sf.cloud.set_status(iid, "frozen")
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.DRAINING
    await sf.cloud.set_status(iid, "running")
    with capture_logs() as logs:
        await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.DISCOVERED and inst.resweep
    assert inst.drain_reason is None
    assert any(e["event"] == "instance_thawed" for e in logs)


async def test_instance_pending_again_waits_only_within_the_boot_deadline(
    sim_fleet: Make,
) -> None:
    """A ready owned instance listed `rebooting` for good (its SSH gone) is destroyed at the
    boot deadline, long before `[ssh] unreachable_grace_s` (900 s), and its job runs on a
    replacement without counting an attempt."""
    sf = await sim_fleet(job_s=3.0, max_instances=1, boot_timeout_s=1.5, idle_timeout_s=600.0)
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    with capture_logs() as logs:
        await sf.cloud.set_status(int(inst.id), "rebooting", stop_host=True)
        await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 15, "destroyed")
    assert (inst.destroy_reason or "").startswith("not ready within")
    assert any(e["event"] == "instance_pending" for e in logs)
    await sf.wait(sf.all_done, 20, "job done elsewhere")
    assert attempts(sf, job_id) == 0


async def test_exited_in_the_listing_is_lost_only_once_the_lookup_agrees(
    sim_fleet: Make,
) -> None:
    """`offline` in the listing while the per-instance lookup cannot answer: not lost yet
    (a stale listing must not requeue jobs); once the lookup answers `offline` too, lost."""
    sf = await sim_fleet(mode="adopt")
    iid = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    await sf.cloud.set_status(iid, "offline", stop_host=False)
    fault = sf.cloud.faults.add(endpoint="show_instance", status=500, count=100)
    await discovery_once(sf.ctx)
    assert inst.status is not InstanceStatus.LOST
    sf.cloud.faults.remove(fault)
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.LOST
    assert inst.lost_reason == "vast.ai reports it offline"


async def test_unknown_while_ssh_answers_is_not_lost_and_its_run_goes_on(
    sim_fleet: Make,
) -> None:
    """`unknown` is "no heartbeat", and the lookup reads the same backend, so it agrees.
    Listed so for a few polls while SSH answers, an owned instance running a job is not
    lost: nothing is requeued, destroyed or blocked, and the job finishes in its one run."""
    sf = await sim_fleet(job_s=2.0, max_instances=1, idle_timeout_s=600.0)
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    with capture_logs() as logs:
        await sf.cloud.set_status(int(inst.id), "unknown", stop_host=False)  # a blip
        for _ in range(3):
            await discovery_once(sf.ctx)
            await fl.fleet_once(sf.ctx)
        assert inst.status is InstanceStatus.READY, inst.lost_reason
        await sf.cloud.set_status(int(inst.id), "running", stop_host=False)
        await sf.wait(sf.all_done, 20, "job done")
    events = {e["event"] for e in logs}
    assert not events & {"instance_lost", "job_requeued", "instance_destroying"}, events
    assert "instance_gone_unconfirmed" in events
    record = sf.ctx.store.record(job_id)
    assert record is not None and record.instance == inst.id and record.runs == 1
    assert inst.status is InstanceStatus.READY and not sf.ctx.store.snapshot.blocked_machines


async def test_unknown_is_lost_once_ssh_is_silent_for_the_unreachable_grace(
    sim_fleet: Make,
) -> None:
    """Listed `unknown` (the lookup agreeing) and SSH silent: within `[ssh]
    unreachable_grace_s` of its last answer it is waited on, past it lost."""
    sf = await sim_fleet(mode="adopt")
    iid = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    await sf.cloud.set_status(iid, "unknown", stop_host=True)
    grace = sf.ctx.settings.ssh.unreachable_grace_s
    inst.last_contact = time.time() - grace / 2
    await discovery_once(sf.ctx)
    assert inst.status is not InstanceStatus.LOST
    inst.last_contact = time.time() - grace - 1
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.LOST
    assert inst.lost_reason == "vast.ai reports it unknown"


async def test_stopped_on_demand_instance_bills_until_destroyed(sim_fleet: Make) -> None:
    """`stopped`, not interruptible: the disk still bills, so the budget counts it (adopted
    or owned); an owned one is torn down saying so."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=0.1)
    sf.add_queued(1)
    (first,) = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[first]
    await sf.cloud.wait_for_status(int(first), "running")
    await sf.cloud.set_status(int(first), "stopped")
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.LOST and not inst.interruptible
    adopted = InstanceRecord(id="1", status=InstanceStatus.LOST, api_status="stopped", dph=0.5)
    sf.ctx.store.instances["1"] = adopted
    assert fl.billing(adopted)
    assert fl.current_dph(sf.ctx) == pytest.approx(inst.dph + 0.5)
    del sf.ctx.store.instances["1"]
    await fl.fleet_once(sf.ctx)
    assert inst.status is InstanceStatus.DESTROYED
    assert inst.destroy_reason == "stopped (its disk still bills)"


# --- item 12: outbid, re-bid, resume --------------------------------------------------------
def bids(sf: SimFleet, iid: str) -> list[dict[str, Any]]:
    return [c for c in sf.calls_naming(int(iid)) if c["endpoint"] == "set_bid"]


async def test_outbid_instance_is_rebid_and_used_again_once_it_resumes(sim_fleet: Make) -> None:
    """on_outbid = "rebid": outbid by 0.35 $/h (the bid was 0.27), vastd bids 0.405
    (x bid_markup) through PUT /instances/bid_price/{id}/; the instance runs again, is
    prepared and used again; its job ran elsewhere meanwhile without counting an attempt."""
    sf = await sim_fleet(
        job_s=2.0,
        max_instances=1,
        interruptible=True,
        bid_markup=1.5,
        on_outbid="rebid",
        max_bid_dph=1.0,
        idle_timeout_s=600.0,
    )
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    assert inst.interruptible and inst.dph == pytest.approx(0.27)
    await sf.cloud.outbid(int(inst.id), 0.35)
    await sf.wait(lambda: inst.status is InstanceStatus.LOST, msg="outbid seen")
    await sf.wait(lambda: inst.status is InstanceStatus.READY, 15, "used again after resume")
    assert [c["status"] for c in bids(sf, inst.id)] == [200]
    assert sf.cloud.instances[int(inst.id)]["dph_total"] == pytest.approx(0.405)
    assert inst.dph == pytest.approx(0.405) and inst.rebid_at is None
    assert inst.rented_dph == pytest.approx(0.405)  # the new floor (not the 0.27 bid)
    await sf.wait(sf.all_done, 20, "job done")
    assert attempts(sf, job_id) == 0
    sf.submit(1, prefix="after")
    await sf.wait(sf.all_done, 20, "second job done")
    assert inst.status is not InstanceStatus.DESTROYED


async def test_outbid_past_the_bid_cap_is_destroyed(sim_fleet: Make) -> None:
    """Outbid by 5 $/h with max_bid_dph 0.5: vastd bids 0.405, then 0.5 (the cap) a boot
    deadline later, then destroys it; the job finishes elsewhere without an attempt."""
    sf = await sim_fleet(
        job_s=1.0,
        max_instances=1,
        interruptible=True,
        bid_markup=1.5,
        on_outbid="rebid",
        max_bid_dph=0.5,
        boot_timeout_s=1.0,
    )
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    await sf.cloud.outbid(int(inst.id), 5.0)
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "destroyed at the cap")
    assert inst.destroy_reason == "preempted (outbid)"
    prices = [c for c in sf.cloud.calls if c["endpoint"] == "set_bid"]
    assert len(prices) == 2 and sf.cloud.stats["set_bid"] == 2
    await sf.wait(sf.all_done, 20, "job done elsewhere")
    assert attempts(sf, job_id) == 0


async def test_failed_rebids_back_off_and_the_outbid_instance_is_destroyed_after_a_few(
    sim_fleet: Make,
) -> None:
    """Re-bid once, still outbid (by 100 $/h), then every re-bid fails: each failure waits
    its back-off, and after REBID_FAILURES_MAX in a row the stopped instance (its disk
    billing, its bid in the budget) is destroyed as outbid; it was kept for good, with
    86 failed calls in 20 s."""
    sf = await sim_fleet(
        job_s=1.0,
        max_instances=1,
        interruptible=True,
        on_outbid="rebid",
        max_bid_dph=5.0,
        boot_timeout_s=0.5,
        idle_timeout_s=600.0,
    )
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    await sf.cloud.outbid(int(inst.id), 100.0)
    await sf.wait(lambda: sf.cloud.stats["set_bid"] == 1, msg="first re-bid")
    sf.cloud.faults.add(endpoint="set_bid", status=500, count=None)
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "destroyed")
    assert inst.destroy_reason == "preempted (outbid)"
    statuses = [c["status"] for c in bids(sf, inst.id)]
    assert statuses == [200] + [500] * market.REBID_FAILURES_MAX
    await sf.wait(sf.all_done, 20, "job done elsewhere")
    assert attempts(sf, job_id) == 0


async def test_a_failed_first_rebid_is_tried_again_and_the_instance_resumes(
    sim_fleet: Make,
) -> None:
    """The first re-bid fails once (it used to mean destroyed at once): it is tried again
    after the back-off, works, and the instance runs again and is used."""
    sf = await sim_fleet(
        job_s=1.0,
        max_instances=1,
        interruptible=True,
        bid_markup=1.5,
        on_outbid="rebid",
        max_bid_dph=1.0,
        boot_timeout_s=0.5,
        idle_timeout_s=600.0,
    )
    [job_id] = sf.submit(1)
    sf.run()
    inst = await running_on(sf, job_id)
    sf.cloud.faults.add(endpoint="set_bid", status=500, count=1)
    await sf.cloud.outbid(int(inst.id), 0.35)
    await sf.wait(lambda: inst.status is not InstanceStatus.READY, msg="outbid seen")
    await sf.wait(lambda: inst.status is InstanceStatus.READY, 15, "used again after resume")
    assert [c["status"] for c in bids(sf, inst.id)] == [500, 200]
    assert inst.dph == pytest.approx(0.405) and inst.rebid_failures == 0
    await sf.wait(sf.all_done, 20, "job done")


def test_rebid_needs_a_bid_cap() -> None:
    """`on_outbid = "rebid"` without `max_bid_dph` is refused at load time."""
    with pytest.raises(ValidationError, match="max_bid_dph"):
        FleetSettings(on_outbid="rebid")
    with pytest.raises(ValidationError):
        FleetSettings(on_outbid="bid")
    assert FleetSettings(on_outbid="rebid", max_bid_dph=0.4).max_bid_dph == 0.4


def test_the_outbid_policy_and_frozen_grace_apply_on_reload() -> None:
    """SIGHUP applies `frozen_grace_s`, `on_outbid` and `max_bid_dph` live (read at use)."""
    old = Settings(vast={"api_key": "k"})
    new = Settings(
        vast={"api_key": "k"},
        fleet={"frozen_grace_s": 60, "on_outbid": "rebid", "max_bid_dph": 0.6},
    )
    live, restart = diff_settings(old, new)
    assert set(live) == {"fleet.frozen_grace_s", "fleet.on_outbid", "fleet.max_bid_dph"}
    assert restart == []
    apply_live_keys(old, new)
    assert (old.fleet.on_outbid, old.fleet.max_bid_dph, old.fleet.frozen_grace_s) == (
        "rebid",
        0.6,
        60,
    )


# --- item 13: a host raises its price -------------------------------------------------------
async def test_price_rise_past_the_budget_drains_the_instance(sim_fleet: Make) -> None:
    """Two instances at 0.3 + 0.31 under a 1.0 $/h cap; a host raises one to 0.8: the budget
    uses the new price, that instance is drained (its running job finishes there), then
    destroyed once empty; the other is untouched and nothing is rented past the cap."""
    sf = await sim_fleet(
        offers=[0.3, 0.31], job_s=3.0, max_instances=2, max_total_dph=1.0, idle_timeout_s=600.0
    )
    first, second = sf.submit(2)
    sf.run()
    a = await running_on(sf, first)
    b = await running_on(sf, second)
    assert a.id != b.id
    sf.cloud.set_price(int(a.id), 0.8)
    await sf.wait(lambda: a.status is InstanceStatus.DRAINING, msg="drained")
    assert fl.current_dph(sf.ctx) == pytest.approx(0.8 + b.dph)
    assert "price rose to 0.8" in (a.drain_reason or "")
    await sf.wait(sf.all_done, 20, "both done")
    record = sf.ctx.store.record(first)
    assert record is not None and record.instance == a.id and record.runs == 1
    await sf.wait(lambda: a.status is InstanceStatus.DESTROYED, msg="destroyed once empty")
    assert b.status is InstanceStatus.READY
    assert sf.cloud.stats["rent"] == 2


async def test_listed_price_is_the_price_and_a_non_finite_one_is_never_stored(
    sim_fleet: Make,
) -> None:
    """The budget follows the price the listing gives now (down as well as up); a NaN or
    negative one is dropped at the provider boundary: the last good price stays."""
    sf = await sim_fleet(mode="adopt")
    iid = await sf.cloud.add_instance(label="vastd", dph_total=0.4)
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.dph == pytest.approx(0.4)
    sf.cloud.set_price(iid, 0.25)
    with capture_logs() as logs:
        await discovery_once(sf.ctx)
    assert inst.dph == pytest.approx(0.25) and fl.current_dph(sf.ctx) == pytest.approx(0.25)
    assert any(e["event"] == "instance_price_changed" for e in logs)
    assert inst.status is not InstanceStatus.DRAINING  # a fall never drains
    for bad in (float("nan"), float("inf"), -1.0):
        sf.cloud.set_price(iid, bad)
        await discovery_once(sf.ctx)
        assert inst.dph == pytest.approx(0.25)


async def test_a_lower_listed_price_never_lowers_what_an_owned_instance_counts(
    sim_fleet: Make,
) -> None:
    """Rented at 0.30 and 0.31 under a 0.7 $/h cap (a third at 0.32 would not fit); the
    listing then shows the first at 0 $/h, then 0.1: the budget and the ledger still count
    0.30, so no third instance is rented. A rise is counted as before."""
    sf = await sim_fleet(max_instances=3, max_total_dph=0.7, boot_delay_s=30.0)
    sf.add_queued(3)
    first, _ = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[first]
    assert inst.dph == pytest.approx(0.3)
    for listed in (0.0, 0.1):
        sf.cloud.set_price(int(first), listed)
        await discovery_once(sf.ctx)
        assert inst.dph == pytest.approx(0.3)
        assert fl.current_dph(sf.ctx) == pytest.approx(0.61)
        assert (await fl.fleet_once(sf.ctx)).rented == []
    inst.accrued_until = time.time() - 3600.0
    before = sf.ctx.store.snapshot.spend_total
    fl.accrue_instance(sf.ctx, inst, time.time())
    assert sf.ctx.store.snapshot.spend_total - before == pytest.approx(0.3, rel=0.01)
    sf.cloud.set_price(int(first), 0.35)
    await discovery_once(sf.ctx)
    assert inst.dph == pytest.approx(0.35) and sf.cloud.stats["rent"] == 2


async def test_a_price_blip_is_counted_only_while_it_is_listed(sim_fleet: Make) -> None:
    """Rented at 0.30; the listing shows it at 0.8 once (a glitch, a temporary price),
    then 0.30 again, then 0.1: it counts 0.8 while listed so, then 0.30 again (the price
    it was rented at is its floor), never 0.8 for good. A record saved before the floor
    was kept takes the price it holds as its floor."""
    sf = await sim_fleet(max_total_dph=5.0, boot_delay_s=30.0)
    sf.add_queued(1)
    (iid,) = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[iid]
    assert inst.rented_dph == pytest.approx(0.3)
    for listed, counted in ((0.8, 0.8), (0.3, 0.3), (0.1, 0.3), (0.0, 0.3)):
        sf.cloud.set_price(int(iid), listed)
        await discovery_once(sf.ctx)
        assert inst.dph == pytest.approx(counted), listed
        assert fl.current_dph(sf.ctx) == pytest.approx(counted)
    inst.rented_dph = None  # as loaded from an older snapshot
    for listed, counted in ((0.8, 0.8), (0.3, 0.3), (0.1, 0.3)):
        sf.cloud.set_price(int(iid), listed)
        await discovery_once(sf.ctx)
        assert inst.dph == pytest.approx(counted), listed
    assert inst.rented_dph == pytest.approx(0.3)


async def test_spend_before_a_price_change_is_billed_at_the_old_price(sim_fleet: Make) -> None:
    """An owned instance last accrued an hour ago at 0.3 $/h, now listed at 0.8: that hour
    costs 0.3 $, and from now on it costs 0.8 $/h."""
    sf = await sim_fleet(boot_delay_s=30.0)
    sf.add_queued(1)
    (iid,) = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[iid]
    inst.accrued_until = time.time() - 3600.0
    before = sf.ctx.store.snapshot.spend_total
    sf.cloud.set_price(int(iid), 0.8)
    await discovery_once(sf.ctx)
    assert sf.ctx.store.snapshot.spend_total - before == pytest.approx(0.3, rel=0.01)
    assert inst.dph == pytest.approx(0.8)
    inst.accrued_until = time.time() - 3600.0
    before = sf.ctx.store.snapshot.spend_total
    fl.accrue_spend(sf.ctx, time.time())
    assert sf.ctx.store.snapshot.spend_total - before == pytest.approx(0.8, rel=0.01)


async def test_adopted_fleet_past_the_cap_drains_only_the_rise_that_crosses_it(
    sim_fleet: Make,
) -> None:
    """Adopted instances may bill past max_total_dph from the start: a rise then drains
    nothing; a rise that takes a fleet under the cap past it drains that instance."""
    sf = await sim_fleet(mode="adopt", max_total_dph=1.0)
    a = await sf.cloud.add_instance(label="vastd", dph_total=0.6)
    b = await sf.cloud.add_instance(label="vastd", dph_total=0.6)
    await discovery_once(sf.ctx)
    sf.cloud.set_price(a, 0.7)
    await discovery_once(sf.ctx)
    assert sf.ctx.store.instances[str(a)].status is not InstanceStatus.DRAINING
    sf.ctx.settings.fleet.max_total_dph = 2.0
    sf.cloud.set_price(b, 1.5)
    await discovery_once(sf.ctx)
    assert sf.ctx.store.instances[str(b)].status is InstanceStatus.DRAINING
    assert sf.ctx.store.instances[str(a)].status is not InstanceStatus.DRAINING


async def test_adopting_a_fleet_past_the_cap_is_not_a_price_rise(sim_fleet: Make) -> None:
    """The first listing of an instance gives its price; it is not a change from the
    record's 0.0. Ten adopted instances at 0.25 $/h under a 2.0 $/h cap: none drained
    (the ninth was, its discovery read as a rise that crossed the cap)."""
    sf = await sim_fleet(mode="adopt", max_total_dph=2.0)
    ids = [await sf.cloud.add_instance(label="vastd", dph_total=0.25) for _ in range(10)]
    await discovery_once(sf.ctx)
    await discovery_once(sf.ctx)
    statuses = {sf.ctx.store.instances[str(i)].status for i in ids}
    assert InstanceStatus.DRAINING not in statuses, statuses
    assert all(sf.ctx.store.instances[str(i)].dph == 0.25 for i in ids)


async def test_an_end_date_before_the_instance_existed_is_ignored(sim_fleet: Make) -> None:
    """A zero (or otherwise past-at-first-sight) end date is not a rental ending now."""
    sf = await sim_fleet(mode="adopt")
    iid = await sf.cloud.add_instance(label="vastd", end_date=0)
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.end_date is None and inst.status is not InstanceStatus.DRAINING


async def test_drained_for_its_end_date_is_undrained_when_the_host_extends_it(
    sim_fleet: Make,
) -> None:
    """Drained because no job fits before its end date; the host moves the date a day
    later and (the estimate being [job] timeout_s, 10 min) jobs fit again: undrained."""
    sf = await sim_fleet(mode="adopt")
    iid = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(iid)]
    assert market.estimated_run_s(sf.ctx) == sf.ctx.settings.job.timeout_s
    sf.cloud.set_end_date(iid, time.time() + 60)
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.DRAINING
    assert (inst.drain_reason or "").startswith("its rental ends at")
    sf.cloud.set_end_date(iid, time.time() + 86400)
    await discovery_once(sf.ctx)
    assert inst.status is not InstanceStatus.DRAINING and inst.drain_reason is None


# --- item 14: an end date -------------------------------------------------------------------
async def test_no_job_runs_past_the_rental_end_date(sim_fleet: Make) -> None:
    """Before any job finished the estimate is `[job] timeout_s` (6 h): an offer ending in a
    minute is not rented. Once jobs took ~1 s, one ending in a minute takes a job; when its
    end is closer than a job's run, it is drained (and destroyed) and the next job runs on
    another instance."""
    now = time.time()
    sf = await sim_fleet(offers=[], job_s=0.5, max_instances=1, idle_timeout_s=600.0)
    sf.cloud.add_offer(gpu_name="RTX 4090", dph_total=0.2, machine_id=7100, end_date=now + 60)
    sf.cloud.add_offer(gpu_name="RTX 4090", dph_total=0.3, machine_id=7101)
    [first] = sf.submit(1)
    sf.run()
    await sf.wait(sf.all_done, 20, "first job done")
    b = sf.ctx.store.instances[sf.ctx.store.record(first).instance or ""]  # type: ignore[union-attr]
    assert b.end_date is None and b.machine_id == 7101  # the cheaper 7100 ends too soon
    assert market.estimated_run_s(sf.ctx) < 30
    # The second instance is one with an end date a minute away: a short job fits.
    sf.cloud.set_end_date(int(b.id), time.time() + 60)
    await sf.wait(lambda: b.end_date is not None, msg="end date listed")
    [second] = sf.submit(1, prefix="fits")
    await sf.wait(sf.all_done, 20, "second job done")
    assert sf.ctx.store.record(second).instance == b.id  # type: ignore[union-attr]
    # Its end is now closer than a job's run: drained, destroyed, the next job elsewhere.
    sf.cloud.set_end_date(int(b.id), time.time() + 0.2)
    await sf.wait(lambda: b.status is InstanceStatus.DESTROYED, msg="drained and destroyed")
    assert (b.drain_reason or "").startswith("its rental ends at")
    [third] = sf.submit(1, prefix="after")
    await sf.wait(sf.all_done, 20, "third job done")
    assert sf.ctx.store.record(third).instance != b.id  # type: ignore[union-attr]


# --- item 10: a key that stops working --------------------------------------------------------
async def test_revoked_key_is_reattached_and_the_instance_stays_in_use(sim_fleet: Make) -> None:
    """The key installed on a working instance stops working (skypilot#10730): the next
    connection is refused, vastd re-attaches the key through POST /instances/{id}/ssh/ and
    reconnects; the instance never counts as unreachable and runs the next job."""
    sf = await sim_fleet(job_s=0.3, max_instances=1, idle_timeout_s=600.0)
    [first] = sf.submit(1)
    sf.run()
    await sf.wait(sf.all_done, 20, "first job done")
    record = sf.ctx.store.record(first)
    assert record is not None
    inst = sf.ctx.store.instances[record.instance or ""]
    attached = len([c for c in sf.calls_naming(int(inst.id)) if c["endpoint"] == "attach_ssh"])
    sf.cloud.revoke_keys(int(inst.id))
    await sf.ctx.pool.drop(inst.id)
    with capture_logs() as logs:
        [second] = sf.submit(1, prefix="after")
        await sf.wait(sf.all_done, 20, "second job done")
    assert sf.ctx.store.record(second).instance == inst.id  # type: ignore[union-attr]
    events = [e["event"] for e in logs]
    assert "ssh_key_reattach" in events and "instance_unreachable" not in events
    calls = [c for c in sf.calls_naming(int(inst.id)) if c["endpoint"] == "attach_ssh"]
    assert len(calls) == attached + 1 and calls[-1]["status"] == 200
    assert sf.cloud.stats["rent"] == 1


@pytest.mark.sshd
async def test_openssh_refusing_the_key_is_fixed_by_reattaching_it(
    openssh_cloud: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    """Real sshd: an instance whose authorized_keys lost our key refuses the login
    (SSHAuthError from the pool); instance_connection re-attaches the key through the API
    (the sim writes it to sshd's authorized_keys) and the second login works. With the
    API refusing the attach, the auth error comes through (the instance is unreachable)."""
    cloud = await openssh_cloud(tmp_path / "cloud", instances=1)
    (iid,) = cloud.instance_ids
    data = cloud.config(tmp_path / "vastd")
    data["vast"].update(api_key=cloud.api_key, api_key_file=None)
    ctx = _connect(cloud, tmp_path / "vastd", Settings(**data))
    try:
        await discovery_once(ctx)
        inst = ctx.store.instances[str(iid)]
        await instance_connection(ctx, inst)  # it worked once
        await ctx.pool.drop(inst.id)
        cloud.server(iid).set_authorized_keys([])
        with pytest.raises(SSHAuthError):
            await ctx.pool.get(inst.id, ctx.endpoints(inst))
        conn = await instance_connection(ctx, inst)
        assert (await conn.run("id -un", timeout_s=10)).stdout.strip() == cloud.server(iid).user
        attaches = [c for c in cloud.cloud.calls if c["endpoint"] == "attach_ssh"]
        assert [c["status"] for c in attaches] == [200]
        # Refused again, and the API cannot attach the key: the auth error stands.
        await ctx.pool.drop(inst.id)
        cloud.server(iid).set_authorized_keys([])
        inst.key_reattached_at = None
        cloud.cloud.faults.add(endpoint="attach_ssh", status=400, count=10)
        with pytest.raises(SSHAuthError):
            await instance_connection(ctx, inst)
    finally:
        await _close(ctx, None)


# --- the simulator's ways, over HTTP (for tests that drive another process) -----------------
async def test_sim_market_ways_over_http() -> None:
    """`POST /_sim/instances/{id}/market` freezes, outbids, reprices, dates and revokes;
    `PUT /api/v0/instances/bid_price/{id}/` above the competing bid resumes an outbid one,
    below it leaves it stopped, and refuses a bad body."""
    import aiohttp

    from tests.test_sim_api import AUTH, KEY, FakeHosts, call
    from vastd.sim import SimCloud, start_sim_api

    hosts = FakeHosts()
    cloud = SimCloud(api_key=KEY, boot_delay_s=0.05, host_provider=hosts)
    runner, url = await start_sim_api(cloud)
    try:
        async with aiohttp.ClientSession(url, headers=AUTH) as http:
            iid = await cloud.add_instance(label="vastd", dph_total=0.3)
            cloud.ssh_keys[iid] = ["ssh-ed25519 AAAA"]
            path = f"/_sim/instances/{iid}/market"
            await call(http, "POST", path, json={"price": 0.45, "end_date": 2e9})
            assert (cloud.instances[iid]["dph_total"], cloud.instances[iid]["end_date"]) == (
                0.45,
                2e9,
            )
            await call(http, "POST", path, json={"revoke_keys": True})
            assert cloud.ssh_keys[iid] == []
            await call(http, "POST", path, json={"outbid": 0.5})
            assert cloud.instances[iid]["actual_status"] == "stopped"
            assert iid not in hosts.live
            bid = f"/api/v0/instances/bid_price/{iid}/"
            await call(http, "PUT", bid, json={"client_id": "me", "price": 0.4})
            assert cloud.instances[iid]["actual_status"] == "stopped"
            async with http.put(bid, json={"client_id": "me", "price": "lots"}) as resp:
                assert resp.status == 400
            await call(http, "PUT", bid, json={"client_id": "me", "price": 0.6})
            await cloud.wait_for_status(iid, "running", 5)
            assert cloud.instances[iid]["dph_total"] == 0.6 and iid in hosts.live
            await call(http, "POST", path, json={"freeze": True})
            assert cloud.instances[iid]["actual_status"] == "frozen"
            assert iid not in hosts.live
            async with http.post("/_sim/instances/99/market", json={"freeze": True}) as resp:
                assert resp.status == 404
    finally:
        await runner.cleanup()
        await cloud.aclose()
