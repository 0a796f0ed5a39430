"""`vastd run` as a real process against the simulator: jobs end in done/ with results, every
stdout line is JSON, signals stop it cleanly, remote jobs survive a restart, systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    async_wait_for,
    clean_env,
    dump_toml,
    full_pipe,
    read_to_eof,
    saved_jobs,
    write_private_key,
)
from vastd import __version__
from vastd.core.state import JobRecord, load_state
from vastd.daemon import status_line
from vastd.sim.cluster import SimCluster, load_make_jobs

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


async def spawn_vastd_run(
    config: Path, env: dict[str, str] | None = None, **stdio: Any
) -> asyncio.subprocess.Process:
    """`python -m vastd run --config PATH` in the repository, its stdio as given."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vastd",
        "run",
        "--config",
        str(config),
        env=clean_env(env),
        cwd=REPO,
        **stdio,
    )


class DaemonProcess:
    """`python -m vastd run --config PATH` with its stdout parsed line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[bytes] = []
        self.records: list[dict[str, Any]] = []
        self.stderr = b""
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_stdout(proc.stdout)),
            asyncio.create_task(self._read_stderr(proc.stderr)),
        ]

    @classmethod
    async def start(cls, config: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        return cls(
            await spawn_vastd_run(
                config,
                env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=1 << 22,
            )
        )

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self.records.append(record)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        self.stderr = await stream.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r.get("event") == name and all(r.get(k) == v for k, v in fields.items())
        ]

    def names(self) -> set[str]:
        return {str(r.get("event")) for r in self.records}

    async def wait_event(
        self, name: str, timeout_s: float = START_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """The first `name` event with these fields; fails early if the daemon exits."""

        def seen() -> dict[str, Any] | None:
            found = self.events(name, **fields)
            if found:
                return found[0]
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {name}: {self.tail()}"
                )
            return None

        return await async_wait_for(seen, timeout_s, message=lambda: f"{name}: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        out = b"".join(self.lines[-n:]).decode(errors="replace")
        return f"\nstdout tail:\n{out}\nstderr:\n{self.stderr.decode(errors='replace')}"

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        self.proc.send_signal(sig)
        return await self.wait_exit(timeout_s)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SimCluster]]]:
    """Factory: `await cluster(instances=N)` -> a started SimCluster, closed at teardown."""
    made: list[SimCluster] = []

    async def make(instances: int = 0) -> SimCluster:
        sim = await SimCluster.start(tmp_path / f"sim{len(made)}", instances=instances)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        await sim.aclose()


@pytest.fixture
async def daemons() -> AsyncIterator[Callable[..., Awaitable[DaemonProcess]]]:
    """Factory: `await daemons(config, env)` -> a started DaemonProcess, killed at teardown."""
    started: list[DaemonProcess] = []

    async def make(config: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = await DaemonProcess.start(config, env)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.proc.pid, signal.SIGCONT)  # one a test SIGSTOPped
        await daemon.kill()


def write_config(sim: SimCluster, tmp_path: Path, **sections: dict[str, Any]) -> tuple[Path, Path]:
    """config.toml for `sim` (the API key in a 0600 file outside the root); returns (config, root)."""
    root = tmp_path / "root"
    settings = sim.settings(root, **sections)
    data = settings.model_dump(mode="json", by_alias=True, exclude={"vast": {"api_key"}})
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    key_file = secrets / "vast_api_key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(sim.api_key + "\n")
    data["vast"]["api_key_file"] = str(key_file)
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(data), encoding="utf-8")
    return config, root


async def submit(config: Path, files: list[Path]) -> None:
    """`vastd submit FILE... --config PATH` as its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vastd",
        "submit",
        *map(str, files),
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )
    async with asyncio.timeout(30):
        _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


