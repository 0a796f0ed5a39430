"""Results from a hostile or broken host, end to end against a SimCluster.

A parquet bomb, a validator that hangs, results past the count or size caps, a local
disk near its floor, and results short of rows: each fails the attempt (or makes the
job wait) with a reason, and never harms the daemon's process.
"""

from __future__ import annotations

import json
import resource
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import WORKER, SimEnv, async_wait_for, group_alive, pump, wait_state
from vastd.core.state import JobState
from vastd.execution import result_handler
from vastd.orchestration import coordinator as co
from vastd.orchestration.context import Context


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


BOMB_VALUE_BYTES = 400_000_000


@pytest.fixture(scope="module")
def parquet_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's bomb: a ~12.6 kB parquet file holding one 400 MB zero-filled value.

    Written by a child process, so that building it leaves this process's memory alone.
    """
    path = tmp_path_factory.mktemp("bomb") / "bomb.parquet"
    script = (
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n"
        f"value = bytes({BOMB_VALUE_BYTES})\n"
        "table = pa.table({'x': pa.array([value], pa.binary())})\n"
        "pq.write_table(table, sys.argv[1], compression='zstd', compression_level=19)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=120)
    assert path.stat().st_size < 100_000
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_one(env: SimEnv, ctx: Context, *, rows: int = 2) -> Any:
    """Submit one job, dispatch it, and drive it until DONE or FAILED."""
    await env.ready(ctx)
    [job_id] = await env.submit(ctx, rows=rows)
    await co.coordinate_job_distribution(ctx)
    return await wait_state(ctx, job_id, JobState.DONE, JobState.FAILED, timeout_s=60)


def error_reason(ctx: Context, job_id: str) -> str:
    reason: str = json.loads(ctx.layout.error_file(job_id).read_text())["reason"]
    return reason


# --- item 7: validation outside the daemon ---------------------------------------------------
async def test_a_parquet_bomb_fails_the_attempt_and_leaves_the_daemon_alone(
    env: SimEnv, parquet_bomb: Path
) -> None:
    """A 12.6 kB parquet holding one 400 MB value: the validator (a child limited to
    `validate_memory_mb`) runs out of memory, the attempt fails with a reason that says
    so, and this process (the daemon) never holds the value."""
    await env.start(instances=1)
    command = f"cp {shlex.quote(str(parquet_bomb))} r.parquet"
    settings = env.settings(job={"command": command, "max_attempts": 1, "validate_memory_mb": 256})
    ctx = env.context(settings)
    before = peak_rss_mb()

    job = await run_one(env, ctx)

    assert job.state is JobState.FAILED
    reason = error_reason(ctx, job.id)
    assert "results invalid" in reason and "validate_memory_mb" in reason, reason
    assert peak_rss_mb() - before < BOMB_VALUE_BYTES / 2**20 / 2
    assert list(ctx.layout.results.iterdir()) == [], "nothing of the bomb is kept"


async def test_a_validator_past_its_deadline_fails_the_attempt(env: SimEnv) -> None:
    """`validate_command` that hangs: killed at `validate_timeout_s` (its whole process
    group), the attempt fails with a reason naming the deadline."""
    await env.start(instances=1)
    marker = env.tmp_path / "hung.pid"
    hang = f"echo $$ > {shlex.quote(str(marker))}; sleep 300"
    settings = env.settings(
        job={"max_attempts": 1, "validate_command": hang, "validate_timeout_s": 2.0}
    )
    ctx = env.context(settings)

    job = await run_one(env, ctx)

    assert job.state is JobState.FAILED
    assert "deadline of 2s" in error_reason(ctx, job.id)
    pgid = int(marker.read_text())  # the validator's shell leads its own process group
    await async_wait_for(lambda: not group_alive(pgid), 10, message="hang killed")


async def test_validate_command_decides_in_the_downloaded_folder(env: SimEnv) -> None:
    """`validate_command` runs in the folder holding the downloaded results (also
    $VASTD_RESULT_DIR): exit 0 accepts them, anything else fails the attempt with its
    output as the reason."""
    await env.start(instances=1)
    accept = 'ls *.parquet >/dev/null && [ "$VASTD_RESULT_DIR" = "$(pwd)" ]'
    ctx = env.context(env.settings(job={"validate_command": accept}))
    job = await run_one(env, ctx)
    assert job.state is JobState.DONE, job.last_error

    refuse = "echo 'checksum mismatch in part 3' >&2; exit 3"
    ctx2 = env.context(
        env.settings(env.tmp_path / "second", job={"validate_command": refuse, "max_attempts": 1})
    )
    job2 = await run_one(env, ctx2)
    assert job2.state is JobState.FAILED
    reason = error_reason(ctx2, job2.id)
    assert "validate_command exited 3" in reason and "checksum mismatch in part 3" in reason


# --- issue 13: row-complete results ----------------------------------------------------------
async def test_a_result_with_half_its_rows_is_refused(env: SimEnv) -> None:
    """`row_key = "job_row"`: the worker writing every second row (half the CSV) fails
    the attempt with the rows found and expected; all rows: done, MANIFEST says rows in
    and out."""
    await env.start(instances=1)
    half = f"{WORKER} {{input}} --num_sim 200 --num_quantiles 8 --stride 2"
    ctx = env.context(env.settings(job={"command": half, "row_key": "job_row", "max_attempts": 1}))
    job = await run_one(env, ctx, rows=4)
    assert job.state is JobState.FAILED
    reason = error_reason(ctx, job.id)
    assert "2 distinct 'job_row' value(s) found, 4 expected" in reason, reason

    full = f"{WORKER} {{input}} --num_sim 200 --num_quantiles 8 --stride 1"
    ctx2 = env.context(
        env.settings(env.tmp_path / "second", job={"command": full, "row_key": "job_row"})
    )
    job2 = await run_one(env, ctx2, rows=4)
    assert job2.state is JobState.DONE, job2.last_error
    manifest = json.loads((ctx2.layout.results_dir(job2.id) / "MANIFEST.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"]) == (4, 4)
    # the record carries the MANIFEST's figures (`vastd report` reads no file per job)
    assert (job2.rows_out, job2.cost, job2.gpu_name) == (4, manifest["cost"], manifest["gpu"])


# --- item 8: caps on what a job's results may take -------------------------------------------
async def test_results_past_the_total_cap_fail_the_attempt(env: SimEnv) -> None:
    """Three 1000-byte results under `max_results_total_bytes = 2500`: the third download
    stops at the cap, the attempt fails saying which cap, nothing is installed."""
    await env.start(instances=1)
    make = "for n in 1 2 3; do head -c 1000 /dev/zero > r$n.bin; done"
    job_settings = {
        "command": make,
        "result_glob": "*.bin",
        "validate": "none",
        "max_attempts": 1,
        "max_results_total_bytes": 2500,
    }
    ctx = env.context(env.settings(job=job_settings))
    job = await run_one(env, ctx)
    assert job.state is JobState.FAILED
    assert "max_results_total_bytes = 2500" in error_reason(ctx, job.id)
    assert list(ctx.layout.results.iterdir()) == []


async def test_too_many_result_files_fail_the_attempt(env: SimEnv) -> None:
    """More result files than `max_result_files`: refused before any download."""
    await env.start(instances=1)
    make = "i=0; while [ $i -lt 200 ]; do : > r$i.bin; i=$((i+1)); done"
    job_settings = {
        "command": make,
        "result_glob": "*.bin",
        "validate": "none",
        "max_attempts": 1,
        "max_result_files": 5,
    }
    ctx = env.context(env.settings(job=job_settings))
    job = await run_one(env, ctx)
    assert job.state is JobState.FAILED
    assert "more than [job] max_result_files = 5" in error_reason(ctx, job.id)


async def test_a_download_under_the_local_disk_floor_waits(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local disk at its floor (`[paths] min_free_disk_gb`): the collection waits
    (no attempt counted, the log says why), and runs once there is room again."""
    await env.start(instances=1)
    ctx = env.context(env.settings(paths={"min_free_disk_gb": 2.0}))
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    job = ctx.store.jobs[job_id]
    await co.coordinate_job_distribution(ctx)
    await async_wait_for(lambda: job.state is JobState.COLLECTING, 20)

    monkeypatch.setattr(result_handler, "_free_bytes", lambda folder: 1_500_000_000)
    with capture_logs() as logs:
        for _ in range(3):  # the retries while the disk stays full: logged once
            assert await co.collect_job(ctx, job_id) is False
    assert job.state is JobState.COLLECTING and job.attempts == 0
    deferred = [e for e in logs if e["event"] == "collection_deferred"]
    assert [e["log_level"] for e in deferred] == ["warning", "debug", "debug"]
    assert "min_free_disk_gb" in str(deferred[0]["error"]) and deferred[2]["repeats"] == 3
    assert list(ctx.layout.results.iterdir()) == []

    monkeypatch.setattr(result_handler, "_free_bytes", lambda folder: 50_000_000_000)
    with capture_logs() as logs:
        await pump(ctx, lambda: job.state is JobState.DONE)
    assert job.attempts == 0 and job.runs == 1
    [recovered] = [e for e in logs if e["event"] == "collection_recovered"]
    assert recovered["failures"] == 3


