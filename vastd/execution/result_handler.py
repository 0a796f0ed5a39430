"""Listing, download and validation of a job's results; the remote folder's removal.

Where `result_glob` is matched: against paths relative to the job folder, with shell
glob rules per path component (`*` never crosses `/`, hidden names never match).
The candidates are the job folder's own entries and those of `out/` (one level), so
`*.parquet` finds files written beside the input (the GARCH script) and
`out/*.parquet` those written to `{output_dir}`. Only regular files count: a
symlink, folder or device that matches is skipped and reported, never downloaded.
The input CSV and the wrapper's files (log.txt, pid, exit_code, ...) never count.

Listing output, after the marker: `R <run id|->` (the folder's `run` file), then
`F <type l|f|d|o> <size> <hex of the name>` lines, then `END`; names travel
hex-encoded, so newlines and non-UTF-8 bytes are harmless. A collection asked for
one run refuses a folder that holds another (RunMismatchError).

A rerun of a finished job (`keep_previous`) installs its results as
`results/<job>/` and keeps the earlier ones as `results/<job>/previous-<n>/`:
the earlier folder is first renamed to `results/.keep-<job>`, which a crash leaves
in place and the next install picks up again, so no step loses either set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from vastd.core.files import TEMP_PREFIX, fsync_directory, json_bytes, safe_name, write_new_file
from vastd.core.files_async import in_thread_to_its_end
from vastd.core.ssh import RemoteFileError
from vastd.execution.job_runner import (
    CONTROL_NAMES,
    LOG_NAME,
    SH_HELPERS,
    RemoteJobPaths,
    RemoteRunner,
    as_sh_command,
    check_run_id,
    failure_text,
    is_job_dir_of,
    marker_lines,
)
from vastd.execution.validate import ValidationReport, run_validate_command, validate_results
from vastd.utils.exceptions import (
    ConfigError,
    FileOperationError,
    JobExecutionError,
    ResultTooLargeError,
    ResultValidationError,
    RunMismatchError,
)
from vastd.utils.logging import get_logger

log = get_logger("vastd.results")

LOG_TAIL_BYTES = 10 * 1024 * 1024
_REMOTE_LOG_TAIL = ".vastd-log-tail"


@dataclass(frozen=True)
class RemoteFile:
    """A result candidate: `name` relative to the job folder, `path` absolute."""

    name: str
    path: str
    size: int


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class CollectedResults:
    directory: Path
    files: list[Path]
    rows: int
    log: Path | None = None
    skipped: list[str] = field(default_factory=list)
    previous: Path | None = None  # where the earlier run's results were kept (a rerun)
    cost: float | None = None  # the MANIFEST's: the job's share of its instance's price


@dataclass(frozen=True)
class ResultListing:
    """A job folder's result candidates (sorted by name), what was skipped, the log's size
    and the folder's run id."""

    files: list[RemoteFile]
    skipped: list[str]
    log_size: int | None
    run: str | None = None
    cut: bool = False  # the remote side stopped listing past the count cap


