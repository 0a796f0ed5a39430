"""Complete workflows: the supervisor loops and the one-job workflow.

Each loop is `run_<loop>(ctx)` around a `<loop>_once(ctx)` step that tests call
directly. A crash in a step is logged and retried with back-off; it never takes
the other loops down; cancellation always propagates.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vastd.core import state as st
from vastd.core.files import JobFolder, move_job_file, move_job_to_failed
from vastd.core.jobs import InboxWatcher, accept_job_file, job_id_for
from vastd.core.state import InstanceRecord, InstanceStatus, JobState
from vastd.instances.discovery import InstanceInfo, parse_instance_data
from vastd.instances.preparation import prepare_instance_for_jobs
from vastd.orchestration import coordinator as co
from vastd.orchestration.context import Context
from vastd.orchestration.scheduler import Task, TaskType, schedule_result_collection
from vastd.submit import submit_file
from vastd.utils.exceptions import (
    APIShapeError,
    FileOperationError,
    HostKeyMismatchError,
    PreparationError,
    SSHConnectionError,
    VastAIError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.workflow")
LOST_API_STATES = {"exited", "offline"}
PREPARE_BACKOFF_MAX_S = 600.0


async def run_loop(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    interval_s: float,
    wakeup: asyncio.Event | None = None,
) -> None:
    """Call `step` every `interval_s` (sooner when `wakeup` is set); survive its crashes."""
    failures = 0
    while True:
        if wakeup is not None:
            wakeup.clear()
        try:
            await step()
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            log.error(
                "loop_step_failed", loop=name, error=repr(exc), failures=failures, exc_info=exc
            )
            await asyncio.sleep(min(60.0, 0.5 * 2 ** min(failures, 7)) * random.uniform(0.5, 1))
            continue
        if wakeup is None:
            await asyncio.sleep(interval_s)
        else:
            try:
                async with asyncio.timeout(interval_s):
                    await wakeup.wait()
            except TimeoutError:
                pass


# --- inbox ----------------------------------------------------------------------------------
async def accept_inbox_file(ctx: Context, path: Path) -> None:
    info = await accept_job_file(
        ctx.layout, path, ctx.settings.job, known_ids=ctx.store.active_job_ids()
    )
    if info is None:
        return
    ctx.store.add_job(info.job_id, info.path.name, info.rows)
    ctx.wake_dispatch()


def make_inbox_watcher(
    ctx: Context, *, settle_s: float = 1.0, rescan_interval_s: float = 30.0
) -> InboxWatcher:
    async def on_ready(path: Path) -> None:
        try:
            await accept_inbox_file(ctx, path)
        except FileOperationError as exc:
            # Disk full or read-only: the file stays in the inbox; look at it again later.
            log.error("job_accept_failed", path=str(path), error=str(exc))
            watcher.forget(path)

    watcher = InboxWatcher(
        ctx.layout.inbox, on_ready, settle_s=settle_s, rescan_interval_s=rescan_interval_s
    )
    return watcher


# --- discovery (adopt mode) -----------------------------------------------------------------
def record_from_info(info: InstanceInfo, now: float) -> InstanceRecord:
    return InstanceRecord(id=str(info.id), label=info.label, first_seen=now)


def refresh_record(inst: InstanceRecord, info: InstanceInfo, now: float) -> None:
    inst.label = info.label
    inst.api_status = info.actual_status
    proxy = info.proxy_endpoint
    direct = info.direct_endpoint
    inst.ssh_host, inst.ssh_port = proxy if proxy else (None, None)
    inst.public_ipaddr, inst.direct_port = direct if direct else (None, None)
    inst.dph = info.dph_total
    inst.machine_id = info.machine_id
    inst.gpu_name = info.gpu_name
    inst.last_seen = now
    inst.missing_since = None


async def discovery_once(ctx: Context) -> int:
    """List labelled instances and reconcile them with the store; returns how many are known."""
    assert ctx.api is not None
    label = ctx.settings.vast.label
    try:
        raw = await ctx.api.list_instances(label=label)
        infos = [parse_instance_data(r) for r in raw]
    except (VastAIError, APIShapeError) as exc:
        # Never read a failed listing as "no instances".
        log.warning("discovery_failed", error=str(exc))
        return len(ctx.store.instances)
    from vastd.orchestration.fleet import claim_unknown_instance

    now = time.time()
    ctx.store.snapshot.last_discovery_at = now
    seen: set[str] = set()
    for info in infos:
        if info.label != label:
            continue  # never touch what is not ours
        iid = str(info.id)
        seen.add(iid)
        inst = ctx.store.instances.get(iid)
        if inst is None:
            # Ours through a rent intent, adopted, or (None) left alone entirely.
            inst = claim_unknown_instance(ctx, info, now)
            if inst is None:
                continue
        if inst.status in (InstanceStatus.DESTROYED, InstanceStatus.DESTROYING):
            continue
        refresh_record(inst, info, now)
        if info.actual_status in LOST_API_STATES or info.actual_status == "stopped":
            handle_instance_failure(ctx, inst, f"vast.ai reports it {info.actual_status}")
        elif info.is_running and inst.status in (InstanceStatus.LOST, InstanceStatus.BOOTING):
            inst.status = InstanceStatus.DISCOVERED
    grace = ctx.settings.vast.lost_grace_s
    for inst in list(ctx.store.instances.values()):
        if inst.id in seen or inst.status in (
            InstanceStatus.LOST,
            InstanceStatus.DESTROYING,
            InstanceStatus.DESTROYED,
        ):
            continue
        inst.missing_since = inst.missing_since or now
        if now - inst.missing_since >= grace:
            handle_instance_failure(ctx, inst, "absent from the vast.ai list")
    ctx.store.mark_dirty()
    return len(seen)


def handle_instance_failure(ctx: Context, inst: InstanceRecord, reason: str) -> int:
    """The instance is gone: requeue its jobs (not an attempt). Returns how many."""
    if inst.status is InstanceStatus.LOST:
        return 0
    inst.status = InstanceStatus.LOST
    moved = 0
    for job in list(ctx.store.jobs.values()):
        if job.instance == inst.id and job.state in (JobState.RUNNING, JobState.COLLECTING):
            if job.pgid is not None and inst.id not in job.orphans:
                # "offline" may only mean the host lost vast.ai: should it come back, the
                # run is watched as an orphan (kept if it finishes first, else stopped).
                job.orphans.append(inst.id)
            co.requeue(ctx, job, reason=f"instance {inst.id} lost", count_attempt=False)
            moved += 1
    inst.current_jobs.clear()
    ctx.store.mark_dirty()
    ctx.spawn(ctx.pool.drop(inst.id), name=f"drop:{inst.id}")
    log.warning("instance_lost", instance=inst.id, reason=reason, requeued=moved)
    return moved


# --- preparation ----------------------------------------------------------------------------
def coordinate_instance_preparation(ctx: Context) -> int:
    """Start preparing every discovered instance that is due; returns how many started."""
    now = time.time()
    started = 0
    for inst in ctx.store.instances.values():
        if inst.next_prepare_at and inst.next_prepare_at > now:
            continue
        started += start_preparation(ctx, inst)
    return started


def start_preparation(ctx: Context, inst: InstanceRecord) -> bool:
    """Prepare a discovered instance in the background, unless that is under way already."""
    if inst.status not in (InstanceStatus.DISCOVERED, InstanceStatus.PREPARING):
        return False
    if not ctx.endpoints(inst):
        return False
    task = ctx.preparing.get(inst.id)
    if task is not None and not task.done():
        return False
    ctx.preparing[inst.id] = asyncio.create_task(
        run_instance_preparation_workflow(ctx, inst.id), name=f"prepare:{inst.id}"
    )
    return True


async def run_instance_preparation_workflow(ctx: Context, instance_id: str) -> bool:
    """SSH answers, then the [[prepare]] steps (skipped when the marker matches)."""
    inst = ctx.store.instances[instance_id]
    s = ctx.settings
    try:
        conn = await co.instance_connection(ctx, inst)
        if inst.status is InstanceStatus.DISCOVERED:
            log.info("instance_ready", instance=inst.id)
            inst.status = InstanceStatus.PREPARING
        marker = await prepare_instance_for_jobs(
            conn, s.prepare, s.remote.root, inst.id, timeout_s=s.ssh.command_timeout_s
        )
    except HostKeyMismatchError as exc:
        inst.status = InstanceStatus.DRAINING
        inst.prepare_error = str(exc)
        ctx.store.mark_dirty()
        return False
    except (SSHConnectionError, PreparationError) as exc:
        inst.prepare_failures += 1
        inst.prepare_error = str(exc)
        delay = min(PREPARE_BACKOFF_MAX_S, 2.0 * 2 ** min(inst.prepare_failures, 9))
        inst.next_prepare_at = time.time() + delay * random.uniform(0.8, 1.2)
        ctx.store.mark_dirty()
        log.warning(
            "instance_prepare_failed",
            instance=inst.id,
            error=str(exc),
            failures=inst.prepare_failures,
            retry_in_s=round(delay, 1),
        )
        return False
    already = inst.prepared_hash == marker
    inst.prepared_hash = marker
    inst.prepare_error = None
    inst.prepare_failures = 0
    inst.status = InstanceStatus.READY
    inst.unreachable_since = None
    if not inst.current_jobs:
        inst.idle_since = inst.idle_since or time.time()
    ctx.store.mark_dirty()
    log.info("instance_prepared", instance=inst.id, marker=marker, already=already)
    # Jobs the snapshot says run here, and runs given up here, are watched again.
    if co.running_jobs_on(ctx, inst.id) or co.orphans_on(ctx, inst.id):
        co.ensure_watcher(ctx, inst.id)
    ctx.wake_dispatch()
    return True


# --- the task runner ------------------------------------------------------------------------
async def run_tasks(ctx: Context, *, max_concurrent: int = 32) -> None:
    """Run scheduled follow-up work (collections) as it falls due, a bounded number at once."""
    limit = asyncio.Semaphore(max_concurrent)
    while True:
        task = await ctx.scheduler.get_next_task()
        await limit.acquire()
        ctx.spawn(_run_task(ctx, task, limit), name=f"task:{task.id}")


async def _run_task(ctx: Context, task: Task, limit: asyncio.Semaphore) -> None:
    try:
        if task.type is TaskType.PREPARE_INSTANCE:
            # An explicit request: the back-off of earlier failures does not hold it back.
            inst = ctx.store.instances.get(str(task.args["instance"]))
            if inst is not None:
                start_preparation(ctx, inst)
            ctx.scheduler.mark_task_completed(task)
        elif task.type is TaskType.COLLECT_RESULTS:
            ok = False
            try:
                ok = await co.collect_job(ctx, str(task.args["job"]))
            finally:
                if ok:
                    ctx.scheduler.mark_task_completed(task)
                else:
                    ctx.scheduler.reschedule_failed_task(task, co.retry_delay(task.attempts))
                ctx.wake_dispatch()
    finally:
        limit.release()


# --- start-up recovery ----------------------------------------------------------------------
def reconcile_folders(ctx: Context) -> None:
    """Make the snapshot and the folders agree; adopt files it does not know."""
    layout, store = ctx.layout, ctx.store
    folder_of = {
        JobState.QUEUED: JobFolder.QUEUED,
        JobState.RUNNING: JobFolder.RUNNING,
        JobState.COLLECTING: JobFolder.RUNNING,
        JobState.DONE: JobFolder.DONE,
        JobState.FAILED: JobFolder.FAILED,
    }
    by_file = {j.file_name: j for j in store.jobs.values()}
    for folder in (JobFolder.QUEUED, JobFolder.RUNNING):
        for path in sorted(layout.folder(folder).iterdir()):
            if not path.is_file() or path.name.startswith(".") or not path.name.endswith(".csv"):
                continue
            job = by_file.get(path.name)
            if job is not None and job.state in (JobState.DONE, JobState.FAILED):
                # The record finished but the move of its file did not (disk error, crash):
                # put the file where the record says, never run the job again.
                want = folder_of[job.state]
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
                job = store.add_job(job_id, path.name, rows=0)
                log.info("job_adopted", job=job.id, folder=folder.value)
                continue
            want = folder_of[job.state]
            if want is not folder:
                move_job_file(layout, job.id, folder, want)
    for job in store.jobs.values():
        if job.state not in (JobState.QUEUED, JobState.RUNNING, JobState.COLLECTING):
            continue
        if layout.job_file(folder_of[job.state], job.id).exists():
            continue
        if layout.job_file(JobFolder.DONE, job.id).exists():
            # Collected and moved, but the crash came before the snapshot said so.
            st.mark_job_completed(store, job.id, success=True)
            log.info("job_recovered_done", job=job.id)
        elif layout.job_file(JobFolder.FAILED, job.id).exists():
            st.mark_job_completed(store, job.id, success=False)
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
            inst.status = InstanceStatus.DISCOVERED
            inst.next_prepare_at = None
    for job in ctx.store.jobs.values():
        if job.state is JobState.COLLECTING:
            schedule_result_collection(ctx.scheduler, job.id)
        elif job.state is JobState.RUNNING and job.instance not in ctx.store.instances:
            co.requeue(ctx, job, reason="instance unknown after restart", count_attempt=False)
    ctx.store.mark_dirty()


# --- the whole thing ------------------------------------------------------------------------
async def orchestrate_job_processing(
    ctx: Context, *, inbox_settle_s: float = 1.0, inbox_rescan_s: float = 30.0
) -> None:
    """Every supervisor loop, concurrently, until cancelled."""
    s = ctx.settings
    watcher = make_inbox_watcher(ctx, settle_s=inbox_settle_s, rescan_interval_s=inbox_rescan_s)

    async def dispatch_step() -> None:
        await co.coordinate_job_distribution(ctx)

    async def health_step() -> None:
        coordinate_instance_preparation(ctx)
        co.handle_system_failures(ctx)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ctx.store.run_saver(), name="saver")
        tg.create_task(watcher.run(), name="inbox")
        if ctx.api is not None:
            tg.create_task(
                run_loop(
                    "discovery", lambda: discovery_once(ctx), interval_s=s.vast.poll_interval_s
                ),
                name="discovery",
            )
        tg.create_task(run_loop("preparation", health_step, interval_s=1.0), name="preparation")
        tg.create_task(
            run_loop("dispatch", dispatch_step, interval_s=1.0, wakeup=ctx.dispatch_wakeup),
            name="dispatch",
        )
        tg.create_task(run_tasks(ctx), name="tasks")
        # Imported here: fleet and monitoring build on this module.
        from vastd.instances.monitoring import run_health
        from vastd.orchestration.fleet import run_fleet

        if ctx.api is not None and s.fleet.mode == "autoscale":
            tg.create_task(run_fleet(ctx), name="fleet")
        tg.create_task(run_health(ctx), name="health")


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
            while ctx.store.jobs[job_id].state not in (JobState.DONE, JobState.FAILED):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await ctx.aclose()
        await ctx.store.flush()
    return ctx.store.jobs[job_id].state
