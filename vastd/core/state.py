"""The state machines of jobs and instances: the only code that changes them.

Every change of a job's `state`, an instance's `status`, or the reason kept with
either goes through a named transition below, checked against one table
(`JOB_TRANSITIONS`, `INSTANCE_TRANSITIONS`); anything else raises
IllegalTransitionError. A job's file moves with its record (queued/, running/,
done/, failed/). Transitions change memory and mark the store dirty; callers that
are about to do something irreversible await `store.flush()` first (write-ahead).

Remote work a transition decides on (removing a finished or failed run's folder,
stopping a duplicate run) is recorded as a FollowUp in the same change, so it is
saved with it and carried out after the save, retried until done, across restarts.

Records and persistence live in core/records.py and core/snapshot.py; their names
are re-exported here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vastd.core.files import (
    ERROR_SUFFIX,
    JOB_SUFFIX,
    JobFolder,
    atomic_file_move,
    move_job_file,
    move_job_to_failed,
    safe_name,
    unique_stem,
    write_error_json,
)
from vastd.core.files_async import in_thread_to_its_end
from vastd.core.gpus import held_gpus
from vastd.core.records import FINISHED as FINISHED
from vastd.core.records import SCHEMA_VERSION as SCHEMA_VERSION
from vastd.core.records import FollowUp as FollowUp
from vastd.core.records import InstanceRecord as InstanceRecord
from vastd.core.records import InstanceStatus as InstanceStatus
from vastd.core.records import JobRecord as JobRecord
from vastd.core.records import JobState as JobState
from vastd.core.records import OrphanRun as OrphanRun
from vastd.core.records import Snapshot as Snapshot
from vastd.core.records import new_run_id
from vastd.core.snapshot import SNAPSHOT_TEMP_PATTERNS as SNAPSHOT_TEMP_PATTERNS
from vastd.core.snapshot import StateStore as StateStore
from vastd.core.snapshot import load_state as load_state
from vastd.core.snapshot import save_state as save_state
from vastd.core.tracking import HELD as TRACKED_HELD
from vastd.utils import metrics
from vastd.utils.exceptions import FileOperationError, IllegalTransitionError
from vastd.utils.logging import get_logger

log = get_logger("vastd.state")

J, S = JobState, InstanceStatus

# --- the tables ---------------------------------------------------------------------------------
# None: a job that does not exist yet (accepted from the inbox).
JOB_TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({J.QUEUED}),
    # dispatched | its file vanished | an earlier (orphaned) run's results were kept
    J.QUEUED: frozenset({J.RUNNING, J.FAILED, J.DONE}),
    # exited | requeued (lost, drained, retry) | failed to start for good | orphan kept
    J.RUNNING: frozenset({J.COLLECTING, J.QUEUED, J.FAILED, J.DONE}),
    # results valid | attempt failed, retries left (or instance lost) | failed for good
    J.COLLECTING: frozenset({J.DONE, J.QUEUED, J.FAILED}),
    # accepted again with [job] on_duplicate = "rerun"
    J.DONE: frozenset({J.QUEUED}),
    # resubmitted by name (or retried) | an orphaned run's results came in after all
    J.FAILED: frozenset({J.QUEUED, J.DONE}),
}

# every live instance may be drained, found lost, or torn down
_WAYS_OUT = frozenset({S.DRAINING, S.LOST, S.DESTROYING})
INSTANCE_TRANSITIONS: dict[InstanceStatus, frozenset[InstanceStatus]] = {
    S.BOOTING: frozenset({S.DISCOVERED} | _WAYS_OUT),
    S.DISCOVERED: frozenset({S.PREPARING, S.READY, S.UNREACHABLE} | _WAYS_OUT),
    S.PREPARING: frozenset({S.READY, S.DISCOVERED, S.UNREACHABLE} | _WAYS_OUT),
    # DISCOVERED: re-verified after a restart
    S.READY: frozenset({S.UNREACHABLE, S.DISCOVERED} | _WAYS_OUT),
    S.UNREACHABLE: frozenset({S.READY, S.DISCOVERED} | _WAYS_OUT),
    # READY: undrained (by hand, or its disk recovered) | DISCOVERED: undrained before it
    # was prepared, or with job folders to sweep (it is prepared first)
    S.DRAINING: frozenset({S.READY, S.DISCOVERED, S.LOST, S.DESTROYING}),
    # DISCOVERED: listed as running again
    S.LOST: frozenset({S.DISCOVERED, S.DESTROYING}),
    S.DESTROYING: frozenset({S.DESTROYED}),
    S.DESTROYED: frozenset(),
}
GONE = frozenset({S.LOST, S.DESTROYING, S.DESTROYED})
HELD = TRACKED_HELD  # a job tied to its instance
FOLDER_OF = {
    J.QUEUED: JobFolder.QUEUED,
    J.RUNNING: JobFolder.RUNNING,
    J.COLLECTING: JobFolder.RUNNING,
    J.DONE: JobFolder.DONE,
    J.FAILED: JobFolder.FAILED,
}


def can_job(job: JobRecord | None, to: JobState) -> bool:
    return to in JOB_TRANSITIONS[job.state if job is not None else None]


def can_instance(inst: InstanceRecord, to: InstanceStatus) -> bool:
    return inst.status is to or to in INSTANCE_TRANSITIONS[inst.status]


def set_job_state(store: StateStore, job: JobRecord, to: JobState) -> None:
    """The one place a job's state is set: checked against JOB_TRANSITIONS."""
    if not can_job(job, to):
        raise IllegalTransitionError(f"job {job.id!r}: {job.state.value} -> {to.value}")
    job.state = to
    store.mark_dirty()
    metrics.note_progress()  # vastd_last_progress_timestamp_seconds


def set_instance_status(store: StateStore, inst: InstanceRecord, to: InstanceStatus) -> None:
    """The one place an instance's status is set: checked against INSTANCE_TRANSITIONS."""
    if not can_instance(inst, to):
        raise IllegalTransitionError(f"instance {inst.id}: {inst.status.value} -> {to.value}")
    inst.status = to
    store.mark_dirty()


