"""Simulated instances: in-process asyncssh servers on 127.0.0.1 that run commands for real.

Each `SimHost` runs every requested command with `/bin/sh -c` in its `root` folder
(no login shell, no MaxSessions, no slow slot release: the OpenSSH test tier covers
those) and serves SFTP on the real file system, relative paths under `root`.
Detached jobs (`setsid nohup ... &` with redirected fds) outlive the SSH session and
even the SSH server, as on a real instance. `kill()`/`revive()` inject an SSH server
that dies abruptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from vastd.core.ssh import skip_automatic_ignores
from vastd.utils.logging import get_logger

log = get_logger("vastd.sim.hosts")

_CLOSE_TIMEOUT_S = 2.0
_CHUNK = 65536


class HostProvider(Protocol):
    async def start_host(self, instance_id: int, authorized_keys: list[str]) -> tuple[str, int]: ...

    async def stop_host(self, instance_id: int) -> None: ...


def _authorized(keys: list[str]) -> asyncssh.SSHAuthorizedKeys:
    lines = [k.strip() for k in keys if k.strip()]
    if not lines:
        # No key works (a revoked one): the login is refused, as sshd refuses it.
        return asyncssh.SSHAuthorizedKeys()
    return asyncssh.import_authorized_keys("\n".join(lines) + "\n")


class _Server(asyncssh.SSHServer):
    def __init__(self, host: SimHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        # as OpenSSH: no SSH_MSG_IGNORE before each packet (vastd's client sends none)
        skip_automatic_ignores(conn)
        self._conn = conn
        self._host._conns.add(conn)
        self._host.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        # Read the keys per connection so set_authorized_keys applies to the next login.
        assert self._conn is not None
        self._conn.set_authorized_keys(_authorized(self._host.authorized_keys))
        return True


class _SFTPServer(asyncssh.SFTPServer):
    """Plain file-system SFTP whose relative paths start at the host's root."""

    root = b"/"

    def map_path(self, path: bytes) -> bytes:
        return path if path.startswith(b"/") else os.path.join(self.root, path)


class SimHost:
    """One simulated instance: an SSH server plus a `root` folder commands start in."""

    def __init__(
        self,
        instance_id: str,
        root: Path,
        authorized_keys: list[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        login_banner: str = "",
    ) -> None:
        self.instance_id = instance_id
        self.root = root
        self.authorized_keys = list(authorized_keys)
        self.host = host
        self.port = port
        # Printed on stdout before every command, like a chatty login shell.
        self.login_banner = login_banner
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.connections_total = 0
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._procs: set[asyncio.subprocess.Process] = set()
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def host_key_line(self) -> str:
        """The host's public key as an OpenSSH line (what TOFU pins)."""
        return self.host_key.export_public_key().decode().strip()

    def set_authorized_keys(self, keys: list[str]) -> None:
        """Replace the authorized keys; applies to connections opened from now on."""
        self.authorized_keys = list(keys)

    def new_host_key(self) -> None:
        """Generate a new host key (takes effect at the next start)."""
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")

    async def start(self) -> tuple[str, int]:
        if self._server is not None:
            return self.address
        self.root.mkdir(parents=True, exist_ok=True)
        sftp_cls = type("_RootedSFTP", (_SFTPServer,), {"root": os.fsencode(self.root)})
        self._server = await asyncssh.listen(
            host=self.host,
            port=self.port,
            reuse_address=True,
            server_host_keys=[self.host_key],
            server_factory=lambda: _Server(self),
            process_factory=self._handle,
            sftp_factory=sftp_cls,
            encoding=None,
            allow_scp=False,
            x11_forwarding=False,
            agent_forwarding=False,
            keepalive_interval=0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("sim_host_started", instance=self.instance_id, port=self.port)
        return self.address

    async def stop(self) -> None:
        """Close the listener and every connection (politely, bounded)."""
        self._close_listener()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await asyncio.gather(*(c.wait_closed() for c in conns))
        for conn in conns:
            conn.abort()
        self._conns.clear()
        await self._kill_foreground()

    async def kill(self) -> None:
        """The SSH server dies abruptly: no listener, connections aborted.

        Detached jobs keep running (as on a real instance whose sshd died).
        """
        self._close_listener()
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()  # connection_lost only comes at the next loop turn
        await self._kill_foreground()

    async def restart(self) -> tuple[str, int]:
        """Start again on the same port (after `stop()` or `kill()`)."""
        await self.stop()
        return await self.start()

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _kill_foreground(self) -> None:
        """Kill the commands still attached to a channel and reap them (bounded), so no
        subprocess transport outlives the loop that made it."""
        procs = list(self._procs)
        for proc in procs:
            _killpg(proc)
        waits = [asyncio.ensure_future(proc.wait()) for proc in procs]
        if waits:
            await asyncio.wait(waits, timeout=_CLOSE_TIMEOUT_S)
            for wait in waits:
                wait.cancel()

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        if command is None:
            process.stderr.write(b"interactive shells are not supported\n")
            process.exit(1)
            return
        if self.login_banner:
            process.stdout.write(self.login_banner.encode())
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            cwd=self.root,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own group: killable as a whole
        )
        self._procs.add(proc)
        feed = asyncio.create_task(self._feed(process, proc))
        closed: asyncio.Future[Any] = asyncio.create_task(process.wait_closed())
        work: asyncio.Future[Any] = asyncio.gather(
            self._pump(proc.stdout, process.stdout),
            self._pump(proc.stderr, process.stderr),
            proc.wait(),
        )
        try:
            await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                _killpg(proc)  # the client went away: like a hang-up
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                        await proc.wait()
                work.cancel()
            else:
                with contextlib.suppress(OSError, asyncssh.Error):
                    rc = proc.returncode if proc.returncode is not None else 255
                    process.exit(rc if rc >= 0 else 128 - rc)
        finally:
            self._procs.discard(proc)
            for task in (feed, closed, work):
                task.cancel()
            await asyncio.gather(feed, closed, work, return_exceptions=True)

    @staticmethod
    async def _feed(
        process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
    ) -> None:
        assert proc.stdin is not None
        with contextlib.suppress(OSError, asyncssh.Error):
            while True:
                try:
                    data = await process.stdin.read(_CHUNK)
                except asyncssh.SignalReceived as exc:
                    # The client's "signal" request, as sshd honours it.
                    sig = getattr(signal, f"SIG{exc.signal}", None)
                    if sig is not None and proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, sig)
                    continue
                if not data:
                    break
                proc.stdin.write(data)
                await proc.stdin.drain()
        with contextlib.suppress(OSError):
            proc.stdin.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader | None, sink: asyncssh.SSHWriter[bytes]) -> None:
        assert source is not None
        while data := await source.read(_CHUNK):
            with contextlib.suppress(OSError, asyncssh.Error):
                sink.write(data)
                await sink.drain()


