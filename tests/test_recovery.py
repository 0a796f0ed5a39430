"""Truthful recovery at start (issue 4, item 1) and the predecessor's state-file failures.

`recover_after_restart` + `reconcile_folders` are called directly on a Context built
from folders and a snapshot as a crash would leave them; one scenario restarts a whole
`orchestrate_job_processing` run mid-job and checks the job is not started twice.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import GATED_WORKER, SimEnv, async_wait_for, job_file_in, wait_saved
from vastd import daemon as daemon_mod
from vastd.core import state as st
from vastd.core.files import JobFolder
from vastd.core.state import InstanceRecord, InstanceStatus, JobState, load_state
from vastd.orchestration import coordinator as co
from vastd.orchestration.scheduler import TaskType
from vastd.orchestration.workflow import (
    orchestrate_job_processing,
    reconcile_folders,
    recover_after_restart,
)
from vastd.utils.config import Settings

CSV = "eta,lam,var0,alpha,gamma,beta,p\n5.0,0.1,1.0,0.05,0.05,0.85,0.5\n"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


def put(ctx: Any, folder: JobFolder, job_id: str) -> Path:
    path = ctx.layout.job_file(folder, job_id)
    path.write_text(CSV)
    return path


# --- reconcile_folders / recover_after_restart ----------------------------------------------
async def test_unknown_files_in_queued_and_running_are_adopted(env: SimEnv) -> None:
    """Job files in queued/ or running/ that the snapshot does not know become QUEUED jobs
    (files in queued/), never lost; dot-files and other names are left alone."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    put(ctx, JobFolder.QUEUED, "was_queued")
    put(ctx, JobFolder.RUNNING, "was_running")
    (ctx.layout.queued / ".partial.csv").write_text(CSV)
    (ctx.layout.running / "notes.txt").write_text("x")

    with capture_logs() as logs:
        recover_after_restart(ctx)

    assert set(ctx.store.jobs) == {"was_queued", "was_running"}
    for job_id in ("was_queued", "was_running"):
        assert ctx.store.jobs[job_id].state is JobState.QUEUED
        assert job_file_in(ctx, job_id) == ["queued"]
    assert {e["job"] for e in events(logs, "job_adopted")} == {"was_queued", "was_running"}
    assert (ctx.layout.queued / ".partial.csv").exists()
    assert (ctx.layout.running / "notes.txt").exists()


async def test_a_file_name_that_is_not_utf8_in_queued_goes_to_failed_at_start(
    env: SimEnv,
) -> None:
    """Let in by an older version, such a name crashed every start (no record can hold
    it: state.json is UTF-8 JSON). It goes to failed/ under a UTF-8 name with a reason;
    the start goes on and the snapshot saves."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    (ctx.layout.queued / os.fsdecode(b"bad\xffname.csv")).write_text(CSV)
    put(ctx, JobFolder.QUEUED, "fine")
    with capture_logs() as logs:
        recover_after_restart(ctx)
    assert set(ctx.store.jobs) == {"fine"}
    assert os.listdir(ctx.layout.queued) == ["fine.csv"]
    assert (ctx.layout.failed / "bad\\xffname.csv").read_text() == CSV
    error = json.loads((ctx.layout.failed / "bad\\xffname.error.json").read_text())
    assert "not valid UTF-8" in error["reason"]
    assert [e["job"] for e in events(logs, "job_refused")] == ["bad\\xffname"]
    assert await ctx.store.flush()


async def test_running_job_whose_file_is_in_done_is_done(env: SimEnv) -> None:
    """A crash after collection (file moved to done/) but before the snapshot said so: the
    job is DONE at start, not run again; the same for a file already in failed/."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    ctx.store.instances["i1"] = InstanceRecord(id="i1", status=InstanceStatus.READY)
    for job_id, folder in (("collected", JobFolder.DONE), ("gave_up", JobFolder.FAILED)):
        job = st.add_job(ctx.store, job_id, f"{job_id}.csv", rows=1)
        job.state, job.instance = JobState.RUNNING, "i1"
        ctx.store.instances["i1"].current_jobs.append(job_id)
        put(ctx, folder, job_id)

    recover_after_restart(ctx)

    assert ctx.store.jobs["collected"].state is JobState.DONE
    assert ctx.store.jobs["gave_up"].state is JobState.FAILED
    assert job_file_in(ctx, "collected") == ["done"]
    assert ctx.store.instances["i1"].current_jobs == []
    assert await co.coordinate_job_distribution(ctx) == 0


