"""High-level coordination: jobs meet instances, exits become collections.

Every function here takes the Context and does one step; the loops in
workflow.py call them. State changes go through the store (saved before any
remote side effect that a crash must not lose), files move atomically with them.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

from vastd.core import state as st
from vastd.core.files import JobFolder, move_job_file, move_job_to_failed, write_error_json
from vastd.core.jobs import get_job_arguments
from vastd.core.ssh import SSHConnection
from vastd.core.state import InstanceRecord, InstanceStatus, JobRecord, JobState
from vastd.execution.job_runner import (
    RemoteJobPaths,
    execute_job_on_instance,
    remote_job_paths,
)
from vastd.execution.process_monitor import (
    CompletionStatus,
    RemoteJobStatus,
    detect_job_completion,
    get_process_output,
    handle_job_timeout,
    kill_job,
    monitor_job_execution,
)
from vastd.execution.result_handler import (
    CollectedResults,
    cleanup_remote_job,
    collect_job_results,
)
from vastd.orchestration.context import Context
from vastd.orchestration.scheduler import schedule_result_collection
from vastd.utils.exceptions import (
    FileOperationError,
    HostKeyMismatchError,
    JobExecutionError,
    SSHConnectionError,
    VastdError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.coordinator")
RETRY_DELAY_S = 2.0
USABLE = (InstanceStatus.READY,)


# --- placing jobs ------------------------------------------------------------------------------
def find_best_instance_for_job(ctx: Context, job: JobRecord) -> InstanceRecord | None:
    """A ready instance with room: one the job has not failed on, least loaded first."""
    room = st.get_idle_instances(ctx.store, ctx.settings.job.jobs_per_instance)
    if not room:
        return None
    fresh = [i for i in room if i.id not in job.avoid_instances]
    pool = fresh or room
    return min(pool, key=lambda i: (len(i.current_jobs), i.idle_since or 0.0, i.id))


async def assign_job_to_instance(ctx: Context, job: JobRecord, inst: InstanceRecord) -> bool:
    """Move the file to running/ and record the assignment (not yet saved).

    False (file moved back) when the instance was lost or drained during the move.
    """
    # The move fsyncs a folder: keep that off the event loop.
    await asyncio.to_thread(move_job_file, ctx.layout, job.id, JobFolder.QUEUED, JobFolder.RUNNING)
    if inst.status is not InstanceStatus.READY:
        await asyncio.to_thread(
            move_job_file, ctx.layout, job.id, JobFolder.RUNNING, JobFolder.QUEUED
        )
        return False
    st.mark_job_assigned(ctx.store, job.id, inst.id)
    if inst.id in job.orphans:
        # Same attempt, same folder: the idempotent start reattaches to that run.
        job.orphans.remove(inst.id)
    log.info("job_dispatched", job=job.id, instance=inst.id, attempt=job.attempts + 1)
    return True


def fail_without_file(ctx: Context, job: JobRecord, reason: str) -> None:
    """Someone removed the job's CSV: it can never run; say so instead of retrying for ever."""
    try:
        write_error_json(ctx.layout, job.id, reason=reason, attempts=job.attempts)
    except FileOperationError as exc:
        log.error("job_fail_record_failed", job=job.id, error=str(exc))
    job.last_error = reason
    st.mark_job_completed(ctx.store, job.id, success=False)
    log.warning("job_failed", job=job.id, attempts=job.attempts, reason=reason)


def balance_workload_across_instances(ctx: Context) -> dict[str, int]:
    """Jobs per usable instance (what dispatch balances on)."""
    return {i.id: len(i.current_jobs) for i in ctx.store.instances.values() if i.status in USABLE}


