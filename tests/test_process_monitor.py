"""process_monitor: batched status, completion from exit_code, kills of whole groups (real sh)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.localrunner import LocalRunner, group_gone, kill_leftover_jobs, wait_until
from vastd.execution import process_monitor as pm
from vastd.execution.job_runner import RemoteJobPaths, execute_job_on_instance, remote_job_paths
from vastd.execution.process_monitor import (
    CompletionStatus,
    RemoteJobStatus,
    build_status_script,
    detect_job_completion,
    get_process_output,
    handle_job_timeout,
    kill_job,
    monitor_job_execution,
    parse_status_output,
)


@pytest.fixture
def remote_root(tmp_path: Path) -> str:
    root = tmp_path / "remote"
    root.mkdir()
    return str(root)


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[LocalRunner]:
    yield LocalRunner(cwd=tmp_path)
    kill_leftover_jobs(tmp_path)


async def _start(
    runner: LocalRunner, remote_root: str, tmp_path: Path, job_id: str, command: str
) -> tuple[RemoteJobPaths, int]:
    csv = tmp_path / "job.csv"
    csv.write_text("a\n1\n")
    info = await execute_job_on_instance(
        runner,
        remote_root=remote_root,
        instance_id="inst1",
        job_id=job_id,
        local_csv=csv,
        command_template=command,
        vars={},
        attempt=1,
        timeout_s=20,
    )
    return remote_job_paths(remote_root, "inst1", job_id), info.pgid


async def _status(runner: LocalRunner, job_id: str, paths: RemoteJobPaths) -> RemoteJobStatus:
    return (await monitor_job_execution(runner, [(job_id, paths)], timeout_s=20))[job_id]


async def test_one_command_reports_three_jobs(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A single remote command reports running, succeeded and failed jobs together."""
    running, pgid = await _start(runner, remote_root, tmp_path, "run\nning", "sleep 30")
    ok, _ = await _start(runner, remote_root, tmp_path, "ok", "echo hello; exit 0")
    bad, _ = await _start(runner, remote_root, tmp_path, "bad", "exit 3")
    await wait_until(
        lambda: Path(ok.exit_code).exists() and Path(bad.exit_code).exists(), what="exit codes"
    )
    entries = [("run\nning", running), ("ok", ok), ("bad", bad)]
    before = runner.count("run")
    statuses = await monitor_job_execution(runner, entries, timeout_s=20)
    assert runner.count("run") == before + 1
    assert {k: detect_job_completion(v) for k, v in statuses.items()} == {
        "run\nning": CompletionStatus.RUNNING,
        "ok": CompletionStatus.SUCCEEDED,
        "bad": CompletionStatus.FAILED,
    }
    run = statuses["run\nning"]
    assert (run.pid, run.alive, run.attempt, run.exit_code) == (pgid, True, 1, None)
    assert run.started_at is not None and run.ended_at is None
    done = statuses["ok"]
    # log size is not reported: it would cost two processes per job and cycle
    assert done.exit_code == 0 and done.ended_at is not None and done.log_size is None
    assert statuses["bad"].exit_code == 3


@pytest.mark.parametrize("garbage", ["abc", "1 2", "", "3\n4", "--1", "0x1"])
async def test_garbage_exit_code_is_invalid(
    runner: LocalRunner, remote_root: str, garbage: str
) -> None:
    """An exit_code file holding anything but an optional sign and digits reads as INVALID."""
    paths = remote_job_paths(remote_root, "inst1", "j")
    os.makedirs(paths.job_dir)
    Path(paths.exit_code).write_text(garbage)
    status = await _status(runner, "j", paths)
    assert status.exit_code is None and status.exit_code_invalid
    assert detect_job_completion(status) is CompletionStatus.INVALID


@pytest.mark.parametrize(("text", "code"), [("-1\n", -1), ("+0", 0), ("137\n\n", 137)])
async def test_signed_exit_codes_are_read(
    runner: LocalRunner, remote_root: str, text: str, code: int
) -> None:
    """Signed numbers and trailing newlines are valid exit codes."""
    paths = remote_job_paths(remote_root, "inst1", "j")
    os.makedirs(paths.job_dir)
    Path(paths.exit_code).write_text(text)
    assert (await _status(runner, "j", paths)).exit_code == code


