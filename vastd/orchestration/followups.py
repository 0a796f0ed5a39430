"""Durable follow-up work: recorded remote clean-ups carried out after the save.

A transition that decides a run's folder must go (collected, failed attempt,
duplicate or untracked run, orphan no longer needed) records a FollowUp in the same
change. `followups_once` runs the due ones once that change is on disk, each keyed
by its run id (a folder that holds another run is left alone), and retries a failed
one with back-off until it is done, across restarts. Nothing is dropped while the
instance may still run it: only a destroyed or forgotten instance ends its work.

`sweep_remote_folders` runs when an instance is (re)prepared, before it gets a job:
a job folder on it that no job or orphan of this instance accounts for (a finished
run whose clean-up a crash forgot, a run vastd never recorded) is killed and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time

from vastd.core import state as st
from vastd.core.files import safe_name
from vastd.core.ssh import SSHConnection
from vastd.core.state import FollowUp, InstanceRecord, InstanceStatus
from vastd.execution.job_runner import (
    RemoteJobPaths,
    as_sh_command,
    instance_root,
    marker_lines,
    remote_job_paths,
)
from vastd.execution.result_handler import (
    CLEANUPS_PER_COMMAND,
    CleanupOutcome,
    check_cleanup_target,
    cleanup_remote_job,
    cleanup_remote_jobs,
)
from vastd.orchestration.actions import instance_connection
from vastd.orchestration.context import Context
from vastd.utils.exceptions import (
    HostKeyMismatchError,
    JobExecutionError,
    SSHConnectionError,
    VastdError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.followups")
FOLLOWUP_BACKOFF_MAX_S = 600.0
FOLLOWUP_WAIT_S = 30.0  # how often a follow-up on a lost or booting instance looks again
WAITING = frozenset({InstanceStatus.LOST, InstanceStatus.DESTROYING, InstanceStatus.BOOTING})


def _retry_delay(ctx: Context, followup: FollowUp) -> float:
    return min(FOLLOWUP_BACKOFF_MAX_S, 4 * ctx.backoff.cap_s(followup.attempts + 1))


async def run_instance_followups(ctx: Context, instance_id: str, items: list[FollowUp]) -> int:
    """Carry out follow-ups of one instance, several folders a command; returns how many
    are done (or can never apply).

    Each holds its job's remote folder on that instance while it works, so it never
    races the upload and start of a newer run of the same job (whose `run` file then
    tells the clean-up to leave the folder alone). Two of the same job wait for a next
    round (one command holds a folder once).
    """
    items = [f for f in items if f.id in ctx.store.snapshot.followups]  # (done meanwhile)
    inst = ctx.store.instances.get(instance_id)
    if inst is None or inst.status is InstanceStatus.DESTROYED:
        for followup in items:
            st.followup_done(ctx.store, followup.id)
            log.info("followup_dropped", job=followup.job, instance=instance_id, why="gone")
        return len(items)
    if inst.status in WAITING:
        # May come back (lost) or is being destroyed (which ends its follow-ups).
        for followup in items:
            st.followup_wait(ctx.store, followup.id, FOLLOWUP_WAIT_S)
        return 0
    done = 0
    batch: dict[str, tuple[FollowUp, RemoteJobPaths]] = {}
    for followup in items:
        if followup.job in batch:
            continue
        try:
            paths = remote_job_paths(ctx.settings.remote.root, inst.id, followup.job)
            check_cleanup_target(paths, followup.run)
        except ValueError as exc:  # nothing this could ever remove
            st.followup_done(ctx.store, followup.id)
            log.error("followup_invalid", job=followup.job, instance=inst.id, error=str(exc))
            done += 1
            continue
        batch[followup.job] = (followup, paths)
    chosen = list(batch.values())
    for at in range(0, len(chosen), CLEANUPS_PER_COMMAND):
        done += await _clean(ctx, inst, chosen[at : at + CLEANUPS_PER_COMMAND])
    return done


async def _clean(
    ctx: Context, inst: InstanceRecord, chunk: list[tuple[FollowUp, RemoteJobPaths]]
) -> int:
    """One clean-up command for `chunk`'s folders, holding each of them meanwhile."""
    try:
        async with contextlib.AsyncExitStack() as held:
            for followup, _ in chunk:
                await held.enter_async_context(ctx.remote_locks.hold((inst.id, followup.job)))
            chunk = [(f, p) for f, p in chunk if f.id in ctx.store.snapshot.followups]
            if not chunk:
                return 0
            conn = await instance_connection(ctx, inst)
            outcomes: list[CleanupOutcome] = await cleanup_remote_jobs(
                conn,
                [(paths, followup.run) for followup, paths in chunk],
                timeout_s=ctx.settings.ssh.command_timeout_s,
            )
    except HostKeyMismatchError as exc:
        # An instance that is not the one we knew: nothing there can be cleaned safely.
        for followup, _ in chunk:
            st.followup_done(ctx.store, followup.id)
            log.warning("followup_dropped", job=followup.job, instance=inst.id, why=str(exc))
        return len(chunk)
    except (SSHConnectionError, JobExecutionError) as exc:
        outcomes = [JobExecutionError(str(exc)) for _ in chunk]
    done = 0
    for (followup, _), outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, JobExecutionError):
            st.followup_failed(ctx.store, followup.id, str(outcome), _retry_delay(ctx, followup))
            if followup.attempts == 1 or followup.attempts % 10 == 0:
                log.warning(
                    "remote_cleanup_failed",
                    job=followup.job,
                    instance=inst.id,
                    error=str(outcome),
                    attempts=followup.attempts,
                )
            continue
        st.followup_done(ctx.store, followup.id)
        log.info(
            "remote_cleanup_done",
            job=followup.job,
            instance=inst.id,
            run=followup.run,
            reason=followup.reason,
            removed=outcome == "removed",
        )
        done += 1
    return done


