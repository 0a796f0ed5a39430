"""A real OpenSSH sshd on 127.0.0.1 for the `sshd` test tier.

Needs root, /usr/sbin/sshd and the user `vastdtest` (scripts/ensure-test-sshd.sh sets
them up). Logins are as `vastdtest` (login shell /bin/sh) with public keys only.
Everything the server and the test user touch lives in a world-traversable temp
folder outside pytest's (mode 700) tmp tree; `remote_root` in it belongs to vastdtest.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import asyncssh

SSHD = Path("/usr/sbin/sshd")
TEST_USER = "vastdtest"
# A python the test user can run (the machine's default one lives under /root, mode 700).
TEST_PYTHON = "/opt/vastd-test/venv/bin/python"
_START_TIMEOUT_S = 10.0


def unavailable_reason() -> str | None:
    """Why the OpenSSH tier cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "OpenSSH tests need root (sshd must switch to the test user)"
    if not SSHD.exists():
        return f"{SSHD} missing: run `sudo bash scripts/ensure-test-sshd.sh`"
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        return f"user {TEST_USER} missing: run `sudo bash scripts/ensure-test-sshd.sh`"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OpenSSHServer:
    """`sshd -D -e` with a generated config and host key; start/stop/kill/restart."""

    def __init__(self, authorized_keys: list[str], *, max_sessions: int = 10) -> None:
        self.user = TEST_USER
        self.host = "127.0.0.1"
        self.port = free_port()
        self.max_sessions = max_sessions
        self.dir = Path(tempfile.mkdtemp(prefix="vastd-sshd-"))
        self.dir.chmod(0o755)
        self.remote_root = self.dir / "remote"
        self.remote_root.mkdir()
        pw = pwd.getpwnam(TEST_USER)
        os.chown(self.remote_root, pw.pw_uid, pw.pw_gid)
        self.authorized_keys_file = self.dir / "authorized_keys"
        self.set_authorized_keys(authorized_keys)
        self.host_key_file = self.dir / "ssh_host_ed25519_key"
        self.new_host_key()
        self.config_file = self.dir / "sshd_config"
        self.log_file = self.dir / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def host_key_line(self) -> str:
        return asyncssh.read_public_key(self.host_key_file).export_public_key().decode().strip()

    def set_authorized_keys(self, keys: list[str]) -> None:
        self.authorized_keys_file.write_text("".join(k.strip() + "\n" for k in keys))
        self.authorized_keys_file.chmod(0o644)

    def new_host_key(self) -> None:
        """Generate a new host key (takes effect at the next start)."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(self.host_key_file)
        key.write_public_key(self.host_key_file.with_suffix(".pub"))
        self.host_key_file.chmod(0o600)

    def _write_config(self) -> None:
        self.config_file.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self.host_key_file}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys_file}\n"
            f"AllowUsers {TEST_USER}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            f"MaxSessions {self.max_sessions}\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel ERROR\n"
        )

    def start(self) -> tuple[str, int]:
        if self._proc is not None and self._proc.poll() is None:
            return self.address
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        self._write_config()
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_file.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(self.address, 0.5):
                return self.address
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"sshd not listening on {self.port} after {_START_TIMEOUT_S}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM the listener and wait. Sessions already open may outlive it (sshd
        forks each connection into its own session): drop client connections first."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """The listener dies abruptly (SIGKILL). For a host whose open connections
        die too, use the in-process SimHost.kill()."""
        self._signal(signal.SIGKILL)

    def restart(self, *, new_host_key: bool = False) -> tuple[str, int]:
        self.stop()
        if new_host_key:
            self.new_host_key()
        return self.start()

    def _signal(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
