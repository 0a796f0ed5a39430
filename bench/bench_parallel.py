"""`make bench`, issue 13: vastd side by side with GNU parallel, in one run.

GNU parallel logs into 16 loopback SSH hosts: the SSH servers of a SimCluster
(asyncssh on 127.0.0.1, commands run as local /bin/sh, any user name, the cluster's
ed25519 client key), with the OpenSSH client (`ssh -i KEY -p PORT`, one line per host
in --sshloginfile, 1 job slot each). Each job's input is sent, its result returned and
both removed with `--trc` (rsync over ssh). vastd runs the same two workloads over 16
simulated instances through the real daemon (bench/run_bench.py's machinery).

Figures:
- trivial jobs/s: 160 jobs that write two timestamps; jobs / wall time (GNU parallel:
  the parallel process's run; vastd: first rename into inbox/ to last job_done).
- controller CPU per job: GNU parallel: user+sys of parallel and all its descendants
  (ssh, rsync, perl), getrusage(RUSAGE_CHILDREN) in a wrapper process whose only
  child is parallel; vastd: the daemon's utime+stime (/proc/<pid>/stat). The SSH
  servers and remote shells (this process) are not counted for either.
- makespan efficiency, 160 x 2 s jobs: (sum of the jobs' remote run times / 16) /
  measured makespan (the same wall windows as above); 1.0 = no instance ever idle.
- exit -> next start on one instance, p50: remote t_start of a job - t_end of the job
  before it on the same instance (vastd, 2 s workload).
- runs started while another ran in their slot (vastd, both workloads): per instance
  (one job at a time), runs whose remote t_start falls before the t_end of an earlier
  one; 0 unless a slot was given two jobs at once.
- GPU-busy fraction per instance (vastd, 2 s workload): the time an instance has a job
  running (union of its jobs' remote [t_start, t_end]) / the time it is owned in the
  run, taken as the whole timed window (first rename .. last job_done): the
  simulated instances are adopted before the window and kept after it.
- idle per instance (vastd, 2 s workload): that owned time less the busy time, split
  into before its first job's t_start, between its jobs, and after its last t_end;
  means over the instances.
- jobs started while the daemon was stopped (--sigstop-s, 2 s workload): jobs whose
  remote t_start falls inside the SIGSTOP .. SIGCONT window. The stop comes once 1/3
  of the jobs are done and every instance has a staged run waiting (a job folder
  holding `staged`; at most 10 s later); the report gives how many had.

    .venv/bin/python bench/bench_parallel.py [--jobs 160] [--instances 16]
        [--stage-ahead N] [--sigstop-s 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_bench import (  # noqa: E402
    JOB_COMMAND,
    Figures,
    in_workdir,
    loadavg,
    machine_info,
    run,
)
from vastd.sim.cluster import SimCluster  # noqa: E402
from vastd.utils.logging import setup_logging  # noqa: E402

SLEEP_S = 2.0
SLEEP_COMMAND = f"date +%s.%N > {{output_dir}}/t_start && sleep {SLEEP_S:g} && date +%s.%N > {{output_dir}}/t_end"
# GNU parallel's jobs: the same two timestamps, into one returned file {}.out.
PAR_TRIVIAL = "date +%s.%N > {}.out && date +%s.%N >> {}.out"
PAR_SLEEP = f"date +%s.%N > {{}}.out && sleep {SLEEP_S:g} && date +%s.%N >> {{}}.out"
# Run in a child process: its RUSAGE_CHILDREN is parallel and everything parallel
# waited for, and nothing of this process (whose SSH servers run the remote shells).
RUSAGE_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.time()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
t1 = time.time()
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "t0": t0, "t1": t1, "cpu_s": r.ru_utime + r.ru_stime}))
"""

TARGET_JOBS_RATIO = 12.0
TARGET_CPU_RATIO = 1 / 17
TARGET_EFF = 0.95
TARGET_EFF_STAGED = 0.98
TARGET_GAP_STAGED_S = 0.050
NA = "not available in this tree"


def union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def overlapping_runs(spans: list[tuple[float, float]], slots: int = 1) -> int:
    """Runs that started while `slots` others were still running on the same instance:
    with one job per slot, 0 (a run that started early, or a slot given two jobs)."""
    ends: list[float] = []
    over = 0
    for a, b in sorted(spans):
        ends = [e for e in ends if e > a]
        if len(ends) >= slots:
            over += 1
        ends.append(b)
    return over


