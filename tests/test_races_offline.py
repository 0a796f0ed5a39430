"""More races and crash windows of the state machines (a second review), without a simulator.

A Context over a real folder layout and snapshot, the remote steps patched: a sweep
that fails, a file that cannot move, a completion whose move fails, an orphan's
results landing during a dispatch's file move, a watcher meeting a collection of the
same job elsewhere, a resubmission and a rerun's install interrupted by a crash.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from vastd.core import state as st
from vastd.core.files import JobFolder, Layout
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceRecord, InstanceStatus, JobState, StateStore
from vastd.execution.process_monitor import RemoteJobStatus
from vastd.execution.result_handler import CollectedResults
from vastd.orchestration import collection as coll
from vastd.orchestration import coordinator as co
from vastd.orchestration import inventory as inv
from vastd.orchestration import recovery as rec
from vastd.orchestration.context import Context, build_context
from vastd.orchestration.control import ControlServer
from vastd.utils.config import Settings
from vastd.utils.exceptions import FileOperationError
from vastd.utils.supervise import Backoff


def make_ctx(tmp_path: Path, **job: Any) -> Context:
    settings = Settings(
        paths={"root": str(tmp_path / "root")},
        vast={"api_key": "x", "api_key_file": None},
        job={"command": "true", **job},
    )
    layout = Layout(settings.paths.root)
    layout.ensure()
    store = StateStore(layout.state_file)
    return build_context(
        settings, store=store, pool=SSHPool(settings.ssh), cloud=None, backoff=Backoff.zero()
    )


def put(ctx: Context, folder: JobFolder, job_id: str) -> Path:
    path = ctx.layout.job_file(folder, job_id)
    path.write_text("a,b\n1,2\n")
    return path


def add_instance(ctx: Context, iid: str, status: InstanceStatus) -> InstanceRecord:
    inst = InstanceRecord(id=iid, status=status)
    ctx.store.instances[iid] = inst
    return inst


def running_job(ctx: Context, job_id: str, iid: str) -> st.JobRecord:
    put(ctx, JobFolder.QUEUED, job_id)
    job = st.add_job(ctx.store, job_id, f"{job_id}.csv", 1)
    st.mark_job_assigned(ctx.store, job_id, iid)
    st.mark_job_started(ctx.store, job_id, run_id=job.run_id, pgid=4242, new=True)
    return job


# --- 1: preparation makes an instance READY although its sweep failed -----------------------
async def test_an_instance_is_not_ready_while_its_sweep_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCHITECTURE: 'Preparation sweeps job folders nothing accounts for before an
    instance gets a job'. inventory.py: a failed sweep only skips note_resweep, then
    mark_instance_ready runs anyway: the instance takes new jobs beside untracked runs."""
    ctx = make_ctx(tmp_path)
    inst = add_instance(ctx, "i1", InstanceStatus.DISCOVERED)
    inst.resweep = True

    async def conn(_ctx: Any, _inst: Any) -> object:
        return object()

    async def prepared(*_a: Any, **_k: Any) -> str:
        return "hash"

    async def sweep_fails(*_a: Any, **_k: Any) -> bool:
        return False  # e.g. one `rm -rf` timed out

    monkeypatch.setattr(inv, "instance_connection", conn)
    monkeypatch.setattr(inv, "prepare_instance_for_jobs", prepared)
    monkeypatch.setattr(inv, "sweep_remote_folders", sweep_fails)
    await inv.run_instance_preparation_workflow(ctx, "i1")
    assert inst.resweep is True
    assert inst.status is not InstanceStatus.READY, "READY (gets jobs) with its sweep not done"


