"""Collection: a finished run's results become a done job, or an attempt's failure.

Keyed by run id: a collection only takes a remote folder that holds the run it was
asked for. The remote folder is removed by a recorded follow-up once the snapshot
says the job is done (or the attempt is counted), never before: until then it is the
only copy that lets a restarted daemon collect the job instead of running it again.
"""

from __future__ import annotations

import time

from vastd.core import gpus
from vastd.core import state as st
from vastd.core.files_async import in_thread_to_its_end
from vastd.core.ssh import RemoteFileError, SSHConnection
from vastd.core.state import InstanceRecord, InstanceStatus, JobRecord, JobState, OrphanRun
from vastd.execution.job_runner import RemoteJobPaths, remote_job_paths
from vastd.execution.process_monitor import (
    CompletionStatus,
    RemoteJobStatus,
    detect_job_completion,
    get_process_output,
)
from vastd.execution.result_handler import CollectedResults, ResultLimits, collect_job_results
from vastd.orchestration.actions import (
    abandon_if_past_grace,
    instance_connection,
    job_cost,
    job_outcome,
    mark_reachable,
    mark_unreachable,
    record_attempt_failure,
    record_lost_run,
    requeue,
)
from vastd.orchestration.context import Context
from vastd.orchestration.sharing import share_results
from vastd.utils import metrics
from vastd.utils.config import Settings
from vastd.utils.exceptions import (
    FileOperationError,
    JobExecutionError,
    RunMismatchError,
    SSHConnectionError,
    VastdError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.coordinator")


# A job may still take an orphaned run's valid results in these states (a job that
# failed for good too: its results are worth more than its failure).
LATE_OK = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.FAILED})
# ... and keeps valid results a collection already installed in these (another run of
# it that exited meanwhile is then not needed: its folder is cleaned up, never collected).
KEEP_OK = LATE_OK | {JobState.COLLECTING}


def still_collecting(job: JobRecord, inst: InstanceRecord, run_id: str | None) -> bool:
    """Nothing moved the job on while a remote operation was awaited."""
    return job.state is JobState.COLLECTING and job.instance == inst.id and job.run_id == run_id


LOCAL_KEY = "collect:local"  # RepeatedFailures key of collections deferred for a local reason
# Collections of one run that meet a remote file error (the host's SFTP server refuses
# a result's read: an I/O error on its disk) before it counts as the attempt's failure.
REMOTE_FILE_TRIES = 3


def _file_key(job_id: str) -> str:
    return f"collect-file:{job_id}"


async def collect_job(ctx: Context, job_id: str) -> bool:
    """Collect a finished job: results, or an attempt failure. False: try again later.

    One collection of a job at a time (this, or an orphaned run's): results/<job>/ is
    only ever installed by one of them, and the record says which run it holds.
    """
    async with ctx.job_locks.hold(job_id):
        done = await _collect(ctx, job_id)
    if done:
        ctx.repeats.forget(_file_key(job_id))  # the next run's collection starts afresh
    return done