async def coordinate_job_distribution(ctx: Context) -> int:
    """Give every waiting job a free instance; save; then start them. Returns the count."""
    assigned: list[tuple[JobRecord, InstanceRecord]] = []
    for job in st.get_available_jobs(ctx.store):
        inst = find_best_instance_for_job(ctx, job)
        if inst is None:
            break
        if job.state is not JobState.QUEUED:
            continue  # changed while an earlier move was awaited
        # Claimed before any await: the instance's watcher must leave it alone.
        ctx.dispatching.add(job.id)
        try:
            if not await assign_job_to_instance(ctx, job, inst):
                ctx.dispatching.discard(job.id)  # lost during the move: next round
                continue
        except FileOperationError as exc:
            ctx.dispatching.discard(job.id)
            if not ctx.layout.job_file(JobFolder.QUEUED, job.id).exists():
                fail_without_file(ctx, job, "the job file vanished from queued/")
            else:
                log.warning("job_file_move_failed", job=job.id, error=str(exc))
            continue
        assigned.append((job, inst))
    if not assigned:
        return 0
    # The assignment is on disk before anything is uploaded: a crash now finds it.
    await ctx.store.flush()
    for job, inst in assigned:
        ctx.spawn(dispatch_job(ctx, job.id, inst.id), name=f"dispatch:{job.id}")
    return len(assigned)


async def instance_connection(ctx: Context, inst: InstanceRecord) -> SSHConnection:
    conn = await ctx.pool.get(inst.id, ctx.endpoints(inst))
    inst.last_contact = time.time()
    return conn


async def dispatch_job(ctx: Context, job_id: str, instance_id: str) -> None:
    """Upload the CSV and start the job (idempotent for the same attempt)."""
    try:
        job = ctx.store.jobs[job_id]
        inst = ctx.store.instances[instance_id]
        s = ctx.settings
        job_file = ctx.layout.job_file(JobFolder.RUNNING, job.id)
        try:
            conn = await instance_connection(ctx, inst)
            proc = await execute_job_on_instance(
                conn,
                remote_root=s.remote.root,
                instance_id=inst.id,
                job_id=job.id,
                local_csv=job_file,
                command_template=s.job.command,
                vars=get_job_arguments(job.id, s.job),
                attempt=job.attempts + 1,
                # the upload is part of it: allow 1 MB/s on top of a command's deadline
                timeout_s=s.ssh.command_timeout_s + _size(job_file) / 1e6,
            )
        except SSHConnectionError as exc:
            # Unreachable is not failed: the start may or may not have happened, so
            # keep the assignment; the watcher re-runs the idempotent start.
            log.warning(
                "job_dispatch_interrupted", job=job_id, instance=instance_id, error=str(exc)
            )
            mark_unreachable(ctx, inst, exc)
            return
        except (VastdError, ValueError, OSError) as exc:
            if job.state is not JobState.RUNNING or job.instance != instance_id:
                return  # requeued or finished meanwhile: this start no longer matters
            # Observed on the instance (refused upload, start script error), a bad
            # template or an unreadable local file: an attempt, so a job never stays
            # "running" with nothing behind it.
            await record_attempt_failure(ctx, job, reason=f"could not start: {exc}", exit_code=None)
            return
        if job.state is not JobState.RUNNING or job.instance != instance_id:
            return
        job.pgid = proc.pid
        job.started_at = job.started_at or time.time()
        if proc.started:
            job.runs += 1
        ctx.store.mark_dirty()
        log.info("job_started", job=job.id, instance=inst.id, pgid=proc.pid, new=proc.started)
        ensure_watcher(ctx, inst.id)
    finally:
        ctx.dispatching.discard(job_id)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- watching ---------------------------------------------------------------------------------
def running_jobs_on(ctx: Context, instance_id: str) -> list[JobRecord]:
    """RUNNING jobs assigned to an instance (its current_jobs: no scan of every job)."""
    inst = ctx.store.instances.get(instance_id)
    if inst is None:
        return []
    jobs = (ctx.store.jobs.get(job_id) for job_id in inst.current_jobs)
    return [
        j
        for j in jobs
        if j is not None and j.state is JobState.RUNNING and j.instance == instance_id
    ]


