"""Start-up recovery: the snapshot and the folders agree before anything is scheduled.

Runs before any loop (the predecessor did it after). Each disagreement a crash can
leave is settled through the transitions of core/state.py: a finished record whose
file did not move, a file without a record (adopted, never lost), a record whose
file already moved. Instances are re-verified (their marker decides whether the
steps run again); collections resume; follow-up work resumes from the snapshot.
"""

from __future__ import annotations

from pathlib import Path

from vastd.core import state as st
from vastd.core.files import (
    JOB_SUFFIX,
    JobFolder,
    move_job_file,
    move_job_to_failed,
    not_utf8_reason,
    safe_name,
    shown_name,
)
from vastd.core.jobs import duplicate_reason, job_id_for, refusal_left
from vastd.core.state import InstanceStatus, JobRecord, JobState
from vastd.execution.result_handler import restore_kept
from vastd.orchestration.actions import requeue
from vastd.orchestration.context import Context
from vastd.orchestration.scheduler import schedule_result_collection
from vastd.utils.exceptions import FileOperationError
from vastd.utils.logging import get_logger
from vastd.utils.text import is_utf8

log = get_logger("vastd.workflow")


def restore_kept_results(ctx: Context, job: JobRecord) -> None:
    """A rerun's install interrupted by a crash, the rerun then not done: the earlier
    results it had set aside go back to results/<job>/ (nothing stays hidden)."""
    failed = job.keep_previous and job.state is JobState.FAILED
    if failed and restore_kept(ctx.layout.results_dir(job.id)):
        log.info("results_restored", job=job.id)


def reconcile_folders(ctx: Context) -> None:
    """Make the snapshot and the folders agree; adopt files it does not know."""
    layout, store = ctx.layout, ctx.store
    by_file = {j.file_name: j for j in store.jobs.values()}
    for folder in (JobFolder.QUEUED, JobFolder.RUNNING):
        for path in sorted(layout.folder(folder).iterdir()):
            if not path.is_file() or path.name.startswith(".") or not path.name.endswith(".csv"):
                continue
            try:
                if not is_utf8(path.name):
                    # Accepted by a version that let it in: no record can hold its name.
                    reason = not_utf8_reason(path.name)
                    shown = shown_name(job_id_for(path))
                    move_job_to_failed(layout, shown, path, reason=reason)
                    log.warning("job_refused", job=shown, reason=reason)
                    continue
                _reconcile_file(ctx, folder, path, by_file.get(path.name))
            except FileOperationError as exc:
                # One file that cannot move must not keep the daemon from starting.
                log.error("job_file_unreconciled", path=str(path), error=str(exc))
    for job in store.jobs.values():
        if job.state in st.FINISHED:
            continue
        if layout.job_file(st.FOLDER_OF[job.state], job.id).exists():
            continue
        rerun_waiting = job.state is JobState.QUEUED and job.keep_previous
        if layout.job_file(JobFolder.DONE, job.id).exists() and not rerun_waiting:
            # Collected and moved, but the crash came before the snapshot said so.
            st.mark_job_recovered(store, job.id, JobState.DONE)
            log.info("job_recovered_done", job=job.id)
        elif layout.job_file(JobFolder.FAILED, job.id).exists():
            st.mark_job_recovered(store, job.id, JobState.FAILED)
            log.info("job_recovered_failed", job=job.id)
        else:
            log.error("job_file_missing", job=job.id, expected=job.file_name)
    store.mark_dirty()