async def _collect(ctx: Context, job_id: str) -> bool:
    listed = ctx.listed.pop(job_id, None)  # its first attempt only: a retry lists afresh
    job = ctx.store.jobs.get(job_id)
    if job is None or job.state is not JobState.COLLECTING:
        return True
    inst = ctx.store.instances.get(job.instance or "")
    if inst is None or inst.status in (InstanceStatus.LOST, InstanceStatus.DESTROYED):
        requeue(ctx, job, reason="instance lost before results were collected", orphan=True)
        return True
    run_id = job.run_id
    paths = remote_job_paths(ctx.settings.remote.root, inst.id, job.id)
    try:
        conn = await instance_connection(ctx, inst)
        if job.last_error is None:
            try:
                collected = await collect_with_settings(
                    ctx,
                    conn,
                    inst,
                    job,
                    run_id,
                    started_at=job.started_at,
                    ended_at=job.exited_at,
                    listed=listed[1] if listed is not None and listed[0] == run_id else None,
                )
            except RunMismatchError as exc:
                mark_reachable(ctx, inst)
                if still_collecting(job, inst, run_id):
                    # Its folder was replaced: run it again (not the job's fault the
                    # first time; again, a failed attempt).
                    record_lost_run(ctx, job, reason=f"results lost: {exc}")
                return True
            except (JobExecutionError, RemoteFileError) as exc:
                mark_reachable(ctx, inst)
                if not still_collecting(job, inst, run_id):
                    return True
                why = "results invalid"
                if isinstance(exc, RemoteFileError):
                    # Tried again with the collection's back-off, a few times: then the
                    # run's results are lost to this host, as invalid ones are.
                    key = _file_key(job.id)
                    ctx.repeats.failed(
                        log, "collection_deferred", key, str(exc), job=job.id, instance=inst.id
                    )
                    if ctx.repeats.count(key) < REMOTE_FILE_TRIES:
                        return False
                    why = "results unreadable"
                tail = await _log_tail(conn, paths, ctx.settings.ssh.command_timeout_s)
                if still_collecting(job, inst, run_id):
                    record_attempt_failure(
                        ctx, job, reason=f"{why}: {exc}", exit_code=0, log_tail=tail
                    )
                return True
            mark_reachable(ctx, inst)
            for key in (LOCAL_KEY, f"collect:{inst.id}", _file_key(job.id)):
                ctx.repeats.recovered(
                    log, "collection_recovered", key, job=job.id, instance=inst.id
                )
            if still_collecting(job, inst, run_id):
                await complete_job(ctx, job, inst, collected, run_id)
            else:
                # Requeued while downloading (its instance was given up): these are valid
                # results of a finished run; keep them as the orphan path would.
                await keep_late_results(ctx, job, inst, collected, run_id)
            return True
        tail = await _log_tail(conn, paths, ctx.settings.ssh.command_timeout_s)
        mark_reachable(ctx, inst)
        if not still_collecting(job, inst, run_id):
            return True
    except SSHConnectionError as exc:
        # retried with back-off: logged once per change (per instance), then at debug
        ctx.repeats.failed(
            log, "collection_deferred", f"collect:{inst.id}", str(exc), job=job.id, instance=inst.id
        )
        mark_unreachable(ctx, inst, exc)
        abandon_if_past_grace(ctx, inst)
        return False
    except FileOperationError as exc:
        # a local problem (the disk at its floor, read-only): the same for every job
        ctx.repeats.failed(
            log, "collection_deferred", LOCAL_KEY, str(exc), job=job.id, instance=inst.id
        )
        return False
    record_attempt_failure(
        ctx, job, reason=job.last_error or "failed", exit_code=job.last_exit_code, log_tail=tail
    )
    return True


async def collect_with_settings(
    ctx: Context,
    conn: SSHConnection,
    inst: InstanceRecord,
    job: JobRecord,
    run_id: str | None,
    *,
    started_at: float | None = None,
    ended_at: float | None = None,
    listed: tuple[str, ...] | None = None,
) -> CollectedResults:
    """Download, validate and install run `run_id`'s results as the `[job]` settings say,
    with their MANIFEST.json (which run, where, which bytes, what it cost). `listed`: the
    folder's listing as the status that saw the run exit printed it."""
    s = ctx.settings
    paths = remote_job_paths(s.remote.root, inst.id, job.id)
    cost = job_cost(inst.dph, started_at, ended_at, gpus.slots(s.job, inst))
    manifest = {
        "instance": inst.id,
        "machine": inst.machine_id,
        "gpu": inst.gpu_name,
        "gpus": run_gpus(job, inst.id, run_id),
        "attempt": job.attempts + 1,
        "rows_in": job.rows,
        "started_at": started_at,
        "ended_at": ended_at,
        "cost": cost,
    }
    return await collect_job_results(
        conn,
        paths,
        job.id,
        results_root=ctx.layout.results,
        pattern=s.job.result_glob,
        min_results=s.job.min_results,
        validate=s.job.validate_,
        max_bytes=s.job.max_result_bytes,
        limits=result_limits(s),
        row_key=s.job.row_key,
        rows_expected=job.rows or None,  # 0: a record from before rows were counted
        validate_command=s.job.validate_command,
        validate_memory_mb=s.job.validate_memory_mb,
        validate_timeout_s=s.job.validate_timeout_s,
        # Keepalive notices a dead peer; this only bounds a live but crawling transfer.
        timeout_s=max(s.ssh.command_timeout_s, 600.0, s.job.max_result_bytes / 1e6),
        run_id=run_id,
        keep_previous=job.keep_previous,
        manifest=manifest,
        listed=listed,
    )


def run_gpus(job: JobRecord, instance_id: str, run_id: str | None) -> list[int]:
    """The GPU indices run `run_id` was given (an orphaned run keeps its own)."""
    for orphan in job.orphans:
        if orphan.instance == instance_id and orphan.run == run_id:
            return list(orphan.gpus)
    return list(job.gpus)


def result_limits(s: Settings) -> ResultLimits:
    """The caps of `[job]` and `[paths]` that bound what one job's results may take."""
    return ResultLimits(
        max_file_bytes=s.job.max_result_bytes,
        max_total_bytes=s.job.max_results_total_bytes,
        max_files=s.job.max_result_files,
        min_free_bytes=int(s.paths.min_free_disk_gb * 1e9),
    )


