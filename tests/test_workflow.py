"""The workflow steps against a simulated account: discovery, preparation, the scheduler.

Each test calls one `<loop>_once`-style step directly with a real Context (a real
StateStore, SSH pool and API client) built by tests/ctxfactory.py against a SimCluster.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import GATED_WORKER, SimEnv, async_wait_for, prepare_step, pump, wait_saved
from vastd.core import files
from vastd.core import state as st
from vastd.core.files import JobFolder, Layout
from vastd.core.state import InstanceStatus, JobState, StateStore
from vastd.instances.preparation import marker_path, steps_hash
from vastd.orchestration import coordinator as co
from vastd.orchestration.actions import mark_reachable, mark_unreachable
from vastd.orchestration.context import Context, build_context
from vastd.orchestration.scheduler import (
    Scheduler,
    TaskType,
    create_task,
    schedule_result_collection,
)
from vastd.orchestration.workflow import (
    accept_inbox_files,
    coordinate_instance_preparation,
    discovery_once,
    handle_instance_failure,
    loop_steps,
    make_inbox_watcher,
    recover_after_restart,
    run_instance_preparation_workflow,
)
from vastd.status import build_status
from vastd.utils.config import PrepareStep, Settings
from vastd.utils.exceptions import SSHConnectionError


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


def events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in logs if e.get("event") == name]


# --- discovery ------------------------------------------------------------------------------
async def test_discovery_adopts_labelled_running_instances_only(env: SimEnv) -> None:
    """Labelled instances become DISCOVERED records with their SSH endpoint and an
    `instance_discovered` event; instances with another label or none are never recorded."""
    sim = await env.start(instances=2)
    other = await sim.cloud.add_instance(label="other-work")
    unlabelled = await sim.cloud.add_instance(label=None)
    ctx = env.context()
    labelled = {str(i) for i, row in sim.cloud.instances.items() if row["label"] == "vastd"}

    with capture_logs() as logs:
        seen = await discovery_once(ctx)

    assert seen == 2
    assert set(ctx.store.instances) == labelled
    for inst in ctx.store.instances.values():
        assert inst.status is InstanceStatus.DISCOVERED
        assert ctx.endpoints(inst), "an SSH endpoint is recorded"
        assert inst.label == "vastd"
    assert {str(e["instance"]) for e in events(logs, "instance_discovered")} == labelled
    assert str(other) not in ctx.store.instances and str(unlabelled) not in ctx.store.instances
    # A second listing adopts nothing new and still leaves the others alone.
    with capture_logs() as logs:
        await discovery_once(ctx)
    assert events(logs, "instance_discovered") == []
    assert set(ctx.store.instances) == labelled


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "count": None},
        {"status": 503, "count": None, "retry_after": "0"},
        {"status": 200, "body": "wrong_shape", "count": None},
        {"status": 200, "body": "html", "count": None},
        {"status": 200, "body": "empty", "count": None},
        {
            "status": 200,
            "body": "raw",
            "raw_body": '{"instances": [{"id": "x", "label": "vastd"}]}',
            "count": None,
        },
    ],
    ids=["500", "503-past-retries", "wrong-shape", "html", "empty", "row-without-int-id"],
)
async def test_discovery_failed_listing_changes_nothing(
    env: SimEnv, fault: dict[str, object]
) -> None:
    """A listing that fails (5xx past the retries, a malformed body) is never read as
    "no instances": no record changes, no absence clock starts, nothing is lost, even
    with a zero lost grace."""
    sim = await env.start(instances=2)
    ctx = env.context(env.settings(vast={"lost_grace_s": 0.0}))
    await discovery_once(ctx)
    before = {i.id: i.model_dump() for i in ctx.store.instances.values()}
    last_discovery = ctx.store.snapshot.last_discovery_at
    sim.cloud.faults.add(endpoint="list_instances", **fault)

    for _ in range(3):
        known = await discovery_once(ctx)

    assert known == 2
    after = {i.id: i.model_dump() for i in ctx.store.instances.values()}
    assert after == before
    assert all(i.missing_since is None for i in ctx.store.instances.values())
    assert ctx.store.snapshot.last_discovery_at == last_discovery


async def test_a_failing_listing_is_logged_once_per_change(env: SimEnv) -> None:
    """The API failing every cycle: `discovery_failed` at warning once (again when the
    error changes), the repeats at debug with a count, `discovery_recovered` at info once
    a listing succeeds, with how many failed."""
    sim = await env.start(instances=1)
    ctx = env.context()
    fault = sim.cloud.faults.add(endpoint="list_instances", status=500, count=None)
    with capture_logs() as logs:
        for _ in range(3):
            await discovery_once(ctx)
        sim.cloud.faults.remove(fault)
        sim.cloud.faults.add(endpoint="list_instances", status=200, body="html", count=None)
        await discovery_once(ctx)
        sim.cloud.faults.clear()
        await discovery_once(ctx)
        await discovery_once(ctx)

    failed = events(logs, "discovery_failed")
    assert [e["log_level"] for e in failed] == ["warning", "debug", "debug", "warning"]
    assert [e.get("repeats") for e in failed] == [None, 2, 3, None]
    assert failed[0]["error"] == failed[1]["error"] != failed[3]["error"]
    [back] = events(logs, "discovery_recovered")
    assert back["log_level"] == "info" and back["failures"] == 4
    assert len(ctx.store.instances) == 1


@pytest.mark.parametrize("api_status", ["exited", "offline"])
async def test_discovery_exited_instance_is_lost_and_its_job_requeued(
    env: SimEnv, api_status: str
) -> None:
    """An instance the API reports `exited`/`offline` becomes LOST (`instance_lost`), and
    its RUNNING job goes back to the queue (file in queued/) without counting an attempt."""
    sim = await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": "sleep 30; cat {input}"}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await pump(ctx, lambda: job.pgid is not None, message="job started")

    await sim.cloud.set_status(int(iid), api_status)
    with capture_logs() as logs:
        await discovery_once(ctx)

    assert ctx.store.instances[iid].status is InstanceStatus.LOST
    assert ctx.store.instances[iid].current_jobs == []
    assert job.state is JobState.QUEUED and job.instance is None
    assert job.attempts == 0
    assert ctx.layout.job_file(JobFolder.QUEUED, job_id).exists()
    assert not ctx.layout.job_file(JobFolder.RUNNING, job_id).exists()
    [lost] = events(logs, "instance_lost")
    assert lost["instance"] == iid and lost["requeued"] == 1


async def test_discovery_absent_instance_is_lost_only_after_the_grace(env: SimEnv) -> None:
    """An instance missing from the list whose per-instance lookup fails (an API error)
    is kept during `[vast] lost_grace_s`, then LOST. (A lookup that answers "no such
    instance" makes it LOST at once: tests/test_money.py.)"""
    sim = await env.start(instances=2)
    ctx = env.context(env.settings(vast={"lost_grace_s": 1.0}))
    await discovery_once(ctx)
    gone, stays = env.instance_ids()
    await sim.cloud.vanish(int(gone))
    sim.cloud.faults.add(endpoint="show_instance", status=500, count=None)

    await discovery_once(ctx)
    first_missing = ctx.store.instances[gone].missing_since
    assert first_missing is not None
    assert ctx.store.instances[gone].status is InstanceStatus.DISCOVERED

    deadline = time.monotonic() + 10
    while ctx.store.instances[gone].status is not InstanceStatus.LOST:
        assert time.monotonic() < deadline, "never marked lost"
        await discovery_once(ctx)
        await asyncio.sleep(0.1)
    assert time.time() - first_missing >= 1.0
    assert ctx.store.instances[stays].status is InstanceStatus.DISCOVERED


# --- preparation ----------------------------------------------------------------------------
def counting_steps(tag: str = "") -> list[dict[str, object]]:
    """A step whose check fails until its install created a file (relative to the host's
    own folder); every check and install appends a line to a counter file."""
    return [
        prepare_step(
            f"counted{tag}",
            check="echo c >> checks.txt; test -f prepared_flag",
            install="echo i >> installs.txt && touch prepared_flag",
        )
    ]


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_preparation_makes_instance_ready_and_writes_marker(env: SimEnv) -> None:
    """DISCOVERED -> READY after the steps ran (check, install, check), with the marker
    holding the steps' hash on the instance, and `instance_prepared` logged."""
    sim = await env.start(instances=1)
    settings = env.settings(prepare=counting_steps())
    ctx = env.context(settings)
    await discovery_once(ctx)
    [iid] = list(ctx.store.instances)

    with capture_logs() as logs:
        assert coordinate_instance_preparation(ctx) == 1
        await ctx.preparing[iid]
        assert ctx.store.instances[iid].status is InstanceStatus.READY

    inst = ctx.store.instances[iid]
    assert inst.status is InstanceStatus.READY
    wanted = steps_hash(settings.prepare)
    assert inst.prepared_hash == wanted
    assert Path(marker_path(settings.remote.root, iid)).read_text().strip() == wanted
    host_root = sim.hosts.get(int(iid)).root
    assert lines(host_root / "installs.txt") == 1
    assert lines(host_root / "checks.txt") == 2  # before and after the install
    assert [e["instance"] for e in events(logs, "instance_prepared")] == [iid]
    # A READY instance is not prepared again by the loop.
    assert coordinate_instance_preparation(ctx) == 0


async def test_the_discovery_step_starts_preparing_what_it_found_running(env: SimEnv) -> None:
    """The discovery loop's step starts the preparation of a newly listed running instance
    itself: READY without waiting for the preparation loop's next turn."""
    await env.start(instances=1)
    ctx = env.context()
    await loop_steps(ctx).discovery()
    [iid] = list(ctx.store.instances)
    assert iid in ctx.preparing
    await ctx.preparing[iid]
    assert ctx.store.instances[iid].status is InstanceStatus.READY


async def test_preparation_is_skipped_when_the_marker_matches(env: SimEnv) -> None:
    """A prepared instance re-verified (after a restart) becomes READY without running any
    step again: neither the install nor even the check; changed steps do run again."""
    sim = await env.start(instances=1)
    settings = env.settings(prepare=counting_steps())
    ctx = env.context(settings)
    [iid] = await env.ready(ctx)
    host_root = sim.hosts.get(int(iid)).root
    assert (lines(host_root / "installs.txt"), lines(host_root / "checks.txt")) == (1, 2)
    await wait_saved(ctx)
    await env.close_context(ctx)

    # A restart: recovery sends READY instances back to DISCOVERED to re-verify them.
    ctx2 = env.context(settings)
    recover_after_restart(ctx2)
    assert ctx2.store.instances[iid].status is InstanceStatus.DISCOVERED
    assert await run_instance_preparation_workflow(ctx2, iid)
    assert ctx2.store.instances[iid].status is InstanceStatus.READY
    assert (lines(host_root / "installs.txt"), lines(host_root / "checks.txt")) == (1, 2)

    # Other steps: another hash, so they run (their check passes: no install).
    ctx2.settings.prepare[:] = [PrepareStep(**counting_steps("-v2")[0])]  # type: ignore[arg-type]
    ctx2.store.instances[iid].status = InstanceStatus.DISCOVERED
    assert await run_instance_preparation_workflow(ctx2, iid)
    assert (lines(host_root / "installs.txt"), lines(host_root / "checks.txt")) == (1, 3)


async def test_a_huge_install_error_is_kept_short(env: SimEnv) -> None:
    """An install that floods stderr with one huge line: prepare_error (in the snapshot and
    the log) holds only its end, a bounded text."""
    await env.start(instances=1)
    flood = "head -c 200000 /dev/zero | tr '\\0' x >&2; echo; echo the-real-error >&2; exit 1"
    steps = [prepare_step("noisy", check="false", install=flood)]
    ctx = env.context(env.settings(prepare=steps))
    await discovery_once(ctx)
    [iid] = list(ctx.store.instances)
    with capture_logs():
        assert coordinate_instance_preparation(ctx) == 1
        await ctx.preparing[iid]
    error = ctx.store.instances[iid].prepare_error
    assert error is not None and "the-real-error" in error and len(error) < 1200


async def test_preparation_failure_backs_off_and_is_reported(env: SimEnv) -> None:
    """A failing install: prepare_failures counts it, next_prepare_at is in the future (the
    loop does not retry at once), prepare_error says why, and the instance gets no job."""
    await env.start(instances=1)
    steps = [prepare_step("broken", check="false", install="echo no-such-package >&2; exit 7")]
    ctx = env.context(env.settings(prepare=steps))
    await discovery_once(ctx)
    [iid] = list(ctx.store.instances)
    [job_id] = await env.submit(ctx)

    before = time.time()
    assert coordinate_instance_preparation(ctx) == 1
    await ctx.preparing[iid]

    inst = ctx.store.instances[iid]
    assert inst.status is not InstanceStatus.READY
    assert inst.prepare_failures == 1
    assert inst.next_prepare_at is not None and inst.next_prepare_at > before + 1
    assert inst.prepare_error is not None
    assert "exited 7" in inst.prepare_error and "no-such-package" in inst.prepare_error
    assert coordinate_instance_preparation(ctx) == 0, "retried before its back-off"
    assert await co.coordinate_job_distribution(ctx) == 0
    assert ctx.store.jobs[job_id].state is JobState.QUEUED
    # `vastd status` shows the error.
    status = build_status(ctx.layout, ctx.store.snapshot)
    [shown] = [i for i in status["instances"] if str(i["id"]) == iid]
    assert "exited 7" in str(shown["prepare_error"])


async def test_a_preparation_failing_the_same_way_is_warned_once(env: SimEnv) -> None:
    """Each back-off retry failing with the same error logs `instance_prepare_failed` at
    debug after the first warning; a different error is a warning again."""
    await env.start(instances=1)
    steps = [prepare_step("broken", check="false", install="echo same >&2; exit 7")]
    ctx = env.context(env.settings(prepare=steps))
    await discovery_once(ctx)
    [iid] = list(ctx.store.instances)
    inst = ctx.store.instances[iid]

    async def attempt() -> None:
        inst.next_prepare_at = None  # skip the back-off
        assert coordinate_instance_preparation(ctx) == 1
        await ctx.preparing[iid]

    with capture_logs() as logs:
        for _ in range(3):
            await attempt()
        ctx.settings.prepare[0].install = "echo other >&2; exit 8"
        await attempt()

    failed = events(logs, "instance_prepare_failed")
    assert [e["log_level"] for e in failed] == ["warning", "debug", "debug", "warning"]
    assert [e["failures"] for e in failed] == [1, 2, 3, 4]


async def test_an_unreachable_instance_is_logged_once_per_outage(env: SimEnv) -> None:
    """SSH failing on every poll: one `instance_unreachable` for the outage, one
    `instance_reachable` when it answers, and a later outage is logged again."""
    await env.start(instances=1)
    ctx = env.context()
    [iid] = await env.ready(ctx)
    inst = ctx.store.instances[iid]
    with capture_logs() as logs:
        for _ in range(3):
            mark_unreachable(ctx, inst, SSHConnectionError("connection refused"))
        mark_reachable(ctx, inst)
        mark_unreachable(ctx, inst, SSHConnectionError("connection refused"))
    names = [e["event"] for e in logs if e["event"].startswith("instance_")]
    assert names == ["instance_unreachable", "instance_reachable", "instance_unreachable"]
    assert inst.status is InstanceStatus.UNREACHABLE


async def test_host_key_change_drains_the_instance(env: SimEnv) -> None:
    """An instance whose host key changed (after being pinned) is DRAINING after its
    re-verification and never gets a job."""
    sim = await env.start(instances=1)
    ctx = env.context()
    [iid] = await env.ready(ctx)
    pinned = ctx.store.instances[iid].host_key
    assert pinned
    host = sim.hosts.get(int(iid))
    await host.kill()
    host.new_host_key()
    await host.start()
    await ctx.pool.drop(iid)
    ctx.store.instances[iid].status = InstanceStatus.DISCOVERED  # as after a restart

    assert await run_instance_preparation_workflow(ctx, iid) is False
    inst = ctx.store.instances[iid]
    assert inst.status is InstanceStatus.DRAINING
    assert inst.host_key == pinned, "the new key is never accepted"
    [job_id] = await env.submit(ctx)
    assert coordinate_instance_preparation(ctx) == 0
    assert await co.coordinate_job_distribution(ctx) == 0
    assert ctx.store.jobs[job_id].state is JobState.QUEUED


# --- the scheduler --------------------------------------------------------------------------
async def test_scheduler_dedups_by_key() -> None:
    """Scheduling the same work twice (same type and args) queues it once."""
    sched = Scheduler()
    assert schedule_result_collection(sched, "job-a")
    assert not schedule_result_collection(sched, "job-a")
    assert schedule_result_collection(sched, "job-b")  # other args: other work
    assert len(sched) == 2
    assert len(sched.pending(TaskType.COLLECT_RESULTS)) == 2


async def test_scheduler_honours_the_delay() -> None:
    """A delayed task is not due before its delay and `get_next_task` waits for it."""
    sched = Scheduler()
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="late"), delay_s=0.3)
    assert sched.pop_due() is None
    started = time.monotonic()
    async with asyncio.timeout(5):
        task = await sched.get_next_task()
    assert task.args == {"job": "late"}
    assert time.monotonic() - started >= 0.25
    assert len(sched) == 0