async def test_finished_record_whose_file_stayed_behind_is_not_run_again(env: SimEnv) -> None:
    """A record marked failed (or done) whose file move did not happen (disk error, crash):
    at start the file goes where the record says (failed/ with its .error.json), it is not
    adopted as a new job."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    job = st.add_job(ctx.store, "gave_up", "gave_up.csv", rows=1)
    job.state, job.attempts, job.last_error = JobState.FAILED, 3, "exit code 1"
    done = st.add_job(ctx.store, "finished", "finished.csv", rows=1)
    done.state = JobState.DONE
    put(ctx, JobFolder.RUNNING, "gave_up")
    put(ctx, JobFolder.QUEUED, "finished")

    recover_after_restart(ctx)

    assert set(ctx.store.jobs) == {"gave_up", "finished"}
    assert ctx.store.jobs["gave_up"].state is JobState.FAILED
    assert job_file_in(ctx, "gave_up") == ["failed"]
    assert job_file_in(ctx, "finished") == ["done"]
    assert '"reason": "exit code 1"' in ctx.layout.error_file("gave_up").read_text()
    assert await co.coordinate_job_distribution(ctx) == 0


async def test_recovery_reverifies_instances_and_resumes_work(env: SimEnv) -> None:
    """READY/PREPARING/UNREACHABLE instances go back to DISCOVERED (their marker decides
    whether steps run again); DRAINING and LOST stay; a COLLECTING job gets a collection
    scheduled; a RUNNING job whose instance is unknown is requeued without an attempt."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    statuses = {
        "ready": InstanceStatus.READY,
        "preparing": InstanceStatus.PREPARING,
        "unreachable": InstanceStatus.UNREACHABLE,
        "draining": InstanceStatus.DRAINING,
        "lost": InstanceStatus.LOST,
    }
    for iid, status in statuses.items():
        ctx.store.instances[iid] = InstanceRecord(id=iid, status=status, next_prepare_at=1e12)
    collecting = st.add_job(ctx.store, "collecting", "collecting.csv", rows=1)
    collecting.state, collecting.instance = JobState.COLLECTING, "ready"
    put(ctx, JobFolder.RUNNING, "collecting")
    orphaned = st.add_job(ctx.store, "orphaned", "orphaned.csv", rows=1)
    orphaned.state, orphaned.instance = JobState.RUNNING, "gone-instance"
    put(ctx, JobFolder.RUNNING, "orphaned")

    recover_after_restart(ctx)

    for iid in ("ready", "preparing", "unreachable"):
        assert ctx.store.instances[iid].status is InstanceStatus.DISCOVERED
        assert ctx.store.instances[iid].next_prepare_at is None
    assert ctx.store.instances["draining"].status is InstanceStatus.DRAINING
    assert ctx.store.instances["lost"].status is InstanceStatus.LOST
    assert [t.args for t in ctx.scheduler.pending(TaskType.COLLECT_RESULTS)] == [
        {"job": "collecting"}
    ]
    assert collecting.state is JobState.COLLECTING
    assert orphaned.state is JobState.QUEUED and orphaned.attempts == 0
    assert job_file_in(ctx, "orphaned") == ["queued"]


