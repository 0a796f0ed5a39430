"""`make bench`: N trivial jobs over M simulated instances through the real daemon.

The simulator (fake vast.ai API + M asyncssh "instances" on 127.0.0.1) runs in this
process; the daemon is a separate `python -m vastd run` process, so its CPU time
(utime+stime from /proc/<pid>/stat) is its own. Each job writes two sub-second
timestamps on the "instance" (`out/t_start`, `out/t_end`), which come back as its
results; with the rename time of each job file and the daemon's JSON log that gives:

- jobs/s: N / (last `job_done` - first rename into inbox/)
- daemon CPU ms per job over that window, and its peak RSS (VmHWM)
- exit-to-next-start on the same instance: t_start of a job - t_end of the job
  before it on that instance (p50, p99)
- inbox-to-start: t_start - the moment the file was renamed into inbox/ (p50, p99)

Targets (issue 3, not assertions): >= 50 jobs/s with 16 instances, <= 20 ms daemon
CPU per job, exit-to-next-start p50 <= 0.5 s.

    .venv/bin/python bench/run_bench.py [--jobs 400] [--instances 16] [--rows 1]
    .venv/bin/python bench/run_bench.py --quick     # CI smoke: 20 jobs on 4 instances
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vastd.sim.cluster import SimCluster  # noqa: E402
from vastd.utils.logging import setup_logging  # noqa: E402

# The remote job: two sub-second timestamps written into {output_dir} (= <job>/out),
# which `result_glob = "out/t_*"` collects into results/<job>/t_start and t_end.
JOB_COMMAND = "date +%s.%N > {output_dir}/t_start && date +%s.%N > {output_dir}/t_end"
RESULT_GLOB = "out/t_*"
STOP_WAIT_S = 10.0  # --sigstop-s: the longest wait for a staged run on every instance
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The daemon's per-job events in pipeline order (CONTRACT §8).
STAGE_EVENTS = ("job_accepted", "job_dispatched", "job_started", "job_exited", "job_done")
# Events that mean something went wrong or was repeated: counted in the report.
TROUBLE_EVENTS = ("job_retry", "job_failed", "task_crashed", "loop_step_failed")

TARGET_JOBS_PER_S = 50.0
TARGET_CPU_MS_PER_JOB = 20.0
TARGET_GAP_P50_S = 0.5


# --- small helpers ------------------------------------------------------------------------
def toml_dumps(data: dict[str, Any]) -> str:
    """A minimal TOML writer for the config (strings, numbers, bools, lists, tables)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"cannot write {value!r} to TOML")
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)  # JSON escapes are valid TOML basic-string escapes
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        raise TypeError(f"cannot write {type(value).__name__} to TOML")

    def is_table_list(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any], header: str | None) -> None:
        if header is not None:
            lines.append("")
            lines.append(header)
        for key, value in body.items():
            if value is None or isinstance(value, dict) or is_table_list(value):
                continue
            if isinstance(value, list) and not value:
                continue
            lines.append(f"{json.dumps(key)} = {scalar(value)}")
        for key, value in body.items():
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            if isinstance(value, dict):
                table(name, value, f"[{name}]")
            elif is_table_list(value):
                for item in value:
                    table(name, item, f"[[{name}]]")

    table("", data, None)
    return "\n".join(lines).lstrip("\n") + "\n"


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def parse_ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