# --- job files ---------------------------------------------------------------------------------
def _not_moving(store: StateStore, job_id: str) -> None:
    """Refuse a transition that moves the job's file while an assignment or a completion
    moves it off the event loop (`StateStore.file_move`): the record is left as it was,
    and the step that asked tries again later, or waits (`StateStore.file_settled`)."""
    if store.moving(job_id):
        raise FileOperationError(f"job {job_id!r}: its file is being moved (try again)")


def _move(
    store: StateStore,
    job: JobRecord,
    src: JobFolder,
    dst: JobFolder,
    *,
    rename_on_collision: bool = False,
) -> bool:
    """Move the job's file with its record; False when the file is gone (removed by hand).

    Only a missing source counts as gone; any other failure (disk full, read-only, a
    completion moving it: `_not_moving`) raises FileOperationError and the record is
    left as it was.
    """
    _not_moving(store, job.id)
    return _move_file(store, job.id, src, dst, rename_on_collision=rename_on_collision)


def _move_file(
    store: StateStore,
    job_id: str,
    src: JobFolder,
    dst: JobFolder,
    rename_on_collision: bool = False,
) -> bool:
    """`_move` without the check: for the move of the one mover (`StateStore.file_move`),
    in its worker thread."""
    layout = store.layout
    source = layout.job_file(src, job_id)
    if not os.path.lexists(source):
        if os.path.lexists(layout.job_file(dst, job_id)):
            return True  # moved already (a step interrupted between the move and the save)
        log.warning("job_file_missing", job=job_id, folder=src.value)
        return False
    # The folders' fsyncs run in the saver's thread, before the save that records the
    # move: the file is durable in its new folder before the record says it is there.
    move_job_file(
        layout,
        job_id,
        src,
        dst,
        rename_on_collision=rename_on_collision,
        defer_fsync=store.defer_fsync,
    )
    return True


def _release(store: StateStore, job: JobRecord) -> None:
    """Free the job's slot on its instance (job.instance still says where it ran)."""
    inst = store.instances.get(job.instance or "")
    job.slot, job.slot_pos = None, 0
    if inst is not None and job.id in inst.current_jobs:
        inst.current_jobs = [j for j in inst.current_jobs if j != job.id]
        if not inst.current_jobs:
            inst.idle_since = time.time()
    store.mark_dirty()


WITHDRAWN = "withdrawn: "  # the start of a kill_reason asking for a staged run's withdrawal


def withdraw_behind(store: StateStore, job: JobRecord, why: str) -> int:
    """A staged run leaves its slot before it started (cancelled, failed, queued again,
    completed by another run, found finished at a restart):
    the runs staged behind it are to be withdrawn too (by the instance's watcher, then
    queued again), so that none starts in its place while the slot's job still runs."""
    inst = store.instances.get(job.instance or "") if job.staged else None
    if inst is None:
        return 0
    marked = 0
    for chain in slot_chains(store, inst):
        if job in chain:
            for later in chain[chain.index(job) + 1 :]:
                if not later.staged:
                    break  # started: it and the runs behind it go on
                if later.kill_reason is None:
                    later.kill_reason = f"{WITHDRAWN}{job.id}, staged before it, {why}"
                    marked += 1
    return marked


def _leave_slot(store: StateStore, job: JobRecord, why: str) -> None:
    """The job's run leaves its instance's slot without running on there (failed,
    completed by another run, found finished at a restart): a staged one takes the runs
    staged behind it along (`withdraw_behind`), then its slot is free."""
    withdraw_behind(store, job, why)
    _unstage(job)
    _release(store, job)


def _unstage(job: JobRecord) -> None:
    """No longer a staged run (it started, or it left its slot)."""
    if job.staged or job.after is not None:
        job.staged = False
        job.after = None
        job.after_run = None
        job.staged_at = None


def _clean_up_run(store: StateStore, job: JobRecord, reason: str) -> None:
    """Record the removal of the job's current run folder (after the save, retried)."""
    if job.instance is not None and (job.pgid is not None or job.run_id is not None):
        add_followup(store, instance=job.instance, job=job.id, run=job.run_id, reason=reason)


# --- job transitions ---------------------------------------------------------------------------
def add_job(
    store: StateStore,
    job_id: str,
    file_name: str,
    rows: int,
    *,
    keep_previous: bool = False,
    refused_before: bool = False,
) -> JobRecord:
    """A file accepted into queued/ becomes a job (a finished one of the name is replaced).

    A failed job resubmitted by name: its `failed/` files go once this record is saved
    (`clear_earlier_failure`). So do `failed/<job>.csv` and its `.error.json` when no
    record owns them (`refused_before`: an earlier file of the name refused at
    acceptance, which this one replaces). Runs the earlier record still had out as
    orphans are recorded for their stop.
    """
    old = store.jobs.get(job_id)
    if not can_job(old, J.QUEUED) or (old is not None and old.state not in FINISHED):
        raise IllegalTransitionError(f"job {job_id!r} is {old.state.value if old else '?'}")
    # A name whose final record is in history.jsonl only: this starts a new record.
    earlier = store.history.get(job_id) if old is None else None
    seq = store.snapshot.next_seq
    store.snapshot.next_seq += 1
    job = JobRecord(id=job_id, file_name=file_name, rows=rows, seq=seq)
    job.keep_previous = keep_previous
    if old is not None:
        for orphan in old.orphans:
            add_followup(
                store, instance=orphan.instance, job=job_id, run=orphan.run, reason="superseded"
            )
        if old.state is J.FAILED:
            job.earlier_failed_stem = old.failed_stem or job_id
    elif earlier is not None and earlier.state is J.FAILED:
        job.earlier_failed_stem = earlier.failed_stem or job_id
    if job.earlier_failed_stem is None and refused_before:
        job.earlier_failed_stem = job_id  # no failed record owns them: a refusal's
    store.history.pop(job_id)
    store.snapshot.jobs[job_id] = job
    store.keep_json(job)  # dumped now, while accepting, not all at once in the next save
    store.mark_dirty()
    return job


