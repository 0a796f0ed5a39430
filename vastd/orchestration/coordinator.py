"""Placement, dispatch and watching: jobs meet instances, exits become collections.

Every state change goes through core/state.py. Write-ahead: an assignment (with its
run id) is on disk before anything is uploaded, and a kill is recorded before it is
sent; when the save fails the step stops and says why. A start that completes after
its job moved on (instance lost, drained, requeued) is recorded for clean-up, never
left running untracked.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from vastd.core import gpus
from vastd.core import state as st
from vastd.core.jobs import get_job_arguments
from vastd.core.state import InstanceRecord, InstanceStatus, JobRecord, JobState
from vastd.execution.job_runner import (
    LEASE_NAME,
    StagedAfter,
    execute_job_on_instance,
    instance_root,
    remote_job_paths,
    withdraw_staged_runs,
)
from vastd.execution.process_monitor import (
    CompletionStatus,
    RemoteJobStatus,
    detect_job_completion,
    handle_job_timeout,
    monitor_job_execution,
)
from vastd.execution.result_handler import listing_function
from vastd.orchestration import market
from vastd.orchestration.actions import (
    abandon_if_past_grace,
    instance_connection,
    job_outcome,
    mark_reachable,
    mark_unreachable,
    record_attempt_failure,
    record_lost_run,
    requeue,
)
from vastd.orchestration.collection import collect_job as collect_job
from vastd.orchestration.collection import handle_orphan_status
from vastd.orchestration.context import Context
from vastd.orchestration.scheduler import retry_delay as retry_delay
from vastd.orchestration.scheduler import schedule_result_collection
from vastd.utils.exceptions import FileOperationError, SSHConnectionError, VastdError
from vastd.utils.logging import get_logger

log = get_logger("vastd.coordinator")
DISPATCH_SLACK = 64  # queued jobs looked at beyond the free slots, per dispatch round
# a retry waits this long at most for an instance it has not failed on (Room._others_for)
RETRY_WAIT_OTHER_S = 300.0
# queued jobs looked at in one round at most, when retries at the head wait
DISPATCH_WINDOW_MAX = 4096
# Assignments saved together by one dispatch round: the save dumps each changed record
# on the loop, so 500 free slots filled at once would hold it for one long callback. A
# full round wakes the next at once.
DISPATCH_WAVE = 128
# A wave's starts spawned at once ran their first steps (about 0.2 ms each: the upload's
# first requests) in one loop turn, 128 of them about 28 ms: they are spawned by chunks.
DISPATCH_SPAWN_CHUNK = 16
# instances that will take jobs soon: no job is staged behind a busy slot meanwhile
COMING = frozenset({InstanceStatus.BOOTING, InstanceStatus.DISCOVERED, InstanceStatus.PREPARING})


# --- placing jobs ------------------------------------------------------------------------------
def _placement_key(inst: InstanceRecord) -> tuple[int, float, str]:
    """Least loaded first, then idle longest, then by id (a stable order)."""
    return (len(inst.current_jobs), inst.idle_since or 0.0, inst.id)


class Room:
    """The ready instances with room for another job, least loaded first: what one
    dispatch round places its jobs on.

    One scan of the instances builds it; each `pick` then pops a heap (O(log n)
    instances), where a scan per job cost about 2.5 ms at 500 instances (most of the
    round). Every instance `pick` returns is checked again as it stands then, so an
    instance that filled up, left READY or changed its load since the scan is never
    chosen on old figures; one that gained room during the round waits for the next.
    `load`: orphaned runs per instance, counted as load (they hold their slot until
    settled).
    """

    __slots__ = ("_ctx", "_heap", "_load", "free_slots")

    def __init__(self, ctx: Context, load: Counter[str] | None = None) -> None:
        self._ctx = ctx
        self._load = load if load is not None else Counter()
        self._heap: list[tuple[tuple[int, float, str], str]] = []
        self.free_slots = 0  # slots free on ready instances (orphaned runs not counted)
        for inst in ctx.store.instances.values():
            if inst.status is not InstanceStatus.READY:
                continue
            free = instance_slots(ctx, inst) - st.slot_load(ctx.store, inst)
            if free <= 0:
                continue
            self.free_slots += free
            if self._has_room(inst):
                self._heap.append((_placement_key(inst), inst.id))
        heapq.heapify(self._heap)

    def _has_room(self, inst: InstanceRecord) -> bool:
        ctx = self._ctx
        return (
            inst.status is InstanceStatus.READY
            and st.slot_load(ctx.store, inst) + self._load[inst.id] < instance_slots(ctx, inst)
            and market.fits_before_end(ctx, inst)
            and (not gpus.per_gpu(ctx.settings.job) or free_gpus(ctx, inst) is not None)
        )

    def _others_for(self, job: JobRecord, orphaned: set[str]) -> bool:
        """An instance the job has not failed on could take it, now busy or on its way
        (one vastd rented: it comes or is torn down): the job waits for it rather than go
        back to one it failed on, for RETRY_WAIT_OTHER_S at most."""
        ctx = self._ctx
        since = job.requeued_at  # (None: a record from before it was kept)
        if since is None or time.time() - since > RETRY_WAIT_OTHER_S:
            return False
        return any(
            (inst.status is InstanceStatus.READY or (inst.status in COMING and inst.owned))
            and inst.id not in job.avoid_instances
            and inst.id not in orphaned
            and gpus.slots(ctx.settings.job, inst) > 0
            and market.fits_before_end(ctx, inst)
            for inst in ctx.store.instances.values()
        )

    def pick(self, job: JobRecord) -> InstanceRecord | None:
        """The instance for the job (see `find_best_instance_for_job`), None if none has
        room. The choice stays in the room: once assigned its load has grown, and the
        next pick weighs it anew."""
        instances = self._ctx.store.instances
        orphaned = {o.instance for o in job.orphans}
        heap = self._heap
        skipped: list[tuple[tuple[int, float, str], str]] = []
        fallback: tuple[tuple[int, float, str], str] | None = None
        chosen: tuple[tuple[int, float, str], str] | None = None
        while heap:
            key, instance_id = heapq.heappop(heap)
            inst = instances.get(instance_id)
            if inst is None or not self._has_room(inst):
                continue  # full, gone or no longer ready: out of this round
            if (now := _placement_key(inst)) != key:
                heapq.heappush(heap, (now, instance_id))  # its load changed: weighed anew
                continue
            if instance_id in orphaned:
                skipped.append((key, instance_id))
            elif instance_id in job.avoid_instances:
                if fallback is None:
                    fallback = (key, instance_id)  # the best of those it failed on
                else:
                    skipped.append((key, instance_id))
            else:
                chosen = (key, instance_id)
                break
        if chosen is None and (fallback is None or not self._others_for(job, orphaned)):
            chosen, fallback = fallback, None
        for entry in (*skipped, *([fallback] if fallback else []), *([chosen] if chosen else [])):
            heapq.heappush(heap, entry)
        return instances[chosen[1]] if chosen is not None else None


def find_best_instance_for_job(
    ctx: Context, job: JobRecord, orphan_load: Counter[str] | None = None
) -> InstanceRecord | None:
    """A ready instance with room, least loaded first, preferring one the job has not
    failed on: one it failed on only when no other could take it (none ready, busy or
    on its way and rented by vastd; a fleet of one, say) or once it has waited
    RETRY_WAIT_OTHER_S; else it waits (`Room._others_for`). Never one that holds an
    orphaned run of this job: that run may still finish first (or has, and is about
    to be collected). Orphaned runs count as load: they occupy their instance until
    they are settled. With one job per GPU, room also means enough free GPUs
    (`free_gpus`). A round placing many jobs keeps one `Room` for all of them instead."""
    return Room(ctx, orphan_load).pick(job)


def instance_slots(ctx: Context, inst: InstanceRecord) -> int:
    """The jobs the instance may hold at once (`[job] jobs_per_instance`, or its GPUs //
    `gpus_per_job`); an instance with too few GPUs for one job is logged once."""
    n = gpus.slots(ctx.settings.job, inst)
    if n == 0 and inst.id not in ctx.gpu_shortfalls:
        ctx.gpu_shortfalls.add(inst.id)
        log.warning(
            "instance_too_few_gpus",
            instance=inst.id,
            gpus=len(gpus.instance_gpus(inst)),
            gpus_per_job=ctx.settings.job.gpus_per_job,
        )
    return n


def free_gpus(ctx: Context, inst: InstanceRecord) -> list[int] | None:
    """The GPU indices the next job on the instance gets (one job per GPU), None if too
    few are free: those held by its jobs and its orphaned runs are taken."""
    taken = gpus.held_gpus(
        inst, st.jobs_on_instance(ctx.store, inst.id), st.orphans_on(ctx.store, inst.id)
    )
    return gpus.pick_gpus(ctx.settings.job, inst, taken)


def orphan_load(ctx: Context) -> Counter[str]:
    """Orphaned runs per instance (each may still hold a GPU), from the job index."""
    return Counter(ctx.store.orphan_load())


def in_dispatch(ctx: Context, job: JobRecord) -> bool:
    """The start of the job's current run is under way (its answer is awaited)."""
    return job.id in ctx.dispatching and ctx.dispatching[job.id] == job.run_id