# The listing of the job folder (the current directory), with the glob in $P and the
# count cap in $C (0: none); it may `exit` (past the cap), so it runs in a script or a
# subshell of its own. Past $S names (0: no limit, always below $C otherwise) it stops
# with MORE and no END: a listing left for the collection to take again.
_LIST_BODY = r"""
_one() {
  if [ -L "$1" ]; then t=l
  elif [ -f "$1" ]; then t=f
  elif [ -d "$1" ]; then t=d
  elif [ -e "$1" ]; then t=o
  else return 0; fi
  # Sizes are checked by the download itself; only the log's decides how it is fetched
  # (an empty one, `-s` false, costs no process).
  s=0; [ "$1" = log.txt ] && [ $t = f ] && [ -s log.txt ] && s=$(wc -c < log.txt)
  s=${s#"${s%%[! ]*}"}; case $s in ''|*[!0-9]*) s=0 ;; esac
  case $1 in
    *[!A-Za-z0-9._/+-]*) printf 'F %s %s %s\n' $t "${s:-0}" "$(printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n')" ;;
    *) printf 'P %s %s %s\n' $t "${s:-0}" "$1" ;;
  esac
}
r=; read -r r 2>/dev/null < run; case $r in ''|*[!0-9a-f]*) r=- ;; esac
printf 'R %s\n' "$r"
# Only names the glob may match are looked at (the shell's case prefilters; vastd
# matches exactly afterwards).
n=0
_cut() { n=$((n+1)); [ "$C" -gt 0 ] && [ "$n" -gt "$C" ] && { echo CUT; echo END; exit 0; }
  [ "$S" -gt 0 ] && [ "$n" -gt "$S" ] && { echo MORE; exit 0; }; return 0; }
for f in *; do case $f in log.txt|$P) _cut; _one "$f" ;; esac; done
if [ -d out ] && [ ! -L out ]; then for f in out/*; do case $f in $P) _cut; _one "$f" ;; esac; done; fi
echo END
"""
_LIST_SCRIPT = (
    "M=__VASTD_BEGIN__\n"
    """cd "$D" 2>/dev/null || { printf '%s\\nnodir\\n' "$M"; exit 0; }\n"""
    """printf '%s\\n' "$M"\n""" + _LIST_BODY
)
_ENTRY = re.compile(r"^F ([lfdo]) ([0-9]+) ((?:[0-9a-f]{2})+)$")
_PLAIN_ENTRY = re.compile(r"^P ([lfdo]) ([0-9]+) ([A-Za-z0-9._/+-]+)$")
_RUN_LINE = re.compile(r"^R (-|[0-9a-f]+)$")
_KIND = {"l": "a symlink", "d": "a folder", "o": "not a regular file"}


def _check_pattern(pattern: str) -> list[str]:
    parts = pattern.split("/")
    if not pattern or pattern.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError([f"job.result_glob: {pattern!r} must be a relative glob without '..'"])
    return parts


def matches_result_glob(name: str, pattern: str) -> bool:
    """Shell-glob match of a relative path, component by component (`*` stops at `/`)."""
    parts = _check_pattern(pattern)
    names = name.split("/")
    return len(names) == len(parts) and all(
        fnmatchcase(n, p) for n, p in zip(names, parts, strict=True)
    )


async def find_result_files(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    pattern: str,
    *,
    timeout_s: float,
    max_files: int | None = None,
) -> ResultListing:
    """Regular files of the job folder (and `out/`) matching `pattern`, in one round trip.

    With `max_files`, the remote side stops listing a little past it (`cut` says so): a
    folder of a million files costs one short answer, never a flood of output.
    """
    _check_pattern(pattern)
    script = (
        f"D={shlex.quote(paths.job_dir)}\nP={shlex.quote(pattern)}\n"
        f"C={_listing_cap(max_files)}\nS=0\n{_LIST_SCRIPT}"
    )
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    return parse_listing(
        marker_lines(result.stdout), paths, pattern, incomplete=f"exit {result.exit_status}"
    )


def _listing_cap(max_files: int | None) -> int:
    # Room for log.txt and the skipped entries besides the cap (0: no cap).
    return 0 if max_files is None else max_files + 64


# Names a status command lists per folder: a few processes each (more for an odd name),
# so four folders of them take well under a second; a folder with more is listed again
# by its collection, with the collection's own time limit.
STATUS_LISTING_NAMES = 64


def listing_function(pattern: str, *, max_files: int | None = None) -> str:
    """Shell code defining `_list DIR`, which prints the listing `find_result_files` reads,
    of DIR, in a subshell. For a status script: the listing of a run that has just exited
    comes with its status, and its collection needs no command of its own. Past
    `STATUS_LISTING_NAMES` names it stops short (no END): the collection lists again."""
    _check_pattern(pattern)
    return (
        "_list() (\n"
        'cd "$1" 2>/dev/null || { echo nodir; exit 0; }\n'
        f"P={shlex.quote(pattern)}; C={_listing_cap(max_files)}; S={STATUS_LISTING_NAMES}\n"
        f"{_LIST_BODY})"
    )


