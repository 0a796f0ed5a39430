"""Dispatch, watching and collection (orchestration/coordinator.py) against a SimCluster.

The steps are called directly with a real Context: `coordinate_job_distribution` places
jobs, `watch_instance` (started by dispatch) turns remote exits into COLLECTING, and
`collect_job` (driven by tests/ctxfactory.pump, as the task loop would) finishes them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import (
    GATED_WORKER,
    WORKER_COMMAND,
    SimEnv,
    async_wait_for,
    group_alive,
    job_file_in,
    pump,
    remote_dir,
    wait_saved,
    wait_state,
)
from tests.helpers import LoopTurns, longest_run
from tests.test_gpus import offline_ctx, queued
from vastd.core import state as st
from vastd.core.files import JobFolder
from vastd.core.records import InstanceRecord, JobRecord, OrphanRun
from vastd.core.state import InstanceStatus, JobState, load_state
from vastd.execution import process_monitor, result_handler
from vastd.execution.process_monitor import KillOutcome, RemoteJobStatus
from vastd.orchestration import collection, market
from vastd.orchestration import coordinator as co
from vastd.orchestration.context import Context
from vastd.sim import hosts


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


async def save_until(ctx: Any, predicate: Any, timeout_s: float) -> None:
    """Flush the store (what its saver task does) until `predicate` holds."""
    saver = asyncio.create_task(ctx.store.run_saver())
    try:
        await async_wait_for(predicate, timeout_s)
    finally:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)


# --- placing jobs ---------------------------------------------------------------------------
async def test_jobs_go_in_acceptance_order_one_per_instance(env: SimEnv) -> None:
    """With two READY instances and three jobs, the first two accepted (not the first two
    by name) are dispatched, one per instance; the third waits in queued/."""
    await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": "sleep 30; cat {input}"}))
    await env.ready(ctx)
    files = env.make_job_files(3)
    # Accept in reverse name order: acceptance order is not name order.
    for path in reversed(files):
        await env.submit_file(ctx, path)
    accepted = [p.stem for p in reversed(files)]

    assert await co.coordinate_job_distribution(ctx) == 2

    jobs = ctx.store.jobs
    assert [jobs[j].state for j in accepted] == [
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.QUEUED,
    ]
    assert {jobs[accepted[0]].instance, jobs[accepted[1]].instance} == set(ctx.store.instances)
    for inst in ctx.store.instances.values():
        assert len(inst.current_jobs) == 1
    assert job_file_in(ctx, accepted[2]) == ["queued"]
    assert job_file_in(ctx, accepted[0]) == ["running"]
    # No room left: another round places nothing.
    assert await co.coordinate_job_distribution(ctx) == 0


def scan_choice(ctx: Context, job: JobRecord, load: Counter[str]) -> str | None:
    """The placement rule as a full scan of the instances: what `Room` must agree with."""
    orphaned = {o.instance for o in job.orphans}
    room = [
        i
        for i in ctx.store.instances.values()
        if i.status is InstanceStatus.READY
        and i.id not in orphaned
        and st.slot_load(ctx.store, i) + load[i.id] < co.instance_slots(ctx, i)
        and market.fits_before_end(ctx, i)
    ]
    pool = [i for i in room if i.id not in job.avoid_instances]
    waits = job.requeued_at is not None and time.time() - job.requeued_at <= co.RETRY_WAIT_OTHER_S
    others = [
        i
        for i in ctx.store.instances.values()
        if (i.status is InstanceStatus.READY or (i.status in co.COMING and i.owned))
        and i.id not in job.avoid_instances
        and i.id not in orphaned
        and market.fits_before_end(ctx, i)
    ]
    if not pool and (not others or not waits):
        pool = room  # none it has not failed on could take it (or it waited): one it failed on
    best = min(pool, key=lambda i: (len(i.current_jobs), i.idle_since or 0.0, i.id), default=None)
    return best.id if best is not None else None


@pytest.mark.parametrize("seed", range(8))
def test_a_rounds_room_picks_what_a_full_scan_would(tmp_path: Path, seed: int) -> None:
    """One dispatch round keeps a heap of the instances with room (one scan) instead of
    scanning them for every job. Over random fleets (not ready, ended rentals, orphaned
    runs as load, jobs that failed on or left orphans on some instances) and while the
    round assigns jobs and drains instances, each pick is the full scan's choice."""
    rng = random.Random(seed)
    ctx = offline_ctx(tmp_path, jobs_per_instance=3)
    now = time.time()
    ids = [str(100 + n) for n in range(30)]
    for iid in ids:
        status = rng.choice([InstanceStatus.READY] * 5 + [InstanceStatus.PREPARING])
        inst = InstanceRecord(
            id=iid, status=status, idle_since=now - rng.choice([0, 5, 50]), owned=rng.random() < 0.5
        )
        if rng.random() < 0.1:
            inst.end_date = now + 1  # no job fits before its rental ends
        ctx.store.instances[iid] = inst
    load = Counter({iid: rng.choice([0, 0, 0, 1, 3]) for iid in ids})
    for n in range(20):  # jobs already out before the round
        iid = rng.choice(ids)
        if ctx.store.instances[iid].status is InstanceStatus.READY:
            queued(ctx, f"pre{n}")
            st.mark_job_assigned(ctx.store, f"pre{n}", iid)
    room = co.Room(ctx, load)
    picked = 0
    for n in range(80):
        job = queued(ctx, f"j{n}")
        job.avoid_instances = rng.sample(ids, rng.choice([0, 0, 1, 5, 29]))
        job.requeued_at = rng.choice([None, now, now - co.RETRY_WAIT_OTHER_S - 1])
        if rng.random() < 0.3:
            job.orphans = [OrphanRun(instance=i, run="r") for i in rng.sample(ids, 2)]
        expected = scan_choice(ctx, job, load)
        inst = room.pick(job)
        assert (inst.id if inst else None) == expected, n
        if inst is not None and rng.random() < 0.9:
            st.mark_job_assigned(ctx.store, job.id, inst.id)
            picked += 1
        if rng.random() < 0.1:
            drained = ctx.store.instances[rng.choice(ids)]
            if drained.status is InstanceStatus.READY:
                st.drain_instance(ctx.store, drained, reason="test", requeue_jobs=False)
    assert picked > 10  # the round did place jobs, up to full instances