def is_current(job: JobRecord | None, instance_id: str, run_id: str | None) -> bool:
    """The job still runs run `run_id` on this instance (nothing moved it on meanwhile)."""
    return (
        job is not None
        and job.state is JobState.RUNNING
        and job.instance == instance_id
        and job.run_id == run_id
    )


def queue_windows(ctx: Context, limit: int) -> Iterator[list[JobRecord]]:
    """The queue's head a window at a time, for a round that wants to look further when
    the jobs there must wait for other instances: the first `limit` available jobs, then
    4 times as many each time (to DISPATCH_WINDOW_MAX), each window without the jobs an
    earlier one gave. Each window is read when it is asked for (after the caller's
    assignments from the one before). Ends once the whole queue was given."""
    looked: set[str] = set()
    while True:
        fetched = st.get_available_jobs(ctx.store, limit=limit)
        fresh = [j for j in fetched if j.id not in looked]
        looked.update(j.id for j in fresh)
        yield fresh
        if len(fetched) < limit or limit >= DISPATCH_WINDOW_MAX:
            return
        limit = min(limit * 4, DISPATCH_WINDOW_MAX)


async def coordinate_job_distribution(ctx: Context) -> int:
    """Give waiting jobs a free instance, `DISPATCH_WAVE` at most (the round after
    follows at once); save; then start them. Returns the count."""
    assigned: list[tuple[str, str, str | None]] = []
    wave = DISPATCH_WAVE
    if not st.get_available_jobs(ctx.store, limit=1):
        return 0  # nothing to place or stage: no scan of the instances
    room = Room(ctx, orphan_load(ctx))
    free = min(room.free_slots, wave)
    # Only the head of the queue can be placed this round (a few more for jobs that
    # must skip an instance holding an orphaned run of theirs): no walk of the queue.
    # Where jobs at the head wait for other instances, the window grows (to
    # DISPATCH_WINDOW_MAX) so that those behind them still get the free slots.
    for waiting in queue_windows(ctx, free + DISPATCH_SLACK) if free else ():
        skipped = full = False
        for job in waiting:
            if len(assigned) >= wave:
                break
            inst = room.pick(job)
            if inst is None:
                if not job.orphans and not job.avoid_instances:
                    full = True  # no room anywhere: later jobs would not find any either
                    break
                skipped = True  # it waits for another instance than those it failed on
                continue
            wanted = free_gpus(ctx, inst) if gpus.per_gpu(ctx.settings.job) else None
            if await _assign(ctx, job, inst, wanted or ()):
                assigned.append((job.id, inst.id, job.run_id))
        if full or not skipped or len(assigned) >= wave:
            break
    if ctx.settings.job.stage_ahead and len(assigned) < wave:
        assigned += await stage_jobs(ctx, wave - len(assigned))
    if not assigned:
        return 0
    # Write-ahead: the assignment and its run id are on disk before anything is uploaded.
    if not await ctx.store.flush():
        reason = f"not dispatched: the state could not be saved ({ctx.store.save_error})"
        for job_id, _instance_id, run_id in assigned:
            ctx.dispatch.release(job_id, run_id)
        for job_id, instance_id, run_id in assigned:
            held = ctx.store.jobs.get(job_id)
            if held is not None and is_current(held, instance_id, run_id):
                # no wake-up: the next round would assign them again at once and fail
                # again, round after round while the disk stays full
                requeue(ctx, held, reason=reason, wake=False)
        # each dispatch round while the disk stays full: an error once, then debug
        ctx.repeats.failed(
            log,
            "dispatch_deferred",
            "dispatch",
            reason,
            level="error",
            field="reason",
            jobs=len(assigned),
        )
        return 0
    ctx.repeats.forget("dispatch")  # saved again (state_save_recovered said so)
    if len(assigned) >= wave:
        # More may fit: the next round runs right after this one (not after a failed
        # save, which would only fail again at once).
        ctx.wake_dispatch()
    started = 0
    for job_id, instance_id, run_id in assigned:
        st.clear_earlier_failure(ctx.store, job_id)  # its record is on disk now
        if not is_current(ctx.store.jobs.get(job_id), instance_id, run_id):
            ctx.dispatch.release(job_id, run_id)  # lost or drained while the save ran
            continue
        ctx.spawn(dispatch_job(ctx, job_id, instance_id, run_id), name=f"dispatch:{job_id}")
        started += 1
        if started % DISPATCH_SPAWN_CHUNK == 0:
            await asyncio.sleep(0)  # the starts' first steps run a chunk per loop turn
    return started


