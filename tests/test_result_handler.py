"""result_handler: listing, safe download, parquet validation, atomic install (real sh, pyarrow)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.localrunner import LocalResult, LocalRunner
from vastd.execution import result_handler
from vastd.execution.job_runner import MARKER, RemoteJobPaths, remote_job_paths
from vastd.execution.process_monitor import (
    LISTINGS_PER_STATUS,
    monitor_job_execution,
    parse_status_output,
)
from vastd.execution.result_handler import (
    CollectedResults,
    cleanup_remote_job,
    cleanup_remote_jobs,
    cleanup_stale_result_dirs,
    collect_job_results,
    download_result_file,
    find_result_files,
    listing_function,
    matches_result_glob,
    parse_listing,
)
from vastd.execution.validate import validate_results
from vastd.utils.exceptions import (
    ConfigError,
    FileOperationError,
    JobExecutionError,
    ResultValidationError,
)

JOB = "garch_test_job_0000_0099"


@pytest.fixture
def runner(tmp_path: Path) -> LocalRunner:
    return LocalRunner(cwd=tmp_path)


@pytest.fixture
def paths(tmp_path: Path) -> RemoteJobPaths:
    """A finished job's remote folder: input, log, exit_code, empty out/."""
    p = remote_job_paths(str(tmp_path / "remote"), "inst1", JOB)
    os.makedirs(p.out_dir)
    Path(p.input).write_text("a\n1\n")
    Path(p.log).write_text("Row 0: ok\n")
    Path(p.exit_code).write_text("0\n")
    Path(p.pid).write_text("12345\n")
    return p


@pytest.fixture
def results_root(tmp_path: Path) -> Path:
    return tmp_path / "results"


def write_parquet(path: Path, rows: int) -> None:
    pq.write_table(pa.table({"job_row": pa.array(range(rows), type=pa.int64())}), path)


async def collect(
    runner: LocalRunner,
    paths: RemoteJobPaths,
    results_root: Path,
    *,
    pattern: str = "*.parquet",
    min_results: int = 1,
    validate: str = "parquet",
    max_bytes: int = 10_000_000,
    log_max_bytes: int = 10_000_000,
    manifest: dict[str, Any] | None = None,
    validate_command: str = "",
    keep_previous: bool = False,
) -> CollectedResults:
    return await collect_job_results(
        runner,
        paths,
        JOB,
        results_root=results_root,
        pattern=pattern,
        min_results=min_results,
        validate=validate,
        max_bytes=max_bytes,
        timeout_s=20,
        log_max_bytes=log_max_bytes,
        manifest=manifest,
        validate_command=validate_command,
        keep_previous=keep_previous,
    )


def leftovers(results_root: Path) -> list[str]:
    return [p.name for p in results_root.iterdir() if p.name.startswith(".")]


