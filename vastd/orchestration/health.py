"""The health loop: probe ready instances, drain the unhealthy, undrain the recovered.

Policy: an instance whose free disk is below `[fleet] min_free_disk_gb` is DRAINING
(the dispatcher gives jobs to READY instances only; its running jobs finish) until
the disk recovers; one whose probe fails HEALTH_FAILURES_MAX times in a row is
DRAINING too. The fleet destroys an owned DRAINING instance once it holds no job.
Instances vastd does not own are only drained, never touched. The probe and its
parsing are instances/monitoring.py's.
"""

from __future__ import annotations

import asyncio

from vastd.core import state as st
from vastd.core.state import InstanceRecord, InstanceStatus
from vastd.instances.monitoring import (
    DRAIN_LOW_DISK,
    DRAIN_UNHEALTHY,
    HEALTH_DRAINS,
    HEALTH_FAILURES_MAX,
    HEALTH_TIMEOUT_S,
    HealthStatus,
    Issue,
    UtilizationMetrics,
    check_disk_space,
    check_memory_usage,
    detect_instance_issues,
    get_instance_utilization,
    probe_instance,
)
from vastd.orchestration.actions import instance_connection
from vastd.orchestration.context import Context
from vastd.utils.exceptions import SSHConnectionError
from vastd.utils.logging import get_logger
from vastd.utils.supervise import run_loop

log = get_logger("vastd.monitoring")


def min_free_disk_gb(ctx: Context) -> float:
    return ctx.settings.fleet.min_free_disk_gb


async def check_instance_health(ctx: Context, inst: InstanceRecord) -> HealthStatus:
    """Probe one instance over its pooled connection (one command)."""
    timeout_s = min(HEALTH_TIMEOUT_S, ctx.settings.ssh.command_timeout_s)
    try:
        conn = await instance_connection(ctx, inst)
        probe = await probe_instance(conn, ctx.settings.remote.root, timeout_s=timeout_s)
    except SSHConnectionError as exc:
        return HealthStatus(inst.id, False, issues=[Issue("unreachable", str(exc), True)])
    except ValueError as exc:
        return HealthStatus(inst.id, True, issues=[Issue("probe_failed", str(exc), True)])
    return HealthStatus(
        inst.id,
        True,
        disk=check_disk_space(probe),
        memory=check_memory_usage(probe),
        utilization=get_instance_utilization(probe),
        issues=detect_instance_issues(probe, min_free_disk_gb=min_free_disk_gb(ctx)),
    )


def _drain(ctx: Context, inst: InstanceRecord, reason: str, detail: str) -> None:
    st.drain_instance(ctx.store, inst, reason, requeue_jobs=False)
    log.info("instance_unhealthy", instance=inst.id, reason=reason, detail=detail)


def note_gpus(ctx: Context, inst: InstanceRecord, util: UtilizationMetrics | None) -> None:
    """Where nvidia-smi answered in full, its GPU indices are the instance's GPUs (one
    job per GPU places jobs on them); an error or no nvidia-smi changes nothing."""
    if util is None or not util.gpu_present or util.error or not util.gpus:
        return
    indices = sorted({g.index for g in util.gpus})
    if indices != inst.gpu_indices:
        inst.gpu_indices = indices
        log.info("instance_gpus", instance=inst.id, gpus=len(indices), num_gpus=inst.num_gpus)
        ctx.wake_dispatch()


def watch_gpu_idle(
    ctx: Context, inst: InstanceRecord, util: UtilizationMetrics | None, now: float
) -> None:
    """`[job] gpu_idle_s`: a started job whose GPUs (its own with one job per GPU, else
    every GPU listed) all read 0% at each check for that long is flagged `gpu_idle`
    (`job_gpu_idle`, once) for the operator, never killed; any reading above 0 clears
    it. "[N/A]" is not 0: an unknown reading never flags a job."""
    limit = ctx.settings.job.gpu_idle_s
    if limit <= 0 or util is None or util.error or not util.gpus:
        return
    readings = {g.index: g.utilization_pct for g in util.gpus}
    for job in st.running_jobs_on(ctx.store, inst.id):
        if job.started_at is None:
            continue
        mine = [readings.get(g) for g in (job.gpus or sorted(readings))]
        if not mine or any(r != 0 for r in mine):
            if job.gpu_idle:
                log.info("job_gpu_busy_again", job=job.id, instance=inst.id)
            if job.gpu_idle_since is not None or job.gpu_idle:
                job.gpu_idle_since, job.gpu_idle = None, False
            continue
        if job.gpu_idle_since is None:
            job.gpu_idle_since = now
        if not job.gpu_idle and now - job.gpu_idle_since >= limit:
            job.gpu_idle = True
            log.warning(
                "job_gpu_idle",
                job=job.id,
                instance=inst.id,
                gpus=",".join(str(g) for g in job.gpus) or "all",
                idle_s=round(now - job.gpu_idle_since, 1),
            )


async def monitor_instance_status(ctx: Context, inst: InstanceRecord) -> InstanceStatus:
    """Check an instance's health and apply the drain policy; returns its status."""
    health = await check_instance_health(ctx, inst)
    if inst.status not in (InstanceStatus.READY, InstanceStatus.DRAINING):
        return inst.status  # changed while we probed: the probe says nothing now
    inst.health_checked_at = health.checked_at
    ctx.store.mark_dirty()
    if health.probe_failed:
        inst.health_failures += 1
        detail = "; ".join(i.message for i in health.issues)
        log.info("instance_health_failed", instance=inst.id, failures=inst.health_failures)
        if inst.health_failures >= HEALTH_FAILURES_MAX and inst.status is InstanceStatus.READY:
            _drain(ctx, inst, DRAIN_UNHEALTHY, detail)
        return inst.status
    inst.health_failures = 0
    note_gpus(ctx, inst, health.utilization)
    watch_gpu_idle(ctx, inst, health.utilization, health.checked_at)
    if health.disk is not None:
        inst.disk_free_gb = round(health.disk.free_gb, 3)
    low = [i for i in health.issues if i.kind == "low_disk"]
    if low and inst.status is InstanceStatus.READY:
        _drain(ctx, inst, DRAIN_LOW_DISK, low[0].message)
    elif not low and inst.status is InstanceStatus.DRAINING and inst.drain_reason in HEALTH_DRAINS:
        st.undrain_instance(ctx.store, inst)
        log.info("instance_healthy_again", instance=inst.id)
        ctx.wake_dispatch()
    return inst.status


async def health_once(ctx: Context, *, max_concurrent: int = 8) -> dict[str, InstanceStatus]:
    """Check every ready (or health-drained) instance; returns their statuses after."""
    targets = [
        i
        for i in ctx.store.instances.values()
        if i.status is InstanceStatus.READY
        or (i.status is InstanceStatus.DRAINING and i.drain_reason in HEALTH_DRAINS)
    ]
    limit = asyncio.Semaphore(max_concurrent)

    async def one(inst: InstanceRecord) -> InstanceStatus:
        async with limit:
            return await monitor_instance_status(ctx, inst)

    results = await asyncio.gather(*(one(i) for i in targets))
    return {i.id: r for i, r in zip(targets, results, strict=True)}


async def run_health(ctx: Context, *, interval_s: float | None = None) -> None:
    """The health loop: `health_once` every `[fleet] health_interval_s` (default 60 s)."""
    if interval_s is None:
        interval_s = ctx.settings.fleet.health_interval_s
    await run_loop("health", lambda: health_once(ctx), interval_s=interval_s)
