"""The SSH pool: commands, reuse, transfers, host keys, faults; SimHost and real OpenSSH."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import structlog

from tests.helpers import LoopTurns
from tests.sshd import TEST_PYTHON
from vastd.core import ssh as ssh_mod
from vastd.core.ssh import (
    CommandResult,
    Endpoint,
    MemoryHostKeyStore,
    RemoteFileError,
    SSHPool,
)
from vastd.sim.hosts import SimHost
from vastd.utils.exceptions import (
    HostKeyMismatchError,
    RemoteCommandTimeout,
    RemoteOutputTooLarge,
    ResultTooLargeError,
    ResultValidationError,
    SSHConnectionError,
)
from vastd.utils.turnstile import Turnstile

SimHostFactory = Callable[..., Awaitable[SimHost]]
PoolFactory = Callable[..., SSHPool]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `predicate` until true, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def spy_sftp(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """The names of these `asyncssh.SFTPClient` methods, in the order they are called."""
    calls: list[str] = []
    for name in names:
        real = getattr(asyncssh.SFTPClient, name)

        async def spy(
            self: Any, *args: Any, _real: Any = real, _name: str = name, **kw: Any
        ) -> Any:
            calls.append(_name)
            return await _real(self, *args, **kw)

        monkeypatch.setattr(asyncssh.SFTPClient, name, spy)
    return calls


def ep(host: SimHost | Any) -> list[Endpoint]:
    return [Endpoint(*host.address)]


async def test_run_exit_codes_stdout_stderr_and_stdin(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """A command's stdout, stderr and exit code come back; `input` reaches its stdin."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    result = await conn.run("echo out; echo err >&2; exit 3", timeout_s=10)
    assert result == CommandResult(3, "out\n", "err\n")
    assert not result.ok
    assert (await conn.run("cat", timeout_s=10, input="hello\n")).stdout == "hello\n"
    # Without input the command sees EOF at once instead of hanging.
    assert (await conn.run("cat; echo end", timeout_s=10)).stdout == "end\n"
    assert (await conn.run("true", timeout_s=10)).ok