def test_a_retry_waits_for_an_instance_it_has_not_failed_on(tmp_path: Path) -> None:
    """A job that failed on A is not given A again while B, busy or on its way, could
    take it (a host that fails every job at once is always the least loaded); a fresh
    job still goes to A. With no other instance that could take it, A it is."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1)
    for iid in ("101", "102"):
        ctx.store.instances[iid] = InstanceRecord(id=iid, status=InstanceStatus.READY)
    b = ctx.store.instances["102"]
    queued(ctx, "long")
    st.mark_job_assigned(ctx.store, "long", "102")  # B is full
    retry = queued(ctx, "retry")
    retry.avoid_instances = ["101"]
    retry.requeued_at = time.time()
    assert co.find_best_instance_for_job(ctx, retry) is None
    b.owned = True  # rented by vastd: it comes, or is torn down
    for status in (InstanceStatus.BOOTING, InstanceStatus.PREPARING):
        b.status = status
        assert co.find_best_instance_for_job(ctx, retry) is None, status
    fresh = queued(ctx, "fresh")
    assert getattr(co.find_best_instance_for_job(ctx, fresh), "id", None) == "101"
    b.status = InstanceStatus.DRAINING  # no other could take it: back to A
    assert getattr(co.find_best_instance_for_job(ctx, retry), "id", None) == "101"


async def test_a_host_that_fails_every_job_is_drained_while_the_others_complete_them(
    env: SimEnv,
) -> None:
    """Every job exits 1 at once on one instance ("CUDA error"), as it would on a host
    whose GPU is gone: it was always the least loaded, took most of the queue and failed
    7 of 12 jobs for good. Once three jobs that failed there (nothing completing there in
    between) completed elsewhere, it is drained (undrain by hand puts it back, a fresh count);
    every job ends done on the good instance."""
    await env.start(instances=2)
    bad = sorted(str(i) for i in env.sim.cloud.instances)[0]
    command = (
        f'case "$PWD" in */{bad}/*) echo "CUDA error: no CUDA-capable device" >&2; exit 1;; '
        "esac; sleep 0.3; echo x > {output_dir}/r_1"
    )
    settings = env.settings(
        job={"command": command, "result_glob": "out/r_*", "validate": "none", "max_attempts": 3}
    )
    ctx = env.context(settings)
    await env.ready(ctx)
    jobs = [ctx.store.jobs[j] for j in await env.submit(ctx, 12)]
    with capture_logs() as logs:
        await pump(ctx, lambda: all(j.state is JobState.DONE for j in jobs), timeout_s=60)
    inst = ctx.store.instances[bad]
    assert inst.status is InstanceStatus.DRAINING and inst.drain_reason == st.FAILING_DRAIN
    drained = [e for e in logs if e["event"] == "instance_drained" and e["instance"] == bad]
    assert [e["reason"] for e in drained] == [st.FAILING_DRAIN]
    failed_there = {e["job"] for e in logs if e["event"] == "job_retry" and e["instance"] == bad}
    assert st.FAILING_JOBS_MAX <= len(failed_there) < len(jobs)  # drained before the end
    assert len(inst.failures_proven) >= st.FAILING_JOBS_MAX
    assert st.undrain_instance(ctx.store, inst)
    assert inst.failed_jobs_in_row == [] and inst.failures_proven == []


def test_a_job_command_broken_everywhere_drains_no_instance(tmp_path: Path) -> None:
    """Different jobs failing on every instance alike (nothing completes anywhere) is the
    command's fault, not a host's: no instance is drained for it."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1)
    for iid in ("101", "102"):
        ctx.store.instances[iid] = InstanceRecord(id=iid, status=InstanceStatus.READY)
    for n in range(2 * st.FAILING_JOBS_MAX):
        job = queued(ctx, f"j{n}")
        st.mark_job_assigned(ctx.store, job.id, ("101", "102")[n % 2])
        st.record_attempt_failure(ctx.store, job.id, reason="exit 1", exit_code=1, max_attempts=1)
    assert all(i.status is InstanceStatus.READY for i in ctx.store.instances.values())
    assert len(ctx.store.instances["101"].failed_jobs_in_row) == st.FAILING_JOBS_MAX


def test_jobs_failing_on_their_own_input_drain_no_instance(tmp_path: Path) -> None:
    """Bad rows fail a job wherever it runs: three of them failing on A while a good job
    completes on B say nothing against A (a review found A drained, then destroyed).
    Only jobs that failed on A and then completed elsewhere count."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1)
    for iid in ("A", "B"):
        ctx.store.instances[iid] = InstanceRecord(id=iid, status=InstanceStatus.READY)

    def run(job_id: str, on: str, *, ok: bool) -> None:
        job = ctx.store.jobs.get(job_id) or queued(ctx, job_id)
        st.mark_job_assigned(ctx.store, job.id, on)
        if ok:
            st.mark_job_exited(ctx.store, job.id, exit_code=0, error=None)
            st.mark_job_completed(
                ctx.store, job.id, result_files=[], instance_id=on, run_id=job.run_id
            )
        else:
            st.record_attempt_failure(
                ctx.store, job.id, reason="exit 1", exit_code=1, max_attempts=3
            )
        ctx.store.jobs[job.id].not_before = None

    a = ctx.store.instances["A"]
    for n in range(3):
        run(f"bad{n}", "A", ok=False)
        run(f"good{n}", "B", ok=True)
        run(f"bad{n}", "B", ok=False)  # fails elsewhere too: its own fault
    assert a.status is InstanceStatus.READY and a.failures_proven == []
    for n in range(st.FAILING_JOBS_MAX):  # failed on A, then completed on B: A's fault
        run(f"host{n}", "A", ok=False)
        assert a.status is InstanceStatus.READY
        run(f"host{n}", "B", ok=True)
    assert a.status is InstanceStatus.DRAINING and a.drain_reason == st.FAILING_DRAIN


def test_a_retry_waits_for_another_instance_only_so_long_and_only_for_one_that_comes(
    tmp_path: Path,
) -> None:
    """A review found a retry waiting for good while the instance it failed on sat free:
    for an adopted instance stuck before ready (never torn down), or past any bound. It
    waits only for ready or owned ones, for RETRY_WAIT_OTHER_S at most."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1)
    ctx.store.instances["A"] = InstanceRecord(id="A", status=InstanceStatus.READY)
    stuck = InstanceRecord(id="B", status=InstanceStatus.DISCOVERED, prepare_failures=50)
    ctx.store.instances["B"] = stuck
    retry = queued(ctx, "retry")
    retry.avoid_instances = ["A"]
    retry.requeued_at = time.time()
    assert getattr(co.find_best_instance_for_job(ctx, retry), "id", None) == "A"
    stuck.owned = True
    assert co.find_best_instance_for_job(ctx, retry) is None  # it comes or is torn down
    retry.requeued_at = time.time() - co.RETRY_WAIT_OTHER_S - 1
    assert getattr(co.find_best_instance_for_job(ctx, retry), "id", None) == "A"


