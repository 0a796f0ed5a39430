"""Complete workflows: the supervisor loops and the one-job workflow.

Each loop is `run_<loop>(ctx)` around a `<loop>_once(ctx)` step that tests call
directly. A crash in a step is logged and retried with back-off; it never takes
the other loops down; cancellation always propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import asyncssh

from vastd.core import state as st
from vastd.core.files import Layout, move_job_to_failed
from vastd.core.jobs import InboxWatcher, accept_job_files, duplicate_reason, job_id_for
from vastd.core.lock import RootLock
from vastd.core.state import JobState
from vastd.core.submit import submit_file
from vastd.orchestration import coordinator as co
from vastd.orchestration.collection import collect_job
from vastd.orchestration.context import Context, build_context, close_context
from vastd.orchestration.fleet import run_fleet
from vastd.orchestration.followups import followups_once
from vastd.orchestration.health import run_health
from vastd.orchestration.inventory import (
    coordinate_instance_preparation as coordinate_instance_preparation,
)
from vastd.orchestration.inventory import discovery_once as discovery_once
from vastd.orchestration.inventory import handle_instance_failure as handle_instance_failure
from vastd.orchestration.inventory import (
    run_instance_preparation_workflow as run_instance_preparation_workflow,
)
from vastd.orchestration.recovery import reconcile_folders as reconcile_folders
from vastd.orchestration.recovery import recover_after_restart as recover_after_restart
from vastd.orchestration.recovery import save_recovery
from vastd.orchestration.scheduler import Task, TaskType, retry_delay
from vastd.utils.config import Settings
from vastd.utils.exceptions import FileOperationError
from vastd.utils.logging import get_logger
from vastd.utils.supervise import run_loop as run_loop

log = get_logger("vastd.workflow")


# --- inbox ----------------------------------------------------------------------------------
# Records added between two yields to the loop.
_RECORDS_PER_STEP = 256


async def accept_inbox_files(ctx: Context, paths: Sequence[Path]) -> dict[Path, FileOperationError]:
    """Accept many inbox files together: each becomes a queued job record, in order, only
    once the batch's files are durable in queued/ (one fsync of queued/ and the inbox for
    the batch). Returns the files that could not be accepted for the folders' own reasons
    (disk full, read-only) with the error; refused files are in failed/ as usual.
    """
    # Containers over the snapshot and the history index: no scan of every job per file.
    outcomes = await accept_job_files(
        ctx.layout,
        paths,
        ctx.settings.job,
        known_ids=ctx.store.active_ids,
        done_ids=ctx.store.done_ids,
    )
    problems: dict[Path, FileOperationError] = {}
    added: list[str] = []
    for n, (path, info) in enumerate(zip(paths, outcomes, strict=True)):
        if n and n % _RECORDS_PER_STEP == 0:
            await asyncio.sleep(0)  # a big batch never holds the loop
        if isinstance(info, FileOperationError):
            problems[path] = info
            continue
        if info is None:
            continue
        # A failed job's late results moving its file to done/ (a few ms): never replaced
        # in the middle of that move.
        await ctx.store.file_settled(info.job_id)
        job = ctx.store.jobs.get(info.job_id)
        reason, event = None, "job_refused"
        if job is not None and job.state not in st.FINISHED:
            # Became active while the file was checked (a rescan raced the watcher): never merge.
            reason = f"a job named {info.job_id!r} is already queued or running"
        elif not info.rerun and info.job_id in ctx.store.done_ids:
            # Done while the file was checked (a failed job's late results): the rule for
            # a done name applies as if it had been done before.
            if ctx.settings.job.on_duplicate == "rerun":
                info = dataclasses.replace(info, rerun=True)
            else:
                reason, event = duplicate_reason(info.job_id), "job_duplicate_refused"
        if reason is not None:
            log.warning(event, job=info.job_id, reason=reason)
            try:
                await asyncio.to_thread(
                    move_job_to_failed,
                    ctx.layout,
                    info.job_id,
                    info.path,
                    reason=reason,
                    duplicate=True,
                )
            except FileOperationError as exc:
                problems[path] = exc
            continue
        job = st.add_job(
            ctx.store,
            info.job_id,
            info.path.name,
            info.rows,
            keep_previous=info.rerun,
            refused_before=info.refused_before,
        )
        added.append(job.id)
    if added:
        ctx.wake_dispatch()
    resubmitted = [
        job_id
        for job_id in added
        if (job := ctx.store.jobs.get(job_id)) is not None and job.earlier_failed_stem is not None
    ]
    if resubmitted and await ctx.store.flush():
        # Queued again, on disk: the earlier failures' files in failed/ can go.
        for job_id in resubmitted:
            st.clear_earlier_failure(ctx.store, job_id)
    return problems


async def accept_inbox_file(ctx: Context, path: Path) -> None:
    """`accept_inbox_files` for one file; raises its FileOperationError (the file stays)."""
    problems = await accept_inbox_files(ctx, [path])
    if path in problems:
        raise problems[path]


def make_inbox_watcher(
    ctx: Context, *, settle_s: float = 1.0, rescan_interval_s: float = 30.0
) -> InboxWatcher:
    async def on_batch(paths: list[Path]) -> None:
        problems = await accept_inbox_files(ctx, paths)
        for path, exc in problems.items():
            # Disk full or read-only: the file stays in the inbox; look at it again later.
            log.error("job_accept_failed", path=str(path), error=str(exc))
            watcher.forget(path)

    watcher = InboxWatcher(
        ctx.layout.inbox,
        None,
        on_batch=on_batch,
        settle_s=settle_s,
        rescan_interval_s=rescan_interval_s,
    )
    return watcher


# --- the task runner ------------------------------------------------------------------------
async def run_tasks(ctx: Context, *, max_concurrent: int = 32) -> None:
    """Run scheduled follow-up work (collections) as it falls due, a bounded number at once."""
    limit = asyncio.Semaphore(max_concurrent)
    while True:
        task = await ctx.scheduler.get_next_task()
        await limit.acquire()
        ctx.spawn(_run_task(ctx, task, limit), name=f"task:{task.id}")


async def run_due_tasks(ctx: Context) -> int:
    """Carry out, one after another, the scheduled tasks that are due now (the tasks
    loop's work, for callers that drive the steps themselves); returns how many ran."""
    ran = 0
    limit = asyncio.Semaphore(1)
    while (task := ctx.scheduler.pop_due()) is not None:
        await limit.acquire()
        await _run_task(ctx, task, limit)
        ran += 1
    return ran


async def _run_task(ctx: Context, task: Task, limit: asyncio.Semaphore) -> None:
    try:
        if task.type is TaskType.COLLECT_RESULTS:
            ok = False
            try:
                ok = await collect_job(ctx, str(task.args["job"]))
            finally:
                if ok:
                    ctx.scheduler.mark_task_completed(task)
                else:
                    ctx.scheduler.reschedule_failed_task(task, retry_delay(task.attempts))
                ctx.wake_dispatch()
        else:
            assert_never(task.type)  # a new kind of task must be carried out here, not dropped
    finally:
        limit.release()


# --- the whole thing ------------------------------------------------------------------------
Supervisor = tuple[str, Callable[[], Coroutine[Any, Any, object]]]


def supervisors(
    ctx: Context, *, inbox_settle_s: float = 1.0, inbox_rescan_s: float = 30.0
) -> list[Supervisor]:
    """The daemon's loops, by name: each a function that makes the loop's coroutine.

    The caller owns the TaskGroup they run in (the daemon, or
    `orchestrate_job_processing`).
    """
    s = ctx.settings
    watcher = make_inbox_watcher(ctx, settle_s=inbox_settle_s, rescan_interval_s=inbox_rescan_s)
    steps = loop_steps(ctx)
    loops: list[Supervisor] = [
        ("saver", ctx.store.run_saver),
        ("inbox", watcher.run),
        ("preparation", lambda: run_loop("preparation", steps.preparation, interval_s=1.0)),
        (
            "dispatch",
            lambda: run_loop(
                "dispatch", steps.dispatch, interval_s=1.0, wakeup=ctx.dispatch_wakeup
            ),
        ),
        ("tasks", lambda: run_tasks(ctx)),
        ("followups", lambda: run_loop("followups", steps.followups, interval_s=0.25)),
        ("health", lambda: run_health(ctx)),
        ("loop_lag", ctx.loop_lag.run),
    ]
    if ctx.cloud is not None:
        loops.append(
            (
                "discovery",
                lambda: run_loop("discovery", steps.discovery, interval_s=s.vast.poll_interval_s),
            )
        )
        if s.fleet.mode == "autoscale":
            loops.append(("fleet", lambda: run_fleet(ctx)))
    return loops


@dataclass(frozen=True)
class LoopSteps:
    """One step of each periodic loop: what the supervisors repeat, and what a caller
    driving the daemon by hand (the tests' pump, a library user) calls."""

    ctx: Context

    async def dispatch(self) -> None:
        await co.coordinate_job_distribution(self.ctx)

    async def preparation(self) -> None:
        coordinate_instance_preparation(self.ctx)
        co.handle_system_failures(self.ctx)  # watch what nobody watches

    async def followups(self) -> None:
        await followups_once(self.ctx)

    async def discovery(self) -> None:
        await discovery_once(self.ctx)
        # What the listing shows running is prepared now, not at the preparation loop's
        # next turn (up to its interval later: instance time paid for nothing).
        coordinate_instance_preparation(self.ctx)


def loop_steps(ctx: Context) -> LoopSteps:
    return LoopSteps(ctx)


async def orchestrate_job_processing(
    ctx: Context, *, inbox_settle_s: float = 1.0, inbox_rescan_s: float = 30.0
) -> None:
    """Every supervisor loop, concurrently, until cancelled (in a TaskGroup of its own)."""
    async with asyncio.TaskGroup() as tg:
        for name, make in supervisors(
            ctx, inbox_settle_s=inbox_settle_s, inbox_rescan_s=inbox_rescan_s
        ):
            tg.create_task(make(), name=name)


@contextlib.asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    client_keys: list[asyncssh.SSHKey] | None = None,
    recover: bool = True,
) -> AsyncIterator[Context]:
    """A Context built as `vastd run` builds one, closed afterwards (for library use).

    With `recover`, the snapshot is reconciled with the folders first, as at daemon
    start-up. It takes the root's lock, so it refuses the root of a running daemon.
    """
    Layout(settings.paths.root).ensure()
    lock = RootLock(settings.paths.root)
    lock.acquire()
    try:
        ctx = build_context(settings, client_keys=client_keys)
        try:
            if recover:
                recover_after_restart(ctx)
                await save_recovery(ctx)
            yield ctx
        finally:
            await close_context(ctx)
    finally:
        lock.release()


async def run_complete_job_workflow(
    ctx: Context, job_file: Path, *, timeout_s: float | None = None
) -> JobState:
    """Run one job file end to end with the context's instances; returns its final state."""
    ctx.layout.ensure()
    target = await asyncio.to_thread(submit_file, ctx.layout, job_file)
    job_id = job_id_for(target)
    await accept_inbox_file(ctx, target)
    if job_id not in ctx.store.jobs:
        return JobState.FAILED
    runner = asyncio.create_task(orchestrate_job_processing(ctx, inbox_rescan_s=3600))
    try:
        async with asyncio.timeout(timeout_s):
            # The in-memory store is cheap to look at; no event is worth adding for this.
            while ctx.store.job_state(job_id) not in st.FINISHED:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await ctx.aclose()
        await ctx.store.flush()
    return ctx.store.job_state(job_id) or JobState.FAILED
