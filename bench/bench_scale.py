"""`make bench-scale`: a campaign's bookkeeping at scale, in one process, without SSH.

What it runs: the daemon's own acceptance (`accept_inbox_file`), the transitions a job
goes through (`assign_job` with its file move off the loop, `mark_job_started`,
`mark_job_exited`, `mark_job_completed`) over M READY instance records, and the real
saver (`StateStore.run_saver`, which moves finished jobs to history.jsonl first), all
on one event loop. Files are dropped into inbox/ in batches. No SSH, no simulator: the
remote side of a job is not part of these figures (see bench/run_bench.py for that),
so CPU per job here is the local bookkeeping only.

It records: jobs/s; CPU per job for the first 1,000 and the last 10,000 (or the last
N/10 when N is smaller), acceptance excluded, and acceptance CPU per file of the first
and the last batch; peak RSS; event-loop lag p50/p99 (a 10 ms ticker inside the
loop); state.json bytes and save time p99 (serialise + write); history bytes; load
time and `vastd status` latency (a fresh process) with every job in history; the time
to accept the first batch dropped at once.

    .venv/bin/python bench/bench_scale.py [--jobs 20000] [--instances 500] [--batch 10000]
    .venv/bin/python bench/bench_scale.py --quick     # 2,000 jobs, 50 instances
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vastd.core import snapshot as snapshot_mod  # noqa: E402
from vastd.core import state as st  # noqa: E402
from vastd.core.state import InstanceRecord, InstanceStatus, StateStore  # noqa: E402
from vastd.orchestration.context import build_context  # noqa: E402
from vastd.orchestration.workflow import accept_inbox_file  # noqa: E402
from vastd.utils.config import Settings  # noqa: E402
from vastd.utils.logging import setup_logging  # noqa: E402

CSV = "x,y\n1,2\n"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def lag_ticker(samples: list[float], stop: asyncio.Event, interval_s: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(interval_s)
        samples.append(max(0.0, loop.time() - before - interval_s))


async def campaign(root: Path, jobs: int, instances: int, batch: int) -> dict[str, Any]:
    settings = Settings(paths={"root": str(root)})  # type: ignore[arg-type]
    layout_root = settings.paths.root
    store = StateStore.open(layout_root / "state.json")
    ctx = build_context(settings, store=store, api=None)
    ctx.layout.ensure()
    for i in range(instances):
        iid = str(100000 + i)
        store.instances[iid] = InstanceRecord(id=iid, status=InstanceStatus.READY)

    serialize_s: list[float] = []  # on the event loop
    write_s: list[float] = []  # in a thread: write, fsync, rename, fsync of the folder
    real_save = snapshot_mod.save_state
    real_serialize = store.serialize

    def timed_serialize() -> bytes:
        t0 = time.perf_counter()
        data = real_serialize()
        serialize_s.append(time.perf_counter() - t0)
        return data

    def timed_save(data: bytes, path: Path, backup: Path | None = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        real_save(data, path, backup, **kw)
        write_s.append(time.perf_counter() - t0)

    store.serialize = timed_serialize  # type: ignore[method-assign]
    snapshot_mod.save_state = timed_save

    stop = asyncio.Event()
    lag: list[float] = []
    ticker = asyncio.create_task(lag_ticker(lag, stop))
    saver = asyncio.create_task(store.run_saver())
    names = [f"job_{n:06d}" for n in range(jobs)]
    # CPU of this process (the "daemon"), split: acceptance of a batch vs the rest
    # (dispatch, transitions, saves, history), whose per-job figure must not grow.
    cpu_marks: dict[int, float] = {}
    accept_cpu: list[float] = []
    done = 0
    free = list(store.instances)
    first_accept_s = 0.0
    last_n = max(1, min(10000, jobs // 10))
    t_start = time.perf_counter()
    for offset in range(0, jobs, batch):
        chunk = names[offset : offset + batch]
        for name in chunk:
            (ctx.layout.inbox / f".{name}.tmp").write_text(CSV)
        t0, c0 = time.perf_counter(), time.process_time()
        for name in chunk:
            os.rename(ctx.layout.inbox / f".{name}.tmp", ctx.layout.inbox / f"{name}.csv")
        for name in chunk:
            await accept_inbox_file(ctx, ctx.layout.inbox / f"{name}.csv")
        accept_cpu.append((time.process_time() - c0) / len(chunk))
        if offset == 0:
            first_accept_s = time.perf_counter() - t0
            cpu_marks[0] = time.process_time()
        elif done > jobs - last_n:
            raise SystemExit("--batch too small for the last window: use --batch >= N/10")
        queue = [n for n in chunk if n in store.jobs]
        while queue:
            wave, queue = queue[: len(free)], queue[len(free) :]
            placed = []
            for name, iid in zip(wave, free, strict=False):
                record = await st.assign_job(store, name, iid)
                assert record is not None
                placed.append((name, iid, record.run_id))
            await store.flush()  # write-ahead, as dispatch does
            for name, iid, run_id in placed:
                st.mark_job_started(store, name, run_id=run_id, pgid=1, new=True)
                st.mark_job_exited(store, name, exit_code=0, error=None)
                await asyncio.to_thread(
                    st.mark_job_completed,
                    store,
                    name,
                    instance_id=iid,
                    run_id=run_id,
                    result_files=["out.parquet"],
                )
                st.followup_done(store, next(iter(store.snapshot.followups)))
                done += 1
                if done in (min(1000, jobs), jobs - last_n):
                    cpu_marks[done] = time.process_time()
            await asyncio.sleep(0)
    cpu_marks[jobs] = time.process_time()
    wall_s = time.perf_counter() - t_start
    # Let the saver retire the last ones.
    while store.dirty or any(j.state in st.FINISHED for j in store.jobs.values()):
        await asyncio.sleep(0.05)
    await store.wait_saved()
    stop.set()
    saver.cancel()
    await asyncio.gather(ticker, saver, return_exceptions=True)
    snapshot_mod.save_state = real_save
    await ctx.pool.aclose()
    first_n = min(1000, jobs)
    return {
        "jobs": jobs,
        "instances": instances,
        "batch": batch,
        "wall_s": wall_s,
        "jobs_per_s": jobs / wall_s,
        "cpu_ms_first": 1000 * (cpu_marks[first_n] - cpu_marks[0]) / first_n,
        "cpu_ms_last": 1000 * (cpu_marks[jobs] - cpu_marks[jobs - last_n]) / last_n,
        "last_n": last_n,
        "accept_cpu_ms_first_batch": 1000 * accept_cpu[0],
        "accept_cpu_ms_last_batch": 1000 * accept_cpu[-1],
        "lag_p50_ms": 1000 * pct(lag, 0.5),
        "lag_p99_ms": 1000 * pct(lag, 0.99),
        "saves": len(write_s),
        "serialize_p99_ms": 1000 * pct(serialize_s, 0.99),
        "write_p99_ms": 1000 * pct(write_s, 0.99),
        "state_bytes": (root / "state.json").stat().st_size,
        "history_bytes": (root / "history.jsonl").stat().st_size,
        "first_batch_accept_s": first_accept_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def after(root: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    store = StateStore.open(root / "state.json")
    load_s = time.perf_counter() - t0
    config = root / "vastd.toml"
    config.write_text(f'[paths]\nroot = "{root}"\n')
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "vastd", "status", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        )
        times.append(time.perf_counter() - t0)
    status = json.loads(proc.stdout)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vastd.cli"], check=True)
    import_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "in_history": len(store.history),
        "status_s": min(times),
        "python_start_import_s": import_s,
        "status_done": status["jobs"]["done"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--batch", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="2,000 jobs on 50 instances")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.instances, args.batch = 2000, 50, 1000
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="vastd-scale-") as tmp:
        root = Path(tmp)
        figures = asyncio.run(campaign(root, args.jobs, args.instances, args.batch))
        figures.update(after(root))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
