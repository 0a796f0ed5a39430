"""`[metrics] listen`: Prometheus text at `/metrics`, JSON health at `/healthz` (aiohttp).

The daemon starts the server after recovery and before its loops, and stops it first
at shutdown. A listen address that cannot be bound (a port in use) stops `vastd run`
at start-up with `MetricsListenError` naming the address.

`/metrics` comes from a `CollectorRegistry` of this daemon's own (never the global
one): the counters of vastd/utils/metrics.py, and `StoreCollector`, which reads the
store when scraped (no bookkeeping per event): job counts, instances per status, $/h,
spend, the event-loop lag histogram and the time of the latest progress. Scrapes run
on the event loop; each costs `store.counts()` and one pass over the instances.

`/healthz` answers 200 while the loops make progress, 503 otherwise (`health()`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vastd.core.state import InstanceStatus, JobState
from vastd.orchestration.context import Context
from vastd.utils import metrics
from vastd.utils.config import MetricsSettings
from vastd.utils.exceptions import VastdError
from vastd.utils.logging import get_logger
from vastd.utils.looplag import BOUNDS

log = get_logger("vastd.metrics")

# Instances that cost nothing any more: not counted in vastd_dph_total.
_NOT_IN_USE = frozenset({InstanceStatus.LOST, InstanceStatus.DESTROYED})
# Every 4th bucket of the loop-lag histogram (x2.44 apart: 0.1 ms to 65 s) is exported.
_LAG_EXPORTED = tuple(range(0, len(BOUNDS), 4))

# /healthz: a loop whose latest step finished longer ago than this is stuck.
LOOP_STALE_S = 120.0
# ... and the loop-lag ticker (every 0.1 s) longer ago than this: the loop is blocked
# or the ticker died.
TICK_STALE_S = 10.0
# The loops whose steps /healthz watches (each a utils/supervise.py run_loop). Their
# steps do no remote work inline; followups and discovery wait on SSH and the API, and
# a step of theirs may rightly take minutes while hosts do not answer.
WATCHED_LOOPS = ("dispatch", "preparation")


class MetricsListenError(VastdError):
    """`[metrics] listen` cannot be bound (a port in use, an address not on this host)."""


class StoreCollector(Collector):
    """The gauges of one daemon, read from its store and loop-lag monitor when scraped."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        store = self.ctx.store
        counts = store.counts()
        jobs = GaugeMetricFamily(
            "vastd_jobs", "Jobs per state, finished ones in history included", labels=["state"]
        )
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        per_status = dict.fromkeys(InstanceStatus, 0)
        dph = 0.0
        for inst in store.instances.values():
            per_status[inst.status] += 1
            if inst.status not in _NOT_IN_USE:
                dph += inst.dph
        instances = GaugeMetricFamily("vastd_instances", "Instances per status", labels=["status"])
        for status, n in per_status.items():
            instances.add_metric([status.value], n)
        yield instances
        yield GaugeMetricFamily(
            "vastd_dph_total", "Current $/h of the instances in use (not lost or destroyed)", dph
        )
        yield CounterMetricFamily(
            "vastd_spend_dollars",
            "Dollars accrued by the instances this vastd rented",
            store.snapshot.spend_total,
        )

        lag = self.ctx.loop_lag.total
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        upto = 0
        for i in _LAG_EXPORTED:
            cumulative += sum(lag.counts[upto : i + 1])
            upto = i + 1
            buckets.append((repr(BOUNDS[i]), cumulative))
        buckets.append(("+Inf", lag.total))
        yield HistogramMetricFamily(
            "vastd_event_loop_lag_seconds",
            "How late a 0.1 s timer of the event loop wakes, since the daemon started",
            buckets=buckets,
            sum_value=lag.sum_s,
        )
        yield GaugeMetricFamily(
            "vastd_last_progress_timestamp_seconds",
            "Epoch seconds of the latest job state change (the daemon's start before any)",
            metrics.last_progress(),
        )


def build_registry(ctx: Context) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    metrics.register_counters(registry)
    registry.register(StoreCollector(ctx))
    return registry


def health(
    ctx: Context, *, started: float, now: float | None = None
) -> tuple[bool, dict[str, Any]]:
    """(healthy, the /healthz JSON). `started`, `now`: time.monotonic().

    Healthy: the loop-lag ticker sampled within TICK_STALE_S; each of WATCHED_LOOPS
    finished a step within LOOP_STALE_S (counted from the start until its first);
    the latest snapshot write did not fail (`save_error` is None).
    """
    now = time.monotonic() if now is None else now
    problems: list[str] = []
    tick = ctx.loop_lag.last_tick
    tick_age = now - (tick if tick is not None else started)
    if tick_age > TICK_STALE_S:
        problems.append(f"the loop-lag ticker has not run for {tick_age:.1f} s")
    beats = metrics.beats()
    loops: dict[str, float] = {}
    for name in WATCHED_LOOPS:
        age = now - max(beats.get(name, started), started)
        loops[name] = round(age, 3)
        if age > LOOP_STALE_S:
            problems.append(f"the {name} loop has not finished a step for {age:.0f} s")
    store = ctx.store
    if store.save_error is not None:
        problems.append(f"state not saved: {store.save_error}")
    stats = ctx.loop_lag.stats()
    body: dict[str, Any] = {
        "status": "ok" if not problems else "unhealthy",
        "problems": problems,
        "uptime_s": round(now - started, 3),
        "loop_lag": {
            "p50_ms": round(stats.p50_s * 1000, 3),
            "p99_ms": round(stats.p99_s * 1000, 3),
            "max_ms": round(stats.max_s * 1000, 3),
            "samples": stats.samples,
            "last_tick_age_s": round(tick_age, 3),
        },
        "loops_last_step_age_s": loops,
        "save_error": store.save_error,
        "saves": store.writes,
        "save_failures": store.write_failures,
        "last_progress": metrics.last_progress(),
        "jobs": store.counts(),
        "instances": len(store.instances),
    }
    return not problems, body


@dataclass(eq=False)
class MetricsServer:
    """The aiohttp server of /metrics and /healthz for one daemon."""

    ctx: Context
    host: str
    port: int
    registry: CollectorRegistry = field(init=False)
    started: float = field(init=False, default_factory=time.monotonic)
    _runner: web.AppRunner | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.registry = build_registry(self.ctx)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, body = health(self.ctx, started=self.started)
        return web.Response(
            text=json.dumps(body, sort_keys=True),
            status=200 if ok else 503,
            content_type="application/json",
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        # shutdown_timeout: a scrape in flight at shutdown gets a second, not aiohttp's 60
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise MetricsListenError(
                f"metrics.listen {where}: cannot listen: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        self.started = time.monotonic()
        metrics.note_progress()
        log.info("metrics_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_metrics_server(ctx: Context, settings: MetricsSettings) -> MetricsServer | None:
    """The started server of `[metrics] listen`, or None when it is "" (off)."""
    address = settings.address()
    if address is None:
        return None
    server = MetricsServer(ctx, *address)
    await server.start()
    return server