async def test_killed_job_is_vanished(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A job whose group was SIGKILLed without writing exit_code is VANISHED, not running."""
    paths, pgid = await _start(runner, remote_root, tmp_path, "j", "sleep 30 & sleep 30")
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        status = await _status(runner, "j", paths)
        if not status.alive or time.monotonic() > deadline:
            break
    assert detect_job_completion(status) is CompletionStatus.VANISHED
    assert status.exit_code is None


async def test_missing_folder_is_missing(runner: LocalRunner, remote_root: str) -> None:
    """A job whose remote folder does not exist is MISSING."""
    status = await _status(runner, "gone", remote_job_paths(remote_root, "inst1", "gone"))
    assert not status.exists
    assert detect_job_completion(status) is CompletionStatus.MISSING


async def test_wait_returns_early_when_a_job_ends(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """With wait_s the command returns soon after a job ends, long before wait_s passes."""
    slow, _ = await _start(runner, remote_root, tmp_path, "slow", "sleep 30")
    quick, _ = await _start(runner, remote_root, tmp_path, "quick", "sleep 1; exit 0")
    entries = [("slow", slow), ("quick", quick)]
    t0 = time.monotonic()
    statuses = await monitor_job_execution(runner, entries, wait_s=30, timeout_s=20)
    assert time.monotonic() - t0 < 15
    assert detect_job_completion(statuses["quick"]) is CompletionStatus.SUCCEEDED
    assert detect_job_completion(statuses["slow"]) is CompletionStatus.RUNNING


async def test_wait_ends_after_wait_s_when_nothing_ends(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """With every job running, the command reports after about wait_s, all RUNNING."""
    paths, _ = await _start(runner, remote_root, tmp_path, "slow", "sleep 30")
    statuses = await monitor_job_execution(runner, [("slow", paths)], wait_s=0.5, timeout_s=20)
    assert detect_job_completion(statuses["slow"]) is CompletionStatus.RUNNING


def _waiters(remote_root: str) -> list[str]:
    return sorted(p.name for p in Path(remote_root, "inst1").glob("wait.*"))


def _sleeps_of(seconds: str) -> list[int]:
    """Pids of `sleep <seconds>` processes (a ticker's sleep left behind would show)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", seconds.encode()]:
            pids.append(int(proc.name))
    return pids


async def _watch_waiters(remote_root: str, seen: list[str]) -> None:
    while True:
        seen.extend(_waiters(remote_root))
        await asyncio.sleep(0.01)


async def test_a_wait_is_woken_by_the_wrapper_as_the_job_ends(
    runner: LocalRunner, remote_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting status command listens on a FIFO of its own that the job's wrapper
    writes into as it ends: it returns then, not at its next look. Its looks are set 60 s
    apart here, so only the wrapper's line can end the wait early. The FIFO is removed,
    and the ticker takes its sleep with it."""
    monkeypatch.setattr(pm, "WAKE_LOOK_S", 60.0)
    slow, _ = await _start(runner, remote_root, tmp_path, "slow", "sleep 30")
    quick, _ = await _start(runner, remote_root, tmp_path, "quick", "sleep 2; exit 3")
    seen: list[str] = []
    watching = asyncio.create_task(_watch_waiters(remote_root, seen))
    t0 = time.monotonic()
    statuses = await monitor_job_execution(
        runner, [("slow", slow), ("quick", quick)], wait_s=50, timeout_s=20
    )
    watching.cancel()
    assert time.monotonic() - t0 < 25, "the wait was not woken by the wrapper"
    assert seen, "the wait made no FIFO (it polled)"
    assert detect_job_completion(statuses["quick"]) is CompletionStatus.FAILED
    assert detect_job_completion(statuses["slow"]) is CompletionStatus.RUNNING
    assert _waiters(remote_root) == []
    await wait_until(lambda: not _sleeps_of("50"), timeout_s=5, what="the ticker's sleep to go")


async def test_a_wait_sees_a_job_killed_without_its_wrapper_at_its_next_look(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A job whose whole group is SIGKILLed (no wrapper left to wake the wait) is seen
    at the wait's next look, long before wait_s: VANISHED."""
    paths, pgid = await _start(runner, remote_root, tmp_path, "j", "sleep 30 & sleep 30")

    async def kill_soon() -> None:
        await wait_until(lambda: bool(_waiters(remote_root)), timeout_s=15)
        os.killpg(pgid, signal.SIGKILL)

    killer = asyncio.create_task(kill_soon())
    t0 = time.monotonic()
    statuses = await monitor_job_execution(runner, [("j", paths)], wait_s=40, timeout_s=20)
    await killer
    assert time.monotonic() - t0 < 30
    assert detect_job_completion(statuses["j"]) is CompletionStatus.VANISHED
    assert _waiters(remote_root) == []


async def test_a_kill_that_records_the_exit_code_wakes_the_wait(
    runner: LocalRunner, remote_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vastd's kill (a timeout, a cancel) kills the wrapper with the job and writes
    `exit_code` itself: it wakes the waiting status command too (looks 60 s apart)."""
    monkeypatch.setattr(pm, "WAKE_LOOK_S", 60.0)
    paths, _ = await _start(runner, remote_root, tmp_path, "j", "sleep 30")

    async def kill_soon() -> None:
        await wait_until(lambda: bool(_waiters(remote_root)), timeout_s=15)
        await kill_job(runner, paths, grace_s=0.2, timeout_s=20, exit_code=124)

    killer = asyncio.create_task(kill_soon())
    t0 = time.monotonic()
    statuses = await monitor_job_execution(runner, [("j", paths)], wait_s=50, timeout_s=20)
    await killer
    assert time.monotonic() - t0 < 25, "the kill did not wake the wait"
    assert statuses["j"].exit_code == 124


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


async def test_a_wrapper_is_not_held_up_by_fifos_nobody_reads(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A FIFO left by a waiter that was killed: a wrapper ending with nobody waiting
    writes its line there and is gone (opened read-write, the FIFO never blocks)."""
    stale = Path(remote_root, "inst1", f"wait.{_dead_pid()}")
    stale.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(stale)
    paths, pgid = await _start(runner, remote_root, tmp_path, "j", "true")
    await wait_until(lambda: group_gone(pgid), timeout_s=15, what="the wrapper to end")
    assert Path(paths.exit_code).read_text() == "0\n"


async def test_a_wait_removes_what_waiters_that_are_gone_left(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """The next wait removes a dead waiter's FIFO and a plain file of that name (a
    wrapper's write racing a removal creates one), and keeps a live waiter's FIFO."""
    inst = Path(remote_root, "inst1")
    inst.mkdir(parents=True, exist_ok=True)
    stale = inst / f"wait.{_dead_pid()}"
    os.mkfifo(stale)
    stray = inst / f"wait.{_dead_pid()}"
    stray.write_text("x\n")
    live = inst / f"wait.{os.getpid()}"
    os.mkfifo(live)
    paths, _ = await _start(runner, remote_root, tmp_path, "j", "sleep 3")
    statuses = await monitor_job_execution(runner, [("j", paths)], wait_s=30, timeout_s=20)
    assert detect_job_completion(statuses["j"]) is CompletionStatus.SUCCEEDED
    assert _waiters(remote_root) == [live.name]


async def test_without_mkfifo_a_wait_looks_every_tick(
    runner: LocalRunner, remote_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an instance with no `mkfifo` the wait falls back to looking every 0.2 s: it
    still returns soon after the job ends, and makes no FIFO."""
    paths, _ = await _start(runner, remote_root, tmp_path, "j", "sleep 3")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "sleep", "rm"):
        os.symlink(shutil.which(tool) or tool, bin_dir / tool)
    monkeypatch.setenv("PATH", str(bin_dir))
    seen: list[str] = []
    watching = asyncio.create_task(_watch_waiters(remote_root, seen))
    t0 = time.monotonic()
    statuses = await monitor_job_execution(runner, [("j", paths)], wait_s=40, timeout_s=20)
    watching.cancel()
    assert time.monotonic() - t0 < 30
    assert detect_job_completion(statuses["j"]) is CompletionStatus.SUCCEEDED
    assert seen == []


async def test_login_junk_before_marker_is_ignored(remote_root: str, tmp_path: Path) -> None:
    """Status-like lines printed by a login shell before the marker are not parsed."""
    paths = remote_job_paths(remote_root, "inst1", "j")
    os.makedirs(paths.job_dir)
    Path(paths.exit_code).write_text("5\n")
    runner = LocalRunner(junk="J 0 1 77 1 0 - - - - 0\n__VASTD_BEGIN\nhello\n", cwd=tmp_path)
    status = await _status(runner, "j", paths)
    assert (status.exit_code, status.pid, status.alive) == (5, None, False)


def test_truncated_output_leaves_entries_out() -> None:
    """Entries without a complete line are absent, never reported as failed."""
    entries = [("a", remote_job_paths("/r", "1", "a")), ("b", remote_job_paths("/r", "1", "b"))]
    out = "junk\n__VASTD_BEGIN__\nJ 0 1 10 1 - 5 - 3 1 0 -\nJ 1 1 11 0 "
    statuses = parse_status_output(out, entries)
    assert list(statuses) == ["a"]
    assert statuses["a"].alive and statuses["a"].pid == 10
    assert parse_status_output("no marker at all", entries) == {}
    assert parse_status_output("__VASTD_BEGIN__\nJ 7 0 - 0 - - - - - 0 -\n", entries) == {}


def test_status_script_never_contains_job_ids() -> None:
    """Job ids are not echoed by the script (only indices), so they cannot break the output."""
    entries = [("evil\nJ 0 1 1 1 0 - - - - 0", remote_job_paths("/r", "1", "plain"))]
    assert "evil" not in build_status_script(entries, wait_s=1)


def test_detect_job_completion_table() -> None:
    """exit_code wins over liveness; no exit_code and no live group means VANISHED."""
    base = RemoteJobStatus(job_id="j", exists=True)
    cases = {
        CompletionStatus.RUNNING: RemoteJobStatus(job_id="j", exists=True, pid=5, alive=True),
        CompletionStatus.SUCCEEDED: RemoteJobStatus(
            job_id="j", exists=True, exit_code=0, alive=True
        ),
        CompletionStatus.FAILED: RemoteJobStatus(job_id="j", exists=True, exit_code=2),
        CompletionStatus.VANISHED: base,
        CompletionStatus.INVALID: RemoteJobStatus(job_id="j", exists=True, exit_code_invalid=True),
        CompletionStatus.MISSING: RemoteJobStatus(job_id="j", exists=False),
    }
    for expected, status in cases.items():
        assert detect_job_completion(status) is expected


async def test_timeout_kills_the_whole_group(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """handle_job_timeout kills every process of the group (even TERM-ignoring children) and
    records exit_code 124 with a timed_out marker."""
    paths, pgid = await _start(
        runner, remote_root, tmp_path, "j", "(trap '' TERM; sleep 100) & sleep 100 & wait"
    )
    outcome = await handle_job_timeout(runner, paths, grace_s=0.5, timeout_s=20)
    assert outcome.was_alive and not outcome.still_alive and outcome.exit_code_written
    await wait_until(lambda: group_gone(pgid), what="process group gone")
    assert Path(paths.exit_code).read_text().strip() == "124"
    assert Path(paths.timed_out).exists()
    status = await _status(runner, "j", paths)
    assert status.timed_out and detect_job_completion(status) is CompletionStatus.FAILED


async def test_timeout_fills_an_ended_at_left_empty(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """The wrapper writes ended_at in place (no rename): one killed halfway leaves it
    empty, and the timeout kill then writes it instead of taking it as written."""
    paths, _ = await _start(runner, remote_root, tmp_path, "j", "sleep 100")
    ended_at = Path(paths.exit_code).with_name("ended_at")
    ended_at.write_text("")
    outcome = await handle_job_timeout(runner, paths, grace_s=0.5, timeout_s=20)
    assert outcome.exit_code_written
    assert abs(int(ended_at.read_text()) - time.time()) < 10
    assert (await _status(runner, "j", paths)).ended_at is not None


async def test_timeout_after_the_job_ended_keeps_its_exit_code(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A job that ended before the timeout kill keeps its own exit code and no marker."""
    paths, _ = await _start(runner, remote_root, tmp_path, "j", "exit 0")
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    outcome = await handle_job_timeout(runner, paths, grace_s=0.5, timeout_s=20)
    assert not outcome.exit_code_written
    assert Path(paths.exit_code).read_text().strip() == "0"
    assert not Path(paths.timed_out).exists()


async def test_kill_job_without_record(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """kill_job stops the group and, unasked, writes neither exit_code nor timed_out."""
    paths, pgid = await _start(runner, remote_root, tmp_path, "j", "sleep 100")
    outcome = await kill_job(runner, paths, grace_s=1, timeout_s=20)
    assert outcome.was_alive and not outcome.still_alive
    await wait_until(lambda: group_gone(pgid), what="process group gone")
    assert not Path(paths.exit_code).exists() and not Path(paths.timed_out).exists()
    assert detect_job_completion(await _status(runner, "j", paths)) is CompletionStatus.VANISHED


async def test_kill_ignores_pid_from_another_boot(
    runner: LocalRunner, remote_root: str, tmp_path: Path
) -> None:
    """A pid recorded under another boot key is never signalled (it may be someone else's)."""
    paths, pgid = await _start(runner, remote_root, tmp_path, "j", "sleep 100")
    Path(paths.boot_key).write_text("another-boot:1")
    outcome = await kill_job(runner, paths, grace_s=0.2, timeout_s=20)
    assert not outcome.was_alive
    assert not group_gone(pgid)
    status = await _status(runner, "j", paths)
    assert not status.alive and detect_job_completion(status) is CompletionStatus.VANISHED


async def test_process_output_tail(runner: LocalRunner, remote_root: str, tmp_path: Path) -> None:
    """The log tail comes back with bad bytes replaced; a job without a log gives ""."""
    paths = remote_job_paths(remote_root, "inst1", "j")
    os.makedirs(paths.job_dir)
    lines = [f"Row {i}: done".encode() for i in range(100)] + [b"bad \xff byte"]
    Path(paths.log).write_bytes(b"\n".join(lines) + b"\n")
    text = await get_process_output(runner, paths, tail_lines=3, timeout_s=20)
    assert text == "Row 98: done\nRow 99: done\nbad \ufffd byte\n"
    missing = remote_job_paths(remote_root, "inst1", "none")
    assert await get_process_output(runner, missing, timeout_s=20) == ""
