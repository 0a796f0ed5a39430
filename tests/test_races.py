"""Races and crash windows of the state machines (found by review), against a SimCluster.

Each test drives one interleaving the loops can produce (an answer lost, a crash before a
save, two collections at once, a clean-up in flight while a new run uploads) and checks
the promise: nothing lost, nothing run twice for nothing, nothing left running untracked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import (
    GATED_WORKER,
    SimEnv,
    async_wait_for,
    group_alive,
    pump,
    remote_dir,
    wait_saved,
    wait_state,
)
from vastd.core import state as st
from vastd.core.files import JobFolder
from vastd.core.state import JobState, OrphanRun
from vastd.execution.result_handler import _install_keeping_previous
from vastd.orchestration import coordinator as co
from vastd.orchestration import followups as fu
from vastd.orchestration.actions import abandon_if_past_grace
from vastd.orchestration.followups import accounted_folders, followups_once
from vastd.orchestration.inventory import handle_instance_failure
from vastd.orchestration.workflow import accept_inbox_file, recover_after_restart
from vastd.utils.exceptions import SSHConnectionError

CSV = "eta,lam,var0,alpha,gamma,beta,p\n5.0,0.1,1.0,0.05,0.05,0.85,0.5\n"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


# --- R1: a start whose answer was lost, then the instance given up: untracked process ----------
async def test_a_start_whose_answer_was_lost_stays_tracked_when_given_up(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    real = co.execute_job_on_instance
    started: list[int] = []

    async def start_then_drop(*args: Any, **kwargs: Any) -> Any:
        proc = await real(*args, **kwargs)  # the remote start happened ...
        started.append(proc.pgid)
        raise SSHConnectionError("connection lost")  # ... but its answer was lost

    monkeypatch.setattr(co, "execute_job_on_instance", start_then_drop)
    with capture_logs():
        assert await co.coordinate_job_distribution(ctx) == 1
        await async_wait_for(lambda: started and not ctx.dispatching, 10)
    [pgid] = started
    env.track_group(pgid)
    job = ctx.store.jobs[job_id]
    inst = ctx.store.instances[iid]
    assert job.state is JobState.RUNNING and job.pgid is None
    # SSH stays silent past [ssh] unreachable_grace_s (the watcher's checks fail too).
    inst.unreachable_since = time.time() - 3600
    with capture_logs():
        abandon_if_past_grace(ctx, inst)
    assert job.state is JobState.QUEUED
    assert group_alive(pgid), "the run is alive on the instance"
    # It comes back: through preparation again (its sweep), not straight to READY.
    st.mark_instance_reachable(ctx.store, inst)
    assert inst.status is st.InstanceStatus.DISCOVERED and inst.resweep
    # The run is recorded (as an orphan: it may finish first), never left untracked.
    assert job.orphans or ctx.store.snapshot.followups, (
        f"run {pgid} on {iid} is untracked: orphans={job.orphans} "
        f"followups={list(ctx.store.snapshot.followups)} "
        f"accounted={accounted_folders(ctx, iid)}"
    )


# --- R2: a clean-up that passed its _blocked check removes a rerun's fresh upload ---------------
async def test_a_cleanup_in_flight_never_removes_a_rerun_upload(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finished run's clean-up is under way (slow to connect) when a rerun of the job
    is dispatched to the same instance: the rerun's upload waits for the clean-up, so it
    is never removed by it; the rerun ends done with no attempt counted."""
    await env.start(instances=1)
    settings = env.settings(job={"on_duplicate": "rerun"})
    ctx = env.context(settings)
    await env.ready(ctx)
    [src] = env.make_job_files(1)
    job_id = await env.submit_file(ctx, src)
    await co.coordinate_job_distribution(ctx)
    job = ctx.store.jobs[job_id]
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)
    assert await co.collect_job(ctx, job_id)
    assert job.state is JobState.DONE
    await wait_saved(ctx)
    [followup] = ctx.store.snapshot.followups.values()
    assert followup.reason == "collected"

    go = asyncio.Event()
    real_conn = fu.instance_connection

    async def slow_connection(*args: Any, **kwargs: Any) -> Any:
        await go.wait()
        return await real_conn(*args, **kwargs)

    monkeypatch.setattr(fu, "instance_connection", slow_connection)
    cleanup = asyncio.create_task(followups_once(ctx))
    await asyncio.sleep(0.2)
    # Meanwhile the user reruns the job; it is dispatched to the same instance.
    await env.submit_file(ctx, src)
    rerun = ctx.store.jobs[job_id]
    assert rerun.state is JobState.QUEUED and rerun.keep_previous
    with capture_logs() as logs:
        assert await co.coordinate_job_distribution(ctx) == 1
        await asyncio.sleep(0.3)
        go.set()  # the clean-up's command lands now, before the rerun's upload
        await cleanup
        await async_wait_for(lambda: not ctx.dispatching, 20)
        await wait_state(ctx, job_id, JobState.DONE, timeout_s=30)
    retries = [e for e in logs if e["event"] in ("job_retry", "job_failed")]
    assert rerun.attempts == 0 and retries == [], retries
    assert (ctx.layout.results_dir(job_id) / "previous-1").is_dir()


