"""core/jobs.py: validation, arguments, discovery and acceptance of job files."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vastd.core import files, jobs
from vastd.core.files import Layout
from vastd.core.jobs import (
    JobFileInfo,
    accept_job_file,
    accept_job_files,
    discover_job_files,
    get_job_arguments,
    job_id_for,
    validate_job_file,
)
from vastd.utils.config import JobPattern, JobSettings
from vastd.utils.exceptions import FileOperationError, JobValidationError

GOOD = (
    "eta,lam,var0,alpha,gamma,beta,p\n10,0.1,1.0,0.05,0.1,0.85,0.3\n5,-0.2,0.5,0.03,0.05,0.9,0.7\n"
)

WEIRD_NAMES = [
    "with space",
    "single'quote",
    'double"quote',
    "$(touch canary)",
    "semi;colon",
    "back`tick`",
    "new\nline",
    "-leading-dash",
    "\u03b3-テスト",
    "g" * 251,  # a 255-byte file name
]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    made = Layout(tmp_path / "root")
    made.ensure()
    return made


@pytest.fixture
def settings() -> JobSettings:
    return JobSettings(max_input_bytes=4096)


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def _refusal(layout: Layout, job_id: str, stem: str | None = None) -> str:
    data = json.loads(layout.error_file(stem or job_id).read_text())
    assert data["job"] == job_id
    reason: str = data["reason"]
    return reason


# --- validation --------------------------------------------------------------------------------


def test_valid_file_gives_its_info(tmp_path: Path) -> None:
    """A well-formed CSV yields id, size, columns and the number of data rows."""
    path = _write(tmp_path, "garch_test_job_0000_0001.csv", GOOD)
    info = validate_job_file(path, 4096)
    assert info == JobFileInfo(
        job_id="garch_test_job_0000_0001",
        path=path,
        size=len(GOOD),
        columns=["eta", "lam", "var0", "alpha", "gamma", "beta", "p"],
        rows=2,
    )


def test_bom_crlf_and_trailing_blank_lines_are_accepted(tmp_path: Path) -> None:
    """A UTF-8 BOM, CRLF line ends and blank lines after the data are fine."""
    content = "\ufeffa,b\r\n1,2\r\n3,4\r\n\r\n\n"
    info = validate_job_file(_write(tmp_path, "j.csv", content.encode("utf-8")), 4096)
    assert info.columns == ["a", "b"] and info.rows == 2


def test_quoted_fields_with_commas_and_newlines_count_as_one_field(tmp_path: Path) -> None:
    """CSV quoting is honoured: a quoted comma or newline does not change the field count."""
    info = validate_job_file(_write(tmp_path, "j.csv", 'a,b\n"x,y","multi\nline"\n'), 4096)
    assert info.rows == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"\n\n", "empty file"),
        (b"a,b,c\n", "no data rows"),
        (b"a,b,c\n1,2,3\n4,5\n", "line 3 has 2 fields, the header has 3"),
        (b"a,b\n1,2\n\n3,4\n", "line 3 is blank"),
        (b"a,b\n1,\xff\n", "not UTF-8"),
        (b"a,b\n1,\x002\n", "line 2 contains a NUL byte"),
        (b'a,b\n"1,2\n', "not valid CSV"),
        (b"a,b\n" + b"1,2\n" * 2000, "larger than max_input_bytes"),
    ],
    ids=[
        "empty",
        "blank-only",
        "header-only",
        "short-row",
        "blank-middle",
        "latin1",
        "nul",
        "open-quote",
        "big",
    ],
)
def test_invalid_contents_are_refused_with_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    """Each content rule of CONTRACT §3 refuses the file with a reason naming the problem."""
    path = _write(tmp_path, "j.csv", content)
    with pytest.raises(JobValidationError, match=reason):
        validate_job_file(path, 4096)


def test_symlink_is_refused_and_target_untouched(tmp_path: Path) -> None:
    """A symlink is refused without following it; the target keeps its content."""
    target = _write(tmp_path, "target.csv", GOOD)
    (tmp_path / "link.csv").symlink_to(target)
    with pytest.raises(JobValidationError, match="symbolic link"):
        validate_job_file(tmp_path / "link.csv", 4096)
    assert target.read_text() == GOOD


async def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    """A FIFO with no writer is refused at once instead of blocking on open or read."""
    os.mkfifo(tmp_path / "pipe.csv")
    async with asyncio.timeout(10):
        with pytest.raises(JobValidationError, match="FIFO"):
            await asyncio.to_thread(validate_job_file, tmp_path / "pipe.csv", 4096)


def test_directory_and_missing_file_are_refused(tmp_path: Path) -> None:
    """A folder named like a job file, and a vanished file, are refused with a reason."""
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(JobValidationError, match="directory"):
        validate_job_file(tmp_path / "dir.csv", 4096)
    with pytest.raises(JobValidationError, match="disappeared"):
        validate_job_file(tmp_path / "gone.csv", 4096)


# --- arguments, discovery, names ----------------------------------------------------------------


def test_job_arguments_take_the_first_matching_pattern() -> None:
    """[job.vars] apply to all; the first [[job.patterns]] glob matching <job>.csv overrides."""
    settings = JobSettings(
        vars={"num_sim": "1000000", "q": "512"},
        patterns=[
            JobPattern(glob="garch_training_*", vars={"num_sim": "10000000"}),
            JobPattern(glob="garch_*", vars={"num_sim": "5", "extra": "1"}),
            JobPattern(glob="*.csv", vars={"never": "reached for garch"}),
        ],
    )
    assert get_job_arguments("garch_training_job_1_2", settings) == {
        "num_sim": "10000000",
        "q": "512",
    }
    assert get_job_arguments("garch_test_job_1_2", settings) == {
        "num_sim": "5",
        "q": "512",
        "extra": "1",
    }
    assert get_job_arguments("other", settings)["never"] == "reached for garch"
    only_a = JobSettings(command="run {input} {a}", vars={"a": "1"})
    assert get_job_arguments("x", only_a) == {"a": "1"}


def test_discover_ignores_dotfiles_and_temp_names(tmp_path: Path) -> None:
    """Only *.csv names count; dot-files, .part/.tmp/.swp/~ and editor locks do not."""
    names = ["b.csv", "a.csv", ".hidden.csv", "x.csv.part", "y.tmp", "z.csv~", ".#e.csv", "n.txt"]
    for name in names:
        _write(tmp_path, name, GOOD)
    os.mkfifo(tmp_path / "f.csv")
    assert [p.name for p in discover_job_files(tmp_path)] == ["a.csv", "b.csv", "f.csv"]
    assert discover_job_files(tmp_path / "missing") == []


def test_job_id_is_the_name_without_csv() -> None:
    """The job id is the file name less `.csv`; other dots stay, folders do not count."""
    assert job_id_for(Path("x/a.b.csv")) == "a.b"


# --- acceptance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", WEIRD_NAMES, ids=lambda n: repr(n)[:20])
async def test_accept_odd_names_verbatim(
    layout: Layout,
    settings: JobSettings,
    job_id: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Any file name is a job id: accepted into queued/ under the same name, nothing executed."""
    monkeypatch.chdir(tmp_path)
    path = _write(layout.inbox, job_id + ".csv", GOOD)
    with capture_logs() as logs:
        info = await accept_job_file(layout, path, settings, known_ids=set())
    assert info is not None and info.job_id == job_id
    assert info.path == layout.queued / (job_id + ".csv")
    assert info.path.read_text() == GOOD
    assert not path.exists()
    assert not (tmp_path / "canary").exists()
    assert next(e for e in logs if e["event"] == "job_accepted")["job"] == job_id


