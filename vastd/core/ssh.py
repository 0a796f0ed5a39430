"""The SSH pool: the only opener of SSH connections (one asyncssh connection per instance).

Every command and transfer of an instance shares its pooled connection and one SFTP
client. Every operation has a deadline (`asyncio.timeout`, since asyncssh's own
timeouts do not cover opening a channel). Connection problems surface as
`SSHConnectionError` and drop the connection, so the next `get()` reconnects.
Remote commands run through the login shell, which may print junk first: callers
that parse output use markers. The seed's `create_ssh_connection` is `SSHPool.get`,
its `execute_command`, `upload_file` and `download_file` are `SSHConnection.run`,
`upload` and `download`: the daemon calls those directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import asyncssh
import structlog
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import SSHPacketLogger, String

from vastd.core.files import safe_name
from vastd.core.files_async import in_thread_to_its_end
from vastd.utils import metrics
from vastd.utils.config import SshSettings
from vastd.utils.exceptions import (
    HostKeyMismatchError,
    RemoteCommandTimeout,
    RemoteOutputTooLarge,
    ResultTooLargeError,
    ResultValidationError,
    SSHAuthError,
    SSHConnectionError,
    VastdError,
)
from vastd.utils.logging import get_logger
from vastd.utils.supervise import Backoff as Backoff
from vastd.utils.turnstile import Turnstile

log = get_logger("vastd.ssh")

# aes128-gcm measured ~50% faster than asyncssh's default chacha20 on these hosts.
_ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
_WINDOW = 16 * 1024 * 1024
_SFTP_MAX_REQUESTS = 32
_CLOSE_TIMEOUT_S = 2.0
_CHANNEL_OPEN_RETRIES = 5
CHANNEL_OPEN_BACKOFF = Backoff(base_s=0.05, max_s=0.4, jitter="none")
_EMPTY_IGNORE = (String(b""),)
# Commands and SFTP operations whose answers are handed back to their callers in one
# loop turn, at most (about): the answers of a wave's commands arrive together, and each
# caller's next step (a status parsed and applied, the next request) is about 0.2-1 ms.
ANSWERS_PER_TURN = 8


def skip_automatic_ignores(
    conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection,
) -> None:
    """Stop `conn` sending an SSH_MSG_IGNORE before each of its packets while its cipher is
    not CBC.

    asyncssh (2.24) puts an empty MSG_IGNORE in front of every packet once encryption is
    on: a countermeasure against the chosen-plaintext attack on CBC's chained IVs (RFC
    4251, 9.3.1), of no use with CTR, GCM or ChaCha20-Poly1305, the only ciphers vastd
    offers (`_ENCRYPTION_ALGS`). It doubles the packets sent, each encrypted, padded from
    `os.urandom` and written with its own `send()`: against a local OpenSSH sshd, a
    command cost the client 10-20% less CPU without them (bench/RESULTS.md, 2026-12-07).
    OpenSSH does not send them either. Only those empty ignores are dropped, and none
    while a CBC cipher is in use. The few sent during the login, before this is called,
    stay.
    """
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: SSHPacketLogger | None = None) -> None:
        if pkttype == MSG_IGNORE and args == _EMPTY_IGNORE:
            cipher = conn.get_extra_info("send_cipher")
            if isinstance(cipher, str) and not cipher.endswith("-cbc") and "-cbc@" not in cipher:
                return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet  # type: ignore[method-assign]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    """`exit_status` is the exit code, minus the signal number, or None if unknown."""

    exit_status: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True)
class RemoteEntry:
    """A remote path's lstat (symlinks are not followed)."""

    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mtime: float | None


