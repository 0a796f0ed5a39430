"""history.jsonl (README): one line per finished job, its final record.

A finished job's line is appended and fsynced before the job leaves state.json
(`StateStore.retire_finished`), so a crash between the two leaves it in both; the
snapshot wins on load. A name finished more than once has one line per finish: the
last one counts. A line that does not parse (a crash mid-append leaves a truncated
last line) is skipped with a warning, and the next append starts on a fresh line.

`HistoryIndex` is the in-memory view the daemon keeps: finished names (for duplicate
refusal and resubmission) and the counts `vastd status` reads from the snapshot's
`HistorySummary` instead of parsing this file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Required

import aiofiles.os
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from vastd.core.records import FINISHED, HistorySummary, JobRecord, JobState
from vastd.core.tracking import dump_record
from vastd.utils.logging import get_logger

log = get_logger("vastd.state")


class _IndexFields(TypedDict, total=False):
    """The fields of a history line the index keeps (validated in pydantic-core: the
    other fields of the line are skipped, not built into Python objects)."""

    id: Required[str]
    state: str
    failed_stem: str | None
    finished_at: float | None
    dispatched_at: float | None


_INDEX_FIELDS = TypeAdapter(_IndexFields)


class Finished(NamedTuple):
    """What the daemon needs of a finished job whose record is in history only."""

    state: JobState
    failed_stem: str | None = None
    duration_s: float | None = None  # dispatch to finish (done jobs)


def retirable(job: JobRecord) -> bool:
    """Whether the job's record may leave state.json: finished, and no run of it is
    still out (an orphaned run of a failed job may complete it yet)."""
    return job.state in FINISHED and not job.orphans and job.earlier_failed_stem is None


def history_line(job: JobRecord) -> bytes:
    return dump_record(job) + b"\n"


def append_history(path: Path, lines: list[bytes]) -> None:
    """Append lines and fsync (blocking: run it off the event loop). OSError on failure.

    A file whose last line was cut short (a crash mid-append) gets a newline first,
    so that line stays the only one lost.
    """
    if not lines:
        return
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        data = b"".join(lines)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # a new file: its name is durable too
        finally:
            os.close(fd)


async def append_history_async(path: Path, lines: list[bytes]) -> None:
    """`append_history` off the event loop: aiofiles runs it in the loop's executor, so
    its reads, write and fsyncs are one blocking piece, written once.

    OSError on failure; the lines are then not durable and the caller keeps the jobs.
    """
    await aiofiles.os.wrap(append_history)(path, lines)


def parse_history_line(
    path: Path, line: bytes, number: int, *, truncated: bool
) -> dict[str, Any] | None:
    """One line of history.jsonl as a dict, or None (a blank line; one that does not
    parse or names no job, skipped with a warning: `truncated`, no newline after it, says
    a crash cut it short)."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        log.warning("history_line_skipped", path=str(path), line=number, truncated=truncated)
        return None
    return data


def iter_history(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of history.jsonl as a dict; a line that does not parse is skipped with
    a warning (a missing file is an empty history)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for number, line in enumerate(handle, 1):
            data = parse_history_line(path, line, number, truncated=not line.endswith(b"\n"))
            if data is not None:
                yield data


def read_history_records(path: Path) -> dict[str, JobRecord]:
    """Full records, last line per name (for the few readers that want all of them)."""
    out: dict[str, JobRecord] = {}
    for data in iter_history(path):
        try:
            out[data["id"]] = JobRecord.model_validate(data)
        except ValidationError as exc:
            log.warning(
                "history_line_skipped", path=str(path), job=data["id"], error=str(exc)[:200]
            )
    return out


def find_record(path: Path, job_id: str) -> JobRecord | None:
    """The job's last line, as a record (one pass; lines not naming it are not parsed)."""
    needle = json.dumps(job_id).encode()
    found: JobRecord | None = None
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return None
    with handle:
        for line in handle:
            if needle not in line:
                continue
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and data.get("id") == job_id:
                    found = JobRecord.model_validate(data)
    return found


def _entry(data: dict[str, Any]) -> Finished | None:
    try:
        state = JobState(str(data.get("state")))
    except ValueError:
        return None
    if state not in FINISHED:
        return None
    duration = None
    finished_at, dispatched_at = data.get("finished_at"), data.get("dispatched_at")
    if state is JobState.DONE and finished_at and dispatched_at:
        duration = float(finished_at) - float(dispatched_at)
    stem = data.get("failed_stem")
    return Finished(state, stem if isinstance(stem, str) else None, duration)


@dataclass
class HistoryIndex:
    """Finished names whose record is in history only, and their counts (kept as
    entries come and go, never by a scan)."""

    entries: dict[str, Finished] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    done_duration_s: float = 0.0
    done_timed: int = 0

    @classmethod
    def load(cls, path: Path) -> HistoryIndex:
        """The index of a history file, read in one pass (at start: keep it quick).

        A line that does not parse is skipped with a warning, as in `iter_history`.
        """
        index = cls()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return index
        entries, done, failed = index.entries, JobState.DONE, JobState.FAILED
        states = {"done": done, "failed": failed}
        # pydantic-core's own validator: the fields the index needs, the rest only skipped
        parse = _INDEX_FIELDS.validator.validate_json
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                data = parse(line)
            except ValueError:
                if line.strip():
                    log.warning(
                        "history_line_skipped",
                        path=str(path),
                        line=number,
                        truncated=number == len(lines),  # no newline after it
                    )
                continue
            job_id, state = data["id"], states.get(data.get("state", ""))
            if state is None:
                continue  # not finished: not a line vastd writes
            duration = None
            if state is done:
                finished_at, dispatched_at = data.get("finished_at"), data.get("dispatched_at")
                if finished_at is not None and dispatched_at is not None:
                    duration = finished_at - dispatched_at
            entries.pop(job_id, None)  # the last line of a name counts, in file order
            entries[job_id] = Finished(state, data.get("failed_stem"), duration)
        durations = [e.duration_s for e in entries.values() if e.state is done]
        timed = [d for d in durations if d is not None]
        index.done, index.failed = len(durations), len(entries) - len(durations)
        index.done_duration_s, index.done_timed = sum(timed), len(timed)
        return index

    def get(self, job_id: str) -> Finished | None:
        return self.entries.get(job_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _count(self, entry: Finished, sign: int) -> None:
        if entry.state is JobState.DONE:
            self.done += sign
            if entry.duration_s is not None:
                self.done_duration_s += sign * entry.duration_s
                self.done_timed += sign
        else:
            self.failed += sign

    def put(self, job_id: str, entry: Finished) -> None:
        self.pop(job_id)
        self.entries[job_id] = entry
        self._count(entry, 1)

    def add_record(self, job: JobRecord) -> None:
        entry = _entry({**job.model_dump(include={"state", "failed_stem"}), **_times(job)})
        if entry is not None:
            self.put(job.id, entry)

    def pop(self, job_id: str) -> Finished | None:
        entry = self.entries.pop(job_id, None)
        if entry is not None:
            self._count(entry, -1)
        return entry

    def summary(self) -> HistorySummary:
        return HistorySummary(
            done=self.done,
            failed=self.failed,
            done_duration_s=self.done_duration_s,
            done_timed=self.done_timed,
        )


def _times(job: JobRecord) -> dict[str, Any]:
    return {"finished_at": job.finished_at, "dispatched_at": job.dispatched_at}
