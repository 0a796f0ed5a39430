"""The simulated vast.ai account with REAL OpenSSH sshd instances, and a daemon to run on it.

`OpenSSHHosts` is a `vastd.sim.api.HostProvider` that backs each simulated instance
with its own `tests.sshd.OpenSSHServer` (one sshd per instance, user `vastdtest`).
`OpenSSHCloud.start()` serves a `SimCloud` over HTTP with N labelled running
instances; `daemon_config()` writes a `vastd run` config pointing at it; `DaemonProcess`
runs `python -m vastd run` as a real subprocess and reads its JSON log lines.

Instances share this machine's file system (the remote layout allows it): the remote root
lives in a world-traversable temp folder outside pytest's mode-700 tree, owned by
vastdtest, next to a copy of the example worker that vastdtest can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.helpers import async_wait_for, clean_env, dump_toml
from tests.sshd import TEST_PYTHON, TEST_USER, OpenSSHServer
from vastd.sim.api import SimCloud, start_sim_api
from vastd.sim.cluster import examples_dir, write_client_key

LABEL = "vastd"


def _chown_to_test_user(path: Path) -> None:
    pw = pwd.getpwnam(TEST_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


class OpenSSHHosts:
    """HostProvider: one real sshd per instance, authorizing the keys it is given."""

    def __init__(self) -> None:
        self.servers: dict[int, OpenSSHServer] = {}

    async def start_host(self, instance_id: int, authorized_keys: list[str]) -> tuple[str, int]:
        server = self.servers.get(instance_id)
        if server is None:
            server = OpenSSHServer(authorized_keys=authorized_keys)
            self.servers[instance_id] = server
        else:
            server.set_authorized_keys(authorized_keys)
        # OpenSSHServer.start() blocks until the port answers: keep the loop free.
        return await asyncio.to_thread(server.start)

    async def stop_host(self, instance_id: int) -> None:
        server = self.servers.get(instance_id)
        if server is not None:
            await asyncio.to_thread(server.stop)

    async def add_authorized_key(self, instance_id: int, key: str) -> None:
        server = self.servers[instance_id]
        keys = server.authorized_keys_file.read_text().splitlines()
        server.set_authorized_keys([*keys, key])

    async def restart_host(self, instance_id: int, *, new_host_key: bool = False) -> None:
        """Restart an instance's sshd on the same port, optionally with a new host key."""
        await asyncio.to_thread(self.servers[instance_id].restart, new_host_key=new_host_key)

    async def aclose(self) -> None:
        for server in self.servers.values():
            await asyncio.to_thread(server.cleanup)
        self.servers.clear()