def ensure_watcher(ctx: Context, instance_id: str) -> None:
    task = ctx.watchers.get(instance_id)
    if task is None or task.done():
        ctx.watchers[instance_id] = asyncio.create_task(
            watch_instance(ctx, instance_id), name=f"watch:{instance_id}"
        )


def mark_unreachable(ctx: Context, inst: InstanceRecord, exc: SSHConnectionError) -> None:
    """SSH failed. A changed host key is not a blip: the instance is drained for good."""
    if isinstance(exc, HostKeyMismatchError):
        drain_instance(ctx, inst, str(exc))
        return
    error = str(exc)
    if inst.unreachable_since is None:
        inst.unreachable_since = time.time()
        log.warning("instance_unreachable", instance=inst.id, error=error)
    if inst.status is InstanceStatus.READY:
        inst.status = InstanceStatus.UNREACHABLE
    ctx.store.mark_dirty()


def drain_instance(ctx: Context, inst: InstanceRecord, reason: str) -> None:
    """No new jobs; its jobs run elsewhere (not an attempt). Used for a changed host key."""
    if inst.status is InstanceStatus.DRAINING:
        return
    inst.status = InstanceStatus.DRAINING
    inst.prepare_error = reason
    for job in list(ctx.store.jobs.values()):
        if job.instance == inst.id and job.state in (JobState.RUNNING, JobState.COLLECTING):
            requeue(ctx, job, reason=f"instance {inst.id} drained: {reason}", count_attempt=False)
    ctx.store.mark_dirty()
    log.warning("instance_drained", instance=inst.id, reason=reason)


def mark_reachable(ctx: Context, inst: InstanceRecord) -> None:
    inst.last_contact = time.time()
    if inst.unreachable_since is not None or inst.status is InstanceStatus.UNREACHABLE:
        inst.unreachable_since = None
        if inst.status is InstanceStatus.UNREACHABLE:
            inst.status = InstanceStatus.READY
            log.info("instance_reachable", instance=inst.id)
            ctx.wake_dispatch()
        ctx.store.mark_dirty()


def orphans_on(ctx: Context, instance_id: str) -> list[JobRecord]:
    return [j for j in ctx.store.jobs.values() if instance_id in j.orphans]


def abandon_if_past_grace(ctx: Context, inst: InstanceRecord) -> int:
    """Jobs on an instance silent past the grace run elsewhere; the old run becomes an orphan.

    Not an attempt. If the orphan later turns out to have succeeded, its results are
    kept and the second run is stopped (see handle_orphan_status).
    """
    since = inst.unreachable_since
    if since is None or time.time() - since < ctx.settings.ssh.unreachable_grace_s:
        return 0
    moved = 0
    for job in list(ctx.store.jobs.values()):
        if job.instance != inst.id or job.state not in (JobState.RUNNING, JobState.COLLECTING):
            continue
        if inst.id not in job.orphans:
            job.orphans.append(inst.id)
        log.warning("job_requeued", job=job.id, instance=inst.id, reason="instance unreachable")
        requeue(ctx, job, reason=f"instance {inst.id} unreachable", count_attempt=False)
        moved += 1
    return moved


async def watch_instance(ctx: Context, instance_id: str) -> None:
    """One status round trip per cycle for all of an instance's jobs (and orphaned runs)."""
    failures = 0
    while True:
        inst = ctx.store.instances.get(instance_id)
        if inst is None or inst.status in (InstanceStatus.LOST, InstanceStatus.DESTROYED):
            return
        running = running_jobs_on(ctx, instance_id)
        jobs = [j for j in running if j.id not in ctx.dispatching]
        job_ids = {j.id for j in jobs}
        orphans = [j for j in orphans_on(ctx, instance_id) if j.id not in job_ids]
        if not jobs and not orphans:
            if not running:
                return
            await asyncio.sleep(0.05)  # a dispatch to this instance is under way
            continue
        try:
            statuses = await check_instance_jobs(ctx, inst, jobs + orphans)
        except SSHConnectionError as exc:
            failures += 1
            mark_unreachable(ctx, inst, exc)
            abandon_if_past_grace(ctx, inst)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
            continue
        failures = 0
        mark_reachable(ctx, inst)
        for job in jobs + orphans:
            status = statuses.get(job.id)
            if status is None:
                continue
            try:
                if job.id not in job_ids:
                    await handle_orphan_status(ctx, inst, job, status)
                else:
                    await handle_job_status(ctx, inst, job, status)
            except VastdError as exc:
                # Unreachable or odd answers: looked at again next cycle.
                log.warning("job_status_unhandled", job=job.id, instance=inst.id, error=str(exc))