# --- R3: a rerun (or a failed job's resubmission) accepted just before a crash is swallowed -----
@pytest.mark.parametrize("earlier", [JobState.DONE, JobState.FAILED])
async def test_a_resubmission_accepted_just_before_a_crash_is_kept(
    env: SimEnv, earlier: JobState
) -> None:
    await env.start(instances=0)
    settings = env.settings(job={"on_duplicate": "rerun"})
    ctx = env.context(settings, api=False)
    job = st.add_job(ctx.store, "again", "again.csv", rows=1)
    job.state = earlier
    folder = JobFolder.DONE if earlier is JobState.DONE else JobFolder.FAILED
    ctx.layout.job_file(folder, "again").write_text(CSV)
    await wait_saved(ctx)
    # Accepted from the inbox (file moved to queued/, record in memory) ...
    (ctx.layout.inbox / "again.csv").write_text(CSV)
    await accept_inbox_file(ctx, ctx.layout.inbox / "again.csv")
    assert ctx.store.jobs["again"].state is JobState.QUEUED
    # ... and the daemon is SIGKILLed before the coalesced save.
    await env.close_context(ctx)

    ctx2 = env.context(settings, api=False)
    with capture_logs():
        recover_after_restart(ctx2)
    files = sorted(p.name for p in ctx2.layout.root.glob("*/again*"))
    assert ctx2.store.jobs["again"].state is JobState.QUEUED, (
        f"the resubmission was swallowed: state={ctx2.store.jobs['again'].state} files={files}"
    )