async def test_scheduler_get_next_task_order() -> None:
    """Due tasks come out earliest-due first; a task that became due later waits its turn."""
    sched = Scheduler()
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="third"), delay_s=0.2)
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="first"))
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="second"))
    got = []
    async with asyncio.timeout(5):
        for _ in range(3):
            got.append((await sched.get_next_task()).args["job"])
    assert got == ["first", "second", "third"]


async def test_scheduler_priority_decides_among_due_tasks() -> None:
    """Among tasks that are all due, the lower priority value runs first (the docstring of
    schedule_task: "lower priority runs first")."""
    sched = Scheduler()
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="later"), priority=1)
    sched.schedule_task(create_task(TaskType.COLLECT_RESULTS, job="j"), priority=0)
    async with asyncio.timeout(5):
        first = await sched.get_next_task()
    assert first.args == {"job": "j"}


async def test_scheduler_reschedule_failed_task() -> None:
    """A failed task comes back after its delay, with its attempt counted."""
    sched = Scheduler()
    schedule_result_collection(sched, "j")
    task = sched.pop_due()
    assert task is not None and task.attempts == 0
    assert sched.reschedule_failed_task(task, timedelta(seconds=0.2))
    assert task.attempts == 1
    assert sched.pop_due() is None
    async with asyncio.timeout(5):
        again = await sched.get_next_task()
    assert again is task and again.attempts == 1
    assert co.retry_delay(0) < co.retry_delay(3) <= timedelta(seconds=60)


