"""Job files: validation, arguments, discovery and acceptance.

A job is one CSV file; its name without `.csv` is the job id (any characters a file
name can hold; it is data, never shell text). Acceptance (README: "Folders") validates a
complete file and renames it inbox/ -> queued/ (many at once with `accept_job_files`:
one fsync of each folder per batch); a refused file goes to failed/ beside its
`.error.json`. Nothing about a bad file raises out of here.
The inbox watcher and the name rules are in inbox.py (re-exported here).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import fnmatch
import io
import os
import stat
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vastd.core.files import (
    ERROR_SUFFIX,
    JOB_SUFFIX,
    JobFolder,
    Layout,
    move_job_to_failed,
    not_utf8_reason,
    safe_name,
    shown_name,
)
from vastd.core.files_async import atomic_file_moves

# Moved to inbox.py; re-exported so existing imports keep working.
from vastd.core.inbox import InboxWatcher as InboxWatcher
from vastd.core.inbox import is_candidate_name as is_candidate_name
from vastd.core.inbox import job_id_for as job_id_for
from vastd.utils.config import JobSettings
from vastd.utils.exceptions import FileOperationError, JobValidationError
from vastd.utils.logging import get_logger
from vastd.utils.text import is_utf8

log = get_logger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class JobFileInfo:
    """What acceptance learned about a valid job file."""

    job_id: str
    path: Path
    size: int
    columns: list[str]
    rows: int
    rerun: bool = False  # the name of a finished job, accepted as a new run
    # failed/<job>.csv or its .error.json is there (a refusal of the name, or its failed
    # job): once this run is queued on disk they go, unless a job record owns them
    refused_before: bool = False
    # (inode, size, mtime_ns) of what was read: acceptance compares it after the rename
    identity: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_csv(text: str) -> tuple[list[str], int]:
    """(columns, data rows) of CSV text; JobValidationError naming the first problem."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows = 0
    blank_line: int | None = None
    try:
        for row in reader:
            if not row:
                # Blank lines are fine only after the last data row.
                if blank_line is None:
                    blank_line = reader.line_num
                continue
            if blank_line is not None:
                raise JobValidationError(f"line {blank_line} is blank")
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                raise JobValidationError(
                    f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
                )
            rows += 1
    except csv.Error as exc:
        raise JobValidationError(f"not valid CSV at line {reader.line_num}: {exc}") from None
    if header is None:
        raise JobValidationError("empty file: no header row")
    if rows == 0:
        raise JobValidationError("no data rows after the header")
    return header, rows


