"""A RemoteRunner on this machine: commands through a real `/bin/sh -c`, files copied locally.

The "remote" file system is the local one; tests point the remote root at a tmp folder.
`junk` is printed before every command's output, like a chatty login shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vastd.utils.exceptions import RemoteCommandTimeout, ResultTooLargeError, ResultValidationError


@dataclass(frozen=True)
class LocalResult:
    exit_status: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass
class LocalRunner:
    instance_id: str = "local"
    junk: str = ""
    cwd: Path | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)

    async def run(self, command: str, *, timeout_s: float, input: str | None = None) -> LocalResult:
        self.calls.append(("run", command))
        if self.junk:
            command = f"printf '%s' {_sh_quote(self.junk)}; {command}"
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            cwd=self.cwd,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate(input.encode() if input else None)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise RemoteCommandTimeout(f"command timed out after {timeout_s}s") from None
        return LocalResult(
            proc.returncode,
            out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
        )

    async def makedirs(self, remote_path: str, *, timeout_s: float) -> None:
        self.calls.append(("makedirs", remote_path))
        os.makedirs(remote_path, exist_ok=True)

    async def upload(self, local_path: Path, remote_path: str, *, timeout_s: float) -> None:
        self.calls.append(("upload", remote_path))
        part = remote_path + ".part"
        await asyncio.to_thread(shutil.copyfile, local_path, part)
        await asyncio.to_thread(os.replace, part, remote_path)

    async def download(
        self,
        remote_path: str,
        local_path: Path,
        *,
        timeout_s: float,
        max_bytes: int | None = None,
        size: int | None = None,
    ) -> int:
        self.calls.append(("download", remote_path))
        if size is None:
            st = os.lstat(remote_path)
            if not stat.S_ISREG(st.st_mode):
                raise ResultValidationError(f"{remote_path}: not a regular file")
            size = st.st_size
        if max_bytes is not None and size > max_bytes:
            raise ResultTooLargeError(f"{remote_path}: {size} bytes, more than {max_bytes}")
        part = local_path.with_name(local_path.name + ".part")
        try:
            size = await asyncio.to_thread(_copy_capped, remote_path, part, max_bytes)
            os.replace(part, local_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        return size


def _copy_capped(source: str, target: Path, max_bytes: int | None) -> int:
    """Copy until EOF, failing once past `max_bytes` (as SSHConnection.download does)."""
    copied = 0
    with open(source, "rb") as src, target.open("wb") as dst:
        while block := src.read(1 << 20):
            copied += len(block)
            if max_bytes is not None and copied > max_bytes:
                raise ResultTooLargeError(f"{source}: grew past {max_bytes} bytes")
            dst.write(block)
    return copied


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


async def wait_until(cond: Callable[[], bool], *, timeout_s: float = 20, what: str = "") -> None:
    """Poll `cond` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def group_gone(pgid: int) -> bool:
    """True once no process (zombies included) is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def kill_leftover_jobs(root: Path) -> None:
    """SIGKILL the groups of jobs started under `root` (never a group whose leader runs elsewhere)."""
    for pid_file in root.rglob("pid"):
        try:
            pgid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            cwd = os.readlink(f"/proc/{pgid}/cwd")
        except OSError:
            cwd = str(root)  # the leader is gone; its children may not be
        if pgid > 1 and cwd.startswith(str(root)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