async def test_validations_at_once_are_bounded(tmp_path: Path) -> None:
    """Many collections at once (the task loop runs up to 32) never run more than
    MAX_CONCURRENT_VALIDATIONS validators at a time: their memory limits cannot add up."""
    import asyncio

    from vastd.execution import validate

    running = tmp_path / "running"
    running.mkdir()
    counts = tmp_path / "counts"
    command = (
        f"d=$(mktemp -d {shlex.quote(str(running))}/v.XXXXXX);"
        f" ls {shlex.quote(str(running))} | wc -l >> {shlex.quote(str(counts))};"
        ' sleep 0.3; rmdir "$d"'
    )
    folders = [tmp_path / f"r{n}" for n in range(3 * validate.MAX_CONCURRENT_VALIDATIONS)]
    for folder in folders:
        folder.mkdir()
    await asyncio.gather(
        *(validate.run_validate_command(command, f, timeout_s=60) for f in folders)
    )
    seen = [int(line) for line in counts.read_text().split()]
    assert len(seen) == len(folders)
    assert max(seen) <= validate.MAX_CONCURRENT_VALIDATIONS


async def test_after_a_restart_the_same_bomb_is_refused_again_harmlessly(
    env: SimEnv, parquet_bomb: Path
) -> None:
    """The daemon stops while a bomb's job is collecting (as after an OOM kill): the
    restarted daemon validates the same file again, refuses it with the reason, and
    carries on (its memory untouched)."""
    from tests.ctxfactory import wait_saved
    from vastd.orchestration.workflow import recover_after_restart

    await env.start(instances=1)
    command = f"cp {shlex.quote(str(parquet_bomb))} r.parquet"
    settings = env.settings(job={"command": command, "max_attempts": 1, "validate_memory_mb": 256})
    ctx = env.context(settings)
    await env.ready(ctx)
    [job_id] = await env.submit(ctx)
    await co.coordinate_job_distribution(ctx)
    await async_wait_for(lambda: ctx.store.jobs[job_id].state is JobState.COLLECTING, 20)
    await wait_saved(ctx)
    await env.close_context(ctx)

    again = env.context(settings)
    recover_after_restart(again)
    await env.ready(again)
    before = peak_rss_mb()
    job = await wait_state(again, job_id, JobState.DONE, JobState.FAILED, timeout_s=60)
    assert job.state is JobState.FAILED and job.attempts == 1
    assert "validate_memory_mb" in error_reason(again, job_id)
    assert peak_rss_mb() - before < BOMB_VALUE_BYTES / 2**20 / 2


