"""The event-loop lag monitor: sees a blocked loop, reports periodically and at shutdown."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from structlog.testing import capture_logs

from vastd.orchestration.context import build_context
from vastd.orchestration.workflow import supervisors
from vastd.utils.config import Settings
from vastd.utils.looplag import BOUNDS, LagHistogram, LoopLagMonitor


def test_histogram_quantiles_are_bounded_by_the_buckets_and_the_max() -> None:
    hist = LagHistogram()
    assert math.isnan(hist.quantile(0.5))
    assert hist.stats().samples == 0
    for _ in range(98):
        hist.add(0.001)
    hist.add(0.5)
    hist.add(2.0)
    stats = hist.stats()
    assert stats.samples == 100
    assert stats.max_s == 2.0
    # 1 ms falls in the bucket (0.98 ms, 1.22 ms]: the median is inside it
    assert 0.0009 <= stats.p50_s <= 0.00123
    assert 0.4 <= stats.p99_s <= 0.5 * 1.25  # within the 0.5 s sample's bucket (25% wide)
    assert hist.quantile(1.0) == 2.0
    hist.add(1e6)  # past the last bucket: counted, the max is exact
    assert hist.counts[-1] == 1 and hist.max_s == 1e6
    assert len(hist.counts) == len(BOUNDS) + 1


async def test_a_blocked_loop_shows_as_lag() -> None:
    """The loop blocked for 0.3 s: the monitor's max lag is at least 0.25 s."""
    monitor = LoopLagMonitor(interval_s=0.01, report_s=3600)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.05)
    quiet = monitor.stats()
    assert quiet.samples >= 2
    time.sleep(0.3)  # the point: block the loop
    await asyncio.sleep(0.05)
    with capture_logs() as logs:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    stats = monitor.stats()
    assert stats.max_s >= 0.25
    assert stats.samples > quiet.samples
    assert stats.p50_s < 0.05  # one blocked sample among many quick ones
    final = [e for e in logs if e["event"] == "loop_lag"]
    assert len(final) == 1 and final[0]["final"] is True
    assert final[0]["max_ms"] >= 250
    assert final[0]["samples"] == stats.samples
    assert {"p50_ms", "p99_ms", "window_p99_ms", "window_max_ms"} <= set(final[0])


async def test_reports_periodically_with_a_fresh_window() -> None:
    monitor = LoopLagMonitor(interval_s=0.01, report_s=0.05)
    with capture_logs() as logs:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    reports = [e for e in logs if e["event"] == "loop_lag"]
    assert len(reports) >= 3
    assert [e["final"] for e in reports].count(True) == 1
    assert reports[-1]["samples"] > reports[0]["samples"]


async def test_the_daemon_runs_the_monitor_from_its_context(tmp_path: Path) -> None:
    settings = Settings(paths={"root": str(tmp_path)})  # type: ignore[arg-type]
    ctx = build_context(settings, api=None)
    try:
        loops = dict(supervisors(ctx))
        assert loops["loop_lag"] == ctx.loop_lag.run
    finally:
        await ctx.pool.aclose()