async def test_host_key_change_mid_life_drains_the_instance(env: SimEnv) -> None:
    """A READY instance whose host key changes while in use is DRAINING once vastd meets the
    new key (at dispatch here), not merely unreachable; no attempt is counted."""
    sim = await env.start(instances=1)
    ctx = env.context(env.settings(ssh={"unreachable_grace_s": 60.0}))
    [iid] = await env.ready(ctx)
    host = sim.hosts.get(int(iid))
    await host.kill()
    host.new_host_key()
    await host.start()
    await ctx.pool.drop(iid)
    [job_id] = await env.submit(ctx)

    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: not ctx.dispatching, dispatch=False)

    assert ctx.store.instances[iid].status is InstanceStatus.DRAINING
    assert ctx.store.jobs[job_id].attempts == 0


async def test_a_lost_instance_keeps_its_started_runs_as_orphans(env: SimEnv) -> None:
    """An instance reported offline holds a started run: the job runs elsewhere (no
    attempt) and the first run is remembered as an orphan, to be kept if it finishes
    first should the instance come back."""
    await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    await co.coordinate_job_distribution(ctx)
    job = ctx.store.jobs[job_id]
    await async_wait_for(lambda: job.pgid is not None, 20, message="started")
    first = job.instance
    assert first is not None
    handle_instance_failure(ctx, ctx.store.instances[first], "vast.ai reports it offline")
    assert job.state is JobState.QUEUED and job.attempts == 0
    assert [o.instance for o in job.orphans] == [first]