def clear_earlier_failure(store: StateStore, job_id: str) -> None:
    """Remove the failed/ files of the failure a resubmitted job replaces (call once the
    record saying it is queued again is saved)."""
    job = store.jobs.get(job_id)
    if job is None or job.earlier_failed_stem is None:
        return
    layout = store.layout
    stem = job.earlier_failed_stem
    for path in (
        layout.failed / safe_name(stem, JOB_SUFFIX),
        layout.failed / safe_name(stem, ERROR_SUFFIX),
    ):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("failed_file_not_removed", job=job_id, path=str(path), error=str(exc))
            return
    job.earlier_failed_stem = None
    store.mark_dirty()


def mark_job_assigned(
    store: StateStore, job_id: str, instance_id: str, gpus: Iterable[int] = ()
) -> JobRecord | None:
    """queued -> running on an instance, with a new run id; None when its file is gone.

    The caller saves the store before anything is uploaded (a crash then finds it).
    """
    job = store.jobs[job_id]
    if not can_job(job, J.RUNNING):
        raise IllegalTransitionError(f"job {job_id!r}: {job.state.value} -> running")
    if not _move(store, job, JobFolder.QUEUED, JobFolder.RUNNING):
        mark_job_failed(store, job_id, reason="the job file vanished from queued/")
        return None
    return _assign(store, job, store.instances[instance_id], list(gpus))


async def assign_job(
    store: StateStore,
    job_id: str,
    instance_id: str,
    gpus: Iterable[int] = (),
    *,
    after: JobRecord | None = None,
) -> JobRecord | None:
    """`mark_job_assigned` with the file move (two fsyncs) off the event loop.

    Re-checked after the move: if the job or the instance changed meanwhile (no longer
    queued; lost, drained; one of `gpus` taken by another job), the file goes back and
    None is returned. `gpus`: the instance's GPU indices this run is given (core/gpus.py).
    `after`: the run is staged behind that job's current run on the same slot (`[job]
    stage_ahead`): it gets that job's GPUs, and is refused if that run moved on.
    """
    wanted = list(after.gpus) if after is not None else list(gpus)
    after_run = after.run_id if after is not None else None
    job = store.jobs[job_id]
    if not can_job(job, J.RUNNING):
        raise IllegalTransitionError(f"job {job_id!r}: {job.state.value} -> running")
    # Marked as the job's one file move for as long as the thread runs (a cancellation
    # waits for its end): a transition that would move the file meanwhile is refused.
    with store.file_move(job_id):
        moved = await in_thread_to_its_end(
            _move_file, store, job_id, JobFolder.QUEUED, JobFolder.RUNNING
        )
    if not moved:
        if job.state is J.QUEUED:
            mark_job_failed(store, job_id, reason="the job file vanished from queued/")
        return None
    inst = store.instances.get(instance_id)
    if (
        store.jobs.get(job_id) is not job
        or job.state is not J.QUEUED
        or (inst is None or inst.status is not S.READY)
        or (after is None and wanted and not set(wanted).isdisjoint(_gpus_taken(store, inst)))
        or (
            after is not None
            and (
                after.state is not J.RUNNING
                or after.instance != instance_id
                or after.run_id != after_run
            )
        )
    ):
        # Changed while the file moved (lost, drained, its GPUs taken): it goes back to
        # queued/ (done/ should the record say done: a completion waits for this move).
        home = JobFolder.DONE if job.state is J.DONE else JobFolder.QUEUED
        with store.file_move(job_id):
            await in_thread_to_its_end(
                _move_file, store, job_id, JobFolder.RUNNING, home, home is JobFolder.DONE
            )
        return None
    return _assign(store, job, inst, wanted, after=after)


def _free_slot(store: StateStore, inst: InstanceRecord) -> int:
    """The lowest slot number none of the instance's running jobs holds."""
    used = {j.slot for j in running_jobs_on(store, inst.id) if j.slot is not None}
    return next(n for n in itertools.count() if n not in used)


def _gpus_taken(store: StateStore, inst: InstanceRecord) -> set[int]:
    return held_gpus(inst, store.held_on(inst.id), store.orphans_on(inst.id))


def _assign(
    store: StateStore,
    job: JobRecord,
    inst: InstanceRecord,
    gpus: list[int],
    *,
    after: JobRecord | None = None,
) -> JobRecord:
    set_job_state(store, job, J.RUNNING)
    if after is not None and after.slot is None:
        after.slot, after.slot_pos = _free_slot(store, inst), 0  # a record from before slots
    job.slot = after.slot if after is not None else _free_slot(store, inst)
    job.slot_pos = after.slot_pos + 1 if after is not None else 0
    job.after = after.id if after is not None else None
    job.after_run = after.run_id if after is not None else None
    job.staged = after is not None
    job.staged_at = None
    job.instance = inst.id
    job.gpus = gpus
    job.run_id = new_run_id()
    job.dispatched_at = time.time()
    job.pgid = None
    job.started_at = None
    job.exited_at = None
    job.kill_reason = None
    if job.progress_rows is not None:  # a new run starts counting again
        job.progress_rows = None
        job.progress_at = None
    if job.gpu_idle_since is not None or job.gpu_idle:  # ... and watching its GPUs
        job.gpu_idle_since = None
        job.gpu_idle = False
    # A run of this job left here earlier is replaced by this one's start.
    job.orphans = [o for o in job.orphans if o.instance != inst.id]
    if job.id not in inst.current_jobs:
        inst.current_jobs = [*inst.current_jobs, job.id]
    inst.idle_since = None
    return job


def mark_job_started(
    store: StateStore, job_id: str, *, run_id: str | None, pgid: int, new: bool
) -> bool:
    """The start of run `run_id` was confirmed; False when the job moved on meanwhile."""
    job = store.jobs.get(job_id)
    if job is None or job.state is not J.RUNNING or job.run_id != run_id:
        return False
    job.pgid = pgid
    job.started_at = job.started_at or time.time()
    if new:
        job.runs += 1
    store.mark_dirty()
    return True


def mark_job_staged(store: StateStore, job_id: str, *, run_id: str | None) -> bool:
    """The staging of run `run_id` was confirmed: it waits on its instance behind the
    run before it; False when the job moved on (or started) meanwhile."""
    job = store.jobs.get(job_id)
    if job is None or job.state is not J.RUNNING or job.run_id != run_id or not job.staged:
        return False
    job.staged_at = job.staged_at or time.time()
    store.mark_dirty()
    return True