def parse_listing(
    lines: Sequence[str] | None, paths: RemoteJobPaths, pattern: str, *, incomplete: str = ""
) -> ResultListing:
    """The result candidates of a listing's lines (those after the marker)."""
    _check_pattern(pattern)
    if lines and lines[0].strip() == "nodir":
        raise ResultValidationError("the remote job folder is missing")
    if lines is None or "END" not in (line.strip() for line in lines):
        raise JobExecutionError(f"result listing incomplete ({incomplete or 'cut short'})")
    input_name = posixpath.basename(paths.input)
    files: list[RemoteFile] = []
    skipped: list[str] = []
    log_size: int | None = None
    run: str | None = None
    cut = False
    for line in lines:
        if line.strip() == "CUT":
            cut = True
            continue
        run_line = _RUN_LINE.match(line.strip())
        if run_line:
            run = None if run_line.group(1) == "-" else run_line.group(1)
            continue
        match = _ENTRY.match(line.strip())
        plain = None if match else _PLAIN_ENTRY.match(line.strip())
        if plain:
            kind, size, raw = plain.group(1), int(plain.group(2)), plain.group(3).encode()
        elif match:
            kind, size, raw = match.group(1), int(match.group(2)), bytes.fromhex(match.group(3))
        else:
            continue
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(f"{raw!r}: name is not UTF-8")
            continue
        if name == LOG_NAME and kind == "f":
            log_size = size
        if name in CONTROL_NAMES or name == input_name or name.endswith(".part"):
            continue
        if not matches_result_glob(name, pattern):
            continue
        if kind != "f":
            skipped.append(f"{name!r}: {_KIND[kind]}, ignored")
            continue
        files.append(RemoteFile(name=name, path=f"{paths.job_dir}/{name}", size=size))
    for reason in skipped:
        log.warning("result_file_skipped", reason=reason)
    files.sort(key=lambda f: f.name)
    return ResultListing(files=files, skipped=skipped, log_size=log_size, run=run, cut=cut)


def local_result_name(name: str) -> str:
    """The local file name of a result: its basename, control characters replaced."""
    base = name.rsplit("/", 1)[-1]
    cleaned = "".join("_" if ord(c) < 32 or ord(c) == 127 or c == "\\" else c for c in base)
    if cleaned.startswith("."):
        cleaned = "_" + cleaned
    if not cleaned:
        raise ResultValidationError(f"{name!r}: not a usable file name")
    return safe_name(cleaned)


def _local_target(local_dir: Path, name: str) -> Path:
    base = local_dir.resolve()
    target = base / local_result_name(name)
    if target.parent != base or not target.resolve().is_relative_to(base):
        raise ResultValidationError(f"{name!r}: would land outside {local_dir}")
    return target


async def download_result_file(
    conn: RemoteRunner, remote: RemoteFile, local_dir: Path, *, max_bytes: int, timeout_s: float
) -> Path:
    """Download one result into `local_dir` (never outside it); refuse it past `max_bytes`
    (checked while copying: the copy stops there)."""
    target = await asyncio.to_thread(_local_target, local_dir, remote.name)
    await _download_to(conn, remote, target, max_bytes=max_bytes, timeout_s=timeout_s)
    return target


async def _download_to(
    conn: RemoteRunner, remote: RemoteFile, target: Path, *, max_bytes: int, timeout_s: float
) -> int:
    if remote.size > max_bytes:
        raise ResultTooLargeError(f"{remote.name!r}: {remote.size} bytes, more than {max_bytes}")
    try:
        return await conn.download(remote.path, target, timeout_s=timeout_s, max_bytes=max_bytes)
    except RemoteFileError as exc:
        # The host's SFTP server refused the read (an I/O error on its disk, a file
        # removed since the listing): which file, and what it said.
        raise RemoteFileError(f"cannot read {remote.name!r}: {exc}", code=exc.code) from exc


