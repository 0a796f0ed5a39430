"""End to end: `vastd cancel`, `retry`, `drain`, `undrain` and the control socket.

The daemon is `python -m vastd run` as a subprocess over the simulator's API with
instances that are real sshd processes (tests/openssh_cluster.py), as in
tests/test_state_machine_e2e.py; the commands are `python -m vastd ...` as an
operator types them. Judged: exit codes and lines, the root's folders, the
`.error.json`, the records, the JSON log and the processes left on the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.openssh_cluster import DaemonProcess, OpenSSHCloud, drop_into_inbox, processes_of_user
from tests.sshd import TEST_USER
from tests.test_state_machine_e2e import (
    GATE,
    check_results_for,
    final_record,
    make_job,
    open_gate,
    read_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.sshd, pytest.mark.timeout(120)]


def vastd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vastd", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=150,
    )


async def avastd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(vastd, cfg, *args)


def gated(cloud: OpenSSHCloud, tmp_path: Path, root: Path, **job: Any) -> Path:
    command = f"{GATE}; {cloud.job_command()}"
    data = cloud.config(root, job={"command": command, "jobs_per_instance": 1, **job})
    return cloud.write_config(tmp_path / "config.toml", data)


def gate_processes(cloud: OpenSSHCloud) -> list[tuple[int, str]]:
    return processes_of_user(TEST_USER, "../../go", under=cloud.remote_root)


def error_reason(root: Path, job: str) -> str:
    reason: str = json.loads((root / "failed" / f"{job}.error.json").read_text())["reason"]
    return reason


def ask(root: Path, raw: bytes, timeout_s: float = 15.0) -> dict[str, Any]:
    """Send raw bytes to the control socket; the one-line answer, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(root / "control.sock"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)  # an over-long line is answered before it is all sent
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


async def started_daemon(daemon: Any, cloud: OpenSSHCloud, cfg: Path, log: Path) -> DaemonProcess:
    proc: DaemonProcess = daemon(cloud, cfg, log)
    await proc.wait_event("control_socket_listening", 30)
    return proc


