"""`vastd jobs` and `vastd report`: read-only views of a campaign, daemon or not.

Short-lived processes, like `vastd status`: the snapshot is read through
core/snapshot_file.py and history.jsonl through core/history.py, once each; nothing
of the daemon's store or loops is imported. A job's row comes from state.json when it
is there (work in flight, or a name accepted again), else from the last history line
of its name. Files in failed/ that no job record owns (refused at acceptance: an
invalid file, a duplicate `<job>.dup-<n>.csv`) are listed as failed too, with the
reason their `.error.json` gives.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter
from pydantic_core import to_json

from vastd.core.files import ERROR_SUFFIX, JOB_SUFFIX, Layout, utc_iso
from vastd.core.lock import root_locked
from vastd.core.records import FINISHED, JobRecord, JobState, Snapshot
from vastd.core.snapshot_file import read_snapshot

STATES = tuple(s.value for s in JobState)


@dataclass(frozen=True)
class Refused:
    """A file in failed/ without a job record: refused when it was submitted."""

    stem: str  # `<job>` or `<job>.dup-<n>`: its file names in failed/
    job: str  # the job id its .error.json names
    reason: str
    at: str | None
    has_csv: bool


@dataclass(frozen=True, slots=True)
class JobView:
    """What the views show of a job: from a record in state.json, or straight from a
    history line (100,000 of them are read per `vastd jobs`: building each into a full
    JobRecord cost more than parsing the line)."""

    # `_line_parser`: a line of exactly these types is read by pydantic-core alone
    __pydantic_config__ = ConfigDict(strict=True)

    id: str
    state: JobState
    rows: int = 0
    attempts: int = 0
    runs: int = 0
    instance: str | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    exited_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    failed_stem: str | None = None
    earlier_failed_stem: str | None = None
    progress_rows: int | None = None
    progress_at: float | None = None
    rows_out: int | None = None
    cost: float | None = None
    gpu_name: str | None = None
    gpus: tuple[int, ...] = ()  # the GPU indices the run was given (core/gpus.py)
    gpu_idle: bool = False
    staged: bool = False  # waits on its instance behind the slot's running job

    @classmethod
    def of(cls, job: JobRecord) -> JobView:
        values = {name: getattr(job, name) for name in _VIEW_FIELDS}
        values["gpus"] = tuple(values["gpus"])
        return cls(**values)

    @classmethod
    def from_line(cls, data: dict[str, Any]) -> JobView:
        """A history line's view; a line whose fields are not what vastd writes goes
        through the record's own validation (ValueError when that refuses it too)."""
        try:
            values = {name: data.get(name, _DEFAULTS[name]) for name in _VIEW_FIELDS}
            values["state"] = JobState(values["state"])
            if all(isinstance(values[name], kinds) for name, kinds in _KINDS) and all(
                isinstance(g, int) for g in values["gpus"]
            ):
                values["gpus"] = tuple(values["gpus"])
                return cls(**values)
        except (TypeError, ValueError):
            pass
        return cls.of(JobRecord.model_validate(data))  # pydantic's ValidationError is a ValueError


_VIEW_FIELDS = tuple(JobView.__dataclass_fields__)
# a field absent from a line is its default (id and state have none: MISSING, refused)
_DEFAULTS = {name: f.default for name, f in JobView.__dataclass_fields__.items()}
_NONE = type(None)
_KINDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", (str,)),
    ("rows", (int,)),
    ("attempts", (int,)),
    ("runs", (int,)),
    ("instance", (str, _NONE)),
    ("dispatched_at", (int, float, _NONE)),
    ("started_at", (int, float, _NONE)),
    ("exited_at", (int, float, _NONE)),
    ("finished_at", (int, float, _NONE)),
    ("last_error", (str, _NONE)),
    ("failed_stem", (str, _NONE)),
    ("earlier_failed_stem", (str, _NONE)),
    ("progress_rows", (int, _NONE)),
    ("progress_at", (int, float, _NONE)),
    ("rows_out", (int, _NONE)),
    ("cost", (int, float, _NONE)),
    ("gpu_name", (str, _NONE)),
    ("gpus", (list, tuple)),
    ("gpu_idle", (bool,)),
    ("staged", (bool,)),
)


@dataclass
class Campaign:
    """Every job of a root, read once: records (state.json over history) and refusals."""

    snapshot: Snapshot
    jobs: dict[str, JobView]
    refused: list[Refused]
    daemon_running: bool | None


