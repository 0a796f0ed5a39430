"""Shared fixtures: a client key, SSH settings, simulated hosts and a real OpenSSH sshd.

Fixtures that make things are factories and clean up what they made.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

# Every save and index query in the suite (daemons started by it too) is checked against a
# full dump and scan: a record changed without its store hearing of it fails loudly.
os.environ.setdefault("VASTD_CHECK_STATE", "1")

# Make `tests.sshd` (and other helpers under tests/) importable without tests/__init__.py.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.sshd import OpenSSHServer, unavailable_reason  # noqa: E402
from vastd.core.ssh import Backoff, SSHPool  # noqa: E402
from vastd.sim.hosts import SimHost  # noqa: E402
from vastd.utils.config import SshSettings  # noqa: E402


@dataclass(frozen=True)
class ClientKey:
    key: asyncssh.SSHKey
    path: Path  # the private key file, for SshSettings.key_file
    public: str  # the OpenSSH public key line, for authorized keys


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    """An ed25519 client key made once per test session, also written to a file."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path_factory.mktemp("client-key") / "id_ed25519"
    key.write_private_key(path)
    path.chmod(0o600)
    return ClientKey(key, path, key.export_public_key().decode().strip())


@pytest.fixture
def ssh_settings(client_key: ClientKey) -> Callable[..., SshSettings]:
    """Factory: SshSettings using `client_key`, short timeouts; keyword overrides."""

    def make(**overrides: Any) -> SshSettings:
        values: dict[str, Any] = {
            "user": "root",
            "key_file": client_key.path,
            "known_hosts": "tofu",
            "connect_timeout_s": 5.0,
            "keepalive_interval_s": 2.0,
        }
        values.update(overrides)
        return SshSettings(**values)

    return make


@pytest.fixture
async def sim_host(tmp_path: Path, client_key: ClientKey) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await sim_host(instance_id="i1", **SimHost kwargs)` -> a started SimHost.

    It authorizes `client_key` unless `authorized_keys=` is given; its root is under
    tmp_path. Every host made is stopped at teardown.
    """
    hosts: list[SimHost] = []

    async def make(instance_id: str = "i1", **kwargs: Any) -> SimHost:
        kwargs.setdefault("authorized_keys", [client_key.public])
        host = SimHost(instance_id, tmp_path / "hosts" / instance_id, **kwargs)
        await host.start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        await host.stop()


@pytest.fixture
def openssh_server(client_key: ClientKey) -> Iterator[Callable[..., OpenSSHServer]]:
    """Factory: `openssh_server(**OpenSSHServer kwargs)` -> a started real sshd.

    Log in as `server.user` (vastdtest) with `client_key`; write under
    `server.remote_root` (owned by that user). Skips where the OpenSSH tier cannot
    run, unless $CI or $VASTD_REQUIRE_SSHD is set: then it fails instead.
    """
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("VASTD_REQUIRE_SSHD"):
            pytest.fail(reason)
        pytest.skip(reason)
    servers: list[OpenSSHServer] = []

    def make(**kwargs: Any) -> OpenSSHServer:
        kwargs.setdefault("authorized_keys", [client_key.public])
        server = OpenSSHServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture
async def ssh_pool(
    ssh_settings: Callable[..., SshSettings],
) -> AsyncIterator[Callable[..., SSHPool]]:
    """Factory: `ssh_pool(settings=None, **SSHPool kwargs)` -> an SSHPool, closed at teardown.

    Defaults: `ssh_settings()` and zero reconnect backoff.
    """
    pools: list[SSHPool] = []

    def make(settings: SshSettings | None = None, **kwargs: Any) -> SSHPool:
        kwargs.setdefault("backoff", Backoff(base_s=0.0))
        pool = SSHPool(settings if settings is not None else ssh_settings(), **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


# --- the OpenSSH tier: a simulated account whose instances are real sshds ---------------------
@pytest.fixture
async def openssh_cloud() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await openssh_cloud(tmp_path, instances=3)`; everything is torn down after."""
    from tests.openssh_cluster import OpenSSHCloud

    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("VASTD_REQUIRE_SSHD"):
            pytest.fail(reason)
        pytest.skip(reason)
    clouds: list[OpenSSHCloud] = []

    async def make(workdir: Path, *, instances: int = 3) -> OpenSSHCloud:
        cloud = await OpenSSHCloud.start(workdir, instances=instances)
        clouds.append(cloud)
        return cloud

    yield make
    for cloud in clouds:
        await cloud.aclose()


@pytest.fixture
def daemon() -> Iterator[Callable[..., Any]]:
    """Factory: `daemon(cloud, config_path, log_path)` starts `vastd run`; killed if left over."""
    from tests.openssh_cluster import DaemonProcess, OpenSSHCloud

    started: list[DaemonProcess] = []

    def start(cloud: OpenSSHCloud, config: Path, log_path: Path) -> DaemonProcess:
        proc = DaemonProcess(config, cloud.daemon_env(), log_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