T = TypeVar("T")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them ("?" if unreadable)."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def in_workdir(
    prefix: str, label: str, keep: bool, main: Callable[[Path], Coroutine[Any, Any, T]]
) -> T | None:
    """`asyncio.run(main(workdir))` in a fresh temp folder, removed afterwards unless
    `keep`; None (and a FAILED line on stderr) when it raised TimeoutError or RuntimeError."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return asyncio.run(main(workdir))
    except (TimeoutError, RuntimeError) as exc:
        print(f"{label}: FAILED: {exc}", file=sys.stderr)
        return None
    finally:
        if keep:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def machine_info() -> dict[str, str]:
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count() or 0),
        "cpu": cpu or platform.processor() or "?",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def staged_instances(cluster: SimCluster) -> int:
    """Instances with a staged run waiting: a job folder holding `staged` (written when
    the run is staged, renamed to `go` when it is claimed)."""
    return sum(1 for inst in cluster.remote_root.iterdir() if any((inst / "jobs").glob("*/staged")))


# --- the daemon's log ---------------------------------------------------------------------
@dataclass
class DaemonLog:
    """Reads the daemon's JSON stdout; keeps what the bench needs."""

    expect_instances: int
    started: asyncio.Event = field(default_factory=asyncio.Event)
    prepared: set[str] = field(default_factory=set)
    all_prepared: asyncio.Event = field(default_factory=asyncio.Event)
    done_at: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    instance_of: dict[str, str] = field(default_factory=dict)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lines: int = 0
    # first log time of each pipeline event per job, for the stage breakdown
    seen: dict[str, dict[str, float]] = field(default_factory=dict)

    def feed(self, raw: bytes) -> None:
        self.lines += 1
        try:
            rec = json.loads(raw)
        except ValueError:
            self.problems.append(f"not JSON: {raw[:200]!r}")
            return
        event = rec.get("event", "")
        self.counts[event] = self.counts.get(event, 0) + 1
        level = rec.get("level")
        if level in ("error", "critical") and len(self.problems) < 20:
            self.problems.append(f"{level} {event}: {str(rec)[:300]}")
        if event in STAGE_EVENTS and "job" in rec:
            self.seen.setdefault(rec["job"], {}).setdefault(event, parse_ts(rec["timestamp"]))
        if event == "daemon_started":
            self.started.set()
        elif event == "instance_prepared":
            self.prepared.add(str(rec.get("instance")))
            if len(self.prepared) >= self.expect_instances:
                self.all_prepared.set()
        elif event in ("job_dispatched", "job_started") and "job" in rec:
            self.instance_of[rec["job"]] = str(rec.get("instance"))
        elif event == "job_done":
            self.done_at[rec["job"]] = parse_ts(rec["timestamp"])
            self.progress.set()
        elif event == "job_failed":
            self.failed[rec["job"]] = str(rec.get("reason"))
            self.progress.set()

    async def pump(self, stream: asyncio.StreamReader, copy_to: Path) -> None:
        with copy_to.open("wb") as out:
            while raw := await stream.readline():
                out.write(raw)
                self.feed(raw)


