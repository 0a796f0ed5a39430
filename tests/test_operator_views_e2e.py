"""`vastd jobs`, `vastd report` and `vastd status` as an operator runs them: separate
processes beside a daemon that runs over the simulator, then after it stopped.

One campaign: a job that succeeds (and its name submitted again: a refused duplicate), one
that fails for good, one that prints progress lines and keeps running, and one left queued
behind it (one instance, one slot).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_for, clean_env
from tests.localrunner import kill_leftover_jobs
from tests.test_daemon_process import (
    REPO,
    DaemonProcess,
    cluster,
    daemons,
    submit,
    write_config,
)
from vastd.sim.cluster import SimCluster, examples_dir, load_make_jobs

pytestmark = pytest.mark.e2e
__all__ = ["cluster", "daemons"]  # the fixtures, used by name

WRAPPER = """mode=$1; shift
case $mode in
  bad) echo "error: bad on purpose" >&2; exit 3 ;;
  slow) echo "progress: 2 rows"; echo "other noise"; sleep 1; echo "progress: 3 rows"; sleep 60 ;;
esac
exec "$@"
"""


async def vastd(config: Path, *args: str) -> tuple[int, str, str]:
    """`python -m vastd ARGS --config PATH` as its own process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vastd",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def jobs_json(config: Path) -> dict[str, dict[str, Any]]:
    code, out, err = await vastd(config, "jobs", "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return {r["id"]: r for r in rows}


def job_files(folder: Path, names: list[str]) -> list[Path]:
    """One 3-row GARCH job file per name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed, name in enumerate(names):
        (made,) = load_make_jobs()(folder / f"tmp{seed}", 1, 3, seed, prefix="j")
        out.append(made.rename(folder / f"{name}.csv"))
    return out


@pytest.fixture
async def campaign(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> AsyncIterator[tuple[Path, Path, DaemonProcess]]:
    sim = await cluster(instances=1)
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(WRAPPER)
    worker = examples_dir() / "garch_worker.py"
    command = (
        f"sh {shlex.quote(str(wrapper))} {{mode}} {shlex.quote(sys.executable)} "
        f"{shlex.quote(str(worker))} {{input}} --num_sim 2000 --num_quantiles 64 --stride 1"
    )
    config, root = write_config(
        sim,
        tmp_path,
        job={
            "command": command,
            "vars": {"mode": "ok"},
            "patterns": [
                {"glob": "bad_*", "vars": {"mode": "bad"}},
                {"glob": "slow_*", "vars": {"mode": "slow"}},
            ],
            "max_attempts": 1,
            "progress_regex": r"^progress: (\d+) rows",
            "poll_interval_s": 1.0,
            "timeout_s": 600,
        },
    )
    daemon = await daemons(config)
    await daemon.wait_event("daemon_started")
    try:
        yield config, root, daemon
    finally:
        await daemon.kill()
        kill_leftover_jobs(sim.remote_root)


async def test_jobs_report_and_status_name_every_job_daemon_or_not(
    tmp_path: Path, campaign: tuple[Path, Path, DaemonProcess]
) -> None:
    config, root, daemon = campaign
    ok, bad, slow, queued = job_files(tmp_path / "jobs", ["ok_1", "bad_1", "slow_1", "q_1"])
    await submit(config, [ok, bad])
    await daemon.wait_event("job_done", job="ok_1")
    await daemon.wait_event("job_failed", job="bad_1")
    # The done name submitted again: refused to failed/ok_1.dup-1.csv.
    again = tmp_path / "again" / "ok_1.csv"
    again.parent.mkdir()
    again.write_bytes(ok.read_bytes())
    await submit(config, [again])
    await async_wait_for(
        lambda: (root / "failed" / "ok_1.dup-1.error.json").is_file(), 30, message=daemon.tail
    )
    await submit(config, [slow])
    await daemon.wait_event("job_started", job="slow_1")
    await submit(config, [queued])
    await daemon.wait_event("job_accepted", job="q_1")

    # Progress from the slow job's log shows in `vastd jobs` while it runs.
    async def progress() -> int | None:
        value: int | None = (await jobs_json(config))["slow_1"]["progress_rows"]
        return value

    for _ in range(60):
        if await progress() == 3:
            break
        await asyncio.sleep(0.5)
    rows = await jobs_json(config)
    assert rows["slow_1"]["progress_rows"] == 3, daemon.tail()
    assert set(rows) == {"ok_1", "bad_1", "slow_1", "q_1", "ok_1.dup-1"}
    for row in rows.values():
        assert {"id", "state", "instance", "attempts", "runs"} <= set(row)
    assert rows["ok_1"]["state"] == "done"
    assert rows["ok_1"]["runs"] == 1
    assert rows["ok_1"]["instance"] is not None
    assert rows["bad_1"]["state"] == "failed"
    assert rows["bad_1"]["attempts"] == 1
    assert rows["slow_1"]["state"] == "running"
    assert rows["q_1"]["state"] == "queued"
    assert rows["ok_1.dup-1"]["state"] == "failed"
    assert rows["ok_1.dup-1"]["refused"] is True

    code, text, err = await vastd(config, "jobs")
    assert code == 0, err
    assert "3/3 (100%)" in text  # slow_1: 3 of its 3 rows
    assert "daemon: running" in text
    code, out, err = await vastd(config, "jobs", "--state", "queued", "--json")
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == ["q_1"]
    code, out, err = await vastd(config, "jobs", "--state", "finished")
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "unknown state 'finished'" in err

    # The report: rows in and out from MANIFEST.json, and every job not done with why.
    manifest = json.loads((root / "results" / "ok_1" / "MANIFEST.json").read_text())
    code, out, err = await vastd(config, "report", "--json")
    assert code == 0, err
    report = json.loads(out)
    by_id = {j["id"]: j for j in report["jobs"]}
    assert by_id["ok_1"]["rows_in"] == 3
    assert by_id["ok_1"]["rows_out"] == manifest["rows_out"] > 0
    assert by_id["ok_1"]["cost"] == manifest["cost"]
    assert by_id["ok_1"]["gpu"] == manifest["gpu"]
    why = {n["id"]: n for n in report["not_done"]}
    assert set(why) == {"bad_1", "ok_1.dup-1", "slow_1", "q_1"}
    assert "exit code 3" in why["bad_1"]["why"]
    assert why["ok_1.dup-1"]["state"] == "refused"
    assert "done" in why["ok_1.dup-1"]["why"]
    assert why["q_1"]["state"] == "queued"
    assert why["slow_1"]["state"] == "running"
    totals = report["totals"]
    assert (totals["jobs"], totals["done"], totals["failed"]) == (5, 1, 2)
    assert report["daemon_running"] is True
    code, text, err = await vastd(config, "report")
    assert code == 0, err
    assert "totals: 5 jobs  1 done  2 failed" in text
    for name in ("bad_1", "ok_1.dup-1", "slow_1", "q_1"):
        assert f"  {name}  " in text

    code, text, err = await vastd(config, "status")
    assert code == 0, err
    assert "failed 2 (1 refused)" in text
    assert "slow_1" in text and "3/3 rows" in text
    assert "/h now" in text

    # With the daemon stopped: the same views, from the files alone, saying so.
    assert await daemon.stop(signal.SIGTERM) == 0
    code, text, err = await vastd(config, "status")
    assert code == 0, err
    assert "daemon: not running; figures as of 20" in text
    assert "/h now" not in text
    code, out, err = await vastd(config, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["daemon_running"] is False
    assert set(await jobs_json(config)) == set(rows)
    code, text, err = await vastd(config, "jobs")
    assert code == 0, err
    assert "daemon: not running; as of 20" in text
    code, text, err = await vastd(config, "report")
    assert code == 0, err
    assert "daemon: not running" in text
    print("\n$ vastd jobs\n" + (await vastd(config, "jobs"))[1])
    print("$ vastd report\n" + text)
