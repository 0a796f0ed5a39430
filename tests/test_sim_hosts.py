"""SimHost and LocalHostProvider: simulated instances as real in-process SSH servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import ClientKey
from vastd.core.ssh import Endpoint, SSHPool
from vastd.sim.hosts import LocalHostProvider, SimHost
from vastd.utils.exceptions import SSHConnectionError

SimHostFactory = Callable[..., Awaitable[SimHost]]
PoolFactory = Callable[..., SSHPool]


def refuses_connections(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return False
    except OSError:
        return True


async def test_start_runs_commands_in_root(sim_host: SimHostFactory, ssh_pool: PoolFactory) -> None:
    """A started host listens on a loopback port and runs commands with cwd = its root."""
    host = await sim_host("i7")
    assert host.running and host.host == "127.0.0.1" and host.port > 0
    conn = await ssh_pool().get("i7", [Endpoint(*host.address)])
    assert (await conn.run("pwd", timeout_s=5)).stdout.strip() == str(host.root)


async def test_kill_then_revive_on_the_same_port(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """kill() drops the listener and connections at once; start() comes back on the same port."""
    host = await sim_host()
    pool = ssh_pool()
    await pool.get("i1", [Endpoint(*host.address)])
    port = host.port
    await host.kill()
    assert not host.running and host.active_connections == 0
    assert refuses_connections(host.address)
    assert await host.restart() == ("127.0.0.1", port)
    conn = await pool.get("i1", [Endpoint(*host.address)])
    assert (await conn.run("echo up", timeout_s=5)).stdout == "up\n"


async def test_unknown_key_is_refused(
    sim_host: SimHostFactory, ssh_pool: PoolFactory, ssh_settings: Callable[..., object]
) -> None:
    """A client whose key is not authorized cannot log in, until the key is added."""
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    host = await sim_host()
    pool = ssh_pool(client_keys=[stranger])
    with pytest.raises(SSHConnectionError):
        await pool.get("i1", [Endpoint(*host.address)])
    host.set_authorized_keys([stranger.export_public_key().decode()])
    assert (await (await pool.get("i1", [Endpoint(*host.address)])).run("true", timeout_s=5)).ok


async def test_concurrent_gets_share_one_failed_attempt(
    sim_host: SimHostFactory, ssh_pool: PoolFactory
) -> None:
    """Tasks waiting on an instance's connect get its failure instead of each retrying."""
    host = await sim_host(authorized_keys=[])
    pool = ssh_pool(connect_attempts=2)
    results = await asyncio.gather(
        *(pool.get("i1", [Endpoint(*host.address)]) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, SSHConnectionError) for r in results)
    assert host.connections_total == 2


async def test_local_host_provider_lifecycle(
    tmp_path: Path, client_key: ClientKey, ssh_pool: PoolFactory
) -> None:
    """The provider starts one host per instance id, kills, revives and stops it."""
    provider = LocalHostProvider(tmp_path)
    try:
        addr = await provider.start_host(5, [client_key.public])
        assert await provider.start_host(5, [client_key.public]) == addr  # idempotent
        pool = ssh_pool()
        conn = await pool.get("5", [Endpoint(*addr)])
        assert (await conn.run("pwd", timeout_s=5)).stdout.strip() == str(tmp_path / "5")
        await provider.kill_host(5)
        assert refuses_connections(addr)
        assert await provider.revive_host(5) == addr
        await provider.stop_host(5)
        assert refuses_connections(addr)
    finally:
        await provider.aclose()


async def test_instances_can_share_a_few_servers(
    tmp_path: Path, client_key: ClientKey, ssh_pool: PoolFactory
) -> None:
    """shared_servers=2: five instances on two servers (round robin); a shared server
    stops only once every instance on it has stopped."""
    provider = LocalHostProvider(tmp_path, shared_servers=2)
    try:
        addrs = [await provider.start_host(i, [client_key.public]) for i in range(5)]
        assert len(set(addrs)) == 2 and len(provider.servers) == 2
        assert addrs[0] == addrs[2] == addrs[4] and addrs[1] == addrs[3]
        assert provider.get(0) is provider.get(4)
        pool = ssh_pool()
        for i in (0, 2):  # two instances, one server, separate connections
            conn = await pool.get(str(i), [Endpoint(*addrs[i])])
            assert (await conn.run("echo up", timeout_s=5)).stdout == "up\n"
        await provider.stop_host(0)
        await provider.stop_host(2)
        assert provider.get(4).running  # instance 4 is still on it
        await provider.stop_host(4)
        assert refuses_connections(addrs[0])
        assert provider.get(1).running
    finally:
        await provider.aclose()