async def test_a_flood_of_output_fails_the_command_instead_of_filling_memory(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host printing more than vastd reads: the command fails as a host error (never held
    whole in memory, the remote command is killed); a flood on stderr keeps only its end;
    the connection stays usable."""
    monkeypatch.setattr(ssh_mod, "MAX_STDOUT_CHARS", 100_000)
    monkeypatch.setattr(ssh_mod, "STDERR_TAIL_CHARS", 1_000)
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    started = time.monotonic()
    with pytest.raises(RemoteOutputTooLarge):
        # endless: only the cap (not the timeout) can end it this soon
        await conn.run("yes 0123456789", timeout_s=30)
    assert time.monotonic() - started < 20
    flood = await conn.run(
        "i=0; while [ $i -lt 3000 ]; do echo e$i >&2; i=$((i+1)); done; echo ok", timeout_s=30
    )
    assert flood.stdout == "ok\n" and len(flood.stderr) <= 1_000
    assert flood.stderr.endswith("e2999\n")
    assert (await conn.run("echo still", timeout_s=10)).stdout == "still\n"


async def test_a_finished_command_leaves_nothing_for_the_cyclic_collector(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """What a command made on our side (its channel, session and buffers) is freed when
    it ends, not left in reference cycles for the collector: with tens of commands a
    second, those made each young collection of the daemon a pause of 100 ms or more."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    await conn.run("true", timeout_s=10)
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        for i in range(20):
            assert (await conn.run(f"echo {i}; echo e >&2", timeout_s=10, input="x")).ok
        with pytest.raises(RemoteCommandTimeout):
            await conn.run("sleep 30", timeout_s=0.3)
        gc.collect()
        ours = [
            o
            for o in gc.garbage
            if isinstance(o, asyncssh.SSHClientChannel | asyncssh.SSHClientSession)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


def spy_sent_packets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(side, packet type) of every packet asyncssh's connections send from now on."""
    sent: list[tuple[str, int]] = []
    real = asyncssh.connection.SSHConnection.send_packet

    def spy(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        sent.append(("client" if self.is_client() else "server", pkttype))
        real(self, pkttype, *args, handler=handler)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "send_packet", spy)
    return sent


async def test_no_ssh_msg_ignore_goes_before_each_packet(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncssh sends an empty SSH_MSG_IGNORE before every packet once encrypted (a CBC
    countermeasure): once connected (the login's few come before the pool can stop
    them), the pool's connections (never CBC) and the simulated hosts send none, so
    commands and transfers cost half the packets, and they still work."""
    sent = spy_sent_packets(monkeypatch)
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    assert [p for p in sent if p == ("server", asyncssh.constants.MSG_IGNORE)] == []
    sent.clear()
    for i in range(3):
        assert (await conn.run(f"echo {i}", timeout_s=10)).stdout == f"{i}\n"
    local = tmp_path / "in.txt"
    local.write_text("payload")
    await conn.upload(local, str(host.root / "in.txt"), timeout_s=10)
    await conn.download(str(host.root / "in.txt"), tmp_path / "back.txt", timeout_s=10)
    assert (tmp_path / "back.txt").read_text() == "payload"
    sides = {side for side, kind in sent if kind == asyncssh.constants.MSG_CHANNEL_DATA}
    assert sides == {"client", "server"}  # the spy sees both sides' packets
    assert [p for p in sent if p[1] == asyncssh.constants.MSG_IGNORE] == []


async def test_answers_are_handed_back_through_the_pools_turnstile(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, tmp_path: Path
) -> None:
    """Every command's and SFTP operation's answer goes through the pool's turnstile
    (which hands a herd of answers back a few a loop turn: tests/test_turnstile.py), and
    each caller still gets its own answer."""
    host = await sim_host()
    pool = ssh_pool()
    passages: list[int] = []

    class Counted(Turnstile):
        async def passage(self) -> None:
            passages.append(turns.count)
            await super().passage()

    pool.answers = Counted(2)
    conn = await pool.get("i1", ep(host))
    local = tmp_path / "in.txt"
    local.write_text("payload")
    async with LoopTurns() as turns:
        await conn.makedirs(str(host.root / "d"), timeout_s=10)
        await conn.upload(local, str(host.root / "d" / "in.txt"), timeout_s=10)
        assert await conn.lstat(str(host.root / "d" / "in.txt"), timeout_s=10) is not None
        assert [e.name for e in await conn.listdir_attrs(str(host.root / "d"), timeout_s=10)]
        await conn.download(str(host.root / "d" / "in.txt"), tmp_path / "back", timeout_s=10)
        assert len(passages) == 5
        # commands answered together, each caller waiting its turn, get their own answers
        results = await asyncio.gather(
            *(conn.run(f"sleep 0.2; echo {i}", timeout_s=20) for i in range(12))
        )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert len(passages) == 5 + 12


async def test_a_cbc_connection_keeps_its_msg_ignores(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a CBC cipher the countermeasure stays: an ignore before each packet."""
    sent = spy_sent_packets(monkeypatch)
    key = asyncssh.generate_private_key("ssh-ed25519")

    class Open(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[key],
        server_factory=Open,
        process_factory=lambda proc: proc.exit(0),
        encryption_algs=["aes128-cbc"],
    )
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="x", encryption_algs=["aes128-cbc"]
        ) as client:
            ssh_mod.skip_automatic_ignores(client)
            assert client.get_extra_info("send_cipher") == "aes128-cbc"
            sent.clear()
            assert (await client.run("true")).exit_status == 0
    finally:
        server.close()
    client_sent = [kind for side, kind in sent if side == "client"]
    assert client_sent.count(asyncssh.constants.MSG_IGNORE) >= 2


async def test_a_connection_lost_mid_command_is_a_connection_error(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """The host gone while commands run: each gets SSHConnectionError at once (not its
    timeout), and the pool forgets the connection. The connection's own exception,
    which its channels share, is the cause of each but is not raised again: each raise
    would have added that command's frames to it, keeping them alive."""
    host = await sim_host()
    pool = ssh_pool()
    conn = await pool.get("i1", ep(host))
    running = [asyncio.create_task(conn.run("sleep 30", timeout_s=60)) for _ in range(3)]
    await wait_for(lambda: len(host._procs) == 3)
    started = time.monotonic()
    await host.kill()
    errors = await asyncio.gather(*running, return_exceptions=True)
    assert time.monotonic() - started < 30
    assert all(isinstance(e, SSHConnectionError) for e in errors), errors
    assert pool.connection("i1") is None
    for error in errors:
        cause = error.__cause__
        assert cause is not None
        frames = []
        tb = cause.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        assert "run" not in frames, frames


async def test_one_connection_is_reused(sim_host: SimHostFactory, ssh_pool: PoolFactory) -> None:
    """N commands, also concurrent and from concurrent get()s, use a single connection."""
    host = await sim_host()
    pool = ssh_pool()
    conns = await asyncio.gather(*(pool.get("i1", ep(host)) for _ in range(10)))
    assert len({id(c) for c in conns}) == 1
    results = await asyncio.gather(*(conns[0].run(f"echo {i}", timeout_s=10) for i in range(20)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
    assert host.connections_total == 1


async def test_endpoints_are_tried_in_order(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """An unreachable first endpoint falls through to the next one."""
    host = await sim_host()
    dead = await sim_host("dead")
    dead_ep = Endpoint(*dead.address)
    await dead.kill()
    conn = await ssh_pool().get("i1", [dead_ep, *ep(host)])
    assert conn.endpoint == Endpoint(*host.address)


async def test_upload_download_round_trip(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, tmp_path: Path
) -> None:
    """Bytes survive upload+download; no `.part` file is left on either side."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    data = bytes(range(256)) * 5000
    local = tmp_path / "local"
    local.mkdir()
    src = local / "src.bin"
    src.write_bytes(data)
    remote = str(host.root / "up.bin")
    await conn.upload(src, remote, timeout_s=30)
    assert (host.root / "up.bin").read_bytes() == data
    assert not (host.root / "up.bin.part").exists()
    dst = local / "dst.bin"
    assert await conn.download(remote, dst, timeout_s=30) == len(data)
    assert dst.read_bytes() == data
    assert sorted(p.name for p in local.iterdir()) == ["dst.bin", "src.bin"]


async def test_a_download_reads_as_much_as_the_stat_said_and_no_more_when_true(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file as large as its stat takes one read (none past its end to find EOF), an
    empty one too, and a small one one request; one larger than its stat said (it grew)
    still arrives whole."""
    reads: list[int] = []
    real_read = asyncssh.SFTPClientFile.read
    requests: list[int] = []  # SFTP read requests sent (asyncssh's parallel reader splits)
    real_request = asyncssh.sftp.SFTPClientHandler.read

    async def spy(self: Any, size: int = -1, offset: int | None = None) -> Any:
        reads.append(size)
        return await real_read(self, size, offset)

    async def spy_request(self: Any, handle: bytes, offset: int, length: int) -> Any:
        requests.append(length)
        return await real_request(self, handle, offset, length)

    monkeypatch.setattr(asyncssh.SFTPClientFile, "read", spy)
    monkeypatch.setattr(asyncssh.sftp.SFTPClientHandler, "read", spy_request)
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    for name, size in (("small", 1000), ("empty", 0), ("big", 3 * 1024 * 1024 + 5)):
        (host.root / name).write_bytes(bytes(range(256)) * (size // 256) + b"z" * (size % 256))
        reads.clear()
        requests.clear()
        assert await conn.download(str(host.root / name), tmp_path / name, timeout_s=30) == size
        assert (tmp_path / name).read_bytes() == (host.root / name).read_bytes()
        assert reads == [size + 1], name
        if size < 1024 * 1024:
            assert requests == [size + 1], name
    real_lstat = asyncssh.SFTPClient.lstat
    grown = host.root / "grown"
    grown.write_bytes(b"x" * 1000)

    async def lstat_then_grow(self: asyncssh.SFTPClient, path: Any, *args: Any, **kw: Any) -> Any:
        attrs = await real_lstat(self, path, *args, **kw)
        if str(path).endswith("grown"):
            grown.write_bytes(b"y" * 300_000)
        return attrs

    monkeypatch.setattr(asyncssh.SFTPClient, "lstat", lstat_then_grow)
    assert await conn.download(str(grown), tmp_path / "grown", timeout_s=30) == 300_000
    assert (tmp_path / "grown").read_bytes() == b"y" * 300_000
    # Grown past what one request may read: read on in requests of that size.
    grown.write_bytes(b"x" * 1000)
    monkeypatch.setattr(ssh_mod, "_DIRECT_READ_MAX", 4096)
    requests.clear()
    assert await conn.download(str(grown), tmp_path / "grown2", timeout_s=30) == 300_000
    assert (tmp_path / "grown2").read_bytes() == b"y" * 300_000
    assert requests[0] == 1001 and max(requests) == 4096


async def test_a_download_answered_short_of_its_stat_reads_on_to_the_end(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server whose reads come back short (100 bytes at a time) before the end: the
    file still arrives whole, not cut at the first short answer."""
    real_request = asyncssh.sftp.SFTPClientHandler.read

    async def short(self: Any, handle: bytes, offset: int, length: int) -> Any:
        return await real_request(self, handle, offset, min(length, 100))

    monkeypatch.setattr(asyncssh.sftp.SFTPClientHandler, "read", short)
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    data = bytes(range(256)) * 4
    (host.root / "f").write_bytes(data)
    assert await conn.download(str(host.root / "f"), tmp_path / "f", timeout_s=30) == len(data)
    assert (tmp_path / "f").read_bytes() == data


async def test_a_download_told_the_size_asks_for_no_lstat(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given the size a listing measured, a download sends no lstat; the cap still holds
    when the file is larger than that."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    (host.root / "log.txt").write_bytes(b"line\n" * 100)
    calls = spy_sftp(monkeypatch, "lstat")
    got = await conn.download(str(host.root / "log.txt"), tmp_path / "log", timeout_s=30, size=500)
    assert got == 500 and (tmp_path / "log").read_bytes() == b"line\n" * 100
    assert calls == []
    with pytest.raises(ResultTooLargeError):
        await conn.download(
            str(host.root / "log.txt"), tmp_path / "log2", timeout_s=30, size=10, max_bytes=100
        )
    assert not (tmp_path / "log2").exists()


async def test_a_download_creates_writes_and_renames_its_file_off_the_event_loop(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every local file operation of a download (create, write, rename, removal) runs in
    a worker thread, never on the loop: creating a file waits for the filesystem's
    journal. A small file is held in memory, a large one spilled to disk as it comes;
    either arrives whole, and a cap passed after the spill leaves nothing behind."""
    monkeypatch.setattr(ssh_mod, "_SPOOL_MAX", 64 * 1024)
    monkeypatch.setattr(ssh_mod, "_DIRECT_READ_MAX", 16 * 1024)  # many reads: spill, then cap
    local = tmp_path / "local"
    local.mkdir()
    on_loop: list[str] = []
    in_threads: list[str] = []
    loop_thread = threading.get_ident()
    armed = [False]  # only during the downloads (the test reads the files on the loop)

    def watch(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(path: Any, *args: Any, **kw: Any) -> Any:
            if armed[0] and Path(path).parent == local:
                seen = on_loop if threading.get_ident() == loop_thread else in_threads
                seen.append(f"{name} {Path(path).name}")
            return real(path, *args, **kw)

        return spy

    monkeypatch.setattr(Path, "open", watch("open", Path.open))
    monkeypatch.setattr(Path, "unlink", watch("unlink", Path.unlink))
    monkeypatch.setattr(ssh_mod.os, "replace", watch("replace", os.replace))
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    for name, size in (("small", 1000), ("empty", 0), ("large", 300_000)):
        data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        (host.root / name).write_bytes(data)
        armed[0] = True
        assert await conn.download(str(host.root / name), local / name, timeout_s=30) == size
        armed[0] = False
        assert (local / name).read_bytes() == data
    # The listing said 100 bytes; 300,000 come, past the 200,000 cap, after the spill.
    armed[0] = True
    with pytest.raises(ResultTooLargeError):
        await conn.download(
            str(host.root / "large"), local / "capped", timeout_s=30, size=100, max_bytes=200_000
        )
    armed[0] = False
    assert sorted(p.name for p in local.iterdir()) == ["empty", "large", "small"]
    assert on_loop == []
    assert in_threads[-2:] == ["open capped.part", "unlink capped.part"]  # spilled, then gone


async def test_a_download_cancelled_while_its_file_is_written_leaves_it_whole_or_absent(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while a worker thread writes the file (the install of a small one, the
    spill of a large one): the cancellation waits for the thread, then the final name
    holds the whole file (installed) or nothing, and no `.part` is left."""
    monkeypatch.setattr(ssh_mod, "_SPOOL_MAX", 64 * 1024)
    monkeypatch.setattr(ssh_mod, "_DIRECT_READ_MAX", 16 * 1024)
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    for step, size in (("_install", 1000), ("_spill", 300_000)):
        data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        (host.root / step).write_bytes(data)
        entered, release = threading.Event(), threading.Event()
        real = getattr(ssh_mod._Spool, step)

        def slow(
            self: Any, *args: Any, _real: Any = real, _e: Any = entered, _r: Any = release
        ) -> Any:
            _e.set()
            _r.wait(10)
            return _real(self, *args)

        monkeypatch.setattr(ssh_mod._Spool, step, slow)
        target = tmp_path / step
        task = asyncio.ensure_future(conn.download(str(host.root / step), target, timeout_s=30))
        assert await asyncio.to_thread(entered.wait, 10), step
        task.cancel()  # (with every task of the loop: see test_files' in_thread_to_its_end)
        await asyncio.sleep(0.05)
        assert not task.done(), step  # waiting for the thread, not racing it
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(step)) == (
            [step] if step == "_install" else []
        ), step
        if step == "_install":
            assert target.read_bytes() == data


async def test_an_upload_asks_the_host_for_no_stat(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload is open, writes, close and rename: no stat of the destination (which
    `sftp.put` makes, failing on the absent `.part`); a file past one chunk arrives
    whole, and a new upload replaces the file."""
    monkeypatch.setattr(ssh_mod, "_COPY_CHUNK", 64 * 1024)
    asked = spy_sftp(monkeypatch, "stat", "lstat", "isdir")
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    src = tmp_path / "job.csv"
    for data in (bytes(range(256)) * 1000 + b"tail", b"a\n1\n"):
        src.write_bytes(data)
        await conn.upload(src, str(host.root / "job.csv"), timeout_s=30)
        assert (host.root / "job.csv").read_bytes() == data
    assert asked == []
    assert sorted(p.name for p in host.root.iterdir()) == ["job.csv"]
    with pytest.raises(FileNotFoundError):  # a local file gone: nothing left on the host
        await conn.upload(tmp_path / "gone.csv", str(host.root / "gone.csv"), timeout_s=30)
    assert sorted(p.name for p in host.root.iterdir()) == ["job.csv"]


async def test_download_refuses_oversized_and_non_regular(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, tmp_path: Path
) -> None:
    """Past max_bytes or not a regular file: ResultValidationError, nothing written locally."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    (host.root / "big").write_bytes(b"x" * 1000)
    (host.root / "link").symlink_to(host.root / "big")
    local = tmp_path / "local"
    local.mkdir()
    with pytest.raises(ResultValidationError):
        await conn.download(str(host.root / "big"), local / "big", timeout_s=10, max_bytes=999)
    with pytest.raises(ResultValidationError):
        await conn.download(str(host.root / "link"), local / "link", timeout_s=10)
    assert list(local.iterdir()) == []
    assert await conn.download(str(host.root / "big"), local / "b", timeout_s=10, max_bytes=1000)


async def test_makedirs_takes_one_request_when_the_parent_is_there(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's folder under an existing one: one `mkdir`, no walk of the path (which
    costs a failed `mkdir` and a `stat` per component); a deep new path, an existing
    folder and a file in the way still behave as `mkdir -p`."""
    calls = spy_sftp(monkeypatch, "mkdir", "makedirs", "stat")
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    (host.root / "jobs").mkdir()
    await conn.makedirs(str(host.root / "jobs" / "job_1"), timeout_s=10)
    assert (host.root / "jobs" / "job_1").is_dir() and calls == ["mkdir"]
    await conn.makedirs(str(host.root / "a" / "b" / "c"), timeout_s=10)
    assert (host.root / "a" / "b" / "c").is_dir() and "makedirs" in calls
    await conn.makedirs(str(host.root / "jobs" / "job_1"), timeout_s=10)  # there already
    (host.root / "jobs" / "f").write_text("x")
    with pytest.raises(RemoteFileError):
        await conn.makedirs(str(host.root / "jobs" / "f"), timeout_s=10)


async def test_listdir_and_lstat_do_not_follow_symlinks(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """Listing reports type and size per entry without following symlinks; lstat of nothing is None."""
    host = await sim_host()
    conn = await ssh_pool().get("i1", ep(host))
    d = host.root / "d"
    d.mkdir()
    (d / "f").write_bytes(b"12345")
    (d / "sub").mkdir()
    (d / "ln").symlink_to("/etc/passwd")
    entries = {e.name: e for e in await conn.listdir_attrs(str(d), timeout_s=10)}
    assert {n: e.kind for n, e in entries.items()} == {"f": "file", "sub": "dir", "ln": "symlink"}
    assert entries["f"].size == 5
    entry = await conn.lstat(str(d / "ln"), timeout_s=10)
    assert entry is not None and entry.kind == "symlink"
    assert await conn.lstat(str(d / "missing"), timeout_s=10) is None


async def test_tofu_pins_then_refuses_a_changed_host_key(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """First contact pins the key; after the host key changes, connecting raises and logs."""
    host = await sim_host()
    store = MemoryHostKeyStore()
    pool = ssh_pool(host_keys=store)
    await pool.get("i1", ep(host))
    assert store.get_pinned_host_key("i1") == host.host_key_line
    await pool.drop("i1")
    assert (await (await pool.get("i1", ep(host))).run("true", timeout_s=10)).ok
    await pool.drop("i1")
    await host.stop()
    host.new_host_key()
    await host.start()
    with structlog.testing.capture_logs() as logs, pytest.raises(HostKeyMismatchError):
        await pool.get("i1", ep(host))
    assert any(e["event"] == "host_key_mismatch" and e["log_level"] == "warning" for e in logs)
    assert store.get_pinned_host_key("i1") != host.host_key_line


async def test_ignore_mode_accepts_any_host_key(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, ssh_settings: Callable[..., Any]
) -> None:
    """known_hosts="ignore" connects whatever the key, and pins nothing."""
    host = await sim_host()
    store = MemoryHostKeyStore()
    store.pin_host_key("i1", (await sim_host("other")).host_key_line)
    pool = ssh_pool(ssh_settings(known_hosts="ignore"), host_keys=store)
    assert (await (await pool.get("i1", ep(host))).run("true", timeout_s=10)).ok
    assert store.get_pinned_host_key("i1") != host.host_key_line


async def test_known_hosts_file_mode(
    sim_host: SimHostFactory,
    ssh_pool: PoolFactory,
    ssh_settings: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A known_hosts path: a listed key connects, an unlisted one is a mismatch."""
    host = await sim_host()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{host.port} {host.host_key_line}\n")
    pool = ssh_pool(ssh_settings(known_hosts=str(known)))
    assert (await (await pool.get("i1", ep(host))).run("true", timeout_s=10)).ok
    other = await sim_host("i2")
    with pytest.raises(HostKeyMismatchError):
        await pool.get("i2", ep(other))


async def test_dead_server_raises_then_pool_reconnects(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """A server that dies gives SSHConnectionError; once it is back, get() reconnects."""
    host = await sim_host()
    pool = ssh_pool()
    conn = await pool.get("i1", ep(host))
    await host.kill()
    with pytest.raises(SSHConnectionError):
        await conn.run("true", timeout_s=5)
    with pytest.raises(SSHConnectionError):
        await pool.get("i1", ep(host))
    await host.start()
    conn2 = await pool.get("i1", ep(host))
    assert conn2 is not conn
    assert (await conn2.run("echo back", timeout_s=5)).stdout == "back\n"


async def test_hanging_command_times_out_and_frees_its_channel(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, ssh_settings: Callable[..., Any]
) -> None:
    """A hung command raises RemoteCommandTimeout near its deadline; the slot is reusable."""
    host = await sim_host()
    conn = await ssh_pool(ssh_settings(max_channels=1)).get("i1", ep(host))
    started = time.monotonic()
    with pytest.raises(RemoteCommandTimeout):
        await conn.run("sleep 30", timeout_s=0.5)
    assert time.monotonic() - started < 5
    # With one channel allowed, this only runs if the timed-out one was released.
    assert (await conn.run("echo free", timeout_s=5)).stdout == "free\n"
    await wait_for(lambda: not host._procs)  # the server side saw the close and killed it


async def test_detached_job_returns_at_once_and_outlives_the_connection(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """`setsid nohup ... &` returns immediately; the job finishes after the connection closed."""
    host = await sim_host()
    pool = ssh_pool()
    conn = await pool.get("i1", ep(host))
    result = await conn.run(
        "setsid nohup sh -c 'sleep 1; echo done > f' > log 2>&1 < /dev/null & echo $!",
        timeout_s=0.9,
    )
    assert result.ok and result.stdout.strip().isdigit()
    await pool.drop("i1")
    await host.stop()
    await wait_for(lambda: (host.root / "f").exists() and (host.root / "f").read_text() == "done\n")


async def test_login_banner_on_stdout_is_passed_through(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """Junk a login shell prints arrives on stdout before the command's output."""
    host = await sim_host(login_banner="Welcome to vast.ai\n")
    conn = await ssh_pool().get("i1", ep(host))
    assert (await conn.run("echo MARK; echo hi", timeout_s=5)).stdout.endswith("MARK\nhi\n")


async def test_pool_aclose_closes_everything(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """aclose closes every connection and the pool refuses new ones."""
    hosts = [await sim_host(f"i{n}") for n in range(3)]
    pool = ssh_pool()
    for h in hosts:
        await pool.get(h.instance_id, ep(h))
    await pool.aclose()
    await wait_for(lambda: all(h.active_connections == 0 for h in hosts))
    with pytest.raises(SSHConnectionError):
        await pool.get("i0", ep(hosts[0]))


# --- real OpenSSH -------------------------------------------------------------------------


@pytest.mark.sshd
async def test_openssh_commands_and_python(
    openssh_server: Callable[..., Any], ssh_pool: PoolFactory, ssh_settings: Callable[..., Any]
) -> None:
    """Against real sshd as the test user: exit codes, stdin, and its usable python."""
    server = openssh_server()
    pool = ssh_pool(ssh_settings(user=server.user))
    conn = await pool.get("o1", [Endpoint(*server.address)])
    assert (await conn.run("id -un; exit 4", timeout_s=10)) == CommandResult(4, "vastdtest\n", "")
    assert (await conn.run("cat", input="x\n", timeout_s=10)).stdout == "x\n"
    py = await conn.run(f"{TEST_PYTHON} -c 'import pyarrow; print(1)'", timeout_s=30)
    assert py.stdout == "1\n", py.stderr


@pytest.mark.sshd
async def test_openssh_30_concurrent_commands_on_one_connection(
    openssh_server: Callable[..., Any], ssh_pool: PoolFactory, ssh_settings: Callable[..., Any]
) -> None:
    """30 concurrent commands share one connection (max_channels=4) without ChannelOpenError."""
    server = openssh_server()
    pool = ssh_pool(ssh_settings(user=server.user, max_channels=4))
    conn = await pool.get("o1", [Endpoint(*server.address)])
    for _ in range(3):
        results = await asyncio.gather(*(conn.run(f"echo {i}", timeout_s=30) for i in range(30)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(30)]
    assert pool.connection("o1") is conn


@pytest.mark.sshd
async def test_openssh_transfer_and_detached_job(
    openssh_server: Callable[..., Any],
    ssh_pool: PoolFactory,
    ssh_settings: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Upload/download round trip and a detached job that finishes after disconnect."""
    server = openssh_server()
    pool = ssh_pool(ssh_settings(user=server.user))
    conn = await pool.get("o1", [Endpoint(*server.address)])
    root = server.remote_root
    src = tmp_path / "in.csv"
    src.write_bytes(b"a,b\n1,2\n" * 10000)
    await conn.upload(src, f"{root}/in.csv", timeout_s=30)
    assert await conn.download(f"{root}/in.csv", tmp_path / "out.csv", timeout_s=30) == 80000
    assert (tmp_path / "out.csv").read_bytes() == src.read_bytes()
    result = await conn.run(
        f"cd {root} && setsid nohup sh -c 'sleep 1; echo done > f' > log 2>&1 < /dev/null &",
        timeout_s=0.9,
    )
    assert result.ok
    await pool.drop("o1")
    await wait_for(lambda: (root / "f").exists() and (root / "f").read_text() == "done\n")


@pytest.mark.sshd
async def test_openssh_tofu_refuses_new_host_key_and_timeout_frees_channel(
    openssh_server: Callable[..., Any], ssh_pool: PoolFactory, ssh_settings: Callable[..., Any]
) -> None:
    """Real sshd: a hung command times out and frees its slot; a new host key is refused."""
    server = openssh_server()
    pool = ssh_pool(ssh_settings(user=server.user, max_channels=1))
    conn = await pool.get("o1", [Endpoint(*server.address)])
    with pytest.raises(RemoteCommandTimeout):
        await conn.run("sleep 30", timeout_s=0.5)
    assert (await conn.run("echo ok", timeout_s=10)).stdout == "ok\n"
    await pool.drop("o1")
    server.restart(new_host_key=True)
    with pytest.raises(HostKeyMismatchError):
        await pool.get("o1", [Endpoint(*server.address)])


async def test_pooled_connection_logs_without_the_callers_context(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """asyncssh's log records of a pooled connection carry the instance, not the opener's job."""
    seen: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append({"msg": record.getMessage(), **structlog.contextvars.get_contextvars()})

    host = await sim_host()
    logger = logging.getLogger("asyncssh")
    handler, old_level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with structlog.contextvars.bound_contextvars(job="j1"):
            conn = await ssh_pool().get("i1", ep(host))
        with structlog.contextvars.bound_contextvars(job="j2"):
            await conn.run("true", timeout_s=5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    # Callbacks (e.g. the channel close) run in the connection's context; calls made
    # by a task (opening a channel) rightly log with that task's.
    assert any(ctx.get("instance") == "i1" for ctx in seen)
    assert not [ctx for ctx in seen if ctx.get("job") == "j1"]


@pytest.mark.sshd
async def test_openssh_download_stops_at_the_cap_when_the_file_grows(
    openssh_server: Callable[..., Any],
    ssh_pool: PoolFactory,
    ssh_settings: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result that grows after vastd looked at its size (1 kB, then 64 MB): the copy
    stops at `max_bytes` while copying (the local `.part` never passes it), fails as too
    large and leaves nothing behind; the connection stays usable."""
    server = openssh_server()
    conn = await ssh_pool(ssh_settings(user=server.user)).get("o1", [Endpoint(*server.address)])
    remote = server.remote_root / "grows.bin"
    remote.write_bytes(b"x" * 1000)
    real_lstat = asyncssh.SFTPClient.lstat

    async def lstat_then_grow(self: asyncssh.SFTPClient, path: Any, *args: Any, **kw: Any) -> Any:
        attrs = await real_lstat(self, path, *args, **kw)
        if str(path).endswith("grows.bin"):
            with remote.open("r+b") as handle:
                handle.truncate(64 * 1024 * 1024)
        return attrs

    monkeypatch.setattr(asyncssh.SFTPClient, "lstat", lstat_then_grow)
    local = tmp_path / "local"
    local.mkdir()
    cap = 1024 * 1024
    seen: list[int] = []
    watching = True

    async def watch_part() -> None:
        while watching:
            for p in local.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    seen.append(p.stat().st_size)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch_part())
    try:
        with pytest.raises(ResultTooLargeError, match="grew past"):
            await conn.download(str(remote), local / "grows.bin", timeout_s=60, max_bytes=cap)
    finally:
        watching = False
        await watcher
    assert max(seen, default=0) <= cap
    assert list(local.iterdir()) == []
    assert (await conn.run("echo still", timeout_s=10)).stdout == "still\n"


async def test_a_huge_reason_from_the_host_is_kept_short(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that hangs up at login with a 30 kB reason: the error (what prepare_error,
    the snapshot and the log keep) and the logged event hold a bounded text."""
    from vastd.sim import hosts as sim_hosts

    reason = "the host says: " + "x" * 30_000

    def hang_up(self: Any, username: str) -> bool:
        raise asyncssh.DisconnectError(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, reason)

    monkeypatch.setattr(sim_hosts._Server, "begin_auth", hang_up)
    host = await sim_host()
    with structlog.testing.capture_logs() as logs, pytest.raises(SSHConnectionError) as raised:
        await ssh_pool().get("i1", ep(host))
    assert "the host says" in str(raised.value)
    assert len(str(raised.value)) <= ssh_mod.ERROR_TEXT_MAX + 100
    failed = [e for e in logs if e["event"] == "ssh_connect_failed"]
    assert failed and all(len(str(e["error"])) <= ssh_mod.ERROR_TEXT_MAX for e in failed)