INSTANCES_PER_ROUND = 64  # instances a round cleans on (a command each)


async def followups_once(
    ctx: Context, *, limit: int = INSTANCES_PER_ROUND, sweep: bool = True
) -> int:
    """Run the follow-ups that are due (after their record is saved); returns how many ended.

    A round takes the due ones of up to `limit` instances (the oldest first), up to
    `CLEANUPS_PER_COMMAND` of each (one command an instance): a backlog of clean-ups,
    such as collections outrunning them on many instances, drains in a few rounds.
    With `sweep`, drained instances waiting for a sweep (preparation sweeps the others)
    are swept too; the daemon's bounded last round at shutdown leaves that out.
    """
    now = time.time()
    if sweep:
        await sweep_drained(ctx, now)
    by_instance: dict[str, list[FollowUp]] = {}
    taken, most = 0, limit * CLEANUPS_PER_COMMAND
    # Every one is looked at (those waiting for a lost instance or backing off are
    # skipped, never in the way of the due ones behind them), until a round is full.
    for followup in ctx.store.snapshot.followups.values():
        if followup.next_at > now:
            continue
        items = by_instance.get(followup.instance)
        if items is None:
            if len(by_instance) >= limit:
                continue
            items = by_instance[followup.instance] = []
        if len(items) < CLEANUPS_PER_COMMAND:
            items.append(followup)
            taken += 1
            if taken >= most:
                break
    if not by_instance:
        return 0
    # Never before the change that decided them is on disk.
    await ctx.store.wait_saved()
    results = await asyncio.gather(
        *(run_instance_followups(ctx, iid, items) for iid, items in by_instance.items())
    )
    return sum(results)


# --- the sweep at preparation -------------------------------------------------------------------
_LIST = (
    'cd "$R/jobs" 2>/dev/null || { echo "$M"; exit 0; }\n'
    'echo "$M"\n'
    "for d in * .[!.]* ..?*; do\n"
    '  [ -d "$d" ] && [ ! -L "$d" ] || continue\n'
    "  printf 'D %s\\n' \"$(printf '%s' \"$d\" | od -An -v -tx1 | tr -d ' \\n')\"\n"
    "done\n"
)


async def list_job_folders(conn: SSHConnection, inst: InstanceRecord, ctx: Context) -> list[str]:
    """The names of the job folders under `<remote root>/<instance>/jobs/`."""
    root = instance_root(ctx.settings.remote.root, inst.id)
    script = f"M=__VASTD_BEGIN__\nR={shlex.quote(root)}\n{_LIST}"
    result = await conn.run(as_sh_command(script), timeout_s=ctx.settings.ssh.command_timeout_s)
    lines = marker_lines(result.stdout)
    if lines is None:
        raise JobExecutionError(f"job folder listing failed (exit {result.exit_status})")
    names = []
    for line in lines:
        parts = line.strip().split(" ")
        if len(parts) == 2 and parts[0] == "D":
            try:
                names.append(bytes.fromhex(parts[1]).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
    return names


def accounted_folders(ctx: Context, instance_id: str) -> set[str]:
    """Job folders on an instance that a job, an orphan or a follow-up still needs."""
    keep = {safe_name(j.id) for j in st.jobs_on_instance(ctx.store, instance_id)}
    keep |= {safe_name(j.id) for j in st.orphans_on(ctx.store, instance_id)}
    keep |= {
        safe_name(f.job) for f in ctx.store.snapshot.followups.values() if f.instance == instance_id
    }
    return keep


async def sweep_remote_folders(ctx: Context, inst: InstanceRecord, conn: SSHConnection) -> bool:
    """Remove the job folders nothing accounts for (before the instance gets new jobs).

    True when every such folder is gone (False: the listing or a removal failed).
    """
    try:
        names = await list_job_folders(conn, inst, ctx)
    except (JobExecutionError, SSHConnectionError) as exc:
        log.warning("remote_sweep_failed", instance=inst.id, error=str(exc))
        return False
    keep = accounted_folders(ctx, inst.id)
    removed = failed = 0
    for name in names:
        if name in keep or name in ("", ".", "..") or "/" in name:
            continue
        try:
            await cleanup_remote_job(
                conn,
                # a folder name on the instance is already safe_name()'s output
                remote_job_paths(ctx.settings.remote.root, inst.id, name),
                timeout_s=ctx.settings.ssh.command_timeout_s,
            )
        except (VastdError, ValueError) as exc:
            log.warning("remote_sweep_failed", instance=inst.id, folder=name, error=str(exc))
            failed += 1
            continue
        removed += 1
    if removed:
        log.info("remote_folders_swept", instance=inst.id, removed=removed)
    return failed == 0


SWEEP_RETRY_S = 300.0


async def sweep_drained(ctx: Context, now: float) -> int:
    """Sweep drained instances marked for it (they are not prepared again, and get no new
    job, so nothing can race the sweep); returns how many were swept."""
    swept = 0
    for inst in list(ctx.store.instances.values()):
        if inst.status is not InstanceStatus.DRAINING or not inst.resweep:
            continue
        if ctx.sweeps.get(inst.id, 0.0) > now:
            continue
        ctx.sweeps[inst.id] = now + SWEEP_RETRY_S
        try:
            conn = await instance_connection(ctx, inst)
        except HostKeyMismatchError:
            st.note_resweep(ctx.store, inst, False)  # never ours to touch again
            continue
        except SSHConnectionError:
            continue
        if inst.status is InstanceStatus.DRAINING and await sweep_remote_folders(ctx, inst, conn):
            st.note_resweep(ctx.store, inst, False)
            ctx.sweeps.pop(inst.id, None)
            swept += 1
    return swept