def staging_slots(ctx: Context) -> list[tuple[InstanceRecord, JobRecord]]:
    """Where a job may be staged now (`[job] stage_ahead`): for each slot of a ready
    instance holding fewer than stage_ahead staged runs, the last run of the slot,
    once its own start (or staging) is confirmed."""
    ahead = ctx.settings.job.stage_ahead
    slots: list[tuple[InstanceRecord, JobRecord]] = []
    if any(i.status in COMING for i in ctx.store.instances.values()):
        return []  # instances on their way will have free slots: the queue waits for them
    for inst in ctx.store.instances.values():
        if inst.status is not InstanceStatus.READY or not inst.current_jobs:
            continue
        if not market.fits_before_end(ctx, inst):
            continue
        for chain in st.slot_chains(ctx.store, inst):
            tail = chain[-1]
            if len(chain) > ahead or in_dispatch(ctx, tail) or tail.kill_reason is not None:
                continue
            if (tail.staged and tail.staged_at is None) or (not tail.staged and tail.pgid is None):
                continue
            slots.append((inst, tail))
    return slots


async def stage_jobs(ctx: Context, most: int) -> list[tuple[str, str, str | None]]:
    """Give queued jobs that found no free slot a place behind a running one (`most` of
    them at most): each is assigned (saved before its upload, as any assignment) to run
    after that slot's last run, with its GPUs. A job that must avoid a slot's instance
    (it failed there, or an orphaned run of it is there) leaves that slot to the jobs
    behind it; where the queue's head holds only such jobs, it is looked at further, as
    in dispatch (to DISPATCH_WINDOW_MAX). Returns what was assigned, for the caller's
    save and start."""
    open_slots = staging_slots(ctx)[:most]
    assigned: list[tuple[str, str, str | None]] = []
    if not open_slots:
        return assigned
    for waiting in queue_windows(ctx, len(open_slots) + DISPATCH_SLACK):
        unfilled: list[tuple[InstanceRecord, JobRecord]] = []
        for inst, tail in open_slots:
            job = next(
                (
                    j
                    for j in waiting
                    if j.state is JobState.QUEUED
                    and j.orphan_on(inst.id) is None
                    and inst.id not in j.avoid_instances
                ),
                None,
            )
            if job is None:
                unfilled.append((inst, tail))  # what waits must avoid it: maybe further on
                continue
            waiting.remove(job)
            if await _assign(ctx, job, inst, after=tail):
                assigned.append((job.id, inst.id, job.run_id))
        open_slots = unfilled
        if not open_slots:
            break
    return assigned