# --- R4: a job whose dispatch is in flight is dispatched again; its claim is dropped ----------
async def test_a_job_requeued_mid_dispatch_keeps_its_new_dispatch_claimed(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    real = co.execute_job_on_instance
    calls: list[tuple[str, str]] = []
    gates: dict[tuple[str, str], asyncio.Event] = {}

    async def gated(*args: Any, **kwargs: Any) -> Any:
        key = (kwargs["instance_id"], kwargs["run_id"])
        calls.append(key)
        await gates.setdefault(key, asyncio.Event()).wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(co, "execute_job_on_instance", gated)
    job = ctx.store.jobs[job_id]
    try:
        with capture_logs() as logs:
            await co.coordinate_job_distribution(ctx)
            await async_wait_for(lambda: len(calls) == 1, 5)
            a, _r1 = calls[0]
            # The instance is lost while the (slow) upload runs; the job is placed elsewhere.
            handle_instance_failure(ctx, ctx.store.instances[a], "vast.ai reports it exited")
            assert job.state is JobState.QUEUED
            await co.coordinate_job_distribution(ctx)
            await async_wait_for(lambda: len(calls) == 2, 5)
            b, r2 = calls[1]
            assert b != a and job.run_id == r2
            gates.setdefault(calls[0], asyncio.Event()).set()  # the old dispatch ends
            await asyncio.sleep(0.5)
            # The dispatch of run r2 to b is still under way, yet it is no longer claimed:
            claimed = job_id in ctx.dispatching
            co.handle_system_failures(ctx)  # the health step (every second) watches b ...
            await asyncio.sleep(1.0)  # ... whose watcher re-dispatches r2 concurrently
            concurrent = calls.count((b, r2))
            for key in calls:
                gates.setdefault(key, asyncio.Event()).set()
            await async_wait_for(lambda: not ctx.dispatching, 10)
        events = [(e["event"], e.get("reason")) for e in logs if e.get("job") == job_id]
        assert claimed and concurrent == 1 and job.attempts == 0, (
            f"claimed={claimed}; concurrent starts of run {r2} on {b}: {concurrent}; "
            f"attempts={job.attempts}; {events}"
        )
    finally:
        for key in calls:
            gates.setdefault(key, asyncio.Event()).set()
        for iid in {k[0] for k in calls}:
            env.open_gate(iid)
        await asyncio.sleep(1.0)


# --- R5: the dispatcher replaces an orphan's finished run on the only instance ------------------
async def test_an_orphans_results_are_not_thrown_away_by_a_new_dispatch(env: SimEnv) -> None:
    await env.start(instances=1)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    [iid] = await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    await co.coordinate_job_distribution(ctx)
    job = ctx.store.jobs[job_id]
    await pump(ctx, lambda: job.pgid is not None and not ctx.dispatching, dispatch=False)
    ctx.watchers[iid].cancel()
    inst = ctx.store.instances[iid]
    # Silent past the grace: the run becomes an orphan, the job is queued.
    with capture_logs():
        st.mark_instance_unreachable(ctx.store, inst, "timeout")
        inst.unreachable_since = time.time() - 3600
        abandon_if_past_grace(ctx, inst)
    assert job.state is JobState.QUEUED and job.orphan_on(iid) is not None
    # While silent, the run finished with good results.
    env.open_gate(iid)
    folder = remote_dir(ctx, iid, job_id)
    await async_wait_for(lambda: (folder / "exit_code").exists(), 30)
    # SSH answers again: the watcher marks it READY (and wakes the dispatcher) before
    # it looks at the orphan; the dispatcher runs first.
    with capture_logs():
        st.mark_instance_reachable(ctx.store, inst)
        await co.coordinate_job_distribution(ctx)
        await wait_state(ctx, job_id, JobState.DONE, timeout_s=60)
    assert job.runs <= 1, f"ran {job.runs} times although the first run's results were valid"


# --- R6: add_job forgets a finished record's orphans (runs never stopped) -----------------------
async def test_a_resubmission_records_the_stop_of_the_old_records_orphans(env: SimEnv) -> None:
    await env.start(instances=0)
    ctx = env.context(api=False)
    job = st.add_job(ctx.store, "j", "j.csv", rows=1)
    job.state = JobState.FAILED
    job.orphans.append(OrphanRun(instance="i9", run="ab12"))
    st.add_job(ctx.store, "j", "j.csv", rows=1)
    assert ctx.store.jobs["j"].orphans or ctx.store.snapshot.followups, (
        "the run ab12 still going on i9 is no longer recorded anywhere"
    )


# --- R7: a refused second file of a running job's name takes failed/<job>.csv -------------------
async def test_a_refused_collision_is_never_removed_as_the_jobs_own_failure(
    env: SimEnv,
) -> None:
    """A second file of a queued job's name is refused (it may take failed/<job>.csv).
    When the job later fails, its own files take another stem; when the job is then
    resubmitted, only those go: the refused user file stays."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    st.add_job(ctx.store, "busy", "busy.csv", rows=1)
    ctx.layout.job_file(JobFolder.QUEUED, "busy").write_text(CSV)
    (ctx.layout.inbox / "busy.csv").write_text(CSV + "1,2,3,4,5,6,7\n")
    with capture_logs():
        await accept_inbox_file(ctx, ctx.layout.inbox / "busy.csv")
        refused = sorted(p.name for p in ctx.layout.failed.iterdir())
        st.mark_job_failed(ctx.store, "busy", reason="broken")
        (ctx.layout.inbox / "busy.csv").write_text(CSV)
        await accept_inbox_file(ctx, ctx.layout.inbox / "busy.csv")
    assert ctx.store.jobs["busy"].state is JobState.QUEUED
    assert sorted(p.name for p in ctx.layout.failed.iterdir()) == refused


# --- R8: a crash between install and the DONE save files the same run as previous-<n> ----------
def test_a_reinstall_after_a_crash_does_not_keep_the_same_run_as_previous(
    tmp_path: Path,
) -> None:
    """A rerun installed, then the crash came before the DONE save: the same run collected
    again replaces its own results (its MANIFEST says which run), it does not file them
    as previous-2."""
    final = tmp_path / "results" / "j"
    final.mkdir(parents=True)
    (final / "a.parquet").write_text("earlier run")

    def new_tmp(n: int) -> Path:
        tmp = tmp_path / "results" / f".vastd-tmp-{n}"
        tmp.mkdir()
        (tmp / "a.parquet").write_text("this run")
        (tmp / "MANIFEST.json").write_text(json.dumps({"run": "0a0b"}))
        return tmp

    assert _install_keeping_previous(new_tmp(1), final, "0a0b") == final / "previous-1"
    # crash before the DONE save; after the restart the same run is collected again
    # (the earlier run's folder comes back: the earlier input CSV still belongs there)
    assert _install_keeping_previous(new_tmp(2), final, "0a0b") == final / "previous-1"
    assert sorted(p.name for p in final.iterdir()) == ["MANIFEST.json", "a.parquet", "previous-1"]
    assert (final / "previous-1" / "a.parquet").read_text() == "earlier run"


# --- R9: an orphan's collection and the job's own collection never install at once -----------
async def test_an_orphan_collection_never_replaces_a_done_jobs_results(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's own run is being collected when its orphan (on another instance) turns
    out to have succeeded: the orphan waits for the collection, the job ends done with its
    own run's results (record and MANIFEST agree), and the orphan is then dropped."""
    from vastd.orchestration import collection

    await env.start(instances=2)
    ctx = env.context(env.settings(job={"command": GATED_WORKER}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    await co.coordinate_job_distribution(ctx)
    job = ctx.store.jobs[job_id]
    await async_wait_for(lambda: job.pgid is not None and not ctx.dispatching, 20)
    x = job.instance
    assert x is not None
    ctx.watchers[x].cancel()
    inst_x = ctx.store.instances[x]
    with capture_logs():
        st.mark_instance_unreachable(ctx.store, inst_x, "timeout")
        inst_x.unreachable_since = time.time() - 3600
        abandon_if_past_grace(ctx, inst_x)
        assert await co.coordinate_job_distribution(ctx) == 1  # to the other instance
        await async_wait_for(lambda: job.pgid is not None and not ctx.dispatching, 20)
        y = job.instance
        assert y is not None and y != x
        for iid in (x, y):
            env.open_gate(iid)
        await async_wait_for(lambda: job.state is JobState.COLLECTING, 30)
        await async_wait_for(lambda: (remote_dir(ctx, x, job_id) / "exit_code").exists(), 30)
        own_run = job.run_id
        release = asyncio.Event()
        real = collection.collect_job_results

        async def slow(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("run_id") == own_run:
                await release.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(collection, "collect_job_results", slow)
        own = asyncio.create_task(co.collect_job(ctx, job_id))
        await asyncio.sleep(0.2)
        # x answers again: its orphan succeeded too, while the job is being collected.
        inst_x.unreachable_since = None
        statuses = await co.check_instance_jobs(ctx, inst_x, [job])
        orphan_check = asyncio.create_task(
            collection.handle_orphan_status(ctx, inst_x, job, statuses[job_id])
        )
        await asyncio.sleep(0.2)
        release.set()
        assert await own
        await orphan_check
        assert job.state is JobState.DONE and job.run_id == own_run
        manifest = json.loads((ctx.layout.results_dir(job_id) / "MANIFEST.json").read_text())
        assert manifest["run"] == own_run
        # Looked at again now that the job is done: the orphan is not needed.
        await collection.handle_orphan_status(ctx, inst_x, job, statuses[job_id])
    assert job.orphans == []
    assert any(f.instance == x for f in ctx.store.snapshot.followups.values())