def note_staged_started(
    store: StateStore, job: JobRecord, *, started_at: float | None, now: float | None = None
) -> bool:
    """A staged run was seen started on its instance (claimed by the run before it, or
    by vastd): from now it is a running job like any other; its deadline counts from
    the instance's start time where that is plausible by vastd's clock (not before the
    job was assigned, not after now), else from now: a host clock far off (unset, no
    NTP) never makes a run past its deadline at its start. True when that is news. It
    keeps its slot (`slot_chains`): the run before it may still read running, its exit
    (which started this one) falling between the status command's two reads."""
    if job.state is not J.RUNNING or not job.staged:
        return False
    now = time.time() if now is None else now
    _unstage(job)
    earliest = job.dispatched_at if job.dispatched_at is not None else now
    if started_at is not None and earliest <= started_at <= now:
        job.started_at = started_at
    else:
        job.started_at = now
    job.runs += 1
    store.mark_dirty()
    return True


def keep_staged_run(store: StateStore, job: JobRecord) -> None:
    """A withdrawal came too late (the staged run had started): it runs, not withdrawn."""
    if job.kill_reason is not None and job.kill_reason.startswith(WITHDRAWN):
        job.kill_reason = None
        store.mark_dirty()


def note_run_seen(store: StateStore, job: JobRecord, pid: int | None) -> None:
    """A status check found the run's process group (a start that broke off after it)."""
    if job.state is not J.RUNNING or pid is None:
        return
    if job.pgid is None:
        job.pgid = pid
    job.started_at = job.started_at or time.time()
    store.mark_dirty()


def note_progress(store: StateStore, job: JobRecord, rows: int, now: float | None = None) -> bool:
    """The current run's log says `rows` rows are done; True when that is news."""
    if job.state is not J.RUNNING or rows == job.progress_rows:
        return False
    job.progress_rows = rows
    job.progress_at = time.time() if now is None else now
    store.mark_dirty()
    return True


def request_kill(store: StateStore, job: JobRecord, reason: str) -> None:
    """The run must be killed (timeout): saved before the kill, carried out until it is."""
    if job.state is not J.RUNNING:
        raise IllegalTransitionError(f"job {job.id!r}: kill while {job.state.value}")
    job.kill_reason = reason
    store.mark_dirty()


def mark_job_exited(
    store: StateStore, job_id: str, *, exit_code: int | None, error: str | None
) -> JobRecord:
    """running -> collecting: the remote process ended; the instance's slot is free."""
    job = store.jobs[job_id]
    set_job_state(store, job, J.COLLECTING)
    job.exited_at = time.time()
    job.last_exit_code = exit_code
    job.last_error = error
    job.kill_reason = None
    _unstage(job)
    _release(store, job)
    return job


def mark_job_completed(
    store: StateStore,
    job_id: str,
    *,
    instance_id: str,
    run_id: str | None,
    result_files: list[str],
    previous_dir: Path | None = None,
) -> JobRecord:
    """-> done: run `run_id`'s validated results are in results/<job>/; the file to done/.

    From collecting (the normal way), or from queued/running/failed when the results of
    an earlier (orphaned) run were kept: another run of the job is stopped. The
    collected run's remote folder is removed once this is saved. For a rerun, the
    earlier run's `done/<job>.csv` joins its results in `previous_dir`. A file removed
    by hand does not undo the results.
    """
    job = store.jobs[job_id]
    if not can_job(job, J.DONE):
        raise IllegalTransitionError(f"job {job_id!r}: {job.state.value} -> done")
    _not_moving(store, job_id)
    _move_to_done(store, job_id, job.state, job.failed_stem, previous_dir)
    return _completed(store, job, instance_id, run_id, result_files)


async def complete_job(
    store: StateStore,
    job: JobRecord,
    *,
    instance_id: str,
    run_id: str | None,
    result_files: list[str],
    previous_dir: Path | None = None,
    rows_out: int | None = None,
    cost: float | None = None,
    gpu_name: str | None = None,
) -> JobRecord | None:
    """`mark_job_completed` with its file moves (each an lstat or a rename: slow while
    the machine is busy) in a worker thread, the record changed once they are done.

    `job`: the record the caller collected for; the caller holds its collection lock. A
    dispatch moving its file is waited for (None if the record was replaced or finished
    meanwhile: then nothing changed). While this moves it, every other transition that
    would move it is refused (`_not_moving`), so the file is where the record said when
    the move began. A move that fails leaves the record as it was. Cancelled meanwhile
    (shutdown), it waits for the move to end and records the completion before the
    cancellation goes on: record and file agree. `rows_out`, `cost`, `gpu_name`: the
    MANIFEST's figures, kept in the record.
    """

    def current() -> bool:
        """Still the job's record, and it may still become done."""
        return store.jobs.get(job.id) is job and can_job(job, J.DONE)

    await store.file_settled(job.id)
    if not current():
        return None  # replaced or finished while that move was waited for

    def done() -> JobRecord:
        _completed(store, job, instance_id, run_id, result_files)
        job.rows_out, job.cost, job.gpu_name = rows_out, cost, gpu_name
        return job

    moved: list[bool] = []

    def move() -> None:
        _move_to_done(store, job.id, job_was, failed_stem, previous_dir)
        moved.append(True)

    job_was, failed_stem = job.state, job.failed_stem
    with store.file_move(job.id):
        try:
            await in_thread_to_its_end(move)
        except asyncio.CancelledError:
            # The move ran to its end: if it went through, the record says so too.
            if moved and current():
                done()
            raise
    # Only transitions that move no file could happen meanwhile (running -> collecting).
    if not current():
        raise IllegalTransitionError(f"job {job.id!r}: {job.state.value} -> done")
    return done()


def _move_to_done(
    store: StateStore,
    job_id: str,
    was: JobState,
    failed_stem: str | None,
    previous_dir: Path | None,
) -> None:
    """A completion's file moves (each may raise: then the record is left as it was).

    Only file operations: it may run in a worker thread (`complete_job`).
    """
    layout = store.layout
    if previous_dir is not None:
        earlier = layout.job_file(JobFolder.DONE, job_id)
        if os.path.lexists(earlier):
            atomic_file_move(earlier, previous_dir / earlier.name)
    if was is J.FAILED:
        # It had failed for good, but an orphaned run's results came in after all.
        stem = failed_stem or job_id
        source = layout.failed / safe_name(stem, JOB_SUFFIX)
        if os.path.lexists(source):
            atomic_file_move(source, layout.job_file(JobFolder.DONE, job_id))
        (layout.failed / safe_name(stem, ERROR_SUFFIX)).unlink(missing_ok=True)
    else:
        _move_file(store, job_id, FOLDER_OF[was], JobFolder.DONE, rename_on_collision=True)