def makespan_efficiency(durations: list[float], slots: int, wall: float) -> float:
    return (sum(durations) / slots) / wall if wall > 0 else math.nan


# --- GNU parallel -------------------------------------------------------------------------
async def run_parallel(workdir: Path, n: int, m: int, command: str, label: str) -> dict[str, Any]:
    """`n` jobs of `command` over `m` loopback SSH hosts with GNU parallel --trc."""
    cluster = await SimCluster.start(workdir / "sim", instances=m, boot_delay_s=0.0)
    try:
        deadline = time.monotonic() + 30
        while len([h for h in cluster.hosts.servers if h.running]) < m:
            if time.monotonic() > deadline:
                raise RuntimeError("the loopback SSH hosts did not start")
            await asyncio.sleep(0.1)
        ssh = (
            f"ssh -i {shlex.quote(str(cluster.key_file))} -o BatchMode=yes "
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        )
        logins = workdir / "sshloginfile"
        logins.write_text(
            "".join(
                f"1/{ssh} -p {h.address[1]} vastd@{h.address[0]}\n" for h in cluster.hosts.servers
            )
        )
        data = workdir / "in"
        data.mkdir()
        for i in range(n):
            (data / f"job_{i:05d}.csv").write_text(f"i,x\n0,{i}\n")
        inputs = sorted(p.name for p in data.iterdir())
        cmd = [
            "parallel",
            "--sshloginfile",
            str(logins),
            "--trc",
            "{}.out",
            command,
            ":::",
            *inputs,
        ]
        print(f"  GNU parallel, {label}: {n} jobs over {m} SSH hosts")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RUSAGE_WRAPPER,
            *cmd,
            cwd=str(data),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        res = json.loads(out.decode().strip().splitlines()[-1])
        spans = []
        for name in inputs:
            with_out = data / f"{name}.out"
            try:
                a, b = (float(x) for x in with_out.read_text().split())
                spans.append((a, b))
            except (OSError, ValueError):
                pass
        wall = res["t1"] - res["t0"]
        left = [p for p in cluster.hosts.servers for p in p.root.rglob("*.csv*")]
        return {
            "rc": res["rc"],
            "done": len(spans),
            "wall_s": wall,
            "jobs_per_s": len(spans) / wall if wall > 0 else math.nan,
            "cpu_ms_per_job": res["cpu_s"] * 1000 / n,
            "efficiency": makespan_efficiency([b - a for a, b in spans], m, wall),
            "left_on_hosts": len(left),
        }
    finally:
        await cluster.aclose()


# --- vastd --------------------------------------------------------------------------------
def vastd_args(n: int, m: int, command: str, stage_ahead: int | None, sigstop_s: float):
    return argparse.Namespace(
        jobs=n,
        instances=m,
        rows=1,
        job_poll_s=2.0,
        deadline_s=240.0,
        cprofile=None,
        pause_for_profiler=0.0,
        job_command=command,
        stage_ahead=stage_ahead,
        sigstop_s=sigstop_s,
    )


async def run_vastd(
    workdir: Path, n: int, m: int, command: str, stage_ahead: int, sigstop_s: float = 0.0
) -> Figures | str:
    """The figures, or NA when this tree's daemon refuses `stage_ahead`."""
    workdir.mkdir(parents=True)
    key = stage_ahead if stage_ahead else None  # 0: leave the key out (the default)
    try:
        return await run(vastd_args(n, m, command, key, sigstop_s), workdir)
    except RuntimeError as exc:
        err = (workdir / "daemon.stderr").read_text(errors="replace")
        err += (workdir / "daemon.log").read_text(errors="replace")
        if key is not None and "exited with 2" in str(exc) and "stage_ahead" in err:
            print(f"  stage_ahead = {stage_ahead}: the daemon refuses the key ({NA})")
            return NA
        raise