async def test_a_cancelled_collection_kills_its_validator(tmp_path: Path) -> None:
    """Shutdown cancels collections: the validator child (its whole group) goes with it."""
    import asyncio

    from vastd.execution import validate

    marker = tmp_path / "pid"
    command = f"sleep 300 & echo $$ > {shlex.quote(str(marker))}; wait"
    task = asyncio.create_task(validate.run_validate_command(command, tmp_path, timeout_s=600))
    await async_wait_for(lambda: marker.exists() and marker.read_text().strip() != "", 10)
    pgid = int(marker.read_text())
    assert group_alive(pgid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await async_wait_for(lambda: not group_alive(pgid), 10, message="child group killed")


async def test_a_validator_killed_by_a_signal_fails_with_that_reason(tmp_path: Path) -> None:
    """A checker the kernel kills (the OOM killer's SIGKILL) fails the attempt saying so."""
    from vastd.execution import validate
    from vastd.utils.exceptions import ResultValidationError

    with pytest.raises(ResultValidationError, match="killed by SIGKILL"):
        await validate.run_validate_command("kill -KILL $$", tmp_path, timeout_s=60)


async def test_validate_command_never_sees_the_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's API key (from its environment) is not passed to a validate_command."""
    from vastd.execution import validate

    monkeypatch.setenv("VASTD_VAST__API_KEY", "secret-key-1")
    monkeypatch.setenv("VAST_API_KEY", "secret-key-2")
    await validate.run_validate_command(
        '[ -z "$VASTD_VAST__API_KEY$VAST_API_KEY" ] && [ -n "$PATH" ]', tmp_path, timeout_s=60
    )