def _completed(
    store: StateStore,
    job: JobRecord,
    instance_id: str,
    run_id: str | None,
    result_files: list[str],
) -> JobRecord:
    """The record of a completion whose file moves are done."""
    if (
        job.state in HELD
        and job.instance is not None
        and (job.instance, job.run_id) != (instance_id, run_id)
    ):
        # Another run of the job (running, or exited and not yet collected) is not needed.
        add_followup(
            store, instance=job.instance, job=job.id, run=job.run_id, reason="duplicate run"
        )
    job.failed_stem = None
    # a staged run of it here never starts (its folder is cleaned up): nor do those behind
    _leave_slot(store, job, "was completed by another run")
    set_job_state(store, job, J.DONE)
    _note_success_on(store, instance_id, job)
    add_followup(store, instance=instance_id, job=job.id, run=run_id, reason="collected")
    job.result_files = list(result_files)
    job.instance = instance_id
    job.run_id = run_id
    job.finished_at = time.time()
    job.kill_reason = None
    job.last_error = None
    return job


def requeue_job(
    store: StateStore,
    job_id: str,
    *,
    reason: str,
    delay_s: float = 0.0,
    avoid: Iterable[str] = (),
    orphan: bool = False,
    lost: bool = False,
) -> JobRecord:
    """Back to the queue (not an attempt); the instance is avoided next time when possible.

    With `orphan`, a run that was started is remembered as an orphan of its instance:
    should that instance answer again, its results are kept if it finished first,
    else it is stopped. Without, a started run's folder is cleaned up. With `lost`,
    the run's folder vanished or was replaced under it: counted in `lost_runs`, and its
    instance avoided. A job whose file was removed from running/ by hand cannot run
    again: it fails instead.
    """
    job = store.jobs[job_id]
    if not can_job(job, J.QUEUED) or job.state not in HELD:
        raise IllegalTransitionError(f"job {job_id!r}: {job.state.value} -> queued")
    if not _move(store, job, JobFolder.RUNNING, JobFolder.QUEUED):
        mark_job_failed(store, job_id, reason=f"the job file was removed from running/ ({reason})")
        return job
    if lost:
        job.lost_runs += 1
        avoid = [*avoid, *([job.instance] if job.instance is not None else [])]
    withdraw_behind(store, job, "was queued again")
    # A run was started, or may have been (a start whose answer was lost).
    if job.instance is not None and (job.pgid is not None or job.run_id is not None):
        if orphan:
            if job.orphan_on(job.instance) is None:
                started = job.started_at or job.dispatched_at
                orphan_run = OrphanRun(
                    instance=job.instance, run=job.run_id, started_at=started, gpus=tuple(job.gpus)
                )
                job.orphans = [*job.orphans, orphan_run]
        else:
            _clean_up_run(store, job, reason)
    _release(store, job)
    set_job_state(store, job, J.QUEUED)
    job.instance = None
    job.pgid = None
    job.run_id = None
    job.kill_reason = None
    _unstage(job)
    job.requeued_at = time.time()
    job.not_before = job.requeued_at + delay_s if delay_s > 0 else None
    job.last_error = reason
    avoided = [i for i in dict.fromkeys(avoid) if i not in job.avoid_instances]
    if avoided:
        job.avoid_instances = [*job.avoid_instances, *avoided]
    return job


def mark_job_failed(
    store: StateStore,
    job_id: str,
    *,
    reason: str,
    exit_code: int | None = None,
    log_tail: str = "",
) -> JobRecord:
    """-> failed for good: the file goes to failed/ beside `<job>.error.json`."""
    job = store.jobs[job_id]
    if not can_job(job, J.FAILED):
        raise IllegalTransitionError(f"job {job_id!r}: {job.state.value} -> failed")
    _not_moving(store, job_id)
    folder = FOLDER_OF[job.state]
    layout = store.layout
    try:
        if os.path.lexists(layout.job_file(folder, job_id)):
            moved = move_job_to_failed(
                layout,
                job_id,
                folder,
                reason=reason,
                attempts=job.attempts,
                last_exit_code=exit_code,
                log_tail=log_tail,
            )
            job.failed_stem = moved.name.removesuffix(JOB_SUFFIX)
            job.failed_csv = True
        else:
            stem = unique_stem(layout.failed, job_id, (JOB_SUFFIX, ERROR_SUFFIX))
            write_error_json(
                layout,
                job_id,
                reason=reason,
                attempts=job.attempts,
                last_exit_code=exit_code,
                log_tail=log_tail,
                name=stem,
            )
            job.failed_stem = stem
            job.failed_csv = False
    except FileOperationError as exc:
        # The record still says why; the next start puts the file where it says.
        log.error("job_fail_record_failed", job=job_id, error=str(exc))
    _clean_up_run(store, job, f"failed: {reason}")
    _leave_slot(store, job, "failed" if reason != CANCELLED else "was cancelled")
    set_job_state(store, job, J.FAILED)
    job.last_error = reason
    job.last_exit_code = exit_code
    job.finished_at = time.time()
    job.kill_reason = None
    return job


def record_attempt_failure(
    store: StateStore,
    job_id: str,
    *,
    reason: str,
    exit_code: int | None,
    max_attempts: int,
    log_tail: str = "",
    retry_delay_s: float = 2.0,
) -> JobRecord:
    """Something observed on the instance failed this attempt: requeue it, or fail it.

    The attempt is counted in the same change that records the run's clean-up, so
    the remote folder cannot go before the count is saved.
    """
    _not_moving(store, job_id)  # refused before the attempt is counted
    job = store.jobs[job_id]
    job.attempts += 1
    job.last_exit_code = exit_code
    failed_on = job.instance
    if failed_on is not None:
        _note_failure_on(store, failed_on, job_id)
    if job.attempts < max_attempts and job.state in HELD:
        requeue_job(
            store,
            job_id,
            reason=reason,
            delay_s=retry_delay_s,
            avoid=[failed_on] if failed_on else [],
        )
        job.last_exit_code = exit_code
        return job
    return mark_job_failed(store, job_id, reason=reason, exit_code=exit_code, log_tail=log_tail)