def vastd_summary(f: Figures | str, m: int) -> dict[str, Any]:
    if isinstance(f, str):
        return {"available": False}
    spans: dict[str, list[tuple[float, float]]] = {}
    for inst, a, b in f.job_times.values():
        spans.setdefault(inst, []).append((a, b))
    own = f.window[1] - f.window[0]
    busy = [union_length(s) / own for s in spans.values()] + [0.0] * (m - len(spans))
    # Where each instance's idle time lies: before its first job, between its jobs, after
    # its last (the owned window's ends); means over the instances that ran a job, in s.
    head = [min(a for a, _ in s) - f.window[0] for s in spans.values()]
    tail = [f.window[1] - max(b for _, b in s) for s in spans.values()]
    between = [
        (own - union_length(s)) - h - t for s, h, t in zip(spans.values(), head, tail, strict=True)
    ]
    overlaps = sum(overlapping_runs(s) for s in spans.values())
    started_stopped = None
    if f.stopped is not None:
        t0, t1 = f.stopped
        started_stopped = sum(1 for _, a, _ in f.job_times.values() if t0 <= a <= t1)
    return {
        "available": True,
        "done": f.done,
        "failed": f.failed,
        "wall_s": f.wall_s,
        "jobs_per_s": f.jobs_per_s,
        "cpu_ms_per_job": f.cpu_ms_per_job,
        "efficiency": makespan_efficiency([b - a for _, a, b in f.job_times.values()], m, f.wall_s),
        "gap_p50_s": f.gap_p50_s,
        "overlapping_runs": overlaps,
        "busy_min": min(busy),
        "busy_median": statistics.median(busy),
        "busy_mean": statistics.fmean(busy),
        "idle_head_s": statistics.fmean(head) if head else math.nan,
        "idle_between_s": statistics.fmean(between) if between else math.nan,
        "idle_tail_s": statistics.fmean(tail) if tail else math.nan,
        "stopped": f.stopped,
        "started_while_stopped": started_stopped,
        "staged_at_stop": f.staged_at_stop,
        "exit_code": f.exit_code,
    }


# --- report -------------------------------------------------------------------------------
def ok(good: bool) -> str:
    return "met" if good else "missed"


def table(res: dict[str, Any], stages: list[int]) -> str:
    par_t, par_s = res["parallel"]["trivial"], res["parallel"]["sleep"]
    rows = [
        "| figure | GNU parallel | vastd | target | verdict |",
        "|---|---|---|---|---|",
    ]
    for sa in stages:
        vt, vs = res["vastd"][f"sa{sa}"]["trivial"], res["vastd"][f"sa{sa}"]["sleep"]
        tag = f" (stage_ahead = {sa})"
        if not vt["available"]:
            for fig in ("trivial jobs/s", "controller CPU per job"):
                rows.append(f"| {fig}{tag} | | {NA} | | n/a |")
        else:
            ratio = vt["jobs_per_s"] / par_t["jobs_per_s"]
            rows.append(
                f"| trivial jobs/s{tag} | {par_t['jobs_per_s']:.1f} | {vt['jobs_per_s']:.1f} "
                f"({ratio:.1f}x) | >= {TARGET_JOBS_RATIO:g}x | {ok(ratio >= TARGET_JOBS_RATIO)} |"
            )
            cr = vt["cpu_ms_per_job"] / par_t["cpu_ms_per_job"]
            rows.append(
                f"| controller CPU per job{tag} | {par_t['cpu_ms_per_job']:.1f} ms | "
                f"{vt['cpu_ms_per_job']:.1f} ms (1/{1 / cr:.1f}) | <= 1/17 | "
                f"{ok(cr <= TARGET_CPU_RATIO)} |"
            )
        target = TARGET_EFF_STAGED if sa else TARGET_EFF
        if not vs["available"]:
            rows.append(
                f"| makespan efficiency, 160 x 2 s{tag} | {par_s['efficiency']:.3f} | {NA} | >= {target} | n/a |"
            )
            rows.append(f"| exit -> next start p50{tag} | - | {NA} | | n/a |")
            rows.append(f"| GPU-busy fraction min / median / mean{tag} | - | {NA} | | |")
            continue
        rows.append(
            f"| makespan efficiency, 160 x 2 s{tag} | {par_s['efficiency']:.3f} | "
            f"{vs['efficiency']:.3f} | >= {target} | {ok(vs['efficiency'] >= target)} |"
        )
        gap = vs["gap_p50_s"] * 1000
        if sa:
            rows.append(
                f"| exit -> next start p50{tag} | - | {gap:.0f} ms | <= 50 ms | "
                f"{ok(gap <= TARGET_GAP_STAGED_S * 1000)} |"
            )
        else:
            rows.append(f"| exit -> next start p50{tag} | - | {gap:.0f} ms | | |")
        over = vs.get("overlapping_runs")
        if over is not None:
            rows.append(
                f"| runs started while another ran in their slot{tag} | - | {over} | 0 | "
                f"{ok(over == 0)} |"
            )
        rows.append(
            f"| GPU-busy fraction min / median / mean{tag} | - | {vs['busy_min']:.3f} / "
            f"{vs['busy_median']:.3f} / {vs['busy_mean']:.3f} | | |"
        )
        rows.append(
            f"| idle per instance, mean: before its first job / between jobs / after its "
            f"last{tag} | - | {vs['idle_head_s']:.2f} / {vs['idle_between_s']:.2f} / "
            f"{vs['idle_tail_s']:.2f} s | | |"
        )
    stop = res.get("sigstop")
    if stop is not None:
        label = f"jobs started while the daemon was stopped {stop['sigstop_s']:g} s"
        label += f" (stage_ahead = {stop['stage_ahead']})"
        waiting = stop.get("staged_at_stop")
        also = f" ({waiting} instances had one staged at the stop)" if waiting is not None else ""
        rows.append(f"| {label} | - | {stop['started_while_stopped']}{also} | | |")
    return "\n".join(rows) + "\n"