# --- the inbox, in batches ----------------------------------------------------------------------
CSV = "a,b\n1,2\n"


def offline_context(tmp_path: Path) -> Context:
    """A Context over real folders and a real snapshot; no cloud, no SSH."""
    settings = Settings(paths={"root": str(tmp_path / "root")}, vast={"api_key": "x"})
    layout = Layout(settings.paths.root)
    layout.ensure()
    return build_context(settings, store=StateStore(layout.state_file), cloud=None)


def drop(inbox: Path, name: str, content: str = CSV) -> Path:
    """Written under a temp name, then renamed in (its mtime set earlier, as cp -p leaves
    it, so the watcher takes it at once)."""
    temp = inbox / f".{name}.part"
    temp.write_text(content)
    os.utime(temp, (1_700_000_000, 1_700_000_000))
    return temp.rename(inbox / name)


async def test_a_batch_is_recorded_only_once_its_files_are_durable_in_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept_inbox_files: no record of the batch exists when queued/ and the inbox are
    fsynced (once each, after every rename); then each file is a queued record, in order."""
    ctx = offline_context(tmp_path)
    names = [f"j{n:03d}" for n in range(300)]
    paths = [drop(ctx.layout.inbox, f"{name}.csv") for name in names]
    records_at_fsync: dict[str, int] = {}
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path in (str(ctx.layout.queued), str(ctx.layout.inbox)):
            assert path not in records_at_fsync, "one fsync per folder per batch"
            records_at_fsync[path] = len(ctx.store.jobs)
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    assert await accept_inbox_files(ctx, paths) == {}
    assert records_at_fsync == {str(ctx.layout.queued): 0, str(ctx.layout.inbox): 0}
    jobs = sorted(ctx.store.jobs.values(), key=lambda j: j.seq)
    assert [j.id for j in jobs] == names
    assert all(j.state is JobState.QUEUED for j in jobs)
    assert sorted(p.name for p in ctx.layout.queued.iterdir()) == [f"{n}.csv" for n in names]


async def test_disk_full_in_a_batch_keeps_the_files_in_the_inbox_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the daemon's watcher: renames into queued/ fail (ENOSPC) for part of a
    batch; those files stay in the inbox unrecorded (job_accept_failed) and are offered
    again, and accepted, once the disk has room; the rest of the batch is accepted."""
    ctx = offline_context(tmp_path)
    watcher = make_inbox_watcher(ctx)
    for n in range(6):
        drop(ctx.layout.inbox, f"j{n}.csv")
    real_rename = os.rename
    full = {"j1.csv", "j4.csv"}

    def rename(source: Any, destination: Any) -> None:
        if Path(destination).parent == ctx.layout.queued and Path(source).name in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(source, destination)

    monkeypatch.setattr(files.os, "rename", rename)
    with capture_logs() as logs:
        await watcher.deliver(await watcher.scan_once())
    assert sorted(ctx.store.jobs) == ["j0", "j2", "j3", "j5"]
    assert sorted(p.name for p in ctx.layout.inbox.iterdir() if p.suffix == ".csv") == sorted(full)
    assert sorted(Path(str(e["path"])).name for e in events(logs, "job_accept_failed")) == sorted(
        full
    )
    full.clear()
    await watcher.deliver(await watcher.scan_once())
    assert sorted(ctx.store.jobs) == [f"j{n}" for n in range(6)]
    assert all(j.state is JobState.QUEUED for j in ctx.store.jobs.values())