async def test_reconcile_moves_files_to_the_folder_of_their_state(env: SimEnv) -> None:
    """A QUEUED job whose file sits in running/ (crash between move and save) is moved
    back to queued/, so folders and snapshot agree."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    st.add_job(ctx.store, "back", "back.csv", rows=1)
    put(ctx, JobFolder.RUNNING, "back")

    reconcile_folders(ctx)

    assert job_file_in(ctx, "back") == ["queued"]
    assert ctx.store.jobs["back"].state is JobState.QUEUED


# --- a whole restart mid-job -----------------------------------------------------------------
async def test_restart_mid_job_does_not_start_it_again(env: SimEnv) -> None:
    """A run cancelled mid-job without a final save (as a SIGKILL would) and restarted
    from the same folders: the job is reattached, not started again (runs == 1, a
    repeated start of the same attempt finds the `existing` process), and ends DONE."""
    await env.start(instances=1)
    settings = env.settings(job={"command": GATED_WORKER})
    ctx1 = env.context(settings)
    recover_after_restart(ctx1)
    [job_id] = await env.submit(ctx1)
    runner = asyncio.create_task(orchestrate_job_processing(ctx1, inbox_settle_s=0.1))

    def saved_started() -> bool:
        if not ctx1.layout.state_file.exists():
            return False
        job = load_state(ctx1.layout.state_file).jobs.get(job_id)
        return job is not None and job.runs == 1 and job.pgid is not None

    await async_wait_for(saved_started, 20, message="the start is saved")
    iid = ctx1.store.jobs[job_id].instance
    assert iid is not None
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await env.close_context(ctx1)  # no final flush: what was saved is what a kill leaves
    remote = Path(co.remote_job_paths(settings.remote.root, iid, job_id).job_dir)
    first_pid = (remote / "pid").read_text().strip()

    ctx2 = env.context(settings)
    recover_after_restart(ctx2)
    job = ctx2.store.jobs[job_id]
    assert job.state is JobState.RUNNING and job.runs == 1
    with capture_logs() as logs:
        runner2 = asyncio.create_task(orchestrate_job_processing(ctx2, inbox_settle_s=0.1))
        try:
            inst = ctx2.store.instances[iid]
            await async_wait_for(lambda: inst.status is InstanceStatus.READY, 20)
            assert not (remote / "exit_code").exists(), "too late to try a second start"
            # A repeated start of the same attempt (a dispatch that broke off) is a no-op.
            ctx2.dispatch.claim(job_id, ctx2.store.jobs[job_id].run_id)
            await co.dispatch_job(ctx2, job_id, iid)
            env.open_gate(iid)
            await async_wait_for(lambda: job.state is JobState.DONE, 30)
        finally:
            runner2.cancel()
            await asyncio.gather(runner2, return_exceptions=True)

    assert job.runs == 1 and job.attempts == 0
    assert [e["new"] for e in events(logs, "job_started")] == [False]
    assert str(job.pgid) == first_pid
    assert job_file_in(ctx2, job_id) == ["done"]
    assert list(ctx2.layout.results_dir(job_id).glob("*.parquet"))


# --- the state file (predecessor failures) ---------------------------------------------------
async def test_state_file_is_replaced_by_rename_never_rewritten(env: SimEnv) -> None:
    """Each save writes a new file and renames it over state.json (the inode changes), the
    previous one stays as state.json.bak; reopening keeps every job."""
    await env.start(instances=0)
    ctx = env.context(api=False)
    st.add_job(ctx.store, "one", "one.csv", rows=1)
    await wait_saved(ctx)
    state = ctx.layout.state_file
    first = os.stat(state).st_ino
    st.add_job(ctx.store, "two", "two.csv", rows=1)
    await wait_saved(ctx)
    second = os.stat(state).st_ino

    assert first != second
    assert os.stat(ctx.layout.state_backup).st_ino == first
    assert set(load_state(state).jobs) == {"one", "two"}
    assert set(load_state(ctx.layout.state_backup).jobs) == {"one"}
    assert state.stat().st_mode & 0o777 == 0o600


async def test_starting_keeps_the_previous_jobs(env: SimEnv) -> None:
    """Daemon.startup on a root with a snapshot loads it (never deletes or empties it)."""
    await env.start(instances=0)
    settings = env.settings()
    ctx = env.context(settings, api=False)
    st.add_job(ctx.store, "kept", "kept.csv", rows=1)
    put(ctx, JobFolder.QUEUED, "kept")
    await wait_saved(ctx)
    await env.close_context(ctx)

    daemon = daemon_mod.Daemon(settings)
    ctx2 = await daemon.startup()
    try:
        assert "kept" in ctx2.store.jobs
        assert ctx2.store.jobs["kept"].state is JobState.QUEUED
        assert "kept" in load_state(ctx2.layout.state_file).jobs
    finally:
        await ctx2.pool.aclose()
        if ctx2.cloud is not None:
            await ctx2.cloud.aclose()


async def test_recovery_runs_before_any_scheduling(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon.run recovers (and saves) before the supervisor loops start: recovery sees no
    loop running and no job dispatched."""
    await env.start(instances=1)
    settings = env.settings()
    ctx = env.context(settings, api=False)
    st.add_job(ctx.store, "waiting", "waiting.csv", rows=1)
    put(ctx, JobFolder.QUEUED, "waiting")
    await wait_saved(ctx)
    await env.close_context(ctx)
    order: list[str] = []
    real_recover = daemon_mod.recover_after_restart

    def recover(c: Any) -> None:
        assert c.store.jobs["waiting"].state is JobState.QUEUED, "dispatched before recovery"
        order.append("recover")
        real_recover(c)

    def loops(c: Any, **kwargs: Any) -> list[Any]:
        async def idle() -> None:
            order.append("orchestrate")
            await asyncio.Event().wait()

        return [("idle", idle)]

    monkeypatch.setattr(daemon_mod, "recover_after_restart", recover)
    monkeypatch.setattr(daemon_mod, "supervisors", loops)
    daemon = daemon_mod.Daemon(settings)
    monkeypatch.setattr(daemon, "install_signal_handlers", lambda: None)
    run = asyncio.create_task(daemon.run())
    async with asyncio.timeout(20):
        await daemon.started.wait()
        await async_wait_for(lambda: "orchestrate" in order, 10)
        daemon.should_exit.set()
        assert await run == 0

    assert order == ["recover", "orchestrate"]


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative `[paths] root` is resolved against the working directory at load time,
    so a later chdir cannot put results elsewhere."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(paths={"root": "data/vastd"})
    assert settings.paths.root.is_absolute()
    assert settings.paths.root == tmp_path / "data" / "vastd"