# --- 2: a job file that cannot move crashes start-up / the stuck-job sweep every time -------
def test_startup_survives_a_running_job_whose_file_cannot_move(tmp_path: Path) -> None:
    """3f2725e: 'one file that cannot move no longer stops start-up'. Not true for a
    RUNNING job whose instance is unknown: recover_after_restart's requeue raises."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    running_job(ctx, "j", "i1")
    del ctx.store.instances["i1"]  # e.g. forgotten (or an old snapshot)
    put(ctx, JobFolder.QUEUED, "j")  # a stray copy dropped in queued/ by hand
    rec.recover_after_restart(ctx)  # must not raise: the daemon must start


def test_the_stuck_job_sweep_survives_a_file_that_cannot_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same as above, set up directly: job 'a' RUNNING on a LOST instance whose file
    cannot go back to queued/ (a stray queued/a.csv), job 'b' unwatched on a live one."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "gone", InstanceStatus.READY)
    add_instance(ctx, "live", InstanceStatus.READY)
    running_job(ctx, "a", "gone")
    running_job(ctx, "b", "live")
    put(ctx, JobFolder.QUEUED, "a")  # the requeue's move refuses to overwrite it
    st.mark_instance_lost(ctx.store, ctx.store.instances["gone"], "test")  # logs job_requeue_failed
    assert ctx.store.jobs["a"].state is JobState.RUNNING
    watched: list[str] = []
    monkeypatch.setattr(co, "ensure_watcher", lambda _ctx, iid: watched.append(iid))
    try:
        co.handle_system_failures(ctx)
    except FileOperationError as exc:
        pytest.fail(
            f"the preparation loop's step crashes (every second): {exc!r}; "
            f"watchers ensured before the crash: {watched}"
        )
    assert "live" in watched


# --- 3: mark_job_completed records a kill of the live run, then fails, changing nothing else
def test_a_completion_whose_move_fails_records_no_kill_of_the_live_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_late_results from RUNNING: mark_job_completed adds the 'duplicate run'
    follow-up, then its file move raises (disk full / EIO). The job stays RUNNING, its
    orphan already dropped, but the follow-up is saved and kills the live run: the
    watcher then requeues it and the job runs a third time ('run twice for nothing')."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    add_instance(ctx, "i2", InstanceStatus.READY)
    job = running_job(ctx, "j", "i2")
    live_run = job.run_id

    def boom(*_a: Any, **_k: Any) -> None:
        raise FileOperationError("No space left on device")

    monkeypatch.setattr(st, "move_job_file", boom)
    with pytest.raises(FileOperationError):
        st.mark_job_completed(
            ctx.store, "j", instance_id="i1", run_id="0" * 16, result_files=["r.parquet"]
        )
    assert job.state is JobState.RUNNING
    kills = [f for f in ctx.store.snapshot.followups.values() if f.run == live_run]
    assert not kills, f"the live run {live_run} is to be killed while still the job's run: {kills}"


# --- 4: assign_job's move in a thread vs an orphan's results kept meanwhile ------------------
async def test_a_completion_during_a_dispatch_move_is_refused_and_the_file_follows_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """assign_job moves queued/->running/ in a thread, the record still QUEUED. An
    orphan's results completing the job meanwhile (QUEUED -> DONE is legal) would find
    no file in queued/ ('job_file_missing'), and assign_job then moved the file back:
    a DONE job whose CSV sat in queued/. One mover at a time: the completion is refused
    (looked at again next cycle), the assignment goes on, record and folder agree."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    put(ctx, JobFolder.QUEUED, "j")
    st.add_job(ctx.store, "j", "j.csv", 1)
    real = st.in_thread_to_its_end
    refused: list[str] = []

    async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = await real(fn, *args, **kwargs)
        if not refused:
            # what the watcher's handle_orphan_status -> keep_late_results does meanwhile
            try:
                st.mark_job_completed(
                    ctx.store, "j", instance_id="i0", run_id="a" * 16, result_files=["r.parquet"]
                )
            except FileOperationError as exc:
                refused.append(str(exc))
        return result

    monkeypatch.setattr(st, "in_thread_to_its_end", in_thread)
    assert await st.assign_job(ctx.store, "j", "i1") is not None
    assert refused and "being moved" in refused[0]
    assert ctx.store.jobs["j"].state is JobState.RUNNING
    assert ctx.layout.job_file(JobFolder.RUNNING, "j").exists()
    assert not ctx.store.moving("j")
    # the next cycle's completion goes through
    monkeypatch.setattr(st, "in_thread_to_its_end", real)
    job = ctx.store.jobs["j"]
    await st.complete_job(ctx.store, job, instance_id="i0", run_id="a" * 16, result_files=[])
    assert job.state is JobState.DONE
    assert ctx.layout.job_file(JobFolder.DONE, "j").exists()


