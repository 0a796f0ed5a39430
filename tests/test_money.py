"""Money against the simulator (issue 10): the rental circuit breaker, confirmed destroys,
instances gone from the listing, adopted instances' billing, and a 429 without Retry-After.

The fleet runs in process on `tests/test_fleet.py`'s SimFleet (the daemon's loops on a
simulated account whose instances are live asyncssh hosts).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.test_fleet import SimFleet, _close, _connect, sim_fleet  # noqa: F401
from tests.test_vast_api import KEY, RecordingSleep, sim, sleep  # noqa: F401
from vastd.core.files import Layout
from vastd.core.records import Snapshot
from vastd.core.snapshot_file import load_state
from vastd.core.state import InstanceStatus
from vastd.instances.vast_api import LIST_INSTANCES, VastClient
from vastd.orchestration import fleet as fl
from vastd.orchestration import inventory
from vastd.orchestration.renting import absent_from_listing, cleanup_failed_instance
from vastd.orchestration.workflow import discovery_once
from vastd.sim import SimCloud
from vastd.status import build_status, format_status, status_json
from vastd.utils.config import PrepareStep
from vastd.utils.exceptions import VastAIError
from vastd.utils.supervise import Backoff

pytestmark = pytest.mark.slow

Fleet = Callable[..., Awaitable[SimFleet]]


# --- 1. the circuit breaker ---------------------------------------------------------------------
async def test_renting_pauses_after_three_rentals_that_never_became_ready(
    sim_fleet: Fleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A [[prepare]] step that fails everywhere, twelve offers: after 3 rentals that never
    became ready renting pauses for rent_pause_s (today it rents on while offers last); the
    pause is in the snapshot, `vastd status` says why, and a restart does not lift it."""
    monkeypatch.setattr(inventory, "PREPARE_BACKOFF", Backoff(0.05, 0.1, jitter="none"))
    sf = await sim_fleet(offers=[0.3 + i / 100 for i in range(12)], max_instances=1)
    sf.ctx.settings.prepare = [PrepareStep(name="broken", check="false", install="exit 3")]
    snap = sf.ctx.store.snapshot
    sf.submit(1)
    sf.run()
    await sf.wait(lambda: snap.rent_paused_until is not None, 40, "renting paused")
    assert snap.failed_rentals == 3
    assert snap.rent_paused_until is not None
    assert snap.rent_paused_until > time.time() + 1700
    assert snap.rent_pause_reason and "3 rentals in a row never became ready" in (
        snap.rent_pause_reason
    )
    await sf.wait(lambda: not sf.cloud.instances, 20, "the third one destroyed")
    deadline = time.time() + 3.0
    while time.time() < deadline:
        assert sf.cloud.stats["rent"] == 3
        await asyncio.sleep(0.2)
    assert all(i.status is InstanceStatus.DESTROYED for i in sf.owned())

    await sf.ctx.store.flush()
    layout = Layout(sf.ctx.layout.root)
    status = build_status(layout, load_state(layout.state_file))
    assert status["renting"]["paused"] is True
    assert status["renting"]["failed_rentals"] == 3
    assert "never became ready" in json.loads(status_json(status))["renting"]["reason"]
    assert "renting: PAUSED until" in format_status(status)

    # A restart reads the pause back: the new daemon rents nothing either.
    await _close(sf.ctx, sf.task)
    sf.ctx, sf.task = _connect(sf.cluster, layout.root, sf.ctx.settings), None
    assert sf.ctx.store.snapshot.rent_paused_until == snap.rent_paused_until
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 1 and report.rented == []
    assert sf.cloud.stats["rent"] == 3