def json_text(value: Any) -> str:
    """`--json` output: indented, written by pydantic-core (the standard library's
    encoder falls back to pure Python once asked to indent: 2 s for 100,000 jobs)."""
    return to_json(value, indent=2).decode()


def read_error_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def failed_stems(directory: Path) -> dict[str, bool]:
    """The stems of failed/'s `.error.json` and `.csv` files: stem -> has a `.csv`."""
    stems: dict[str, bool] = {}
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
    except FileNotFoundError:
        return stems
    for name in names:
        if name.endswith(ERROR_SUFFIX):
            stems.setdefault(name[: -len(ERROR_SUFFIX)], False)
        elif name.endswith(JOB_SUFFIX):
            stems[name[: -len(JOB_SUFFIX)]] = True
    return stems


def refused_files(layout: Layout, jobs: dict[str, JobView]) -> list[Refused]:
    """failed/ entries no failed job owns (its `failed_stem`), with their reasons."""
    owned = {j.failed_stem or j.id for j in jobs.values() if j.state is JobState.FAILED}
    owned |= {j.earlier_failed_stem for j in jobs.values() if j.earlier_failed_stem}
    out = []
    for stem, has_csv in sorted(failed_stems(layout.failed).items()):
        if stem in owned:
            continue
        info = read_error_json(layout.failed / f"{stem}{ERROR_SUFFIX}")
        job = info.get("job")
        out.append(
            Refused(
                stem=stem,
                job=job if isinstance(job, str) else stem,
                reason=str(info.get("reason") or "no .error.json"),
                at=info.get("at") if isinstance(info.get("at"), str) else None,
                has_csv=has_csv,
            )
        )
    return out


@functools.cache
def _line_parser() -> Callable[[bytes], JobView]:
    """A history line (JSON) to its view, in pydantic-core: the fields a view shows, of
    exactly the types vastd writes, the other fields skipped unbuilt. ValueError for
    anything else (the line then takes `JobView.from_line`'s way)."""
    return TypeAdapter(JobView).validator.validate_json


def read_history_views(path: Path) -> dict[str, JobView]:
    """history.jsonl's jobs, the last line per name; a line that is not a job record is
    skipped with a warning, as history.py does for lines that do not parse."""
    # history.py brings aiofiles (and so asyncio): imported here, not by `vastd status`.
    from vastd.core.history import log, parse_history_line

    out: dict[str, JobView] = {}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return out
    parse = _line_parser()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            view = parse(line)
        except ValueError:
            # not typed as vastd writes it (or not a record at all): the slow way
            data = parse_history_line(path, line, number, truncated=number == len(lines))
            if data is None:
                continue
            try:
                view = JobView.from_line(data)
            except ValueError as exc:
                log.warning(
                    "history_line_skipped", path=str(path), job=data["id"], error=str(exc)[:200]
                )
                continue
        out[view.id] = view
    return out


def read_campaign(layout: Layout, *, history: bool = True) -> Campaign:
    """The snapshot, one pass over history.jsonl, and a listing of failed/.

    `history=False`: work in flight only (history holds finished jobs alone).
    """
    running = root_locked(layout.root)
    snapshot = read_snapshot(layout.state_file)[0]
    jobs = read_history_views(layout.history_file) if history else {}
    for job_id in snapshot.jobs:
        jobs.pop(job_id, None)  # state.json wins, and keeps its own order (acceptance)
    jobs |= {job_id: JobView.of(job) for job_id, job in snapshot.jobs.items()}
    return Campaign(snapshot, jobs, refused_files(layout, jobs), running)


# --- vastd jobs ----------------------------------------------------------------------------
def _duration(job: JobView, now: float) -> float | None:
    start = job.started_at or job.dispatched_at
    if start is None:
        return None
    if job.state in FINISHED:
        end = job.finished_at or job.exited_at
    elif job.state is JobState.COLLECTING:
        end = job.exited_at or now
    else:
        end = now
    return None if end is None else round(max(0.0, end - start), 1)