async def test_late_results_wait_for_a_dispatch_move_then_complete_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """complete_job meeting a dispatch's move of the file waits for it (a few ms), then
    completes the now-running job: the results are not thrown away by a refusal."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    put(ctx, JobFolder.QUEUED, "j")
    job = st.add_job(ctx.store, "j", "j.csv", 1)
    release = asyncio.Event()
    real_move = st._move_file

    def move(*a: Any, **k: Any) -> bool:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return real_move(*a, **k)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(st, "_move_file", move)
    assign = asyncio.create_task(st.assign_job(ctx.store, "j", "i1"))
    while not ctx.store.moving("j"):
        await asyncio.sleep(0.001)
    completion = asyncio.create_task(
        st.complete_job(ctx.store, job, instance_id="i0", run_id="a" * 16, result_files=["r"])
    )
    await asyncio.sleep(0.02)
    assert not completion.done(), "the completion did not wait for the dispatch's move"
    monkeypatch.setattr(st, "_move_file", real_move)
    release.set()
    assert await assign is not None
    assert await completion is job
    assert job.state is JobState.DONE and job.run_id == "a" * 16
    assert ctx.layout.job_file(JobFolder.DONE, "j").exists()
    assert not list(ctx.layout.folder(JobFolder.RUNNING).iterdir())
    stops = {(f.instance, f.reason) for f in ctx.store.snapshot.followups.values()}
    assert ("i1", "duplicate run") in stops  # the dispatched run is not needed


async def test_late_results_for_a_replaced_record_change_nothing(tmp_path: Path) -> None:
    """The record was replaced (retried) before the late results' completion: None, and
    the new record, its file and the folders are left as they are."""
    ctx = make_ctx(tmp_path)
    put(ctx, JobFolder.QUEUED, "j")
    old = st.add_job(ctx.store, "j", "j.csv", 1)
    st.mark_job_failed(ctx.store, "j", reason="boom")
    st.retry_job(ctx.store, "j", rows=1)
    new = ctx.store.jobs["j"]
    assert new is not old
    done = await st.complete_job(ctx.store, old, instance_id="i0", run_id="a" * 16, result_files=[])
    assert done is None and new.state is JobState.QUEUED
    assert ctx.layout.job_file(JobFolder.QUEUED, "j").exists()
    assert not ctx.layout.job_file(JobFolder.DONE, "j").exists()


async def test_a_cancel_during_a_dispatch_move_waits_for_it_and_leaves_no_file_in_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vastd cancel` while assign_job's thread moves the file: mark_job_failed found no
    file in queued/ (an .error.json without its CSV), then assign_job moved the file back
    to queued/, where the next start accepted the cancelled job again. Now the cancel
    waits for the move, then fails the job with its file in failed/."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    put(ctx, JobFolder.QUEUED, "j")
    st.add_job(ctx.store, "j", "j.csv", 1)
    real = st.in_thread_to_its_end
    answers: list[dict[str, Any]] = []

    async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = await real(fn, *args, **kwargs)
        if not answers:
            cancel = asyncio.create_task(ControlServer(ctx)._cancel_one("j"))
            await asyncio.sleep(0.05)
            assert not cancel.done(), "the cancel did not wait for the move"
            answers.append({"pending": cancel})
        return result

    monkeypatch.setattr(st, "in_thread_to_its_end", in_thread)
    await st.assign_job(ctx.store, "j", "i1")
    answer = await answers[0]["pending"]
    assert answer["ok"], answer
    assert ctx.store.jobs["j"].state is JobState.FAILED
    assert not list(ctx.layout.folder(JobFolder.QUEUED).iterdir())
    assert (ctx.layout.failed / "j.csv").exists()


async def test_a_completion_moves_the_file_off_the_loop_and_refuses_other_movers_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """complete_job's file move runs in a worker thread; while it runs, a requeue of
    the job (its instance lost) is refused, or skipped by the instance's sweep, so the
    file is never moved from under the completion. Afterwards: done, file in done/."""
    ctx = make_ctx(tmp_path)
    inst = add_instance(ctx, "i1", InstanceStatus.READY)
    job = running_job(ctx, "j", "i1")
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)
    real = st.in_thread_to_its_end
    seen: list[Any] = []

    async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(fn)
        assert ctx.store.moving("j")
        with pytest.raises(FileOperationError, match="being moved"):
            st.requeue_job(ctx.store, "j", reason="instance lost")
        assert st.requeue_instance_jobs(ctx.store, inst, "lost", orphan=True) == 0
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(st, "in_thread_to_its_end", in_thread)
    await st.complete_job(
        ctx.store, job, instance_id="i1", run_id=job.run_id, result_files=["r.parquet"], rows_out=3
    )
    assert seen, "the move did not run in a worker thread"
    assert job.state is JobState.DONE and job.result_files == ["r.parquet"] and job.rows_out == 3
    assert ctx.layout.job_file(JobFolder.DONE, "j").exists()
    assert not ctx.layout.job_file(JobFolder.RUNNING, "j").exists()
    assert not ctx.store.moving("j") and inst.current_jobs == []


async def test_a_completion_whose_thread_move_fails_leaves_the_record_and_the_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move in the thread raises (disk full): still collecting, the file where it
    was, no 'collected' follow-up, and the job is no longer marked as moving."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    job = running_job(ctx, "j", "i1")
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)

    def boom(*_a: Any, **_k: Any) -> None:
        raise FileOperationError("No space left on device")

    monkeypatch.setattr(st, "move_job_file", boom)
    with pytest.raises(FileOperationError):
        await st.complete_job(ctx.store, job, instance_id="i1", run_id=job.run_id, result_files=[])
    assert job.state is JobState.COLLECTING and not ctx.store.moving("j")
    assert ctx.layout.job_file(JobFolder.RUNNING, "j").exists()
    assert not [f for f in ctx.store.snapshot.followups.values() if f.reason == "collected"]


async def test_a_completion_cancelled_during_its_move_still_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the collection while its thread moves the file to done/: the
    thread cannot be stopped, so the job stays marked as moving until the move is over
    (no other mover meanwhile) and the record says done before the cancellation goes on
    (else: the file in done/, the record collecting, its figures lost)."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    job = running_job(ctx, "j", "i1")
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)
    in_thread, release = threading.Event(), threading.Event()
    real_move = st.move_job_file

    def slow_move(*a: Any, **k: Any) -> Any:
        in_thread.set()
        release.wait(5)
        return real_move(*a, **k)

    monkeypatch.setattr(st, "move_job_file", slow_move)
    task = asyncio.create_task(
        st.complete_job(ctx.store, job, instance_id="i1", run_id=job.run_id, result_files=["r"])
    )
    while not in_thread.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.sleep(0.02)
    assert not task.done() and ctx.store.moving("j"), "the mark went before the move ended"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.state is JobState.DONE and job.result_files == ["r"]
    assert ctx.layout.job_file(JobFolder.DONE, "j").exists() and not ctx.store.moving("j")


def test_an_attempt_is_not_counted_when_its_file_is_being_moved(tmp_path: Path) -> None:
    """A failed start meets an orphan's completion moving the file: refused before the
    attempt is counted (else the job would fail one attempt early)."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    job = running_job(ctx, "j", "i1")
    with ctx.store.file_move("j"), pytest.raises(FileOperationError):
        st.record_attempt_failure(
            ctx.store, "j", reason="could not start", exit_code=None, max_attempts=3
        )
    assert job.attempts == 0 and job.state is JobState.RUNNING


