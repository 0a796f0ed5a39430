"""The local folder layout (README: "Folders") and the file operations that keep it consistent.

Every move between job folders is one `rename` within one file system, so a crash
leaves each job file in exactly one folder. Writes go to a temp name in the same
folder, are fsynced, then renamed over the final name: a reader never sees half a
file. Every OSError (disk full, read-only, permission) surfaces as FileOperationError.
These functions block; async callers run them off the loop (`asyncio.to_thread`, or
core/files_async.py's `atomic_file_moves` for a batch of moves, through aiofiles).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from fnmatch import translate
from pathlib import Path
from typing import Any

from vastd.utils.exceptions import FileOperationError

NAME_MAX_BYTES = 255
JOB_SUFFIX = ".csv"
ERROR_SUFFIX = ".error.json"
TEMP_PREFIX = ".vastd-tmp-"
# Names only vastd creates: safe to delete at start (never run this on inbox/).
TEMP_PATTERNS: tuple[str, ...] = (f"{TEMP_PREFIX}*", "*.part")


class JobFolder(StrEnum):
    INBOX = "inbox"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def safe_name(name: str, suffix: str = "", limit: int = NAME_MAX_BYTES) -> str:
    """`name + suffix` if it fits in `limit` bytes, else a shortened stem + `-<hash>` + suffix.

    The hash is of the full `name` (not the suffix), so every name derived from one
    job id carries the same hash. Bytes are counted as the file system sees them
    (`os.fsencode`), and the stem is cut on a character boundary.
    """
    full = name + suffix
    if len(os.fsencode(full)) <= limit:
        return full
    tail = "-" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    budget = limit - len(os.fsencode(suffix)) - len(tail)
    if budget < 1:
        raise ValueError(f"suffix {suffix!r} leaves no room for a name within {limit} bytes")
    used = 0
    cut = 0
    for char in name:
        size = len(os.fsencode(char))
        if used + size > budget:
            break
        used += size
        cut += 1
    return name[:cut] + tail + suffix


# Editors' and downloaders' temp names (they also never end in `.csv`, but say so).
_TEMP_ENDINGS = (".part", ".tmp", ".swp", "~", ".crdownload")


def is_candidate_name(name: str) -> bool:
    """A name the inbox takes: `*.csv`, not a dot-file, not a temp name."""
    if name.startswith(".") or not name.endswith(JOB_SUFFIX) or name == JOB_SUFFIX:
        return False
    return not name.endswith(_TEMP_ENDINGS) and not name.startswith(TEMP_PREFIX)


def shown_name(name: str) -> str:
    """A name that is not UTF-8, its bad bytes written out (`bad\\xffname`): UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_utf8_reason(name: str) -> str:
    # A job id must be UTF-8 (utils/text.is_utf8): state.json, history.jsonl and every
    # log line are UTF-8 JSON.
    return f"the file name is not valid UTF-8 (shown here as {shown_name(name)}): rename it"


def job_file_name(job_id: str) -> str:
    """The file name of a job: `<job>.csv`."""
    return safe_name(job_id, JOB_SUFFIX)


def _temp_name(final_name: str) -> str:
    return safe_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final_name}")


@dataclass(frozen=True)
class Layout:
    """Paths under `[paths] root`; the folder names are fixed (README: "Folders")."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / JobFolder.INBOX

    @property
    def queued(self) -> Path:
        return self.root / JobFolder.QUEUED

    @property
    def running(self) -> Path:
        return self.root / JobFolder.RUNNING

    @property
    def done(self) -> Path:
        return self.root / JobFolder.DONE

    @property
    def failed(self) -> Path:
        return self.root / JobFolder.FAILED

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def state_backup(self) -> Path:
        return self.root / "state.json.bak"

    @property
    def history_file(self) -> Path:
        return self.root / "history.jsonl"

    def folder(self, folder: JobFolder) -> Path:
        return self.root / folder.value

    def job_file(self, folder: JobFolder, job_id: str) -> Path:
        return self.folder(folder) / job_file_name(job_id)

    def results_dir(self, job_id: str) -> Path:
        return self.results / safe_name(job_id)

    def error_file(self, job_id: str) -> Path:
        return self.failed / safe_name(job_id, ERROR_SUFFIX)

    def ensure(self) -> None:
        """Create every folder (0700 when new) and check they share one file system."""
        ensure_directory_exists(self.root)
        folders = [self.folder(f) for f in JobFolder] + [self.results]
        for path in folders:
            ensure_directory_exists(path)
        try:
            root_dev = os.stat(self.root).st_dev
            for path in folders:
                if os.stat(path).st_dev != root_dev:
                    raise FileOperationError(
                        f"{path} is on another file system than {self.root}: "
                        "job files move between these folders by rename"
                    )
        except OSError as exc:
            raise FileOperationError(f"cannot check {self.root}: {exc}") from exc


def fsync_directory(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileOperationError(f"cannot open folder {path}: {exc}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems refuse fsync on a folder; the rename itself still happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise FileOperationError(f"cannot fsync folder {path}: {exc}") from exc
    finally:
        os.close(fd)


def ensure_directory_exists(path: Path, mode: int = 0o700) -> Path:
    """Create `path` (and parents) if missing; existing folders keep their permissions."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise FileOperationError(f"{path} exists and is not a folder") from exc
    except OSError as exc:
        raise FileOperationError(f"cannot create folder {path}: {exc}") from exc
    return path