@pytest.mark.parametrize("job_id", WEIRD_NAMES, ids=lambda n: repr(n)[:20])
async def test_refuse_odd_names_with_error_file(
    layout: Layout, settings: JobSettings, job_id: str
) -> None:
    """A refused file with any name lands in failed/ beside an error file holding the full id."""
    path = _write(layout.inbox, job_id + ".csv", "a,b\n")
    with capture_logs() as logs:
        assert await accept_job_file(layout, path, settings, known_ids=set()) is None
    assert (layout.failed / (job_id + ".csv")).read_text() == "a,b\n"
    assert layout.error_file(job_id).exists()
    assert len(layout.error_file(job_id).name.encode()) <= 255
    assert "no data rows" in _refusal(layout, job_id)
    refused = [e for e in logs if e["event"] == "job_refused"]
    assert refused[0]["job"] == job_id and "no data rows" in refused[0]["reason"]


async def test_two_long_names_get_distinct_error_files(
    layout: Layout, settings: JobSettings
) -> None:
    """Two 255-byte names differing only at the end do not share an error file."""
    ids = ["q" * 250 + "1", "q" * 250 + "2"]
    for job_id in ids:
        path = _write(layout.inbox, job_id + ".csv", b"\xff")
        assert await accept_job_file(layout, path, settings, known_ids=set()) is None
    assert layout.error_file(ids[0]) != layout.error_file(ids[1])
    assert [_refusal(layout, i) for i in ids] == ["not UTF-8 text (invalid byte at offset 0)"] * 2