def _make_temp_for(tmp: Path, names: Sequence[str], min_free_bytes: int) -> tuple[list[Path], int]:
    """Make the temp folder; where each result lands in it, and the bytes the disk may
    take before its floor (one worker thread hop for a job's results)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(mode=0o700)
    return [_local_target(tmp, n) for n in names], _free_bytes(tmp) - min_free_bytes


@dataclass(frozen=True)
class ResultLimits:
    """What one job's results may take, checked while they are copied.

    `max_file_bytes` per file, `max_total_bytes` for all of them together (None: no
    cap), `max_files` result files at most; `min_free_bytes` must stay free on the local
    disk of results/ (a download that would pass it waits: not the job's fault).
    """

    max_file_bytes: int
    max_total_bytes: int | None = None
    max_files: int | None = None
    min_free_bytes: int = 0


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


async def _download_within(
    conn: RemoteRunner,
    remote: RemoteFile,
    target: Path,
    *,
    limits: ResultLimits,
    copied: int,
    room: int,
    timeout_s: float,
) -> int:
    """Download one result to `target` within every cap at once: its own, the job's
    total (`copied` bytes so far) and the local disk's floor (`room`: what the disk could
    take above it before the job's first download). The copy stops at the first one
    passed; the error says which (the disk's is a FileOperationError: the job waits).
    Returns the file's size."""
    disk_left = room - copied
    if disk_left <= 0:
        raise FileOperationError(_disk_floor_message(target.parent, limits))
    total_left = None
    if limits.max_total_bytes is not None:
        total_left = limits.max_total_bytes - copied
    cap = min(limits.max_file_bytes, disk_left, *(() if total_left is None else (total_left,)))
    try:
        return await _download_to(conn, remote, target, max_bytes=cap, timeout_s=timeout_s)
    except ResultTooLargeError:
        if (
            cap == disk_left
            and cap < limits.max_file_bytes
            and (total_left is None or cap < total_left)
        ):
            raise FileOperationError(_disk_floor_message(target.parent, limits)) from None
        if total_left is not None and cap == total_left and cap < limits.max_file_bytes:
            raise ResultTooLargeError(
                f"the results pass [job] max_results_total_bytes = {limits.max_total_bytes}"
                f" (at {remote.name!r})"
            ) from None
        raise


def _disk_floor_message(local_dir: Path, limits: ResultLimits) -> str:
    return (
        f"the local disk of {local_dir.parent} would fall under "
        f"[paths] min_free_disk_gb ({limits.min_free_bytes / 1e9:g} GB free kept): "
        "the download waits"
    )


def check_rows(report: ValidationReport, *, row_key: str, rows_expected: int | None) -> int:
    """The rows the results hold: with a row key, its distinct values, which must equal
    the job CSV's data rows (a result short of rows is worse than none)."""
    if not row_key or report.keys is None:
        return report.rows
    if rows_expected is not None and report.keys != rows_expected:
        raise ResultValidationError(
            f"results incomplete: {report.keys} distinct {row_key!r} value(s) found,"
            f" {rows_expected} expected (the rows of the job's CSV)"
        )
    return report.keys


async def _download_log(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    log_size: int | None,
    local_dir: Path,
    *,
    cap_bytes: int,
    timeout_s: float,
) -> Path | None:
    """The job's log as `local_dir/log.txt` (its tail past `cap_bytes`); None when there
    is none. An empty one (`log_size == 0`) is not fetched and not yet created."""
    if log_size is None:
        return None
    target = local_dir / LOG_NAME
    if log_size == 0:
        # Empty when listed: no round trip (a straggler's late line may be missed, as it
        # may be by a download a moment later); the caller creates the file.
        return target
    source = paths.log
    size: int | None = log_size  # measured by the listing: no lstat needed
    if log_size > cap_bytes:
        size = None
        source = f"{paths.job_dir}/{_REMOTE_LOG_TAIL}"
        q = shlex.quote
        result = await conn.run(
            as_sh_command(f"tail -c {int(cap_bytes)} {q(paths.log)} > {q(source)}"),
            timeout_s=timeout_s,
        )
        if not result.ok:
            log.warning("result_log_skipped", reason=failure_text(result, 300))
            return None
    try:
        # The job has ended, but allow some slack for a straggler still writing.
        await conn.download(source, target, timeout_s=timeout_s, max_bytes=2 * cap_bytes, size=size)
    except (ResultValidationError, RemoteFileError) as exc:
        # The results are whole without it: a log that cannot be read is only missing.
        log.warning("result_log_skipped", path=source, reason=str(exc))
        return None
    if source != paths.log:
        # A leftover would do no harm: the next start clears the job folder.
        await conn.run(as_sh_command(f"rm -f {shlex.quote(source)}"), timeout_s=timeout_s)
    return target


def _fsync_tree(folder: Path) -> None:
    for entry in folder.iterdir():
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_directory(folder)


def _install_results(tmp: Path, final: Path, *, synced: bool = False) -> None:
    """Replace `final` with `tmp` by renames; an earlier attempt's folder is set aside, then
    deleted, so the final name only ever holds one run's complete results. (`synced`:
    the caller has fsynced `tmp`'s files already.)"""
    if not synced:
        _fsync_tree(tmp)
    aside: Path | None = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(f"{tmp.name}-old")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_directory(final.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


PREVIOUS_PREFIX = "previous-"


def keep_folder(final: Path) -> Path:
    """Where a rerun parks the earlier results while it installs its own."""
    return final.with_name(safe_name(f".keep-{final.name}"))


def _is_previous_name(name: str) -> bool:
    return name.startswith(PREVIOUS_PREFIX) and name[len(PREVIOUS_PREFIX) :].isdigit()


def _previous_dirs(folder: Path) -> list[Path]:
    with contextlib.suppress(FileNotFoundError):
        return [
            p
            for p in folder.iterdir()
            if _is_previous_name(p.name) and p.is_dir() and not p.is_symlink()
        ]
    return []


MANIFEST_NAME = "MANIFEST.json"


def manifest_run(folder: Path) -> str | None:
    """The run id a results folder's MANIFEST.json names (None when unreadable)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    run = data.get("run") if isinstance(data, dict) else None
    return run if isinstance(run, str) else None


def _install_keeping_previous(tmp: Path, final: Path, run_id: str | None = None) -> Path | None:
    """Install `tmp` as `final`, the results it replaces kept as `final/previous-<n>/`.

    Returns that folder (None when there was nothing to keep). Every step is a rename;
    `keep_folder(final)` holds the earlier results until they are in place, and an
    install that finds it (a crash came between) starts from it again. A `final` whose
    MANIFEST names this same run was installed by this run before a crash: it is
    replaced, not kept a second time.
    """
    _fsync_tree(tmp)
    keep = keep_folder(final)
    if keep.is_dir():
        # An interrupted install: `final`, if there, holds this same run's results
        # (replaced now); earlier previous-<n> folders it got go back first.
        if final.is_dir() and not final.is_symlink():
            for prev in _previous_dirs(final):
                os.rename(prev, keep / prev.name)
            shutil.rmtree(final)
    elif final.is_dir() and not final.is_symlink():
        if run_id is not None and manifest_run(final) == run_id:
            previous = _previous_dirs(final)
            for prev in previous:
                os.rename(prev, tmp / prev.name)
            _install_results(tmp, final)  # (synced again: the folders just moved in)
            # The earlier run's folder from that first install (its input goes there).
            newest = max(previous, key=lambda p: int(p.name[len(PREVIOUS_PREFIX) :]), default=None)
            return final / newest.name if newest is not None else None
        os.rename(final, keep)
        fsync_directory(final.parent)
    else:
        _install_results(tmp, final, synced=True)
        return None
    os.rename(tmp, final)
    numbers = [0]
    for prev in _previous_dirs(keep):
        numbers.append(int(prev.name[len(PREVIOUS_PREFIX) :]))
        os.rename(prev, final / prev.name)
    target = final / f"{PREVIOUS_PREFIX}{max(numbers) + 1}"
    os.rename(keep, target)
    fsync_directory(final)
    fsync_directory(final.parent)
    return target


def restore_kept(final: Path) -> bool:
    """Undo an install interrupted by a crash whose run then never completed: the
    earlier results set aside in `keep_folder(final)` become `final` again."""
    keep = keep_folder(final)
    if not keep.is_dir():
        return False
    if final.is_dir() and not final.is_symlink():
        for prev in _previous_dirs(final):
            os.rename(prev, keep / prev.name)
        shutil.rmtree(final)
    os.rename(keep, final)
    fsync_directory(final.parent)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(tmp: Path, files: list[Path], fields: Mapping[str, Any]) -> None:
    """MANIFEST.json in the temp folder: a plain write, made durable with the results by
    the install's fsyncs (the folder is only ever seen whole, under its final name)."""
    entries = [
        {"name": p.name, "bytes": (tmp / p.name).stat().st_size, "sha256": _sha256(tmp / p.name)}
        for p in files
    ]
    write_new_file(tmp / MANIFEST_NAME, json_bytes({**fields, "files": entries}))


def _clear_vastd_names(tmp: Path) -> None:
    """After a validate_command: vastd's own names in the folder (`log.txt`,
    `MANIFEST.json`) are its to write. A file or link of that name the command left is
    removed; a folder fails the attempt."""
    for name in (LOG_NAME, MANIFEST_NAME):
        path = tmp / name
        if path.is_dir() and not path.is_symlink():
            raise ResultValidationError(f"the validate_command left a folder named {name}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _finish_results(
    tmp: Path,
    final: Path,
    files: list[Path],
    manifest: Mapping[str, Any] | None,
    *,
    keep_previous: bool,
    run_id: str | None,
    empty: Sequence[Path] = (),
) -> Path | None:
    """The `empty` files (an empty log), the manifest, then the install (one worker
    thread hop); returns the folder the replaced results were kept in
    (`keep_previous`)."""
    for path in empty:
        path.touch(exist_ok=False)
    if manifest is not None:
        _write_manifest(tmp, files, manifest)
    if keep_previous:
        return _install_keeping_previous(tmp, final, run_id)
    _install_results(tmp, final)
    return None


async def collect_job_results(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    job_id: str,
    *,
    results_root: Path,
    pattern: str,
    min_results: int,
    validate: str,
    max_bytes: int,
    timeout_s: float,
    log_max_bytes: int = LOG_TAIL_BYTES,
    run_id: str | None = None,
    keep_previous: bool = False,
    manifest: Mapping[str, Any] | None = None,
    limits: ResultLimits | None = None,
    row_key: str = "",
    rows_expected: int | None = None,
    validate_command: str = "",
    validate_memory_mb: int = 512,
    validate_timeout_s: float = 300.0,
    listed: Sequence[str] | None = None,
) -> CollectedResults:
    """Download, validate and install a job's results as `results_root/<safe job>/`.

    Everything lands in a temp folder first; only a complete, valid set replaces the
    final folder (an earlier attempt's folder is removed, never merged). On any
    failure the temp folder is removed and the final name is left as it was.
    Downloads stay within `limits` (else `max_bytes` per file); validation runs in a
    child process (`vastd.execution.validate`), then `validate_command` if given; with
    `row_key`, the results must hold `rows_expected` distinct values of that column.
    `listed`: the folder's listing as a status command just printed it (`listing_function`,
    same caps); one that is cut short or finds no folder is listed again.
    """
    limits = limits if limits is not None else ResultLimits(max_file_bytes=max_bytes)
    listing: ResultListing | None = None
    if listed is not None:
        with contextlib.suppress(JobExecutionError, ResultValidationError):
            listing = parse_listing(listed, paths, pattern)
    if listing is None:
        listing = await find_result_files(
            conn, paths, pattern, timeout_s=timeout_s, max_files=limits.max_files
        )
    if run_id is not None and listing.run != run_id:
        raise RunMismatchError(
            f"the remote job folder holds run {listing.run or '(none)'}, not run {run_id}"
        )
    remote_files = listing.files
    if len(remote_files) < min_results:
        raise ResultValidationError(
            f"{len(remote_files)} result file(s) match {pattern!r}, at least {min_results} needed"
        )
    if limits.max_files is not None and (len(remote_files) > limits.max_files or listing.cut):
        raise ResultTooLargeError(
            f"more than [job] max_result_files = {limits.max_files} result files match {pattern!r}"
        )
    local_names = [local_result_name(f.name) for f in remote_files]
    if len(set(local_names)) != len(local_names):
        raise ResultValidationError("two result files share a local name")
    if taken := sorted({LOG_NAME, MANIFEST_NAME} & set(local_names)):
        raise ResultValidationError(
            f"a result file is named {taken[0]}, a name vastd writes itself"
        )
    if keep_previous and (kept := sorted(n for n in local_names if _is_previous_name(n))):
        raise ResultValidationError(
            f"a result file is named {kept[0]}, the name a rerun gives the folder of the "
            "results it replaces"
        )
    final = results_root / safe_name(job_id)
    tmp = results_root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        local_files, room = await in_thread_to_its_end(
            _make_temp_for, tmp, [f.name for f in remote_files], limits.min_free_bytes
        )
        files = [final / local.name for local in local_files]
        copied = 0
        for remote, local in zip(remote_files, local_files, strict=True):
            copied += await _download_within(
                conn,
                remote,
                local,
                limits=limits,
                copied=copied,
                room=room,
                timeout_s=timeout_s,
            )
        report = await validate_results(
            local_files,
            validate,
            row_key=row_key,
            memory_mb=validate_memory_mb,
            timeout_s=validate_timeout_s,
        )
        rows = check_rows(report, row_key=row_key, rows_expected=rows_expected)
        if validate_command:
            await run_validate_command(validate_command, tmp, timeout_s=validate_timeout_s)
            await in_thread_to_its_end(_clear_vastd_names, tmp)
        log_path = await _download_log(
            conn, paths, listing.log_size, tmp, cap_bytes=log_max_bytes, timeout_s=timeout_s
        )
        # With the results, before the job is done: what run, where, which bytes.
        fields = None
        if manifest is not None:
            fields = {**manifest, "job": job_id, "run": run_id, "rows_out": rows}
        # To its end even when cancelled: the clean-up below must not remove `tmp` while
        # the install is renaming it.
        previous = await in_thread_to_its_end(
            _finish_results,
            tmp,
            final,
            files,
            fields,
            keep_previous=keep_previous,
            run_id=run_id,
            empty=(log_path,) if log_path is not None and listing.log_size == 0 else (),
        )
    except BaseException as exc:
        # Synchronous on purpose: this must also run when the task is being cancelled.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            # A local problem (disk full, read-only): not the job's fault, try again later.
            raise FileOperationError(f"cannot store the results of {job_id!r}: {exc}") from exc
        raise
    return CollectedResults(
        directory=final,
        files=files,
        rows=rows,
        log=final / LOG_NAME if log_path is not None else None,
        skipped=listing.skipped,
        previous=previous,
        cost=_number(manifest.get("cost")) if manifest is not None else None,
    )


def cleanup_stale_result_dirs(results_root: Path) -> int:
    """Remove temp folders an interrupted collection left in results/ (call at start)."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in results_root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


CleanupOutcome = Literal["removed", "other"] | JobExecutionError

CLEANUPS_PER_COMMAND = 32  # job folders one clean-up command handles


def check_cleanup_target(paths: RemoteJobPaths, run_id: str | None) -> None:
    """Raise ValueError unless a clean-up may touch `paths` (a folder directly under
    `<instance>/jobs`) keyed by `run_id` (hex digits, or None)."""
    if not is_job_dir_of(paths):
        raise ValueError(f"refusing to remove {paths.job_dir!r}: not a job folder")
    check_run_id(run_id)


def _cleanup_lines(index: int, paths: RemoteJobPaths, run_id: str | None) -> str:
    d = shlex.quote(paths.job_dir)
    guard = ""
    if run_id is not None:
        # gone already, or holding another run (left alone)
        guard = (
            f'if [ ! -d {d} ]; then echo "C {index} gone"\n'
            f"elif r=; read -r r 2>/dev/null < {d}/run; "
            f'[ "$r" != {run_id} ]; then echo "C {index} other"\nel'
        )
    return (
        f"{guard}if :; then\n"
        # a staged run is withdrawn first (it can no longer start); one claimed a moment
        # ago gets its pid written before its group is looked for
        f"  mv {d}/staged {d}/withdrawn 2>/dev/null || "
        f"{{ n=0; while [ -f {d}/go ] && [ ! -s {d}/pid ] && [ $n -lt 40 ]; do _tick 0.05; n=$((n+1)); done; }}\n"
        f'  _pgid {d}/pid; if [ -n "$v" ] && _alive {d} "$v"; then kill -KILL -"$v" 2>/dev/null; fi\n'
        f'  if rm -rf -- {d}; then echo "C {index} removed"; else echo "C {index} failed"; fi\n'
        "fi\n"
    )


async def cleanup_remote_jobs(
    conn: RemoteRunner,
    folders: Sequence[tuple[RemoteJobPaths, str | None]],
    *,
    timeout_s: float,
) -> list[CleanupOutcome]:
    """`cleanup_remote_job` for several folders of one instance in one command (at most
    `CLEANUPS_PER_COMMAND`): per folder, in order, "removed" (or already gone), "other"
    (it held another run: left alone) or the JobExecutionError of that folder. Raises
    ValueError, before anything runs, when any path or run id is not acceptable, and
    JobExecutionError when the command gave no answer at all.
    """
    if len(folders) > CLEANUPS_PER_COMMAND:
        raise ValueError(f"at most {CLEANUPS_PER_COMMAND} folders a command")
    for paths, run_id in folders:
        check_cleanup_target(paths, run_id)
    body = "".join(_cleanup_lines(i, p, r) for i, (p, r) in enumerate(folders))
    script = f'{SH_HELPERS}\necho "$M"\n{body}'
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    said: dict[int, str] = {}
    for line in marker_lines(result.stdout) or []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "C" and parts[1].isdigit():
            said[int(parts[1])] = parts[2]
    if not said:
        raise JobExecutionError(
            f"cannot remove the remote job folder ({failure_text(result, 300)})"
        )
    outcomes: list[CleanupOutcome] = []
    for i in range(len(folders)):
        word = said.get(i)
        if word in ("removed", "gone"):
            outcomes.append("removed")
        elif word == "other":
            outcomes.append("other")
        else:
            if word == "failed":
                why = "rm failed: " + (result.stderr[-300:].strip() or "nothing on stderr")
            else:
                why = f"no answer for it, {failure_text(result, 300)}"
            outcomes.append(JobExecutionError(f"cannot remove the remote job folder ({why})"))
    return outcomes


async def cleanup_remote_job(
    conn: RemoteRunner, paths: RemoteJobPaths, *, timeout_s: float, run_id: str | None = None
) -> bool:
    """Kill what is left of the job's process group, then `rm -rf` its remote folder.

    A job may exit leaving children behind, or write garbage into `exit_code` while
    still running: once the folder (and its `pid`) is gone nothing could find them.
    With `run_id`, only a folder holding that run is touched (another run of the same
    job may have replaced it); returns False when it held another run (left alone).
    Refuses any path not directly under `<instance>/jobs`.
    """
    (outcome,) = await cleanup_remote_jobs(conn, [(paths, run_id)], timeout_s=timeout_s)
    if isinstance(outcome, JobExecutionError):
        raise outcome
    return outcome == "removed"