class RemoteFileError(VastdError):
    """A remote file operation failed on the instance (missing file, permission, ...)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)

    @property
    def missing(self) -> bool:
        return self.code == asyncssh.FX_NO_SUCH_FILE


class HostKeyStore(Protocol):
    def get_pinned_host_key(self, instance_id: str) -> str | None: ...

    def pin_host_key(self, instance_id: str, key: str) -> None: ...


class MemoryHostKeyStore:
    """A HostKeyStore kept in memory (tests, demo); the daemon uses the state store."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}

    def get_pinned_host_key(self, instance_id: str) -> str | None:
        return self.keys.get(instance_id)

    def pin_host_key(self, instance_id: str, key: str) -> None:
        self.keys[instance_id] = key


def _kind(attrs: asyncssh.SFTPAttrs) -> Literal["file", "dir", "symlink", "other"]:
    mode = attrs.permissions or 0
    if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK or stat.S_ISLNK(mode):
        return "symlink"
    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY or stat.S_ISDIR(mode):
        return "dir"
    if attrs.type == asyncssh.FILEXFER_TYPE_REGULAR or stat.S_ISREG(mode):
        return "file"
    return "other"


def _entry(name: str, attrs: asyncssh.SFTPAttrs) -> RemoteEntry:
    mtime = float(attrs.mtime) if attrs.mtime is not None else None
    return RemoteEntry(name=name, kind=_kind(attrs), size=attrs.size or 0, mtime=mtime)


# What vastd reads of a remote command: its own scripts print far less than this; a host
# that prints more is broken (or hostile) and is never read into memory whole.
MAX_STDOUT_CHARS = 16 * 1024 * 1024
STDERR_TAIL_CHARS = 64 * 1024  # only the end of stderr is kept (error texts, logs)
# Of a text the host chose (a disconnect or channel-refusal reason, an SFTP status
# message): what error messages, prepare_error, the snapshot and the log keep.
ERROR_TEXT_MAX = 1000


