"""A whole simulated vast.ai account on this machine: the fake API plus one real
SSH server (asyncssh, 127.0.0.1) per instance, and settings that point vastd at it.

Used by `vastd demo`, by the end-to-end tests and by the benchmarks.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh
from aiohttp import web

from vastd.sim.api import SimCloud, start_sim_api
from vastd.sim.hosts import LocalHostProvider
from vastd.utils.config import PrepareStep, Settings


def examples_dir() -> Path:
    """The demo's worker and job generator, shipped as package data (examples/ links to them)."""
    here = Path(__file__).resolve().parent / "examples"
    env = os.environ.get("VASTD_EXAMPLES_DIR")
    path = Path(env) if env else here
    if not (path / "garch_worker.py").is_file():
        raise FileNotFoundError(
            f"{path}/garch_worker.py not found: reinstall vastd or set VASTD_EXAMPLES_DIR"
        )
    return path


def load_make_jobs() -> Callable[..., list[Path]]:
    """`make_jobs(folder, n_jobs, rows_per_job, seed, prefix=...)` from examples/make_jobs.py."""
    path = examples_dir() / "make_jobs.py"
    spec = importlib.util.spec_from_file_location("vastd_example_make_jobs", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Callable[..., list[Path]], module.make_jobs)


def write_client_key(folder: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair in `folder` (private key 0600); returns (path, public line)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = folder / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    public = key.export_public_key().decode().strip()
    (folder / "id_ed25519.pub").write_text(public + "\n")
    return path, public


@dataclass
class SimCluster:
    workdir: Path
    cloud: SimCloud
    hosts: LocalHostProvider
    runner: web.AppRunner
    url: str
    api_key: str
    key_file: Path
    public_key: str

    @property
    def remote_root(self) -> Path:
        return self.workdir / "remote"

    @classmethod
    async def start(
        cls,
        workdir: Path,
        *,
        instances: int = 0,
        label: str = "vastd",
        boot_delay_s: float = 0.2,
        n_offers: int = 24,
        login_banner: str = "",
        shared_servers: int = 0,
        **cloud_kwargs: Any,
    ) -> SimCluster:
        """`shared_servers=N`: the instances share N SSH servers (see LocalHostProvider)."""
        workdir.mkdir(parents=True, exist_ok=True)
        key_file, public = write_client_key(workdir / "keys")
        api_key = "sim-" + secrets.token_hex(16)
        hosts = LocalHostProvider(
            workdir / "hosts", login_banner=login_banner, shared_servers=shared_servers
        )
        cloud = SimCloud(
            api_key,
            host_provider=hosts,
            account_keys=[public],
            boot_delay_s=boot_delay_s,
            n_offers=n_offers,
            **cloud_kwargs,
        )
        for _ in range(instances):
            await cloud.add_instance(label=label)
        runner, url = await start_sim_api(cloud)
        (workdir / "remote").mkdir(exist_ok=True)
        return cls(workdir, cloud, hosts, runner, url, api_key, key_file, public)

    def settings(
        self,
        root: Path,
        *,
        num_sim: int = 2000,
        num_quantiles: int = 64,
        python: str = sys.executable,
        **sections: dict[str, Any],
    ) -> Settings:
        """Settings that run the example GARCH worker on this cluster's instances."""
        worker = shlex.quote(str(examples_dir() / "garch_worker.py"))
        python = shlex.quote(python)
        data: dict[str, Any] = {
            "paths": {"root": str(root)},
            "vast": {
                "api_url": self.url,
                "api_key": self.api_key,
                "api_key_file": None,
                "poll_interval_s": 1.0,
                "lost_grace_s": 5.0,
            },
            "ssh": {
                "user": "vastd",
                "key_file": str(self.key_file),
                "known_hosts": "tofu",
                "connect_timeout_s": 5.0,
                "keepalive_interval_s": 5.0,
                "command_timeout_s": 20.0,
            },
            "remote": {"root": str(self.remote_root)},
            "prepare": [
                PrepareStep(
                    name="python with numpy and pyarrow",
                    check=f"{python} -c 'import numpy, pyarrow'",
                    install="",
                    timeout_s=60,
                ).model_dump()
            ],
            "job": {
                "command": (
                    f"{python} {worker} {{input}} --num_sim {{num_sim}} "
                    f"--num_quantiles {num_quantiles} --stride 1"
                ),
                "vars": {"num_sim": str(num_sim)},
                "poll_interval_s": 1.0,
                "timeout_s": 600,
            },
            "fleet": {"mode": "adopt", "max_instances": 64},
        }
        for section, values in sections.items():
            if isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        return Settings(**data)

    async def aclose(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            await self.cloud.aclose()
            await self.hosts.aclose()