# --- the run ------------------------------------------------------------------------------
@dataclass
class Figures:
    jobs: int
    instances: int
    rows: int
    done: int
    failed: int
    wall_s: float
    jobs_per_s: float
    cpu_ms_per_job: float
    daemon_cpu_s: float
    sim_cpu_s: float
    shell_cpu_s: float
    peak_rss_mib: float
    gap_p50_s: float
    gap_p99_s: float
    gap_n: int
    inbox_p50_s: float
    inbox_p99_s: float
    remote_run_p50_s: float
    exit_code: int | None
    # timed window: first rename into inbox/ .. last job_done (wall clock)
    window: tuple[float, float] = (math.nan, math.nan)
    # job -> (instance, remote t_start, remote t_end); for bench_parallel.py's figures
    job_times: dict[str, tuple[str, float, float]] = field(default_factory=dict, repr=False)
    # --sigstop-s: the wall-clock window the daemon was stopped in (SIGSTOP .. SIGCONT),
    # and how many instances had a staged run waiting then (their job folders tell)
    stopped: tuple[float, float] | None = None
    staged_at_stop: int | None = None
    stages: list[tuple[str, float, float]] = field(default_factory=list)
    trouble: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def make_config(cluster: SimCluster, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = cluster.settings(
        root,
        vast={"poll_interval_s": 1.0},
        prepare=[{"name": "nothing to install", "check": "true", "install": "", "timeout_s": 30}],
        job={
            "command": getattr(args, "job_command", JOB_COMMAND),
            "result_glob": RESULT_GLOB,
            "min_results": 1,
            "validate": "none",
            "poll_interval_s": args.job_poll_s,
            "timeout_s": 120,
            "max_attempts": 2,
            "vars": {},
        },
    )
    data = settings.model_dump(mode="json", by_alias=True)
    if getattr(args, "stage_ahead", None) is not None:
        data["job"]["stage_ahead"] = args.stage_ahead  # a key newer trees know
    data["vast"].pop("api_key", None)  # the key goes through the environment
    return data


def write_jobs(folder: Path, n: int, rows: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"bench_job_{i:05d}.csv"
        body = "i,x\n" + "".join(f"{r},{i * rows + r}\n" for r in range(rows))
        path.write_text(body)
        paths.append(path)
    return paths


async def wait_for(event: asyncio.Event, proc: asyncio.subprocess.Process, what: str, s: float):
    """Wait for `event`, failing early if the daemon exits."""
    waiter = asyncio.ensure_future(event.wait())
    dead = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait({waiter, dead}, timeout=s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        dead.cancel()
    if waiter not in done:
        if proc.returncode is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before {what}")
        raise TimeoutError(f"no {what} within {s:.0f} s")


async def run(args: argparse.Namespace, workdir: Path) -> Figures:
    n, m = args.jobs, args.instances
    print(f"vastd bench: {n} jobs x {args.rows} rows on {m} simulated instances")
    cluster = await SimCluster.start(workdir / "sim", instances=m)
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    try:
        # Not "vastd": a folder of that name in the daemon's cwd shadows the package.
        root = workdir / "root"
        config = workdir / "config.toml"
        config.write_text(toml_dumps(make_config(cluster, root, args)))
        # Written long before they are renamed in: the inbox takes a file at once when
        # its ctime is later than its mtime (renamed in), without waiting for it to settle.
        staged = write_jobs(root / "bench-stage", n, args.rows)
        inbox = root / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)

        env = dict(os.environ, VASTD_VAST__API_KEY=cluster.api_key, PYTHONUNBUFFERED="1")
        env.pop("VASTD_CONFIG", None)
        cmd = [sys.executable, "-m", "vastd", "run", "--config", str(config)]
        if args.cprofile:
            cmd[1:1] = ["-m", "cProfile", "-o", str(Path(args.cprofile).absolute())]
        log = DaemonLog(expect_instances=m)
        stderr = (workdir / "daemon.stderr").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=str(workdir),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            limit=1 << 22,
        )
        stderr.close()
        assert proc.stdout is not None
        pump = asyncio.create_task(log.pump(proc.stdout, workdir / "daemon.log"))
        print(f"  daemon pid {proc.pid}: {shlex.join(cmd)}")
        if args.pause_for_profiler:
            print(f"  profile it now, e.g. py-spy record -o profile.svg --pid {proc.pid}")
        await wait_for(log.started, proc, "daemon_started", 60)
        await wait_for(log.all_prepared, proc, f"{m} instance_prepared events", 120)
        if args.pause_for_profiler:
            await asyncio.sleep(args.pause_for_profiler)

        sim_cpu0 = time.process_time()
        kids0 = os.times()
        cpu0 = proc_cpu_s(proc.pid)
        landed: dict[str, float] = {}
        for src in staged:
            os.rename(src, inbox / src.name)
            landed[src.stem] = time.time()
        first = min(landed.values())
        print(f"  {n} files renamed into inbox/ in {max(landed.values()) - first:.3f} s")

        deadline = time.monotonic() + args.deadline_s
        last_report = time.monotonic()
        stopped: tuple[float, float] | None = None
        staged_at_stop: int | None = None
        stop_s = getattr(args, "sigstop_s", 0.0)
        third_at: float | None = None
        while len(log.done_at) + len(log.failed) < n:
            if stop_s and third_at is None and len(log.done_at) >= n // 3:
                third_at = time.monotonic()
            # The jobs on all instances start and end about together, so a stop at a
            # random moment may find most slots between a staged run's start and the
            # staging of the next: stop once every instance has one waiting (or after
            # STOP_WAIT_S), and say how many had.
            waiting = staged_instances(cluster) if stop_s and stopped is None else 0
            if (
                stop_s
                and stopped is None
                and third_at is not None
                and (
                    waiting >= m
                    or not getattr(args, "stage_ahead", 0)
                    or time.monotonic() - third_at > STOP_WAIT_S
                )
            ):
                # Freeze the daemon mid-run (the instances, in this process, go on).
                staged_at_stop = waiting
                proc.send_signal(signal.SIGSTOP)
                t_stop = time.time()
                await asyncio.sleep(stop_s)
                proc.send_signal(signal.SIGCONT)
                stopped = (t_stop, time.time())
                deadline += stop_s
                print(f"  daemon stopped for {stop_s:.0f} s after {len(log.done_at)} done")
            if proc.returncode is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} mid-run")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"only {len(log.done_at)} done, {len(log.failed)} failed of {n} "
                    f"after {args.deadline_s:.0f} s"
                )
            log.progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await log.progress.wait()
            if time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                print(f"  ... {len(log.done_at)} done, {len(log.failed)} failed of {n}")
        cpu1 = proc_cpu_s(proc.pid)
        sim_cpu = time.process_time() - sim_cpu0
        kids1 = os.times()
        shell_cpu = (kids1.children_user + kids1.children_system) - (
            kids0.children_user + kids0.children_system
        )
        hwm = proc_status_kib(proc.pid, "VmHWM") or 0

        done_dir = root / "done"
        in_done = {p.stem for p in done_dir.glob("*.csv")}
        missing = sorted(set(log.done_at) - in_done)
        if missing:
            raise RuntimeError(f"{len(missing)} jobs logged done but not in done/: {missing[:3]}")

        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("the daemon did not stop within 30 s of SIGTERM") from None
        await pump
        if code != 0:
            print(f"  WARNING: the daemon exited with {code} after SIGTERM (expected 0)")

        # Remote timestamps, grouped by instance.
        results = root / "results"
        t_start: dict[str, float] = {}
        t_end: dict[str, float] = {}
        for job in log.done_at:
            try:
                t_start[job] = float((results / job / "t_start").read_text())
                t_end[job] = float((results / job / "t_end").read_text())
            except (OSError, ValueError) as exc:
                raise RuntimeError(f"{job}: results incomplete: {exc}") from None
        by_instance: dict[str, list[str]] = {}
        for job in t_start:
            by_instance.setdefault(log.instance_of.get(job, "?"), []).append(job)
        gaps: list[float] = []
        for jobs in by_instance.values():
            jobs.sort(key=t_start.__getitem__)
            gaps.extend(t_start[b] - t_end[a] for a, b in itertools.pairwise(jobs))
        inbox_lat = [t_start[j] - landed[j] for j in t_start]
        remote_run = [t_end[j] - t_start[j] for j in t_start]
        last = max(log.done_at.values(), default=first)
        wall = last - first
        cpu = cpu1 - cpu0
        return Figures(
            jobs=n,
            instances=m,
            rows=args.rows,
            done=len(log.done_at),
            failed=len(log.failed),
            wall_s=wall,
            jobs_per_s=len(log.done_at) / wall if wall > 0 else math.nan,
            cpu_ms_per_job=cpu * 1000 / n,
            daemon_cpu_s=cpu,
            sim_cpu_s=sim_cpu,
            shell_cpu_s=shell_cpu,
            peak_rss_mib=hwm / 1024,
            gap_p50_s=percentile(gaps, 50),
            gap_p99_s=percentile(gaps, 99),
            gap_n=len(gaps),
            inbox_p50_s=percentile(inbox_lat, 50),
            inbox_p99_s=percentile(inbox_lat, 99),
            remote_run_p50_s=percentile(remote_run, 50),
            exit_code=code,
            window=(first, last),
            job_times={j: (log.instance_of.get(j, "?"), t_start[j], t_end[j]) for j in t_start},
            stopped=stopped,
            staged_at_stop=staged_at_stop,
            stages=stage_breakdown(log.seen),
            failures=[f"{job}: {why}" for job, why in sorted(log.failed.items())],
            trouble={e: log.counts.get(e, 0) for e in TROUBLE_EVENTS if log.counts.get(e)},
        )
    except BaseException:
        print_daemon_tail(workdir)
        raise
    finally:
        await tear_down(proc, pump, cluster)


