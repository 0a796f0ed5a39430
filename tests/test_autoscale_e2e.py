"""End to end: the real daemon (a subprocess) in autoscale mode against the simulator, killed
with SIGKILL between the rent call and the save of its answer, then restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_for, clean_env, dump_toml, saved_jobs
from tests.test_fleet import close_cluster, fleet_settings
from vastd.core.files import Layout
from vastd.core.submit import submit_file
from vastd.sim.cluster import SimCluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Daemon:
    """`python -m vastd run` with its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path, api_key: str) -> None:
        self.config, self.log_path, self.api_key = config, log_path, api_key
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vastd",
            "run",
            "--config",
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=clean_env({"VASTD_VAST__API_KEY": self.api_key}),
        )
        out.close()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(20):
            return await self.proc.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                out.append(entry)
        return out


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    """A simulated account with three offers, stopped (and its commands reaped) at the end."""
    made = await SimCluster.start(tmp_path / "sim", n_offers=0, boot_delay_s=0.2)
    for i in range(3):
        made.cloud.add_offer(gpu_name="RTX 4090", dph_total=0.3 + i / 100, machine_id=500 + i)
    try:
        yield made
    finally:
        await close_cluster(made)


def state(layout: Layout) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(layout.state_file.read_text())
        data["jobs"] = saved_jobs(layout.root)  # finished jobs are in history.jsonl
    except (OSError, ValueError):
        return {}
    return data


async def test_kill_between_rent_and_save_leaves_exactly_one_instance(
    cluster: SimCluster, tmp_path: Path
) -> None:
    """The rent creates the instance but its answer is held back; the daemon is SIGKILLed
    while waiting (intent saved, instance not). After a restart the labelled instance is
    claimed as owned through its VASTD_INTENT (no second rental), runs the job, and is
    destroyed when idle: one rental in total, nothing left in the account."""
    root = tmp_path / "vastd"
    settings = fleet_settings(
        cluster, root, job_s=0.3, max_instances=1, idle_timeout_s=1.0, boot_timeout_s=30.0
    )
    data = settings.model_dump(mode="json", by_alias=True)
    data["vast"].pop("api_key")
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(data))
    layout = Layout(root)
    cloud = cluster.cloud
    hold = cloud.faults.add(endpoint="rent", status=None, delay_s=60, after_effect=True)

    daemon = Daemon(config, tmp_path / "daemon.log", cluster.api_key)
    await daemon.start()
    try:
        await async_wait_for(layout.inbox.exists, 20, message="daemon started")
        src = tmp_path / "job_0001.csv"
        src.write_text("a,b\n1,2\n")
        submit_file(layout, src)
        await async_wait_for(lambda: len(cloud.instances) == 1, 30, message="rent sent")
        await async_wait_for(lambda: state(layout).get("rent_intents"), 10, message="intent")
        assert state(layout)["instances"] == {}
        assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        cloud.faults.remove(hold)
        (iid,) = cloud.instances

        await daemon.start()
        await async_wait_for(
            lambda: (layout.done / "job_0001.csv").exists(), 60, message="job done"
        )
        await async_wait_for(lambda: not cloud.instances, 30, message="instance destroyed")
        # The destroy is logged once confirmed by listing, a moment after the DELETE.
        await async_wait_for(
            lambda: daemon.events("instance_destroyed"), 30, message="destroy confirmed"
        )
        assert cloud.stats["rent"] == 1
        claimed = [e for e in daemon.events("instance_rented") if e.get("reconciled")]
        # The first daemon's discovery may already claim it while the PUT hangs; if that
        # claim was not saved before the kill, the second claims it again: same instance.
        assert {e["instance"] for e in claimed} == {str(iid)}
        assert [e["instance"] for e in daemon.events("instance_destroyed")] == [str(iid)]
        assert await daemon.stop() == 0
        final = state(layout)
        assert final["rent_intents"] == {}
        record = final["instances"][str(iid)]
        assert record["owned"] and record["status"] == "destroyed"
        assert final["jobs"]["job_0001"]["state"] == "done"
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()
        os.environ.pop("VASTD_VAST__API_KEY", None)
