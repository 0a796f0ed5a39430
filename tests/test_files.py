"""core/files.py: layout, safe names, atomic moves and writes, error files."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vastd.core import files, files_async
from vastd.core.files import (
    JobFolder,
    Layout,
    atomic_file_move,
    atomic_write_bytes,
    atomic_write_json,
    cleanup_temp_files,
    ensure_directory_exists,
    move_job_file,
    move_job_to_failed,
    safe_name,
    write_error_json,
)
from vastd.utils.exceptions import FileOperationError


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    made = Layout(tmp_path / "root")
    made.ensure()
    return made


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(files.TEMP_PREFIX))


# --- safe_name --------------------------------------------------------------------------


def test_safe_name_keeps_a_name_that_fits() -> None:
    """A name whose name+suffix fits in 255 bytes comes back unchanged."""
    assert safe_name("garch_test_job_0000_0099", ".error.json") == (
        "garch_test_job_0000_0099.error.json"
    )


def test_safe_name_shortens_with_hash_within_limit() -> None:
    """A too-long name is cut and ends in a hash, so the result with suffix fits in 255 bytes."""
    name = "a" * 250
    out = safe_name(name, ".error.json")
    assert len(out.encode()) <= 255
    assert out.endswith(".error.json")
    assert out == safe_name(name, ".error.json")  # deterministic
    assert out.startswith("a" * 100)


def test_safe_name_cuts_on_a_character_boundary() -> None:
    """Multi-byte UTF-8 names are cut between characters, never inside one."""
    name = "\u03b3テ" * 60  # 5 bytes a pair, 300 bytes
    out = safe_name(name, ".error.json")
    encoded = out.encode("utf-8")  # raises if a character was split
    assert len(encoded) <= 255
    assert out.endswith(".error.json")


def test_safe_name_distinguishes_names_differing_only_at_the_end() -> None:
    """Two long names that differ only in their last character get different safe names."""
    one, two = "x" * 250 + "1", "x" * 250 + "2"
    assert safe_name(one, ".error.json") != safe_name(two, ".error.json")


def test_safe_name_shares_the_hash_across_suffixes() -> None:
    """Names derived from one long id carry the same hash (the hash is of the id alone)."""
    name = "y" * 260
    a, b = safe_name(name), safe_name(name, ".error.json")
    assert a.rsplit("-", 1)[1] == b.removesuffix(".error.json").rsplit("-", 1)[1]


def test_safe_name_counts_undecodable_bytes() -> None:
    """A name holding bytes that are not UTF-8 (surrogate-escaped) is measured as raw bytes."""
    name = os.fsdecode(b"\xff" * 300)
    out = safe_name(name, ".csv")
    assert len(os.fsencode(out)) <= 255


# --- layout -----------------------------------------------------------------------------


def test_layout_paths_follow_the_contract(tmp_path: Path) -> None:
    """Folder and file paths are those of CONTRACT §3."""
    lay = Layout(tmp_path)
    assert lay.inbox == tmp_path / "inbox"
    assert lay.folder(JobFolder.RUNNING) == tmp_path / "running"
    assert lay.job_file(JobFolder.QUEUED, "j 1") == tmp_path / "queued" / "j 1.csv"
    assert lay.results_dir("j 1") == tmp_path / "results" / "j 1"
    assert lay.error_file("j 1") == tmp_path / "failed" / "j 1.error.json"
    assert lay.state_file == tmp_path / "state.json"
    assert lay.state_backup == tmp_path / "state.json.bak"


def test_layout_ensure_creates_every_folder_private(tmp_path: Path) -> None:
    """ensure() creates all folders, the root with mode 0700, and is idempotent."""
    lay = Layout(tmp_path / "r")
    lay.ensure()
    lay.ensure()
    for name in ("inbox", "queued", "running", "done", "failed", "results"):
        assert (tmp_path / "r" / name).is_dir()
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o700


def test_ensure_directory_exists_refuses_a_file(tmp_path: Path) -> None:
    """A file where a folder should be is a FileOperationError, not a silent pass."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileOperationError):
        ensure_directory_exists(tmp_path / "f")


# --- cleanup -------------------------------------------------------------------


def test_cleanup_temp_files_removes_only_ours(tmp_path: Path) -> None:
    """cleanup_temp_files removes `.vastd-tmp-*` and `*.part` and nothing else."""
    for name in (".vastd-tmp-ab-x.json", "r.parquet.part", "keep.csv", ".other"):
        (tmp_path / name).write_text("x")
    assert cleanup_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other", "keep.csv"]
    assert cleanup_temp_files(tmp_path / "missing") == 0


