"""`make bench-scale` (issue 9): a campaign at scale, by default through the real daemon.

Default run: the simulator (fake vast.ai API, M instances sharing `--sshd` asyncssh SSH
servers on 127.0.0.1, commands run as local `/bin/sh` processes; each instance has its
own remote folder `<remote root>/<instance id>/`) lives in this process; the daemon is
a real `python -m vastd run` subprocess (as in bench/run_bench.py). N trivial job files
(`: > out/r`, collected with `validate = "none"`) are staged, then renamed into inbox/
in batches of `--batch`: the first at once, each next one when fewer than half a batch
is left unfinished. Recorded, from /proc and the daemon's JSON log:

- jobs/s: N / (last `job_done` - first rename);
- daemon CPU per job (utime+stime) for the first 1,000 finished jobs (from the first
  rename) and the last 10,000 (or N/10), with how many acceptances fell in each window;
- daemon peak RSS (VmHWM);
- event-loop lag p50/p99/max measured inside the daemon (its final `loop_lag` event);
- state.json bytes (the largest `state_saved`, and the file after the campaign), save
  time p99 when `state_saved` carries a duration, history.jsonl bytes;
- `vastd status --json` latency with the campaign finished (best of 3);
- load at start: a second daemon on the same root, spawn -> `daemon_started`;
- the time for each batch dropped at once to be accepted (rename -> last `job_accepted`).

`--pin-daemon CPU`: the daemon (and its threads) on that CPU alone, the simulated world
on the others, so that on a small machine the daemon's lag is its own and not a wait
for the cores behind the simulated instances (which in production are other machines).

`--bookkeeping`: the earlier in-process run without SSH (the daemon's acceptance, the
transitions and the real saver on one loop; CPU, loop lag, serialise/write times,
load and status), which is cheap at 100,000 jobs.

    .venv/bin/python bench/bench_scale.py [--jobs 100000] [--instances 500] [--sshd 4] [--batch 10000]
    .venv/bin/python bench/bench_scale.py --jobs 3000 --instances 500 --sshd 4 --batch 1000
    .venv/bin/python bench/bench_scale.py --jobs 3000 --instances 500 --sshd 4 --batch 1000 --pin-daemon 0
    .venv/bin/python bench/bench_scale.py --quick                # 300 jobs, 50 instances, 2 servers
    .venv/bin/python bench/bench_scale.py --bookkeeping [--jobs 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_bench import (  # noqa: E402
    TROUBLE_EVENTS,
    DaemonLog,
    in_workdir,
    loadavg,
    machine_info,
    parse_ts,
    percentile,
    print_daemon_tail,
    proc_cpu_s,
    proc_status_kib,
    tear_down,
    toml_dumps,
    wait_for,
)
from vastd.core import snapshot as snapshot_mod  # noqa: E402
from vastd.core import state as st  # noqa: E402
from vastd.core.state import InstanceRecord, InstanceStatus, StateStore  # noqa: E402
from vastd.daemon import tune_gc  # noqa: E402
from vastd.orchestration.context import build_context  # noqa: E402
from vastd.orchestration.coordinator import DISPATCH_WAVE  # noqa: E402
from vastd.orchestration.workflow import accept_inbox_files  # noqa: E402
from vastd.sim.cluster import SimCluster  # noqa: E402
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


# === --bookkeeping: in one process, no SSH ==============================================
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
    real_serialize = store.serialize_parts

    def timed_serialize() -> list[bytes]:
        t0 = time.perf_counter()
        data = real_serialize()
        serialize_s.append(time.perf_counter() - t0)
        return data

    def timed_save(data: Any, path: Path, backup: Path | None = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        real_save(data, path, backup, **kw)
        write_s.append(time.perf_counter() - t0)

    store.serialize_parts = timed_serialize  # type: ignore[method-assign]
    snapshot_mod.save_state = timed_save

    stop = asyncio.Event()
    lag: list[float] = []
    ticker = asyncio.create_task(lag_ticker(lag, stop))
    tune_gc()  # as `vastd run` does once started
    saver = asyncio.create_task(store.run_saver())
    names = [f"job_{n:06d}" for n in range(jobs)]
    # CPU of this process (the "daemon"), split: acceptance of a batch vs the rest
    # (dispatch, transitions, saves, history), whose per-job figure must not grow.
    cpu_marks: dict[int, float] = {}
    accepting_cpu = 0.0  # acceptance's CPU so far: taken out of the per-job windows

    def cpu_now() -> float:
        return time.process_time() - accepting_cpu

    accept_cpu: list[float] = []
    done = 0
    free = list(store.instances)
    first_accept_s = 0.0
    last_n = max(1, min(10000, jobs // 10))
    t_start = time.perf_counter()
    for offset in range(0, jobs, batch):
        chunk = names[offset : offset + batch]
        inbox = ctx.layout.inbox

        def stage(chunk: list[str] = chunk, inbox: Path = inbox) -> None:
            for name in chunk:
                (inbox / f".{name}.tmp").write_text(CSV)

        def drop(chunk: list[str] = chunk, inbox: Path = inbox) -> None:
            for name in chunk:
                os.rename(inbox / f".{name}.tmp", inbox / f"{name}.csv")

        # The user's side (writing and renaming the files) runs in a thread: the loop's
        # lag is the daemon's own.
        await asyncio.to_thread(stage)
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.to_thread(drop)
        paths = [ctx.layout.inbox / f"{name}.csv" for name in chunk]
        for step in range(0, len(paths), 512):  # as the inbox watcher hands them over
            await accept_inbox_files(ctx, paths[step : step + 512])
        accept_cpu.append((time.process_time() - c0) / len(chunk))
        accepting_cpu += time.process_time() - c0
        if offset == 0:
            first_accept_s = time.perf_counter() - t0
            cpu_marks[0] = cpu_now()
        elif done > jobs - last_n:
            raise SystemExit("--batch too small for the last window: use --batch >= N/10")
        queue = [n for n in chunk if n in store.jobs]
        while queue:
            # as dispatch does: one save for `DISPATCH_WAVE` assignments at most
            room = min(len(free), DISPATCH_WAVE)
            wave, queue = queue[:room], queue[room:]
            placed = []
            for name, iid in zip(wave, free, strict=False):
                record = await st.assign_job(store, name, iid)
                assert record is not None
                placed.append((name, iid, record.run_id))
            await store.flush()  # write-ahead, as dispatch does
            for name, iid, run_id in placed:
                st.mark_job_started(store, name, run_id=run_id, pgid=1, new=True)
                st.mark_job_exited(store, name, exit_code=0, error=None)
                # As collection does: the move in a thread (its fsyncs go to the saver).
                done_job = await st.complete_job(
                    store,
                    store.jobs[name],
                    instance_id=iid,
                    run_id=run_id,
                    result_files=["out.parquet"],
                    rows_out=1,
                    cost=0.0001,
                    gpu_name="RTX 4090",
                )
                assert done_job is not None
                st.followup_done(store, next(iter(store.snapshot.followups)))
                done += 1
                if done in (min(1000, jobs), jobs - last_n):
                    cpu_marks[done] = cpu_now()
            await asyncio.sleep(0)
    cpu_marks[jobs] = cpu_now()
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
    command_s: dict[str, float] = {}
    outputs: dict[str, str] = {}
    for command in ("status", "jobs", "report"):
        times = []
        for _ in range(4):  # the first (untimed) writes the bytecode cache: command_env
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "vastd", command, "--json", "--config", str(config)],
                capture_output=True,
                text=True,
                check=True,
                env=command_env(),
            )
            times.append(time.perf_counter() - t0)
        command_s[command] = min(times[1:])
        outputs[command] = proc.stdout
    status = json.loads(outputs["status"])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vastd.cli"], check=True, env=command_env())
    import_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "in_history": len(store.history),
        "status_s": command_s["status"],
        "jobs_s": command_s["jobs"],
        "report_s": command_s["report"],
        "jobs_rows": len(json.loads(outputs["jobs"])),
        "python_start_import_s": import_s,
        "status_done": status["jobs"]["done"],
    }


def bookkeeping_main(args: argparse.Namespace) -> int:
    """`--bookkeeping`: the in-process run above (no daemon, no SSH)."""
    if args.quick:
        args.jobs, args.instances, args.batch = 2000, 50, 1000
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="vastd-scale-") as tmp:
        root = Path(tmp)
        figures = asyncio.run(campaign(root, args.jobs, args.instances, args.batch))
        figures.update(after(root))
    print(json.dumps(figures, indent=2))
    return 0


# === the default: the real daemon against the simulator =================================
# The remote job: one shell builtin writing the one result file (no fork beyond the sh).
DAEMON_JOB_COMMAND = ": > {output_dir}/r"
DAEMON_RESULT_GLOB = "out/r"


_WANTED = (b"job_accepted", b"job_done", b"job_failed", b"loop_lag", b"state_saved")


class ScaleLog(DaemonLog):
    """The daemon's JSON log, plus what the scale bench needs: acceptance times per job,
    CPU marks at given counts of finished jobs, loop_lag and state_saved events."""

    def __init__(self, expect_instances: int, pid_of: Any, marks: set[int]) -> None:
        super().__init__(expect_instances=expect_instances)
        self.pid_of = pid_of
        self.marks = marks
        self.cpu_at: dict[int, float] = {}  # finished count -> daemon CPU seconds
        self.accepted_at_mark: dict[int, int] = {}  # finished count -> jobs accepted so far
        self.accepted: dict[str, float] = {}
        self.finished = 0
        self.loop_lag: list[dict[str, Any]] = []
        self.saves: list[dict[str, Any]] = []

    def feed(self, raw: bytes) -> None:
        super().feed(raw)
        if not any(word in raw for word in _WANTED):
            return
        try:
            rec = json.loads(raw)
        except ValueError:
            return
        event = rec.get("event")
        if event == "job_accepted" and "job" in rec:
            self.accepted.setdefault(rec["job"], parse_ts(rec["timestamp"]))
        elif event in ("job_done", "job_failed"):
            self.finished = len(self.done_at) + len(self.failed)
            if self.finished in self.marks and self.finished not in self.cpu_at:
                self.cpu_at[self.finished] = proc_cpu_s(self.pid_of())
                self.accepted_at_mark[self.finished] = len(self.accepted)
        elif event == "loop_lag":
            self.loop_lag.append(rec)
        elif event == "state_saved":
            self.saves.append(rec)


def stage_jobs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"scale_job_{i:06d}.csv"
        path.write_text(f"i,x\n0,{i}\n")
        paths.append(path)
    return paths


def set_affinity_all_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (and what it starts from now on) to `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


async def start_daemon(
    config: Path,
    env: dict[str, str],
    workdir: Path,
    log: ScaleLog,
    tag: str,
    pin_cpu: int | None = None,
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    stderr = (workdir / f"daemon{tag}.stderr").open("wb")
    world_cpus = os.sched_getaffinity(0)
    if pin_cpu is not None:
        # The daemon inherits this affinity at its fork; the world gets the rest after.
        set_affinity_all_threads({pin_cpu})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vastd",
        "run",
        "--config",
        str(config),
        cwd=str(workdir),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        limit=1 << 22,
    )
    if pin_cpu is not None:
        set_affinity_all_threads((world_cpus - {pin_cpu}) or world_cpus)
    stderr.close()
    assert proc.stdout is not None
    pump = asyncio.create_task(log.pump(proc.stdout, workdir / f"daemon{tag}.log"))
    return proc, pump


async def stop_daemon(proc: asyncio.subprocess.Process, pump: asyncio.Task[None]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(60):
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("the daemon did not stop within 60 s of SIGTERM") from None
    await pump
    return code


def command_env() -> dict[str, str]:
    """The environment of the timed commands: bytecode cached, as an installed vastd has
    it (pip compiles it at install time; PYTHONDONTWRITEBYTECODE, set on some machines,
    would make every command compile vastd's sources again)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


async def timed_command(argv: list[str], runs: int = 3) -> tuple[float, str]:
    """Best wall time of `runs` runs of a command (after one untimed run, which writes
    the bytecode cache), and its last stdout."""
    best, out = math.inf, b""
    for i in range(runs + 1):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=command_env()
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {err[-500:]!r}")
        if i:
            best = min(best, time.perf_counter() - t0)
    return best, out.decode()


async def daemon_campaign(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n, m, batch = args.jobs, args.instances, min(args.batch, args.jobs)
    first_n = min(1000, n)
    last_n = max(1, min(10000, n // 10))
    print(
        f"vastd scale bench: {n} jobs on {m} simulated instances sharing {args.sshd} SSH "
        f"servers, dropped in batches of {batch} (load average {loadavg()})",
        flush=True,
    )
    cluster = await SimCluster.start(
        workdir / "sim", instances=m, shared_servers=args.sshd, boot_delay_s=0.2
    )
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    try:
        root = workdir / "root"  # not "vastd": the daemon's cwd is workdir
        settings = cluster.settings(
            root,
            vast={"poll_interval_s": args.api_poll_s, "lost_grace_s": 120.0},
            ssh={"connect_timeout_s": 60.0, "command_timeout_s": 120.0},
            prepare=[{"name": "nothing", "check": "true", "install": "", "timeout_s": 60}],
            job={
                "command": DAEMON_JOB_COMMAND,
                "result_glob": DAEMON_RESULT_GLOB,
                "min_results": 1,
                "validate": "none",
                "poll_interval_s": args.job_poll_s,
                "timeout_s": 600,
                "max_attempts": 2,
                "vars": {},
            },
            fleet={"mode": "adopt", "max_instances": m},
        )
        data = settings.model_dump(mode="json", by_alias=True)
        data["vast"].pop("api_key", None)  # through the environment
        # state_saved is a debug line since aa5694e: the save figures need it.
        data["log"]["level"] = "debug"
        config = workdir / "config.toml"
        config.write_text(toml_dumps(data))
        t0 = time.perf_counter()
        staged = stage_jobs(root / "bench-stage", n)
        print(f"  {n} job files staged in {time.perf_counter() - t0:.1f} s", flush=True)
        inbox = root / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        # Bytecode cached (command_env): the restart is timed as an installed vastd starts.
        env = dict(command_env(), VASTD_VAST__API_KEY=cluster.api_key, PYTHONUNBUFFERED="1")
        env.pop("VASTD_CONFIG", None)

        marks = {first_n, n - last_n, n}
        log = ScaleLog(m, lambda: proc.pid if proc is not None else 0, marks)
        proc, pump = await start_daemon(config, env, workdir, log, "", args.pin_daemon)
        print(f"  daemon pid {proc.pid}", flush=True)
        if args.nice_world:
            # The simulated world (this process: the API, the SSH servers, and the shells
            # they start from now on) yields the cores to the daemon, which stays at its
            # priority: on 2 shared cores its loop lag is then its own, not the world's.
            os.nice(args.nice_world)
        await wait_for(log.started, proc, "daemon_started", 120)
        t0 = time.perf_counter()
        await wait_for(log.all_prepared, proc, f"{m} instance_prepared events", 120 + m)
        print(f"  {m} instances prepared in {time.perf_counter() - t0:.1f} s", flush=True)

        sim_cpu0 = time.process_time()
        kids0 = os.times()
        cpu0 = proc_cpu_s(proc.pid)
        drops: list[tuple[int, int, float]] = []  # (first index, count, rename time)
        deadline = time.monotonic() + args.deadline_s
        last_report = time.monotonic()
        dropped = 0
        while log.finished < n:
            if proc.returncode is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} mid-run")
            # The next batch once the backlog is under half a batch (the first at once).
            if dropped < n and dropped - log.finished <= batch // 2:
                count = min(batch, n - dropped)
                at = time.time()
                for src in staged[dropped : dropped + count]:
                    os.rename(src, inbox / src.name)
                drops.append((dropped, count, at))
                dropped += count
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(log.done_at)} done, {len(log.failed)} failed of {n} "
                    f"after {args.deadline_s:.0f} s"
                )
            log.progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await log.progress.wait()
            if time.monotonic() - last_report >= 15:
                last_report = time.monotonic()
                elapsed = time.time() - drops[0][2]
                print(
                    f"  ... {elapsed:.0f} s: {len(log.accepted)} accepted, "
                    f"{len(log.done_at)} done, {len(log.failed)} failed of {n} "
                    f"({log.finished / elapsed:.1f} jobs/s; load {loadavg()})",
                    flush=True,
                )
        first = drops[0][2]
        wall = max([*log.done_at.values(), *[first]]) - first
        sim_cpu = time.process_time() - sim_cpu0
        kids1 = os.times()
        shell_cpu = (kids1.children_user + kids1.children_system) - (
            kids0.children_user + kids0.children_system
        )
        hwm_kib = proc_status_kib(proc.pid, "VmHWM") or 0
        load_end = loadavg()

        # Acceptance of each batch dropped at once: rename -> its last job_accepted.
        accept_s = []
        for start, count, at in drops:
            times = [log.accepted.get(p.stem) for p in staged[start : start + count]]
            got = [t for t in times if t is not None]
            accept_s.append(max(got) - at if len(got) == count else math.nan)

        # The finished jobs leave state.json for history.jsonl: wait for that save.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not (log.saves and log.saves[-1].get("jobs") == 0):
                    await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        state_bytes = (root / "state.json").stat().st_size
        history_bytes = (root / "history.jsonl").stat().st_size
        in_done = sum(1 for _ in (root / "done").glob("*.csv"))

        status_argv = [sys.executable, "-m", "vastd", "status", "--json", "--config", str(config)]
        status_s, status_out = await timed_command(status_argv)
        status = json.loads(status_out)
        import_s, _ = await timed_command([sys.executable, "-c", "import vastd.cli"])

        code = await stop_daemon(proc, pump)
        lag_final = next((e for e in reversed(log.loop_lag) if e.get("final")), None)
        lag_windows = [e for e in log.loop_lag if not e.get("final")]

        # Load at start with the history present: a fresh daemon on the same root.
        relog = ScaleLog(m, lambda: 0, set())
        t0 = time.perf_counter()
        proc, pump = await start_daemon(config, env, workdir, relog, "-restart", args.pin_daemon)
        await wait_for(relog.started, proc, "daemon_started after the restart", 300)
        restart_ready_s = time.perf_counter() - t0
        restart_code = await stop_daemon(proc, pump)
        proc = None

        def save_figure(key: str) -> list[float]:
            return [float(e[key]) for e in log.saves if isinstance(e.get(key), int | float)]

        save_ms = save_figure("duration_ms")
        serialize_ms, write_ms = save_figure("serialize_ms"), save_figure("write_ms")
        cpu = log.cpu_at
        acc = log.accepted_at_mark
        nan = math.nan
        cpu_total = cpu.get(n, nan) - cpu0
        return {
            "command": "",
            "jobs": n,
            "instances": m,
            "sshd": args.sshd,
            "batch": batch,
            "batches": len(drops),
            "done": len(log.done_at),
            "failed": len(log.failed),
            "in_done_folder": in_done,
            "wall_s": wall,
            "jobs_per_s": len(log.done_at) / wall if wall > 0 else math.nan,
            "daemon_cpu_ms_per_job": 1000 * cpu_total / n,
            "daemon_cpu_s": cpu_total,
            "cpu_ms_first": 1000 * (cpu.get(first_n, nan) - cpu0) / first_n,
            "first_n": first_n,
            "accepted_by_first_mark": acc.get(first_n),
            "cpu_ms_last": 1000 * (cpu.get(n, nan) - cpu.get(n - last_n, nan)) / last_n,
            "last_n": last_n,
            "accepted_in_last_window": acc.get(n, 0) - acc.get(n - last_n, 0),
            "peak_rss_mib": hwm_kib / 1024,
            "lag_p50_ms": lag_final.get("p50_ms") if lag_final else None,
            "lag_p99_ms": lag_final.get("p99_ms") if lag_final else None,
            "lag_max_ms": lag_final.get("max_ms") if lag_final else None,
            "lag_samples": lag_final.get("samples") if lag_final else None,
            "lag_worst_window_p99_ms": max(
                (e.get("window_p99_ms", 0) for e in lag_windows), default=None
            ),
            "saves": len(log.saves),
            "state_bytes_peak": max((int(e.get("bytes", 0)) for e in log.saves), default=0),
            "state_bytes_end": state_bytes,
            "save_p99_ms": percentile(save_ms, 99) if save_ms else None,
            "serialize_p99_ms": percentile(serialize_ms, 99) if serialize_ms else None,
            "write_p99_ms": percentile(write_ms, 99) if write_ms else None,
            "history_bytes": history_bytes,
            "status_s": status_s,
            "status_done": status.get("jobs", {}).get("done"),
            "python_import_s": import_s,
            "restart_ready_s": restart_ready_s,
            "first_batch_accept_s": accept_s[0],
            "batch_accept_s_max": max(accept_s),
            "sim_cpu_ms_per_job": 1000 * sim_cpu / n,
            "shell_cpu_ms_per_job": 1000 * shell_cpu / n,
            "exit_code": code,
            "restart_exit_code": restart_code,
            "trouble": {e: log.counts[e] for e in TROUBLE_EVENTS if log.counts.get(e)},
            "problems": log.problems[:5],
            "load_start_end": "",
            "load_end": load_end,
        }
    except BaseException:
        print_daemon_tail(workdir)
        raise
    finally:
        await tear_down(proc, pump, cluster)


def _ms(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f} ms"


def daemon_report(f: dict[str, Any]) -> str:
    ratio = f["cpu_ms_last"] / f["cpu_ms_first"] if f["cpu_ms_first"] else math.nan
    rows = [
        ("jobs done / failed (in done/)", f"{f['done']} / {f['failed']} ({f['in_done_folder']})"),
        ("batches dropped", f"{f['batches']} of up to {f['batch']}"),
        ("wall time, first rename to last job_done", f"{f['wall_s']:.1f} s"),
        ("jobs/s", f"{f['jobs_per_s']:.1f}"),
        ("daemon CPU per job, whole run", _ms(f["daemon_cpu_ms_per_job"])),
        (
            f"daemon CPU per job, first {f['first_n']} / last {f['last_n']}",
            f"{_ms(f['cpu_ms_first'])} / {_ms(f['cpu_ms_last'])} (x{ratio:.2f}); "
            f"acceptance inside: {f['accepted_by_first_mark']} files in the first window, "
            f"{f['accepted_in_last_window']} in the last",
        ),
        ("daemon peak RSS (VmHWM)", f"{f['peak_rss_mib']:.0f} MiB"),
        (
            "event-loop lag inside the daemon, p50 / p99 / max (samples)",
            f"{_ms(f['lag_p50_ms'], 2)} / {_ms(f['lag_p99_ms'])} / {_ms(f['lag_max_ms'])} "
            f"({f['lag_samples']}); worst 60 s window p99 {_ms(f['lag_worst_window_p99_ms'])}",
        ),
        (
            "state.json bytes, peak saved / after the campaign",
            f"{f['state_bytes_peak']:,} / {f['state_bytes_end']:,} ({f['saves']} saves)",
        ),
        (
            "snapshot save p99: whole / serialise on the loop / write in a thread",
            " / ".join(
                _ms(f[k]) if f[k] is not None else "n/a"
                for k in ("save_p99_ms", "serialize_p99_ms", "write_p99_ms")
            ),
        ),
        ("history.jsonl bytes", f"{f['history_bytes']:,}"),
        (
            "`vastd status --json`, campaign finished (best of 3)",
            f"{f['status_s']:.2f} s (python + import vastd.cli alone: {f['python_import_s']:.2f} s)",
        ),
        (
            "load at start: restart -> daemon_started, history present",
            f"{f['restart_ready_s']:.2f} s",
        ),
        (
            f"first batch of {f['batch']} dropped at once: rename -> last job_accepted",
            f"{f['first_batch_accept_s']:.1f} s (slowest batch {f['batch_accept_s_max']:.1f} s)",
        ),
        ("simulator + SSH servers CPU (this process), per job", _ms(f["sim_cpu_ms_per_job"])),
        ("instances' shell commands CPU, per job", _ms(f["shell_cpu_ms_per_job"])),
        (
            "daemon exit codes after SIGTERM (run, restart)",
            f"{f['exit_code']}, {f['restart_exit_code']}",
        ),
        ("load average at start / end", f"{f['load_start_end']} / {f['load_end']}"),
    ]
    out = [f"`{f['command']}`", "", "| figure | value |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in rows]
    trouble = ", ".join(f"{k} {v}" for k, v in f["trouble"].items()) or "none"
    out += ["", f"Retries and crashes in the daemon log: {trouble}"]
    out += [f"- {p[:300]}" for p in f["problems"]]
    return "\n".join(out) + "\n"


def daemon_main(args: argparse.Namespace) -> int:
    if args.quick:
        args.jobs, args.instances, args.sshd, args.batch = 300, 50, 2, 100
    if min(args.jobs, args.instances, args.sshd, args.batch) < 1:
        raise SystemExit("--jobs, --instances, --sshd and --batch must be at least 1")
    args.deadline_s = args.deadline_s or 600 + args.jobs / 2
    # 2 fds per SSH connection end and 3 pipes per remote command, hundreds at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    setup_logging("WARNING", json=False, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    load_start = loadavg()
    figures = in_workdir(
        "vastd-scale-", "vastd scale bench", args.keep, lambda w: daemon_campaign(args, w)
    )
    if figures is None:
        return 1
    figures["command"] = "python bench/bench_scale.py " + shlex.join(sys.argv[1:])
    figures["load_start_end"] = load_start
    info = machine_info()
    print()
    print(
        f"machine: {info['cores']} cores ({info['cpu']}), {info['memory']}, "
        f"Python {info['python']}, Linux {info['kernel']}"
    )
    print(daemon_report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **figures}, indent=2) + "\n")
    if figures["done"] != figures["jobs"] or figures["exit_code"] != 0:
        print("vastd scale bench: FAILED: not every job done, or a bad exit code")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100000)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--sshd", type=int, default=4, help="SSH servers the instances share")
    parser.add_argument("--batch", type=int, default=10000, help="files dropped at once")
    parser.add_argument(
        "--bookkeeping",
        action="store_true",
        help="the in-process bookkeeping-only run (no daemon, no SSH)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run")
    parser.add_argument("--api-poll-s", type=float, default=2.0, help="[vast] poll_interval_s")
    parser.add_argument("--job-poll-s", type=float, default=2.0, help="[job] poll_interval_s")
    parser.add_argument("--deadline-s", type=float, default=None, help="give up after this long")
    parser.add_argument(
        "--nice-world",
        type=int,
        default=10,
        help="niceness of the simulated world once the daemon runs (0: share the cores evenly)",
    )
    parser.add_argument(
        "--pin-daemon",
        type=int,
        metavar="CPU",
        default=None,
        help="run the daemon on this CPU alone and the simulated world on the others",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    return bookkeeping_main(args) if args.bookkeeping else daemon_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