async def check_instance_jobs(
    ctx: Context, inst: InstanceRecord, jobs: list[JobRecord]
) -> dict[str, RemoteJobStatus]:
    conn = await instance_connection(ctx, inst)
    entries = [(j.id, remote_job_paths(ctx.settings.remote.root, inst.id, j.id)) for j in jobs]
    now = time.time()
    # Do not sleep past a job's deadline.
    deadlines = [
        (j.started_at or now) + ctx.settings.job.timeout_s - now for j in jobs if j.started_at
    ]
    wait_s = max(0.0, min([ctx.watch_wait_s, *deadlines]))
    return await monitor_job_execution(
        conn, entries, wait_s=wait_s, timeout_s=wait_s + ctx.settings.ssh.command_timeout_s
    )


async def handle_job_status(
    ctx: Context, inst: InstanceRecord, job: JobRecord, status: RemoteJobStatus
) -> None:
    if job.state is not JobState.RUNNING or job.instance != inst.id or job.id in ctx.dispatching:
        return  # it changed while the status command ran
    outcome = detect_job_completion(status)
    now = time.time()
    never_started = job.pgid is None and status.pid is None and status.exit_code is None
    if outcome is CompletionStatus.MISSING or (
        never_started and outcome is CompletionStatus.VANISHED
    ):
        if job.pgid is None:
            # A dispatch that broke off before the start (no folder yet, or a folder
            # with the input but no pid): start it again, same attempt (idempotent).
            ctx.dispatching.add(job.id)
            ctx.spawn(dispatch_job(ctx, job.id, inst.id), name=f"dispatch:{job.id}")
        else:
            # The folder vanished under a started job (instance reset): not its fault.
            log.warning("job_folder_vanished", job=job.id, instance=inst.id)
            requeue(ctx, job, reason="remote job folder vanished", count_attempt=False)
        return
    if job.pgid is None and status.pid is not None:
        job.pgid = status.pid
        ctx.store.mark_dirty()
    if status.started_at and not job.started_at:
        job.started_at = status.started_at
        ctx.store.mark_dirty()
    if outcome is CompletionStatus.RUNNING:
        started = job.started_at or job.dispatched_at or now
        if now - started > ctx.settings.job.timeout_s:
            conn = await instance_connection(ctx, inst)
            paths = remote_job_paths(ctx.settings.remote.root, inst.id, job.id)
            await handle_job_timeout(conn, paths, timeout_s=ctx.settings.ssh.command_timeout_s)
            log.warning("job_timed_out", job=job.id, instance=inst.id)
            finish_run(ctx, job, exit_code=124, error="timed out")
        return
    if outcome is CompletionStatus.SUCCEEDED:
        finish_run(ctx, job, exit_code=0, error=None)
    elif outcome is CompletionStatus.FAILED:
        finish_run(ctx, job, exit_code=status.exit_code, error=f"exit code {status.exit_code}")
    elif outcome is CompletionStatus.INVALID:
        finish_run(ctx, job, exit_code=None, error="exit_code file holds garbage")
    elif outcome is CompletionStatus.VANISHED:
        finish_run(ctx, job, exit_code=None, error="process gone without an exit code")