async def test_the_watcher_accepts_a_burst_in_batches(tmp_path: Path) -> None:
    """Files renamed in at once all become queued records through watcher.run(), a batch
    per fsync of queued/, not one fsync per file."""
    ctx = offline_context(tmp_path)
    watcher = make_inbox_watcher(ctx, settle_s=0.05, rescan_interval_s=0.2)
    watcher.batch_size = 40
    task = asyncio.create_task(watcher.run())
    try:
        for n in range(200):
            drop(ctx.layout.inbox, f"burst{n:03d}.csv")
        await async_wait_for(lambda: len(ctx.store.jobs) == 200, 20, message="all accepted")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(p.name for p in ctx.layout.queued.iterdir()) == [
        f"burst{n:03d}.csv" for n in range(200)
    ]


# --- the tests' own driver ------------------------------------------------------------------
async def test_pump_runs_followups_when_a_change_lands_during_its_save(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow-ups step waits until every change so far is on disk. A job's watcher
    (a task of its own) may change the store while pump's write runs; pump then does the
    saver's part instead of waiting forever (a CI run hung 180 s in this)."""
    await env.start(instances=0)
    ctx = env.context()
    st.add_followup(ctx.store, instance="10000999", job="j", run=None, reason="collected")
    flush = ctx.store.flush
    changed = []

    async def flush_then_a_change() -> bool:
        ok = await flush()
        if not changed:
            changed.append(True)
            ctx.store.mark_dirty()  # what a watcher's transition does
        return ok

    monkeypatch.setattr(ctx.store, "flush", flush_then_a_change)
    async with asyncio.timeout(20):
        await pump(ctx, lambda: not ctx.store.snapshot.followups, 10, dispatch=False)
    assert changed
