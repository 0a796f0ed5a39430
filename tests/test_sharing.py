"""`[paths] group` (CONTRACT §10): inbox/ 2770 and results/ 2750 for the group, results
group-readable once installed; "" leaves every folder owner-only."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from tests.test_check_config import check, make_config
from tests.test_daemon_process import DaemonProcess, submit, write_config
from vastd.sim.cluster import SimCluster, load_make_jobs

MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.e2e
async def test_group_gets_inbox_and_results(tmp_path: Path) -> None:
    sim = await SimCluster.start(tmp_path / "sim", instances=1)
    daemon: DaemonProcess | None = None
    try:
        config, root = write_config(sim, tmp_path, paths={"group": MY_GROUP})
        daemon = await DaemonProcess.start(config)
        await daemon.wait_event("daemon_started")
        gid = os.getgid()
        assert (mode(root), mode(root / "inbox"), mode(root / "results")) == (
            0o710,
            0o2770,
            0o2750,
        )
        assert (root / "inbox").stat().st_gid == gid
        assert mode(root / "queued") == 0o700  # the rest stays the daemon's own
        [source] = load_make_jobs()(tmp_path / "jobs", 1, 2, 3, prefix="garch_test_job")
        await submit(config, [source])
        job = source.stem
        await daemon.wait_event("job_done", job=job, timeout_s=60)
        results = root / "results" / job
        assert mode(results) == 0o2750 and results.stat().st_gid == gid
        files = [p for p in results.rglob("*") if p.is_file()]
        assert files and all(mode(p) == 0o640 and p.stat().st_gid == gid for p in files)
        assert mode(root / "state.json") == 0o600
        assert await daemon.stop() == 0
    finally:
        if daemon is not None:
            await daemon.kill()
        await sim.aclose()


@pytest.mark.e2e
async def test_no_group_keeps_everything_owner_only(tmp_path: Path) -> None:
    sim = await SimCluster.start(tmp_path / "sim", instances=0)
    daemon: DaemonProcess | None = None
    try:
        config, root = write_config(sim, tmp_path)
        daemon = await DaemonProcess.start(config)
        await daemon.wait_event("daemon_started")
        assert {mode(root / f) for f in ("inbox", "results", "queued")} == {0o700}
        assert await daemon.stop() == 0
    finally:
        if daemon is not None:
            await daemon.kill()
        await sim.aclose()


def test_unknown_group_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = check(make_config(tmp_path, paths={"group": "no-such-group-xyz"}), capsys)
    assert code == 2 and "paths.group" in err and "no-such-group-xyz" in err


async def test_unknown_group_stops_the_daemon_with_exit_2(tmp_path: Path) -> None:
    """The group vanished between check-config and the start: exit 2, one line."""
    sim = await SimCluster.start(tmp_path / "sim", instances=0)
    try:
        config, _root = write_config(sim, tmp_path, paths={"group": "no-such-group-xyz"})
        daemon = await DaemonProcess.start(config)
        try:
            code = await daemon.wait_exit(30)
        finally:
            await daemon.kill()
        assert code == 2
        assert b"paths.group" in daemon.stderr and b"Traceback" not in daemon.stderr
    finally:
        await sim.aclose()