def clip(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """`text`, cut to its first `limit` characters (marked) when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """An exception's repr, bounded: asyncssh errors carry the peer's reason verbatim."""
    return clip(repr(exc))


class _CommandSession(asyncssh.SSHClientSession[str]):
    """One remote command's output: stdout up to `MAX_STDOUT_CHARS` (past it the session
    is `too_large` and keeps none), and the last `STDERR_TAIL_CHARS` of stderr.

    Not asyncssh's SSHClientProcess: that wraps each channel in stream readers and
    writers, with their locks, events and codecs, that refer to one another and to the
    channel. Each command it ran left about 45 objects in reference cycles, so a busy
    daemon's young collections each had 50,000 or more of them to free: 100-240 ms of
    CPU on the event loop each time (measured in `bench/bench_scale.py`). This session
    keeps no reference to its channel, and the channel drops its reference to the
    session when it closes, so a finished command's objects are freed at once.
    """

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr = ""
        self.too_large = False
        self.error: Exception | None = None  # the connection's, if it ended the channel
        self.ended = asyncio.Event()  # closed, or too_large
        self._stdout_chars = 0

    def data_received(self, data: str, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr = (self.stderr + data)[-STDERR_TAIL_CHARS:]
        elif not self.too_large:
            self._stdout_chars += len(data)
            if self._stdout_chars > MAX_STDOUT_CHARS:
                self.too_large = True
                self.stdout = []
                self.ended.set()
            else:
                self.stdout.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.ended.set()


_COPY_CHUNK = 8 * 1024 * 1024  # one parallel read (the SFTP client splits it in blocks)
_DIRECT_READ_MAX = 1024 * 1024  # a file this small is read with one request
_SPOOL_MAX = 1024 * 1024  # a download's bytes held in memory before they go to disk


class _Spool:
    """A download's bytes on their way to `part`, with no file operation on the event
    loop: held in memory up to `_SPOOL_MAX` bytes, then written through worker threads;
    `install` writes what is held and renames `part` to the final name in one trip, so
    the final name holds the whole file or nothing.

    Creating a file waits for the filesystem's journal: `strace -T` of the daemon's loop
    thread in `make bench` (ext4, beside the fsyncs of collection) timed 462 creations at
    0.65 ms median, 2.2 ms p99 and 13 ms at worst (strace's own cost included).

    Every thread trip runs to its end (`in_thread_to_its_end`) and records what it did in
    `_file` itself, so `discard` after any error or cancellation finds `part` as it is."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self._held: list[bytes] = []
        self._size = 0
        self._file: BinaryIO | None = None  # set while `part` is open in a worker thread

    async def write(self, data: bytes) -> None:
        if self._file is not None:
            await in_thread_to_its_end(self._file.write, data)
            return
        self._held.append(data)
        self._size += len(data)
        if self._size > _SPOOL_MAX:
            held, self._held = self._held, []
            await in_thread_to_its_end(self._spill, held)

    def _spill(self, held: list[bytes]) -> None:
        self._file = self.part.open("wb")
        try:
            self._file.writelines(held)
        except BaseException:
            self._remove()
            raise

    def _install(self, final: Path, held: list[bytes]) -> None:
        try:
            if self._file is None:
                with self.part.open("wb") as handle:
                    handle.writelines(held)
            else:
                self._file.close()
            os.replace(self.part, final)
            self._file = None
        except BaseException:
            self._remove()
            raise

    async def install(self, final: Path) -> None:
        held, self._held = self._held, []
        await in_thread_to_its_end(self._install, final, held)

    def _remove(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):  # (a failed flush: the bytes go anyway)
                handle.close()
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()

    async def discard(self) -> None:
        """Remove what went to disk (for the error path; nothing went there unless more
        than `_SPOOL_MAX` bytes came, or an install failed and removed it already)."""
        self._held = []
        if self._file is not None:
            await in_thread_to_its_end(self._remove)


async def _copy_capped(
    sftp: asyncssh.SFTPClient,
    remote_path: str,
    part: _Spool,
    max_bytes: int | None,
    expected: int = 0,
) -> int:
    """Copy `remote_path` into `part` until EOF, failing as soon as more than `max_bytes`
    arrived (the count is of bytes received, whatever the file's stat said).

    The first read asks for the stat's size (`expected`) and one byte more, and a read
    that comes back short has met the end of the file:

    - A file that fits in one request (the server's largest read, at most 1 MiB) is
      read with single requests: one for a file as large as it said. asyncssh's
      parallel reader would ask again for the rest of the short block, only to meet
      EOF: a second round trip for every small file.
    - A larger one goes through the parallel reader, which asks again for the rest of
      any short block until it meets EOF. A read of 8 MiB would have sent requests past
      the end (one task and one SFTPEOFError each, up to 32 with OpenSSH's 255 KiB
      blocks) and a second read to find EOF.

    A file larger than it said is read on, in requests of at most the server's largest
    read (single ones) or in 8 MiB chunks (parallel ones); a single request answered
    short of the stat's size is followed by another until EOF."""
    largest = min(sftp.limits.max_read_len or _DIRECT_READ_MAX, _DIRECT_READ_MAX)
    direct = expected < largest
    copied = 0
    async with sftp.open(
        remote_path,
        "rb",
        encoding=None,
        block_size=0 if direct else -1,
        max_requests=1 if direct else _SFTP_MAX_REQUESTS,
    ) as remote:
        while True:
            left = expected - copied
            want = min(_COPY_CHUNK, left + 1) if left >= 0 else _COPY_CHUNK
            if direct:
                want = min(want, largest)  # (a short answer is then the end)
            if max_bytes is not None:
                want = min(want, max_bytes - copied + 1)
            data: bytes = await remote.read(want, copied)
            if not data:
                return copied
            copied += len(data)
            if max_bytes is not None and copied > max_bytes:
                raise ResultTooLargeError(f"{remote_path}: grew past {max_bytes} bytes")
            await part.write(data)
            if len(data) < want and (copied >= expected or not direct):
                # Short: the end of the file. (A single request may also come back
                # short of what the stat said; the next read tells.)
                return copied


class SSHConnection:
    """One pooled connection to one instance; safe to share between tasks."""

    def __init__(
        self,
        pool: SSHPool,
        instance_id: str,
        endpoint: Endpoint,
        conn: asyncssh.SSHClientConnection,
        max_channels: int,
    ) -> None:
        self.instance_id = instance_id
        self.endpoint = endpoint
        self._pool = pool
        self._conn = conn
        self._channels = asyncio.Semaphore(max_channels)
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()

    @property
    def is_closed(self) -> bool:
        return self._conn.is_closed()

    @property
    def server_host_key(self) -> str | None:
        key = self._conn.get_server_host_key()
        return key.export_public_key().decode().strip() if key is not None else None

    async def _broken(self, exc: BaseException, what: str) -> SSHConnectionError:
        # A refused channel on a live connection is not a broken connection: keep it
        # for the other tasks using it. Anything else: drop it, the next get reconnects.
        if self.is_closed or not isinstance(exc, asyncssh.ChannelOpenError):
            await self._pool._forget(self)
        text = error_text(exc)
        log.info("ssh_connection_broken", instance=self.instance_id, op=what, error=text)
        metrics.SSH_ERRORS.inc()
        return SSHConnectionError(f"{self.instance_id}: {what} failed: {text}")

    async def _open_session(
        self, command: str
    ) -> tuple[asyncssh.SSHClientChannel[str], _CommandSession]:
        for attempt in range(_CHANNEL_OPEN_RETRIES):
            try:
                chan, session = await self._conn.create_session(
                    _CommandSession, command, encoding="utf-8", errors="replace"
                )
                assert isinstance(session, _CommandSession)
                return chan, session
            except asyncssh.ChannelOpenError:
                # sshd frees a session slot a little after we see the close.
                if attempt == _CHANNEL_OPEN_RETRIES - 1 or self.is_closed:
                    raise
                await asyncio.sleep(CHANNEL_OPEN_BACKOFF.delay_s(attempt))
        raise AssertionError("unreachable")

    async def run(
        self, command: str, *, timeout_s: float, input: str | None = None
    ) -> CommandResult:
        """Run `command` via the login shell; stdin gets `input` then EOF.

        The answer comes back through the pool's turnstile (`ANSWERS_PER_TURN`)."""
        result = await self._run(command, timeout_s=timeout_s, input=input)
        await self._pool.answers.passage()
        return result

    async def _run(self, command: str, *, timeout_s: float, input: str | None) -> CommandResult:
        async with self._channels:
            chan: asyncssh.SSHClientChannel[str] | None = None
            try:
                async with asyncio.timeout(timeout_s):
                    chan, session = await self._open_session(command)
                    if input:
                        chan.write(input)
                    chan.write_eof()
                    await session.ended.wait()
                    if session.too_large:
                        raise RemoteOutputTooLarge(
                            f"{self.instance_id}: a command printed more than "
                            f"{MAX_STDOUT_CHARS} characters"
                        )
                    if session.error is not None:
                        # The connection's exception, shared by all its channels: not
                        # raised here, where each raise would add to its traceback.
                        error, session.error = session.error, None
                        raise await self._broken(error, "run") from error
                    await chan.wait_closed()
                    return CommandResult(
                        chan.get_returncode(), "".join(session.stdout), session.stderr
                    )
            except TimeoutError:
                raise RemoteCommandTimeout(
                    f"{self.instance_id}: command timed out after {timeout_s:g}s"
                ) from None
            except (asyncssh.Error, OSError) as exc:
                raise await self._broken(exc, "run") from exc
            finally:
                if chan is not None:
                    if chan.get_returncode() is None:
                        # Timed out or cancelled: sshd holds the session slot until the
                        # command exits, so ask it to kill the command (OpenSSH >= 7.9).
                        with contextlib.suppress(asyncssh.Error, OSError, ValueError):
                            chan.send_signal("KILL")
                    # Close the channel so its session slot is freed.
                    chan.close()
                    with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
                        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                            await chan.wait_closed()

    async def _get_sftp(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is None:
                self._sftp = await self._conn.start_sftp_client()
            return self._sftp

    def _reset_sftp(self) -> None:
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            sftp.exit()

    @contextlib.asynccontextmanager
    async def _sftp_op(self, what: str, timeout_s: float) -> AsyncIterator[asyncssh.SFTPClient]:
        try:
            async with asyncio.timeout(timeout_s):
                yield await self._get_sftp()
        except TimeoutError:
            self._reset_sftp()  # it may have requests in flight
            raise RemoteCommandTimeout(
                f"{self.instance_id}: {what} timed out after {timeout_s:g}s"
            ) from None
        except asyncssh.SFTPError as exc:
            if exc.code in (asyncssh.FX_CONNECTION_LOST, asyncssh.FX_NO_CONNECTION):
                self._reset_sftp()
                raise await self._broken(exc, what) from exc
            raise RemoteFileError(f"{what}: {clip(exc.reason)}", code=exc.code) from exc
        except (asyncssh.Error, OSError) as exc:
            self._reset_sftp()
            if isinstance(exc, OSError) and not self.is_closed:
                raise  # a local file problem, not the connection
            raise await self._broken(exc, what) from exc
        await self._pool.answers.passage()

    async def lstat(self, remote_path: str, *, timeout_s: float) -> RemoteEntry | None:
        """The path's lstat, or None if it does not exist."""
        try:
            async with self._sftp_op("lstat", timeout_s) as sftp:
                attrs = await sftp.lstat(remote_path)
        except RemoteFileError as exc:
            if exc.missing:
                return None
            raise
        return _entry(remote_path.rstrip("/").rsplit("/", 1)[-1], attrs)

    async def listdir_attrs(self, remote_dir: str, *, timeout_s: float) -> list[RemoteEntry]:
        """Entries of a remote folder (no '.'/'..'), symlinks not followed; sorted by name."""
        async with self._sftp_op("listdir", timeout_s) as sftp:
            names = await sftp.readdir(remote_dir)
        entries = [_entry(str(n.filename), n.attrs) for n in names if n.filename not in (".", "..")]
        return sorted(entries, key=lambda e: e.name)

    async def makedirs(self, remote_path: str, *, timeout_s: float) -> None:
        """`mkdir -p` over SFTP (no remote process). A job's folder, whose parents are
        there, takes one request: asyncssh's own walk tries a `mkdir` and a `stat` for
        every component of the path (14 requests for a root 7 folders deep), each
        failed `mkdir` an exception whose traceback the cyclic collector has to free."""
        async with self._sftp_op("makedirs", timeout_s) as sftp:
            try:
                await sftp.mkdir(remote_path)
                return
            except asyncssh.SFTPError as exc:
                if exc.code in (asyncssh.FX_CONNECTION_LOST, asyncssh.FX_NO_CONNECTION):
                    raise
            # there already, a parent missing, or in the way: the walk tells them apart
            await sftp.makedirs(remote_path, exist_ok=True)

    async def upload(self, local_path: Path, remote_path: str, *, timeout_s: float) -> None:
        """Upload to `<remote>.part`, then rename: the remote file is whole or absent."""
        folder, name = posixpath.split(remote_path)
        # The temp name follows the 255-byte rule too (the 255-byte rule for derived names, README "Folders").
        part = posixpath.join(folder, safe_name(name, ".part"))
        async with self._sftp_op("upload", timeout_s) as sftp:
            # Through an opened file, not `sftp.put`: put first stats the destination to
            # see whether it is a folder, a request and (the `.part` is not there) an
            # SFTPNoSuchFile for the cyclic collector, per upload.
            # (the local file first: one that is missing leaves no `.part` on the host)
            with local_path.open("rb") as local:
                async with sftp.open(
                    part, "wb", encoding=None, max_requests=_SFTP_MAX_REQUESTS
                ) as remote:
                    offset = 0
                    while chunk := local.read(_COPY_CHUNK):
                        await remote.write(chunk, offset)
                        offset += len(chunk)
            await sftp.posix_rename(part, remote_path)

    async def download(
        self,
        remote_path: str,
        local_path: Path,
        *,
        timeout_s: float,
        max_bytes: int | None = None,
        size: int | None = None,
    ) -> int:
        """Download a regular file via `<local>.part`; refuse it past `max_bytes`.

        The cap holds while copying, not only before: a file that grows during the
        download (or lies in its stat) aborts the copy once past it, with the `.part`
        removed, so a host can never make vastd write more than `max_bytes`.

        `size`: what a listing of the job folder has just measured for this regular
        file; the download then asks for no lstat first (the cap holds all the same).
        """
        spool = _Spool(local_path.with_name(safe_name(local_path.name, ".part")))
        try:
            async with self._sftp_op("download", timeout_s) as sftp:
                if size is None:
                    attrs = await sftp.lstat(remote_path)
                    if _kind(attrs) != "file":
                        raise ResultValidationError(f"{remote_path}: not a regular file")
                    size = attrs.size or 0
                if max_bytes is not None and size > max_bytes:
                    raise ResultTooLargeError(f"{remote_path}: {size} bytes, more than {max_bytes}")
                size = await _copy_capped(sftp, remote_path, spool, max_bytes, size)
            await spool.install(local_path)
            return size
        except BaseException:
            await spool.discard()
            raise

    async def aclose(self) -> None:
        """Close within a bounded time, then abort."""
        self._reset_sftp()
        self._conn.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._conn.wait_closed()
        except TimeoutError:
            self._conn.abort()


class SSHPool:
    """One connection per instance, opened on demand, reused, reopened when broken."""

    def __init__(
        self,
        settings: SshSettings,
        *,
        client_keys: list[asyncssh.SSHKey] | None = None,
        host_keys: HostKeyStore | None = None,
        max_handshakes: int = 8,
        connect_attempts: int = 2,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self._client_keys = client_keys
        self.host_keys: HostKeyStore = host_keys if host_keys is not None else MemoryHostKeyStore()
        self._handshakes = asyncio.Semaphore(max_handshakes)
        self._connect_attempts = max(1, connect_attempts)
        self._backoff = backoff if backoff is not None else Backoff()
        self._conns: dict[str, SSHConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, tuple[float, SSHConnectionError]] = {}
        self._closed = False
        # shared by all its connections: a herd of answers is let through a few a turn
        self.answers = Turnstile(ANSWERS_PER_TURN)

    def _keys(self) -> list[asyncssh.SSHKey]:
        if self._client_keys is None:
            try:
                self._client_keys = [asyncssh.read_private_key(self.settings.key_file)]
            except (OSError, asyncssh.KeyImportError) as exc:
                raise SSHConnectionError(f"cannot read ssh key_file: {exc}") from None
        return self._client_keys

    def connection(self, instance_id: str) -> SSHConnection | None:
        """The open pooled connection of an instance, if any (no connecting)."""
        conn = self._conns.get(instance_id)
        return conn if conn is not None and not conn.is_closed else None

    async def get(self, instance_id: str, endpoints: Sequence[Endpoint]) -> SSHConnection:
        """The instance's connection: the pooled one, else a new one (endpoints in order)."""
        if self._closed:
            raise SSHConnectionError("ssh pool is closed")
        conn = self.connection(instance_id)
        if conn is not None:
            return conn
        asked_at = time.monotonic()
        async with self._locks.setdefault(instance_id, asyncio.Lock()):
            conn = self.connection(instance_id)
            if conn is not None:
                return conn
            failed = self._failures.get(instance_id)
            if failed is not None and failed[0] >= asked_at:
                # An attempt that ran while we waited just failed: do not repeat it.
                raise type(failed[1])(*failed[1].args)
            if not endpoints:
                raise SSHConnectionError(f"{instance_id}: no ssh endpoint known")
            # A fresh context: asyncssh logs with the opener's context for the
            # connection's whole life, which must not be another job's.
            task = asyncio.create_task(
                self._connect(instance_id, list(endpoints)), context=contextvars.Context()
            )
            try:
                conn = await task
            except SSHConnectionError as exc:
                self._failures[instance_id] = (time.monotonic(), exc)
                raise
            self._failures.pop(instance_id, None)
            if self._closed:
                await conn.aclose()
                raise SSHConnectionError("ssh pool is closed")
            self._conns[instance_id] = conn
            return conn

    async def _connect(self, instance_id: str, endpoints: list[Endpoint]) -> SSHConnection:
        structlog.contextvars.bind_contextvars(instance=instance_id)
        last: BaseException | None = None
        denied = False
        for attempt in range(self._connect_attempts):
            if attempt:
                await asyncio.sleep(self._backoff.delay_s(attempt - 1))
            for endpoint in endpoints:
                try:
                    return await self._connect_one(instance_id, endpoint)
                except HostKeyMismatchError:
                    metrics.SSH_ERRORS.inc()
                    raise
                except (asyncssh.Error, OSError, TimeoutError) as exc:
                    last = exc
                    denied = denied or isinstance(exc, asyncssh.PermissionDenied)
                    log.info("ssh_connect_failed", endpoint=str(endpoint), error=error_text(exc))
        metrics.SSH_ERRORS.inc()
        text = error_text(last) if last is not None else "no endpoint answered"
        # An endpoint that refused our key says which fix to try (the caller re-attaches it).
        error = SSHAuthError if denied else SSHConnectionError
        raise error(f"{instance_id}: cannot connect: {text}")

    async def _connect_one(self, instance_id: str, endpoint: Endpoint) -> SSHConnection:
        mode = self.settings.known_hosts
        pinned = self.host_keys.get_pinned_host_key(instance_id) if mode == "tofu" else None
        known_hosts: object
        if mode == "ignore" or (mode == "tofu" and pinned is None):
            known_hosts = None
        elif mode == "tofu":
            assert pinned is not None
            known_hosts = ([asyncssh.import_public_key(pinned)], [], [])
        else:
            known_hosts = mode
        async with self._handshakes:
            try:
                conn = await asyncssh.connect(
                    endpoint.host,
                    endpoint.port,
                    username=self.settings.user,
                    client_keys=self._keys(),
                    known_hosts=known_hosts,
                    host_key_alias=f"vast-{instance_id}" if pinned else None,
                    agent_path=None,
                    config=None,
                    connect_timeout=self.settings.connect_timeout_s,
                    login_timeout=self.settings.connect_timeout_s,
                    keepalive_interval=self.settings.keepalive_interval_s,
                    keepalive_count_max=3,
                    encryption_algs=_ENCRYPTION_ALGS,
                    window=_WINDOW,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                log.warning(
                    "host_key_mismatch",
                    instance=instance_id,
                    endpoint=str(endpoint),
                    pinned=pinned is not None,
                    error=clip(exc.reason),
                )
                raise HostKeyMismatchError(
                    f"{instance_id}: host key at {endpoint} is not the trusted one"
                ) from None
        skip_automatic_ignores(conn)
        wrapped = SSHConnection(self, instance_id, endpoint, conn, self.settings.max_channels)
        if mode == "tofu" and pinned is None:
            key = wrapped.server_host_key
            if key is not None:
                self.host_keys.pin_host_key(instance_id, key)
                log.info("host_key_pinned", instance=instance_id, endpoint=str(endpoint))
        log.debug("ssh_connected", instance=instance_id, endpoint=str(endpoint))
        return wrapped

    async def _forget(self, conn: SSHConnection) -> None:
        if self._conns.get(conn.instance_id) is conn:
            del self._conns[conn.instance_id]
        if not conn.is_closed:
            await conn.aclose()

    async def drop(self, instance_id: str) -> None:
        """Close and forget an instance's connection (the next get reconnects)."""
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close every connection, each within a bounded time."""
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
