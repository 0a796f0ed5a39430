"""Autoscale on the simulator: N trivial jobs, at most M rented instances, then back to zero.

The simulator (fake vast.ai API + one asyncssh "instance" per rental on 127.0.0.1)
and vastd's loops run in this process, built as the daemon builds them, in
`[fleet] mode = "autoscale"`. Offers: 24 machines at 0.25, 0.26, ... $/h; budget
`max_total_dph`. Boot is scaled down (`--boot-delay-s`, default 1 s).

Each job runs `date > out/t_start; sleep S; date > out/t_end`, so its run time is
measured on the "instance". Reported:

- instance-hours: sum over rented instances of (confirmed destroy - rent), against
  the ideal, the sum of job run times (t_end - t_start);
- boot, busy and idle instance-minutes (idle = owned - boot - busy; boot = rent until
  the instance was first seen READY), and the idle tail: last job end -> destroy;
- peak $/h (rented instances, sampled every 50 ms) against `max_total_dph`, and the
  spend the ledger accrued (`spend_total`) against sum(dph x owned time).

    .venv/bin/python bench/bench_autoscale.py --jobs 1000 --max-instances 16
    .venv/bin/python bench/bench_autoscale.py --jobs 200 --job-s 2 --stage-ahead 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vastd.core.files import Layout  # noqa: E402
from vastd.core.history import read_history_records  # noqa: E402
from vastd.core.ssh import SSHPool  # noqa: E402
from vastd.core.state import InstanceStatus, JobState, StateStore  # noqa: E402
from vastd.instances.vast_api import VastClient  # noqa: E402
from vastd.orchestration.context import StoreHostKeys, build_context  # noqa: E402
from vastd.orchestration.fleet import current_dph  # noqa: E402
from vastd.orchestration.workflow import (  # noqa: E402
    orchestrate_job_processing,
    recover_after_restart,
)
from vastd.sim.cluster import SimCluster  # noqa: E402
from vastd.utils.logging import setup_logging  # noqa: E402

JOB_COMMAND = (
    "date +%s.%N > {output_dir}/t_start && sleep {secs} && date +%s.%N > {output_dir}/t_end"
)


def settings_for(cluster: SimCluster, root: Path, args: argparse.Namespace) -> Any:
    return cluster.settings(
        root,
        prepare=[],
        vast={"poll_interval_s": args.poll_s, "lost_grace_s": 30.0},
        job={
            "command": JOB_COMMAND,
            "vars": {"secs": str(args.job_s)},
            "result_glob": "out/t_*",
            "min_results": 2,
            "validate": "none",
            "poll_interval_s": 0.5,
            "max_attempts": 2,
            "stage_ahead": args.stage_ahead,
        },
        fleet={
            "mode": "autoscale",
            "max_instances": args.max_instances,
            "offer_query": "gpu_name=RTX_4090",
            "order": "dph_total",
            "image": "sim/pytorch",
            "disk_gb": 10,
            "max_total_dph": args.max_total_dph,
            "idle_timeout_s": args.idle_timeout_s,
            "boot_timeout_s": 60.0,
        },
    )


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster = await SimCluster.start(workdir / "sim", n_offers=0, boot_delay_s=args.boot_delay_s)
    for i in range(max(24, args.max_instances + 4)):
        cluster.cloud.add_offer(gpu_name="RTX 4090", dph_total=0.25 + i / 100, machine_id=100 + i)
    settings = settings_for(cluster, workdir / "vastd", args)
    layout = Layout(settings.paths.root)
    layout.ensure()
    store = StateStore.open(layout.state_file)
    api = VastClient(cluster.url, cluster.api_key, timeout_s=30)
    pool = SSHPool(settings.ssh, host_keys=StoreHostKeys(store))
    ctx = build_context(settings, store=store, pool=pool, api=api)
    recover_after_restart(ctx)
    staging = workdir / "staging"
    staging.mkdir()
    names = [f"bench_job_{i:05d}.csv" for i in range(args.jobs)]
    for name in names:
        (staging / name).write_text("a,b\n1,2\n")

    first_ready: dict[str, float] = {}
    peak_dph = 0.0
    peak_live = 0

    def sample() -> None:
        nonlocal peak_dph, peak_live
        now = time.time()
        for inst in store.instances.values():
            if inst.status is InstanceStatus.READY and inst.id not in first_ready:
                first_ready[inst.id] = now
        peak_dph = max(peak_dph, current_dph(ctx))
        peak_live = max(peak_live, len(cluster.cloud.instances))

    runner = asyncio.create_task(
        orchestrate_job_processing(ctx, inbox_settle_s=0.05, inbox_rescan_s=1.0)
    )
    started = time.time()
    try:
        for name in names:
            (staging / name).rename(layout.inbox / name)
        done_at = None
        while True:
            sample()
            if runner.done():
                raise RuntimeError(f"the loops ended: {runner!r}")
            counts = store.counts()
            finished = counts["done"] + counts["failed"]
            if done_at is None and finished >= args.jobs:
                done_at = time.time()
            owned = [i for i in store.instances.values() if i.owned]
            if (
                done_at is not None
                and not cluster.cloud.instances
                and all(i.status is InstanceStatus.DESTROYED for i in owned)
            ):
                break
            if time.time() - started > args.timeout_s:
                raise TimeoutError(f"not finished after {args.timeout_s}s: {counts}")
            await asyncio.sleep(0.05)
        ended = time.time()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await ctx.aclose()
        await store.flush()
        await pool.aclose()
        await api.aclose()
        await cluster.aclose()

    run_s: dict[str, float] = {}
    busy_by_instance: dict[str, float] = {}
    last_end: dict[str, float] = {}
    # Finished jobs leave the snapshot for history.jsonl (issue 9): read both.
    finished = {**read_history_records(store.history_path), **store.jobs}
    for job in finished.values():
        if job.state is not JobState.DONE:
            continue
        folder = layout.results_dir(job.id)
        try:
            t0 = float((folder / "t_start").read_text())
            t1 = float((folder / "t_end").read_text())
        except (OSError, ValueError):
            continue
        run_s[job.id] = t1 - t0
        if job.instance:
            busy_by_instance[job.instance] = busy_by_instance.get(job.instance, 0.0) + t1 - t0
            last_end[job.instance] = max(last_end.get(job.instance, 0.0), t1)
    owned = [i for i in store.instances.values() if i.owned]
    owned_s = boot_s = tail_s = 0.0
    dollars = 0.0
    for inst in owned:
        rented = inst.rented_at or inst.first_seen
        gone = inst.destroyed_at or ended
        owned_s += gone - rented
        dollars += inst.dph * (gone - rented) / 3600
        boot_s += max(0.0, first_ready.get(inst.id, gone) - rented)
        tail_s += max(0.0, gone - last_end.get(inst.id, first_ready.get(inst.id, gone)))
    busy_s = sum(busy_by_instance.values())
    ideal_s = sum(run_s.values())
    counts = store.counts()
    return {
        "jobs": args.jobs,
        "done": counts["done"],
        "failed": counts["failed"],
        "max_instances": args.max_instances,
        "rentals": cluster.cloud.stats["rent"],
        "destroys": cluster.cloud.stats["destroy"],
        "peak_instances": peak_live,
        "wall_s": round((done_at or ended) - started, 1),
        "teardown_s": round(ended - (done_at or ended), 1),
        "instance_h": owned_s / 3600,
        "ideal_h": ideal_s / 3600,
        "boot_min": boot_s / 60,
        "busy_min": busy_s / 60,
        "idle_min": max(0.0, owned_s - boot_s - busy_s) / 60,
        "tail_min": tail_s / 60,
        "peak_dph": peak_dph,
        "budget_dph": args.max_total_dph,
        "spend_ledger": store.snapshot.spend_total,
        "spend_expected": dollars,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    ratio = r["instance_h"] / r["ideal_h"] if r["ideal_h"] else float("nan")
    ideal_min = r["ideal_h"] * 60
    floor = (r["boot_min"] + r["busy_min"] + r["tail_min"]) / ideal_min if ideal_min else math.nan
    rows = [
        ("jobs done / failed", f"{r['done']} / {r['failed']} of {r['jobs']}"),
        ("wall time (to last job done)", f"{r['wall_s']} s (+{r['teardown_s']} s teardown)"),
        ("rentals / confirmed destroys", f"{r['rentals']} / {r['destroys']}"),
        ("peak instances (max)", f"{r['peak_instances']} ({r['max_instances']})"),
        ("instance-hours (rent -> destroy)", f"{r['instance_h']:.4f} h"),
        ("ideal (sum of job run times)", f"{r['ideal_h']:.4f} h"),
        ("instance-hours / ideal", f"{ratio:.2f}x"),
        ("boot instance-minutes", f"{r['boot_min']:.2f}"),
        ("busy instance-minutes", f"{r['busy_min']:.2f}"),
        ("idle instance-minutes", f"{r['idle_min']:.2f}"),
        ("  of which after the last job", f"{r['tail_min']:.2f}"),
        ("  of which between jobs", f"{max(0.0, r['idle_min'] - r['tail_min']):.2f}"),
        # What no dispatch could take back: the boots and each instance's last idle
        # timeout (the tail). 1.0 would need neither.
        ("(boot + busy + tail) / ideal", f"{floor:.2f}x"),
        ("peak $/h (budget)", f"{r['peak_dph']:.2f} ({r['budget_dph']:.2f})"),
        (
            "spend ledger / dph x owned time",
            f"${r['spend_ledger']:.4f} / ${r['spend_expected']:.4f}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [
        f"autoscale bench: {args.jobs} jobs x sleep {args.job_s}s, max {args.max_instances} "
        f"instances, boot {args.boot_delay_s}s, idle timeout {args.idle_timeout_s}s, "
        f"poll {args.poll_s}s, stage_ahead {args.stage_ahead}",
        "",
        f"| {'figure'.ljust(width)} | value |",
        f"|{'-' * (width + 2)}|-------|",
    ]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--max-instances", type=int, default=16)
    parser.add_argument("--job-s", type=float, default=0.05)
    parser.add_argument("--boot-delay-s", type=float, default=1.0)
    parser.add_argument("--idle-timeout-s", type=float, default=3.0)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--max-total-dph", type=float, default=6.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--stage-ahead", type=int, default=0, help="[job] stage_ahead")
    args = parser.parse_args()
    setup_logging("ERROR", json=True, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="vastd-bench-autoscale-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(report(result, args))
    return 0 if result["done"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