# --- 5: the watcher blocks on a job lock held by a long collection ---------------------------
async def test_an_orphan_check_never_waits_for_another_collection(tmp_path: Path) -> None:
    """handle_orphan_status awaits ctx.job_locks(job) inside the instance's watcher
    (before it checks the job's state). While another instance's collection of the
    same job holds it (a download bounded by max(600 s, max_result_bytes/1 MB/s)),
    this instance's watcher stops: none of its other jobs is checked or timed out."""
    ctx = make_ctx(tmp_path)
    inst = add_instance(ctx, "i1", InstanceStatus.READY)
    add_instance(ctx, "i2", InstanceStatus.READY)
    job = running_job(ctx, "j", "i2")
    job.orphans.append(st.OrphanRun(instance="i1", run="b" * 16, started_at=1.0))
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)  # COLLECTING on i2
    status = RemoteJobStatus(job_id="j", exists=True, pid=1, exit_code=0, run="b" * 16)
    async with ctx.job_locks.hold("j"):  # the collection on i2 is downloading
        try:
            await asyncio.wait_for(coll.handle_orphan_status(ctx, inst, job, status), 1.0)
        except TimeoutError:
            pytest.fail("the watcher of i1 is stuck behind i2's collection of the job")


# --- 6: a FAILED job's resubmission, crash before the save, recovered as a failure -----------
def test_a_resubmitted_failure_without_a_csv_survives_a_crash(tmp_path: Path) -> None:
    """A job that failed with no CSV left (its file vanished / removed by hand: only
    <job>.error.json in failed/) is resubmitted; SIGKILL before the save. recovery's
    `resubmitted()` looks for failed/<stem>.csv, finds none, and moves the NEW
    submission to failed/ under the OLD failure's reason: never run, no word why."""
    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    put(ctx, JobFolder.QUEUED, "j")
    st.add_job(ctx.store, "j", "j.csv", 1)
    ctx.layout.job_file(JobFolder.QUEUED, "j").unlink()  # removed by hand
    st.mark_job_assigned(ctx.store, "j", "i1")  # -> FAILED: 'the job file vanished'
    assert ctx.store.jobs["j"].state is JobState.FAILED
    put(ctx, JobFolder.QUEUED, "j")  # accepted again from the inbox; crash before the save
    rec.reconcile_folders(ctx)
    assert ctx.store.jobs["j"].state is JobState.QUEUED


