"""The fleet autopilot against the simulator: scaling, budget, boot deadline, preemption,
ownership, confirmed destroys and reconciliation of a rent whose answer was lost.

Instances are the simulator's live asyncssh hosts; the Context is built as the daemon
builds it. Tiny timings: boot 0.2 s, polls 0.2 s, idle 1 s, boot deadline ~2 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import async_wait_for
from vastd.core import state as st
from vastd.core.files import Layout
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceRecord, InstanceStatus, JobState, StateStore, load_state
from vastd.core.submit import submit_file
from vastd.instances.vast_api import VastClient
from vastd.orchestration import fleet as fl
from vastd.orchestration.context import Context, StoreHostKeys, build_context
from vastd.orchestration.workflow import (
    accept_inbox_files,
    discovery_once,
    orchestrate_job_processing,
    recover_after_restart,
)
from vastd.sim.cluster import SimCluster

pytestmark = pytest.mark.slow

GPU = "RTX 4090"


def fleet_settings(cluster: SimCluster, root: Path, job_s: float = 0.5, **fleet: Any) -> Any:
    values: dict[str, Any] = {
        "mode": "autoscale",
        "max_instances": 3,
        "offer_query": "gpu_name=RTX_4090",
        "order": "dph_total",
        "image": "sim/pytorch",
        "disk_gb": 10,
        "max_total_dph": 10.0,
        "idle_timeout_s": 1.0,
        "boot_timeout_s": 2.5,
    }
    values.update(fleet)
    return cluster.settings(
        root,
        prepare=[],
        vast={"poll_interval_s": 0.2, "lost_grace_s": 3.0},
        job={
            "command": "sleep {secs}; echo ok > {output_dir}/r.txt",
            "vars": {"secs": str(job_s)},
            "result_glob": "out/*.txt",
            "validate": "none",
            "poll_interval_s": 0.2,
        },
        fleet=values,
    )


@dataclass
class SimFleet:
    """A simulated account plus a vastd Context on it (loops started by `run()`)."""

    cluster: SimCluster
    ctx: Context
    tmp: Path
    task: asyncio.Task[None] | None = None
    jobs: list[str] = field(default_factory=list)

    @property
    def cloud(self) -> Any:
        return self.cluster.cloud

    def run(self) -> None:
        self.task = asyncio.create_task(
            orchestrate_job_processing(self.ctx, inbox_settle_s=0.05, inbox_rescan_s=0.5)
        )

    def submit(self, n: int, prefix: str = "job") -> list[str]:
        folder = self.tmp / "src"
        folder.mkdir(exist_ok=True)
        ids = []
        for i in range(n):
            job_id = f"{prefix}_{len(self.jobs) + i:04d}"
            path = folder / f"{job_id}.csv"
            path.write_text("a,b\n1,2\n")
            submit_file(self.ctx.layout, path)
            ids.append(job_id)
        self.jobs.extend(ids)
        return ids

    def add_queued(self, n: int) -> None:
        """Queued job records only (for steps that just count the queue)."""
        for i in range(n):
            st.add_job(self.ctx.store, f"q{i}", f"q{i}.csv", rows=1)

    def owned(self, *statuses: InstanceStatus) -> list[InstanceRecord]:
        return [
            i
            for i in self.ctx.store.instances.values()
            if i.owned and (not statuses or i.status in statuses)
        ]

    def all_done(self) -> bool:
        # The saver runs: a done job may already be in history.jsonl only.
        return all(self.ctx.store.job_state(j) is JobState.DONE for j in self.jobs)

    async def wait(self, what: Callable[[], Any], timeout_s: float = 20.0, msg: str = "") -> Any:
        def check() -> Any:
            if self.task is not None and self.task.done():
                raise AssertionError(f"the loops ended: {self.task!r}")
            return what()

        return await async_wait_for(check, timeout_s, poll_s=0.05, message=msg or repr(what))

    def calls_naming(self, instance_id: int) -> list[dict[str, Any]]:
        return [c for c in self.cloud.calls if f"/{instance_id}/" in c["path"]]


def _connect(cluster: SimCluster, root: Path, settings: Any) -> Context:
    layout = Layout(root)
    layout.ensure()
    store = StateStore.open(layout.state_file, coalesce_s=0.05)
    api = VastClient(cluster.url, cluster.api_key, timeout_s=10, max_retries=2, backoff_base_s=0.01)
    pool = SSHPool(settings.ssh, host_keys=StoreHostKeys(store))
    ctx = build_context(settings, store=store, pool=pool, api=api, watch_wait_s=0.2)
    recover_after_restart(ctx)
    return ctx


async def _close(ctx: Context, task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await ctx.aclose()
    await ctx.store.flush()
    await ctx.pool.aclose()
    assert ctx.cloud is not None
    await ctx.cloud.aclose()


@pytest.fixture
async def sim_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SimFleet]]]:
    """Factory: `await sim_fleet(offers=[...dph], **fleet settings)` -> SimFleet (cleaned up)."""
    made: list[SimFleet] = []

    async def make(
        offers: list[float] = (0.3, 0.31, 0.32, 0.33, 0.34),  # type: ignore[assignment]
        job_s: float = 0.5,
        boot_delay_s: float = 0.2,
        **fleet: Any,
    ) -> SimFleet:
        cluster = await SimCluster.start(tmp_path / "sim", n_offers=0, boot_delay_s=boot_delay_s)
        for i, dph in enumerate(offers):
            cluster.cloud.add_offer(gpu_name=GPU, dph_total=dph, machine_id=7000 + i)
        settings = fleet_settings(cluster, tmp_path / "vastd", job_s=job_s, **fleet)
        sf = SimFleet(cluster, _connect(cluster, tmp_path / "vastd", settings), tmp_path)
        made.append(sf)
        return sf

    yield make
    for sf in made:
        try:
            await _close(sf.ctx, sf.task)
        finally:
            await close_cluster(sf.cluster)


async def close_cluster(cluster: SimCluster) -> None:
    """Stop the simulator, then wait for the commands its hosts killed to be reaped.

    A killed command reaped after the loop closed would leave an unclosed transport.
    """
    procs = [p for h in cluster.hosts.hosts.values() for p in h._procs]
    await cluster.aclose()
    await async_wait_for(lambda: all(p.returncode is not None for p in procs), 10)


# --- the official CLI -------------------------------------------------------------------------
async def vastai_instances(cluster: SimCluster, home: Path) -> list[dict[str, Any]]:
    """`vastai show instances --raw` against the simulator (HOME in a temp dir)."""
    cli = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parents[1] / ".venv")) / "bin/vastai"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "XDG_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_STATE_HOME=str(home / ".state"),
        XDG_DATA_HOME=str(home / ".share"),
        VASTAI_NO_UPDATE_CHECK="1",
    )
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "--url",
        cluster.url,
        "--api-key",
        cluster.api_key,
        "--raw",
        "show",
        "instances",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


# --- scaling ----------------------------------------------------------------------------------
async def test_scales_up_to_max_and_back_to_zero_leaving_foreign_instances_alone(
    sim_fleet: Callable[..., Awaitable[SimFleet]], tmp_path: Path
) -> None:
    """Six jobs, max 3: exactly 3 rentals, then every owned instance is destroyed (confirmed:
    the sim lists none of them) once the queue drains; the official CLI sees the same fleet as
    vastd while it runs and at the end. An unlabelled instance and a labelled one vastd did not
    rent (autoscale, adopt_foreign_labelled=false) are never named in any API call, never
    logged into, and still run at the end."""
    sf = await sim_fleet(job_s=2.0, max_instances=3)
    unlabelled = await sf.cloud.add_instance(label=None)
    foreign = await sf.cloud.add_instance(label="vastd")
    sf.submit(6)
    sf.run()

    live = await sf.wait(lambda: len(sf.owned(InstanceStatus.READY)) == 3 and sf.owned())
    assert sf.cloud.stats["rent"] == 3
    ours = {int(i.id) for i in live}
    # While jobs run: the CLI, the simulator and vastd agree on the fleet.
    assert any(j.state is JobState.RUNNING for j in sf.ctx.store.jobs.values())
    rows = await vastai_instances(sf.cluster, tmp_path / "home")
    labelled = {r["id"] for r in rows if r["label"] == "vastd"} - {foreign}
    assert labelled == ours == set(sf.cloud.instances) - {foreign, unlabelled}
    assert sum(i.dph for i in live) <= sf.ctx.settings.fleet.max_total_dph

    await sf.wait(sf.all_done, 40, "all jobs done")
    await sf.wait(lambda: set(sf.cloud.instances) == {foreign, unlabelled}, 20, "torn down")
    await sf.wait(lambda: all(i.status is InstanceStatus.DESTROYED for i in sf.owned()))
    assert sf.cloud.stats["rent"] == 3
    for inst in sf.owned():
        assert inst.destroy_reason is not None and inst.destroy_reason.startswith("idle")
    assert sf.ctx.store.snapshot.spend_total > 0
    assert not sf.ctx.store.snapshot.rent_intents
    rows = await vastai_instances(sf.cluster, tmp_path / "home")
    assert {r["id"] for r in rows} == {foreign, unlabelled}
    for other in (unlabelled, foreign):
        assert sf.calls_naming(other) == []
        assert sf.cluster.hosts.get(other).connections_total == 0
        assert sf.cloud.instances[other]["actual_status"] == "running"
        assert str(other) not in sf.ctx.store.instances


async def test_dph_budget_holds_with_mixed_prices(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """With offers at 0.2/0.3/0.4/0.5/0.9 $/h and max_total_dph 1.0, the cheapest that fit are
    rented (0.2 + 0.3 + 0.4) and nothing more, however much work waits."""
    sf = await sim_fleet(offers=[0.9, 0.5, 0.4, 0.3, 0.2], max_instances=5, max_total_dph=1.0)
    sf.add_queued(5)
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 5
    assert sorted(sf.cloud.instances[int(i)]["dph_total"] for i in report.rented) == [0.2, 0.3, 0.4]
    again = await fl.fleet_once(sf.ctx)
    assert again.rented == []
    assert sf.cloud.stats["rent"] == 3
    assert fl.current_dph(sf.ctx) == pytest.approx(0.9)
    assert sum(r["dph_total"] for r in sf.cloud.instances.values()) <= 1.0


async def test_a_non_finite_price_never_turns_the_budget_off(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """An offer priced NaN (json.loads takes NaN) is skipped at the provider boundary: the
    budget still holds (1.26 $/h is not rented under a 0.5 cap), and nothing non-finite
    reaches the snapshot, which loads again (issue 10, item 3)."""
    sf = await sim_fleet(offers=[float("nan"), 1.26, 0.2], max_instances=3, max_total_dph=0.5)
    sf.add_queued(3)
    with capture_logs() as logs:
        report = await fl.fleet_once(sf.ctx)
    assert [sf.cloud.instances[int(i)]["dph_total"] for i in report.rented] == [0.2]
    assert any(e["event"] == "offer_skipped" for e in logs)
    assert await sf.ctx.store.flush()
    assert "NaN" not in sf.ctx.layout.state_file.read_text()
    saved = load_state(sf.ctx.layout.state_file)
    assert all(i.dph == 0.2 for i in saved.instances.values())


async def test_a_failing_offer_search_is_logged_once_per_change(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """The offer search failing every fleet cycle: one `offer_search_failed` warning, the
    repeats at debug; once it answers, `offer_search_recovered` at info and a rental."""
    sf = await sim_fleet(job_s=0.5, max_instances=1)
    fault = sf.cloud.faults.add(endpoint="search_offers", status=400, count=None)
    sf.submit(1)
    with capture_logs() as logs:
        sf.run()
        await sf.wait(lambda: len([e for e in logs if e["event"] == "offer_search_failed"]) >= 3)
        sf.cloud.faults.remove(fault)
        await sf.wait(sf.all_done, 30, "the job done once offers come back")
    failed = [e for e in logs if e["event"] == "offer_search_failed"]
    assert [e["log_level"] for e in failed][:3] == ["warning", "debug", "debug"], failed
    assert [e["log_level"] for e in failed].count("warning") == 1, failed
    [back] = [e for e in logs if e["event"] == "offer_search_recovered"]
    assert back["log_level"] == "info" and back["failures"] == len(failed)
    assert sf.cloud.stats["rent"] == 1


async def test_adopt_mode_never_rents(sim_fleet: Callable[..., Awaitable[SimFleet]]) -> None:
    """In adopt mode the fleet step rents nothing, whatever waits in the queue."""
    sf = await sim_fleet(mode="adopt")
    sf.add_queued(3)
    report = await fl.fleet_once(sf.ctx)
    assert report.rented == [] and sf.cloud.stats["rent"] == 0


async def test_spend_cap_stops_renting_and_drains(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """Once spend_total reaches max_total_spend, nothing more is rented and a booting
    instance is destroyed; spend accrues as dph x time owned."""
    sf = await sim_fleet(max_total_spend=5.0, boot_delay_s=30.0)
    sf.add_queued(2)
    first = await fl.fleet_once(sf.ctx)
    assert len(first.rented) == 2
    inst = sf.ctx.store.instances[first.rented[0]]
    before = sf.ctx.store.snapshot.spend_total
    inst.accrued_until = time.time() - 3600.0  # an hour ago
    fl.accrue_spend(sf.ctx, time.time())
    assert sf.ctx.store.snapshot.spend_total - before == pytest.approx(inst.dph, rel=0.01)
    sf.ctx.store.snapshot.spend_total = 5.0
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 0 and report.rented == []
    assert set(report.destroyed) == set(first.rented)
    assert sf.cloud.instances == {}
    assert all(i.status is InstanceStatus.DESTROYED for i in sf.owned())


# --- no duplicate rentals ---------------------------------------------------------------------
async def test_lost_rent_answer_is_reconciled_to_exactly_one_instance(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """The rent reaches the API but its answer is a 500 (the instance exists): the intent stays,
    no second rental happens for it, and discovery claims the instance as owned through its
    VASTD_INTENT env."""
    sf = await sim_fleet(boot_delay_s=30.0)
    sf.add_queued(1)
    sf.cloud.faults.add(endpoint="rent", status=500, count=1, after_effect=True)
    report = await fl.fleet_once(sf.ctx)
    assert report.rented == []
    assert len(sf.cloud.instances) == 1
    (intent_id,) = sf.ctx.store.snapshot.rent_intents
    on_disk = json.loads(sf.ctx.layout.state_file.read_text())
    assert intent_id in on_disk["rent_intents"]
    again = await fl.fleet_once(sf.ctx)
    assert again.rented == [] and sf.cloud.stats["rent"] == 1
    await discovery_once(sf.ctx)
    (iid,) = sf.cloud.instances
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.owned and inst.intent_id == intent_id and inst.booting_since is not None
    assert sf.ctx.store.snapshot.rent_intents == {}
    await fl.fleet_once(sf.ctx)
    assert sf.cloud.stats["rent"] == 1 and len(sf.cloud.instances) == 1


async def test_stale_intent_is_dropped_after_a_later_listing(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """An intent with no instance, older than INTENT_TTL_S at a successful listing, is dropped
    (and stops counting toward the target)."""
    sf = await sim_fleet()
    snap = sf.ctx.store.snapshot
    snap.rent_intents["old"] = {"offer_id": 1, "machine_id": 1, "dph": 0.3, "at": 0.0}
    snap.rent_intents["new"] = {"offer_id": 2, "machine_id": 2, "dph": 0.3, "at": time.time()}
    await discovery_once(sf.ctx)
    assert fl.expire_rent_intents(sf.ctx, time.time()) == 1
    assert set(snap.rent_intents) == {"new"}


async def test_instance_listed_after_its_intent_was_dropped_is_still_claimed_as_owned(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """A rent answered 500 created the instance, but the listing showed it only after its
    intent was dropped (INTENT_TTL_S): it was ignored for good, billing outside the budget
    while a second one was rented. The dropped intent still claims it: owned, counted in
    the budget and the ledger from the rent, and nothing more is rented for it. A dropped
    intent is forgotten after INTENT_KEEP_S."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=30.0, boot_timeout_s=3600.0)
    sf.add_queued(1)
    sf.cloud.faults.add(endpoint="rent", status=500, count=1, after_effect=True)
    assert (await fl.fleet_once(sf.ctx)).rented == []
    snap = sf.ctx.store.snapshot
    ((intent_id, intent),) = snap.rent_intents.items()
    intent["at"] -= fl.INTENT_TTL_S + 1  # rented long ago; the listings since lacked it
    snap.last_discovery_at = time.time()
    assert fl.expire_rent_intents(sf.ctx, time.time()) == 1
    assert snap.rent_intents == {} and intent_id in snap.dropped_intents
    await discovery_once(sf.ctx)
    (iid,) = sf.cloud.instances
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.owned and inst.intent_id == intent_id and inst.rented_at == intent["at"]
    assert snap.dropped_intents == {} and fl.current_dph(sf.ctx) == pytest.approx(inst.dph)
    assert (await fl.fleet_once(sf.ctx)).rented == [] and sf.cloud.stats["rent"] == 1
    snap.dropped_intents["old"] = {"offer_id": 1, "dph": 0.3, "at": time.time() - 1e6}
    fl.expire_rent_intents(sf.ctx, time.time())
    assert snap.dropped_intents == {}