# --- cancel ------------------------------------------------------------------------------------
async def test_cancel_kills_a_running_job_and_unqueues_a_queued_one(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """One instance, one slot: R runs behind its gate, Q waits. `vastd cancel R Q` exits 0;
    both end in failed/ with reason `cancelled`; nothing of R runs on the instance any
    more; Q was never dispatched. Unknown and finished names exit 1, one line each."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = gated(cloud, tmp_path, root)
    run_src = make_job(tmp_path / "a", "cancel_running_job", rows=2, seed=71)
    queue_src = make_job(tmp_path / "b", "cancel_queued_job", rows=2, seed=72)
    running, queued = run_src.stem, queue_src.stem
    drop_into_inbox(root, run_src)
    proc = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_started", 30, job=running)
    drop_into_inbox(root, queue_src)
    await proc.wait_until(
        lambda: (root / "queued" / queue_src.name).exists(), 20, "second job queued"
    )
    await proc.wait_until(lambda: gate_processes(cloud), 10, "the gated run on the instance")

    done = await avastd(cfg, "cancel", running, queued)
    assert done.returncode == 0, done.stderr
    assert f"{running}: cancelled" in done.stdout and f"{queued}: cancelled" in done.stdout
    await proc.wait_event("job_cancelled", 10, job=running)
    await proc.wait_event("job_cancelled", 10, job=queued)
    await proc.wait_event("remote_cleanup_done", 30, job=running)
    await proc.wait_until(lambda: not gate_processes(cloud), 10, "no process of the run left")

    for src in (run_src, queue_src):
        assert (root / "failed" / src.name).read_bytes() == src.read_bytes()
        assert error_reason(root, src.stem) == "cancelled"
        assert not (root / "queued" / src.name).exists()
        assert not (root / "running" / src.name).exists()
    assert not proc.find("job_dispatched", job=queued)
    assert not (cloud.remote_root / str(cloud.instance_ids[0]) / "jobs" / running).exists()

    # Already finished, and unknown: exit 1 (one name not found), a line for each,
    # nothing changed; an already finished job alone is found: exit 0.
    again = await avastd(cfg, "cancel", running, "no_such_job")
    assert again.returncode == 1
    assert f"{running}: already finished (failed)" in again.stdout
    assert "no_such_job: no such job" in again.stderr
    finished = await avastd(cfg, "cancel", running)
    assert finished.returncode == 0, finished.stderr
    assert f"{running}: already finished (failed): nothing to cancel" in finished.stdout

    assert await proc.stop() == 0
    assert final_record(root, running)["state"] == "failed"
    assert not (root / "control.sock").exists(), "the socket is removed at shutdown"


# --- retry ------------------------------------------------------------------------------------
async def test_retry_runs_a_cancelled_job_to_done_and_clears_failed(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A cancelled (failed) job retried is queued again with attempts 0 and ends done with
    valid results; failed/ no longer holds its CSV or .error.json. A second retry of it
    (now done), and a name never seen, exit 1."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = gated(cloud, tmp_path, root)
    src = make_job(tmp_path / "a", "retried_job", rows=2, seed=81)
    job = src.stem
    drop_into_inbox(root, src)
    proc = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_started", 30, job=job)
    assert (await avastd(cfg, "cancel", job)).returncode == 0
    await proc.wait_event("remote_cleanup_done", 30, job=job)
    assert error_reason(root, job) == "cancelled"

    open_gate(cloud, cloud.instance_ids[0])
    retried = await avastd(cfg, "retry", job)
    assert retried.returncode == 0, retried.stderr
    assert f"{job}: queued again" in retried.stdout
    await proc.wait_event("job_retried", 10, job=job)
    await proc.wait_event("job_done", 60, job=job)

    assert sorted(p.name for p in (root / "failed").iterdir()) == []
    assert (root / "done" / src.name).read_bytes() == src.read_bytes()
    check_results_for(root / "results" / job, src)

    bad = await avastd(cfg, "retry", job, "never_submitted")
    assert bad.returncode == 1
    assert f"{job}: is done, not failed" in bad.stderr
    assert "never_submitted: no such job" in bad.stderr
    assert await proc.stop() == 0
    record = final_record(root, job)
    assert record["state"] == "done" and record["attempts"] == 0


async def test_retry_of_a_job_failed_for_good_in_history(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A job that failed for good (its record retired to history.jsonl by a restart) is
    retried by name: it runs again (and, its input still bad, fails again, attempts
    counted from 0), and its first failure's files are replaced by the new ones."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root, job={"max_attempts": 1}))
    good = make_job(tmp_path / "b", "history_failed_job", rows=2, seed=82)
    bad = tmp_path / "a" / good.name
    bad.parent.mkdir(parents=True)
    lines = good.read_text().splitlines()
    bad.write_text("\n".join([lines[0], *("1.5," + r.split(",", 1)[1] for r in lines[1:])]) + "\n")
    job = good.stem
    drop_into_inbox(root, bad)
    first = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon1.log")
    await first.wait_event("job_failed", 30, job=job)
    assert await first.stop() == 0
    second = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon2.log")
    await second.wait_until(
        lambda: job not in read_state(root)["jobs"], 20, "the failed record retired to history"
    )
    retried = await avastd(cfg, "retry", job)
    assert retried.returncode == 0, retried.stderr
    await second.wait_event("job_dispatched", 30, job=job)
    await second.wait_event("job_failed", 30, job=job)
    assert await second.stop() == 0
    assert sorted(p.name for p in (root / "failed").iterdir()) == [
        f"{job}.csv",
        f"{job}.error.json",
    ]
    assert final_record(root, job)["attempts"] == 1


# --- drain ------------------------------------------------------------------------------------
async def test_drain_stops_new_dispatch_and_undrain_resumes_it(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A drained instance lets its running job finish and takes no new one; undrained it
    does. An unknown instance exits 1."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = gated(cloud, tmp_path, root)
    inst = str(cloud.instance_ids[0])
    first_src = make_job(tmp_path / "a", "drain_first_job", rows=2, seed=91)
    second_src = make_job(tmp_path / "b", "drain_second_job", rows=2, seed=92)
    drop_into_inbox(root, first_src)
    proc = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_started", 30, job=first_src.stem)

    drained = await avastd(cfg, "drain", inst)
    assert drained.returncode == 0, drained.stderr
    await proc.wait_event("instance_drained", 10, instance=inst)
    drop_into_inbox(root, second_src)
    open_gate(cloud, inst)
    await proc.wait_event("job_done", 60, job=first_src.stem)
    await asyncio.sleep(3)  # several dispatch rounds with a free slot on the drained instance
    assert not proc.find("job_dispatched", job=second_src.stem)
    assert read_state(root)["instances"][inst]["status"] == "draining"
    assert (root / "queued" / second_src.name).exists()

    assert (await avastd(cfg, "undrain", inst)).returncode == 0
    await proc.wait_event("job_done", 60, job=second_src.stem)
    check_results_for(root / "results" / second_src.stem, second_src)

    unknown = await avastd(cfg, "drain", "999999")
    assert unknown.returncode == 1 and "999999: no such instance" in unknown.stderr
    assert (await avastd(cfg, "undrain", inst)).returncode == 1  # not drained
    assert await proc.stop() == 0


# --- no daemon ----------------------------------------------------------------------------------
async def test_commands_without_a_daemon_exit_1_and_change_nothing(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """After a SIGKILL (a stale control.sock left behind) and after a clean stop, every
    command says no daemon runs, exits 1, and no file moves; a restarted daemon replaces
    the stale socket and answers."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root, job={"max_attempts": 1}))
    src = make_job(tmp_path / "a", "no_daemon_job", rows=2, seed=93)
    lines = src.read_text().splitlines()
    src.write_text("\n".join([lines[0], *("1.5," + r.split(",", 1)[1] for r in lines[1:])]) + "\n")
    drop_into_inbox(root, src)
    proc = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon1.log")
    await proc.wait_event("job_failed", 30, job=src.stem)
    proc.kill()
    assert (root / "control.sock").exists(), "a killed daemon leaves its socket"

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".vastd.lock"
        }

    before = snapshot()
    for args in (
        ("retry", src.stem),
        ("cancel", src.stem),
        ("drain", str(cloud.instance_ids[0])),
        ("undrain", str(cloud.instance_ids[0])),
    ):
        out = await avastd(cfg, *args)
        assert out.returncode == 1, (args, out)
        assert f"no daemon is running for {root}" in out.stderr, out.stderr
    assert snapshot() == before

    second = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon2.log")
    assert ask(root, b'{"command": "ping"}\n')["ok"] is True
    assert await second.stop() == 0
    out = await avastd(cfg, "retry", src.stem)
    assert out.returncode == 1 and "no daemon is running" in out.stderr
    assert (root / "failed" / src.name).exists()