# --- 7: a failed save plus a failed requeue leaves dispatch claims forever --------------------
async def test_a_deferred_dispatch_releases_every_claim_when_a_requeue_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """coordinate_job_distribution: the save fails (read-only root: EROFS), so every
    assignment is requeued; the first requeue's move fails too and raises out of the
    loop step. Jobs after it keep their claim in ctx.dispatching for ever: the watcher
    skips them (in_dispatch) and spins every 0.05 s, detect_stuck_jobs never counts them,
    and they are RUNNING with nothing started. The first job stays RUNNING unsaved, and
    the stuck-job sweep's watcher re-dispatches it (no write-ahead on that path)."""
    ctx = make_ctx(tmp_path, jobs_per_instance=1)
    add_instance(ctx, "i1", InstanceStatus.READY)
    add_instance(ctx, "i2", InstanceStatus.READY)
    for j in ("a", "b"):
        put(ctx, JobFolder.QUEUED, j)
        st.add_job(ctx.store, j, f"{j}.csv", 1)

    async def no_save() -> bool:
        return False

    real_move = st.move_job_file

    def move(layout: Any, job_id: str, src: JobFolder, dst: JobFolder, **kw: Any) -> Any:
        if src is JobFolder.RUNNING and dst is JobFolder.QUEUED:
            raise FileOperationError("Read-only file system")
        return real_move(layout, job_id, src, dst, **kw)

    monkeypatch.setattr(ctx.store, "flush", no_save)
    monkeypatch.setattr(st, "move_job_file", move)
    # The step itself must not crash (the requeue that cannot move is logged, skipped).
    assert await co.coordinate_job_distribution(ctx) == 0
    assert not ctx.dispatching, f"claimed for ever (no dispatch runs them): {ctx.dispatching}"


# --- 8: a rerun's install repeated after a crash leaves the earlier input in done/ -----------
def test_a_rerun_reinstalled_after_a_crash_keeps_inputs_with_their_results(tmp_path: Path) -> None:
    """Rerun R1 of a done job: _install_keeping_previous makes results/j/previous-1/,
    SIGKILL before mark_job_completed. After the restart the collection of R1 runs
    again: the MANIFEST matches, so it returns previous=None, and mark_job_completed
    (previous_dir=None) leaves the EARLIER run's done/j.csv in place and files R1's
    input as done/j.dup-1.csv: done/j.csv no longer is the input of results/j/."""
    import json

    from vastd.execution.result_handler import MANIFEST_NAME, _install_keeping_previous

    ctx = make_ctx(tmp_path)
    add_instance(ctx, "i1", InstanceStatus.READY)
    final = ctx.layout.results_dir("j")
    final.mkdir(parents=True)
    (final / MANIFEST_NAME).write_text(json.dumps({"run": "0" * 16}))
    ctx.layout.job_file(JobFolder.DONE, "j").write_text("earlier input\n")
    # the rerun, accepted and saved, then dispatched and exited
    ctx.layout.job_file(JobFolder.QUEUED, "j").write_text("rerun input\n")
    ctx.store.snapshot.jobs["j"] = st.JobRecord(
        id="j", file_name="j.csv", rows=1, seq=0, state=JobState.DONE
    )
    job = st.add_job(ctx.store, "j", "j.csv", 1, keep_previous=True)
    st.mark_job_assigned(ctx.store, "j", "i1")
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)
    run = job.run_id

    def tmp_results() -> Path:
        tmp = ctx.layout.results / f".tmp-{len(list(ctx.layout.results.iterdir()))}"
        tmp.mkdir()
        (tmp / MANIFEST_NAME).write_text(json.dumps({"run": run}))
        return tmp

    assert _install_keeping_previous(tmp_results(), final, run) is not None
    # SIGKILL here; after the restart the same run is collected again:
    previous = _install_keeping_previous(tmp_results(), final, run)
    st.mark_job_completed(
        ctx.store, "j", instance_id="i1", run_id=run, result_files=[], previous_dir=previous
    )
    assert ctx.layout.job_file(JobFolder.DONE, "j").read_text() == "rerun input\n"