def job_row(job: JobView, now: float) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "instance": job.instance,
        "attempts": job.attempts,
        "runs": job.runs,
        "rows": job.rows,
        "started": None if job.staged else utc_iso(job.started_at or job.dispatched_at),
        "duration_s": _duration(job, now),
        "last_error": job.last_error,
        "progress_rows": job.progress_rows,
        "progress_at": utc_iso(job.progress_at),
        "gpus": list(job.gpus),
        # the GPU idle watch ([job] gpu_idle_s) flagged the running job's GPUs as idle
        "gpu_idle": job.gpu_idle and job.state is JobState.RUNNING,
        # staged ([job] stage_ahead): uploaded, waiting on its instance for its slot
        "staged": job.staged and job.state is JobState.RUNNING,
        "refused": False,
    }


def refused_row(ref: Refused) -> dict[str, Any]:
    return {
        "id": ref.stem,
        "state": JobState.FAILED.value,
        "instance": None,
        "attempts": 0,
        "runs": 0,
        "rows": None,
        "started": None,
        "duration_s": None,
        "last_error": ref.reason,
        "progress_rows": None,
        "progress_at": None,
        "gpus": [],
        "gpu_idle": False,
        "staged": False,
        "refused": True,
    }


def job_rows(
    campaign: Campaign, state: str | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """One row per job (refused files last), only those in `state` when given."""
    now = time.time() if now is None else now
    rows = [job_row(j, now) for j in campaign.jobs.values()]
    rows += [refused_row(r) for r in campaign.refused]
    return [r for r in rows if state is None or r["state"] == state]


def progress_text(rows_done: int | None, rows: int | None) -> str:
    if rows_done is None:
        return "-"
    if rows:
        return f"{rows_done}/{rows} ({min(rows_done / rows, 1.0) * 100:.0f}%)"
    return str(rows_done)


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def one_line(text: str | None, limit: int = 60) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in body)]


def daemon_line(running: bool | None, saved_at: float | str | None) -> str:
    """Whether a daemon runs; if not, the figures are those of the snapshot's last save."""
    saved = (saved_at if isinstance(saved_at, str) else utc_iso(saved_at)) or "never"
    if running:
        return f"daemon: running; snapshot saved {saved}"
    if running is None:
        return f"daemon: unknown; as of {saved} (the snapshot's last save)"
    return f"daemon: not running; as of {saved} (the snapshot's last save)"


def format_jobs(rows: list[dict[str, Any]], running: bool | None, saved_at: float | None) -> str:
    header = [
        "JOB",
        "STATE",
        "INSTANCE",
        "ATTEMPTS",
        "RUNS",
        "STARTED",
        "DURATION",
        "PROGRESS",
        "LAST ERROR",
    ]
    body = [
        [
            r["id"],
            r["state"]
            + (" (refused)" if r["refused"] else "")
            + (" (gpu idle)" if r["gpu_idle"] else "")
            + (" (staged)" if r["staged"] else ""),
            r["instance"] or "-",
            str(r["attempts"]),
            str(r["runs"]),
            r["started"] or "-",
            duration_text(r["duration_s"]),
            progress_text(r["progress_rows"], r["rows"]),
            one_line(r["last_error"]),
        ]
        for r in rows
    ]
    return os.linesep.join([*_table(header, body), daemon_line(running, saved_at)])


# --- vastd report --------------------------------------------------------------------------
def money(value: float | None) -> str:
    """Dollars with enough digits to see small sums: $0.0032, not $0.00."""
    if value is None:
        return "-"
    if value == 0:
        return "$0.00"
    if abs(value) < 1:
        # two significant digits at least: $0.0032, $0.000083
        decimals = min(8, max(4, 1 - math.floor(math.log10(abs(value)))))
        return f"${value:.{decimals}f}"
    return f"${value:,.2f}"


def read_manifest(path: Path) -> dict[str, Any]:
    return read_error_json(path)


def _why(job: JobView, layout: Layout) -> str:
    if job.state is JobState.FAILED:
        reason = job.last_error
        if not reason:
            info = read_error_json(layout.failed / f"{job.failed_stem or job.id}{ERROR_SUFFIX}")
            reason = info.get("reason") if isinstance(info.get("reason"), str) else None
        return reason or "failed"
    if job.state is JobState.QUEUED:
        last = f" (last error: {job.last_error})" if job.last_error else ""
        return f"waiting for an instance{last}"
    where = f"on {job.instance}" if job.instance else "on no instance"
    return f"{where}, run {job.runs}" + (f", {job.attempts} failed" if job.attempts else "")


