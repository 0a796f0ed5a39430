"""Job files: validation, arguments, discovery, the inbox watcher and acceptance.

A job is one CSV file; its name without `.csv` is the job id (any characters a file
name can hold; it is data, never shell text). Acceptance (CONTRACT §3) validates a
complete file and renames it inbox/ -> queued/; a refused file goes to failed/
beside its `.error.json`. Nothing about a bad file raises out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import fnmatch
import io
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import watchfiles

from vastd.core.files import (
    JOB_SUFFIX,
    TEMP_PREFIX,
    JobFolder,
    Layout,
    atomic_file_move,
    move_job_to_failed,
)
from vastd.utils.config import JobSettings
from vastd.utils.exceptions import FileOperationError, JobValidationError
from vastd.utils.logging import get_logger

log = get_logger(__name__)

# Editors' and downloaders' temp names (they also never end in `.csv`, but say so).
_TEMP_ENDINGS = (".part", ".tmp", ".swp", "~", ".crdownload")
DEFAULT_SECONDS_PER_ROW = 120.0  # 1M paths ≈ 2 min a row (reference/workload.md)


@dataclass(frozen=True)
class JobFileInfo:
    """What acceptance learned about a valid job file."""

    job_id: str
    path: Path
    size: int
    columns: list[str]
    rows: int


def job_id_for(path: Path) -> str:
    """The job id: the file name without `.csv`."""
    name = path.name
    return name[: -len(JOB_SUFFIX)] if name.endswith(JOB_SUFFIX) else name


def is_candidate_name(name: str) -> bool:
    """A name the inbox takes: `*.csv`, not a dot-file, not a temp name."""
    if name.startswith(".") or not name.endswith(JOB_SUFFIX) or name == JOB_SUFFIX:
        return False
    return not name.endswith(_TEMP_ENDINGS) and not name.startswith(TEMP_PREFIX)


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


def _validate(path: Path, max_bytes: int) -> tuple[JobFileInfo, os.stat_result]:
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
    info = JobFileInfo(job_id=job_id, path=path, size=len(data), columns=columns, rows=rows)
    return info, st


def validate_job_file(path: Path, max_bytes: int) -> JobFileInfo:
    """Check a job file against CONTRACT §3; JobValidationError(reason) when refused.

    Never follows a symlink and never blocks on a FIFO or device.
    """
    return _validate(path, max_bytes)[0]


def parse_job_file(path: Path) -> list[dict[str, str]]:
    """The rows of a job file as dicts keyed by the header (a BOM is dropped)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    except OSError as exc:
        raise FileOperationError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise JobValidationError(f"cannot parse {path.name}: {exc}") from None


def get_job_arguments(job_id: str, settings: JobSettings) -> dict[str, str]:
    """`[job.vars]`, overridden by the first `[[job.patterns]]` whose glob matches `<job>.csv`."""
    arguments = dict(settings.vars)
    name = job_id + JOB_SUFFIX
    for pattern in settings.patterns:
        if fnmatch.fnmatchcase(name, pattern.glob):
            arguments.update(pattern.vars)
            break
    return arguments


def estimate_job_duration(
    info: JobFileInfo, seconds_per_row: float = DEFAULT_SECONDS_PER_ROW
) -> timedelta:
    """A rough wall time: rows x seconds per row."""
    return timedelta(seconds=info.rows * seconds_per_row)


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