async def test_two_parquet_files_collected(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """Both results beside the input are downloaded, validated, and installed with log.txt."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 3)
    write_parquet(Path(paths.job_dir, "b.parquet"), 4)
    collected = await collect(runner, paths, results_root)
    final = results_root / JOB
    assert collected.directory == final
    assert collected.rows == 7
    assert collected.files == [final / "a.parquet", final / "b.parquet"]
    assert sorted(os.listdir(final)) == ["a.parquet", "b.parquet", "log.txt"]
    assert (final / "log.txt").read_text() == "Row 0: ok\n"
    assert collected.log == final / "log.txt"
    assert leftovers(results_root) == []


async def test_control_files_and_input_never_count(
    runner: LocalRunner, paths: RemoteJobPaths
) -> None:
    """A glob matching everything still never yields the input, log.txt, pid or exit_code."""
    write_parquet(Path(paths.job_dir, "r.parquet"), 1)
    listing = await find_result_files(runner, paths, "*", timeout_s=20)
    assert [f.name for f in listing.files] == ["r.parquet"]


async def test_symlink_in_out_is_ignored_and_reported(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A symlink matching the glob (to /etc/passwd) is skipped, reported, never downloaded."""
    write_parquet(Path(paths.out_dir, "real.parquet"), 2)
    os.symlink("/etc/passwd", Path(paths.out_dir, "evil.parquet"))
    os.mkdir(Path(paths.out_dir, "dir.parquet"))
    os.mkfifo(Path(paths.out_dir, "fifo.parquet"))
    collected = await collect(runner, paths, results_root, pattern="out/*.parquet")
    assert [p.name for p in collected.files] == ["real.parquet"]
    assert any("evil.parquet" in s and "symlink" in s for s in collected.skipped)
    assert any("dir.parquet" in s for s in collected.skipped)
    assert any("fifo.parquet" in s for s in collected.skipped)
    downloads = [arg for kind, arg in runner.calls if kind == "download"]
    assert not any("evil" in d for d in downloads)
    assert not (results_root / JOB / "evil.parquet").exists()


async def test_glob_is_relative_to_job_folder(runner: LocalRunner, paths: RemoteJobPaths) -> None:
    """`*.parquet` finds files beside the input only; `out/*.parquet` those in out/ only."""
    write_parquet(Path(paths.job_dir, "top.parquet"), 1)
    write_parquet(Path(paths.out_dir, "inner.parquet"), 1)
    top = (await find_result_files(runner, paths, "*.parquet", timeout_s=20)).files
    inner = (await find_result_files(runner, paths, "out/*.parquet", timeout_s=20)).files
    assert [f.name for f in top] == ["top.parquet"]
    assert [f.name for f in inner] == ["out/inner.parquet"]
    assert inner[0].path == f"{paths.out_dir}/inner.parquet"


def test_matches_result_glob() -> None:
    """Globs match per path component; absolute or '..' globs are configuration errors."""
    assert matches_result_glob("x.parquet", "*.parquet")
    assert not matches_result_glob("out/x.parquet", "*.parquet")
    assert matches_result_glob("out/x.parquet", "out/*.parquet")
    assert matches_result_glob("out/x.parquet", "*/*")
    for bad in ("/abs/*.parquet", "../*.parquet", "out/../x", ""):
        with pytest.raises(ConfigError):
            matches_result_glob("x", bad)


async def test_empty_parquet_is_refused(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A parquet file with zero rows fails validation; nothing is installed, no temp left."""
    write_parquet(Path(paths.job_dir, "empty.parquet"), 0)
    with pytest.raises(ResultValidationError, match="no rows"):
        await collect(runner, paths, results_root)
    assert not (results_root / JOB).exists()
    assert leftovers(results_root) == []


async def test_non_parquet_is_refused(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A file named .parquet that is not parquet fails validation with a clear reason."""
    Path(paths.job_dir, "x.parquet").write_text("not parquet at all")
    with pytest.raises(ResultValidationError, match="not a readable parquet"):
        await collect(runner, paths, results_root)
    assert not (results_root / JOB).exists()
    assert leftovers(results_root) == []


async def test_truncated_parquet_is_refused(tmp_path: Path) -> None:
    """A parquet file cut short (written straight to its final name) fails validation."""
    path = tmp_path / "t.parquet"
    write_parquet(path, 1000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultValidationError, match=r"t\.parquet"):
        await validate_results([path], "parquet", memory_mb=256, timeout_s=60)


async def test_file_over_max_bytes_is_refused(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A result larger than max_bytes is refused by its size, before any byte is copied.

    (The listing no longer measures sizes; the download looks at the size first.)
    """
    write_parquet(Path(paths.job_dir, "big.parquet"), 10_000)
    with pytest.raises(ResultValidationError, match="more than"):
        await collect(runner, paths, results_root, max_bytes=100)
    assert not (results_root / JOB).exists()
    assert not list(results_root.rglob("big.parquet*"))


async def test_odd_names_land_inside_results(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """Names with newlines, dots, dashes, backslashes and unicode land inside the job's folder;
    hidden names never match."""
    names = ["we\nird.parquet", "a..b.parquet", "-x.parquet", "ü $(x).parquet", "up..\\x.parquet"]
    for name in names:
        write_parquet(Path(paths.job_dir, name), 1)
    write_parquet(Path(paths.job_dir, "..hidden.parquet"), 1)  # hidden: never a result
    collected = await collect(runner, paths, results_root)
    final = (results_root / JOB).resolve()
    assert len(collected.files) == len(names)
    for path in collected.files:
        assert path.resolve().parent == final
        assert "\n" not in path.name and "\\" not in path.name
    assert sorted(os.listdir(final)) == sorted(
        [
            "we_ird.parquet",
            "a..b.parquet",
            "-x.parquet",
            "ü $(x).parquet",
            "up.._x.parquet",
            "log.txt",
        ]
    )


async def test_download_result_file_stays_in_folder(runner: LocalRunner, tmp_path: Path) -> None:
    """A remote name made of path tricks is reduced to a safe basename inside local_dir."""
    from vastd.execution.result_handler import RemoteFile

    src = tmp_path / "src.parquet"
    write_parquet(src, 1)
    local_dir = tmp_path / "dl"
    local_dir.mkdir()
    for name in ("out/../../x.parquet", "..", "out/.."):
        remote = RemoteFile(name=name, path=str(src), size=src.stat().st_size)
        got = await download_result_file(runner, remote, local_dir, max_bytes=10**6, timeout_s=20)
        assert got.parent == local_dir.resolve()
        assert got.name not in (".", "..")


async def test_old_attempt_results_are_replaced_not_mixed(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A results folder from an earlier attempt is replaced whole; none of its files remain."""
    old = results_root / JOB
    old.mkdir(parents=True)
    (old / "old_attempt.parquet").write_text("stale")
    write_parquet(Path(paths.job_dir, "new.parquet"), 5)
    collected = await collect(runner, paths, results_root)
    assert sorted(os.listdir(old)) == ["log.txt", "new.parquet"]
    assert collected.rows == 5
    assert leftovers(results_root) == []


async def test_failed_collection_keeps_earlier_folder(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """When validation fails, the final name is left as it was and the temp folder removed."""
    old = results_root / JOB
    old.mkdir(parents=True)
    (old / "kept.parquet").write_text("earlier")
    write_parquet(Path(paths.job_dir, "good.parquet"), 1)
    Path(paths.job_dir, "zbad.parquet").write_text("junk")
    with pytest.raises(ResultValidationError):
        await collect(runner, paths, results_root)
    assert os.listdir(old) == ["kept.parquet"]
    assert leftovers(results_root) == []


async def test_a_results_folder_that_cannot_be_made_is_a_local_problem(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """results/ in the way (a file there): FileOperationError, as for a full or read-only
    disk (the job waits; not its fault), not a bare OSError out of the collection."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 1)
    results_root.write_text("not a folder")
    with pytest.raises(FileOperationError, match="cannot store the results"):
        await collect(runner, paths, results_root)
    assert results_root.read_text() == "not a folder"


async def test_each_result_and_the_manifest_are_fsynced_once_before_the_final_name(
    runner: LocalRunner,
    paths: RemoteJobPaths,
    results_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every file of the folder (results, log, MANIFEST.json) and the folder itself are
    fsynced before the rename to the final name, once each (no temp file, no second
    pass); the manifest's checksums are the files'."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 2)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await collect(runner, paths, results_root, manifest={"instance": "inst1"})
    final = results_root / JOB
    temp = [Path(p) for p in synced if Path(p).parent == results_root and p != str(results_root)]
    assert len({t.name for t in temp}) == 1  # one temp folder, fsynced itself
    names = [Path(p).name for p in synced if Path(p).parent in temp]
    assert sorted(names) == ["MANIFEST.json", "a.parquet", "log.txt"]
    assert synced.count(str(temp[0])) == 1 and str(results_root) in synced
    manifest = json.loads((final / "MANIFEST.json").read_text())
    digest = hashlib.sha256((final / "a.parquet").read_bytes()).hexdigest()
    size = (final / "a.parquet").stat().st_size
    assert manifest["files"] == [{"name": "a.parquet", "bytes": size, "sha256": digest}]
    assert sorted(os.listdir(final)) == ["MANIFEST.json", "a.parquet", "log.txt"]


async def test_a_collection_cancelled_during_the_install_leaves_whole_results(
    runner: LocalRunner,
    paths: RemoteJobPaths,
    results_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while the install runs in its worker thread: the clean-up waits for it
    instead of removing the temp folder under it, so results/<job>/ is whole (or was
    never made), and no temp folder is left."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 3)
    entered, release = threading.Event(), threading.Event()
    real = result_handler._install_results

    def slow(tmp: Path, final: Path, **kw: Any) -> None:
        entered.set()
        release.wait(10)
        real(tmp, final, **kw)

    monkeypatch.setattr(result_handler, "_install_results", slow)
    task = asyncio.ensure_future(collect(runner, paths, results_root))
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    final = results_root / JOB
    assert sorted(os.listdir(final)) == ["a.parquet", "log.txt"]
    assert pq.read_table(final / "a.parquet").num_rows == 3
    assert leftovers(results_root) == []


async def test_a_manifest_left_by_the_validate_command_is_replaced(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A validate_command that leaves its own MANIFEST.json or log.txt (or a link of that
    name) in the folder: vastd's replace them; a folder of that name fails the attempt
    with a reason instead of holding the job up as a local problem."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 1)
    for leave in (
        "echo mine > MANIFEST.json; echo mine > log.txt",
        "ln -s /etc/passwd MANIFEST.json",
    ):
        await collect(
            runner, paths, results_root, manifest={"instance": "inst1"}, validate_command=leave
        )
        path = results_root / JOB / "MANIFEST.json"
        assert not path.is_symlink() and json.loads(path.read_text())["instance"] == "inst1"
        assert path.stat().st_mode & 0o777 == 0o600
        assert (results_root / JOB / "log.txt").read_text() == "Row 0: ok\n"
    # A folder of that name fails the attempt with a reason (not a wait for the disk),
    # and so does a result file of that name.
    with pytest.raises(ResultValidationError, match=r"left a folder named MANIFEST\.json"):
        await collect(
            runner,
            paths,
            results_root,
            manifest={"instance": "inst1"},
            validate_command="mkdir MANIFEST.json",
        )
    with pytest.raises(ResultValidationError, match=r"left a folder named log\.txt"):
        await collect(runner, paths, results_root, validate_command="mkdir log.txt")
    Path(paths.job_dir, "MANIFEST.json").write_text("{}")
    with pytest.raises(ResultValidationError, match=r"named MANIFEST\.json, a name vastd writes"):
        await collect(runner, paths, results_root, pattern="*", validate="none")
    assert leftovers(results_root) == []


async def test_a_rerun_refuses_a_result_named_like_its_kept_folders(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """With keep_previous, `previous-<n>` names the folders of replaced results: a
    result file of that name fails the attempt with the reason, instead of a rename onto
    it failing for ever as a local problem; the earlier results stay as they were."""
    final = results_root / JOB
    final.mkdir(parents=True)
    (final / "a.parquet").write_text("earlier")
    (final / "MANIFEST.json").write_text(json.dumps({"run": "0a0b"}))
    Path(paths.job_dir, "previous-1").write_text("a result of that name")
    with pytest.raises(ResultValidationError, match="named previous-1"):
        await collect(
            runner, paths, results_root, pattern="previous-*", validate="none", keep_previous=True
        )
    assert sorted(os.listdir(final)) == ["MANIFEST.json", "a.parquet"]
    assert leftovers(results_root) == []
    # Without keep_previous the name is a result like any other.
    collected = await collect(runner, paths, results_root, pattern="previous-*", validate="none")
    assert [f.name for f in collected.files] == ["previous-1"]


async def test_min_results_enforced(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """Fewer matching files than min_results fail; min_results=0 installs just the log."""
    with pytest.raises(ResultValidationError, match="at least 1"):
        await collect(runner, paths, results_root)
    assert not (results_root / JOB).exists()
    write_parquet(Path(paths.job_dir, "one.parquet"), 1)
    with pytest.raises(ResultValidationError, match="at least 2"):
        await collect(runner, paths, results_root, min_results=2)
    collected = await collect(runner, paths, results_root, pattern="*.none", min_results=0)
    assert collected.files == [] and collected.rows == 0
    assert os.listdir(results_root / JOB) == ["log.txt"]


async def test_validate_none_accepts_any_file(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """With validate = "none" files are downloaded without being read."""
    Path(paths.out_dir, "r.txt").write_text("anything")
    collected = await collect(runner, paths, results_root, pattern="out/*.txt", validate="none")
    assert [p.name for p in collected.files] == ["r.txt"]
    assert (results_root / JOB / "r.txt").read_text() == "anything"


async def test_the_log_comes_with_the_size_the_listing_measured_and_empty_without_a_trip(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """The listing measures log.txt: its download is told the size (no lstat on a real
    host), and an empty log is written here without a download."""
    Path(paths.out_dir, "r.txt").write_text("anything")
    await collect(runner, paths, results_root, pattern="out/*.txt", validate="none")
    assert (results_root / JOB / "log.txt").read_text() == "Row 0: ok\n"
    sized: list[int | None] = []
    download = runner.download

    async def spy(remote: str, local: Path, **kw: Any) -> int:
        sized.append(kw.get("size"))
        return await download(remote, local, **kw)

    runner.download = spy  # type: ignore[method-assign]
    Path(paths.log).write_text("Row 0: ok again\n")
    await collect(runner, paths, results_root, pattern="out/*.txt", validate="none")
    assert sized == [None, len("Row 0: ok again\n")]  # the result, then the log
    assert (results_root / JOB / "log.txt").read_text() == "Row 0: ok again\n"

    Path(paths.log).write_text("")
    runner.calls.clear()
    collected = await collect(runner, paths, results_root, pattern="out/*.txt", validate="none")
    assert [c for c in runner.calls if c[0] == "download"] == [
        ("download", f"{paths.out_dir}/r.txt")
    ]
    assert (results_root / JOB / "log.txt").read_bytes() == b""
    assert collected.log == results_root / JOB / "log.txt"


async def test_long_log_is_tail_capped(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """A log past the cap arrives as its last bytes only, and the remote temp copy is removed."""
    Path(paths.log).write_text("x" * 5000 + "THE END\n")
    write_parquet(Path(paths.job_dir, "r.parquet"), 1)
    await collect(runner, paths, results_root, log_max_bytes=100)
    log = (results_root / JOB / "log.txt").read_text()
    assert len(log) == 100 and log.endswith("THE END\n")
    assert sorted(n for n in os.listdir(paths.job_dir) if n.startswith(".")) == []


async def test_missing_job_folder(runner: LocalRunner, tmp_path: Path) -> None:
    """Collecting from a job folder that does not exist is a result validation error."""
    paths = remote_job_paths(str(tmp_path / "remote"), "inst1", "nothing")
    with pytest.raises(ResultValidationError, match="missing"):
        await find_result_files(runner, paths, "*.parquet", timeout_s=20)


async def test_validate_results_kinds(tmp_path: Path) -> None:
    """ "none" returns 0, "parquet" the row count, unknown kinds are ConfigErrors, symlinks refused."""
    path = tmp_path / "r.parquet"
    write_parquet(path, 6)

    async def rows(files: list[Path], kind: str) -> int:
        report = await validate_results(files, kind, memory_mb=256, timeout_s=60)
        return report.rows

    assert await rows([path], "parquet") == 6
    assert await rows([path, path], "parquet") == 12
    assert await rows([path], "none") == 0
    with pytest.raises(ConfigError):
        await rows([path], "csv")
    link = tmp_path / "l.parquet"
    link.symlink_to(path)
    with pytest.raises(ResultValidationError, match="regular"):
        await rows([link], "parquet")


async def test_cleanup_remote_job(runner: LocalRunner, paths: RemoteJobPaths) -> None:
    """The job's remote folder is removed; a path outside <instance>/jobs/ is refused."""
    await cleanup_remote_job(runner, paths, timeout_s=20)
    assert not Path(paths.job_dir).exists()
    assert Path(paths.instance_root, "jobs").exists()
    for bad in (paths.instance_root, f"{paths.instance_root}/jobs/../x", "/", "/tmp/x"):
        with pytest.raises(ValueError):
            await cleanup_remote_job(runner, dataclasses.replace(paths, job_dir=bad), timeout_s=20)


@pytest.mark.parametrize(
    ("status", "stderr", "said"),
    [
        (1, "", "(exit 1, nothing on stderr)"),
        (None, "", "(no exit status, nothing on stderr)"),
        (1, "rm: cannot remove 'x': Directory not empty\n", "(exit 1: rm: cannot remove"),
    ],
)
async def test_a_failed_cleanup_says_how_it_failed(
    paths: RemoteJobPaths, status: int | None, stderr: str, said: str
) -> None:
    """A clean-up that fails says its exit status, even with nothing on stderr (the
    daemon's log had "cannot remove the remote job folder: " and no reason)."""

    class Failing(LocalRunner):
        async def run(
            self, command: str, *, timeout_s: float, input: str | None = None
        ) -> LocalResult:
            return LocalResult(status, "", stderr)

    with pytest.raises(JobExecutionError) as caught:
        await cleanup_remote_job(Failing(), paths, timeout_s=5)
    assert f"cannot remove the remote job folder {said}" in str(caught.value)


async def test_one_cleanup_command_reports_each_folder_apart(
    runner: LocalRunner, paths: RemoteJobPaths
) -> None:
    """Several folders in one command: each gets its own outcome (removed, gone, another
    run's: left alone); one that rm could not remove, or that the output cut off before,
    is that folder's error alone; a bad path refuses the whole command before it runs."""
    root = paths.instance_root.rsplit("/", 1)[0]
    folders = [remote_job_paths(root, "inst1", f"j{n}") for n in range(3)]
    for n, p in enumerate(folders[:2]):
        os.makedirs(p.job_dir)
        Path(p.job_dir, "run").write_text(f"{'a' if n == 0 else 'b'}\n")
    outcomes = await cleanup_remote_jobs(
        runner,
        [(folders[0], "a"), (folders[1], "a"), (folders[2], "a"), (paths, None)],
        timeout_s=20,
    )
    assert outcomes == ["removed", "other", "removed", "removed"]
    assert not Path(folders[0].job_dir).exists() and Path(folders[1].job_dir).exists()
    assert not Path(paths.job_dir).exists()

    class Partial(LocalRunner):
        async def run(
            self, command: str, *, timeout_s: float, input: str | None = None
        ) -> LocalResult:
            out = "__VASTD_BEGIN__\nC 0 removed\nC 1 failed\n"
            return LocalResult(0, out, "rm: cannot remove 'x': Directory not empty\n")

    got = await cleanup_remote_jobs(
        Partial(), [(folders[0], "a"), (folders[1], "a"), (folders[2], "a")], timeout_s=5
    )
    assert got[0] == "removed"
    assert isinstance(got[1], JobExecutionError) and "rm failed: rm: cannot remove" in str(got[1])
    assert isinstance(got[2], JobExecutionError) and "no answer for it" in str(got[2])
    bad = dataclasses.replace(folders[1], job_dir="/")
    with pytest.raises(ValueError, match="not a job folder"):
        await cleanup_remote_jobs(runner, [(folders[1], None), (bad, None)], timeout_s=5)
    assert Path(folders[1].job_dir).exists()


def test_cleanup_stale_result_dirs(results_root: Path) -> None:
    """Temp folders of interrupted collections are removed; job folders are not."""
    (results_root / ".vastd-tmp-abc").mkdir(parents=True)
    (results_root / JOB).mkdir()
    assert cleanup_stale_result_dirs(results_root) == 1
    assert os.listdir(results_root) == [JOB]


@pytest.mark.parametrize(
    ("pattern", "max_files"), [("*.parquet", None), ("out/*.parquet", None), ("*", 2)]
)
async def test_a_status_of_a_run_that_exited_0_lists_its_folder_as_the_collection_would(
    runner: LocalRunner, paths: RemoteJobPaths, tmp_path: Path, pattern: str, max_files: int | None
) -> None:
    """With `listing`, the status command prints the folder of a run that exited 0 (and no
    other): parsed, it is the listing `find_result_files` takes with a command of its own,
    odd names, symlinks, folders and the log's size included. One of more names than a
    status lists stops short (the collection lists it, cut at its cap). A folder still
    running, or one that failed, prints none."""
    for name in ("a.parquet", "we\nird.parquet", "out/b.parquet", "out/c.parquet", "x.csv"):
        Path(paths.job_dir, name).write_bytes(b"PAR1")
    os.symlink("/etc/passwd", Path(paths.job_dir, "evil.parquet"))
    os.mkdir(Path(paths.out_dir, "d.parquet"))
    Path(paths.job_dir, "run").write_text("ab12\n")
    for i in range(70 if max_files else 0):  # past the cap's room: the listing is cut
        Path(paths.job_dir, f"f{i}.parquet").write_bytes(b"PAR1")
    running = remote_job_paths(str(tmp_path / "remote"), "inst1", "running")
    failed = remote_job_paths(str(tmp_path / "remote"), "inst1", "failed")
    for other, code in ((running, None), (failed, "3\n")):
        os.makedirs(other.out_dir)
        Path(other.job_dir, "r.parquet").write_bytes(b"PAR1")
        if code is not None:
            Path(other.exit_code).write_text(code)
    entries = [(JOB, paths), ("running", running), ("failed", failed)]
    before = runner.count("run")
    statuses = await monitor_job_execution(
        runner, entries, timeout_s=20, listing=listing_function(pattern, max_files=max_files)
    )
    assert runner.count("run") == before + 1
    assert statuses["running"].listing is None and statuses["failed"].listing is None
    listed = statuses[JOB].listing
    assert listed is not None
    own = await find_result_files(runner, paths, pattern, timeout_s=20, max_files=max_files)
    if max_files:
        # more names than a status lists (STATUS_LISTING_NAMES): left to the collection
        assert listed[-1] == "MORE"
        with pytest.raises(JobExecutionError):
            parse_listing(listed, paths, pattern)
    else:
        assert parse_listing(listed, paths, pattern) == own
    assert own.run == "ab12" and own.files and own.cut is bool(max_files)
    assert own.log_size == (None if max_files else len("Row 0: ok\n"))  # cut before it


async def test_a_collection_given_its_listing_runs_no_listing_command(
    runner: LocalRunner, paths: RemoteJobPaths, results_root: Path
) -> None:
    """Given the listing its status printed, a collection lists nothing itself; given one
    cut short (or of no folder), it lists the folder again."""
    write_parquet(Path(paths.job_dir, "a.parquet"), 3)
    statuses = await monitor_job_execution(
        runner, [(JOB, paths)], timeout_s=20, listing=listing_function("*.parquet")
    )
    listed = statuses[JOB].listing
    assert listed is not None
    for given, commands in ((listed, 0), (listed[:-1], 1), (("nodir",), 1)):
        before = runner.count("run")
        collected = await collect_job_results(
            runner,
            paths,
            JOB,
            results_root=results_root,
            pattern="*.parquet",
            min_results=1,
            validate="parquet",
            max_bytes=10_000_000,
            timeout_s=20,
            listed=given,
        )
        assert collected.rows == 3
        assert (results_root / JOB / "log.txt").read_text() == "Row 0: ok\n"
        assert runner.count("run") - before == commands


async def test_one_status_lists_a_bounded_number_of_folders(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """However many runs exited at once, one status command lists the first few folders
    only (its output stays bounded; the others' collections list for themselves), and
    only those of the entries it is told to."""
    entries = []
    for i in range(LISTINGS_PER_STATUS + 2):
        p = remote_job_paths(str(tmp_path / "remote"), "inst1", f"j{i}")
        os.makedirs(p.out_dir)
        Path(p.exit_code).write_text("0\n")
        Path(p.job_dir, "r.parquet").write_bytes(b"PAR1")
        entries.append((f"j{i}", p))
    statuses = await monitor_job_execution(
        runner, entries, timeout_s=20, listing=listing_function("*.parquet", max_files=10)
    )
    listed = [job for job, _ in entries if statuses[job].listing is not None]
    assert listed == [f"j{i}" for i in range(LISTINGS_PER_STATUS)]
    assert all(statuses[job].exit_code == 0 for job, _ in entries)
    # only the entries allowed (the watcher's own jobs, not orphaned runs)
    statuses = await monitor_job_execution(
        runner, entries, timeout_s=20, listing=listing_function("*.parquet"), listed={1, 5}
    )
    assert [job for job, _ in entries if statuses[job].listing is not None] == ["j1", "j5"]


def test_a_listing_block_left_without_its_end_loses_no_status_line() -> None:
    """An `L` block whose `K` never came (output garbled mid-listing) gives no listing,
    and the status lines after it are still read."""
    entries = [(f"j{i}", remote_job_paths("/r", "i1", f"j{i}")) for i in range(2)]
    out = (
        f"{MARKER}\nJ 0 1 5 0 0 1 2 - 1 0 ab -\nL 0\nR ab\nP f 0 a.parquet\n"
        "J 1 1 6 0 0 1 2 - 1 0 cd -\n"
    )
    statuses = parse_status_output(out, entries)
    assert statuses["j0"].listing is None and statuses["j0"].exit_code == 0
    assert statuses["j1"].exit_code == 0 and statuses["j1"].run == "cd"