def stage_breakdown(seen: dict[str, dict[str, float]]) -> list[tuple[str, float, float]]:
    """p50 and p90 of the time between consecutive pipeline events of each job."""
    out = []
    for a, b in itertools.pairwise(STAGE_EVENTS):
        d = [e[b] - e[a] for e in seen.values() if a in e and b in e]
        out.append((f"{a} -> {b}", percentile(d, 50), percentile(d, 90)))
    return out


def print_daemon_tail(workdir: Path) -> None:
    """On a failed run: the daemon's last log and stderr lines, to stderr."""
    if log_tail := _tail(workdir / "daemon.log") + _tail(workdir / "daemon.stderr"):
        print("  --- the daemon's last output ---\n" + log_tail, file=sys.stderr)


async def tear_down(
    proc: asyncio.subprocess.Process | None, pump: asyncio.Task[Any] | None, cluster: Any
) -> None:
    """Kill a daemon still running, stop its log pump, close the simulator."""
    if proc is not None and proc.returncode is None:
        proc.kill()
        await proc.wait()
    if pump is not None:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    await cluster.aclose()


def _tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()[-n:]
        # Exception lines carry frame locals and can be huge: keep their start.
        return "".join(line[:600] + "\n" for line in lines)
    return ""


# --- report -------------------------------------------------------------------------------
def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    ratio = value / target if higher_is_better else target / value if value else math.inf
    return "met" if ok else f"missed ({ratio:.2f}x of target)"