# An instance on which this many different jobs failed one after another (nothing
# completed there in between), each of which then completed on another instance, is
# drained: a host that fails whatever it runs (its CUDA gone, its disk broken) ends its
# jobs at once, so it is always the least loaded and would take most of the queue,
# failing each job's attempts. Only a job that completed elsewhere proves its failure
# was the host's: a job whose own input is bad, or a command broken everywhere, fails
# on every instance and drains none.
FAILING_JOBS_MAX = 3
FAILED_IN_ROW_KEPT = 32  # the failures in a row an instance remembers (the newest)
FAILING_DRAIN = (
    "failing jobs: different jobs failed here one after another that completed elsewhere"
)


def _note_failure_on(store: StateStore, instance_id: str, job_id: str) -> None:
    inst = store.instances.get(instance_id)
    if inst is not None and inst.status not in GONE and job_id not in inst.failed_jobs_in_row:
        inst.failed_jobs_in_row = [*inst.failed_jobs_in_row, job_id][-FAILED_IN_ROW_KEPT:]


def _note_success_on(store: StateStore, instance_id: str, job: JobRecord) -> None:
    """Job `job` completed on `instance_id`: that instance's failures in a row end; on
    the instances the job failed on, its failure there is proven the host's."""
    inst = store.instances.get(instance_id)
    if inst is not None and (inst.failed_jobs_in_row or inst.failures_proven):
        inst.failed_jobs_in_row, inst.failures_proven = [], []
    for other_id in job.avoid_instances:
        other = store.instances.get(other_id)
        if (
            other is None
            or other_id == instance_id
            or job.id not in other.failed_jobs_in_row
            or job.id in other.failures_proven
        ):
            continue
        other.failures_proven = [*other.failures_proven, job.id]
        if len(other.failures_proven) >= FAILING_JOBS_MAX and other.status not in GONE:
            drain_instance(store, other, FAILING_DRAIN, requeue_jobs=False)


CANCELLED = "cancelled"  # the reason of a job cancelled by hand (`vastd cancel`)


def cancel_job(store: StateStore, job_id: str) -> JobRecord:
    """`vastd cancel`: an unfinished job ends in failed/ with reason `cancelled`.

    A queued job just leaves the queue. A running one's run is recorded for its stop
    (its whole process group is killed, then its folder removed, once this is saved),
    and so is every orphaned run of it: a cancelled job never completes after all.
    The caller holds the job's collection lock (no collection is half-way).
    """
    job = store.jobs.get(job_id)
    if job is None or job.state in FINISHED:
        state = job.state.value if job is not None else "unknown"
        raise IllegalTransitionError(f"job {job_id!r}: cancel while {state}")
    _not_moving(store, job_id)  # before its orphans' stops are recorded
    for orphan in job.orphans:
        add_followup(store, instance=orphan.instance, job=job_id, run=orphan.run, reason=CANCELLED)
    job.orphans = []
    return mark_job_failed(store, job_id, reason=CANCELLED, exit_code=job.last_exit_code)


def retry_job(store: StateStore, job_id: str, *, rows: int) -> JobRecord:
    """`vastd retry`: a failed job (in state.json, or in history.jsonl only) is queued again
    as a new record, its attempts from 0.

    Its CSV in failed/ is linked into queued/ (the failed/ copy stays until the record
    saying it is queued is on disk: then `clear_earlier_failure` removes it with its
    `.error.json`; a crash in between finds the file in queued/ and accepts it again).
    """
    _not_moving(store, job_id)
    old = store.jobs.get(job_id)
    entry = store.history.get(job_id) if old is None else None
    state = old.state if old is not None else (entry.state if entry is not None else None)
    if state is not J.FAILED:
        raise IllegalTransitionError(
            f"job {job_id!r}: retry while {state.value if state else 'unknown'}"
        )
    stem = (old.failed_stem if old is not None else entry.failed_stem if entry else None) or job_id
    layout = store.layout
    source = layout.failed / safe_name(stem, JOB_SUFFIX)
    target = layout.job_file(JobFolder.QUEUED, job_id)
    if not os.path.isfile(source) or os.path.islink(source):
        raise FileOperationError(f"its job file {source} is gone: submit it again")
    if os.path.lexists(target):
        raise FileOperationError(f"{target} already exists")
    try:
        os.link(source, target)
    except OSError as exc:
        raise FileOperationError(f"cannot put {source.name} back into queued/: {exc}") from exc
    store.defer_fsync(layout.queued)
    file_name = old.file_name if old is not None else target.name
    return add_job(store, job_id, file_name, rows)


def mark_job_recovered(store: StateStore, job_id: str, to: JobState) -> JobRecord:
    """The folders say the job finished (a crash came before the save): records only."""
    job = store.jobs[job_id]
    _clean_up_run(store, job, f"recovered as {to.value}")
    _leave_slot(store, job, f"was recovered as {to.value}")
    set_job_state(store, job, to)
    job.finished_at = job.finished_at or time.time()
    return job


def drop_orphan(store: StateStore, job: JobRecord, instance_id: str) -> None:
    before = len(job.orphans)
    job.orphans = [o for o in job.orphans if o.instance != instance_id]
    if len(job.orphans) != before:
        store.mark_dirty()


# --- instance transitions ----------------------------------------------------------------------
def jobs_on_instance(store: StateStore, instance_id: str) -> list[JobRecord]:
    """Jobs tied to an instance: running there, or results not yet collected (indexed)."""
    return store.held_on(instance_id)