async def _assign(
    ctx: Context,
    job: JobRecord,
    inst: InstanceRecord,
    wanted: Sequence[int] = (),
    *,
    after: JobRecord | None = None,
) -> bool:
    """Assign the job to the instance (staged behind `after`, if given) and claim its
    run; False when it could not be (its file vanished: then it failed, and says so)."""
    try:
        record = await st.assign_job(ctx.store, job.id, inst.id, wanted, after=after)
    except FileOperationError as exc:
        log.warning("job_file_move_failed", job=job.id, error=str(exc))
        return False
    if record is None:
        if job.state is JobState.FAILED:
            log.warning("job_failed", job=job.id, reason=job.last_error, **job_outcome(ctx, job))
        return False  # lost or drained during the move: next round
    # Claimed before any await: the instance's watcher leaves this run alone.
    ctx.dispatch.claim(job.id, job.run_id)
    log.info(
        "job_dispatched",
        job=job.id,
        instance=inst.id,
        attempt=job.attempts + 1,
        run=job.run_id,
        **({"staged_after": after.id} if after is not None else {}),
        **({"gpus": gpus.gpu_list(job.gpus)} if job.gpus else {}),
    )
    return True


async def dispatch_job(
    ctx: Context, job_id: str, instance_id: str, run_id: str | None = None
) -> None:
    """Upload the CSV and start run `run_id` of the job (idempotent for the same run).

    The job's remote folder on this instance is held for the whole upload and start,
    so a recorded clean-up of an older run can never remove this run's upload.
    """
    job = ctx.store.jobs.get(job_id)
    if run_id is None and job is not None:
        run_id = job.run_id
    try:
        async with ctx.remote_locks.hold((instance_id, job_id)):
            await _dispatch(ctx, job_id, instance_id, run_id)
    finally:
        ctx.dispatch.release(job_id, run_id)


async def redispatch(ctx: Context, job_id: str, instance_id: str, run_id: str | None) -> None:
    """Start a run again, write-ahead too: only once the record of its assignment is
    saved (it may not be, when the save that preceded the first start failed)."""
    if not await ctx.store.flush():
        ctx.dispatch.release(job_id, run_id)
        log.warning("dispatch_deferred", job=job_id, reason=ctx.store.save_error)
        return
    await dispatch_job(ctx, job_id, instance_id, run_id)


def _forget_run(ctx: Context, job_id: str, instance_id: str, run_id: str | None, why: str) -> None:
    """A start that may have happened after the job moved on: nobody would watch it, so
    its stop and clean-up are recorded (and carried out once saved)."""
    st.add_followup(ctx.store, instance=instance_id, job=job_id, run=run_id, reason=why)
    log.warning("untracked_run_stopping", job=job_id, instance=instance_id, run=run_id, why=why)