def _killpg(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class LocalHostProvider:
    """Starts a SimHost per simulated instance, each with a folder under `base_dir`.

    With `shared_servers=N`, instances share N SSH servers instead (instance k of this
    provider gets server k % N), as many instances sharing a few machines: vastd keeps
    each instance's files under `<remote root>/<instance id>/`, so they do not collide.
    A shared server stops only once every instance on it has stopped; `kill_host` and
    `revive_host` act on the whole server (every instance on it).
    """

    def __init__(self, base_dir: Path, *, login_banner: str = "", shared_servers: int = 0) -> None:
        self.base_dir = base_dir
        self.login_banner = login_banner
        self.shared_servers = shared_servers
        self.hosts: dict[int, SimHost] = {}
        self._servers: list[SimHost] = []
        self._started: dict[int, SimHost] = {}  # instance -> its (shared) server, while up

    def get(self, instance_id: int) -> SimHost:
        return self.hosts[instance_id]

    @property
    def servers(self) -> list[SimHost]:
        """The distinct SSH servers (one per instance unless shared)."""
        return list({id(h): h for h in self.hosts.values()}.values())

    def _new_host(self, instance_id: int, authorized_keys: list[str]) -> SimHost:
        if not self.shared_servers:
            name = str(instance_id)
        elif len(self._servers) < self.shared_servers:
            name = f"shared-{len(self._servers)}"
        else:
            return self._servers[len(self.hosts) % self.shared_servers]
        host = SimHost(name, self.base_dir / name, authorized_keys, login_banner=self.login_banner)
        if self.shared_servers:
            self._servers.append(host)
        return host

    async def start_host(self, instance_id: int, authorized_keys: list[str]) -> tuple[str, int]:
        host = self.hosts.get(instance_id)
        if host is None:
            host = self._new_host(instance_id, authorized_keys)
            self.hosts[instance_id] = host
        else:
            host.set_authorized_keys(authorized_keys)
        self._started[instance_id] = host
        return await host.start()

    async def stop_host(self, instance_id: int) -> None:
        host = self._started.pop(instance_id, None) or self.hosts.get(instance_id)
        if host is not None and host not in self._started.values():
            await host.stop()

    async def kill_host(self, instance_id: int) -> None:
        await self.hosts[instance_id].kill()

    async def revive_host(self, instance_id: int) -> tuple[str, int]:
        return await self.hosts[instance_id].start()

    def set_authorized_keys(self, instance_id: int, keys: list[str]) -> None:
        self.hosts[instance_id].set_authorized_keys(keys)

    async def add_authorized_key(self, instance_id: int, key: str) -> None:
        """A key attached through the API to a running instance: valid from the next login."""
        host = self.hosts.get(instance_id)
        if host is not None and key.strip() not in host.authorized_keys:
            host.set_authorized_keys([*host.authorized_keys, key.strip()])

    async def aclose(self) -> None:
        """Stop every host (detached jobs they started are left alone)."""
        await asyncio.gather(*(h.stop() for h in self.servers), return_exceptions=True)