@dataclass
class OpenSSHCloud:
    """A SimCloud served over HTTP whose instances are real sshd processes."""

    cloud: SimCloud
    hosts: OpenSSHHosts
    runner: web.AppRunner
    url: str
    api_key: str
    key_file: Path
    public_key: str
    world: Path  # world-traversable folder shared by the instances
    instance_ids: list[int] = field(default_factory=list)

    @property
    def remote_root(self) -> Path:
        """`[remote] root` (owned by vastdtest)."""
        return self.world / "remote"

    @property
    def scratch(self) -> Path:
        """A folder vastdtest may write to outside the remote root (counters, canaries)."""
        return self.world / "scratch"

    @property
    def worker(self) -> Path:
        """The example GARCH worker, copied where vastdtest can read it."""
        return self.world / "bin" / "garch_worker.py"

    @classmethod
    async def start(cls, workdir: Path, *, instances: int = 3, label: str = LABEL) -> OpenSSHCloud:
        key_file, public = write_client_key(workdir / "keys")
        world = Path(tempfile.mkdtemp(prefix="vastd-oscluster-"))
        world.chmod(0o755)
        for name in ("remote", "scratch"):
            (world / name).mkdir()
            _chown_to_test_user(world / name)
        (world / "bin").mkdir(mode=0o755)
        shutil.copyfile(examples_dir() / "garch_worker.py", world / "bin" / "garch_worker.py")
        (world / "bin" / "garch_worker.py").chmod(0o644)
        api_key = "sim-" + secrets.token_hex(16)
        hosts = OpenSSHHosts()
        cloud = SimCloud(api_key, host_provider=hosts, account_keys=[public], boot_delay_s=0.2)
        made: OpenSSHCloud | None = None
        try:
            ids = [await cloud.add_instance(label=label) for _ in range(instances)]
            runner, url = await start_sim_api(cloud)
            made = cls(cloud, hosts, runner, url, api_key, key_file, public, world, ids)
        finally:
            if made is None:
                await cloud.aclose()
                await hosts.aclose()
                shutil.rmtree(world, ignore_errors=True)
        return made

    def server(self, instance_id: int) -> OpenSSHServer:
        return self.hosts.servers[instance_id]

    def job_command(self, num_quantiles: int = 64) -> str:
        """The daemon's `[job] command` running the example worker with the test python."""
        worker = shlex.quote(str(self.worker))
        return (
            f"{TEST_PYTHON} {worker} {{input}} --num_sim {{num_sim}} "
            f"--num_quantiles {num_quantiles} --stride 1"
        )

    def config(
        self,
        root: Path,
        *,
        job: dict[str, Any] | None = None,
        prepare: list[dict[str, Any]] | None = None,
        **sections: dict[str, Any],
    ) -> dict[str, Any]:
        """The daemon's settings as plain data: GARCH worker, short polls, TOFU host keys."""
        data: dict[str, Any] = {
            "paths": {"root": str(root)},
            "vast": {
                "api_url": self.url,
                "label": LABEL,
                "poll_interval_s": 1,
                "lost_grace_s": 30,
                "api_key_file": str(root.parent / "no-such-api-key-file"),
            },
            "ssh": {
                "user": TEST_USER,
                "key_file": str(self.key_file),
                "known_hosts": "tofu",
                "connect_timeout_s": 5,
                "keepalive_interval_s": 5,
                "command_timeout_s": 30,
            },
            "remote": {"root": str(self.remote_root)},
            "prepare": [
                {
                    "name": "python with numpy and pyarrow",
                    "check": f"{TEST_PYTHON} -c 'import numpy, pyarrow'",
                    "timeout_s": 60,
                },
                *(prepare or []),
            ],
            "job": {
                "command": self.job_command(),
                "vars": {"num_sim": "200"},
                "poll_interval_s": 1,
                "timeout_s": 300,
                "max_attempts": 2,
                **(job or {}),
            },
            "fleet": {"mode": "adopt", "max_instances": 16},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return data

    def write_config(self, path: Path, data: dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_toml(data))
        return path

    def daemon_env(self) -> dict[str, str]:
        """The environment of a daemon subprocess: the API key, unbuffered stdout."""
        return clean_env({"VASTD_VAST__API_KEY": self.api_key, "PYTHONUNBUFFERED": "1"})

    def job_processes(self) -> list[int]:
        """Pids of vastdtest's processes whose working folder is in this cluster's world."""
        return [pid for pid, _cmd in processes_of_user(TEST_USER, "", self.world)]

    async def aclose(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            await self.cloud.aclose()
            await self.hosts.aclose()
            # Remote jobs a failed test left running are ours (started in our world): end them.
            for pid in self.job_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.world, ignore_errors=True)


def processes_of_user(user: str, needle: str, under: Path | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of `user`'s processes whose command line contains `needle`.

    With `under`, only those whose working folder is (or was, if deleted) below it.
    """
    uid = pwd.getpwnam(user).pw_uid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cmdline = cmdline.strip()
            if needle not in cmdline:
                continue
            if under is not None and not Path(os.readlink(entry / "cwd")).is_relative_to(under):
                continue
            found.append((int(entry.name), cmdline))
    return found


class DaemonProcess:
    """`python -m vastd run --config CFG` as a real subprocess; its JSON logs in a file."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._stdout = log_path.open("ab")
        self._stderr = log_path.with_suffix(".stderr").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vastd", "run", "--config", str(config)],
            stdout=self._stdout,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (a half-written last line is skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def _describe(self) -> str:
        tail = [line[:400] for line in self.log_path.read_text(errors="replace").splitlines()[-15:]]
        err = self.log_path.with_suffix(".stderr").read_text(errors="replace")[-2000:]
        return "daemon log tail:\n" + "\n".join(tail) + "\nstderr:\n" + err

    async def wait_until(
        self, predicate: Callable[[], Any], timeout_s: float, what: str = ""
    ) -> Any:
        """Wait for `predicate()`, failing at once (with the log) if the daemon exits."""

        def check() -> Any:
            value = predicate()
            if not value and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) while waiting for {what}\n"
                    + self._describe()
                )
            return value

        return await async_wait_for(
            check, timeout_s, poll_s=0.1, message=lambda: f"{what}\n{self._describe()}"
        )

    async def wait_event(self, event: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        found = await self.wait_until(
            lambda: self.find(event, **fields), timeout_s, f"event {event} {fields}"
        )
        return found[0]  # type: ignore[no-any-return]

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        await async_wait_for(
            lambda: self.proc.poll() is not None,
            timeout_s,
            poll_s=0.05,
            message=lambda: "daemon did not stop after SIGTERM\n" + self._describe(),
        )
        self._stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stdout.close()
        self._stderr.close()


def submit(config: Path, files: list[Path]) -> None:
    """`vastd submit FILE... --config CFG`, as a user would."""
    subprocess.run(
        [sys.executable, "-m", "vastd", "submit", *map(str, files), "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def drop_into_inbox(root: Path, src: Path) -> None:
    """Write under a dot-name, then rename into the inbox (the other way to submit)."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{src.name}.part"
    tmp.write_bytes(src.read_bytes())
    tmp.rename(inbox / src.name)