# --- moves --------------------------------------------------------------------------------


def test_atomic_file_move_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing destination is never replaced; both files keep their content."""
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileOperationError, match="exists"):
        atomic_file_move(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "new"
    assert (tmp_path / "b").read_text() == "old"


def test_atomic_file_move_moves_a_symlink_itself(tmp_path: Path) -> None:
    """A symlink is moved as an entry; its target is neither moved nor changed."""
    target = tmp_path / "target"
    target.write_text("secret")
    (tmp_path / "link").symlink_to(target)
    atomic_file_move(tmp_path / "link", tmp_path / "moved")
    assert (tmp_path / "moved").is_symlink()
    assert target.read_text() == "secret"


def test_atomic_file_move_missing_source_is_file_operation_error(tmp_path: Path) -> None:
    """A vanished source surfaces as FileOperationError."""
    with pytest.raises(FileOperationError):
        atomic_file_move(tmp_path / "nope", tmp_path / "dest")


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Patch os.fsync: each call records (the path fsynced, a folder's entries then)."""
    calls: list[tuple[str, list[str]]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, sorted(os.listdir(path)) if os.path.isdir(path) else []))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


async def test_atomic_file_moves_fsync_each_folder_once_after_every_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch (larger than one executor trip): every entry renamed first, then the
    destination folder fsynced once and the source folder once, in that order."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    names = [f"f{n:03d}" for n in range(files_async.MOVES_PER_CALL * 2 + 5)]
    for name in names:
        (src / name).write_text(name)
    calls = record_fsyncs(monkeypatch)
    outcomes = await files_async.atomic_file_moves([(src / n, dst / n) for n in names])
    assert outcomes == [None] * len(names)
    assert calls == [(str(dst), names), (str(src), [])]
    assert all((dst / n).read_text() == n for n in names)


async def test_atomic_file_moves_a_failed_rename_stops_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moves that fail (destination taken, source gone, disk full) are their own
    outcome; the others in the batch still move and are still made durable."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("a", "taken", "full", "z"):
        (src / name).write_text(name)
    (dst / "taken").write_text("earlier")
    real_rename = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a).name == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    calls = record_fsyncs(monkeypatch)
    names = ["a", "taken", "gone", "full", "z"]
    outcomes = await files_async.atomic_file_moves([(src / n, dst / n) for n in names])
    assert [o is None for o in outcomes] == [True, False, False, False, True]
    assert "destination exists" in str(outcomes[1])
    assert "No space left" in str(outcomes[3])
    assert sorted(p.name for p in src.iterdir()) == ["full", "taken"]
    assert (dst / "taken").read_text() == "earlier" and (dst / "z").read_text() == "z"
    assert [path for path, _ in calls] == [str(dst), str(src)]