async def test_instance_claimed_from_a_dropped_intent_gets_its_boot_deadline_from_the_claim(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """Its intent is already past INTENT_TTL_S (600 s) when the listing shows it: booting
    since the intent, it was past a 300 s boot deadline the moment it was claimed, so the
    first fleet pass destroyed it and blocked its machine. Its boot clock starts at the
    claim; its spend still counts from the intent (it was billing since then)."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=30.0, boot_timeout_s=300.0)
    sf.add_queued(1)
    sf.cloud.faults.add(endpoint="rent", status=500, count=1, after_effect=True)
    assert (await fl.fleet_once(sf.ctx)).rented == []
    snap = sf.ctx.store.snapshot
    (intent,) = snap.rent_intents.values()
    intent["at"] -= fl.INTENT_TTL_S + 1
    snap.last_discovery_at = time.time()
    assert fl.expire_rent_intents(sf.ctx, time.time()) == 1
    before = time.time()
    await discovery_once(sf.ctx)
    (iid,) = sf.cloud.instances
    inst = sf.ctx.store.instances[str(iid)]
    assert inst.owned and inst.status is InstanceStatus.BOOTING
    assert (inst.booting_since or 0.0) >= before and inst.rented_at == intent["at"]
    spent = snap.spend_total
    report = await fl.fleet_once(sf.ctx)
    assert report.destroying == [] and inst.status is InstanceStatus.BOOTING
    assert str(inst.machine_id) not in snap.blocked_machines
    hours = (time.time() - intent["at"]) / 3600.0
    assert snap.spend_total - spent == pytest.approx(inst.dph * hours, rel=0.05)


async def test_foreign_labelled_instance_adopted_only_when_allowed(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """A labelled instance vastd did not rent is left out of the snapshot in autoscale mode,
    and adopted (not owned, so never destroyed) with adopt_foreign_labelled = true."""
    sf = await sim_fleet()
    foreign = await sf.cloud.add_instance(label="vastd")
    await discovery_once(sf.ctx)
    assert str(foreign) not in sf.ctx.store.instances
    sf.ctx.settings.fleet.adopt_foreign_labelled = True
    await discovery_once(sf.ctx)
    inst = sf.ctx.store.instances[str(foreign)]
    assert not inst.owned
    inst.status = InstanceStatus.LOST
    await fl.fleet_once(sf.ctx)
    assert foreign in sf.cloud.instances and sf.calls_naming(foreign) == []


# --- boot deadline ----------------------------------------------------------------------------
@pytest.mark.parametrize("stuck_status", ["loading", "exited"])
async def test_boot_that_never_finishes_is_destroyed_and_machine_blocked(
    sim_fleet: Callable[..., Awaitable[SimFleet]], stuck_status: str
) -> None:
    """An instance stuck `loading` past boot_timeout_s, or `exited` while booting, is destroyed,
    its machine blocked for hours (persisted), and the job runs on a replacement rented on
    another machine."""
    sf = await sim_fleet(boot_delay_s=60.0, max_instances=1, boot_timeout_s=1.5)
    sf.submit(1)
    sf.run()
    first = await sf.wait(lambda: next(iter(sf.cloud.instances), None))
    machine = sf.cloud.instances[first]["machine_id"]
    await sf.cloud.set_status(first, stuck_status)
    sf.cloud.boot_delay_s = 0.2
    await sf.wait(lambda: sf.ctx.store.instances[str(first)].status is InstanceStatus.DESTROYED)
    assert first not in sf.cloud.instances
    until = sf.ctx.store.snapshot.blocked_machines[str(machine)]
    assert until > time.time() + 3600
    await sf.wait(sf.all_done, 20, "job done on a replacement")
    job = sf.ctx.store.record(sf.jobs[0])
    assert job is not None and job.attempts == 0 and job.instance != str(first)
    replacements = [i for i in sf.owned() if i.id != str(first)]
    assert replacements and all(i.machine_id != machine for i in replacements)
    await sf.ctx.store.flush()
    on_disk = json.loads(sf.ctx.layout.state_file.read_text())
    assert str(machine) in on_disk["blocked_machines"]


async def test_an_instance_listed_running_without_an_endpoint_after_a_restart_is_destroyed(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """After a restart an owned instance is listed running but with no SSH endpoint, and
    its old one is dead (so preparation tries it no more and counts no more failures): it
    gets the boot deadline again and is destroyed by it, though idle teardown is far off."""
    sf = await sim_fleet(max_instances=1, job_s=0.1, idle_timeout_s=600.0, boot_timeout_s=1.5)
    sf.submit(1)
    sf.run()
    await sf.wait(sf.all_done, 20, "done")
    (inst,) = sf.owned(InstanceStatus.READY)
    await sf.wait(lambda: inst.booting_since is None, msg="the boot deadline cleared")
    await _close(sf.ctx, sf.task)
    row = sf.cloud.instances[int(inst.id)]
    row.update(ssh_host=None, ssh_port=None, public_ipaddr=None, ports={})
    row.update(direct_port_start=None, direct_port_end=None)
    await sf.cluster.hosts.kill_host(int(inst.id))  # and nothing answers where it was
    sf.ctx, sf.task = _connect(sf.cluster, sf.ctx.layout.root, sf.ctx.settings), None
    inst = sf.ctx.store.instances[inst.id]
    assert inst.booting_since is None and inst.status is InstanceStatus.DISCOVERED
    sf.run()
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "destroyed")
    assert (inst.destroy_reason or "").startswith("not ready within")
    assert int(inst.id) not in sf.cloud.instances


# --- preemption -------------------------------------------------------------------------------
async def test_preempted_interruptible_instance_requeues_its_job_and_is_destroyed(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """Interruptible: the bid is min_bid x bid_markup. When the instance turns `stopped`
    mid-job, the job is requeued without counting an attempt, finishes on another instance,
    and the stopped one is destroyed (not merely left stopped); its machine is not blocked."""
    sf = await sim_fleet(job_s=3.0, max_instances=1, interruptible=True, bid_markup=1.5)
    sf.submit(1)
    sf.run()
    job_id = sf.jobs[0]
    job = sf.ctx.store.jobs
    await sf.wait(lambda: job_id in job and job[job_id].started_at is not None)
    first = job[job_id].instance
    assert first is not None
    row = sf.cloud.instances[int(first)]
    offer = sf.cloud.offers[row["ask_id"]]
    assert row["dph_total"] == pytest.approx(offer["min_bid"] * 1.5)
    assert row["is_bid"]
    await sf.cloud.set_status(int(first), "stopped")
    await sf.wait(lambda: sf.ctx.store.instances[first].status is InstanceStatus.DESTROYED)
    assert int(first) not in sf.cloud.instances
    assert "preempted" in (sf.ctx.store.instances[first].destroy_reason or "")
    await sf.wait(sf.all_done, 20, "job done elsewhere")
    final = sf.ctx.store.record(job_id)  # in state.json or already in history.jsonl
    assert final is not None and final.attempts == 0
    assert final.runs >= 1
    assert str(row["machine_id"]) not in sf.ctx.store.snapshot.blocked_machines
    done_on = [i for i in sf.owned() if i.id != first]
    assert done_on, "a replacement was rented"


# --- one job per GPU: instances that cannot take a job ---------------------------------------
def per_gpu_jobs(sf: SimFleet, gpus_per_job: int) -> None:
    sf.ctx.settings.job.jobs_per_instance = "gpus"
    sf.ctx.settings.job.gpus_per_job = gpus_per_job


async def test_only_offers_with_the_gpus_a_job_needs_are_rented(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """One job per 2 GPUs, offers of one GPU only: nothing is rented (it could take no
    job), and the log says why once (repeats at debug); a 2-GPU offer is then rented
    though dearer. A stricter num_gpus>= of the query's own stays as it is. A rental
    listed with one GPU after all is no capacity: another is rented, within
    max_instances."""
    sf = await sim_fleet(max_instances=1)
    per_gpu_jobs(sf, 2)
    assert fl.offer_query(sf.ctx) == "gpu_name=RTX_4090 num_gpus>=2"
    sf.ctx.settings.fleet.offer_query = "num_gpus>=4"
    assert fl.offer_query(sf.ctx) == "num_gpus>=4"
    sf.ctx.settings.fleet.offer_query = "gpu_name=RTX_4090"
    sf.add_queued(1)
    with capture_logs() as logs:
        for _ in range(3):
            assert (await fl.fleet_once(sf.ctx)).rented == []
    assert sf.cloud.stats["rent"] == 0
    said = [e for e in logs if e["event"] == "fleet_no_offer"]
    assert [e["log_level"] for e in said] == ["warning", "debug", "debug"], said
    assert "2 GPUs" in said[0]["reason"]
    sf.cloud.add_offer(gpu_name=GPU, dph_total=0.9, num_gpus=2, machine_id=7100)
    (iid,) = (await fl.fleet_once(sf.ctx)).rented
    assert sf.cloud.instances[int(iid)]["machine_id"] == 7100
    inst = sf.ctx.store.instances[iid]
    assert inst.num_gpus == 2
    inst.num_gpus = 1  # as a listing would say
    sf.cloud.add_offer(gpu_name=GPU, dph_total=0.9, num_gpus=2, machine_id=7101)
    assert (await fl.fleet_once(sf.ctx)).rented == []  # max_instances = 1
    sf.ctx.settings.fleet.max_instances = 2
    (second,) = (await fl.fleet_once(sf.ctx)).rented
    assert sf.cloud.instances[int(second)]["machine_id"] == 7101


async def test_an_instance_with_too_few_gpus_is_destroyed_idle_though_jobs_wait(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """One job per 2 GPUs; a rented instance lists one GPU only: it gets no job, another
    is rented for the job, and it is destroyed after idle_timeout_s whatever waits, its
    machine blocked."""
    sf = await sim_fleet(offers=[], max_instances=2)
    per_gpu_jobs(sf, 2)
    for i in range(2):
        sf.cloud.add_offer(gpu_name=GPU, dph_total=0.3 + i / 100, num_gpus=2, machine_id=7100 + i)
    sf.submit(1)
    await accept_inbox_files(sf.ctx, sorted(sf.ctx.layout.inbox.iterdir()))
    (first,) = (await fl.fleet_once(sf.ctx)).rented
    sf.cloud.instances[int(first)]["num_gpus"] = 1  # the host lists one GPU, not two
    inst = sf.ctx.store.instances[first]
    sf.run()
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "the 1-GPU one destroyed")
    assert inst.destroy_reason is not None and inst.destroy_reason.startswith("idle")
    assert "gpus_per_job" in inst.destroy_reason
    assert str(inst.machine_id) in sf.ctx.store.snapshot.blocked_machines
    await sf.wait(sf.all_done, 20, "the job done on the 2-GPU instance")
    record = sf.ctx.store.record(sf.jobs[0])
    assert record is not None and record.instance != first
    assert sf.cloud.stats["rent"] == 2


# --- confirmed destroy ------------------------------------------------------------------------
async def test_destroy_failing_twice_is_retried_until_confirmed(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """Idle teardown whose DELETE fails twice (HTTP 500) is retried with back-off until the
    API no longer has the instance; the record goes DESTROYING -> DESTROYED."""
    sf = await sim_fleet(max_instances=1, job_s=0.1)
    sf.cloud.faults.add(endpoint="destroy", status=500, count=2)
    sf.submit(1)
    sf.run()
    await sf.wait(sf.all_done)
    (inst,) = sf.owned()
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYING)
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 15)
    assert sf.cloud.instances == {}
    deletes = [c for c in sf.calls_naming(int(inst.id)) if c["endpoint"] == "destroy"]
    assert [c["status"] for c in deletes] == [500, 500, 200]
    assert inst.destroy_attempts == 2


async def test_owned_instance_silent_past_the_grace_is_replaced(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """An owned instance whose SSH stayed silent past [ssh] unreachable_grace_s is destroyed,
    its machine blocked, and a replacement rented on another machine."""
    sf = await sim_fleet(max_instances=1, boot_delay_s=30.0)
    sf.add_queued(1)
    (first,) = (await fl.fleet_once(sf.ctx)).rented
    inst = sf.ctx.store.instances[first]
    inst.booting_since = None
    inst.status = InstanceStatus.UNREACHABLE
    inst.unreachable_since = time.time() - 100_000
    report = await fl.fleet_once(sf.ctx)
    assert report.destroyed == [first] and "silent" in (inst.destroy_reason or "")
    assert str(inst.machine_id) in sf.ctx.store.snapshot.blocked_machines
    (second,) = report.rented
    assert sf.ctx.store.instances[second].machine_id != inst.machine_id


@pytest.mark.parametrize("drain", ["by_hand", "price_rise"])
async def test_a_drained_instance_silent_past_the_grace_is_destroyed(
    sim_fleet: Callable[..., Awaitable[SimFleet]], drain: str
) -> None:
    """An owned instance drained while its job runs (by hand, or a price rise past
    max_total_dph), whose SSH then dies while the API still lists it running: destroyed
    after [ssh] unreachable_grace_s like a ready one (its orphaned run does not keep it),
    its machine blocked."""
    sf = await sim_fleet(job_s=30.0, max_instances=1, max_total_dph=0.5)
    sf.ctx.settings.ssh.unreachable_grace_s = 1.0
    [job_id] = sf.submit(1)
    sf.run()
    await sf.wait(lambda: sf.ctx.store.job_state(job_id) is JobState.RUNNING, msg="running")
    inst = sf.ctx.store.instances[sf.ctx.store.jobs[job_id].instance or ""]
    if drain == "by_hand":
        st.drain_instance(sf.ctx.store, inst, st.MANUAL_DRAIN, requeue_jobs=False)
    else:
        sf.cloud.set_price(int(inst.id), 0.9)
    await sf.wait(lambda: inst.status is InstanceStatus.DRAINING, msg="drained")
    await sf.cluster.hosts.kill_host(int(inst.id))
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, 20, "destroyed")
    assert "silent" in (inst.destroy_reason or "")
    assert int(inst.id) not in sf.cloud.instances
    assert str(inst.machine_id) in sf.ctx.store.snapshot.blocked_machines


# --- a drain by hand (`vastd drain`) ------------------------------------------------------------
async def test_drained_owned_instance_finishes_its_job_then_is_destroyed(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """`drain` over the control socket: the owned instance's running job finishes there (done,
    not requeued), and once empty the instance is destroyed, though idle teardown is far off."""
    from vastd.orchestration.control import ControlServer

    sf = await sim_fleet(job_s=1.5, idle_timeout_s=600.0, max_instances=1)
    [job_id] = sf.submit(1)
    sf.run()
    await sf.wait(lambda: sf.ctx.store.job_state(job_id) is JobState.RUNNING, msg="running")
    job = sf.ctx.store.jobs[job_id]
    inst = sf.ctx.store.instances[job.instance or ""]
    answer = await ControlServer(sf.ctx).handle({"command": "drain", "instance": inst.id})
    assert answer["ok"] is True, answer
    assert inst.status is InstanceStatus.DRAINING and inst.drain_reason == st.MANUAL_DRAIN
    await sf.wait(lambda: sf.ctx.store.job_state(job_id) is JobState.DONE, msg="job done")
    await sf.wait(lambda: inst.status is InstanceStatus.DESTROYED, msg="drained one destroyed")
    assert inst.destroy_reason is not None and inst.destroy_reason.startswith("drained")
    record = sf.ctx.store.record(job_id)
    assert record is not None and record.instance == inst.id and record.runs == 1


async def test_a_drained_instance_running_its_job_rents_no_replacement(
    sim_fleet: Callable[..., Awaitable[SimFleet]],
) -> None:
    """An owned instance drained while its job runs there: the job is already served, so
    it asks for no new instance (none rented, destroyed idle and rented again while it
    runs); a queued job still asks for one as usual."""
    sf = await sim_fleet(job_s=60.0, max_instances=2)
    [job_id] = sf.submit(1)
    sf.run()
    await sf.wait(lambda: sf.ctx.store.job_state(job_id) is JobState.RUNNING, msg="running")
    await _close_loops(sf)
    inst = sf.ctx.store.instances[sf.ctx.store.jobs[job_id].instance or ""]
    st.drain_instance(sf.ctx.store, inst, st.MANUAL_DRAIN, requeue_jobs=False)
    rents = sf.cloud.stats["rent"]
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 0 and report.rented == []
    assert sf.cloud.stats["rent"] == rents
    sf.add_queued(1)
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 1 and len(report.rented) == 1


async def _close_loops(sf: SimFleet) -> None:
    """Stop the daemon's loops (the Context stays open), so a test steps the fleet itself."""
    assert sf.task is not None
    sf.task.cancel()
    await asyncio.gather(sf.task, return_exceptions=True)
    sf.task = None
