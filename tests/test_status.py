"""`vastd status` figures computed from a snapshot: money left to spend."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vastd.core.files import Layout
from vastd.core.jobs import discover_job_files
from vastd.core.state import (
    InstanceRecord,
    InstanceStatus,
    JobRecord,
    JobState,
    Snapshot,
    StateStore,
)
from vastd.status import build_status, inbox_waiting, load_snapshot_readonly
from vastd.utils.exceptions import StateManagementError


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


# --- the light read: as the store and discover_job_files, without importing them ----------
def _store_snapshot_or_error(layout: Layout) -> object:
    try:
        return StateStore.open(layout.state_file, read_only=True).snapshot.model_dump()
    except StateManagementError as exc:
        return str(exc)


def _light_snapshot_or_error(layout: Layout) -> object:
    try:
        return load_snapshot_readonly(layout).model_dump()
    except StateManagementError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("state", "backup"),
    [
        (None, None),
        ("good", None),
        ("{broken", "good"),
        ('{"version": 99}', "good"),
        ("{broken", ""),
        ('{"version": 2, "jobs": {"x": {}}}', None),
        (None, "good"),
    ],
)
def test_status_reads_the_snapshot_as_the_store_does(
    tmp_path: Path, state: str | None, backup: str | None
) -> None:
    """load_snapshot_readonly gives what StateStore.open(read_only=True) gives: the file,
    else its backup, else the same refusal; nothing is written."""
    layout = Layout(tmp_path)
    good = _snapshot(time.time(), queued=2, done_s=60).model_dump_json()
    for path, text in ((layout.state_file, state), (layout.state_backup, backup)):
        if text is not None:
            path.write_text(good if text == "good" else text)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _light_snapshot_or_error(layout) == _store_snapshot_or_error(layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_status_counts_the_inbox_as_discover_job_files(tmp_path: Path) -> None:
    """Dot-files, temp names and other suffixes do not count; symlinks and folders do."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.csv", "b.csv", ".hidden.csv", ".csv", "c.csv.part", "d.tmp", "e.CSV"):
        (inbox / name).write_text("x\n")
    (inbox / ".vastd-tmp-1.csv").write_text("x\n")
    (inbox / "folder.csv").mkdir()
    (inbox / "link.csv").symlink_to(inbox / "a.csv")
    assert inbox_waiting(inbox) == len(discover_job_files(inbox)) == 4
    assert inbox_waiting(tmp_path / "missing") == len(discover_job_files(tmp_path / "missing"))