async def test_retries_waiting_at_the_head_do_not_keep_the_free_instance_from_the_rest(
    tmp_path: Path,
) -> None:
    """More waiting retries at the head than one round looks at (free + DISPATCH_SLACK):
    the round looks further and the fresh job behind them gets the free instance."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1)
    for iid in ("A", "B"):
        ctx.store.instances[iid] = InstanceRecord(id=iid, status=InstanceStatus.READY)
    queued(ctx, "long")
    st.mark_job_assigned(ctx.store, "long", "B")
    for n in range(co.DISPATCH_SLACK + 1):
        retry = queued(ctx, f"r{n:03}")
        retry.avoid_instances, retry.requeued_at = ["A"], time.time()
    fresh = queued(ctx, "zfresh")
    assert await co.coordinate_job_distribution(ctx) == 1
    assert fresh.instance == "A"
    assert all(j.state is JobState.QUEUED for j in ctx.store.jobs.values() if j.id[0] == "r")


async def test_a_waiting_retry_does_not_hold_up_the_jobs_behind_it(env: SimEnv) -> None:
    """The queue's head waits for an instance it has not failed on; a fresh job behind
    it is placed on the free instance all the same."""
    await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    a, b = await env.ready(ctx)
    first, retry, fresh = (ctx.store.jobs[j] for j in await env.submit(ctx, 3))
    ctx.store.instances[a].status = InstanceStatus.DRAINING
    assert await co.coordinate_job_distribution(ctx) == 1
    assert first.instance == b  # B is busy from now
    ctx.store.instances[a].status = InstanceStatus.READY
    retry.avoid_instances = [a]  # as if it had failed on A
    retry.requeued_at = time.time()

    assert await co.coordinate_job_distribution(ctx) == 1
    assert retry.state is JobState.QUEUED and fresh.instance == a
    env.open_gate(a)
    env.open_gate(b)


async def test_a_waves_starts_take_their_first_steps_a_chunk_per_loop_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full wave's starts spawned at once ran their first steps in one loop turn (128
    of them about 28 ms): they are spawned `DISPATCH_SPAWN_CHUNK` at a time, and every
    assigned job is still started once."""
    ctx = offline_ctx(tmp_path)
    jobs = 3 * co.DISPATCH_SPAWN_CHUNK + 5
    for n in range(jobs):
        ctx.store.instances[str(n)] = InstanceRecord(id=str(n), status=InstanceStatus.READY)
        queued(ctx, f"j{n:03}")
    started_at: dict[str, int] = {}
    async with LoopTurns() as turns:

        async def first_step(_ctx: Context, job_id: str, *_: Any) -> None:
            started_at[job_id] = turns.count

        monkeypatch.setattr(co, "dispatch_job", first_step)
        assert await co.coordinate_job_distribution(ctx) == jobs
        await async_wait_for(lambda: len(started_at) == jobs, 5)
    assert sorted(started_at) == sorted(ctx.store.jobs)
    assert longest_run(sorted(started_at.values())) <= co.DISPATCH_SPAWN_CHUNK


async def test_no_job_on_an_instance_that_is_not_ready(env: SimEnv) -> None:
    """DISCOVERED, UNREACHABLE and DRAINING instances get no job."""
    await env.start(instances=3)
    ctx = env.context()
    await env.ready(ctx)
    a, b, c = sorted(ctx.store.instances)
    ctx.store.instances[a].status = InstanceStatus.DISCOVERED
    ctx.store.instances[b].status = InstanceStatus.UNREACHABLE
    ctx.store.instances[c].status = InstanceStatus.DRAINING
    [job_id] = await env.submit(ctx)

    assert await co.coordinate_job_distribution(ctx) == 0
    assert ctx.store.jobs[job_id].state is JobState.QUEUED
    assert all(not i.current_jobs for i in ctx.store.instances.values())