def atomic_file_move(
    source: Path, destination: Path, *, defer_fsync: Callable[[Path], None] | None = None
) -> Path:
    """Rename `source` to `destination` (same file system), never over an existing entry.

    The entry itself moves (a symlink or FIFO is never opened). Both folders are
    fsynced, or handed to `defer_fsync`, whose caller fsyncs them before it records
    where the file is (the state store does, before its next save). vastd is the only
    process moving files between its folders, so the check-then-rename is not raced by
    another writer.
    """
    if os.path.lexists(destination):
        raise FileOperationError(f"cannot move {source} to {destination}: destination exists")
    try:
        os.rename(source, destination)
    except OSError as exc:
        raise FileOperationError(f"cannot move {source} to {destination}: {exc}") from exc
    sync = defer_fsync or fsync_directory
    sync(destination.parent)
    if source.parent != destination.parent:
        sync(source.parent)
    return destination


def unique_stem(
    directory: Path,
    job_id: str,
    suffixes: Iterable[str] = (JOB_SUFFIX,),
    *,
    duplicate: bool = False,
) -> str:
    """`job_id`, or `<job_id>.dup-<n>` with the smallest n such that no derived name exists.

    Used where a finished or refused file must not replace an earlier one of the
    same name in done/ or failed/; `.error.json` then follows the returned stem.
    With `duplicate`, always `<job_id>.dup-<n>` (n >= 1): a refused second file of a
    job's name never takes the name the job's own failure would use.
    """
    suffixes = tuple(suffixes)
    n = 1 if duplicate else 0
    stem = f"{job_id}.dup-{n}" if duplicate else job_id
    while any(os.path.lexists(directory / safe_name(stem, s)) for s in suffixes):
        n += 1
        stem = f"{job_id}.dup-{n}"
    return stem


def move_job_file(
    layout: Layout,
    job_id: str,
    from_folder: JobFolder,
    to_folder: JobFolder,
    *,
    rename_on_collision: bool = False,
    defer_fsync: Callable[[Path], None] | None = None,
) -> Path:
    """Move `<job>.csv` between job folders atomically; return its new path.

    An existing file of the same name in `to_folder` is never replaced: this raises
    FileOperationError, or with `rename_on_collision` the file lands as
    `<job>.dup-<n>.csv` (its `.error.json` then uses that stem).
    """
    source = layout.job_file(from_folder, job_id)
    if rename_on_collision:
        target_dir = layout.folder(to_folder)
        stem = unique_stem(target_dir, job_id, (JOB_SUFFIX, ERROR_SUFFIX))
        destination = target_dir / safe_name(stem, JOB_SUFFIX)
    else:
        destination = layout.job_file(to_folder, job_id)
    return atomic_file_move(source, destination, defer_fsync=defer_fsync)


@functools.cache
def _any_of(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """A test of a name against any of the glob `patterns` (case-sensitive): one regex,
    where a fnmatch per pattern and name cost 0.1 s a start over a done/ of 100,000."""
    if not patterns:
        return lambda name: False
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


def cleanup_temp_files(directory: Path, patterns: Iterable[str] = TEMP_PATTERNS) -> int:
    """Remove vastd's own leftover temp files in `directory` (not recursive); return the count.

    The names are vastd's by construction; never point this at inbox/, where users'
    own `*.part` uploads may be in progress.
    """
    matches = _any_of(tuple(patterns))
    removed = 0
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries]
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise FileOperationError(f"cannot list {directory}: {exc}") from exc
    for name in names:
        if not matches(name):
            continue
        path = directory / name
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FileOperationError(f"cannot remove {path}: {exc}") from exc
    return removed