async def complete_job(
    ctx: Context,
    job: JobRecord,
    inst: InstanceRecord,
    collected: CollectedResults,
    run_id: str | None,
) -> None:
    """Validated results are in results/<job>/: the job is done, its file in done/ (moved
    off the event loop; the caller holds the job's collection lock)."""
    if ctx.settings.paths.group:
        # Before the record says done (a shutdown then never leaves them unshared).
        await in_thread_to_its_end(
            share_results, ctx.layout.results_dir(job.id), ctx.settings.paths.group
        )
    done = await st.complete_job(
        ctx.store,
        job,
        instance_id=inst.id,
        run_id=run_id,
        result_files=[p.name for p in collected.files],
        previous_dir=collected.previous,
        # The MANIFEST's figures in the record too: `vastd report` reads no file per job.
        rows_out=collected.rows,
        cost=collected.cost,
        gpu_name=inst.gpu_name,
    )
    if done is None:
        # Late results only (a collecting job is never replaced): the record was replaced
        # (retried, resubmitted) while a dispatch's move of its file was waited for.
        st.add_followup(ctx.store, instance=inst.id, job=job.id, run=run_id, reason="superseded")
        log.info("orphan_run_dropped", job=job.id, instance=inst.id, reason="superseded")
        return
    metrics.observe_job_duration(done.dispatched_at, done.finished_at)
    log.info(
        "results_collected",
        job=job.id,
        instance=inst.id,
        files=len(collected.files),
        rows=collected.rows,
        run=run_id,
    )
    log.info("job_done", job=job.id, instance=inst.id, run=run_id, **job_outcome(ctx, job, inst.id))
    ctx.wake_dispatch()


async def keep_late_results(
    ctx: Context,
    job: JobRecord,
    inst: InstanceRecord,
    collected: CollectedResults,
    run_id: str | None,
) -> None:
    """Results of a finished run arrived after its job was requeued: keep them, stop a rerun."""
    if job.state not in KEEP_OK:
        # Done by another path meanwhile: these results are not used.
        st.add_followup(ctx.store, instance=inst.id, job=job.id, run=run_id, reason="superseded")
        return
    log.info(
        "orphan_run_kept",
        job=job.id,
        instance=inst.id,
        second_run=job.instance if job.state is JobState.RUNNING else None,
        was=job.state.value,
    )
    # From RUNNING, the transition records the second run's stop with the change.
    await complete_job(ctx, job, inst, collected, run_id)
    st.drop_orphan(ctx.store, job, inst.id)


async def handle_orphan_status(
    ctx: Context, inst: InstanceRecord, job: JobRecord, status: RemoteJobStatus
) -> None:
    """An earlier run, given up while its instance was silent, is visible again."""
    orphan = job.orphan_on(inst.id)
    if orphan is None:
        return
    if orphan.run is not None and status.exists and status.run != orphan.run:
        # The folder now holds another run of this job: the orphan is gone.
        st.drop_orphan(ctx.store, job, inst.id)
        return
    outcome = detect_job_completion(status)
    if outcome is CompletionStatus.RUNNING and job.state is not JobState.DONE:
        deadline = (orphan.started_at or time.time()) + ctx.settings.job.timeout_s
        if time.time() <= deadline:
            return  # it may still finish first
        _drop_orphan_run(ctx, job, inst, orphan, "orphaned run past its deadline")
        return
    if outcome is CompletionStatus.SUCCEEDED and job.state is not JobState.DONE:
        if job.state not in LATE_OK or ctx.job_locks.locked(job.id):
            return  # collecting (here or elsewhere): looked at again next cycle
        async with ctx.job_locks.hold(job.id):
            if job.orphan_on(inst.id) is None or job.state not in LATE_OK:
                return  # settled meanwhile; a collecting job: looked at again next cycle
            conn = await instance_connection(ctx, inst)
            try:
                collected = await collect_with_settings(
                    ctx, conn, inst, job, orphan.run, started_at=orphan.started_at
                )
            except (JobExecutionError, RemoteFileError) as exc:
                log.info("orphan_results_invalid", job=job.id, instance=inst.id, error=str(exc))
            else:
                await keep_late_results(ctx, job, inst, collected, orphan.run)
                return
    # Finished elsewhere (a duplicate, still running or not), or no usable results:
    # its stop and clean-up are recorded, and carried out once saved.
    _drop_orphan_run(ctx, job, inst, orphan, "orphaned run not needed")


def _drop_orphan_run(
    ctx: Context, job: JobRecord, inst: InstanceRecord, orphan: OrphanRun, reason: str
) -> None:
    st.drop_orphan(ctx.store, job, inst.id)
    st.add_followup(ctx.store, instance=inst.id, job=job.id, run=orphan.run, reason=reason)
    log.info("orphan_run_dropped", job=job.id, instance=inst.id, reason=reason)


async def _log_tail(conn: SSHConnection, paths: RemoteJobPaths, timeout_s: float) -> str:
    try:
        return await get_process_output(conn, paths, tail_lines=50, timeout_s=timeout_s)
    except VastdError:
        return ""