async def _dispatch(ctx: Context, job_id: str, instance_id: str, run_id: str | None) -> None:
    job = ctx.store.jobs.get(job_id)
    inst = ctx.store.instances.get(instance_id)
    if job is None or inst is None or not is_current(job, instance_id, run_id):
        return
    s = ctx.settings
    job_file = ctx.layout.job_file(st.FOLDER_OF[JobState.RUNNING], job.id)
    after = (
        StagedAfter(remote_job_paths(s.remote.root, inst.id, job.after), job.after_run)
        if job.staged and job.after is not None
        else None
    )
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
            run_id=run_id,
            gpus=job.gpus,
            after=after,
            lease_s=s.ssh.unreachable_grace_s,
            # the upload is part of it: allow 1 MB/s on top of a command's deadline
            timeout_s=s.ssh.command_timeout_s + _size(job_file) / 1e6,
        )
    except SSHConnectionError as exc:
        if not is_current(job, instance_id, run_id):
            _forget_run(ctx, job_id, instance_id, run_id, "start unconfirmed, job moved on")
            return
        # Unreachable is not failed: the start may or may not have happened, so keep
        # the assignment; the watcher re-runs the idempotent start of this run.
        log.warning("job_dispatch_interrupted", job=job_id, instance=instance_id, error=str(exc))
        mark_unreachable(ctx, inst, exc)
        return
    except (VastdError, ValueError, OSError) as exc:
        if not is_current(job, instance_id, run_id):
            _forget_run(ctx, job_id, instance_id, run_id, "start failed, job moved on")
            return
        # Observed on the instance (refused upload, start script error), a bad
        # template or an unreadable local file: an attempt, so a job never stays
        # "running" with nothing behind it.
        try:
            record_attempt_failure(ctx, job, reason=f"could not start: {exc}", exit_code=None)
        except FileOperationError as move_exc:
            # Its file cannot move now (disk; an orphan's results completing it): the
            # job stays running, and its watcher finds the run missing next cycle.
            log.warning("job_file_move_failed", job=job_id, error=str(move_exc))
        return
    if not is_current(job, instance_id, run_id):
        # Started after the job moved on (its instance was declared lost or drained).
        _forget_run(ctx, job_id, instance_id, run_id, "started after the job moved on")
        return
    if proc.staged:
        if st.mark_job_staged(ctx.store, job_id, run_id=run_id):
            log.info("job_staged", job=job_id, instance=instance_id, run=run_id, after=job.after)
        ensure_watcher(ctx, instance_id)
        return
    staged = st.note_staged_started(ctx.store, job, started_at=None)  # the run before had ended
    st.mark_job_started(
        ctx.store, job_id, run_id=run_id, pgid=proc.pid, new=proc.started and not staged
    )
    log.info(
        "job_started",
        job=job_id,
        instance=instance_id,
        pgid=proc.pid,
        new=proc.started or staged,
        run=run_id,
        **({"staged": True} if staged else {}),
    )
    ensure_watcher(ctx, instance_id)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- watching ---------------------------------------------------------------------------------
def ensure_watcher(ctx: Context, instance_id: str) -> None:
    task = ctx.watchers.get(instance_id)
    if task is None or task.done():
        ctx.watchers[instance_id] = ctx.spawn(
            watch_instance(ctx, instance_id), name=f"watch:{instance_id}"
        )


async def watch_instance(ctx: Context, instance_id: str) -> None:
    """One status round trip per cycle for all of an instance's jobs (and orphaned runs)."""
    failures = 0
    unheard: dict[str, float] = {}  # job -> since when (monotonic) its status line is missing
    while True:
        inst = ctx.store.instances.get(instance_id)
        if inst is None or inst.status in (InstanceStatus.LOST, InstanceStatus.DESTROYED):
            return
        running = st.running_jobs_on(ctx.store, instance_id)
        jobs = [j for j in running if not in_dispatch(ctx, j)]
        job_ids = {j.id for j in jobs}
        orphans = [j for j in st.orphans_on(ctx.store, instance_id) if j.id not in job_ids]
        if not jobs and not orphans:
            if not running:
                return
            await asyncio.sleep(0.05)  # a dispatch to this instance is under way
            continue
        try:
            statuses = await check_instance_jobs(ctx, inst, jobs, orphans)
        except SSHConnectionError as exc:
            failures += 1
            mark_unreachable(ctx, inst, exc)
            abandon_if_past_grace(ctx, inst)
            await asyncio.sleep(ctx.backoff.delay_s(min(failures, 6)))
            continue
        failures = 0
        mark_reachable(ctx, inst)
        if any(j.staged for j in jobs):
            try:
                await withdraw_staged(ctx, inst, jobs)
            except SSHConnectionError as exc:
                log.warning("job_withdraw_failed", instance=inst.id, error=str(exc))
        now = time.monotonic()
        for gone in unheard.keys() - job_ids:
            del unheard[gone]
        for job in jobs + orphans:
            status = statuses.get(job.id)
            if status is None and job.id in job_ids:
                unheard.setdefault(job.id, now)
            elif status is not None:
                unheard.pop(job.id, None)
            try:
                if status is None:
                    if job.id in job_ids:
                        await handle_missing_status(ctx, inst, job, now - unheard[job.id])
                elif job.id not in job_ids:
                    await handle_orphan_status(ctx, inst, job, status)
                else:
                    await handle_job_status(ctx, inst, job, status)
            except VastdError as exc:
                # Unreachable or odd answers: looked at again next cycle.
                log.warning("job_status_unhandled", job=job.id, instance=inst.id, error=str(exc))