async def test_half_open_breaker_tries_one_rental_and_a_ready_one_resets_it(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Once the pause is over, one rental at a time is tried (not max_instances at once);
    when it becomes ready the count is reset and renting goes on normally."""
    sf = await sim_fleet(max_instances=3, boot_delay_s=2.0, boot_timeout_s=30.0)
    snap = sf.ctx.store.snapshot
    snap.failed_rentals = 3
    snap.rent_paused_until = time.time() - 1.0  # the pause is over
    snap.rent_pause_reason = "3 rentals in a row never became ready"
    sf.submit(3)
    sf.run()
    await sf.wait(lambda: sf.cloud.stats["rent"] >= 1, 10, "the probe rented")
    await asyncio.sleep(1.0)  # the probe is still booting: nothing more is rented
    assert sf.cloud.stats["rent"] == 1
    await sf.wait(lambda: snap.failed_rentals == 0, 20, "the probe became ready")
    assert snap.rent_paused_until is None and snap.rent_pause_reason is None
    await sf.wait(lambda: sf.cloud.stats["rent"] == 3, 20, "renting went on")


def test_a_snapshot_without_the_breaker_fields_still_loads(tmp_path: Path) -> None:
    """A snapshot written before the breaker existed loads with a zero count and no pause."""
    data = Snapshot().model_dump(mode="json")
    for key in ("failed_rentals", "rent_paused_until", "rent_pause_reason"):
        data.pop(key)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    snap = load_state(path)
    assert snap.failed_rentals == 0 and snap.rent_paused_until is None


# --- 2. destroys confirmed by the listing and the lookup both -------------------------------------
async def test_destroy_confirmed_by_one_stale_lookup_is_not_confirmed(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """The idle teardown's DELETE is answered but does not take, and the per-instance lookup
    right after it wrongly says "no such instance" (a stale read). Today that counted as
    destroyed and the instance billed on; now the listing still shows it, so the destroy
    is re-checked (and re-sent) each cycle until both say gone."""
    sf = await sim_fleet(max_instances=1, job_s=0.1)
    sf.submit(1)
    sf.run()
    (inst,) = await sf.wait(lambda: sf.owned(InstanceStatus.READY))
    iid = int(inst.id)
    sf.cloud.stale.ignore_destroy(iid)
    sf.cloud.stale.hide(iid, "show_instance")
    await sf.wait(sf.all_done)
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "destroyed")
    assert iid not in sf.cloud.instances  # what is confirmed is really gone
    deletes = [c for c in sf.calls_naming(iid) if c["endpoint"] == "destroy"]
    assert len(deletes) == 2


async def test_stale_listings_never_confirm_alone_and_a_relisted_record_is_kept(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Step by step: (1) a listing that still shows a destroyed instance for one read delays
    the confirmation by a cycle; (2) a DELETE that did not take, hidden from the lookup and
    one listing, is confirmed by those stale reads, but the next listing shows it again: it
    counts as billing, is destroyed again, and its record is not pruned while it is listed."""
    sf = await sim_fleet(max_instances=2, boot_delay_s=30.0)
    sf.add_queued(2)
    first, second = (await fl.fleet_once(sf.ctx)).rented
    store, cloud = sf.ctx.store, sf.cloud
    a, b = store.instances[first], store.instances[second]
    sf.ctx.settings.fleet.max_instances = 0  # nothing is rented again below

    # (1) the DELETE takes, the lookup agrees, one listing lags behind
    cloud.stale.lag_destroy(int(first), "list_instances")
    cleanup_failed_instance(sf.ctx, a, "drained (test)", block=False)
    assert await fl.advance_destroys(sf.ctx, time.time()) == []
    assert a.status is InstanceStatus.DESTROYING and int(first) not in cloud.instances
    a.next_destroy_at = time.time()
    assert await fl.advance_destroys(sf.ctx, time.time()) == [first]

    # (2) both reads stale at once: "confirmed", though it still runs
    cloud.stale.ignore_destroy(int(second))
    cloud.stale.hide(int(second), "show_instance")
    cloud.stale.hide(int(second), "list_instances")
    cleanup_failed_instance(sf.ctx, b, "drained (test)", block=False)
    assert await fl.advance_destroys(sf.ctx, time.time()) == [second]
    assert b.status is InstanceStatus.DESTROYED and int(second) in cloud.instances
    await discovery_once(sf.ctx)  # the next listing shows it again
    assert fl.billing(b) and fl.current_dph(sf.ctx) == pytest.approx(b.dph)
    fl.prune(sf.ctx, time.time() + 3 * 86400)  # long past the keep time
    assert second in store.instances and first not in store.instances
    assert await fl.advance_destroys(sf.ctx, time.time()) == [second]
    assert int(second) not in cloud.instances
    assert not fl.billing(b)
    await discovery_once(sf.ctx)
    fl.prune(sf.ctx, time.time() + 3 * 86400)
    assert second not in store.instances


# --- 4. gone from the listing: looked up at once --------------------------------------------------
async def test_instance_gone_from_vast_requeues_its_job_at_once_not_after_the_grace(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """A listing that misses a running instance once (stale) changes nothing: the lookup
    still finds it. When it really vanishes, the lookup confirms it and its job is
    requeued at once (no attempt counted) and finishes elsewhere, although lost_grace_s
    is 300 s."""
    sf = await sim_fleet(max_instances=1, job_s=2.5, idle_timeout_s=60.0)
    sf.ctx.settings.vast.lost_grace_s = 300.0
    [job_id] = sf.submit(1)
    sf.run()
    jobs = sf.ctx.store.jobs
    await sf.wait(lambda: job_id in jobs and jobs[job_id].started_at is not None, msg="started")
    first = jobs[job_id].instance
    assert first is not None
    inst = sf.ctx.store.instances[first]

    sf.cloud.stale.hide(int(first), "list_instances")
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.READY and inst.missing_since is None
    assert jobs[job_id].instance == first

    await sf.cloud.vanish(int(first))
    started = time.monotonic()
    await sf.wait(
        lambda: (
            inst.status
            in (InstanceStatus.LOST, InstanceStatus.DESTROYING, InstanceStatus.DESTROYED)
        ),
        10,
        "lost",
    )
    assert time.monotonic() - started < 5.0
    assert "listing and lookup" in (inst.lost_reason or inst.destroy_reason or "")
    await sf.wait(sf.all_done, 30, "job done elsewhere")
    final = sf.ctx.store.record(job_id)
    assert final is not None and final.attempts == 0 and final.instance != first


# --- 5. adopted instances bill the account -----------------------------------------------------
async def test_status_in_adopt_mode_shows_what_adopted_instances_bill_and_each_cost(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Adopt mode rents nothing, so vastd's spend stays $0 while the adopted instances bill:
    `status` shows their $/h as billing (apart from vastd's spend) and each one's cost."""
    sf = await sim_fleet(mode="adopt")
    a = await sf.cloud.add_instance(label="vastd", dph_total=0.4)
    b = await sf.cloud.add_instance(label="vastd", dph_total=0.2)
    await discovery_once(sf.ctx)
    store = sf.ctx.store
    store.instances[str(a)].first_seen = time.time() - 3600.0  # in use for an hour
    await store.flush()
    layout = Layout(sf.ctx.layout.root)
    status = json.loads(status_json(build_status(layout, load_state(layout.state_file))))
    totals = status["totals"]
    assert totals["spend_total"] == 0.0
    assert totals["dph_adopted"] == pytest.approx(0.6) and totals["dph_owned"] == 0.0
    assert totals["adopted"] == 2
    by_id = {i["id"]: i for i in status["instances"]}
    assert by_id[str(a)]["billing"] == "adopted"
    assert by_id[str(a)]["cost"] == pytest.approx(0.4, rel=0.01)
    assert by_id[str(b)]["cost"] == pytest.approx(0.0, abs=0.01)
    text = format_status(status)
    assert "billing: $0.600/h for 2 adopted instance(s) (not rented by vastd" in text
    assert f"{a}  ready" in text or f"{a}  discovered" in text
    assert "cost $0.4" in text and "(adopted)" in text


# --- 9. a 429 without Retry-After ---------------------------------------------------------------
async def test_429_without_retry_after_waits_at_least_a_floor(
    sim: tuple[SimCloud, str],  # noqa: F811
    sleep: RecordingSleep,  # noqa: F811
) -> None:
    """vast.ai's 429s carry no Retry-After: each wait is jittered but never below
    max(base, cap/2) (full jitter alone could retry at once, into the same limit)."""
    cloud, url = sim
    cloud.faults.add(endpoint="list_instances", status=429, count=12)
    async with VastClient(
        url, KEY, max_retries=12, backoff_base_s=1.0, backoff_max_s=8.0, sleep=sleep
    ) as c:
        assert await c.list_instances() == []
    assert len(sleep.delays) == 12
    for attempt, delay in enumerate(sleep.delays):
        cap = min(8.0, 2.0**attempt)
        assert max(1.0, cap / 2) <= delay <= cap, (attempt, delay)


async def test_a_429_holds_every_call_to_that_endpoint_and_the_listing_is_spaced(
    sim: tuple[SimCloud, str],  # noqa: F811
) -> None:
    """After a 429 (no Retry-After) on the listing, the next listing, whoever sends it,
    waits out the backoff; other endpoints are not held. With a minimum interval for the
    listing, back-to-back listings are spaced by it."""
    cloud, url = sim
    cloud.faults.add(endpoint="list_instances", status=429, count=1)
    async with VastClient(url, KEY, max_retries=0, backoff_base_s=0.5, backoff_max_s=0.5) as c:
        with pytest.raises(VastAIError):
            await c.list_instances()
        started = time.monotonic()
        assert await c.show_instance(1) is None  # another endpoint: not held
        assert time.monotonic() - started < 0.3
        listings = await asyncio.gather(c.list_instances(), c.list_instances())
        assert listings == [[], []]
        assert time.monotonic() - started >= 0.45
    async with VastClient(url, KEY, min_interval_s={LIST_INSTANCES: 0.3}) as spaced:
        started = time.monotonic()
        for _ in range(3):
            await spaced.list_instances()
        assert time.monotonic() - started >= 0.6
        again = time.monotonic()
        await spaced.show_instance(1)
        await spaced.show_instance(1)
        assert time.monotonic() - again < 0.3


async def test_a_destroy_check_reuses_the_cycles_listing(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """One listing per cycle serves every loop: a destroy confirmation needs a listing
    sent after its DELETE and takes discovery's when there is one, listing itself only
    when there is none."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=30.0)
    sf.add_queued(1)
    (iid,) = (await fl.fleet_once(sf.ctx)).rented
    sf.ctx.settings.fleet.max_instances = 0
    listings = lambda: sf.cloud.stats["GET list_instances"]  # noqa: E731
    before = listings()
    deleted_at = time.time()
    await discovery_once(sf.ctx)  # the cycle's listing, after the "DELETE"
    assert listings() == before + 1
    assert await absent_from_listing(sf.ctx, "no-such-id", deleted_at)
    assert listings() == before + 1  # reused
    assert not await absent_from_listing(sf.ctx, iid, time.time())
    assert listings() == before + 2  # nothing recent enough: one more


async def test_the_fleet_rides_out_429s_without_retry_after(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Every other request to the listing, the lookup and the offers answers 429 without
    Retry-After: the daemon's loops go on, the job is done and the instance destroyed
    (confirmed), nothing crashes."""
    sf = await sim_fleet(max_instances=1, job_s=0.2)
    for endpoint in ("list_instances", "show_instance", "search_offers"):
        sf.cloud.faults.add(endpoint=endpoint, status=429, count=None, probability=0.5)
    sf.submit(1)
    sf.run()
    await sf.wait(sf.all_done, 40, "job done")
    await sf.wait(
        lambda: sf.owned() and all(i.status is InstanceStatus.DESTROYED for i in sf.owned()),
        40,
        "destroyed",
    )
    assert sf.cloud.instances == {}
    assert any(c["status"] == 429 for c in sf.cloud.calls)


async def test_pages_of_one_listing_are_not_spaced(sim: tuple[SimCloud, str]) -> None:  # noqa: F811
    """The minimum interval is between listings: the pages of one (25 rows each) follow
    each other at once."""
    cloud, url = sim
    for _ in range(30):
        await cloud.add_instance(label="vastd", actual_status="loading")
    async with VastClient(url, KEY, min_interval_s={LIST_INSTANCES: 0.5}) as c:
        started = time.monotonic()
        assert len(await c.list_instances("vastd")) == 30
        assert time.monotonic() - started < 0.4
        assert sum(1 for x in cloud.calls if x["endpoint"] == "list_instances") == 2


# --- 3. every number from the API checked at the parse boundary -------------------------------
async def test_bad_numbers_from_the_api_are_skipped_logged_and_never_stored(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """An offer at 5000 $/h (past any sane price) is skipped even under a huge budget; an
    offer's NaN min_bid, and an instance row's NaN price, 10^9 GPUs, infinite end date and
    negative machine id are each logged and dropped: the adopted record holds no such
    number and the snapshot (no NaN, no Infinity) loads again."""
    sf = await sim_fleet(
        offers=[0.3, 5000.0], max_instances=3, max_total_dph=100_000.0, adopt_foreign_labelled=True
    )
    odd = min(sf.cloud.offers)
    sf.cloud.offers[odd]["min_bid"] = float("nan")
    bad = await sf.cloud.add_instance(
        label="vastd", dph_total=float("nan"), num_gpus=10**9, end_date=float("inf"),
        machine_id=-7,
    )  # fmt: skip
    sf.add_queued(3)  # the adopted instance counts: two more are wanted
    with capture_logs() as logs:
        await discovery_once(sf.ctx)
        report = await fl.fleet_once(sf.ctx)
    assert [sf.cloud.instances[int(i)]["dph_total"] for i in report.rented] == [0.3]
    rejected = {(e["field"], e["where"]) for e in logs if e["event"] == "api_number_rejected"}
    for field in ("dph_total", "num_gpus", "end_date", "machine_id"):
        assert (field, f"instance {bad}") in rejected
    assert ("min_bid", f"offer {odd}") in rejected
    assert any(e["event"] == "offer_skipped" and "5000" in e["reason"] for e in logs)
    record = sf.ctx.store.instances[str(bad)]
    assert record.dph == 0.0 and record.machine_id is None
    assert await sf.ctx.store.flush()
    text = sf.ctx.layout.state_file.read_text()
    assert "NaN" not in text and "Infinity" not in text
    load_state(sf.ctx.layout.state_file)


async def test_stale_reads_can_be_set_over_http(sim: tuple[SimCloud, str]) -> None:  # noqa: F811
    """Another process sets stale reads through the control surface: a hidden instance is
    missing from one listing, a lagging destroy still listed once, an ignored DELETE
    answered while the instance runs on; a bad kind is refused."""
    cloud, url = sim
    live = await cloud.add_instance(label="vastd")
    doomed = await cloud.add_instance(label="vastd")
    async with aiohttp.ClientSession() as http, VastClient(url, KEY) as c:

        async def stale(iid: int, **body: object) -> int:
            async with http.post(f"{url}/_sim/instances/{iid}/stale", json=body) as resp:
                return resp.status

        assert await stale(live, kind="hide", endpoint="list_instances") == 200
        assert await stale(doomed, kind="lag_destroy", endpoint="list_instances") == 200
        assert await stale(live, kind="ignore_destroy") == 200
        assert await stale(live, kind="nonsense") == 400
        assert [r["id"] for r in await c.list_instances("vastd")] == [doomed]
        assert await c.destroy_instance(doomed)
        assert [r["id"] for r in await c.list_instances("vastd")] == [live, doomed]
        assert [r["id"] for r in await c.list_instances("vastd")] == [live]
        assert await c.destroy_instance(live)  # answered...
        assert await c.show_instance(live) is not None  # ...and it runs on


async def test_a_fresh_rental_the_api_does_not_show_yet_is_not_given_up(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Right after a rent the API may lag: an instance never listed yet that neither the
    listing nor the lookup shows waits out the grace instead of being lost at once."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=30.0)
    sf.add_queued(1)
    (iid,) = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[iid]
    sf.cloud.stale.hide(int(iid), "list_instances")
    sf.cloud.stale.hide(int(iid), "show_instance")
    await discovery_once(sf.ctx)
    assert inst.status is InstanceStatus.BOOTING and inst.missing_since is not None
    await discovery_once(sf.ctx)  # listed now
    assert inst.missing_since is None and inst.last_seen is not None
