"""`vastd demo`: the whole system end to end against the built-in simulator.

No account, no network, no root: a simulated vast.ai API and M local SSH
instances on 127.0.0.1, N GARCH job files in the real format, the real daemon
code, and the example worker writing real parquet results.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from vastd.core.files import Layout
from vastd.core.history import read_history_records
from vastd.core.state import JobState
from vastd.core.submit import submit_file
from vastd.daemon import Daemon
from vastd.sim.cluster import SimCluster, load_make_jobs
from vastd.utils.logging import setup_logging


def _progress_line(counts: dict[str, int], total: int, elapsed_s: float) -> str:
    return (
        f"[{elapsed_s:6.1f}s] queued {counts['queued']:>3}  running {counts['running']:>3}  "
        f"collecting {counts['collecting']:>3}  done {counts['done']:>3}/{total}  "
        f"failed {counts['failed']:>3}"
    )


async def demo(
    *, jobs: int, instances: int, rows: int, workdir: Path, out: TextIO = sys.stdout
) -> int:
    started = time.monotonic()
    print(f"vastd demo: {jobs} jobs x {rows} rows on {instances} simulated instances", file=out)
    print(f"  working folder: {workdir}", file=out)
    cluster = await SimCluster.start(workdir / "sim", instances=instances)
    try:
        settings = cluster.settings(workdir / "vastd")
        layout = Layout(settings.paths.root)
        print(f"  simulated vast.ai API: {cluster.url}", file=out)
        daemon = Daemon(settings, inbox_settle_s=0.2, inbox_rescan_s=2.0)
        runner = asyncio.create_task(daemon.run(), name="daemon")
        make_jobs = load_make_jobs()
        sources = make_jobs(workdir / "jobs", jobs, rows, 7, prefix="garch_test_job")
        await asyncio.wait(
            [runner, asyncio.create_task(daemon.started.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if runner.done():
            return await runner
        for src in sources:
            await asyncio.to_thread(submit_file, layout, src)
        print(f"  submitted {len(sources)} job files to {layout.inbox}", file=out)
        last = ""
        while not runner.done():
            ctx = daemon.ctx
            assert ctx is not None
            counts = ctx.store.counts()
            line = _progress_line(counts, len(sources), time.monotonic() - started)
            if line.split("]", 1)[1] != last:
                print(line, file=out, flush=True)
                last = line.split("]", 1)[1]
            if counts["done"] + counts["failed"] >= len(sources):
                break
            await asyncio.sleep(0.5)
        daemon.should_exit.set()
        code = await runner
        ctx = daemon.ctx
        assert ctx is not None
        store = ctx.store
        await store.flush()
        records = read_history_records(store.history_path) | store.jobs
        done = [j for j in records.values() if j.state is JobState.DONE]
        failed = [j for j in records.values() if j.state is JobState.FAILED]
        elapsed = time.monotonic() - started
        print("", file=out)
        print(
            f"summary: {len(done)} done, {len(failed)} failed of {len(sources)} jobs "
            f"in {elapsed:.1f}s on {instances} instances",
            file=out,
        )
        for job in sorted(done, key=lambda j: j.seq):
            for name in job.result_files:
                print(f"  {layout.results_dir(job.id) / name}", file=out)
        for job in failed:
            print(f"  FAILED {job.id}: {job.last_error}", file=out)
        print(f"state snapshot: {layout.state_file}", file=out)
        if code != 0:
            return code
        return 0 if not failed and len(done) == len(sources) else 1
    finally:
        await cluster.aclose()


def prepare_workdir(workdir: Path | None) -> Path:
    """`./demo-run` by default; a previous demo's folder is replaced, nothing else is."""
    path = (workdir or Path("demo-run")).absolute()
    marker = path / ".vastd-demo"
    if path.exists() and any(path.iterdir()):
        if not marker.exists():
            raise FileExistsError(f"{path} exists and is not a vastd demo folder")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by vastd demo; removed by the next one\n")
    return path


def run_demo(*, jobs: int, instances: int, rows: int = 5, workdir: Path | None = None) -> int:
    if jobs < 1 or instances < 1 or rows < 1:
        print("vastd demo: --jobs, --instances and --rows must be at least 1", file=sys.stderr)
        return 2
    try:
        path = prepare_workdir(workdir)
    except (OSError, FileExistsError) as exc:
        print(f"vastd demo: {exc}", file=sys.stderr)
        return 2
    setup_logging("WARNING", json=True, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    return asyncio.run(demo(jobs=jobs, instances=instances, rows=rows, workdir=path))