def test_results_installed_late_are_kept_over_another_exited_run(tmp_path: Path) -> None:
    """Run R1's download ends while the job (requeued, run again as R2, exited) is being
    collected as R2: R1's valid results are already in results/<job>/, so the job is done
    with R1 (record and folder agree) and R2's folder is cleaned up, not collected."""
    ctx = make_ctx(tmp_path)
    i1 = add_instance(ctx, "i1", InstanceStatus.READY)
    add_instance(ctx, "i2", InstanceStatus.READY)
    job = running_job(ctx, "j", "i2")
    second = job.run_id
    st.mark_job_exited(ctx.store, "j", exit_code=0, error=None)
    collected = CollectedResults(
        directory=ctx.layout.results_dir("j"), files=[ctx.layout.results_dir("j") / "r"], rows=1
    )
    asyncio.run(coll.keep_late_results(ctx, job, i1, collected, "c" * 16))
    assert job.state is JobState.DONE and job.run_id == "c" * 16 and job.instance == "i1"
    stops = {(f.instance, f.run) for f in ctx.store.snapshot.followups.values()}
    assert ("i2", second) in stops


@pytest.mark.parametrize("on_duplicate", ["refuse", "rerun"])
async def test_a_resubmission_meeting_late_results_follows_the_rule_for_a_done_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_duplicate: str
) -> None:
    """A failed job's name dropped again while its late results move it to done/: the
    inbox checked the name while it was failed, then waited for the move. The job is
    done by then, so the rule for a done name applies: refused as a duplicate (the
    done record and its results untouched), or with "rerun" queued keeping the earlier
    results. Before, the done job was replaced as if it had never run."""
    from vastd.orchestration import workflow as wf

    ctx = make_ctx(tmp_path, on_duplicate=on_duplicate)
    put(ctx, JobFolder.QUEUED, "j")
    job = st.add_job(ctx.store, "j", "j.csv", 1)
    st.mark_job_failed(ctx.store, "j", reason="timed out")
    assert ctx.layout.job_file(JobFolder.FAILED, "j").exists()
    release = threading.Event()
    real = st.in_thread_to_its_end

    async def held(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await real(lambda: (release.wait(5), fn(*args, **kwargs))[1])

    monkeypatch.setattr(st, "in_thread_to_its_end", held)
    completion = asyncio.create_task(
        st.complete_job(ctx.store, job, instance_id="i0", run_id="a" * 16, result_files=["r"])
    )
    while not ctx.store.moving("j"):
        await asyncio.sleep(0.001)
    dropped = ctx.layout.inbox / "j.csv"
    dropped.write_text("a,b\n3,4\n")
    accept = asyncio.create_task(wf.accept_inbox_files(ctx, [dropped]))
    await asyncio.sleep(0.05)
    assert not accept.done(), "the inbox did not wait for the move to done/"
    release.set()
    assert await completion is job
    assert await accept == {}
    if on_duplicate == "refuse":
        assert ctx.store.jobs["j"] is job and job.state is JobState.DONE
        assert (ctx.layout.failed / "j.dup-1.csv").read_text() == "a,b\n3,4\n"
        assert not ctx.layout.job_file(JobFolder.QUEUED, "j").exists()
    else:
        new = ctx.store.jobs["j"]
        assert new is not job and new.state is JobState.QUEUED and new.keep_previous
        assert ctx.layout.job_file(JobFolder.QUEUED, "j").read_text() == "a,b\n3,4\n"
    assert ctx.layout.job_file(JobFolder.DONE, "j").exists()