def requeue_instance_jobs(
    store: StateStore, inst: InstanceRecord, reason: str, *, orphan: bool
) -> int:
    """Every job the instance holds goes back to the queue (not an attempt)."""
    moved = 0
    for job in jobs_on_instance(store, inst.id):
        if store.moving(job.id):
            # A completion moving its file makes it done (should its move fail, the
            # collection's retry or the stuck-job sweep requeues it then).
            continue
        try:
            requeue_job(store, job.id, reason=reason, orphan=orphan)
        except FileOperationError as exc:
            # Its file cannot move (disk, a stray file in queued/): it stays tied to the
            # instance and the stuck-job sweep tries again; the other jobs still move.
            log.error("job_requeue_failed", job=job.id, instance=inst.id, error=str(exc))
            continue
        log.info("job_requeued", job=job.id, instance=inst.id, reason=reason)
        moved += 1
    store.mark_dirty()
    return moved


def mark_instance_discovered(store: StateStore, inst: InstanceRecord) -> None:
    """Running (again) per the API, or to be re-verified after a restart."""
    set_instance_status(store, inst, S.DISCOVERED)
    inst.next_prepare_at = None
    inst.lost_reason = None


def mark_instance_preparing(store: StateStore, inst: InstanceRecord) -> None:
    set_instance_status(store, inst, S.PREPARING)


def mark_instance_ready(store: StateStore, inst: InstanceRecord, marker: str) -> bool:
    """Prepared. False (nothing changed) when it was drained or lost meanwhile."""
    if inst.status not in (S.DISCOVERED, S.PREPARING):
        return False
    set_instance_status(store, inst, S.READY)
    inst.prepared_hash = marker
    inst.prepare_error = None
    inst.prepare_failures = 0
    inst.unreachable_since = None
    if not inst.current_jobs:
        inst.idle_since = inst.idle_since or time.time()
    return True


def mark_instance_unreachable(store: StateStore, inst: InstanceRecord, error: str) -> None:
    """SSH failed: the clock of `[ssh] unreachable_grace_s` starts (jobs keep their run)."""
    if inst.status in GONE:
        return
    if inst.unreachable_since is None:
        inst.unreachable_since = time.time()
        log.warning("instance_unreachable", instance=inst.id, error=error)
    if inst.status is S.READY:
        set_instance_status(store, inst, S.UNREACHABLE)
    store.mark_dirty()


def mark_instance_reachable(store: StateStore, inst: InstanceRecord) -> bool:
    """SSH answered; True when an unreachable instance is usable again.

    One whose jobs were given up while it was silent goes through preparation again
    (DISCOVERED), whose sweep removes what their runs left before it gets a new job.
    """
    inst.last_contact = time.time()
    back = False
    if inst.unreachable_since is not None or inst.status is S.UNREACHABLE:
        inst.unreachable_since = None
        if inst.status is S.UNREACHABLE:
            back = not inst.resweep
            set_instance_status(store, inst, S.READY if back else S.DISCOVERED)
            log.info("instance_reachable", instance=inst.id, resweep=inst.resweep)
        store.mark_dirty()
    return back


def note_resweep(store: StateStore, inst: InstanceRecord, needed: bool) -> None:
    """Whether the instance's job folders must be swept before it gets a new job."""
    if inst.resweep != needed:
        inst.resweep = needed
        store.mark_dirty()


def drain_instance(
    store: StateStore, inst: InstanceRecord, reason: str, *, requeue_jobs: bool
) -> bool:
    """No new jobs. With `requeue_jobs` its jobs run elsewhere at once (not an attempt),
    as for a changed host key; without, they finish here. True when newly drained."""
    if inst.status in GONE:
        return False
    newly = inst.status is not S.DRAINING
    if newly:
        set_instance_status(store, inst, S.DRAINING)
        inst.drain_reason = reason
        log.warning("instance_drained", instance=inst.id, reason=reason)
    moved = 0
    if requeue_jobs:
        moved = requeue_instance_jobs(
            store, inst, f"instance {inst.id} drained: {reason}", orphan=False
        )
        if not newly and moved:
            log.warning("instance_drained", instance=inst.id, reason=reason, requeued=moved)
    store.mark_dirty()
    return newly


MANUAL_DRAIN = "drained by hand (vastd drain)"


def undrain_instance(
    store: StateStore, inst: InstanceRecord, *, prepare_first: bool = False
) -> bool:
    """New jobs again. With `prepare_first` (an undrain by hand of one never prepared, or
    with job folders to sweep) it is prepared, and swept, before it gets one."""
    if inst.status is not S.DRAINING:
        return False
    ready = not prepare_first
    set_instance_status(store, inst, S.READY if ready else S.DISCOVERED)
    inst.drain_reason = None
    if inst.failed_jobs_in_row or inst.failures_proven:  # a fresh count (FAILING_DRAIN)
        inst.failed_jobs_in_row, inst.failures_proven = [], []
    if ready and not inst.current_jobs:
        inst.idle_since = inst.idle_since or time.time()
    return True


def mark_instance_lost(store: StateStore, inst: InstanceRecord, reason: str) -> int:
    """Gone from vast.ai (or exited/offline): its jobs run elsewhere, not an attempt.

    A started run is kept as an orphan: "offline" may only mean the host lost
    vast.ai; should it come back, the run is kept if it finishes first, else stopped.
    Returns how many jobs were requeued.
    """
    if inst.status in GONE:
        return 0
    set_instance_status(store, inst, S.LOST)
    inst.lost_reason = reason
    moved = requeue_instance_jobs(store, inst, f"instance {inst.id} lost", orphan=True)
    log.warning("instance_lost", instance=inst.id, reason=reason, requeued=moved)
    return moved


def mark_instance_destroying(store: StateStore, inst: InstanceRecord, reason: str) -> int:
    """Teardown decided (owned instances only, checked by the caller): jobs requeued."""
    if inst.status in (S.DESTROYING, S.DESTROYED):
        return 0
    moved = requeue_instance_jobs(
        store, inst, f"instance {inst.id} torn down: {reason}", orphan=False
    )
    set_instance_status(store, inst, S.DESTROYING)
    inst.destroy_reason = reason
    inst.destroy_attempts = 0
    inst.next_destroy_at = time.time()
    return moved


def mark_instance_destroyed(store: StateStore, inst: InstanceRecord, now: float) -> None:
    set_instance_status(store, inst, S.DESTROYED)
    inst.destroyed_at = now
    inst.next_destroy_at = None
    inst.current_jobs = []
    # Nothing on it can be cleaned up or collected any more.
    for fid in [f.id for f in store.snapshot.followups.values() if f.instance == inst.id]:
        del store.snapshot.followups[fid]
    for job in orphans_on(store, inst.id):
        drop_orphan(store, job, inst.id)