def categorize_jobs_by_type(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Group by the id's prefix before `_job_` (`garch_test`, `garch_training`), else "other"."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        prefix, sep, _ = job_id_for(path).partition("_job_")
        groups.setdefault(prefix if sep and prefix else "other", []).append(path)
    return groups


def prioritize_jobs(paths: Iterable[Path]) -> list[Path]:
    """Oldest first (mtime), then by name: first come, first served.

    Names are not in numeric order (padding is "at least 4 digits"), so arrival
    order is the only fair one. A vanished file sorts last.
    """

    def key(path: Path) -> tuple[float, str]:
        try:
            return (os.lstat(path).st_mtime_ns, path.name)
        except OSError:
            return (float("inf"), path.name)

    return sorted(paths, key=key)


# --- inbox -----------------------------------------------------------------------------

_Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class InboxWatcher:
    """Reports each complete candidate file in the inbox once to `on_ready(path)`.

    watchfiles events are only hints to look sooner: it reports a file as soon as it
    appears and has no close-write event. Readiness comes from looking:

    - a regular file whose ctime is later than its mtime is ready at once: its inode
      changed after the last write (renamed in, or an mtime set by `cp -p`/rsync);
    - otherwise size, mtime and inode must be unchanged across two looks `settle_s`
      apart (a writer pausing longer than that is indistinguishable from a finished one);
    - symlinks, FIFOs, devices and folders hold nothing being written: ready at once
      (acceptance refuses them).

    The folder is scanned at start, after events, every `settle_s` while a file is
    settling, and every `rescan_interval_s` regardless. A file is reported again only
    after it disappears and reappears (or is replaced), or after `forget()`.
    """

    def __init__(
        self,
        inbox: Path,
        on_ready: Callable[[Path], Awaitable[object]],
        *,
        settle_s: float = 1.0,
        rescan_interval_s: float = 30.0,
        use_events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self._on_ready = on_ready
        self.settle_s = settle_s
        self.rescan_interval_s = rescan_interval_s
        self._use_events = use_events
        self._clock = clock
        self._looks: dict[str, tuple[_Signature, float]] = {}
        self._reported: dict[str, _Signature] = {}
        self._hint = asyncio.Event()
        self._unreadable = False
        self.watching = False  # True once file system events are known to arrive

    @property
    def pending(self) -> int:
        """Candidate files seen but not yet ready."""
        return sum(1 for name in self._looks if name not in self._reported)

    def forget(self, path: Path) -> None:
        """Report this file again on the next look where it is ready (e.g. after an error)."""
        self._reported.pop(path.name, None)
        self._looks.pop(path.name, None)

    def _list(self) -> dict[str, os.stat_result] | None:
        found: dict[str, os.stat_result] = {}
        try:
            with os.scandir(self.inbox) as entries:
                for entry in entries:
                    if not is_candidate_name(entry.name):
                        continue
                    try:
                        found[entry.name] = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished or unreadable: look again next time
        except OSError as exc:
            if not self._unreadable:
                log.warning("inbox_unreadable", path=str(self.inbox), error=str(exc))
            self._unreadable = True
            return None
        self._unreadable = False
        return found

    async def scan_once(self) -> list[Path]:
        """Look at the whole inbox once; return the files that became ready (by name)."""
        listing = await asyncio.to_thread(self._list)
        if listing is None:
            return []
        now = self._clock()
        ready: list[Path] = []
        for name in [n for n in self._looks if n not in listing]:
            del self._looks[name]
        for name in [n for n in self._reported if n not in listing]:
            del self._reported[name]
        for name, st in sorted(listing.items()):
            sig = _signature(st)
            if name in self._reported:
                if self._reported[name][0] == sig[0]:
                    continue
                del self._reported[name]  # replaced by another file under the same name
            previous = self._looks.get(name)
            if previous is None or previous[0] != sig:
                self._looks[name] = (sig, now)
                is_ready = not stat.S_ISREG(st.st_mode) or st.st_ctime_ns > st.st_mtime_ns
            else:
                is_ready = now - previous[1] >= self.settle_s
            if is_ready:
                self._reported[name] = sig
                del self._looks[name]
                ready.append(self.inbox / name)
        return ready

    async def _deliver(self, path: Path) -> None:
        try:
            await self._on_ready(path)
        except Exception as exc:
            # The file stays in the inbox; the next full rescan offers it again.
            log.warning("inbox_callback_failed", job=job_id_for(path), error=repr(exc))
            self.forget(path)

    async def _watch_events(self, stop: asyncio.Event) -> None:
        """Set the hint on every batch of events; back off and retry if watching fails."""
        while not stop.is_set():
            try:
                async with contextlib.aclosing(
                    watchfiles.awatch(
                        self.inbox,
                        watch_filter=None,
                        recursive=False,
                        stop_event=stop,
                        rust_timeout=1_000,
                        yield_on_timeout=True,
                        step=50,
                        debounce=500,
                    )
                ) as batches:
                    async for changes in batches:
                        # An empty batch is a timeout: proof that the watch is in place.
                        self.watching = True
                        if changes:
                            self._hint.set()
            except Exception as exc:
                # inotify limits, a missing folder: the periodic rescan still works.
                log.warning("inbox_events_unavailable", path=str(self.inbox), error=repr(exc))
            self.watching = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rescan_interval_s):
                    await stop.wait()

    async def _wait_for_next_look(self) -> None:
        delay = self.settle_s if self.pending else self.rescan_interval_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._hint.wait()
        self._hint.clear()

    async def run(self) -> None:
        """Watch until cancelled; every ready file goes to `on_ready`, one at a time."""
        stop = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        if self._use_events:
            watcher = asyncio.create_task(self._watch_events(stop), name="inbox-events")
        try:
            while True:
                try:
                    ready = await self.scan_once()
                except Exception as exc:
                    log.warning("inbox_scan_failed", error=repr(exc))
                    ready = []
                for path in ready:
                    await self._deliver(path)
                await self._wait_for_next_look()
        finally:
            # The stop event ends watchfiles' thread promptly; then the task itself.
            stop.set()
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait([watcher])


# --- acceptance ------------------------------------------------------------------------


def _refuse(layout: Layout, path: Path, job_id: str, reason: str) -> None:
    """Move the entry itself (never opened) to failed/ under a free name, with its error file."""
    log.warning("job_refused", job=job_id, reason=reason)
    try:
        move_job_to_failed(layout, job_id, path, reason=reason)
    except FileOperationError:
        if os.path.lexists(path):
            raise


def _collides(layout: Layout, job_id: str, known_ids: set[str]) -> bool:
    return job_id in known_ids or any(
        os.path.lexists(layout.job_file(folder, job_id))
        for folder in (JobFolder.QUEUED, JobFolder.RUNNING)
    )


def _accept(
    layout: Layout, path: Path, settings: JobSettings, known_ids: set[str]
) -> JobFileInfo | None:
    job_id = job_id_for(path)
    if not os.path.lexists(path):
        return None
    if _collides(layout, job_id, known_ids):
        _refuse(layout, path, job_id, f"a job named {job_id!r} is already queued or running")
        return None
    try:
        info, st = _validate(path, settings.max_input_bytes)
    except JobValidationError as exc:
        if not os.path.lexists(path):
            return None
        _refuse(layout, path, job_id, str(exc))
        return None
    destination = layout.job_file(JobFolder.QUEUED, job_id)
    try:
        atomic_file_move(path, destination)
    except FileOperationError:
        if not os.path.lexists(path):
            return None
        if os.path.lexists(destination):
            _refuse(layout, path, job_id, f"a job named {job_id!r} is already queued or running")
            return None
        raise
    # The name was validated, the inode moved: if they differ, the file was swapped between.
    try:
        moved = os.lstat(destination)
        swapped = (moved.st_ino, moved.st_size, moved.st_mtime_ns) != (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        )
        if swapped:
            info, st = _validate(destination, settings.max_input_bytes)
    except JobValidationError as exc:
        _refuse(layout, destination, job_id, str(exc))
        return None
    except OSError as exc:
        raise FileOperationError(f"cannot check {destination}: {exc}") from exc
    info = dataclasses.replace(info, path=destination)
    log.info("job_accepted", job=job_id, rows=info.rows, size=info.size)
    return info


async def accept_job_file(
    layout: Layout, path: Path, settings: JobSettings, *, known_ids: set[str]
) -> JobFileInfo | None:
    """Validate an inbox file and move it to queued/ (returning its info), or refuse it.

    Refused (invalid, or its id is in `known_ids` -- the unfinished jobs -- or already
    in queued/ or running/): the file goes to failed/ with `<name>.error.json`; if
    failed/ already holds that name, under `<job>.dup-<n>.csv` beside
    `<job>.dup-<n>.error.json` (`job` inside holds the real id). Returns None then, and
    when the file vanished. Raises only FileOperationError, for the folders themselves
    (disk full, read-only); the file then stays in the inbox.
    """
    return await asyncio.to_thread(_accept, layout, path, settings, known_ids)