async def test_invalid_file_goes_to_failed(layout: Layout, settings: JobSettings) -> None:
    """A file with a short row is moved to failed/ and its error file names the line."""
    path = _write(layout.inbox, "bad.csv", "a,b\n1,2\n3\n")
    assert await accept_job_file(layout, path, settings, known_ids=set()) is None
    assert not path.exists() and (layout.failed / "bad.csv").exists()
    assert _refusal(layout, "bad") == "line 3 has 1 fields, the header has 2"
    assert list(layout.queued.iterdir()) == []


async def test_file_swapped_after_validation_is_checked_again(
    layout: Layout, settings: JobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced between its validation and the rename to queued/ is validated again
    where it landed: an invalid swap is refused, a valid one accepted with its own rows."""
    import vastd.core.jobs as jobs

    real = jobs.validate_job_file
    swaps = {"bad": "a,b\n", "good": "a,b\n1,2\n3,4\n5,6\n"}

    def validate_then_swap(path: Path, max_bytes: int) -> JobFileInfo:
        info = real(path, max_bytes)
        if path.parent == layout.inbox:
            replacement = path.with_name(".swap")
            replacement.write_text(swaps[info.job_id])
            os.rename(replacement, path)  # a new inode under the validated name
        return info

    monkeypatch.setattr(jobs, "validate_job_file", validate_then_swap)
    bad = _write(layout.inbox, "bad.csv", GOOD)
    assert await accept_job_file(layout, bad, settings, known_ids=set()) is None
    assert (layout.failed / "bad.csv").read_text() == "a,b\n"
    assert "no data rows" in _refusal(layout, "bad")
    good = _write(layout.inbox, "good.csv", GOOD)
    info = await accept_job_file(layout, good, settings, known_ids=set())
    assert info is not None and info.rows == 3 and info.path == layout.queued / "good.csv"


async def test_a_file_name_that_is_not_utf8_is_refused_under_a_utf8_name(
    layout: Layout, settings: JobSettings
) -> None:
    """Accepted, its record crashed the snapshot's save and every restart after it. It
    is refused, the bad bytes written out in its name in failed/ and in the reason."""
    path = layout.inbox / os.fsdecode(b"bad\xffname.csv")
    path.write_text(GOOD)
    assert await accept_job_file(layout, path, settings, known_ids=set()) is None
    assert os.listdir(layout.inbox) == []
    assert (layout.failed / "bad\\xffname.csv").read_text() == GOOD
    assert "not valid UTF-8" in _refusal(layout, "bad\\xffname")


async def test_collision_with_known_or_queued_job_is_refused(
    layout: Layout, settings: JobSettings
) -> None:
    """A name already queued or running (or known to the state) is refused, never merged or overwritten."""
    _write(layout.queued, "q.csv", "old\n1\n")
    _write(layout.running, "r.csv", "old\n1\n")
    for job_id, known in (("q", set()), ("r", set()), ("k", {"k"})):
        path = _write(layout.inbox, f"{job_id}.csv", GOOD)
        assert await accept_job_file(layout, path, settings, known_ids=known) is None
        # A duplicate: failed/<job>.csv stays free for the job of that name.
        assert "already queued or running" in _refusal(layout, job_id, f"{job_id}.dup-1")
        assert (layout.failed / f"{job_id}.dup-1.csv").read_text() == GOOD
        assert not (layout.failed / f"{job_id}.csv").exists()
    assert (layout.queued / "q.csv").read_text() == "old\n1\n"
    assert (layout.running / "r.csv").read_text() == "old\n1\n"


async def test_refusal_never_overwrites_failed(layout: Layout, settings: JobSettings) -> None:
    """When failed/ already holds the name, the refused copy lands as <job>.dup-<n>.csv."""
    _write(layout.failed, "j.csv", "earlier")
    _write(layout.failed, "j.error.json", "{}")
    for n in (1, 2):
        path = _write(layout.inbox, "j.csv", "bad")
        assert await accept_job_file(layout, path, settings, known_ids=set()) is None
        assert (layout.failed / f"j.dup-{n}.csv").read_text() == "bad"
        dup = json.loads((layout.failed / f"j.dup-{n}.error.json").read_text())
        assert dup["job"] == "j" and "no data rows" in dup["reason"]
    assert (layout.failed / "j.csv").read_text() == "earlier"
    assert (layout.failed / "j.error.json").read_text() == "{}"


async def test_fifo_is_moved_to_failed_without_opening(
    layout: Layout, settings: JobSettings
) -> None:
    """A FIFO in the inbox is refused promptly; the FIFO entry itself moves to failed/."""
    os.mkfifo(layout.inbox / "pipe.csv")
    async with asyncio.timeout(10):
        assert (
            await accept_job_file(layout, layout.inbox / "pipe.csv", settings, known_ids=set())
            is None
        )
    assert (layout.failed / "pipe.csv").is_fifo()
    assert "FIFO" in _refusal(layout, "pipe")


async def test_symlink_is_moved_to_failed_and_target_untouched(
    layout: Layout, settings: JobSettings, tmp_path: Path
) -> None:
    """A symlink in the inbox is refused; the link moves, its target stays where and as it was."""
    target = _write(tmp_path, "outside.csv", GOOD)
    (layout.inbox / "link.csv").symlink_to(target)
    assert (
        await accept_job_file(layout, layout.inbox / "link.csv", settings, known_ids=set()) is None
    )
    assert (layout.failed / "link.csv").is_symlink()
    assert target.read_text() == GOOD
    assert "symbolic link" in _refusal(layout, "link")


async def test_vanished_file_is_ignored(layout: Layout, settings: JobSettings) -> None:
    """A file that disappeared before acceptance is neither refused nor an error."""
    assert (
        await accept_job_file(layout, layout.inbox / "gone.csv", settings, known_ids=set()) is None
    )
    assert list(layout.failed.iterdir()) == []


# --- acceptance in batches ------------------------------------------------------------------


def _fsyncs_of(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[list[str]]:
    """Patch os.fsync: for each fsync of `folder`, the names it held at that moment."""
    seen: list[list[str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(folder):
            seen.append(sorted(os.listdir(folder)))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return seen


async def test_a_batch_is_accepted_in_order_with_one_fsync_of_queued(
    layout: Layout, settings: JobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many files at once: each outcome is what a call per file gives, in order (good to
    queued/, bad and taken names refused), and queued/ is fsynced once, after every
    accepted file is in it."""
    _write(layout.queued, "taken.csv", "old\n1\n")
    good = [f"j{n:03d}" for n in range(300)]
    paths = [_write(layout.inbox, f"{name}.csv", GOOD) for name in good]
    paths.insert(7, _write(layout.inbox, "bad.csv", "a,b\n1\n"))
    paths.insert(150, _write(layout.inbox, "taken.csv", GOOD))
    paths.insert(200, layout.inbox / "gone.csv")
    queued_fsyncs = _fsyncs_of(monkeypatch, layout.queued)
    outcomes = await accept_job_files(layout, paths, settings, known_ids=set())
    infos = [o for o in outcomes if isinstance(o, JobFileInfo)]
    assert [i.job_id for i in infos] == good
    assert all(i.path == layout.queued / f"{i.job_id}.csv" and i.rows == 2 for i in infos)
    assert [outcomes[n] for n in (7, 150, 200)] == [None, None, None]
    assert queued_fsyncs == [sorted([*(f"{n}.csv" for n in good), "taken.csv"])]
    assert "fields" in _refusal(layout, "bad")
    assert "already queued or running" in _refusal(layout, "taken", "taken.dup-1")
    assert (layout.queued / "taken.csv").read_text() == "old\n1\n"
    assert list(layout.inbox.iterdir()) == []


async def test_a_failing_move_in_a_batch_loses_nothing(
    layout: Layout, settings: JobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename into queued/ that fails mid-batch (disk full) leaves that file in the
    inbox as it was, with its error; a name taken in queued/ meanwhile is refused; the
    files before and after it are accepted and durable."""
    paths = [_write(layout.inbox, f"{name}.csv", GOOD) for name in ("a", "full", "raced", "z")]
    real_rename, real_validate = os.rename, jobs.validate_job_file

    def rename(source: Any, destination: Any) -> None:
        if Path(destination).parent == layout.queued and Path(source).name == "full.csv":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(source, destination)

    def validate(path: Path, max_bytes: int) -> JobFileInfo:
        if path == layout.inbox / "raced.csv":  # the name taken after its checks passed
            (layout.queued / "raced.csv").write_text("someone else's\n1\n")
        return real_validate(path, max_bytes)

    monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(jobs, "validate_job_file", validate)
    queued_fsyncs = _fsyncs_of(monkeypatch, layout.queued)
    with capture_logs() as logs:
        a, full, raced, z = await accept_job_files(layout, paths, settings, known_ids=set())
    assert isinstance(a, JobFileInfo) and isinstance(z, JobFileInfo)
    assert isinstance(full, FileOperationError) and "No space left" in str(full)
    assert raced is None
    assert (layout.inbox / "full.csv").read_text() == GOOD
    assert "already queued or running" in _refusal(layout, "raced", "raced.dup-1")
    assert (layout.failed / "raced.dup-1.csv").read_text() == GOOD
    assert (layout.queued / "raced.csv").read_text() == "someone else's\n1\n"
    assert queued_fsyncs[0] == ["a.csv", "raced.csv", "z.csv"]
    assert sorted(e["job"] for e in logs if e["event"] == "job_accepted") == ["a", "z"]
    # The one-file form raises the folders' error; the file stays.
    with pytest.raises(FileOperationError, match="No space left"):
        await accept_job_file(layout, layout.inbox / "full.csv", settings, known_ids=set())
    assert (layout.inbox / "full.csv").read_text() == GOOD


async def test_a_failed_fsync_accepts_nothing_of_the_batch(
    layout: Layout, settings: JobSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queued/ cannot be fsynced (EIO): no file of the batch is reported accepted."""
    paths = [_write(layout.inbox, f"{name}.csv", GOOD) for name in ("a", "b")]
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(layout.queued):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with capture_logs() as logs:
        outcomes = await accept_job_files(layout, paths, settings, known_ids=set())
    assert all(isinstance(o, FileOperationError) for o in outcomes)
    assert not any(e["event"] == "job_accepted" for e in logs)


async def test_duplicate_names_within_one_batch(
    layout: Layout, settings: JobSettings, tmp_path: Path
) -> None:
    """A name met twice in one batch is checked once the first is settled, as a call per
    file would: the second is refused (never merged, never over the first), the same
    path twice is taken once; names known or done are refused as before."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = _write(layout.inbox, "twice.csv", GOOD)
    second = _write(elsewhere, "twice.csv", "x,y\n1,2\n3,4\n")
    _write(layout.done, "old.csv", GOOD)
    known = _write(layout.inbox, "known.csv", GOOD)
    old = _write(layout.inbox, "old.csv", GOOD)
    outcomes = await accept_job_files(
        layout, [first, second, first, known, old], settings, known_ids={"known"}
    )
    assert isinstance(outcomes[0], JobFileInfo) and outcomes[0].rows == 2
    assert outcomes[1:] == [None, None, None, None]
    assert (layout.queued / "twice.csv").read_text() == GOOD
    assert (layout.failed / "twice.dup-1.csv").read_text() == "x,y\n1,2\n3,4\n"
    assert "already queued or running" in _refusal(layout, "twice", "twice.dup-1")
    assert "already queued or running" in _refusal(layout, "known", "known.dup-1")
    assert (layout.failed / "old.dup-1.csv").exists()
    assert list(layout.inbox.iterdir()) == [] and list(elsewhere.iterdir()) == []
