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
from vastd.core.records import InstanceRecord, InstanceStatus, JobState, Snapshot
from vastd.core.snapshot_file import read_snapshot
from vastd.instances.monitoring import get_instance_summary
from vastd.utils.exceptions import FileOperationError
from vastd.views import failed_stems, money


def daemon_running(layout: Layout) -> bool | None:
    """Whether a daemon holds this root's lock (None: cannot tell)."""
    return root_locked(layout.root)


def build_status(
    layout: Layout,
    snapshot: Snapshot,
    now: float | None = None,
    *,
    idle_timeout_s: float = 0.0,
    all_instances: bool = False,
) -> dict[str, Any]:
    """The figures of `vastd status`. Destroyed instances are left out of `instances`
    unless `all_instances` (they bill nothing any more)."""
    now = time.time() if now is None else now
    # Finished jobs in history.jsonl are counted by the snapshot's summary (no parse).
    past = snapshot.history
    jobs = {s.value: 0 for s in JobState}
    for job in snapshot.jobs.values():
        jobs[job.state.value] += 1
    jobs[JobState.DONE.value] += past.done
    jobs[JobState.FAILED.value] += past.failed
    refused = refused_count(layout, snapshot)
    jobs[JobState.FAILED.value] += refused
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
        {**get_instance_summary(inst), **instance_cost(inst, now)}
        for inst in sorted(snapshot.instances.values(), key=lambda i: i.id)
        if all_instances or inst.status is not InstanceStatus.DESTROYED
    ]
    in_flight = [
        {
            "id": j.id,
            "state": j.state.value,
            "instance": j.instance,
            "rows": j.rows,
            "progress_rows": j.progress_rows,
            "progress_at": utc_iso(j.progress_at),
            "gpus": list(j.gpus),
            "gpu_idle": j.gpu_idle and j.state is JobState.RUNNING,
            "gpu_idle_since": utc_iso(j.gpu_idle_since) if j.gpu_idle else None,
        }
        for j in snapshot.jobs.values()
        if j.state in (JobState.RUNNING, JobState.COLLECTING)
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
        "refused": refused,
        "running_jobs": in_flight,
        "inbox_waiting": waiting_in_inbox,
        "total_jobs": total,
        "progress": round(finished / total, 4) if total else None,
        "eta_s": eta_s,
        "instances": instances,
        "renting": renting_status(snapshot, now),
        "totals": {
            "instances": len(live),
            "ready": len(usable),
            "dph_now": dph_now,
            "spend_total": round(snapshot.spend_total, 4),
            # adopted instances bill the account, not vastd's ledger (spend_total)
            "dph_owned": round(sum(i.dph for i in live if i.owned), 4),
            "dph_adopted": round(sum(i.dph for i in live if not i.owned), 4),
            "adopted": sum(1 for i in live if not i.owned),
            "cost_to_finish": round(cost_to_finish, 4)
            if eta_s is not None or not remaining
            else None,
        },
    }


def instance_cost(inst: InstanceRecord, now: float) -> dict[str, Any]:
    """What an instance has cost at its current $/h: an owned one from its rent to its
    destroy (or now); an adopted one, which vastd did not rent and whose bill is the
    account's, since vastd first saw it (or until it was last listed, once lost)."""
    if inst.owned:
        start = inst.rented_at or inst.first_seen
        end = inst.destroyed_at if inst.status is InstanceStatus.DESTROYED else None
    else:
        start = inst.first_seen
        end = inst.last_seen if inst.status is InstanceStatus.LOST else None
    hours = max(0.0, ((end or now) - start) / 3600.0)
    return {
        "billing": "rented by vastd" if inst.owned else "adopted",
        "cost": round(inst.dph * hours, 4),
    }


def renting_status(snapshot: Snapshot, now: float) -> dict[str, Any]:
    """The rental circuit breaker: rentals in a row that never became ready, and the pause
    they caused (`paused_until` None when renting is not paused)."""
    until = snapshot.rent_paused_until
    paused = until is not None and until > now
    return {
        "paused": paused,
        "paused_until": utc_iso(until) if paused else None,
        "reason": snapshot.rent_pause_reason if paused else None,
        "failed_rentals": snapshot.failed_rentals,
    }


def refused_count(layout: Layout, snapshot: Snapshot) -> int:
    """Files in failed/ that no job record owns (refused at acceptance), without reading
    history.jsonl: each failed job there owns one stem, so those are subtracted."""
    try:
        stems = failed_stems(layout.failed)
    except OSError:
        return 0
    owned = {j.failed_stem or j.id for j in snapshot.jobs.values() if j.state is JobState.FAILED}
    owned |= {j.earlier_failed_stem for j in snapshot.jobs.values() if j.earlier_failed_stem}
    return max(0, len(set(stems) - owned) - snapshot.history.failed)


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