def files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def process_lists_containing(needle: bytes) -> list[int]:
    """Pids whose command line holds `needle` (what `ps` would show)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


CONTRACT_EVENTS = {
    "daemon_started",
    "job_accepted",
    "job_dispatched",
    "job_started",
    "job_exited",
    "results_collected",
    "job_done",
    "instance_discovered",
    "instance_prepared",
    "loop_lag",
    "daemon_stopped",
}


async def test_daemon_runs_jobs_to_done_and_stops_on_sigterm(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """Four submitted jobs on two instances end in done/ with parquet results; stdout is JSON
    lines with the contract's events; SIGTERM stops it with exit 0; the API key is nowhere."""
    sim = await cluster(instances=2)
    config, root = write_config(sim, tmp_path)
    daemon = await daemons(config)
    started = await daemon.wait_event("daemon_started")
    # `vastd run` takes what start-up made out of the collector's full passes.
    assert started["gc_frozen"] > 10_000, started
    sources = load_make_jobs()(tmp_path / "jobs", 4, 3, 11, prefix="garch_test_job")
    jobs = [p.stem for p in sources]
    await submit(config, sources)

    key = sim.api_key.encode()
    await daemon.wait_event("job_started")
    assert process_lists_containing(key) == []

    def all_done() -> bool:
        return all(
            (root / "done" / f"{job}.csv").is_file()
            and any((root / "results" / job).glob("*.parquet"))
            for job in jobs
        )

    await async_wait_for(all_done, 60, message=daemon.tail)
    for job in jobs:
        await daemon.wait_event("job_done", job=job)
    assert sorted(p.name for p in (root / "done").iterdir()) == sorted(p.name for p in sources)
    assert list((root / "failed").iterdir()) == []

    assert await daemon.stop(signal.SIGTERM) == 0
    assert daemon.events("daemon_stopped")
    # the loop-lag monitor reports once at shutdown, before daemon_stopped
    final_lag = [e for e in daemon.events("loop_lag") if e["final"]]
    assert len(final_lag) == 1, daemon.tail()
    assert final_lag[0]["samples"] > 0
    assert 0 <= final_lag[0]["p50_ms"] <= final_lag[0]["p99_ms"] <= final_lag[0]["max_ms"]
    names = [r["event"] for r in daemon.records]
    assert names.index("loop_lag") < names.index("daemon_stopped")
    for line in daemon.lines:
        record = json.loads(line)
        assert {"timestamp", "level", "event"} <= set(record), line
        assert datetime.fromisoformat(record["timestamp"]).utcoffset() == timedelta(0)
    assert sorted(CONTRACT_EVENTS - daemon.names()) == []
    # The snapshot's writes: at the default level the first, then one a minute at most.
    saved = daemon.events("state_saved")
    assert 1 <= len(saved) <= 2, saved
    assert saved[0]["writes"] == 1 and saved[0]["bytes"] > 0
    assert all(r["level"] != "error" for r in daemon.records), daemon.tail()
    [started] = daemon.events("daemon_started")
    assert started["version"] == __version__ and started["config"] == str(config)
    for done in daemon.events("job_done"):
        assert done["attempts"] == 0 and done["runs"] == 1, done
        assert done["duration_s"] >= done["run_s"] > 0, done
        assert isinstance(done["cost"], float) and done["cost"] > 0, done
    assert {e["job"] for e in daemon.events("job_accepted")} == set(jobs)
    assert {e["instance"] for e in daemon.events("instance_prepared")} <= {
        str(i) for i in sim.cloud.instances
    }

    assert {j["state"] for j in saved_jobs(root).values()} == {"done"}
    assert b"Traceback" not in daemon.stderr
    assert key not in b"".join(daemon.lines) + daemon.stderr
    assert files_containing(root, key) == []
    assert files_containing(sim.remote_root, key) == []


