"""`vastd submit` and `vastd status`, run through `main()` as a user would, no daemon running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import clean_env, preserved_logging
from vastd.cli import main
from vastd.core import state as st
from vastd.core import submit as submit_mod
from vastd.core.files import Layout, shown_name
from vastd.core.jobs import discover_job_files
from vastd.core.lock import RootLock
from vastd.core.state import InstanceRecord, InstanceStatus, JobState, StateStore

REPO = Path(__file__).resolve().parent.parent
CSV = "a,b\n1,2\n3,4\n"


@pytest.fixture(autouse=True)
def _no_vastd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Logging set-up by in-process commands is undone afterwards. No VASTD_* from the caller's environment steers these commands."""
    keep = clean_env()
    for name in list(os.environ):
        if name not in keep:
            monkeypatch.delenv(name)
    with preserved_logging():
        yield


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def config(tmp_path: Path, root: Path) -> str:
    """A config file whose [paths] root is under tmp_path (not created yet)."""
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nroot = "{root}"\n')
    return str(path)


def job_file(folder: Path, name: str, text: str = CSV) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# --- submit ----------------------------------------------------------------------------------
def test_submit_puts_files_into_the_inbox(
    tmp_path: Path, root: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """submit copies each file into inbox/ under its own name, prints where, exits 0,
    and leaves the source and no temp file behind."""
    a = job_file(tmp_path / "src", "garch_test_job_0000_0009.csv")
    b = job_file(tmp_path / "src", "other.csv", "x\n1\n")
    assert main(["submit", str(a), str(b), "--config", config]) == 0
    inbox = root / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == [a.name, b.name]
    assert (inbox / a.name).read_text() == CSV
    assert (inbox / b.name).read_text() == "x\n1\n"
    assert a.exists()
    out = capsys.readouterr().out.split()
    assert out == [str(inbox / a.name), str(inbox / b.name)]


def test_submit_final_name_appears_only_complete(
    tmp_path: Path, root: Path, config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the copy is under way the inbox holds no candidate job file (only a dot-name
    the daemon ignores); the final name appears with the whole content."""
    src = job_file(tmp_path / "src", "big.csv", "a,b\n" + "1,2\n" * 10_000)
    inbox = root / "inbox"
    seen: list[list[Path]] = []
    real_copy = shutil.copyfileobj

    def observing_copy(reader: Any, writer: Any, length: int = 0) -> None:
        writer.write(reader.read(10))  # half-written now
        writer.flush()
        seen.append(discover_job_files(inbox))
        assert not (inbox / "big.csv").exists()
        real_copy(reader, writer, length)

    monkeypatch.setattr(submit_mod.shutil, "copyfileobj", observing_copy)
    assert main(["submit", str(src), "--config", config]) == 0
    assert seen == [[]]
    assert (inbox / "big.csv").read_bytes() == src.read_bytes()
    assert [p.name for p in inbox.iterdir()] == ["big.csv"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: job_file(d, "jobs.txt"), "must end in .csv"),
        (lambda d: job_file(d, ".hidden.csv"), "neither dot-files"),
        (lambda d: d / "absent.csv", "no such file"),
        (lambda d: job_file(d, os.fsdecode(b"bad\xff.csv")), "not valid UTF-8"),
        (lambda d: (d / "dir.csv").mkdir() or d / "dir.csv", "not a regular file"),
    ],
    ids=["not-csv", "dot-file", "missing", "not-utf8", "directory"],
)
def test_submit_refuses_bad_sources(
    tmp_path: Path,
    root: Path,
    config: str,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    reason: str,
) -> None:
    """A non-.csv, a dot-file (the daemon would ignore it for ever), a missing file or a
    directory: exit 1, the reason on stderr, inbox empty."""
    src = make(tmp_path)
    assert main(["submit", str(src), "--config", config]) == 1
    err = capsys.readouterr().err
    assert shown_name(str(src)) in err
    assert reason in err
    assert discover_job_files(root / "inbox") == []
    assert not (root / "inbox").exists() or list((root / "inbox").iterdir()) == []


def test_submit_refuses_an_existing_inbox_name(
    tmp_path: Path, root: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name already in the inbox is refused (exit 1) and the waiting file is untouched;
    the other files of the same call are still submitted."""
    job_file(root / "inbox", "dup.csv", "old\n1\n")
    dup = job_file(tmp_path / "src", "dup.csv", "new\n2\n")
    fine = job_file(tmp_path / "src", "fine.csv")
    assert main(["submit", str(dup), str(fine), "--config", config]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert (root / "inbox" / "dup.csv").read_text() == "old\n1\n"
    assert (root / "inbox" / "fine.csv").read_text() == CSV
    assert sorted(p.name for p in (root / "inbox").iterdir()) == ["dup.csv", "fine.csv"]


# --- status ----------------------------------------------------------------------------------
def status_json(config: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", "--json", "--config", config]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_status_on_an_empty_root(
    root: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No folders, no snapshot: status (text and JSON) reports nothing to do, creates nothing."""
    data = status_json(config, capsys)
    assert data["jobs"] == {"queued": 0, "running": 0, "collecting": 0, "done": 0, "failed": 0}
    assert data["instances"] == []
    assert data["total_jobs"] == 0
    assert data["progress"] is None
    assert data["eta_s"] is None
    assert data["totals"]["instances"] == 0
    assert main(["status", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "jobs: queued 0" in text
    assert "instances: 0" in text
    assert not root.exists()


HOUR = 3600.0


def write_snapshot(root: Path, now: float) -> None:
    """Jobs in every state and instances in several, as a daemon would have left them."""
    layout = Layout(root)
    layout.ensure()
    store = StateStore(layout.state_file)
    snap = store.snapshot
    snap.instances["11"] = InstanceRecord(
        id="11", status=InstanceStatus.READY, dph=0.25, last_seen=now - 5, current_jobs=["run"]
    )
    snap.instances["12"] = InstanceRecord(
        id="12", status=InstanceStatus.READY, dph=0.5, last_seen=now - 10
    )
    snap.instances["13"] = InstanceRecord(
        id="13", status=InstanceStatus.UNREACHABLE, dph=0.125, last_seen=None
    )
    snap.instances["14"] = InstanceRecord(id="14", status=InstanceStatus.LOST, dph=9.0)
    snap.spend_total = 1.23456
    for name, state in [
        ("q", JobState.QUEUED),
        ("run", JobState.RUNNING),
        ("col", JobState.COLLECTING),
        ("d1", JobState.DONE),
        ("d2", JobState.DONE),
        ("f", JobState.FAILED),
    ]:
        job = st.add_job(store, name, f"{name}.csv", 2)
        job.state = state
    snap.jobs["run"].instance = "11"
    # Done jobs took 100 s and 200 s from dispatch to finish: 150 s on average.
    snap.jobs["d1"].dispatched_at, snap.jobs["d1"].finished_at = now - 1000, now - 900
    snap.jobs["d2"].dispatched_at, snap.jobs["d2"].finished_at = now - 800, now - 600
    store.flush_sync()
    job_file(layout.inbox, "waiting.csv")


def test_status_json_reports_jobs_instances_totals_progress_eta(
    root: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """status --json: jobs per state, each instance's state, current job, $/h and last seen,
    totals over live instances, progress and an ETA from the average job duration."""
    now = time.time()
    write_snapshot(root, now)
    data = status_json(config, capsys)
    assert data["jobs"] == {"queued": 1, "running": 1, "collecting": 1, "done": 2, "failed": 1}
    assert data["inbox_waiting"] == 1
    assert data["total_jobs"] == 6
    assert data["progress"] == pytest.approx(3 / 6)
    # 4 jobs left (3 in flight or queued + 1 in the inbox) * 150 s / 2 ready instances.
    assert data["eta_s"] == pytest.approx(300.0)
    by_id = {i["id"]: i for i in data["instances"]}
    assert set(by_id) == {"11", "12", "13", "14"}
    assert by_id["11"]["state"] == "ready"
    assert by_id["11"]["current_jobs"] == ["run"]
    assert by_id["11"]["dph"] == 0.25
    seen = by_id["11"]["last_seen"]
    assert seen.endswith("Z")
    assert abs(datetime.fromisoformat(seen).timestamp() - (now - 5)) < 1
    assert by_id["13"]["state"] == "unreachable"
    assert by_id["13"]["last_seen"] is None
    assert by_id["14"]["state"] == "lost"
    totals = data["totals"]
    assert totals["instances"] == 3  # the lost one no longer counts
    assert totals["ready"] == 2
    assert totals["dph_now"] == pytest.approx(0.875)
    assert totals["spend_total"] == pytest.approx(1.2346)
    assert data["saved_at"] is not None


def test_status_text_output(root: Path, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The human format names every state count, progress, ETA and each instance's line."""
    write_snapshot(root, time.time())
    assert main(["status", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "queued 1  running 1  collecting 1  done 2  failed 1  (inbox 1)" in text
    assert "progress: 50.0% of 6  eta 300s" in text
    # No daemon: the figures are the snapshot's, with no rate "now".
    assert "instances: 3 (2 ready)  spent $1.23  (as of 20" in text
    assert "/h now" not in text
    assert "daemon: not running; figures as of 20" in text
    for iid in ("11", "12", "13", "14"):
        assert f"  {iid}  " in text
    assert "job run" in text
    lock = RootLock(root)
    lock.acquire()  # as a running daemon holds it
    try:
        assert main(["status", "--config", config]) == 0
    finally:
        lock.release()
    text = capsys.readouterr().out
    assert "instances: 3 (2 ready)  $0.875/h now  spent $1.23" in text
    assert "daemon: running" in text


def test_status_falls_back_to_backup_and_reports_both_bad(
    root: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """status reads state.json.bak when state.json is corrupt; both corrupt is exit 1 with a
    message, and status never rewrites either file."""
    write_snapshot(root, time.time())
    layout = Layout(root)
    store = StateStore.open(layout.state_file)
    st.add_job(store, "newest", "newest.csv", 1)
    store.flush_sync()  # state.json: 7 jobs, state.json.bak: 6 jobs
    layout.state_file.write_text("{broken")
    assert status_json(config, capsys)["total_jobs"] == 6
    layout.state_backup.write_text("")
    assert main(["status", "--json", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "state.json" in err
    assert layout.state_file.read_text() == "{broken"
    assert layout.state_backup.read_text() == ""


def test_status_subprocess_without_daemon(root: Path, config: str) -> None:
    """`python -m vastd status --json` works as its own process while no daemon runs."""
    write_snapshot(root, time.time())
    proc = subprocess.run(
        [sys.executable, "-m", "vastd", "status", "--json", "--config", config],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"]["done"] == 2


def test_status_into_a_closed_pipe_is_no_traceback(root: Path, config: str) -> None:
    """`vastd status | head -1`: the reader gone, status ends quietly (exit 1)."""
    write_snapshot(root, time.time())
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into the pipe now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vastd", "status", "--config", config],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=REPO,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


# What `vastd status` must not import: the daemon's machinery, and libraries that cost a
# short command more than its work (structlog brings rich; pydantic-settings brings asyncio).
STATUS_MUST_NOT_IMPORT = (
    "asyncio",
    "asyncssh",
    "aiohttp",
    "watchfiles",
    "structlog",
    "pydantic_settings",
    "vastd.core.state",
    "vastd.core.snapshot",
    "vastd.core.jobs",
    "vastd.daemon",
    "vastd.orchestration",
)
_IMPORTS_AFTER_STATUS = """
import sys
from vastd.cli import main
code = main(sys.argv[1:])
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def test_status_imports_no_daemon_machinery(root: Path, config: str) -> None:
    """A fresh `vastd status --json` (the snapshot read from its backup, so it logs a
    warning) imports none of STATUS_MUST_NOT_IMPORT but structlog, which the warning
    needs; that goes to stderr as JSON and stdout stays the status alone. A VASTD_
    override brings pydantic-settings, which reads it."""

    def run(*extra: str) -> tuple[dict[str, Any], str, set[str]]:
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORTS_AFTER_STATUS, "status", "--json", "--config", config],
            capture_output=True,
            text=True,
            env=clean_env(dict(pair.split("=", 1) for pair in extra)),
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        modules = set(proc.stderr.splitlines())
        return json.loads(proc.stdout), proc.stderr, set(STATUS_MUST_NOT_IMPORT) & modules

    write_snapshot(root, time.time())
    data, _err, heavy = run()
    assert data["jobs"]["done"] == 2
    assert heavy == set()
    layout = Layout(root)
    shutil.copy(layout.state_file, layout.state_backup)
    layout.state_file.write_text("{broken")
    data, err, heavy = run()
    assert data["jobs"]["done"] == 2
    assert heavy == {"structlog", "asyncio"}  # structlog imports asyncio
    warning = json.loads(next(line for line in err.splitlines() if line.startswith("{")))
    assert warning["event"] == "state_restored_from_backup"
    assert warning["level"] == "warning"
    data, _err, heavy = run("VASTD_FLEET__IDLE_TIMEOUT_S=0")
    assert "pydantic_settings" in heavy