# --- the socket under bad requests -------------------------------------------------------------
async def test_malformed_requests_are_answered_and_the_daemon_carries_on(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """Garbage, a JSON list, an unknown command, missing fields, an over-long line, and a
    client that connects and says nothing while another is served: each gets a one-line
    error (or is simply not waited on), each is logged, and the daemon goes on running
    jobs. The socket is mode 0660."""
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root))
    proc = await started_daemon(daemon, cloud, cfg, tmp_path / "daemon.log")
    assert (root / "control.sock").stat().st_mode & 0o777 == 0o660

    hanging = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hanging.connect(str(root / "control.sock"))
    hanging.sendall(b'{"command": "ca')  # and never the rest
    try:
        for raw, words in (
            (b"this is not json\n", "not a JSON request"),
            (b"[1, 2]\n", "a JSON object"),
            (b'{"command": "explode"}\n', "unknown command"),
            (b'{"command": "cancel"}\n', "'jobs' must be"),
            (b'{"command": "cancel", "jobs": [3]}\n', "'jobs' must be"),
            (b'{"command": "drain", "instance": null}\n', "'instance' must be"),
            (b'{"command": "retry", "jobs": ["' + b"x" * 100_000 + b'"]}\n', "longer than"),
        ):
            started = time.monotonic()
            answer = await asyncio.to_thread(ask, root, raw)
            assert answer["ok"] is False and words in answer["error"], (raw[:40], answer)
            assert time.monotonic() - started < 5, "served while another client hangs"
        answer = await asyncio.to_thread(ask, root, b'{"command": "ping"}\n')
        assert answer["ok"] is True
        # The hanging client is answered once its time is up, and let go.
        hanging.settimeout(20)
        line = hanging.recv(65536)
        assert b"no request within" in line
    finally:
        hanging.close()
    assert len(proc.find("control_request_refused")) >= 7

    src = make_job(tmp_path / "a", "after_garbage_job", rows=2, seed=94)
    drop_into_inbox(root, src)
    await proc.wait_event("job_done", 60, job=src.stem)
    assert await proc.stop() == 0