def progress_bar(fraction: float | None, width: int = 30) -> str:
    """`[#########---------------------]  30.0%` (empty and `-` when unknown)."""
    if fraction is None:
        return f"[{'-' * width}]     -"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:5.1f}%"


def format_status(status: dict[str, Any]) -> str:
    running = status["daemon_running"]
    j = status["jobs"]
    refused = status.get("refused", 0)
    refused_txt = f" ({refused} refused)" if refused else ""
    lines = [
        f"jobs: queued {j['queued']}  running {j['running']}  collecting {j['collecting']}  "
        f"done {j['done']}  failed {j['failed']}{refused_txt}  (inbox {status['inbox_waiting']})",
    ]
    if status["progress"] is not None:
        eta = status["eta_s"]
        eta_txt = f"  eta {eta:.0f}s" if eta is not None else ""
        lines.append(
            f"progress: {status['progress'] * 100:.1f}% of {status['total_jobs']}{eta_txt}"
        )
    for job in status.get("running_jobs", []):
        if job.get("gpu_idle"):
            gpus = ",".join(str(g) for g in job.get("gpus", [])) or "all"
            lines.append(
                f"  {job['id']}  GPU IDLE (0% since {job.get('gpu_idle_since') or '-'})"
                f"  on {job['instance'] or '-'} gpus {gpus}"
            )
        if job["progress_rows"] is None:
            continue
        rows = job["rows"]
        part = job["progress_rows"] / rows if rows else None
        lines.append(
            f"  {job['id']}  {progress_bar(part, 20)}  {job['progress_rows']}/{rows or '?'} rows"
            f"  on {job['instance'] or '-'}  (at {job['progress_at'] or '-'})"
        )
    t = status["totals"]
    finish = t["cost_to_finish"]
    if running:
        finish_txt = f"  about {money(finish)} to finish" if finish is not None else ""
        lines.append(
            f"instances: {t['instances']} ({t['ready']} ready)  ${t['dph_now']:.3f}/h now  "
            f"spent {money(t['spend_total'])}{finish_txt}"
        )
    else:
        # Nothing bills through vastd's eyes now: the figures are the snapshot's.
        lines.append(
            f"instances: {t['instances']} ({t['ready']} ready)  spent {money(t['spend_total'])}"
            f"  (as of {status['saved_at'] or 'never'})"
        )
    if t.get("adopted"):
        # In adopt mode vastd rents nothing: "spent" is $0 while these bill the account.
        lines.append(
            f"billing: ${t['dph_adopted']:.3f}/h for {t['adopted']} adopted instance(s) "
            "(not rented by vastd, not in its spend)"
        )
    renting = status.get("renting") or {}
    if renting.get("paused"):
        lines.append(f"renting: PAUSED until {renting['paused_until']}: {renting['reason']}")
    for inst in status["instances"]:
        jobs = ",".join(inst["current_jobs"]) or "-"
        extra = f"  error: {inst['prepare_error']}" if inst["prepare_error"] else ""
        adopted = " (adopted)" if inst.get("billing") == "adopted" else ""
        lines.append(
            f"  {inst['id']:>10}  {inst['state']:<11} ${inst['dph']:.3f}/h  "
            f"cost {money(inst.get('cost', 0.0))}{adopted}  "
            f"last seen {inst['last_seen'] or '-'}  job {jobs}{extra}"
        )
    saved = status["saved_at"] or "never"
    if running:
        lines.append(f"daemon: running; snapshot saved {saved}")
    else:
        state = "not running" if running is False else "unknown"
        lines.append(f"daemon: {state}; figures as of {saved} (the snapshot's last save)")
    return os.linesep.join(lines)


def watch_line(status: dict[str, Any]) -> str:
    """One plain line per refresh of `status --watch` when stdout is not a terminal."""
    j = status["jobs"]
    daemon = {True: "running", False: "not running", None: "unknown"}[status["daemon_running"]]
    return (
        f"{utc_iso(time.time())} {progress_bar(status['progress'])}  queued {j['queued']}  "
        f"running {j['running']}  collecting {j['collecting']}  done {j['done']}  "
        f"failed {j['failed']}  spent {money(status['totals']['spend_total'])}  daemon {daemon}"
    )


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