def finish_run(ctx: Context, job: JobRecord, *, exit_code: int | None, error: str | None) -> None:
    """The remote process ended: free the instance's slot and collect."""
    job.state = JobState.COLLECTING
    job.exited_at = time.time()
    job.last_exit_code = exit_code
    job.last_error = error
    st.release_job(ctx.store, job.id)  # the GPU is free; job.instance still says where
    log.info("job_exited", job=job.id, instance=job.instance, exit_code=exit_code, error=error)
    schedule_result_collection(ctx.scheduler, job.id)
    ctx.wake_dispatch()


# --- collecting -------------------------------------------------------------------------------
async def collect_job(ctx: Context, job_id: str) -> bool:
    """Collect a finished job: results, or an attempt failure. False: try again later."""
    job = ctx.store.jobs.get(job_id)
    if job is None or job.state is not JobState.COLLECTING:
        return True
    inst = ctx.store.instances.get(job.instance or "")
    if inst is None or inst.status in (InstanceStatus.LOST, InstanceStatus.DESTROYED):
        requeue(ctx, job, reason="instance lost before results were collected", count_attempt=False)
        return True
    s = ctx.settings
    paths = remote_job_paths(s.remote.root, inst.id, job.id)
    try:
        conn = await instance_connection(ctx, inst)
        if job.last_error is None:
            try:
                collected = await collect_with_settings(ctx, conn, paths, job.id)
            except JobExecutionError as exc:
                mark_reachable(ctx, inst)
                if not still_collecting(job, inst):
                    return True
                tail = await _log_tail(conn, paths, s.ssh.command_timeout_s)
                await cleanup_best_effort(ctx, conn, paths)
                await record_attempt_failure(
                    ctx, job, reason=f"results invalid: {exc}", exit_code=0, log_tail=tail
                )
                return True
            mark_reachable(ctx, inst)
            if not still_collecting(job, inst):
                # Requeued while downloading (its instance was given up): these are valid
                # results of a finished run; keep them as the orphan path would.
                keep_late_results(ctx, job, inst, collected)
            else:
                complete_job(ctx, job, inst, collected, JobFolder.RUNNING)
            ctx.spawn(cleanup_after_save(ctx, conn, paths), name=f"cleanup:{job.id}")
            return True
        tail = await _log_tail(conn, paths, s.ssh.command_timeout_s)
        mark_reachable(ctx, inst)
        if not still_collecting(job, inst):
            return True
        await cleanup_best_effort(ctx, conn, paths)
    except (SSHConnectionError, FileOperationError) as exc:
        log.warning("collection_deferred", job=job.id, instance=inst.id, error=str(exc))
        if isinstance(exc, SSHConnectionError):
            mark_unreachable(ctx, inst, exc)
            if abandon_if_past_grace(ctx, inst):
                ensure_watcher(ctx, inst.id)  # it keeps looking for the orphaned run
        return False
    await record_attempt_failure(
        ctx, job, reason=job.last_error or "failed", exit_code=job.last_exit_code, log_tail=tail
    )
    return True


def still_collecting(job: JobRecord, inst: InstanceRecord) -> bool:
    """Nothing moved the job on while a remote operation was awaited."""
    return job.state is JobState.COLLECTING and job.instance == inst.id


def keep_late_results(
    ctx: Context, job: JobRecord, inst: InstanceRecord, collected: CollectedResults
) -> None:
    """Results of a finished run arrived after its job was requeued: keep them, stop a rerun."""
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        return  # already done or failed by another path
    second = ctx.store.instances.get(job.instance or "") if job.state is JobState.RUNNING else None
    folder = JobFolder.RUNNING if job.state is JobState.RUNNING else JobFolder.QUEUED
    log.info("orphan_run_kept", job=job.id, instance=inst.id, second_run=job.instance)
    if inst.id in job.orphans:
        job.orphans.remove(inst.id)
    complete_job(ctx, job, inst, collected, folder)
    if second is not None:
        ctx.spawn(stop_duplicate_run(ctx, second, job.id), name=f"stop:{job.id}")


