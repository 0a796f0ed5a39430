"""`vastd status` figures computed from a snapshot: money left to spend."""

from __future__ import annotations

import time
from pathlib import Path

from vastd.core.files import Layout
from vastd.core.state import InstanceRecord, InstanceStatus, JobRecord, JobState, Snapshot
from vastd.status import build_status


def _snapshot(now: float, *, queued: int, done_s: float | None) -> Snapshot:
    snap = Snapshot()
    for i in range(queued):
        snap.jobs[f"q{i}"] = JobRecord(id=f"q{i}", file_name=f"q{i}.csv")
    if done_s is not None:
        snap.jobs["d"] = JobRecord(
            id="d",
            file_name="d.csv",
            state=JobState.DONE,
            dispatched_at=now - done_s,
            finished_at=now,
        )
    snap.instances["1"] = InstanceRecord(
        id="1", status=InstanceStatus.READY, dph=0.5, owned=True, idle_since=now - 100
    )
    return snap


def test_cost_to_finish_is_remaining_work_plus_the_idle_tail(tmp_path: Path) -> None:
    """With 3 jobs queued, one 600 s job done and one $0.50/h instance, finishing costs
    (3 x 600 s + idle timeout) at $0.50/h."""
    now = time.time()
    status = build_status(
        Layout(tmp_path), _snapshot(now, queued=3, done_s=600), now, idle_timeout_s=600
    )
    assert status["eta_s"] == 1800
    assert abs(status["totals"]["cost_to_finish"] - 0.5 * (1800 + 600) / 3600) < 1e-3


def test_cost_to_finish_with_nothing_left_is_the_idle_tail_only(tmp_path: Path) -> None:
    """Nothing queued: only the idle time left before teardown is still to pay."""
    now = time.time()
    status = build_status(
        Layout(tmp_path), _snapshot(now, queued=0, done_s=600), now, idle_timeout_s=600
    )
    assert abs(status["totals"]["cost_to_finish"] - 0.5 * 500 / 3600) < 1e-3
