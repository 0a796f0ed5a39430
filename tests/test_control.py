"""The control socket in-process (vastd/orchestration/control.py, vastd/control.py): a
root whose socket path is longer than AF_UNIX allows, clients at once, too many
clients, and the answers' shapes. End to end with the daemon: tests/test_control_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.ctxfactory import SimEnv
from vastd.control import ControlError, request, run_command
from vastd.core.lock import RootLock
from vastd.core.state import JobState
from vastd.core.submit import submit_file
from vastd.orchestration import control
from vastd.orchestration.context import Context
from vastd.orchestration.workflow import accept_inbox_file


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        await e.start(instances=1)
        yield e


@contextlib.asynccontextmanager
async def serving(ctx: Context) -> AsyncIterator[control.ControlServer]:
    lock = RootLock(ctx.layout.root)
    lock.acquire()
    server = control.ControlServer(ctx)
    task = asyncio.create_task(server.run())
    try:
        for _ in range(200):
            if server.path.exists():
                break
            await asyncio.sleep(0.01)
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        lock.release()


async def test_a_long_root_is_served_through_its_folder(env: SimEnv, tmp_path: Path) -> None:
    """A root whose control.sock path is past the 108 bytes AF_UNIX allows still works."""
    root = tmp_path / ("r" * 60) / ("o" * 60) / "vastd"
    ctx = env.context(env.settings(root))
    assert len(str(root / "control.sock")) > 108
    async with serving(ctx):
        answer = await asyncio.to_thread(request, root, {"command": "ping"})
        assert answer["ok"] is True and answer["pid"] == os.getpid()
    assert not (root / "control.sock").exists()


async def test_cancel_of_a_queued_job_and_unknown_names(env: SimEnv) -> None:
    ctx = env.context()
    [job] = await env.submit(ctx, 1)
    async with serving(ctx):
        code, lines = await asyncio.to_thread(
            run_command, ctx.layout.root, {"command": "cancel", "jobs": [job, "nope"]}, "x"
        )
    assert code == 1
    assert lines == [(True, f"x: {job}: cancelled"), (False, "x: nope: no such job")]
    assert ctx.store.jobs[job].state is JobState.FAILED
    error = json.loads((ctx.layout.failed / f"{job}.error.json").read_text())
    assert error["reason"] == "cancelled"


async def test_retry_puts_a_file_refused_at_acceptance_back_in_the_inbox(env: SimEnv) -> None:
    """A refused file has no job record: `retry` hands it back to acceptance (after a
    config change it now passes), its .error.json gone; a duplicate's `<job>.dup-<n>`
    goes back under its job's own name."""
    ctx = env.context(env.settings(job={"max_input_bytes": 20}))
    [big] = env.make_job_files(1, rows=5)
    await accept_inbox_file(ctx, submit_file(ctx.layout, big))
    assert big.stem not in ctx.store.jobs
    assert (ctx.layout.failed / big.name).exists()
    ctx.settings.job.max_input_bytes = 10_000  # the config changed since
    [taken] = await env.submit(ctx, 1, prefix="taken")
    twin = env.tmp_path / "twin" / f"{taken}.csv"
    twin.parent.mkdir()
    twin.write_text("a,b\n1,2\n")
    await accept_inbox_file(ctx, submit_file(ctx.layout, twin))
    assert (ctx.layout.failed / f"{taken}.dup-1.csv").exists()
    async with serving(ctx):
        code, lines = await asyncio.to_thread(
            run_command,
            ctx.layout.root,
            {"command": "retry", "jobs": [big.stem, f"{taken}.dup-1", "nope"]},
            "x",
        )
    assert code == 1
    assert lines == [
        (True, f"x: {big.stem}: refused at acceptance: back in the inbox as {big.name}"),
        (True, f"x: {taken}.dup-1: refused at acceptance: back in the inbox as {taken}.csv"),
        (False, "x: nope: no such job"),
    ]
    assert not (ctx.layout.failed / big.name).exists()
    assert not (ctx.layout.failed / f"{big.stem}.error.json").exists()
    assert (ctx.layout.inbox / f"{taken}.csv").read_text() == "a,b\n1,2\n"
    await accept_inbox_file(ctx, ctx.layout.inbox / big.name)
    assert ctx.store.jobs[big.stem].state is JobState.QUEUED


async def test_clients_at_once_are_served_and_too_many_refused(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    ctx = env.context()
    async with serving(ctx) as server:
        idle = []
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(server.path))
            idle.append(sock)
        await asyncio.sleep(0.1)
        try:
            with pytest.raises(ControlError, match="too many control clients"):
                await asyncio.to_thread(run_command, ctx.layout.root, {"command": "ping"}, "x")
        finally:
            for sock in idle:
                sock.close()
        await asyncio.sleep(0.1)
        answers: list[Any] = await asyncio.gather(
            *(asyncio.to_thread(request, ctx.layout.root, {"command": "ping"}) for _ in range(2))
        )
        assert all(a["ok"] for a in answers)


async def test_several_requests_on_one_connection(env: SimEnv) -> None:
    ctx = env.context()
    async with serving(ctx) as server:
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(b'{"command": "ping"}\n{"command": "drain", "instance": "nope"}\n')
        await writer.drain()
        first = json.loads(await reader.readline())
        second = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
    assert first["ok"] is True
    assert second == {
        "ok": False,
        "results": [{"name": "nope", "ok": False, "message": "no such instance"}],
    }


def test_no_daemon_is_said_before_any_socket_is_tried(tmp_path: Path) -> None:
    (tmp_path / "control.sock").write_text("")  # not even a socket
    with pytest.raises(ControlError, match=f"no daemon is running for {tmp_path}"):
        request(tmp_path, {"command": "ping"})