async def cleanup_best_effort(ctx: Context, conn: SSHConnection, paths: RemoteJobPaths) -> None:
    """Remove a failed run's folder; a refusal (busy mount, read-only) must not block the job."""
    try:
        await cleanup_remote_job(conn, paths, timeout_s=ctx.settings.ssh.command_timeout_s)
    except JobExecutionError as exc:
        log.warning("remote_cleanup_failed", path=paths.job_dir, error=str(exc))


async def collect_with_settings(
    ctx: Context, conn: SSHConnection, paths: RemoteJobPaths, job_id: str
) -> CollectedResults:
    """Download, validate and install a run's results as the `[job]` settings say."""
    s = ctx.settings
    return await collect_job_results(
        conn,
        paths,
        job_id,
        results_root=ctx.layout.results,
        pattern=s.job.result_glob,
        min_results=s.job.min_results,
        validate=s.job.validate_,
        max_bytes=s.job.max_result_bytes,
        # Keepalive notices a dead peer; this only bounds a live but crawling transfer.
        timeout_s=max(s.ssh.command_timeout_s, 600.0, s.job.max_result_bytes / 1e6),
    )


def complete_job(
    ctx: Context,
    job: JobRecord,
    inst: InstanceRecord,
    collected: CollectedResults,
    from_folder: JobFolder,
) -> None:
    """Validated results are in results/<job>/: the job is done, its file in done/."""
    move_job_file(ctx.layout, job.id, from_folder, JobFolder.DONE, rename_on_collision=True)
    job.result_files = [p.name for p in collected.files]
    job.instance = job.instance or inst.id
    st.mark_job_completed(ctx.store, job.id, success=True)
    log.info(
        "results_collected",
        job=job.id,
        instance=inst.id,
        files=len(collected.files),
        rows=collected.rows,
    )
    log.info("job_done", job=job.id, instance=inst.id, runs=job.runs)


async def cleanup_after_save(ctx: Context, conn: SSHConnection, paths: RemoteJobPaths) -> None:
    """Remove a finished job's remote folder once the snapshot says it is done.

    Until then the remote folder is the only copy that lets a restarted daemon
    collect the job again instead of running it again.
    """
    await ctx.store.wait_saved()
    try:
        await cleanup_remote_job(conn, paths, timeout_s=ctx.settings.ssh.command_timeout_s)
    except VastdError as exc:
        log.info("remote_cleanup_failed", path=paths.job_dir, error=str(exc))


async def handle_orphan_status(
    ctx: Context, inst: InstanceRecord, job: JobRecord, status: RemoteJobStatus
) -> None:
    """An earlier run, given up while its instance was silent, is visible again."""
    outcome = detect_job_completion(status)
    if outcome is CompletionStatus.RUNNING and job.state not in (JobState.DONE, JobState.FAILED):
        return  # it may still finish first
    s = ctx.settings
    paths = remote_job_paths(s.remote.root, inst.id, job.id)
    conn = await instance_connection(ctx, inst)
    if outcome is CompletionStatus.SUCCEEDED and job.state in (JobState.QUEUED, JobState.RUNNING):
        try:
            collected = await collect_with_settings(ctx, conn, paths, job.id)
        except JobExecutionError as exc:
            log.info("orphan_results_invalid", job=job.id, instance=inst.id, error=str(exc))
        else:
            keep_late_results(ctx, job, inst, collected)
            ctx.spawn(cleanup_after_save(ctx, conn, paths), name=f"cleanup:{job.id}")
            return
    elif outcome is CompletionStatus.RUNNING:
        # The job finished elsewhere: this run is a duplicate.
        await kill_job(conn, paths, timeout_s=s.ssh.command_timeout_s)
    if inst.id in job.orphans:
        job.orphans.remove(inst.id)
    ctx.store.mark_dirty()
    ctx.spawn(cleanup_after_save(ctx, conn, paths), name=f"cleanup:{job.id}")