async def check_instance_jobs(
    ctx: Context,
    inst: InstanceRecord,
    jobs: list[JobRecord],
    orphans: Sequence[JobRecord] = (),
) -> dict[str, RemoteJobStatus]:
    """The status of `jobs` and of the `orphans`' runs on `inst`, in one command; a job
    that exited 0 comes with its folder's listing (an orphan's collection lists its own)."""
    conn = await instance_connection(ctx, inst)
    watched = [*jobs, *orphans]
    entries = [(j.id, remote_job_paths(ctx.settings.remote.root, inst.id, j.id)) for j in watched]
    now = time.time()
    # Do not sleep past a job's deadline.
    deadlines = [
        (j.started_at or now) + ctx.settings.job.timeout_s - now
        for j in watched
        if j.started_at and j.state is JobState.RUNNING and j.instance == inst.id
    ]
    wait_s = max(0.0, min([ctx.watch_wait_s, *deadlines]))
    if any(j.kill_reason for j in watched):
        wait_s = 0.0
    regex = ctx.settings.job.progress_regex
    return await monitor_job_execution(
        conn,
        entries,
        wait_s=wait_s,
        timeout_s=wait_s + ctx.settings.ssh.command_timeout_s,
        progress=_compiled(regex) if regex else None,
        listing=_listing(ctx.settings.job.result_glob, ctx.settings.job.max_result_files),
        listed=range(len(jobs)),  # the jobs come first in `entries`
        # staged runs start only while vastd keeps looking (job_runner.build_launcher)
        lease=(
            f"{instance_root(ctx.settings.remote.root, inst.id)}/{LEASE_NAME}"
            if ctx.settings.job.stage_ahead
            else None
        ),
    )


@functools.cache
def _compiled(regex: str) -> re.Pattern[str]:
    return re.compile(regex)  # checked when the config was loaded


LISTED_FILES_MAX = 1000  # past this `[job] max_result_files`, collections list for themselves


@functools.cache
def _listing(pattern: str, max_files: int) -> str | None:
    # With the collection's own caps (collection.result_limits), so the listing is the one
    # it would take; a few thousand names at most, so the status output stays small.
    if max_files > LISTED_FILES_MAX:
        return None
    return listing_function(pattern, max_files=max_files)


LISTED_MAX = 4096  # listings waiting for their collection; past it, the oldest go


def keep_listing(ctx: Context, job_id: str, run: str | None, listing: tuple[str, ...]) -> None:
    """Keep a run's folder listing for its collection (`ctx.listed`), within `LISTED_MAX`."""
    ctx.listed.pop(job_id, None)
    while len(ctx.listed) >= LISTED_MAX:
        ctx.listed.pop(next(iter(ctx.listed)))
    ctx.listed[job_id] = (run, listing)


def _restart_or_requeue(ctx: Context, inst: InstanceRecord, job: JobRecord, why: str) -> None:
    if job.pgid is None:
        # A dispatch that broke off before the start (no folder yet, or a folder
        # with the input but no pid): start the same run again (idempotent).
        ctx.dispatch.claim(job.id, job.run_id)
        ctx.spawn(redispatch(ctx, job.id, inst.id, job.run_id), name=f"dispatch:{job.id}")
    else:
        # The run's folder vanished or was replaced under a started job: not its fault
        # the first time; again, a failed attempt (record_lost_run).
        log.warning("job_folder_vanished", job=job.id, instance=inst.id, reason=why)
        record_lost_run(ctx, job, reason=f"remote job folder {why}")


async def handle_job_status(
    ctx: Context, inst: InstanceRecord, job: JobRecord, status: RemoteJobStatus
) -> None:
    if not is_current(job, inst.id, job.run_id) or in_dispatch(ctx, job):
        return  # it changed while the status command ran
    staged_run = job.staged and status.exists and status.run == job.run_id
    if staged_run and not _staged_started(ctx, inst, job, status):
        return
    outcome = detect_job_completion(status)
    never_started = job.pgid is None and status.pid is None and status.exit_code is None
    if outcome is CompletionStatus.MISSING or (
        never_started and outcome is CompletionStatus.VANISHED
    ):
        _restart_or_requeue(ctx, inst, job, "vanished")
        return
    if job.run_id is not None and status.run != job.run_id:
        # Another run's folder (or one whose start never wrote its run file, or a job
        # that wrote a file named `run` in its folder).
        why = f"holds run {status.run or '(none)'}, not this run's {job.run_id}"
        _restart_or_requeue(ctx, inst, job, f"{why} (a job must not write vastd's `run` file)")
        return
    st.note_run_seen(ctx.store, job, status.pid)
    if status.progress_rows is not None:
        st.note_progress(ctx.store, job, status.progress_rows)
    if outcome is CompletionStatus.RUNNING:
        await _enforce_deadline(ctx, inst, job, status.run)
        return
    if status.timed_out:
        finish_run(ctx, job, exit_code=status.exit_code, error="timed out")
    elif outcome is CompletionStatus.SUCCEEDED:
        if status.listing is not None:
            keep_listing(ctx, job.id, status.run, status.listing)
        finish_run(ctx, job, exit_code=0, error=None)
    elif outcome is CompletionStatus.FAILED:
        finish_run(ctx, job, exit_code=status.exit_code, error=f"exit code {status.exit_code}")
    elif outcome is CompletionStatus.INVALID:
        finish_run(ctx, job, exit_code=None, error="exit_code file holds garbage")
    elif outcome is CompletionStatus.VANISHED:
        finish_run(ctx, job, exit_code=None, error="process gone without an exit code")


