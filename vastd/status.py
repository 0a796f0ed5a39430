"""`vastd status`: what the snapshot and the folders say, whether or not the daemon runs.

A fresh process runs it, often from scripts, so it imports little: the records, not the
daemon's store (core/snapshot.py, core/state.py bring asyncio), nor the inbox watcher
(core/jobs.py, core/inbox.py bring watchfiles). The snapshot is read through
core/snapshot_file.py, as the store reads it; `inbox_waiting` counts the inbox the way
core/jobs.py lists it (tests/test_status.py compares).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vastd.core.files import Layout, is_candidate_name, utc_iso
from vastd.core.lock import root_locked
from vastd.core.records import InstanceStatus, JobState, Snapshot
from vastd.core.snapshot_file import read_snapshot
from vastd.instances.monitoring import get_instance_summary
from vastd.utils.exceptions import FileOperationError


def daemon_running(layout: Layout) -> bool | None:
    """Whether a daemon holds this root's lock (None: cannot tell)."""
    return root_locked(layout.root)


def build_status(
    layout: Layout,
    snapshot: Snapshot,
    now: float | None = None,
    *,
    idle_timeout_s: float = 0.0,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    # Finished jobs in history.jsonl are counted by the snapshot's summary (no parse).
    past = snapshot.history
    jobs = {s.value: 0 for s in JobState}
    for job in snapshot.jobs.values():
        jobs[job.state.value] += 1
    jobs[JobState.DONE.value] += past.done
    jobs[JobState.FAILED.value] += past.failed
    try:
        waiting_in_inbox = inbox_waiting(layout.inbox)
    except OSError:
        waiting_in_inbox = 0
    total = sum(jobs.values())
    finished = jobs["done"] + jobs["failed"]
    durations = [
        j.finished_at - j.dispatched_at
        for j in snapshot.jobs.values()
        if j.state is JobState.DONE and j.finished_at and j.dispatched_at
    ]
    timed = len(durations) + past.done_timed
    duration_sum = sum(durations) + past.done_duration_s
    live = [
        i
        for i in snapshot.instances.values()
        if i.status not in (InstanceStatus.LOST, InstanceStatus.DESTROYED)
    ]
    usable = [i for i in live if i.status is InstanceStatus.READY]
    remaining = total - finished + waiting_in_inbox
    eta_s: float | None = None
    if timed and remaining and usable:
        per_job = duration_sum / timed
        per_slot = max(1, len(usable))
        eta_s = round(per_job * remaining / per_slot, 1)
    instances = [
        get_instance_summary(inst)
        for inst in sorted(snapshot.instances.values(), key=lambda i: i.id)
    ]
    dph_now = round(sum(i.dph for i in live), 4)
    # What finishing costs at today's rate: the work left, then the idle tail before teardown.
    if remaining:
        cost_to_finish = dph_now * ((eta_s or 0.0) + idle_timeout_s) / 3600
    else:
        cost_to_finish = sum(
            i.dph * max(0.0, idle_timeout_s - (now - (i.idle_since or now))) / 3600
            for i in live
            if i.owned and not i.current_jobs
        )
    return {
        "saved_at": utc_iso(snapshot.saved_at),
        "daemon_running": daemon_running(layout),
        "jobs": jobs,
        "inbox_waiting": waiting_in_inbox,
        "total_jobs": total,
        "progress": round(finished / total, 4) if total else None,
        "eta_s": eta_s,
        "instances": instances,
        "totals": {
            "instances": len(live),
            "ready": len(usable),
            "dph_now": dph_now,
            "spend_total": round(snapshot.spend_total, 4),
            "cost_to_finish": round(cost_to_finish, 4)
            if eta_s is not None or not remaining
            else None,
        },
    }


def inbox_waiting(directory: Path) -> int:
    """How many entries `discover_job_files(directory)` would list (core/jobs.py)."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if is_candidate_name(e.name))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise FileOperationError(f"cannot list {directory}: {exc}") from exc


def load_snapshot_readonly(layout: Layout) -> Snapshot:
    """The snapshot as on disk (backup if needed), without writing anything."""
    return read_snapshot(layout.state_file)[0]


def format_status(status: dict[str, Any]) -> str:
    j = status["jobs"]
    lines = [
        f"jobs: queued {j['queued']}  running {j['running']}  collecting {j['collecting']}  "
        f"done {j['done']}  failed {j['failed']}  (inbox {status['inbox_waiting']})",
    ]
    if status["progress"] is not None:
        eta = status["eta_s"]
        eta_txt = f"  eta {eta:.0f}s" if eta is not None else ""
        lines.append(
            f"progress: {status['progress'] * 100:.1f}% of {status['total_jobs']}{eta_txt}"
        )
    t = status["totals"]
    finish = t["cost_to_finish"]
    finish_txt = f"  about ${finish:.2f} to finish" if finish is not None else ""
    lines.append(
        f"instances: {t['instances']} ({t['ready']} ready)  ${t['dph_now']:.3f}/h now  "
        f"spent ${t['spend_total']:.2f}{finish_txt}"
    )
    for inst in status["instances"]:
        jobs = ",".join(inst["current_jobs"]) or "-"
        extra = f"  error: {inst['prepare_error']}" if inst["prepare_error"] else ""
        lines.append(
            f"  {inst['id']:>10}  {inst['state']:<11} ${inst['dph']:.3f}/h  "
            f"last seen {inst['last_seen'] or '-'}  job {jobs}{extra}"
        )
    running = status["daemon_running"]
    state = {True: "running", False: "not running", None: "unknown"}[running]
    lines.append(f"daemon: {state}; snapshot saved {status['saved_at'] or 'never'}")
    return os.linesep.join(lines)


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