def validate_job_file(path: Path, max_bytes: int) -> JobFileInfo:
    """Check a job file against the README's acceptance rules ("Folders"); JobValidationError(reason) when refused.

    Never follows a symlink and never blocks on a FIFO or device.
    """
    job_id = job_id_for(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise JobValidationError("the file disappeared") from None
    except OSError as exc:
        raise JobValidationError(f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise JobValidationError(f"{_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise JobValidationError(f"larger than max_input_bytes ({st.st_size} > {max_bytes} bytes)")
    try:
        # O_NOFOLLOW: a symlink swapped in after lstat fails; O_NONBLOCK: a FIFO cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise JobValidationError(f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobValidationError(f"{_kind(st.st_mode)}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise JobValidationError(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise JobValidationError(f"larger than max_input_bytes (> {max_bytes} bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobValidationError(f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise JobValidationError(f"line {line} contains a NUL byte")
    columns, rows = _check_csv(text)
    return JobFileInfo(
        job_id=job_id,
        path=path,
        size=len(data),
        columns=columns,
        rows=rows,
        identity=(st.st_ino, st.st_size, st.st_mtime_ns),
    )


def get_job_arguments(job_id: str, settings: JobSettings) -> dict[str, str]:
    """`[job.vars]`, overridden by the first `[[job.patterns]]` whose glob matches `<job>.csv`."""
    arguments = dict(settings.vars)
    name = job_id + JOB_SUFFIX
    for pattern in settings.patterns:
        if fnmatch.fnmatchcase(name, pattern.glob):
            arguments.update(pattern.vars)
            break
    return arguments


def discover_job_files(directory: Path) -> list[Path]:
    """Candidate job files in `directory`, sorted by name.

    Any entry with a candidate name counts, symlinks and FIFOs included, so that
    acceptance can refuse them; dot-files and temp names never count.
    """
    try:
        with os.scandir(directory) as entries:
            return sorted(Path(e.path) for e in entries if is_candidate_name(e.name))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FileOperationError(f"cannot list {directory}: {exc}") from exc


# --- acceptance ------------------------------------------------------------------------


def _refuse(
    layout: Layout, path: Path, job_id: str, reason: str, *, duplicate: bool = False
) -> None:
    """Move the entry itself (never opened) to failed/ under a free name, with its error file."""
    if duplicate:
        log.warning("job_duplicate_refused", job=job_id, reason=reason)
    else:
        log.warning("job_refused", job=job_id, reason=reason)
    try:
        move_job_to_failed(layout, job_id, path, reason=reason, duplicate=duplicate)
    except FileOperationError:
        if os.path.lexists(path):
            raise


def _collides(layout: Layout, job_id: str, known_ids: Container[str]) -> bool:
    return job_id in known_ids or any(
        os.path.lexists(layout.job_file(folder, job_id))
        for folder in (JobFolder.QUEUED, JobFolder.RUNNING)
    )


def _taken_reason(job_id: str) -> str:
    # Refused as a duplicate (failed/<job>.dup-<n>): failed/<job>.csv and its error file
    # stay free for the job of that name, which may yet fail or be cancelled.
    return f"a job named {job_id!r} is already queued or running"


def _is_done(layout: Layout, job_id: str, done_ids: Container[str]) -> bool:
    return job_id in done_ids or os.path.lexists(layout.job_file(JobFolder.DONE, job_id))


def duplicate_reason(job_id: str) -> str:
    return (
        f"a job named {job_id!r} is already done (its results are in results/); "
        "the earlier results are untouched. To run it again, set [job] on_duplicate = "
        '"rerun" and submit it again (its results then replace results/<job>/, the '
        "earlier ones kept as previous-<n>/), or submit it under another name"
    )


def _check(
    layout: Layout,
    path: Path,
    settings: JobSettings,
    known_ids: Container[str],
    done_ids: Container[str],
) -> JobFileInfo | None:
    """Everything acceptance decides before the move: the name, then the contents.

    A refused file goes to failed/ here; None when refused or vanished.
    """
    job_id = job_id_for(path)
    if not os.path.lexists(path):
        return None
    if not is_utf8(job_id):
        # Its record could not be saved (nor logged as JSON): refused under a UTF-8 name.
        _refuse(layout, path, shown_name(job_id), not_utf8_reason(path.name))
        return None
    if _collides(layout, job_id, known_ids):
        _refuse(layout, path, job_id, _taken_reason(job_id), duplicate=True)
        return None
    rerun = False
    if _is_done(layout, job_id, done_ids):
        if settings.on_duplicate != "rerun":
            _refuse(layout, path, job_id, duplicate_reason(job_id), duplicate=True)
            return None
        rerun = True
    try:
        info = validate_job_file(path, settings.max_input_bytes)
    except JobValidationError as exc:
        if not os.path.lexists(path):
            return None
        _refuse(layout, path, job_id, str(exc))
        return None
    return dataclasses.replace(info, rerun=rerun, refused_before=refusal_left(layout, job_id))


def refusal_left(layout: Layout, job_id: str) -> bool:
    """Whether failed/ holds `<job>.csv` or `<job>.error.json`: an earlier file of the
    name refused (or failed), which a job accepted now replaces (`add_job`'s
    `refused_before` when no record owns them)."""
    return any(
        os.path.lexists(layout.failed / safe_name(job_id, suffix))
        for suffix in (JOB_SUFFIX, ERROR_SUFFIX)
    )


def _not_moved(
    layout: Layout, path: Path, destination: Path, error: FileOperationError
) -> FileOperationError | None:
    """After a failed rename into queued/: vanished (None), taken meanwhile (refused,
    None), or the folders' own error, returned (the file stays in the inbox)."""
    if not os.path.lexists(path):
        return None
    job_id = job_id_for(path)
    if os.path.lexists(destination):
        _refuse(layout, path, job_id, _taken_reason(job_id), duplicate=True)
        return None
    return error


def _verify(layout: Layout, info: JobFileInfo, settings: JobSettings) -> JobFileInfo | None:
    """After the move (durable): the file in queued/ is the one validated, or is checked
    again; its info now points at queued/."""
    job_id, rerun, refused_before = info.job_id, info.rerun, info.refused_before
    destination = layout.job_file(JobFolder.QUEUED, job_id)
    # The name was validated, the inode moved: if they differ, the file was swapped between.
    try:
        moved = os.lstat(destination)
        if (moved.st_ino, moved.st_size, moved.st_mtime_ns) != info.identity:
            info = validate_job_file(destination, settings.max_input_bytes)
    except JobValidationError as exc:
        _refuse(layout, destination, job_id, str(exc))
        return None
    except OSError as exc:
        raise FileOperationError(f"cannot check {destination}: {exc}") from exc
    info = dataclasses.replace(info, path=destination, rerun=rerun, refused_before=refused_before)
    log.info("job_accepted", job=job_id, rows=info.rows, size=info.size, rerun=rerun)
    return info


_Outcome = JobFileInfo | FileOperationError | None


def _each(call: Callable[[_T], _Outcome], items: Sequence[_T]) -> list[_Outcome]:
    """`call` on each item; a FileOperationError is that item's outcome, not the batch's."""
    out: list[_Outcome] = []
    for item in items:
        try:
            out.append(call(item))
        except FileOperationError as exc:
            out.append(exc)
    return out


# Files per trip to a worker thread: the trip costs about as much as checking three files.
FILES_PER_CALL = 128


async def _in_threads(call: Callable[[_T], _Outcome], items: Sequence[_T]) -> list[_Outcome]:
    """`_each` off the loop, a slice at a time (the loop runs between slices)."""
    out: list[_Outcome] = []
    for start in range(0, len(items), FILES_PER_CALL):
        out.extend(await asyncio.to_thread(_each, call, items[start : start + FILES_PER_CALL]))
    return out


async def _accept_round(
    layout: Layout,
    paths: Sequence[Path],
    settings: JobSettings,
    known_ids: Container[str],
    done_ids: Container[str],
) -> list[_Outcome]:
    """Accept files of distinct names together: check each, rename the good ones into
    queued/, fsync queued/ and the inbox once, then verify each where it landed."""
    outcomes = await _in_threads(
        lambda path: _check(layout, path, settings, known_ids, done_ids), paths
    )
    checked = [(n, o) for n, o in enumerate(outcomes) if isinstance(o, JobFileInfo)]
    if not checked:
        return outcomes
    moves = [(info.path, layout.job_file(JobFolder.QUEUED, info.job_id)) for _, info in checked]
    try:
        errors = await atomic_file_moves(moves)
    except FileOperationError as exc:
        # A folder could not be fsynced: whatever was renamed is not known durable, so
        # nothing is accepted (a file left in queued/ is adopted at the next start).
        for n, _ in checked:
            outcomes[n] = exc
        return outcomes
    failed = [(n, move, e) for (n, _), move, e in zip(checked, moves, errors, strict=True) if e]
    if failed:
        again = await _in_threads(lambda f: _not_moved(layout, *f[1], f[2]), failed)
        for (n, _, _), outcome in zip(failed, again, strict=True):
            outcomes[n] = outcome
    moved = [(n, info) for (n, info), e in zip(checked, errors, strict=True) if e is None]
    verified = await _in_threads(lambda m: _verify(layout, m[1], settings), moved)
    for (n, _), outcome in zip(moved, verified, strict=True):
        outcomes[n] = outcome
    return outcomes


async def accept_job_files(
    layout: Layout,
    paths: Sequence[Path],
    settings: JobSettings,
    *,
    known_ids: Container[str],
    done_ids: Container[str] | None = None,
) -> list[JobFileInfo | FileOperationError | None]:
    """`accept_job_file` for many files at once, with one fsync of each folder per batch.

    Returns, per path and in order: the info of a file now in queued/ (durable there),
    None when refused or vanished, or the FileOperationError that kept it from being
    accepted (the folders themselves: disk full, read-only; the file stays in the inbox,
    or, when queued/ or the inbox cannot be fsynced, may be in queued/ unaccepted).
    Each outcome is the one a call per file, in order, would give: a name met again in
    `paths` is checked only once the earlier one is settled.
    """
    done = done_ids if done_ids is not None else set()
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for n, path in enumerate(paths):
        again = seen.get(job_id_for(path), 0)
        seen[job_id_for(path)] = again + 1
        if again == len(rounds):
            rounds.append([])
        rounds[again].append(n)
    outcomes: list[JobFileInfo | FileOperationError | None] = [None] * len(paths)
    for members in rounds:
        results = await _accept_round(
            layout, [paths[n] for n in members], settings, known_ids, done
        )
        for n, outcome in zip(members, results, strict=True):
            outcomes[n] = outcome
    return outcomes


async def accept_job_file(
    layout: Layout,
    path: Path,
    settings: JobSettings,
    *,
    known_ids: Container[str],
    done_ids: Container[str] | None = None,
) -> JobFileInfo | None:
    """Validate an inbox file and move it to queued/ (returning its info), or refuse it.

    Refused (invalid, or its id is in `known_ids` -- the unfinished jobs -- or already
    in queued/ or running/): the file goes to failed/ with `<name>.error.json`; if
    failed/ already holds that name, under `<job>.dup-<n>.csv` beside
    `<job>.dup-<n>.error.json` (`job` inside holds the real id). The name of a job
    that is done (in `done_ids`, or in done/) is refused as `<job>.dup-<n>.csv` unless
    `[job] on_duplicate = "rerun"`, when it is accepted with `rerun` set. Returns None
    when refused, and when the file vanished. Raises only FileOperationError, for the
    folders themselves (disk full, read-only); the file then stays in the inbox.
    The file is durable in queued/ (both folders fsynced) when this returns its info.
    """
    (outcome,) = await accept_job_files(
        layout, [path], settings, known_ids=known_ids, done_ids=done_ids
    )
    if isinstance(outcome, FileOperationError):
        raise outcome
    return outcome
