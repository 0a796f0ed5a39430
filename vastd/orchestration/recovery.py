"""Start-up recovery: the snapshot and the folders agree before anything is scheduled.

Runs before any loop (the predecessor did it after). Each disagreement a crash can
leave is settled through the transitions of core/state.py: a finished record whose
file did not move, a file without a record (adopted, never lost), a record whose
file already moved. Instances are re-verified (their marker decides whether the
steps run again); collections resume; follow-up work resumes from the snapshot.
"""

from __future__ import annotations

from vastd.core import state as st
from vastd.core.files import JobFolder, move_job_file, move_job_to_failed
from vastd.core.jobs import job_id_for
from vastd.core.state import InstanceStatus, JobState
from vastd.orchestration.actions import requeue
from vastd.orchestration.context import Context
from vastd.orchestration.scheduler import schedule_result_collection
from vastd.utils.logging import get_logger

log = get_logger("vastd.workflow")


def reconcile_folders(ctx: Context) -> None:
    """Make the snapshot and the folders agree; adopt files it does not know."""
    layout, store = ctx.layout, ctx.store
    by_file = {j.file_name: j for j in store.jobs.values()}
    for folder in (JobFolder.QUEUED, JobFolder.RUNNING):
        for path in sorted(layout.folder(folder).iterdir()):
            if not path.is_file() or path.name.startswith(".") or not path.name.endswith(".csv"):
                continue
            job = by_file.get(path.name)
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
                continue
            if job is None:
                # A file without a record: adopt it as queued, never lose it.
                job_id = job_id_for(path)
                if folder is JobFolder.RUNNING:
                    move_job_file(layout, job_id, JobFolder.RUNNING, JobFolder.QUEUED)
                job = st.add_job(store, job_id, path.name, rows=0)
                log.info("job_adopted", job=job.id, folder=folder.value)
                continue
            want = st.FOLDER_OF[job.state]
            if want is not folder:
                move_job_file(layout, job.id, folder, want)
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


def recover_after_restart(ctx: Context) -> None:
    """Before any scheduling: re-verify instances and resume watching and collecting."""
    reconcile_folders(ctx)
    for inst in ctx.store.instances.values():
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
