"""The steps every loop shares: connect, reachability, requeue, an attempt's failure.

Thin: each one is a transition of core/state.py plus what the running daemon does
around it (wake the dispatcher, drop a connection, log the event).
"""

from __future__ import annotations

import time

from vastd.core import gpus
from vastd.core import state as st
from vastd.core.ssh import SSHConnection
from vastd.core.state import InstanceRecord, JobRecord, JobState
from vastd.orchestration import market
from vastd.orchestration.context import Context
from vastd.utils.exceptions import (
    FileOperationError,
    HostKeyMismatchError,
    SSHAuthError,
    SSHConnectionError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.coordinator")


def job_cost(
    dph: float, started_at: float | None, ended_at: float | None, slots: int
) -> float | None:
    """The job's share of its instance's price: $/h over the run's time, split between
    the slots that share the instance (core/gpus.py `slots`; None: no run time)."""
    if started_at is None or ended_at is None or ended_at < started_at:
        return None
    return round(dph * (ended_at - started_at) / 3600.0 / max(1, slots), 6)


def job_outcome(ctx: Context, job: JobRecord, instance: str | None = None) -> dict[str, object]:
    """What `job_done` / `job_failed` report besides the job: attempts, runs, durations, cost.

    `duration_s` counts from acceptance (queueing included) to the end; `run_s` is the
    last run's time on its instance, from its confirmed start; `cost` is that run's
    share of the instance's $/h from its start to its exit (as in MANIFEST.json), None
    when it never started or the instance is no longer known.
    """
    end = job.finished_at or time.time()
    run_s = round(end - job.started_at, 3) if job.started_at is not None else None
    inst = ctx.store.instances.get(instance or job.instance or "")
    # from its confirmed start to its exit (or now, not exited), as in MANIFEST.json
    ran_until = job.exited_at if job.exited_at is not None else end
    cost = (
        job_cost(inst.dph, job.started_at, ran_until, gpus.slots(ctx.settings.job, inst))
        if inst is not None
        else None
    )
    return {
        "attempts": job.attempts,
        "runs": job.runs,
        "duration_s": round(max(0.0, end - job.accepted_at), 3),
        "run_s": run_s,
        "cost": cost,
    }


RETRY_DELAY_S = 2.0


async def instance_connection(ctx: Context, inst: InstanceRecord) -> SSHConnection:
    """The instance's SSH connection. A key refused where it worked before (vast.ai can
    lose it) is re-attached through the API and the connection tried once more."""
    try:
        conn = await ctx.pool.get(inst.id, ctx.endpoints(inst))
    except SSHAuthError:
        if not await market.reattach_key(ctx, inst, time.time()):
            raise
        conn = await ctx.pool.get(inst.id, ctx.endpoints(inst))
    inst.last_contact = time.time()
    return conn


def mark_unreachable(ctx: Context, inst: InstanceRecord, exc: SSHConnectionError) -> None:
    """SSH failed. A changed host key is not a blip: drained for good, its jobs requeued."""
    if isinstance(exc, HostKeyMismatchError):
        if st.drain_instance(ctx.store, inst, str(exc), requeue_jobs=True):
            ctx.spawn(ctx.pool.drop(inst.id), name=f"drop:{inst.id}")
        ctx.wake_dispatch()
        return
    st.mark_instance_unreachable(ctx.store, inst, str(exc))


def mark_reachable(ctx: Context, inst: InstanceRecord) -> None:
    if st.mark_instance_reachable(ctx.store, inst):
        ctx.wake_dispatch()


def abandon_if_past_grace(ctx: Context, inst: InstanceRecord) -> int:
    """Jobs on an instance silent past the grace run elsewhere; their runs become orphans.

    Not an attempt. If an orphan later turns out to have succeeded, its results are
    kept and the second run is stopped (see collection.handle_orphan_status).
    """
    since = inst.unreachable_since
    if since is None or time.time() - since < ctx.settings.ssh.unreachable_grace_s:
        return 0
    moved = st.requeue_instance_jobs(
        ctx.store, inst, f"instance {inst.id} unreachable", orphan=True
    )
    if moved:
        st.note_resweep(ctx.store, inst, True)
        ctx.wake_dispatch()
    return moved


def record_attempt_failure(
    ctx: Context,
    job: JobRecord,
    *,
    reason: str,
    exit_code: int | None,
    log_tail: str = "",
) -> None:
    """Something observed on the instance failed this attempt: retry or give up.

    The attempt count and the run's clean-up are one change: the remote folder is
    removed only once the count is on disk.
    """
    failed_on = job.instance
    st.record_attempt_failure(
        ctx.store,
        job.id,
        reason=reason,
        exit_code=exit_code,
        max_attempts=ctx.settings.job.max_attempts,
        log_tail=log_tail,
        retry_delay_s=RETRY_DELAY_S,
    )
    if job.state is JobState.QUEUED:
        log.info("job_retry", job=job.id, instance=failed_on, attempts=job.attempts, reason=reason)
    else:
        log.warning(
            "job_failed",
            job=job.id,
            instance=failed_on,
            reason=reason,
            **job_outcome(ctx, job, failed_on),
        )
    ctx.wake_dispatch()


# Runs of a job whose remote folder may vanish or be replaced under them before that
# counts as a failed attempt: a host that wiped its disk once is not the job's fault; a
# job that removes its own folder (or a host that keeps doing it) would rerun forever.
LOST_RUNS_FREE = 1


def record_lost_run(ctx: Context, job: JobRecord, *, reason: str) -> None:
    """The run's remote folder vanished or came to hold another run while it ran: it
    runs again, elsewhere if possible, not counted; past `LOST_RUNS_FREE` such runs of
    the job, a failed attempt (retried elsewhere up to `[job] max_attempts`)."""
    if job.lost_runs >= LOST_RUNS_FREE:
        record_attempt_failure(ctx, job, reason=reason, exit_code=None)
    else:
        requeue(ctx, job, reason=reason, lost=True)


def requeue(
    ctx: Context,
    job: JobRecord,
    *,
    reason: str,
    orphan: bool = False,
    wake: bool = True,
    lost: bool = False,
) -> bool:
    """Put a held job back in the queue (file and record), never counting an attempt.

    False when its file cannot move (disk, a stray copy in queued/): the job stays as it
    was, logged, and the step that asked goes on with its other jobs. `wake`: dispatch
    looks at the queue again at once (not for the jobs of a round whose save failed).
    `lost`: its run's folder was lost under it (`record_lost_run`).
    """
    try:
        st.requeue_job(ctx.store, job.id, reason=reason, orphan=orphan, lost=lost)
    except FileOperationError as exc:
        log.error("job_requeue_failed", job=job.id, reason=reason, error=str(exc))
        return False
    if job.state is JobState.FAILED:
        log.warning("job_failed", job=job.id, reason=job.last_error, **job_outcome(ctx, job))
    else:
        log.info("job_requeued", job=job.id, reason=reason)
    if wake:
        ctx.wake_dispatch()
    return True