def past_deadline(ctx: Context, job: JobRecord, now: float | None = None) -> bool:
    """The job's run has been going longer than `[job] timeout_s` (vastd's clock)."""
    now = time.time() if now is None else now
    started = job.started_at or job.dispatched_at or now
    return now - started > ctx.settings.job.timeout_s


async def _enforce_deadline(
    ctx: Context, inst: InstanceRecord, job: JobRecord, run: str | None
) -> bool | None:
    """Kill the run once past its deadline (or once asked to): saved before it is sent;
    timed out (exit 124) unless it ended by itself first. True: timed out; False: the
    kill found it ended (or its folder gone); None: no kill sent (yet)."""
    if job.kill_reason is None and past_deadline(ctx, job):
        st.request_kill(ctx.store, job, "timed out")
    if job.kill_reason is None:
        return None
    if not await ctx.store.flush():
        return None  # write-ahead: kill once the record says so (next cycle)
    if not is_current(job, inst.id, run):
        return None
    conn = await instance_connection(ctx, inst)
    paths = remote_job_paths(ctx.settings.remote.root, inst.id, job.id)
    killed = await handle_job_timeout(conn, paths, timeout_s=ctx.settings.ssh.command_timeout_s)
    if not killed.exit_code_written and not killed.still_alive:
        # It ended by itself first (its own exit code is there) or its folder is
        # gone: the next look reads which, and a finished run is not thrown away.
        # (A group that outlives SIGKILL with no exit code written is timed out
        # here, or it would be killed again at every look.)
        return False
    log.warning("job_timed_out", job=job.id, instance=inst.id)
    if is_current(job, inst.id, run):
        finish_run(ctx, job, exit_code=124, error="timed out")
    return True


async def handle_missing_status(
    ctx: Context, inst: InstanceRecord, job: JobRecord, unheard_s: float
) -> None:
    """The instance's answer carried no well-formed line for the job (cut short, garbled),
    for `unheard_s` seconds now. Its deadline holds all the same (vastd's clock); past
    `[ssh] unreachable_grace_s` with no line, the run is taken as vanished."""
    if not is_current(job, inst.id, job.run_id) or in_dispatch(ctx, job):
        return
    waiting = job.staged and job.started_at is None  # its deadline counts from its start
    if not waiting and (job.kill_reason is not None or past_deadline(ctx, job)):
        run = job.run_id
        if await _enforce_deadline(ctx, inst, job, run) is not False:
            return  # timed out, or its kill waits for the save
        if not is_current(job, inst.id, run):
            return
        # It ended by itself first (its own exit code, maybe 0, is there) or its folder
        # is gone: the next line that comes reads which, and a finished run is not
        # thrown away. With no line for the grace, it is taken as vanished below.
    if unheard_s >= ctx.settings.ssh.unreachable_grace_s:
        error = f"no status line for it in {unheard_s:.0f}s of the instance's answers"
        log.warning("job_status_missing", job=job.id, instance=inst.id, error=error)
        finish_run(ctx, job, exit_code=None, error=error)


STAGED_KICK_S = 2.0  # the run before ended this long ago and the staged one still waits
STAGED_STUCK_S = 10.0  # claimed this long ago and still not launched


def _staged_started(
    ctx: Context, inst: InstanceRecord, job: JobRecord, status: RemoteJobStatus
) -> bool:
    """A staged run's status: True once it has started (it is a running job from now),
    False while it waits. A withdrawn one goes back to the queue. One whose run before
    has ended without starting it (killed, or gone with its instance's reboot) is
    started by vastd, through its idempotent staging."""
    if status.stage == "withdrawn":
        ctx.staged_waiting.pop(job.id, None)
        requeue(ctx, job, reason=job.kill_reason or "its staged run was withdrawn")
        return False
    now = time.monotonic()
    if status.pid is not None or status.exit_code is not None or status.started_at is not None:
        ctx.staged_waiting.pop(job.id, None)
        st.keep_staged_run(ctx.store, job)  # a withdrawal asked for came too late
        if st.note_staged_started(ctx.store, job, started_at=status.started_at):
            log.info("job_started", job=job.id, instance=inst.id, run=job.run_id, staged=True)
        return True
    if status.stage is None:
        # Claimed (`go`) but not launched: being started right now, or its launcher was
        # cut off (a reboot): after a while it is staged again (idempotent), and started.
        first = ctx.staged_waiting.setdefault(job.id, now)
        if now - first >= STAGED_STUCK_S:
            _kick(ctx, inst, job, "claimed, never launched")
        return False
    if job.staged_at is None:
        st.mark_job_staged(ctx.store, job.id, run_id=job.run_id)  # its answer was lost
    if job.kill_reason is not None:
        return False  # its withdrawal is under way
    if st.runs_ahead(ctx.store, inst, job):
        # A run before it in its slot still reads running (the one it waits behind, or
        # one further ahead whose exit, with those after it, came between two reads).
        ctx.staged_waiting.pop(job.id, None)
        return False
    first = ctx.staged_waiting.setdefault(job.id, now)
    if now - first >= STAGED_KICK_S:
        _kick(ctx, inst, job, "the run before it ended without starting it")
    return False


