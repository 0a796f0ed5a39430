"""SIGHUP (CONTRACT §10): the daemon re-reads its config, applies the live keys or refuses the
reload saying why, and never stops; the unit test shows the running objects see the change."""

from __future__ import annotations

import asyncio
import signal
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import dump_toml
from tests.test_daemon_process import DaemonProcess, write_config
from vastd import __version__
from vastd import daemon as daemon_mod
from vastd.daemon import Daemon
from vastd.sim.cluster import SimCluster
from vastd.utils.config import load_config

pytestmark = pytest.mark.e2e


def edit(config: Path, **sections: dict[str, Any]) -> None:
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config.write_text(dump_toml(data), encoding="utf-8")


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCluster]:
    cluster = await SimCluster.start(tmp_path / "sim", instances=0)
    yield cluster
    await cluster.aclose()


async def test_sighup_reloads_refuses_and_never_stops(tmp_path: Path, sim: SimCluster) -> None:
    config, _root = write_config(sim, tmp_path)
    daemon = await DaemonProcess.start(config)
    try:
        started = await daemon.wait_event("daemon_started")
        assert started["version"] == __version__
        assert started["config"] == str(config)

        # live keys: applied, and the event says what changed (old, new)
        edit(config, fleet={"max_instances": 7, "idle_timeout_s": 5.0}, job={"max_attempts": 5})
        edit(config, log={"level": "debug"})
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = await daemon.wait_event("config_reloaded")
        assert reloaded["changed"] == {
            "fleet.max_instances": [64, 7],
            "fleet.idle_timeout_s": [600.0, 5.0],
            "job.max_attempts": [3, 5],
            "log.level": ["info", "debug"],
        }
        assert reloaded["level"] == "info"

        # an invalid file: refused with the problem, nothing applied
        edit(config, fleet={"max_instances": -1})
        daemon.proc.send_signal(signal.SIGHUP)
        refused = await daemon.wait_event("config_reload_refused")
        assert refused["level"] == "warning"
        assert any("fleet.max_instances" in p for p in refused["problems"])

        # a key that needs a restart: refused as a whole, naming the key
        edit(config, fleet={"max_instances": 2}, paths={"root": str(tmp_path / "other")})
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_event("config_reload_refused", keys=["paths.root"])

        assert daemon.proc.returncode is None
        assert await daemon.stop() == 0
        assert daemon.events("daemon_stopping", signal="SIGTERM")
        assert not daemon.events("daemon_fatal")
    finally:
        await daemon.kill()


async def test_reload_changes_the_running_sections_in_place(
    tmp_path: Path, sim: SimCluster
) -> None:
    """The Settings' section objects the Context shares get the new values: no copy goes stale."""
    config, _root = write_config(sim, tmp_path)
    settings = load_config(config)
    fleet = settings.fleet
    d = Daemon(settings, config_path=config)
    edit(config, fleet={"max_instances": 9, "max_total_dph": 3.5}, job={"timeout_s": 60.0})
    assert await d.reload()
    assert settings.fleet is fleet
    assert (fleet.max_instances, fleet.max_total_dph) == (9, 3.5)
    assert settings.job.timeout_s == 60.0
    edit(config, fleet={"offer_query": "num_gpus>=2", "max_instances": 1})
    assert not await d.reload()
    assert fleet.max_instances == 9  # refused: nothing applied


async def test_reload_without_a_file_is_refused(tmp_path: Path, sim: SimCluster) -> None:
    config, _root = write_config(sim, tmp_path)
    assert not await Daemon(load_config(config)).reload()


def peek_wakeup_fd() -> int:
    old = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old)
    return old


async def test_the_stopped_daemon_hands_its_signals_back_before_the_loop_closes(
    tmp_path: Path, sim: SimCluster
) -> None:
    """Closing the loop closes its wake-up pipe before it removes its signal handlers: a
    signal in between printed an "Exception ignored" traceback (CI saw one on a second
    SIGINT). Once stopped, the daemon removes them itself, the loop still open: no
    wake-up fd is left, a late SIGINT exits at once, SIGTERM and SIGHUP are ignored."""
    config, _root = write_config(sim, tmp_path)
    daemon = Daemon(load_config(config), config_path=config)
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        run = asyncio.create_task(daemon.run())
        async with asyncio.timeout(20):
            await daemon.started.wait()
            assert peek_wakeup_fd() != -1  # the loop's, while it handles them
            daemon.should_exit.set()
            assert await run == 0
        assert peek_wakeup_fd() == -1
        assert signal.getsignal(signal.SIGINT) is daemon_mod._exit_on_late_sigint
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
