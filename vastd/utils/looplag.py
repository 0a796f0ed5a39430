"""Event-loop lag measured inside the daemon: how late a fixed sleep wakes up.

`LoopLagMonitor.run()` sleeps `interval_s` (0.1 s) in a loop and records how much
later than asked it woke: the time the loop was busy with something else (a long
callback, a blocking call). Samples go into a fixed-bucket histogram (geometric
buckets from 0.1 ms to about 60 s, so memory and cost per sample are constant for
weeks), one for the whole run and one since the last report. Every `report_s`
(60 s) and once when the task is cancelled (shutdown) it logs `loop_lag` with
`p50_ms`, `p99_ms`, `max_ms`, `samples` (since start) and `window_p99_ms`,
`window_max_ms` (since the previous report).

The monitor is an object on the Context (`ctx.loop_lag`), so other code (a metrics
endpoint exporting `vastd_event_loop_lag_seconds`) can read `stats()` or the
histogram's `bounds` / `counts` directly. Cost: one timer and a `bisect` per
interval, about 10 wake-ups a second.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from dataclasses import dataclass

from vastd.utils.logging import get_logger

log = get_logger("vastd.looplag")

# Bucket upper bounds in seconds: 0.1 ms x 1.25^k up to about 60 s (61 buckets), then +inf.
_FIRST_S = 1e-4
_FACTOR = 1.25
BOUNDS: tuple[float, ...] = tuple(_FIRST_S * _FACTOR**k for k in range(61))


@dataclass(frozen=True)
class LagStats:
    samples: int
    p50_s: float
    p99_s: float
    max_s: float
    sum_s: float

    def as_log_fields(self, prefix: str = "") -> dict[str, float | int]:
        return {
            f"{prefix}p50_ms": round(self.p50_s * 1000, 3),
            f"{prefix}p99_ms": round(self.p99_s * 1000, 3),
            f"{prefix}max_ms": round(self.max_s * 1000, 3),
            f"{prefix}samples": self.samples,
        }


class LagHistogram:
    """Counts of lag samples per fixed bucket (`BOUNDS`, then one overflow bucket)."""

    __slots__ = ("counts", "max_s", "sum_s", "total")

    bounds = BOUNDS

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def add(self, lag_s: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, lag_s)] += 1
        self.total += 1
        self.sum_s += lag_s
        if lag_s > self.max_s:
            self.max_s = lag_s

    def quantile(self, q: float) -> float:
        """The q-quantile, interpolated linearly inside its bucket (never above the max)."""
        if not self.total:
            return math.nan
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                lo = BOUNDS[i - 1] if i > 0 else 0.0
                hi = BOUNDS[i] if i < len(BOUNDS) else self.max_s
                value = lo + (hi - lo) * max(0.0, rank - seen) / count
                return min(value, self.max_s)
            seen += count
        return self.max_s

    def stats(self) -> LagStats:
        return LagStats(
            samples=self.total,
            p50_s=self.quantile(0.5) if self.total else 0.0,
            p99_s=self.quantile(0.99) if self.total else 0.0,
            max_s=self.max_s,
            sum_s=self.sum_s,
        )


class LoopLagMonitor:
    """Measures the running loop's lag; `run()` is the daemon's `loop_lag` supervisor."""

    def __init__(self, *, interval_s: float = 0.1, report_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.report_s = report_s
        self.total = LagHistogram()
        self.window = LagHistogram()
        # time.monotonic() of the latest sample: /healthz tells a stopped ticker by it
        self.last_tick: float | None = None

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.last_tick = time.monotonic()
        self.total.add(lag_s)
        self.window.add(lag_s)

    def stats(self) -> LagStats:
        """Since the monitor started."""
        return self.total.stats()

    def report(self, *, final: bool = False) -> None:
        """Log `loop_lag` (totals since start, and the window since the last report)."""
        fields = self.stats().as_log_fields()
        fields.update(self.window.stats().as_log_fields("window_"))
        del fields["window_samples"], fields["window_p50_ms"]
        log.info("loop_lag", final=final, **fields)
        self.window = LagHistogram()

    async def run(self) -> None:
        """Sample until cancelled; report every `report_s` and once when cancelled."""
        loop = asyncio.get_running_loop()
        next_report = loop.time() + self.report_s
        try:
            while True:
                asked = loop.time() + self.interval_s
                await asyncio.sleep(self.interval_s)
                now = loop.time()
                self.record(now - asked)
                if now >= next_report:
                    self.report()
                    next_report = now + self.report_s
        except asyncio.CancelledError:
            self.report(final=True)
            raise