async def test_atomic_file_moves_raises_when_a_folder_cannot_be_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync that fails (EIO) is FileOperationError for the batch: it is not durable."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a").write_text("a")

    def fsync(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(FileOperationError, match="cannot fsync folder"):
        await files_async.atomic_file_moves([(src / "a", dst / "a")])
    assert await files_async.atomic_file_moves([]) == []


def test_move_job_file_between_folders(layout: Layout) -> None:
    """move_job_file renames <job>.csv from one job folder to another and returns the path."""
    (layout.queued / "j;1.csv").write_text("a\n1\n")
    out = move_job_file(layout, "j;1", JobFolder.QUEUED, JobFolder.RUNNING)
    assert out == layout.running / "j;1.csv"
    assert out.read_text() == "a\n1\n"
    assert not (layout.queued / "j;1.csv").exists()


def test_move_job_file_collision_raises_or_renames(layout: Layout) -> None:
    """A job file already in the target is never replaced; on request the new one gets .dup-1."""
    (layout.running / "j.csv").write_text("second")
    (layout.failed / "j.csv").write_text("first")
    with pytest.raises(FileOperationError):
        move_job_file(layout, "j", JobFolder.RUNNING, JobFolder.FAILED)
    out = move_job_file(layout, "j", JobFolder.RUNNING, JobFolder.FAILED, rename_on_collision=True)
    assert out == layout.failed / "j.dup-1.csv"
    assert (layout.failed / "j.csv").read_text() == "first"
    assert out.read_text() == "second"


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_json_writes_private_file(tmp_path: Path) -> None:
    """atomic_write_json writes readable JSON with mode 0600 and leaves no temp file."""
    path = tmp_path / "s.json"
    atomic_write_json(path, {"a": 1, "\u03b3": "テスト"})
    assert json.loads(path.read_text("utf-8")) == {"a": 1, "\u03b3": "テスト"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_handles_undecodable_names(tmp_path: Path) -> None:
    """A job id from a non-UTF-8 file name still writes valid JSON that round-trips."""
    odd = os.fsdecode(b"job\xff")
    atomic_write_json(tmp_path / "e.json", {"job": odd})
    assert json.loads((tmp_path / "e.json").read_text())["job"] == odd


@pytest.mark.parametrize("failing", ["fsync", "write"])
def test_atomic_write_never_leaves_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A disk-full error mid-write keeps the old content, removes the temp, raises FileOperationError."""
    path = tmp_path / "state.json"
    path.write_text('{"old": true}')

    def boom(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, failing, boom)
    with pytest.raises(FileOperationError, match="No space left"):
        atomic_write_json(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_atomic_write_into_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    """Writing where the folder is gone is a FileOperationError, nothing half-written."""
    with pytest.raises(FileOperationError):
        atomic_write_bytes(tmp_path / "missing" / "x", b"data")


# --- error files ---------------------------------------------------------------------------------


def test_write_error_json_has_exactly_the_contract_keys(layout: Layout) -> None:
    """The error file holds exactly job, reason, attempts, last_exit_code, log_tail, at (UTC)."""
    path = write_error_json(
        layout, "j 1", reason="exit code 1", attempts=3, last_exit_code=1, log_tail="boom"
    )
    assert path == layout.failed / "j 1.error.json"
    data = json.loads(path.read_text())
    assert set(data) == {"job", "reason", "attempts", "last_exit_code", "log_tail", "at"}
    assert data["job"] == "j 1" and data["attempts"] == 3 and data["last_exit_code"] == 1
    at = datetime.fromisoformat(data["at"].replace("Z", "+00:00"))
    assert at.utcoffset() == UTC.utcoffset(None)


def test_write_error_json_long_name_is_shortened_but_job_is_full(layout: Layout) -> None:
    """A 251-byte id (255-byte file name) gets a hashed error file name; `job` holds the full id."""
    long_a = "g" * 250 + "a"
    long_b = "g" * 250 + "b"
    path_a = write_error_json(layout, long_a, reason="r")
    path_b = write_error_json(layout, long_b, reason="r")
    assert path_a != path_b
    assert len(path_a.name.encode()) <= 255
    assert json.loads(path_a.read_text())["job"] == long_a
    assert json.loads(path_b.read_text())["job"] == long_b


def test_move_job_to_failed_keeps_earlier_failures(layout: Layout) -> None:
    """A job failing again lands as <job>.dup-1.csv beside <job>.dup-1.error.json; the first stays."""
    (layout.failed / "j.csv").write_text("first run")
    write_error_json(layout, "j", reason="first")
    (layout.running / "j.csv").write_text("second run")
    out = move_job_to_failed(
        layout, "j", JobFolder.RUNNING, reason="exit code 3", attempts=3, last_exit_code=3
    )
    assert out == layout.failed / "j.dup-1.csv" and out.read_text() == "second run"
    second = json.loads((layout.failed / "j.dup-1.error.json").read_text())
    assert second["job"] == "j" and second["last_exit_code"] == 3
    assert json.loads(layout.error_file("j").read_text())["reason"] == "first"
    assert (layout.failed / "j.csv").read_text() == "first run"


def test_move_job_to_failed_removes_its_error_file_when_the_move_fails(layout: Layout) -> None:
    """If the job file cannot be moved, no orphan error file is left in failed/."""
    with pytest.raises(FileOperationError):
        move_job_to_failed(layout, "gone", JobFolder.RUNNING, reason="r")
    assert list(layout.failed.iterdir()) == []


async def test_in_thread_to_its_end_outlasts_every_cancellation_of_its_caller() -> None:
    """The thread's result or error reaches an uncancelled caller. A cancelled one (even
    with every task of the loop cancelled, as at `asyncio.run`'s end) gets its
    CancelledError only once the thread has ended, and the thread's error is logged."""
    assert await files_async.in_thread_to_its_end(lambda a, *, b: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        await files_async.in_thread_to_its_end(lambda: 1 / 0)
    entered, release, ended = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        entered.set()
        release.wait(10)
        ended.set()
        raise OSError(errno.ENOSPC, "No space left on device")

    task = asyncio.ensure_future(files_async.in_thread_to_its_end(work))
    await asyncio.to_thread(entered.wait, 10)
    with capture_logs() as logs:
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # twice: it still waits
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ended.is_set()
    assert [e["event"] for e in logs] == ["file_work_failed_while_cancelled"]
    assert "No space left" in logs[0]["error"]