def _kick(ctx: Context, inst: InstanceRecord, job: JobRecord, why: str) -> None:
    """Start a staged run through its idempotent staging (same run id)."""
    ctx.staged_waiting.pop(job.id, None)
    log.info("job_staged_kicked", job=job.id, instance=inst.id, run=job.run_id, why=why)
    ctx.dispatch.claim(job.id, job.run_id)
    ctx.spawn(redispatch(ctx, job.id, inst.id, job.run_id), name=f"dispatch:{job.id}")


async def withdraw_staged(ctx: Context, inst: InstanceRecord, jobs: list[JobRecord]) -> int:
    """Withdraw the instance's staged runs that must not start here: those asked to
    (`kill_reason`: the run staged before them was cancelled) and, on a draining
    instance, all of them. Later runs of a slot go first. A withdrawn run is queued
    again (not an attempt); one that had started already runs on. Returns how many."""
    draining = inst.status is InstanceStatus.DRAINING
    order: list[JobRecord] = []
    for chain in st.slot_chains(ctx.store, inst):
        order.extend(
            j
            for j in reversed(chain)
            if j in jobs and j.staged and j.staged_at is not None and (draining or j.kill_reason)
        )
    if not order:
        return 0
    conn = await instance_connection(ctx, inst)
    root = ctx.settings.remote.root
    answers = await withdraw_staged_runs(
        conn,
        [(j.id, remote_job_paths(root, inst.id, j.id), j.run_id) for j in order],
        timeout_s=ctx.settings.ssh.command_timeout_s,
    )
    withdrawn = 0
    for job in order:
        answer = answers.get(job.id)
        if answer is None or not is_current(job, inst.id, job.run_id):
            continue
        if answer == "started":
            st.keep_staged_run(ctx.store, job)  # seen started by the next status check
            continue
        reason = job.kill_reason or f"withdrawn: instance {inst.id} is draining"
        if requeue(ctx, job, reason=reason):
            log.info("job_withdrawn", job=job.id, instance=inst.id, reason=reason)
            withdrawn += 1
    if withdrawn:
        ctx.wake_dispatch()
    return withdrawn


def finish_run(ctx: Context, job: JobRecord, *, exit_code: int | None, error: str | None) -> None:
    """The remote process ended: free the instance's slot and collect."""
    st.mark_job_exited(ctx.store, job.id, exit_code=exit_code, error=error)
    log.info("job_exited", job=job.id, instance=job.instance, exit_code=exit_code, error=error)
    schedule_result_collection(ctx.scheduler, job.id)
    ctx.wake_dispatch()


# --- the stuck-job sweep -----------------------------------------------------------------------
def detect_stuck_jobs(ctx: Context, now: float | None = None) -> list[str]:
    """Running jobs that nobody is watching or that are past their deadline."""
    now = time.time() if now is None else now
    stuck = []
    for job in ctx.store.jobs_in(JobState.RUNNING):
        watcher = ctx.watchers.get(job.instance or "")
        deadline = (job.started_at or job.dispatched_at or now) + ctx.settings.job.timeout_s
        if (
            (watcher is None or watcher.done()) and not in_dispatch(ctx, job)
        ) or now > deadline + 60:
            stuck.append(job.id)
    return stuck


def handle_system_failures(ctx: Context) -> int:
    """Watch again what nobody watches; requeue jobs left on instances that are gone.

    Instances holding orphaned runs are watched too (a collection that gave an
    instance up leaves its runs to this sweep). Returns how many instances were
    revived or given up.
    """
    touched: set[str | None] = set()
    for job_id in detect_stuck_jobs(ctx):
        job = ctx.store.jobs[job_id]
        inst = ctx.store.instances.get(job.instance or "")
        if inst is None or inst.status in st.GONE:
            requeue(ctx, job, reason="its instance is gone", orphan=inst is not None)
        else:
            ensure_watcher(ctx, inst.id)
        touched.add(job.instance)
    orphaned = set(ctx.store.orphan_load())
    for instance_id in orphaned:
        inst = ctx.store.instances.get(instance_id)
        watcher = ctx.watchers.get(instance_id)
        if inst is not None and inst.status not in st.GONE and (watcher is None or watcher.done()):
            ensure_watcher(ctx, instance_id)
            touched.add(instance_id)
    return len(touched)