async def stop_duplicate_run(ctx: Context, inst: InstanceRecord, job_id: str) -> None:
    """Kill the second run of a job whose first run's results were kept."""
    paths = remote_job_paths(ctx.settings.remote.root, inst.id, job_id)
    try:
        conn = await instance_connection(ctx, inst)
        await kill_job(conn, paths, timeout_s=ctx.settings.ssh.command_timeout_s)
        await cleanup_after_save(ctx, conn, paths)
        log.info("duplicate_run_stopped", job=job_id, instance=inst.id)
    except VastdError as exc:
        log.warning("duplicate_run_stop_failed", job=job_id, instance=inst.id, error=str(exc))


async def _log_tail(conn: SSHConnection, paths: RemoteJobPaths, timeout_s: float) -> str:
    try:
        return await get_process_output(conn, paths, tail_lines=50, timeout_s=timeout_s)
    except VastdError:
        return ""


async def record_attempt_failure(
    ctx: Context,
    job: JobRecord,
    *,
    reason: str,
    exit_code: int | None,
    log_tail: str = "",
) -> None:
    """Something observed on the instance failed this attempt: retry or give up."""
    job.attempts += 1
    job.last_error = reason
    job.last_exit_code = exit_code
    failed_on = job.instance
    if job.attempts < ctx.settings.job.max_attempts:
        log.info("job_retry", job=job.id, instance=failed_on, attempts=job.attempts, reason=reason)
        requeue(ctx, job, reason=reason, count_attempt=False, avoid=failed_on)
        return
    try:
        move_job_to_failed(
            ctx.layout,
            job.id,
            JobFolder.RUNNING,
            reason=reason,
            attempts=job.attempts,
            last_exit_code=exit_code,
            log_tail=log_tail,
        )
    except FileOperationError as exc:
        log.error("job_fail_record_failed", job=job.id, error=str(exc))
    st.mark_job_completed(ctx.store, job.id, success=False)
    log.warning("job_failed", job=job.id, instance=failed_on, attempts=job.attempts, reason=reason)


def requeue(
    ctx: Context,
    job: JobRecord,
    *,
    reason: str,
    count_attempt: bool,
    avoid: str | None = None,
) -> None:
    """Put a job back in the queue (file and record), never counting unreachability."""
    if count_attempt:
        job.attempts += 1
    try:
        move_job_file(ctx.layout, job.id, JobFolder.RUNNING, JobFolder.QUEUED)
    except FileOperationError as exc:
        log.error("job_requeue_move_failed", job=job.id, error=str(exc))
    delay = RETRY_DELAY_S if avoid else 0.0
    st.requeue_job(ctx.store, job.id, delay_s=delay, avoid=[avoid] if avoid else [])
    job.last_error = reason
    ctx.wake_dispatch()


def detect_stuck_jobs(ctx: Context, now: float | None = None) -> list[str]:
    """Running jobs that nobody is watching or that are past their deadline."""
    now = time.time() if now is None else now
    stuck = []
    for job in ctx.store.jobs.values():
        if job.state is not JobState.RUNNING:
            continue
        watcher = ctx.watchers.get(job.instance or "")
        deadline = (job.started_at or job.dispatched_at or now) + ctx.settings.job.timeout_s
        if (
            (watcher is None or watcher.done()) and job.id not in ctx.dispatching
        ) or now > deadline + 60:
            stuck.append(job.id)
    return stuck


GONE = (InstanceStatus.LOST, InstanceStatus.DESTROYING, InstanceStatus.DESTROYED)


def handle_system_failures(ctx: Context) -> int:
    """Watch again what nobody watches; requeue jobs left on instances that are gone.

    Returns how many instances were revived or given up.
    """
    touched = set()
    for job_id in detect_stuck_jobs(ctx):
        job = ctx.store.jobs[job_id]
        inst = ctx.store.instances.get(job.instance or "")
        if inst is None or inst.status in GONE:
            requeue(ctx, job, reason="its instance is gone", count_attempt=False)
        else:
            ensure_watcher(ctx, inst.id)
        touched.add(job.instance)
    return len(touched)


def retry_delay(attempt: int) -> timedelta:
    return timedelta(seconds=min(60.0, 2.0 * 2**attempt))