def build_report(layout: Layout, campaign: Campaign, now: float | None = None) -> dict[str, Any]:
    """Per job: rows in and out, runs, attempts, instance, GPU, duration, cost; totals;
    the jobs not done and why. MANIFEST.json is read for done jobs only."""
    now = time.time() if now is None else now
    jobs_out: list[dict[str, Any]] = []
    not_done: list[dict[str, Any]] = []
    rows_in = rows_out = rows_in_done = 0
    cost = 0.0
    done = failed = 0
    for job in campaign.jobs.values():
        entry = {
            "id": job.id,
            "state": job.state.value,
            "rows_in": job.rows,
            "rows_out": None,
            "runs": job.runs,
            "attempts": job.attempts,
            "instance": job.instance,
            "gpu": None,
            "duration_s": _duration(job, now),
            "cost": None,
            "refused": False,
        }
        rows_in += job.rows
        if job.state is JobState.DONE:
            done += 1
            rows_in_done += job.rows
            # A record from before the MANIFEST's figures were kept in it: the file.
            manifest: dict[str, Any] = (
                {"rows_out": job.rows_out, "cost": job.cost, "gpu": job.gpu_name}
                if job.rows_out is not None
                else read_manifest(layout.results_dir(job.id) / "MANIFEST.json")
            )
            if isinstance(manifest.get("rows_out"), int):
                entry["rows_out"] = manifest["rows_out"]
                rows_out += manifest["rows_out"]
            if isinstance(manifest.get("cost"), int | float):
                entry["cost"] = manifest["cost"]
                cost += float(manifest["cost"])
            if isinstance(manifest.get("gpu"), str):
                entry["gpu"] = manifest["gpu"]
            if entry["instance"] is None and manifest.get("instance") is not None:
                entry["instance"] = str(manifest["instance"])
        else:
            if job.state is JobState.FAILED:
                failed += 1
            not_done.append({"id": job.id, "state": job.state.value, "why": _why(job, layout)})
        jobs_out.append(entry)
    for ref in campaign.refused:
        failed += 1
        jobs_out.append(
            {
                "id": ref.stem,
                "state": JobState.FAILED.value,
                "rows_in": None,
                "rows_out": None,
                "runs": 0,
                "attempts": 0,
                "instance": None,
                "gpu": None,
                "duration_s": None,
                "cost": None,
                "refused": True,
            }
        )
        name = (
            f"failed/{ref.stem}{JOB_SUFFIX}" if ref.has_csv else f"failed/{ref.stem}{ERROR_SUFFIX}"
        )
        not_done.append({"id": ref.stem, "state": "refused", "why": f"{ref.reason} ({name})"})
    return {
        "daemon_running": campaign.daemon_running,
        "saved_at": utc_iso(campaign.snapshot.saved_at),
        "jobs": jobs_out,
        "totals": {
            "jobs": len(jobs_out),
            "done": done,
            "failed": failed,
            "rows_in": rows_in,
            "rows_in_done": rows_in_done,
            "rows_out": rows_out,
            "cost": round(cost, 6),
        },
        "not_done": not_done,
    }


def format_report(report: dict[str, Any]) -> str:
    header = [
        "JOB",
        "STATE",
        "ROWS IN",
        "ROWS OUT",
        "RUNS",
        "ATTEMPTS",
        "INSTANCE",
        "GPU",
        "DURATION",
        "COST",
    ]

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    body = [
        [
            j["id"],
            j["state"] + (" (refused)" if j.get("refused") else ""),
            num(j["rows_in"]),
            num(j["rows_out"]),
            str(j["runs"]),
            str(j["attempts"]),
            j["instance"] or "-",
            j["gpu"] or "-",
            duration_text(j["duration_s"]),
            money(j["cost"]),
        ]
        for j in report["jobs"]
    ]
    t = report["totals"]
    lines = _table(header, body)
    lines.append(
        f"totals: {t['jobs']} jobs  {t['done']} done  {t['failed']} failed  "
        f"rows in {t['rows_in']} ({t['rows_in_done']} of done jobs), out {t['rows_out']}  "
        f"cost {money(t['cost'])}"
    )
    if report["not_done"]:
        lines.append(f"not done ({len(report['not_done'])}):")
        lines.extend(
            f"  {n['id']}  {n['state']}: {one_line(n['why'], 120)}" for n in report["not_done"]
        )
    else:
        lines.append("not done: none")
    lines.append(daemon_line(report["daemon_running"], report["saved_at"]))
    return os.linesep.join(lines)