def _reconcile_file(ctx: Context, folder: JobFolder, path: Path, job: JobRecord | None) -> None:
    layout, store = ctx.layout, ctx.store
    if job is not None and folder is JobFolder.QUEUED and resubmitted(ctx, job):
        # Accepted again (a rerun, or a failed job's resubmission) and the crash came
        # before the save: a finished record's own file is never in queued/.
        accept_again(ctx, job)
        return
    if job is not None and job.state in st.FINISHED:
        # The record finished but the move of its file did not (disk error, crash):
        # put the file where the record says, never run the job again.
        want = st.FOLDER_OF[job.state]
        if want is JobFolder.FAILED:
            move_job_to_failed(
                layout,
                job.id,
                folder,
                reason=job.last_error or "failed",
                attempts=job.attempts,
                last_exit_code=job.last_exit_code,
            )
        else:
            move_job_file(layout, job.id, folder, want, rename_on_collision=True)
        log.info("job_file_restored", job=job.id, folder=want.value)
        return
    if job is None:
        # A file without a record: adopt it as queued, never lose it.
        job_id = job_id_for(path)
        earlier = store.history.get(job_id)
        if folder is JobFolder.QUEUED and earlier is not None and earlier.state is JobState.DONE:
            # A done name (its record in history only) accepted again before the crash.
            if ctx.settings.job.on_duplicate != "rerun":
                reason = duplicate_reason(job_id)
                move_job_to_failed(layout, job_id, folder, reason=reason, duplicate=True)
                log.warning("job_duplicate_refused", job=job_id, reason=reason)
                return
            refused = refusal_left(layout, job_id)
            st.add_job(store, job_id, path.name, rows=0, keep_previous=True, refused_before=refused)
            log.info("job_resubmission_recovered", job=job_id)
            return
        if folder is JobFolder.RUNNING:
            move_job_file(layout, job_id, JobFolder.RUNNING, JobFolder.QUEUED)
        # failed/ files of the name that no record owns: a refusal this file replaces
        job = st.add_job(
            store, job_id, path.name, rows=0, refused_before=refusal_left(layout, job_id)
        )
        log.info("job_adopted", job=job.id, folder=folder.value)
        return
    want = st.FOLDER_OF[job.state]
    if want is not folder:
        move_job_file(layout, job.id, folder, want)


def resubmitted(ctx: Context, job: JobRecord) -> bool:
    """A file in queued/ under a finished job's name is a new submission of it.

    Every way into done/ moves the file first, so a DONE record whose file is in done/
    has no file in queued/ but a new one. A FAILED record's own file may stay behind
    (its move to failed/ failed): then failed/ does not hold the failure's files, while
    a resubmission leaves them there until it is saved.
    """
    if job.state is JobState.DONE:
        return ctx.layout.job_file(JobFolder.DONE, job.id).exists()
    if job.state is JobState.FAILED:
        if job.failed_stem is not None and not job.failed_csv:
            return True  # that failure left no CSV behind: any file here is a new one
        stem = job.failed_stem or job.id
        return (ctx.layout.failed / safe_name(stem, JOB_SUFFIX)).exists()
    return False


def accept_again(ctx: Context, job: JobRecord) -> None:
    """Settle a resubmission found in queued/ as acceptance would have."""
    if job.state is JobState.DONE and ctx.settings.job.on_duplicate != "rerun":
        reason = duplicate_reason(job.id)
        move_job_to_failed(ctx.layout, job.id, JobFolder.QUEUED, reason=reason, duplicate=True)
        log.warning("job_duplicate_refused", job=job.id, reason=reason)
        return
    st.add_job(
        ctx.store,
        job.id,
        job.file_name,
        job.rows,
        keep_previous=job.state is JobState.DONE,
        refused_before=refusal_left(ctx.layout, job.id),
    )
    log.info("job_resubmission_recovered", job=job.id)


async def save_recovery(ctx: Context) -> None:
    """Save what `recover_after_restart` changed. Once that is on disk, the failures that
    the records it made (adopted files, resubmissions found in queued/) replace can go."""
    if await ctx.store.flush():
        for job in list(ctx.store.jobs.values()):
            if job.earlier_failed_stem is not None:
                st.clear_earlier_failure(ctx.store, job.id)


def recover_after_restart(ctx: Context) -> None:
    """Before any scheduling: re-verify instances and resume watching and collecting."""
    for job in list(ctx.store.jobs.values()):
        # Loaded from disk, so saved: the failure a resubmission replaced can go now.
        # (Not a record that reconcile_folders makes: that one is not saved yet.)
        if job.earlier_failed_stem is not None:
            st.clear_earlier_failure(ctx.store, job.id)
    reconcile_folders(ctx)
    st.number_slots(ctx.store)  # a snapshot from before slot numbers: its chains get them
    for job in ctx.store.jobs.values():
        restore_kept_results(ctx, job)
    for inst in ctx.store.instances.values():
        # Whatever a crash left on it unaccounted is swept before its next job.
        if inst.status not in st.GONE:
            st.note_resweep(ctx.store, inst, True)
        if inst.status in (
            InstanceStatus.READY,
            InstanceStatus.PREPARING,
            InstanceStatus.UNREACHABLE,
        ):
            # The marker on the instance says whether steps must run again.
            st.mark_instance_discovered(ctx.store, inst)
    for job in ctx.store.jobs.values():
        if job.state is JobState.COLLECTING:
            schedule_result_collection(ctx.scheduler, job.id)
        elif job.state is JobState.RUNNING and job.instance not in ctx.store.instances:
            requeue(ctx, job, reason="instance unknown after restart")
    ctx.store.mark_dirty()