async def test_sigterm_leaves_remote_job_running_and_restart_adopts_it(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """SIGTERM while a job runs: exit 0 at once, the remote process group lives on; a restarted
    daemon takes the same job on the same instance (same pgid, runs == 1, never started
    twice) and brings it to done once the remote process ends."""
    sim = await cluster(instances=1)
    # The job waits for a file the test creates: it ends exactly when the test says so.
    config, root = write_config(
        sim,
        tmp_path,
        job={
            "command": "while [ ! -e release ]; do sleep 0.1; done; echo ok > result.txt",
            "result_glob": "result.txt",
            "validate": "none",
        },
    )
    job = "long_job_0001"
    src = tmp_path / "jobs" / f"{job}.csv"
    src.parent.mkdir()
    src.write_text("a,b\n1,2\n")
    first = await daemons(config)
    await first.wait_event("daemon_started")
    await submit(config, [src])
    started = await first.wait_event("job_started", job=job)
    instance = str(started["instance"])
    job_dir = sim.remote_root / instance / "jobs" / job
    pgid = int((job_dir / "pid").read_text())
    try:
        assert started["pgid"] == pgid
        assert await first.stop(signal.SIGTERM) == 0
        assert first.events("daemon_stopped")
        assert pgid_alive(pgid)
        saved = load_state(root / "state.json").jobs[job]
        assert (saved.state.value, saved.instance, saved.pgid, saved.runs) == (
            "running",
            instance,
            pgid,
            1,
        )

        second = await daemons(config)
        await second.wait_event("daemon_started")
        await second.wait_event("instance_ready", instance=instance)
        (job_dir / "release").touch()
        await async_wait_for(
            lambda: (
                (root / "done" / f"{job}.csv").is_file()
                and (root / "results" / job / "result.txt").is_file()
            ),
            30,
            message=second.tail,
        )
        await second.wait_event("job_done", job=job)
        assert await second.stop(signal.SIGTERM) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    final = JobRecord.model_validate(saved_jobs(root)[job])
    assert (final.state.value, final.instance, final.pgid, final.runs) == (
        "done",
        instance,
        pgid,
        1,
    )
    assert not second.events("job_started", job=job, new=True)
    assert (root / "results" / job / "result.txt").read_text() == "ok\n"


async def test_notify_socket_gets_ready_and_stopping(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """With $NOTIFY_SOCKET set, the daemon sends READY=1 once started and STOPPING=1 on SIGTERM."""
    sim = await cluster(instances=0)
    config, root = write_config(sim, tmp_path)
    address = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def receive_until(text: str) -> None:
        async with asyncio.timeout(START_TIMEOUT_S):
            while text not in messages:
                data = await loop.sock_recv(sock, 4096)
                messages.extend(data.decode().splitlines())

    try:
        daemon = await daemons(config, {"NOTIFY_SOCKET": str(address)})
        await receive_until("READY=1")
        assert (root / "state.json").is_file()  # READY only once the state is loaded and saved
        await daemon.wait_event("daemon_started")
        daemon.proc.send_signal(signal.SIGTERM)
        await receive_until("STOPPING=1")
        assert await daemon.wait_exit() == 0
    finally:
        sock.close()
    assert messages.index("READY=1") < messages.index("STOPPING=1")


async def test_second_sigint_forces_exit(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """A second SIGINT, sent once the first one is being handled, ends the process at once
    (130 or killed by SIGINT) unless the graceful stop already finished (0); either way the
    process is gone within the deadline and prints no traceback."""
    sim = await cluster(instances=0)
    config, _root = write_config(sim, tmp_path)
    daemon = await daemons(config)
    await daemon.wait_event("daemon_started")
    daemon.proc.send_signal(signal.SIGINT)
    await daemon.wait_event("daemon_stopping", signal="SIGINT")
    with contextlib.suppress(ProcessLookupError):
        daemon.proc.send_signal(signal.SIGINT)
    code = await daemon.wait_exit()
    # -SIGINT: the second signal landed in the interpreter's last moments (handlers reset).
    assert code in (0, 130, -signal.SIGINT), f"exit {code}: {daemon.tail()}"
    if code == 0:
        assert daemon.events("daemon_stopped")
    else:  # forced during the graceful stop, or while the interpreter wound down after it
        assert daemon.events("daemon_forced_exit") or daemon.events("daemon_stopped")
    assert b"Traceback" not in daemon.stderr, daemon.tail()


async def test_a_stdout_nobody_reads_does_not_stop_the_daemon(
    tmp_path: Path, cluster: Callable[..., Awaitable[SimCluster]]
) -> None:
    """With its stdout a full pipe that nobody reads, the daemon still runs every job to
    done/ (its log lines wait in the writer's queue), and once the pipe is read every
    line comes out, in order, up to daemon_stopped."""
    sim = await cluster(instances=2)
    config, root = write_config(sim, tmp_path)
    r, w = full_pipe()
    stderr = (tmp_path / "daemon.stderr").open("wb")
    proc = await spawn_vastd_run(config, stdout=w, stderr=stderr)
    os.close(w)
    stderr.close()
    reader: asyncio.Future[bytes] | None = None
    try:
        sources = load_make_jobs()(tmp_path / "jobs", 4, 3, 11, prefix="garch_test_job")
        await submit(config, sources)

        def all_done() -> bool:
            return all((root / "done" / p.name).is_file() for p in sources)

        await async_wait_for(all_done, 60, message=lambda: (tmp_path / "daemon.stderr").read_text())
        reader = asyncio.get_running_loop().run_in_executor(None, read_to_eof, r)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            assert await proc.wait() == 0
            out = await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader
        os.close(r)
    lines = [line for line in out.splitlines() if line != b"filler"]
    records = [json.loads(line) for line in lines]
    names = [rec["event"] for rec in records]
    assert "log_records_dropped" not in names
    assert names[-1] == "daemon_stopped", names[-5:]
    assert names.index("daemon_started") < names.index("job_accepted")
    assert {rec["job"] for rec in records if rec["event"] == "job_done"} == {
        p.stem for p in sources
    }
    assert b"Traceback" not in (tmp_path / "daemon.stderr").read_bytes()


def test_second_daemon_on_the_same_root_is_refused(tmp_path: Path) -> None:
    """Two daemons on one root would move the same files: the second exits 1 and says so,
    and `vastd status` reports the first as running."""
    from vastd.core.lock import RootLock, RootLocked, root_locked

    root = tmp_path / "root"
    root.mkdir()
    assert root_locked(root) is False
    first = RootLock(root)
    first.acquire()
    try:
        assert root_locked(root) is True
        with pytest.raises(RootLocked, match=str(os.getpid())):
            RootLock(root).acquire()
        config = tmp_path / "c.toml"
        key = tmp_path / "id_ed25519"  # `vastd run` refuses to start without a readable SSH key
        write_private_key(key)
        config.write_text(f'[paths]\nroot = "{root}"\n[ssh]\nkey_file = "{key}"\n')
        env = {**clean_env(), "VASTD_VAST__API_KEY": "k"}
        proc = subprocess.run(
            [sys.executable, "-m", "vastd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "already runs" in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr
    finally:
        first.release()
    assert root_locked(root) is False


def test_status_line_says_why_dispatch_is_paused() -> None:
    """A snapshot that cannot be written pauses dispatch (write-ahead); systemd's status
    line says so, with the reason, and says nothing of it once saves work again."""
    counts = {"queued": 2, "running": 1, "collecting": 0, "done": 5, "failed": 0}
    ok = status_line(counts, None)
    assert ok == "STATUS=queued 2 running 1 done 5 failed 0"
    full = status_line(counts, "cannot write state.json: [Errno 28] No space left on device")
    assert full.startswith(ok) and "dispatch paused" in full and "No space left" in full