def write_new_file(path: Path, data: bytes, mode: int = 0o600, *, fsync: bool = False) -> None:
    """Create `path` with `data` and exactly `mode`, never over an existing entry (a
    link included); fsync it with `fsync`. Raises OSError, leaving a partly written file
    to the caller."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what the caller asked for
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: temp in the same folder, fsync, rename, fsync the folder.

    On any OSError the temp file is removed and `path` is left as it was.
    """
    temp = path.parent / _temp_name(path.name)
    try:
        write_new_file(temp, data, mode, fsync=True)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise FileOperationError(f"cannot write {path}: {exc}") from exc
    fsync_directory(path.parent)


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented JSON with a final newline (UTF-8; odd file names escaped)."""
    try:
        data = json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A non-UTF-8 file name decodes to lone surrogates; \u escapes still round-trip.
        data = json.dumps(obj, indent=2, ensure_ascii=True).encode("ascii")
    return data + b"\n"


def atomic_write_json(path: Path, obj: Any, mode: int = 0o600) -> None:
    """`atomic_write_bytes` of `obj` as `json_bytes`."""
    atomic_write_bytes(path, json_bytes(obj), mode)


def utc_now_iso() -> str:
    """The current time as ISO 8601 UTC with a `Z`, like the log lines."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC to the second with a `Z`; None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_error_json(
    layout: Layout,
    job_id: str,
    *,
    reason: str,
    attempts: int = 0,
    last_exit_code: int | None = None,
    log_tail: str = "",
    name: str | None = None,
) -> Path:
    """Write `failed/<name>.error.json` (name defaults to the job id; shortened if too long).

    `job` inside always holds the full job id. Returns the path written.
    """
    path = layout.failed / safe_name(name if name is not None else job_id, ERROR_SUFFIX)
    atomic_write_json(
        path,
        {
            "job": job_id,
            "reason": reason,
            "attempts": attempts,
            "last_exit_code": last_exit_code,
            "log_tail": log_tail,
            "at": utc_now_iso(),
        },
    )
    return path


def move_job_to_failed(
    layout: Layout,
    job_id: str,
    source: Path | JobFolder,
    *,
    reason: str,
    attempts: int = 0,
    last_exit_code: int | None = None,
    log_tail: str = "",
    duplicate: bool = False,
) -> Path:
    """Move a job file into failed/ beside its `.error.json`; return the file's new path.

    With `duplicate` the stem is always `<job>.dup-<n>` (a refused file of a job's name).

    `source` is a job folder (the file is `<folder>/<job>.csv`) or a path (e.g. an inbox
    entry, moved as an entry, never opened). Nothing in failed/ is replaced: when the
    name is taken, both files use the stem `<job>.dup-<n>`. If the move fails, the error
    file just written is removed again and FileOperationError is raised.
    """
    path = layout.job_file(source, job_id) if isinstance(source, JobFolder) else source
    stem = unique_stem(layout.failed, job_id, (JOB_SUFFIX, ERROR_SUFFIX), duplicate=duplicate)
    error_path = write_error_json(
        layout,
        job_id,
        reason=reason,
        attempts=attempts,
        last_exit_code=last_exit_code,
        log_tail=log_tail,
        name=stem,
    )
    try:
        return atomic_file_move(path, layout.failed / safe_name(stem, JOB_SUFFIX))
    except FileOperationError:
        with contextlib.suppress(OSError):
            os.unlink(error_path)
        raise


def resubmit_refused(layout: Layout, stem: str) -> Path | None:
    """Put a file refused at acceptance (`failed/<stem>.csv`, no job record) back into
    the inbox under its job's file name, where acceptance checks it again; its
    `.error.json` goes once it is there. None when failed/ holds no such file.

    The job's name is the error file's `job` (a `<job>.dup-<n>` stem or a shortened
    long one says no more). FileOperationError when the inbox already holds that name.
    Blocking: run it off the event loop.
    """
    source = layout.failed / safe_name(stem, JOB_SUFFIX)
    if not os.path.lexists(source):
        return None
    error_path = layout.failed / safe_name(stem, ERROR_SUFFIX)
    job_id = stem
    with contextlib.suppress(OSError, ValueError, AttributeError):
        named = json.loads(error_path.read_bytes()).get("job")
        if isinstance(named, str) and named and "/" not in named:
            job_id = named
    destination = atomic_file_move(source, layout.inbox / job_file_name(job_id))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(error_path)
    fsync_directory(layout.failed)
    return destination