async def test_assignment_is_saved_before_the_upload(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the upload starts, state.json on disk already says RUNNING on that instance."""
    await env.start(instances=1)
    ctx = env.context()
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    seen: list[tuple[str, str | None]] = []
    original = co.execute_job_on_instance

    async def spy(conn: Any, **kwargs: Any) -> Any:
        on_disk = load_state(ctx.layout.state_file).jobs[kwargs["job_id"]]
        seen.append((on_disk.state.value, on_disk.instance))
        return await original(conn, **kwargs)

    monkeypatch.setattr(co, "execute_job_on_instance", spy)
    await co.coordinate_job_distribution(ctx)
    await wait_state(ctx, job_id, JobState.DONE)

    assert seen == [("running", iid)]


async def test_dispatch_to_an_unreachable_instance_keeps_the_assignment(env: SimEnv) -> None:
    """A host that is down at dispatch: the job stays RUNNING on it with no attempt
    counted, the instance is UNREACHABLE; once back, the start happens and the job ends
    DONE, started once."""
    sim = await env.start(instances=1)
    ctx = env.context(env.settings(ssh={"unreachable_grace_s": 60.0}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    await sim.hosts.kill_host(int(iid))
    await ctx.pool.drop(iid)

    assert await co.coordinate_job_distribution(ctx) == 1
    job = ctx.store.jobs[job_id]
    await async_wait_for(lambda: not ctx.dispatching, 10, message="dispatch attempt ended")
    assert job.state is JobState.RUNNING and job.instance == iid
    assert job.attempts == 0
    assert ctx.store.instances[iid].status is InstanceStatus.UNREACHABLE
    assert job_file_in(ctx, job_id) == ["running"]
    on_disk = load_state(ctx.layout.state_file).jobs[job_id]
    assert (on_disk.state, on_disk.instance) == (JobState.RUNNING, iid)

    await sim.hosts.revive_host(int(iid))
    co.handle_system_failures(ctx)  # what the health loop does for unwatched jobs
    await wait_state(ctx, job_id, JobState.DONE, timeout_s=20)
    assert job.runs == 1 and job.attempts == 0


async def test_dispatch_cut_after_the_upload_restarts_instead_of_failing(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the job folder and input exist but before the start:
    the folder with no pid is 'never started', not 'vanished'. The start is simply done
    again (same attempt) and the job ends DONE with no attempt counted."""
    from vastd.execution import job_runner
    from vastd.utils.exceptions import SSHConnectionError

    await env.start(instances=1)
    ctx = env.context(env.settings(ssh={"unreachable_grace_s": 60.0}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    real_start = job_runner.start_job_process
    cuts = 0

    async def cut_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal cuts
        if cuts == 0:
            cuts += 1
            raise SSHConnectionError("connection lost")
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(job_runner, "start_job_process", cut_once)
    assert await co.coordinate_job_distribution(ctx) == 1
    job = ctx.store.jobs[job_id]
    await async_wait_for(lambda: not ctx.dispatching, 10, message="first dispatch ended")
    assert remote_dir(ctx, iid, job_id).is_dir() and job.pgid is None
    co.handle_system_failures(ctx)  # the watcher finds the folder without a pid
    await wait_state(ctx, job_id, JobState.DONE, timeout_s=20)
    assert job.attempts == 0 and job.runs == 1 and cuts == 1


async def test_a_job_file_removed_from_queued_fails_once_with_a_reason(env: SimEnv) -> None:
    """Someone deletes a queued job's CSV: the job fails with an .error.json saying so,
    instead of being retried for ever."""
    await env.start(instances=1)
    ctx = env.context()
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    ctx.layout.job_file(JobFolder.QUEUED, job_id).unlink()
    assert await co.coordinate_job_distribution(ctx) == 0
    job = ctx.store.jobs[job_id]
    assert job.state is JobState.FAILED
    error = json.loads(ctx.layout.error_file(job_id).read_text())
    assert error["job"] == job_id and "vanished" in error["reason"]


async def test_a_failed_start_of_a_job_requeued_meanwhile_counts_nothing(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance is declared lost while the start is under way, then the start fails:
    the requeued job is left alone (no attempt, file in queued/), not failed."""
    from vastd.execution import job_runner
    from vastd.orchestration.workflow import handle_instance_failure
    from vastd.utils.exceptions import JobExecutionError

    await env.start(instances=1)
    ctx = env.context(env.settings(job={"max_attempts": 1}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    release = asyncio.Event()

    async def slow_failing_start(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        raise JobExecutionError("job start failed: cannot enter the job folder")

    monkeypatch.setattr(job_runner, "start_job_process", slow_failing_start)
    assert await co.coordinate_job_distribution(ctx) == 1
    job = ctx.store.jobs[job_id]
    handle_instance_failure(ctx, ctx.store.instances[iid], "vast.ai reports it exited")
    assert job.state is JobState.QUEUED
    release.set()
    await async_wait_for(lambda: not ctx.dispatching, 10, message="dispatch ended")
    assert job.state is JobState.QUEUED and job.attempts == 0
    assert job_file_in(ctx, job_id) == ["queued"]


async def test_an_instance_lost_while_the_file_moves_gets_no_job(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance is lost while the assignment is being saved: nothing is uploaded, the
    job is back in the queue (file in queued/), never left RUNNING on a LOST instance."""
    from vastd.orchestration.inventory import handle_instance_failure

    await env.start(instances=1)
    ctx = env.context()
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    real_flush = ctx.store.flush

    async def flush_and_lose() -> bool:
        handle_instance_failure(ctx, ctx.store.instances[iid], "vast.ai reports it exited")
        return await real_flush()

    monkeypatch.setattr(ctx.store, "flush", flush_and_lose)
    assert await co.coordinate_job_distribution(ctx) == 0
    job = ctx.store.jobs[job_id]
    assert job.state is JobState.QUEUED and job.instance is None
    assert job_file_in(ctx, job_id) == ["queued"] and not ctx.dispatching


async def test_a_refused_remote_cleanup_does_not_block_the_failure(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed job whose remote folder cannot be removed still ends FAILED with its
    .error.json: the clean-up is best effort."""
    from vastd.utils.exceptions import JobExecutionError

    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": "exit 3 # {input}", "max_attempts": 1}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise JobExecutionError("cannot remove the remote job folder: Directory not empty")

    from vastd.orchestration import followups

    monkeypatch.setattr(followups, "cleanup_remote_jobs", refuse)
    await wait_state(ctx, job_id, JobState.FAILED, timeout_s=20)
    assert ctx.layout.error_file(job_id).exists()
    # The clean-up stays recorded (and is retried) until it can be done.
    await pump(ctx, lambda: any(f.attempts for f in ctx.store.snapshot.followups.values()))
    assert [f.job for f in ctx.store.snapshot.followups.values()] == [job_id]


async def test_a_failed_job_is_retried_on_another_instance(env: SimEnv) -> None:
    """A job that failed on instance A is placed on B next (`avoid_instances`), and ends
    DONE there with one attempt counted."""
    await env.start(instances=2)
    ctx = env.context()
    a, b = await env.ready(ctx)
    ctx.settings.job.command = f"case {{job_dir}} in */{a}/jobs/*) exit 3;; esac; {WORKER_COMMAND}"
    ctx.store.instances[b].status = InstanceStatus.DRAINING  # only A is usable at first
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        assert job.instance == a
        await wait_state(ctx, job_id, JobState.QUEUED)
        assert job.attempts == 1 and job.avoid_instances == [a]
        ctx.store.instances[b].status = InstanceStatus.READY
        await pump(ctx, lambda: job.state is JobState.RUNNING)
        assert job.instance == b
        await wait_state(ctx, job_id, JobState.DONE)

    [retry] = events(logs, "job_retry")
    assert retry["instance"] == a and retry["attempts"] == 1
    assert [e["instance"] for e in events(logs, "job_done")] == [b]
    [done] = events(logs, "job_done")
    assert (done["attempts"], done["runs"]) == (1, 2)
    assert done["duration_s"] >= done["run_s"] >= 0 and done["run"] == job.run_id
    # its share of B's $/h over its run there, as its MANIFEST.json says
    manifest = json.loads((ctx.layout.results_dir(job_id) / "MANIFEST.json").read_text())
    assert isinstance(done["cost"], float) and done["cost"] == manifest["cost"] >= 0


# --- watching and collecting ----------------------------------------------------------------
# the job's folder is replaced (its `run` file says another run) or removed under it
LOSES_ITS_FOLDER = {
    "replaced": "sleep 0.3; printf 'deadbeef\\n' > run; sleep 30",
    "removed": 'sleep 0.3; d=$(pwd); cd /; rm -rf "$d"; sleep 30',
}


@pytest.mark.parametrize("how", sorted(LOSES_ITS_FOLDER))
async def test_a_job_whose_folder_is_lost_again_and_again_fails_instead_of_looping(
    env: SimEnv, how: str
) -> None:
    """A run whose remote folder is replaced or removed while it runs: the first time
    the job is requeued, not an attempt, its instance avoided; each time after, a
    failed attempt, so it ends in failed/ with the reason at max_attempts instead of
    running again and again."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": LOSES_ITS_FOLDER[how], "max_attempts": 2}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        await pump(ctx, lambda: job.lost_runs == 1)
        assert job.attempts == 0 and job.avoid_instances == [iid]
        await wait_state(ctx, job_id, JobState.FAILED)

    assert len(events(logs, "job_requeued")) == 1
    assert len(events(logs, "job_dispatched")) == 3  # the free rerun, then max_attempts
    assert job.attempts == 2 and job_file_in(ctx, job_id) == ["failed"]
    reason = json.loads(ctx.layout.error_file(job_id).read_text())["reason"]
    if how == "removed":
        assert reason == "remote job folder vanished"
    else:
        assert reason.startswith(
            f"remote job folder holds run deadbeef, not this run's {job.run_id}"
        )
        assert "must not write vastd's `run` file" in reason


async def test_a_job_whose_folder_is_lost_once_runs_again_elsewhere_with_no_attempt(
    env: SimEnv,
) -> None:
    """One lost folder (a host that wiped its disk once) is not the job's fault: the job
    runs again on another instance and ends done with no attempt counted."""
    await env.start(instances=2)
    lose_once = f"if mkdir ../../../lost-once; then {LOSES_ITS_FOLDER['removed']}; fi"
    ctx = env.context(env.settings(job={"command": f"{lose_once}; {WORKER_COMMAND}"}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        await wait_state(ctx, job_id, JobState.DONE)

    first, second = (e["instance"] for e in events(logs, "job_dispatched"))
    assert first != second and job.avoid_instances == [first]
    assert (job.attempts, job.lost_runs) == (0, 1)


async def test_results_of_another_run_are_a_lost_run_for_the_collection_too(
    env: SimEnv,
) -> None:
    """The folder of a run that exited holds another run by the time it is collected:
    requeued the first time (not an attempt, its instance avoided), a failed attempt
    the next."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"max_attempts": 1}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    for lost in (1, 2):
        await co.coordinate_job_distribution(ctx)
        await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)
        (remote_dir(ctx, iid, job_id) / "run").write_text("deadbeef\n")
        ctx.listed.pop(job_id, None)  # the listing its status printed says the run's own
        assert await co.collect_job(ctx, job_id) is True
        if lost == 1:
            assert job.state is JobState.QUEUED and (job.attempts, job.lost_runs) == (0, 1)
            assert job.avoid_instances == [iid]
            job.not_before = None
    assert job.state is JobState.FAILED and job.attempts == 1
    assert job.last_error is not None and job.last_error.startswith("results lost: ")


async def test_successful_job_is_collected_then_remote_folder_removed(env: SimEnv) -> None:
    """exit 0 -> COLLECTING -> DONE: file in done/, results/<job>/ holds the parquet and
    log.txt; the remote folder is removed only once the snapshot saying DONE is written."""
    await env.start(instances=1)
    ctx = env.context()
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    states: list[JobState] = []

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        await pump(ctx, lambda: states.append(job.state) or job.state is JobState.DONE)

    assert JobState.COLLECTING in states or events(logs, "job_exited")
    [exited] = events(logs, "job_exited")
    assert exited["exit_code"] == 0
    assert [e["event"] for e in logs if e["event"] in ("results_collected", "job_done")] == [
        "results_collected",
        "job_done",
    ]
    assert job_file_in(ctx, job_id) == ["done"]
    results = ctx.layout.results_dir(job_id)
    names = sorted(p.name for p in results.iterdir())
    assert len([n for n in names if n.endswith(".parquet")]) == 1 and "log.txt" in names
    assert job.result_files and job.runs == 1 and job.attempts == 0
    assert ctx.store.instances[iid].current_jobs == []

    # The folder's removal is a follow-up recorded with DONE, carried out once saved.
    folder = remote_dir(ctx, iid, job_id)
    await wait_saved(ctx)
    assert load_state(ctx.layout.state_file).jobs[job_id].state is JobState.DONE
    await pump(ctx, lambda: not folder.exists(), message="remote folder removed")
    assert ctx.store.snapshot.followups == {}


class _NoListings(dict[str, Any]):
    def __setitem__(self, key: str, value: Any) -> None:
        pass  # as if no status had printed a listing


class _OtherRunListings(dict[str, Any]):
    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, ("0123abcd", value[1]))  # as if of another run


@pytest.mark.parametrize("given", ["yes", "none", "other-run"])
async def test_a_run_that_exited_0_is_collected_with_the_listing_its_status_printed(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """The status that sees a run exit 0 prints its folder's listing, and the collection
    takes it: no listing command of its own (one command a job fewer). Without it (a
    restart, a retry), or with one of another run, the collection lists the folder
    itself."""
    listings: list[str] = []
    real = result_handler.find_result_files

    async def counted(*args: Any, **kwargs: Any) -> Any:
        listings.append(args[1].job_dir)
        return await real(*args, **kwargs)

    monkeypatch.setattr(result_handler, "find_result_files", counted)
    await env.start(instances=1)
    ctx = env.context()
    if given != "yes":
        listed = _NoListings() if given == "none" else _OtherRunListings()
        object.__setattr__(ctx, "listed", listed)
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.state is JobState.DONE)
    assert job_file_in(ctx, job_id) == ["done"] and job.result_files
    assert len(listings) == (0 if given == "yes" else 1)
    assert ctx.listed == {}


def test_listings_kept_for_collections_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most `LISTED_MAX` listings wait for their collections: the oldest go first
    (their collections list for themselves), and a job's newer listing replaces its own."""
    monkeypatch.setattr(co, "LISTED_MAX", 3)
    ctx = offline_ctx(tmp_path)
    for job in ("a", "b", "c", "a", "d"):
        co.keep_listing(ctx, job, "ab", (job,))
    assert list(ctx.listed) == ["c", "a", "d"]


def test_statuses_list_no_folder_when_results_may_number_thousands() -> None:
    """Past `LISTED_FILES_MAX` result files a job may have, a listing could make the
    status output large: the statuses then print none, and collections list for
    themselves."""
    assert co._listing("*.parquet", co.LISTED_FILES_MAX) is not None
    assert co._listing("*.parquet", co.LISTED_FILES_MAX + 1) is None


async def test_failing_job_is_retried_then_failed_with_error_file(env: SimEnv) -> None:
    """exit 3: a retry (attempts 1, requeued, `job_retry`), then at max_attempts FAILED,
    the file in failed/ beside `<job>.error.json` with job, reason, attempts,
    last_exit_code, log_tail and at."""
    await env.start(instances=1)
    ctx = env.context(
        env.settings(job={"command": "echo about to fail; cat {input} >/dev/null; exit 3"})
    )
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        await wait_state(ctx, job_id, JobState.QUEUED)
        assert job.attempts == 1 and job.instance is None
        assert job_file_in(ctx, job_id) == ["queued"]
        await wait_state(ctx, job_id, JobState.FAILED)

    assert [e["attempts"] for e in events(logs, "job_retry")] == [1]
    [failed] = events(logs, "job_failed")
    assert (failed["attempts"], failed["runs"]) == (2, 2) and failed["duration_s"] >= 0
    dph = next(iter(ctx.store.instances.values())).dph
    assert isinstance(failed["cost"], float) and failed["cost"] >= 0
    assert failed["cost"] <= dph * failed["run_s"] / 3600 + 1e-6
    assert job.attempts == 2 and job.last_exit_code == 3
    assert job_file_in(ctx, job_id) == ["failed"]
    error = json.loads(ctx.layout.error_file(job_id).read_text())
    assert set(error) >= {"job", "reason", "attempts", "last_exit_code", "log_tail", "at"}
    assert error["job"] == job_id and error["attempts"] == 2 and error["last_exit_code"] == 3
    assert "3" in error["reason"] and "about to fail" in error["log_tail"]
    assert all(not i.current_jobs for i in ctx.store.instances.values())


@pytest.mark.parametrize(
    ("command", "final"),
    [
        (
            "echo done; echo finished successfully; echo 100%; cat {input} >/dev/null; exit 1",
            "failed",
        ),
        (f"{WORKER_COMMAND} >/dev/null 2>&1", "done"),
    ],
    ids=["says-done-exits-1", "silent-exits-0"],
)
async def test_completion_comes_from_exit_code_never_from_log_words(
    env: SimEnv, command: str, final: str
) -> None:
    """A job printing "done"/"finished" but exiting 1 is a failed attempt; a job whose log
    says nothing but exits 0 (with results) is done."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": command, "max_attempts": 1}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)

    await co.coordinate_job_distribution(ctx)
    job = await wait_state(ctx, job_id, JobState.DONE, JobState.FAILED)

    assert job.state.value == final
    assert job.last_exit_code == (1 if final == "failed" else 0)


async def test_garbage_exit_code_is_a_failed_attempt_with_a_reason(env: SimEnv) -> None:
    """A remote `exit_code` holding garbage fails the attempt with a reason saying so, and
    the run it belongs to is not left running."""
    await env.start(instances=1)
    ctx = env.context(
        env.settings(job={"command": "printf banana > exit_code; sleep 30 # {input}"})
    )
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    pgid = job.pgid
    assert pgid is not None
    env.track_group(pgid)  # killed at teardown whatever happens

    await wait_state(ctx, job_id, JobState.QUEUED)
    assert job.attempts == 1
    assert job.last_error is not None and "garbage" in job.last_error
    assert not group_alive(pgid), "the run with a garbage exit_code still runs"


async def test_timed_out_job_is_killed_and_counts_an_attempt(env: SimEnv) -> None:
    """A job past `[job] timeout_s`: its whole process group is killed, exit 124 is
    recorded, and the attempt fails."""
    await env.start(instances=1)
    ctx = env.context(
        env.settings(
            job={"command": "sleep 60 & sleep 60; cat {input}", "timeout_s": 1.5, "max_attempts": 1}
        )
    )
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    pgid = job.pgid
    assert pgid is not None and group_alive(pgid)

    with capture_logs() as logs:
        await wait_state(ctx, job_id, JobState.FAILED)

    assert not group_alive(pgid), "the background child survived"
    assert job.last_exit_code == 124 and job.attempts == 1
    assert [e["job"] for e in events(logs, "job_timed_out")] == [job_id]
    error = json.loads(ctx.layout.error_file(job_id).read_text())
    assert error["last_exit_code"] == 124


async def started_unwatched(env: SimEnv) -> tuple[Context, str, JobRecord]:
    """One gated job started on one instance, its watcher stopped: the test reads the
    status itself."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": GATED_WORKER, "timeout_s": 5}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    ctx.watchers.pop(iid).cancel()
    return ctx, iid, job


async def test_a_run_that_ends_by_itself_just_before_its_timeout_kill_keeps_its_exit(
    env: SimEnv,
) -> None:
    """The status read a run past its deadline still running; it ended by itself (exit 0,
    results written) before the kill came. The kill finds its exit code there and
    writes none: the run is not counted as timed out (its results thrown away and the
    job run again), its own exit is read at the next look and it is collected."""
    ctx, iid, job = await started_unwatched(env)
    job_id = job.id
    inst = ctx.store.instances[iid]
    env.open_gate(iid)
    exit_file = env.sim.remote_root / iid / "jobs" / job_id / "exit_code"
    deadline = time.monotonic() + 20
    while not exit_file.is_file():
        assert time.monotonic() < deadline, "the run did not end"
        await asyncio.sleep(0.05)
    job.started_at = time.time() - 60  # past its deadline, as the status was read
    running = RemoteJobStatus(job_id=job.id, exists=True, pid=job.pgid, alive=True, run=job.run_id)
    with capture_logs() as logs:
        await co.handle_job_status(ctx, inst, job, running)
    assert job.state is JobState.RUNNING and job.last_exit_code is None
    assert events(logs, "job_timed_out") == []
    assert exit_file.read_text().strip() == "0"
    await wait_state(ctx, job_id, JobState.DONE)
    assert (job.attempts, job.runs, job.last_exit_code) == (0, 1, 0)


async def test_a_run_that_outlives_its_timeout_kill_is_timed_out_once(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill could not end the group nor write its exit code (a stuck process, a
    full disk there): the run is timed out there and then, not killed again at every
    look with the job left running."""
    ctx, iid, job = await started_unwatched(env)
    job_id = job.id
    kills: list[str] = []

    async def stuck_kill(conn: object, paths: object, **kw: object) -> KillOutcome:
        kills.append(job_id)
        return KillOutcome(was_alive=True, still_alive=True, exit_code_written=False)

    monkeypatch.setattr(co, "handle_job_timeout", stuck_kill)
    job.started_at = time.time() - 60
    running = RemoteJobStatus(job_id=job.id, exists=True, pid=job.pgid, alive=True, run=job.run_id)
    await co.handle_job_status(ctx, ctx.store.instances[iid], job, running)
    assert kills == [job_id]
    assert job.state is JobState.COLLECTING and job.last_exit_code == 124
    env.open_gate(iid)


def cut_status_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every status answer comes back with its job lines cut short (a garbling host):
    no job has a well-formed line."""
    real = process_monitor.parse_status_output

    def garbled(stdout: str, entries: Any, **kw: Any) -> dict[str, RemoteJobStatus]:
        cut = "\n".join(ln[:5] if ln.startswith("J ") else ln for ln in stdout.split("\n"))
        return real(cut, entries, **kw)

    monkeypatch.setattr(process_monitor, "parse_status_output", garbled)


async def test_a_job_whose_status_lines_are_missing_is_still_timed_out(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance's answers carry no well-formed line for a running job: its
    `[job] timeout_s` deadline (vastd's clock) holds all the same: its group is killed
    and the attempt is timed out (exit 124), never left running."""
    await env.start(instances=1)
    ctx = env.context(
        env.settings(job={"command": "sleep 60; cat {input}", "timeout_s": 1.5, "max_attempts": 1})
    )
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    pgid = job.pgid
    assert pgid is not None
    cut_status_lines(monkeypatch)

    with capture_logs() as logs:
        await wait_state(ctx, job_id, JobState.FAILED)

    assert not group_alive(pgid)
    assert job.last_exit_code == 124 and job.attempts == 1
    assert [e["job"] for e in events(logs, "job_timed_out")] == [job_id]


async def test_a_job_whose_status_lines_stay_missing_is_taken_as_vanished(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No status line for a job for `[ssh] unreachable_grace_s` (its deadline far off):
    the run is taken as vanished, a failed attempt with the reason, as a process gone
    without an exit code is (not left running forever)."""
    await env.start(instances=1)
    ctx = env.context(
        env.settings(
            job={"command": "sleep 60; cat {input}", "max_attempts": 1},
            ssh={"unreachable_grace_s": 0.5},
        )
    )
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    cut_status_lines(monkeypatch)

    with capture_logs() as logs:
        await wait_state(ctx, job_id, JobState.FAILED)

    [missing] = events(logs, "job_status_missing")
    assert missing["job"] == job_id
    assert job.attempts == 1 and job.last_error is not None
    assert "no status line" in job.last_error
    assert events(logs, "job_timed_out") == []


async def test_a_run_that_ended_by_itself_at_its_deadline_with_no_line_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its line missing once, right past its deadline, and the kill finds it ended by
    itself (its own exit code, 0, written): the run is not thrown away as a failed
    attempt (a review found it was); the next line reads its exit code."""
    ctx = offline_ctx(tmp_path, jobs_per_instance=1, timeout_s=100)
    ctx.store.instances["A"] = InstanceRecord(id="A", status=InstanceStatus.READY)
    job = queued(ctx, "j")
    st.mark_job_assigned(ctx.store, "j", "A")
    st.mark_job_started(ctx.store, "j", run_id=job.run_id, pgid=4321, new=True)
    job.started_at = time.time() - 101
    kills: list[str] = []

    async def connection(ctx: Context, inst: InstanceRecord) -> object:
        return object()

    async def kill(conn: object, paths: object, timeout_s: float) -> KillOutcome:
        kills.append(job.id)
        return KillOutcome(was_alive=False, still_alive=False, exit_code_written=False)

    monkeypatch.setattr(co, "instance_connection", connection)
    monkeypatch.setattr(co, "handle_job_timeout", kill)
    monkeypatch.setattr(co, "schedule_result_collection", lambda *a, **k: None)
    inst = ctx.store.instances["A"]
    await co.handle_missing_status(ctx, inst, job, unheard_s=1.0)
    assert kills == ["j"]
    assert job.state is JobState.RUNNING and job.last_error is None
    ended = RemoteJobStatus(
        job_id="j", exists=True, pid=4321, alive=False, exit_code=0, run=job.run_id
    )
    await co.handle_job_status(ctx, inst, job, ended)
    assert job.state is JobState.COLLECTING and job.last_exit_code == 0


# --- unreachable is not failed --------------------------------------------------------------
async def test_ssh_drop_mid_job_keeps_the_attempt_and_reattaches(env: SimEnv) -> None:
    """SSH dies mid-job: the instance is UNREACHABLE, the job stays RUNNING there with
    attempts 0; the host is back within the grace: the job is reattached (not restarted)
    and ends DONE with runs == 1."""
    sim = await env.start(instances=1)
    ctx = env.context(
        env.settings(job={"command": GATED_WORKER}, ssh={"unreachable_grace_s": 30.0})
    )
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await pump(ctx, lambda: job.pgid is not None)
    pgid = job.pgid

    await sim.hosts.kill_host(int(iid))
    inst = ctx.store.instances[iid]
    await async_wait_for(lambda: inst.status is InstanceStatus.UNREACHABLE, 10)
    assert job.state is JobState.RUNNING and job.instance == iid and job.attempts == 0

    await sim.hosts.revive_host(int(iid))
    env.open_gate(iid)
    with capture_logs() as logs:
        await wait_state(ctx, job_id, JobState.DONE, timeout_s=30)

    assert job.runs == 1 and job.attempts == 0 and job.pgid == pgid
    assert events(logs, "job_started") == [] and events(logs, "job_dispatched") == []
    assert inst.status is InstanceStatus.READY


async def test_ssh_error_during_collection_is_not_a_failure(env: SimEnv) -> None:
    """A job that exited 0 but whose instance stops answering during collection stays
    COLLECTING with no attempt counted; once back, it is collected and DONE."""
    sim = await env.start(instances=1)
    ctx = env.context(env.settings(ssh={"unreachable_grace_s": 60.0}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    # Only the watcher runs (no collection): wait for the exit to be noticed.
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)
    await sim.hosts.kill_host(int(iid))

    assert await co.collect_job(ctx, job_id) is False
    assert job.state is JobState.COLLECTING and job.attempts == 0
    assert job_file_in(ctx, job_id) == ["running"]

    await sim.hosts.revive_host(int(iid))
    assert await co.collect_job(ctx, job_id) is True
    assert job.state is JobState.DONE and job.attempts == 0
    # with no job left to watch, the collection itself says the instance is back
    assert ctx.store.instances[iid].status is InstanceStatus.READY


def refuse_sftp_reads(monkeypatch: pytest.MonkeyPatch, suffix: bytes) -> None:
    """The sim hosts' SFTP servers answer a read of a file ending in `suffix` with an
    error status (SSH_FX_FAILURE), as a host whose disk has an I/O error does."""
    real_open = hosts._SFTPServer.open

    def failing_open(self: Any, path: bytes, pflags: int, attrs: Any) -> Any:
        if path.endswith(suffix):
            raise asyncssh.SFTPFailure("I/O error")
        return real_open(self, path, pflags, attrs)

    monkeypatch.setattr(hosts._SFTPServer, "open", failing_open)


async def test_a_result_the_host_cannot_read_fails_the_attempt_after_a_few_tries(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SFTP error status for a result file (not a broken connection, not invalid
    results): the collection is tried again a few times, then the attempt fails with a
    reason naming the file and the error; at max_attempts the job is in failed/ with
    its .error.json (never left collecting, its instance busy)."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"max_attempts": 1}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)
    refuse_sftp_reads(monkeypatch, b".parquet")

    with capture_logs() as logs:
        answers = [await co.collect_job(ctx, job_id)]
        while answers[-1] is False and len(answers) < 10:
            assert job.state is JobState.COLLECTING and job.attempts == 0
            answers.append(await co.collect_job(ctx, job_id))

    tries = collection.REMOTE_FILE_TRIES
    assert answers == [False] * (tries - 1) + [True]
    assert len(events(logs, "collection_deferred")) == tries
    assert job.state is JobState.FAILED and job.attempts == 1
    assert job_file_in(ctx, job_id) == ["failed"]
    reason = json.loads(ctx.layout.error_file(job_id).read_text())["reason"]
    assert reason.startswith("results unreadable: ") and "I/O error" in reason
    assert ".parquet" in reason, reason
    assert not any(i.current_jobs for i in ctx.store.instances.values())


async def test_a_log_the_host_cannot_read_does_not_fail_valid_results(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's log.txt refused by the host's SFTP server: the valid results are
    collected all the same, the job done; the log's absence is logged."""
    await env.start(instances=1)
    ctx = env.context()
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)
    refuse_sftp_reads(monkeypatch, b"/log.txt")

    with capture_logs() as logs:
        assert await co.collect_job(ctx, job_id) is True

    assert job.state is JobState.DONE and job.attempts == 0
    [skipped] = events(logs, "result_log_skipped")
    assert "I/O error" in skipped["reason"]
    assert "log.txt" not in {p.name for p in ctx.layout.results_dir(job_id).iterdir()}


async def test_local_disk_full_during_collection_keeps_the_job_collecting(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while the results are stored: the job stays COLLECTING with no attempt,
    nothing is left under results/ (no partial folder, no temp folder), and once there
    is room again the same run is collected (not run again)."""
    import errno
    import os

    from vastd.execution import result_handler

    await env.start(instances=1)
    ctx = env.context()
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)

    real_rename = os.rename

    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(result_handler.os, "rename", full)
    assert await co.collect_job(ctx, job_id) is False
    assert job.state is JobState.COLLECTING and job.attempts == 0
    assert job_file_in(ctx, job_id) == ["running"]
    assert list(ctx.layout.results.iterdir()) == []

    monkeypatch.setattr(result_handler.os, "rename", real_rename)
    assert await co.collect_job(ctx, job_id) is True
    assert job.state is JobState.DONE and job.attempts == 0 and job.runs == 1
    assert sorted(p.name for p in ctx.layout.results_dir(job_id).iterdir())[-1] == "log.txt"


async def test_a_failed_start_frees_both_job_and_instance(env: SimEnv) -> None:
    """A start that fails on the instance (JobExecutionError: the job folder cannot be
    made) is a failed attempt: the job is not left RUNNING nor the instance assigned."""
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"max_attempts": 1}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    blocker = remote_dir(ctx, iid, job_id)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the job folder should be")

    await co.coordinate_job_distribution(ctx)
    job = await wait_state(ctx, job_id, JobState.FAILED, JobState.QUEUED, timeout_s=10)

    assert job.state is JobState.FAILED and job.attempts == 1
    assert job.last_error is not None and "could not start" in job.last_error
    assert ctx.store.instances[iid].current_jobs == []
    assert ctx.store.instances[iid].status is InstanceStatus.READY
    assert not ctx.dispatching
    assert job_file_in(ctx, job_id) == ["failed"]


async def test_unreachable_past_grace_requeues_and_keeps_the_first_result(env: SimEnv) -> None:
    """A job on an instance silent past `[ssh] unreachable_grace_s` is requeued (attempts
    still 0), runs on another instance, and the first instance is in `job.orphans`. When
    the first instance answers again and its run had succeeded, those results are kept
    (`orphan_run_kept`), the second run is stopped (`duplicate_run_stopped`), the job is
    DONE exactly once and results/<job>/ holds one run's files."""
    sim = await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}, ssh={"unreachable_grace_s": 1.0}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]

    with capture_logs() as logs:
        await co.coordinate_job_distribution(ctx)
        first = job.instance
        assert first is not None
        [second] = [i for i in ctx.store.instances if i != first]
        await pump(ctx, lambda: job.pgid is not None, dispatch=False)
        await sim.hosts.kill_host(int(first))

        await pump(ctx, lambda: job.instance == second and job.pgid is not None, timeout_s=20)
        assert job.attempts == 0 and job.orphan_on(first) is not None
        second_pgid = job.pgid
        assert second_pgid is not None
        # The first run goes on without SSH and succeeds; the second waits at its gate.
        env.open_gate(first)
        first_dir = remote_dir(ctx, first, job_id)
        await async_wait_for(lambda: (first_dir / "exit_code").exists(), 20)
        await sim.hosts.revive_host(int(first))

        await wait_state(ctx, job_id, JobState.DONE, timeout_s=30)
        # The stop is a follow-up recorded with DONE, carried out once saved.
        await pump(ctx, lambda: not group_alive(second_pgid), 20, dispatch=False)

    [kept] = events(logs, "orphan_run_kept")
    assert kept["instance"] == first and kept["second_run"] == second
    stops = [e for e in events(logs, "remote_cleanup_done") if e["reason"] == "duplicate run"]
    assert [e["instance"] for e in stops] == [second]
    assert len(events(logs, "job_done")) == 1
    assert job.attempts == 0 and job.orphans == []
    assert not group_alive(second_pgid)
    assert job_file_in(ctx, job_id) == ["done"]
    names = sorted(p.name for p in ctx.layout.results_dir(job_id).iterdir())
    assert len([n for n in names if n.endswith(".parquet")]) == 1
    assert set(names) == {*job.result_files, "log.txt", "MANIFEST.json"}
    assert all(not i.current_jobs for i in ctx.store.instances.values())