# --- follow-up work ----------------------------------------------------------------------------
def add_followup(
    store: StateStore, *, instance: str, job: str, run: str | None, reason: str
) -> FollowUp:
    """Record a run's clean-up; the same (instance, job, run) is recorded once."""
    fid = f"cleanup:{instance}:{safe_name(job)}:{run or '-'}"
    existing = store.snapshot.followups.get(fid)
    if existing is not None:
        return existing
    followup = FollowUp(id=fid, instance=instance, job=job, run=run, reason=reason)
    store.snapshot.followups[fid] = followup
    store.mark_dirty()
    return followup


def followup_done(store: StateStore, fid: str) -> None:
    if store.snapshot.followups.pop(fid, None) is not None:
        store.mark_dirty()


def followup_wait(store: StateStore, fid: str, delay_s: float) -> None:
    """Not now (its instance is away): look again later, no attempt counted."""
    followup = store.snapshot.followups.get(fid)
    if followup is not None:
        followup.next_at = time.time() + delay_s
        store.mark_dirty()


def followup_failed(store: StateStore, fid: str, error: str, delay_s: float) -> None:
    followup = store.snapshot.followups.get(fid)
    if followup is None:
        return
    followup.attempts += 1
    followup.last_error = error
    followup.next_at = time.time() + delay_s
    store.mark_dirty()


# --- queries -----------------------------------------------------------------------------------
def get_available_jobs(
    store: StateStore, now: float | None = None, limit: int | None = None
) -> list[JobRecord]:
    """Queued jobs whose back-off has passed, in acceptance order (the queue's heap:
    no scan of every job; at most `limit`)."""
    return store.queued(now, limit)


def slot_chains(store: StateStore, inst: InstanceRecord) -> list[list[JobRecord]]:
    """The instance's running jobs by slot, each slot's in the order they run ([job]
    stage_ahead): the run started directly, then the runs staged behind it
    (`slot_pos`). Without staging: one job a chain.

    By slot number, not by following `after`: the status command reads a slot's runs one
    after the other, so a run can read running while the runs behind it, started by its
    exit in between (and by theirs), read started or even ended. Until it is seen ended
    too, they hold its one slot. Runs with no number (a snapshot from before numbers,
    until `number_slots`) follow their links."""
    jobs = [
        j
        for j in (store.jobs.get(job_id) for job_id in inst.current_jobs)
        if j is not None and j.state is J.RUNNING and j.instance == inst.id
    ]
    by_slot: dict[int, list[JobRecord]] = {}
    unnumbered: list[JobRecord] = []
    for job in jobs:
        if job.slot is None:
            unnumbered.append(job)
        else:
            by_slot.setdefault(job.slot, []).append(job)
    chains = [sorted(runs, key=lambda j: j.slot_pos) for runs in by_slot.values()]
    if unnumbered:
        chains.extend(_linked_chains(unnumbered))
    return chains


def _linked_chains(jobs: list[JobRecord]) -> list[list[JobRecord]]:
    """Runs with no slot number: a slot is a run and the staged runs that name it."""
    by_id = {j.id: j for j in jobs}
    behind: dict[str, JobRecord] = {}
    heads: list[JobRecord] = []
    for job in jobs:
        before = by_id.get(job.after or "")
        if job.staged and before is not None and before.run_id == job.after_run:
            behind[before.id] = job
        else:
            heads.append(job)
    chains: list[list[JobRecord]] = []
    for head in heads:
        chain = [head]
        while (nxt := behind.get(chain[-1].id)) is not None and nxt not in chain:
            chain.append(nxt)
        chains.append(chain)
    return chains


def number_slots(store: StateStore) -> int:
    """Give slot numbers to running jobs that have none (a snapshot from before them),
    one per chain of links, at start. Returns how many jobs got one."""
    numbered = 0
    for inst in store.instances.values():
        chains = slot_chains(store, inst)
        for chain in chains:
            if chain[0].slot is not None:
                continue
            free = _free_slot(store, inst)
            for pos, job in enumerate(chain):
                job.slot, job.slot_pos = free, pos
                numbered += 1
    if numbered:
        store.mark_dirty()
    return numbered


def runs_ahead(store: StateStore, inst: InstanceRecord, job: JobRecord) -> list[JobRecord]:
    """The running jobs before `job` in its slot (it starts once they have ended)."""
    for chain in slot_chains(store, inst):
        if job in chain:
            return chain[: chain.index(job)]
    return []


def slot_load(store: StateStore, inst: InstanceRecord) -> int:
    """The slots the instance's jobs take: its jobs, less the runs behind another in a
    slot (a collecting job has left its slot already)."""
    jobs = [store.jobs.get(job_id) for job_id in inst.current_jobs]
    if all(j is None or (j.slot_pos == 0 and not j.staged) for j in jobs):
        return len(inst.current_jobs)  # no staging: each its own slot
    behind = sum(len(chain) - 1 for chain in slot_chains(store, inst))
    return len(inst.current_jobs) - behind


def get_idle_instances(
    store: StateStore, jobs_per_instance: int | Callable[[InstanceRecord], int] = 1
) -> list[InstanceRecord]:
    """Ready instances with room for another job (`jobs_per_instance`: a count for every
    instance, or each instance's own: its slots with one job per GPU)."""
    per = jobs_per_instance
    return [
        i
        for i in store.instances.values()
        if i.status is S.READY and slot_load(store, i) < (per if isinstance(per, int) else per(i))
    ]


def running_jobs_on(store: StateStore, instance_id: str) -> list[JobRecord]:
    """RUNNING jobs assigned to an instance (its current_jobs: no scan of every job)."""
    inst = store.instances.get(instance_id)
    if inst is None:
        return []
    jobs = (store.jobs.get(job_id) for job_id in inst.current_jobs)
    return [j for j in jobs if j is not None and j.state is J.RUNNING and j.instance == instance_id]


def orphans_on(store: StateStore, instance_id: str) -> list[JobRecord]:
    """Jobs with an orphaned run on the instance (indexed)."""
    return store.orphans_on(instance_id)