async def main_async(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n, m = args.jobs, args.instances
    res: dict[str, Any] = {"parallel": {}, "vastd": {}}
    res["parallel"]["trivial"] = await run_parallel(workdir / "p1", n, m, PAR_TRIVIAL, "trivial")
    res["parallel"]["sleep"] = await run_parallel(workdir / "p2", n, m, PAR_SLEEP, "2 s jobs")
    for sa in args.stages:
        out: dict[str, Any] = {}
        for name, command in (("trivial", JOB_COMMAND), ("sleep", SLEEP_COMMAND)):
            print(f"  vastd, {name}, stage_ahead = {sa}")
            f = await run_vastd(workdir / f"v{sa}-{name}", n, m, command, sa)
            out[name] = vastd_summary(f, m)
            if isinstance(f, str):
                out["sleep"] = out[name]
                break
        res["vastd"][f"sa{sa}"] = out
    if args.sigstop_s:
        # The figure is for stage_ahead = 1; without it, the 'before' figure (0).
        for sa in (1, 0):
            print(f"  vastd, 2 s jobs, SIGSTOP {args.sigstop_s:g} s, stage_ahead = {sa}")
            f = await run_vastd(workdir / f"stop{sa}", n, m, SLEEP_COMMAND, sa, args.sigstop_s)
            if not isinstance(f, str):
                s = vastd_summary(f, m)
                res["sigstop"] = {"stage_ahead": sa, "sigstop_s": args.sigstop_s, **s}
                break
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=160)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument(
        "--stage-ahead", type=int, default=None, help="vastd [job] stage_ahead (default: 0 and 1)"
    )
    parser.add_argument("--sigstop-s", type=float, default=10.0, help="0: no SIGSTOP run")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)
    args.stages = [0, 1] if args.stage_ahead is None else [args.stage_ahead]
    if shutil.which("parallel") is None or shutil.which("rsync") is None:
        print("bench_parallel: GNU parallel or rsync missing (scripts/ensure-bench-tools.sh)")
        return 1
    setup_logging("WARNING", json=False, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    load0 = loadavg()
    t0 = time.time()
    res = in_workdir("vastd-parbench-", "bench_parallel", args.keep, lambda w: main_async(args, w))
    if res is None:
        return 1
    res["load_before"], res["load_after"] = load0, loadavg()
    res["elapsed_s"] = time.time() - t0
    res["machine"] = machine_info()
    print()
    print(f"load average before / after: {res['load_before']} / {res['load_after']}")
    print(table(res, args.stages))
    print("GNU parallel:", json.dumps(res["parallel"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    bad = [r for r in res["parallel"].values() if r["rc"] != 0 or r["done"] != args.jobs]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