def report(f: Figures, command: str) -> str:
    rows = [
        ("jobs done / failed", f"{f.done} / {f.failed}", ""),
        ("wall time, first rename to last job_done", f"{f.wall_s:.2f} s", ""),
        (
            "throughput",
            f"{f.jobs_per_s:.1f} jobs/s",
            f">= {TARGET_JOBS_PER_S:.0f}: " + verdict(f.jobs_per_s, TARGET_JOBS_PER_S, True),
        ),
        (
            "daemon CPU per job",
            f"{f.cpu_ms_per_job:.1f} ms",
            f"<= {TARGET_CPU_MS_PER_JOB:.0f}: "
            + verdict(f.cpu_ms_per_job, TARGET_CPU_MS_PER_JOB, False),
        ),
        (
            "exit -> next start, same instance, p50 / p99",
            f"{f.gap_p50_s:.3f} / {f.gap_p99_s:.3f} s (n={f.gap_n})",
            f"p50 <= {TARGET_GAP_P50_S}: " + verdict(f.gap_p50_s, TARGET_GAP_P50_S, False),
        ),
        ("inbox -> remote start, p50 / p99", f"{f.inbox_p50_s:.3f} / {f.inbox_p99_s:.3f} s", ""),
        ("remote command itself, p50", f"{f.remote_run_p50_s * 1000:.1f} ms", ""),
        ("daemon peak RSS (VmHWM)", f"{f.peak_rss_mib:.0f} MiB", ""),
        (
            "simulator CPU (this process), per job",
            f"{f.sim_cpu_s * 1000 / f.jobs:.1f} ms",
            "context",
        ),
        (
            "instances' shell commands (children of this process), CPU per job",
            f"{f.shell_cpu_s * 1000 / f.jobs:.1f} ms",
            "context",
        ),
        ("daemon exit code after SIGTERM", str(f.exit_code), "expected 0"),
    ]
    out = [f"`{command}`", "", "| figure | value | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out += ["", "Where the time goes (daemon log, first occurrence per job):", ""]
    out += ["| stage | p50 | p90 |", "|---|---|---|"]
    out += [f"| {name} | {p50:.3f} s | {p90:.3f} s |" for name, p50, p90 in f.stages]
    trouble = ", ".join(f"{k} {v}" for k, v in f.trouble.items()) or "none"
    out += ["", f"Retries and crashes in the daemon log: {trouble}"]
    out += [f"- failed {line[:300]}" for line in f.failures[:5]]
    return "\n".join(out) + "\n"


def figures_json(f: Figures) -> dict[str, Any]:
    """The figures for --json, less the per-job timestamps."""
    return {k: v for k, v in f.__dict__.items() if k != "job_times"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="job files (default 400)")
    parser.add_argument("--instances", type=int, default=None, help="instances (default 16)")
    parser.add_argument("--rows", type=int, default=1, help="data rows per job file")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 20 jobs, 4 instances")
    parser.add_argument("--job-poll-s", type=float, default=2.0, help="[job] poll_interval_s")
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="give up the timed part after this long"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--cprofile", metavar="PATH", help="run the daemon under cProfile")
    parser.add_argument(
        "--pause-for-profiler",
        type=float,
        default=0.0,
        metavar="S",
        help="wait S seconds after the instances are ready (to attach py-spy)",
    )
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (20 if args.quick else 400)
    args.instances = args.instances or (4 if args.quick else 16)
    args.deadline_s = args.deadline_s or (90.0 if args.quick else 240.0)
    if args.jobs < 1 or args.instances < 1 or args.rows < 1:
        parser.error("--jobs, --instances and --rows must be at least 1")
    # The simulator's own log lines (this process) only when something is wrong.
    setup_logging("WARNING", json=False, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)

    command = "python bench/run_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # The overall deadline: start-up, the timed part and shutdown.
    figures = in_workdir(
        "vastd-bench-",
        "vastd bench",
        args.keep,
        lambda workdir: asyncio.wait_for(run(args, workdir), timeout=args.deadline_s + 240),
    )
    if figures is None:
        return 1
    info = machine_info()
    print()
    print(
        f"machine: {info['cores']} cores ({info['cpu']}), {info['memory']}, "
        f"Python {info['python']}, Linux {info['kernel']}"
    )
    print(report(figures, command.strip()))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"command": command.strip(), "machine": info, **figures_json(figures)}, indent=2
            )
            + "\n"
        )
    if figures.done != figures.jobs:
        print(f"vastd bench: FAILED: {figures.jobs - figures.done} of {figures.jobs} jobs not done")
        return 1
    if figures.exit_code != 0:
        print(f"vastd bench: FAILED: the daemon exited with {figures.exit_code} on SIGTERM")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
