#!/usr/bin/env python3
"""The chaos suite of issue 4 (`make chaos`; a short profile runs in `make test`).

The real daemon (`python -m vastd run`, a subprocess) works through a batch of GARCH
jobs on a simulated vast.ai account whose instances are REAL OpenSSH sshd servers on
127.0.0.1 (tests/openssh_cluster.py), while this runner, in the same process as the
simulator, injects faults:

- SIGKILLs of the daemon at random moments, each followed by a fresh `vastd run`;
- sshd killed on a quarter of the instances while they run a job (some revived);
- instances turned `offline` (revived later) or `exited`, or vanished from the API;
- a period of ~30% API 5xx answers with 429 bursts (with and without Retry-After),
  malformed bodies and answers slower than the client's timeout;
- a corpus of hostile inbox entries (tests/hostile_inbox.py), three of which try
  shell injection with a canary file, plus a duplicate of a queued name;
- a truncated state.json between two runs (the backup must be used), and once both
  snapshots corrupt (the daemon must refuse with exit 1 and touch neither file).

Each run of a job appends `<job>\\0` to a runs log from the remote side, so remote
runs are counted where they happen. At the end the verdict comes only from disk:
done/, failed/ and their `.error.json`, results/<job>/ (exactly one run's parquet
whose rows match the CSV, one run marker in log.txt), the runs log, state.json, the
simulator's rent count, and a search for the canary. Exit 0 only if nothing was lost,
nothing duplicated or mixed, the canary never appeared and every assertion held.

    .venv/bin/python bench/chaos.py [--jobs 200 --kills 20 --instances 8] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from tests.helpers import saved_jobs  # noqa: E402
from tests.hostile_inbox import CANARY_PREFIX, HostileEntry, build_corpus, drop, stage  # noqa: E402
from tests.openssh_cluster import DaemonProcess, OpenSSHCloud  # noqa: E402
from tests.sshd import TEST_PYTHON, TEST_USER, unavailable_reason  # noqa: E402
from vastd.core.files import ERROR_SUFFIX, JOB_SUFFIX, safe_name  # noqa: E402
from vastd.sim.cluster import load_make_jobs  # noqa: E402

RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_HEADING = "## Chaos (make chaos)"
RUN_MARKER = "chaos-run-marker"
PARAMS = ("eta", "lam", "var0", "alpha", "gamma", "beta", "p")
MAX_ATTEMPTS = 3
UNREACHABLE_GRACE_S = 6.0
LOST_GRACE_S = 8.0
API_TIMEOUT_S = 3.0
MAX_INPUT_BYTES = 256 * 1024


class ChaosAbort(Exception):
    """The run could not go on (a deadline passed); the report says where it stopped."""


@dataclass
class ChaosConfig:
    jobs: int = 200
    kills: int = 20
    instances: int = 8
    rows: int = 3
    job_pause_s: float = 2.0
    stage_ahead: int = 0  # [job] stage_ahead: the next job of each slot waits on the instance
    short: bool = False
    seed: int = 20261129
    deadline_s: float = 1080.0  # the whole run must end within 18 minutes
    api_fault_phase_s: float = 60.0
    workdir: Path | None = None
    keep: bool = False
    echo: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    @classmethod
    def short_profile(cls, **overrides: Any) -> ChaosConfig:
        values: dict[str, Any] = {
            "jobs": 30,
            "kills": 3,
            "instances": 4,
            "short": True,
            "deadline_s": 240.0,
            "api_fault_phase_s": 20.0,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ChaosReport:
    config: ChaosConfig
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    submitted: int = 0  # valid GARCH job files
    hostile: collections.Counter[str] = field(default_factory=collections.Counter)
    done: int = 0
    failed: int = 0
    failed_justified: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)  # job -> remote runs (valid jobs)
    extra_runs: int = 0
    extra_run_bound: int = 0
    rentals: int = 0
    canary: list[str] = field(default_factory=list)
    restarts: int = 0
    crashes: int = 0
    kills_mid_run: int = 0
    graceful_stop_s: float | None = None
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures and not self.lost and not self.duplicated and not self.canary

    def table(self) -> str:
        runs = list(self.runs.values())
        dist = collections.Counter(runs)
        c = self.config
        lines = [
            f"Profile: {c.jobs} jobs x {c.rows} rows, {c.kills} kills, {c.instances} instances"
            f"{' (short)' if c.short else ''}, seed {c.seed}"
            + (f", stage_ahead = {c.stage_ahead}." if c.stage_ahead else "."),
            "",
            "| fault injected | count |",
            "|---|---|",
            *(f"| {kind} | {n} |" for kind, n in sorted(self.faults.items())),
            "",
            "| outcome | value |",
            "|---|---|",
            f"| valid GARCH jobs submitted | {self.submitted} |",
            "| hostile inbox entries | "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(self.hostile.items()))
            + " |",
            f"| done | {self.done} |",
            f"| failed | {self.failed} ({'; '.join(self.failed_justified) or 'none'}) |",
            f"| **lost** | **{len(self.lost)}** |",
            f"| **results duplicated or mixed** | **{len(self.duplicated)}** |",
        ]
        if runs:
            lines.append(
                f"| remote runs per job (min / mean / max) | {min(runs)} / "
                f"{statistics.mean(runs):.3f} / {max(runs)} |"
            )
            lines.append(
                "| runs distribution (runs: jobs) | "
                + ", ".join(f"{k}: {v}" for k, v in sorted(dist.items()))
                + " |"
            )
        lines += [
            f"| extra remote runs (bound: kills + instance faults) | {self.extra_runs}"
            f" (<= {self.extra_run_bound}) |",
            f"| rentals (adopt mode) | {self.rentals} |",
            f"| canary files | {len(self.canary)} |",
            f"| daemon starts after a kill / unexpected exits | {self.restarts} / {self.crashes} |",
            f"| kills while jobs were unfinished | {self.kills_mid_run} |",
            "| SIGTERM at the end -> exit 0 in | "
            + (f"{self.graceful_stop_s:.2f} s" if self.graceful_stop_s is not None else "n/a")
            + " |",
            f"| wall time | {self.wall_s:.0f} s |",
            f"| verdict | {'PASS' if self.ok else 'FAIL'} |",
        ]
        if self.failures or self.lost or self.duplicated or self.canary:
            lines += ["", "Failures:"]
            lines += [f"- {f}" for f in self.failures]
            lines += [f"- lost: {short(j)}" for j in self.lost]
            lines += [f"- duplicated or mixed: {j}" for j in self.duplicated]
            lines += [f"- canary: {p}" for p in self.canary]
        return "\n".join(lines)


@dataclass
class ValidJob:
    """A job that must run: its file name, CSV rows, and the outcome it owes."""

    name: str
    rows: list[dict[str, float]]
    expect: str = "done"  # or "failed_run"

    @property
    def job_id(self) -> str:
        return self.name[: -len(JOB_SUFFIX)]


def short(job_id: str, limit: int = 48) -> str:
    """A job id for the table: repr, cut in the middle when long."""
    text = repr(job_id)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(os.fsencode(job_id))} bytes)"


def parse_rows(data: bytes) -> list[dict[str, float]]:
    text = data.decode("utf-8-sig")
    out = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        with contextlib.suppress(KeyError, ValueError, TypeError):
            out.append({k: float(row[k]) for k in PARAMS})
            continue
        out.append({})
    return out


class Chaos:
    """One chaos run; `run()` returns the report."""

    def __init__(self, cfg: ChaosConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.work = workdir
        self.rng = random.Random(cfg.seed)
        self.report = ChaosReport(cfg, workdir=str(workdir))
        self.cloud: OpenSSHCloud | None = None
        self.root = workdir / "vastd"
        self.logs = workdir / "logs"
        self.staging = workdir / "staging"
        self.token = f"{cfg.seed}_{os.getpid()}"
        self.valid: dict[str, ValidJob] = {}  # file name -> job
        self.corpus: list[HostileEntry] = []
        self.duplicate: str | None = None  # file name of the refused duplicate
        self.refused_logs: set[str] = set()  # logs of daemons that had to refuse to start
        self.daemon: DaemonProcess | None = None
        self.daemon_count = 0
        self.faulted: set[int] = set()
        self.t0 = time.monotonic()
        self.kills_finished = asyncio.Event()
        self.faults_finished = asyncio.Event()
        self.submitted_all = asyncio.Event()
        self.restarting = False  # the killer owns the daemon's exit for now
        self.api_hits: dict[int, tuple[str, int]] = {}

    # --- small things -------------------------------------------------------------------
    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        self.report.timeline.append(line)
        self.cfg.echo(line)

    def fail(self, text: str) -> None:
        self.report.failures.append(text)
        self.note("ASSERTION FAILED: " + text)

    @property
    def runs_log(self) -> Path:
        assert self.cloud is not None
        return self.cloud.scratch / "runs.log"

    def outcomes(self) -> tuple[set[str], set[str]]:
        """(valid job files in done/, valid job files in failed/ as their own outcome).

        The refused duplicate of a queued name sits in failed/ under that name (or as
        `<job>.dup-<n>.csv`): it is not the outcome of the job it duplicates.
        """
        listing: dict[str, set[str]] = {}
        for folder in ("done", "failed"):
            try:
                listing[folder] = set(os.listdir(self.root / folder))
            except FileNotFoundError:
                listing[folder] = set()
        done = {n for n in self.valid if n in listing["done"]}
        failed = set()
        for name in self.valid:
            if name not in listing["failed"]:
                continue
            if name == self.duplicate:
                stem = name[: -len(JOB_SUFFIX)]
                if f"{stem}.dup-1{JOB_SUFFIX}" not in listing["failed"]:
                    continue
            failed.add(name)
        return done, failed

    def finished(self) -> int:
        done, failed = self.outcomes()
        return len(done | failed)

    def progress(self) -> float:
        total = self.cfg.jobs + sum(1 for e in self.corpus if e.expect in ("done", "failed_run"))
        return self.finished() / max(1, total)

    def all_finished(self) -> bool:
        done, failed = self.outcomes()
        if len(done | failed) < len(self.valid):
            return False
        if not self.submitted_all.is_set():
            return False
        inbox = self.root / "inbox"
        return not any(
            os.path.lexists(inbox / e.name) for e in self.corpus if e.expect == "refused"
        )

    async def until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise ChaosAbort(f"timed out after {timeout_s:.0f}s waiting for {what}")
            await asyncio.sleep(0.2)

    async def until_progress(self, fraction: float) -> None:
        await self.until(lambda: self.progress() >= fraction, self.cfg.deadline_s, "progress")

    # --- the daemon ---------------------------------------------------------------------
    def start_daemon(self) -> DaemonProcess:
        assert self.cloud is not None
        self.daemon_count += 1
        log = self.logs / f"daemon-{self.daemon_count:02d}.log"
        self.daemon = DaemonProcess(self.work / "config.toml", self.cloud.daemon_env(), log)
        return self.daemon

    def daemon_crashed(self) -> bool:
        """True (and recorded) if the daemon exited without being told to."""
        d = self.daemon
        if d is None or self.restarting or d.proc.poll() is None:
            return False
        self.report.crashes += 1
        self.fail(
            f"daemon #{self.daemon_count} exited by itself with code {d.proc.returncode}\n"
            + d._describe()
        )
        d.kill()
        return True

    async def watch_crashes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.daemon_crashed():
                self.start_daemon()

    # --- setup --------------------------------------------------------------------------
    def config_data(self) -> dict[str, Any]:
        assert self.cloud is not None
        worker = shlex.quote(str(self.cloud.worker))
        runs = shlex.quote(str(self.runs_log))
        command = (
            f": {{tag}}; printf '%s\\0' {{job}} >> {runs} && echo {RUN_MARKER} && "
            f"sleep {{pause}} && {TEST_PYTHON} {worker} {{input}} --num_sim {{num_sim}} "
            "--num_quantiles 16 --stride 1"
        )
        canary = self.cloud.scratch / f"{CANARY_PREFIX}{self.token}v"
        tag = f"$(touch {canary}1) `touch {canary}2`; touch {canary}3"
        staging = {"stage_ahead": self.cfg.stage_ahead} if self.cfg.stage_ahead else {}
        return self.cloud.config(
            self.root,
            job={
                **staging,
                "command": command,
                "vars": {"num_sim": "200", "pause": str(self.cfg.job_pause_s), "tag": tag},
                "result_glob": "*.parquet",
                "validate": "parquet",
                "max_attempts": MAX_ATTEMPTS,
                "max_input_bytes": MAX_INPUT_BYTES,
                "timeout_s": 120,
                "poll_interval_s": 1,
            },
            ssh={"unreachable_grace_s": UNREACHABLE_GRACE_S},
            vast={"lost_grace_s": LOST_GRACE_S, "request_timeout_s": API_TIMEOUT_S},
        )

    def make_jobs(self) -> list[Path]:
        files: list[Path] = load_make_jobs()(
            self.staging / "jobs", self.cfg.jobs, self.cfg.rows, self.cfg.seed % 100_000
        )
        for path in files:
            self.valid[path.name] = ValidJob(path.name, parse_rows(path.read_bytes()))
        return files

    def drop_files(self, files: list[Path]) -> None:
        inbox = self.root / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        for path in files:
            os.rename(path, inbox / path.name)

    # --- faults: daemon kills and snapshots -----------------------------------------------
    def kill_delay(self, kills_left: int) -> float:
        elapsed = time.monotonic() - self.t0
        done = self.finished()
        total = self.cfg.jobs + sum(1 for e in self.corpus if e.expect != "refused")
        if done >= 5:
            remaining = (total - done) * elapsed / done
        else:
            per_job = self.cfg.job_pause_s + 2.5
            remaining = total * per_job / max(1, self.cfg.instances - 2) - elapsed
        mean = max(2.0, 0.8 * remaining / (kills_left + 0.5))
        return max(0.8, self.rng.uniform(0.3, 1.7) * mean)

    async def killer(self) -> None:
        n = self.cfg.kills
        truncate_at = max(1, n // 4)
        corrupt_at = max(2, n // 2) if n >= 2 else None
        try:
            for k in range(1, n + 1):
                await asyncio.sleep(self.kill_delay(n - k + 1))
                d = self.daemon
                assert d is not None
                if d.proc.poll() is not None:
                    continue  # the crash watcher restarts it
                mid = not self.all_finished()
                self.restarting = True
                d.kill()
                self.report.faults["daemon SIGKILL"] += 1
                self.report.kills_mid_run += mid
                self.note(f"SIGKILL daemon #{self.daemon_count} (kill {k}/{n})")
                try:
                    if k == truncate_at:
                        await self.truncated_snapshot()
                    elif k == corrupt_at:
                        await self.both_snapshots_corrupt()
                    else:
                        self.start_daemon()
                finally:
                    self.restarting = False
                self.report.restarts += 1
        finally:
            self.kills_finished.set()

    async def truncated_snapshot(self) -> None:
        state = self.root / "state.json"
        if not (state.exists() and (self.root / "state.json.bak").exists()):
            self.fail("no state.json and state.json.bak to truncate")
            self.start_daemon()
            return
        size = state.stat().st_size
        os.truncate(state, size // 2)
        self.report.faults["snapshot truncated (backup must be used)"] += 1
        self.note(f"state.json truncated from {size} to {size // 2} bytes")
        d = self.start_daemon()
        try:
            await d.wait_event("daemon_started", 60)
        except AssertionError as exc:
            self.fail(f"daemon did not start over a truncated state.json: {exc}")
            return
        if not d.find("state_restored_from_backup"):
            self.fail("state.json was truncated but no state_restored_from_backup was logged")

    async def both_snapshots_corrupt(self) -> None:
        state, backup = self.root / "state.json", self.root / "state.json.bak"
        saved = {p: p.read_bytes() for p in (state, backup) if p.exists()}
        if len(saved) < 2:
            self.fail("state.json or state.json.bak missing before the double corruption")
            self.start_daemon()
            return
        state.write_bytes(saved[state][: len(saved[state]) // 3])
        backup.write_bytes(b"\x00\xffnot a snapshot{")
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in saved}
        self.report.faults["snapshot and backup both corrupt (refusal expected)"] += 1
        self.note("state.json and state.json.bak both corrupted")
        d = self.start_daemon()
        try:
            await self.until(lambda: d.proc.poll() is not None, 60, "the daemon to refuse")
        except ChaosAbort:
            self.fail("the daemon kept running over two corrupt snapshots")
        code = d.proc.poll()
        d.kill()
        if code != 1:
            self.fail(f"two corrupt snapshots: exit code {code}, expected 1\n{d._describe()}")
        after = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in saved}
        if after != before:
            self.fail("the refusing daemon touched state.json or state.json.bak")
        stderr = d.log_path.with_suffix(".stderr").read_text(errors="replace")
        if "refusing" not in (stderr + d.log_path.read_text(errors="replace")).lower():
            self.fail(f"the refusal does not say why: {stderr[-500:]!r}")
        # Refusing to start is fatal, not expected: its one error line is the log saying why.
        self.refused_logs.add(d.log_path.name)
        # Restored by hand, as an operator would: the good files back under their names.
        for path, data in saved.items():
            tmp = path.with_name(f".{path.name}.restore")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        self.note(f"refused with exit {code}; snapshots restored by hand")
        self.start_daemon()

    # --- faults: instances and API ------------------------------------------------------
    def busy_instances(self) -> list[int]:
        """Instances (not yet faulted) with a started, unfinished job in their remote folder."""
        assert self.cloud is not None
        busy = []
        for iid in self.cloud.instance_ids:
            if iid in self.faulted:
                continue
            jobs = self.cloud.remote_root / str(iid) / "jobs"
            with contextlib.suppress(OSError):
                for job in jobs.iterdir():
                    if (job / "pid").exists() and not (job / "exit_code").exists():
                        busy.append(iid)
                        break
        return busy

    async def pick_instance(self) -> int:
        assert self.cloud is not None
        with contextlib.suppress(ChaosAbort):
            await self.until(lambda: bool(self.busy_instances()), 20, "a busy instance")
        busy = self.busy_instances()
        pool = busy or [i for i in self.cloud.instance_ids if i not in self.faulted]
        iid = self.rng.choice(pool)
        self.faulted.add(iid)
        return iid

    async def revive_later(self, delay_s: float, what: str, action: Callable[[], Any]) -> None:
        await asyncio.sleep(delay_s)
        result = action()
        if asyncio.iscoroutine(result):
            await result
        self.note(f"revived: {what}")

    async def faulter(self) -> None:
        assert self.cloud is not None
        cloud, n = self.cloud, self.cfg.instances
        tasks = []
        try:
            await self.until_progress(0.10)
            n_sshd = max(1, n // 4)
            for i in range(n_sshd):
                iid = await self.pick_instance()
                await asyncio.to_thread(cloud.server(iid).kill)
                self.report.faults["sshd killed mid-job"] += 1
                revive = i % 2 == 0
                self.note(
                    f"sshd of instance {iid} killed ({'revived later' if revive else 'for good'})"
                )
                if revive:
                    server = cloud.server(iid)
                    tasks.append(
                        asyncio.create_task(
                            self.revive_later(
                                UNREACHABLE_GRACE_S * 2 + 4,
                                f"sshd of {iid}",
                                lambda s=server: asyncio.to_thread(s.start),
                            )
                        )
                    )
            await self.until_progress(0.20)
            tasks.append(asyncio.create_task(self.api_phase()))
            await self.until_progress(0.30)
            iid = await self.pick_instance()
            await cloud.cloud.set_status(iid, "offline")
            self.report.faults["instance offline in the API (revived)"] += 1
            self.note(f"instance {iid} offline")
            tasks.append(
                asyncio.create_task(
                    self.revive_later(
                        15,
                        f"instance {iid} running",
                        lambda i=iid: cloud.cloud.set_status(i, "running"),
                    )
                )
            )
            if n >= 6:
                await self.until_progress(0.40)
                iid = await self.pick_instance()
                await cloud.cloud.set_status(iid, "exited")
                self.report.faults["instance exited in the API"] += 1
                self.note(f"instance {iid} exited")
                await self.until_progress(0.50)
                iid = await self.pick_instance()
                await cloud.cloud.vanish(iid)
                self.report.faults["instance vanished from the API"] += 1
                self.note(f"instance {iid} vanished")
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self.faults_finished.set()

    def add_api_fault(self, kind: str, count: int | None, **fault: Any) -> int:
        assert self.cloud is not None
        fid = self.cloud.cloud.faults.add(count=count, **fault)
        self.api_hits[fid] = (kind, count or 0)
        return fid

    async def api_phase(self) -> None:
        """~30% 5xx on every endpoint for a while, with 429 bursts and odd answers."""
        assert self.cloud is not None
        faults = self.cloud.cloud.faults
        p = 1 - 0.7 ** (1 / 3)  # three independent rules: 30% together
        for status in (500, 502, 503):
            self.add_api_fault(
                "API 5xx answers (30% for a period)", None, status=status, probability=p
            )
        with_ra, without_ra = (
            "API 429 answers with Retry-After",
            "API 429 answers without Retry-After",
        )
        malformed, slow = "API malformed bodies", "API answers slower than the client timeout"
        steps: list[list[tuple[str, int, dict[str, Any]]]] = [
            [(with_ra, 3, {"status": 429, "retry_after": "1"})],
            [(malformed, 2, {"status": 502, "body": "html"}), (malformed, 1, {"body": "empty"})],
            [
                (malformed, 2, {"status": 200, "body": "wrong_shape"}),
                (malformed, 1, {"status": 200, "body": "raw", "raw_body": "{not json"}),
            ],
            [(without_ra, 3, {"status": 429})],
            [(slow, 2, {"status": None, "delay_s": API_TIMEOUT_S + 2})],
            [],
        ]
        calls_before = len(self.cloud.cloud.calls)
        self.note("API fault period starts")
        for step in steps:
            for kind, count, spec in step:
                spec.setdefault("status", 200)
                self.add_api_fault(kind, count, **spec)
            await asyncio.sleep(self.cfg.api_fault_phase_s / len(steps))
        calls = self.cloud.cloud.calls[calls_before:]
        fives = sum(1 for c in calls if (c["status"] or 0) >= 500)
        self.note(f"API fault period: {len(calls)} requests, {fives} answered 5xx")
        self.report.faults["(API requests during the fault period)"] = len(calls)
        listed = {r["id"]: r for r in faults.list()}
        for fid, (kind, count) in self.api_hits.items():
            hits = listed[fid]["hits"] if fid in listed else count
            self.report.faults[kind] += hits
            faults.remove(fid)
        self.note("API fault period ends")

    # --- submissions --------------------------------------------------------------------
    async def submitter(self, waves: list[list[Path]]) -> None:
        await self.until_progress(0.05)
        self.drop_hostile()
        await self.until_progress(0.15)
        await asyncio.to_thread(self.submit_cli, waves[0])
        self.note(f"{len(waves[0])} jobs submitted with `vastd submit`")
        await self.until_progress(0.30)
        self.drop_files(waves[1])
        self.note(f"{len(waves[1])} jobs renamed into the inbox")
        await self.drop_duplicate(waves[1][-1].name)
        self.submitted_all.set()

    def submit_cli(self, files: list[Path]) -> None:
        subprocess.run(
            [sys.executable, "-m", "vastd", "submit", *map(str, files), "--config",
             str(self.work / "config.toml")],
            check=True, capture_output=True, timeout=120, cwd=REPO,
        )  # fmt: skip

    def drop_hostile(self) -> None:
        inbox = self.root / "inbox"
        staged = []
        for entry in self.corpus:
            folder = self.staging / "hostile" / str(len(staged))
            staged.append(stage(entry, folder))
            if entry.expect in ("done", "failed_run"):
                data = staged[-1].read_bytes()
                expect = entry.expect
                self.valid[entry.name] = ValidJob(entry.name, parse_rows(data), expect)
        for path in staged:
            drop(path, inbox)
        self.note(f"{len(staged)} hostile entries dropped into the inbox")

    async def drop_duplicate(self, name: str) -> None:
        queued = self.root / "queued" / name
        running = self.root / "running" / name
        await self.until(lambda: queued.exists() or running.exists(), 60, f"{name} queued")
        path = self.staging / "dup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("eta,lam,var0,alpha,gamma,beta,p\n5,0,1,0.05,0.05,0.85,0.5\n")
        if not (queued.exists() or running.exists()):
            self.fail(f"{name} was already finished when its duplicate was dropped")
            return
        os.rename(path, self.root / "inbox" / name)
        self.duplicate = name
        self.report.hostile["duplicate of a queued name"] += 1
        self.note(f"duplicate of queued {name!r} dropped")

    # --- the run ------------------------------------------------------------------------
    async def run(self) -> ChaosReport:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the chaos suite needs the OpenSSH tier: {reason}")
        cfg = self.cfg
        self.logs.mkdir(parents=True)
        self.cloud = await OpenSSHCloud.start(self.work, instances=cfg.instances)
        try:
            self.cloud.write_config(self.work / "config.toml", self.config_data())
            self.corpus = build_corpus(self.token, max_input_bytes=MAX_INPUT_BYTES, short=cfg.short)
            for e in self.corpus:
                self.report.hostile[e.expect] += 1
            files = self.make_jobs()
            self.report.submitted = len(files)
            half, rest = files[: len(files) // 2], files[len(files) // 2 :]
            waves = [rest[: len(rest) // 2], rest[len(rest) // 2 :]]
            self.drop_files(half)
            self.note(
                f"{len(half)} jobs in the inbox, {cfg.instances} instances, "
                f"{len(self.corpus)} hostile entries to come; starting the daemon"
            )
            self.t0 = time.monotonic()
            self.start_daemon()
            await self._run_faults(waves)
            self.note("all jobs finished and every fault injected; SIGTERM")
            d = self.daemon
            assert d is not None
            # The last kill may have restarted it a moment ago: a SIGTERM before Python has
            # even imported vastd is the default action (exit -15), not the daemon's stop.
            try:
                await d.wait_event("daemon_started", 60)
            except AssertionError as exc:
                self.fail(f"the last daemon did not start: {exc}")
            started = time.monotonic()
            code = await d.stop(timeout_s=15)
            self.report.graceful_stop_s = time.monotonic() - started
            if code != 0:
                self.fail(f"SIGTERM at the end: exit code {code}")
            if self.report.graceful_stop_s > 10:
                self.fail(f"SIGTERM took {self.report.graceful_stop_s:.1f}s (> 10 s)")
            self.report.wall_s = time.monotonic() - self.t0
            self.judge()
        finally:
            if self.daemon is not None:
                self.daemon.kill()
            with contextlib.suppress(OSError):  # evidence, for a kept work folder
                shutil.copyfile(self.runs_log, self.work / "runs.log")
            await self.cloud.aclose()
        return self.report

    async def _run_faults(self, waves: list[list[Path]]) -> None:
        crash_watch = asyncio.create_task(self.watch_crashes())
        workers = [
            asyncio.create_task(self.killer(), name="killer"),
            asyncio.create_task(self.faulter(), name="faulter"),
            asyncio.create_task(self.submitter(waves), name="submitter"),
        ]
        try:
            deadline = self.cfg.deadline_s - (time.monotonic() - self.t0)
            async with asyncio.timeout(deadline):
                while not (
                    self.all_finished()
                    and self.kills_finished.is_set()
                    and self.faults_finished.is_set()
                ):
                    for w in workers:
                        if w.done() and not w.cancelled() and w.exception() is not None:
                            raise w.exception()  # type: ignore[misc]
                    await asyncio.sleep(0.25)
                # A crash right at the end still counts.
                self.daemon_crashed()
        except TimeoutError:
            self.fail(
                f"deadline of {self.cfg.deadline_s:.0f}s passed: {self.finished()} of "
                f"{len(self.valid)} valid jobs finished, kills done: "
                f"{self.kills_finished.is_set()}, faults done: {self.faults_finished.is_set()}"
            )
        except ChaosAbort as exc:
            self.fail(str(exc))
        finally:
            for task in [crash_watch, *workers]:
                task.cancel()
            await asyncio.gather(crash_watch, *workers, return_exceptions=True)
            if self.daemon is not None and self.daemon.proc.poll() is not None:
                self.start_daemon()  # killed last, or crashed: the SIGTERM goes to a live one

    # --- the verdict, from disk only -------------------------------------------------------
    def error_files(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for path in (self.root / "failed").iterdir():
            if path.name.endswith(ERROR_SUFFIX):
                data = json.loads(path.read_text())
                data["_file"] = path.name
                found[data["job"]].append(data)
        return found

    def remote_runs(self) -> collections.Counter[str]:
        with contextlib.suppress(FileNotFoundError):
            data = self.runs_log.read_bytes()
            return collections.Counter(os.fsdecode(x) for x in data.split(b"\0") if x)
        return collections.Counter()

    def check_results(self, job: ValidJob) -> str | None:
        """None if results/<job>/ holds exactly one run's complete results, else why not."""
        folder = self.root / "results" / safe_name(job.job_id)
        if not folder.is_dir():
            return "no results folder"
        names = sorted(os.listdir(folder))
        parquets = [n for n in names if n.endswith(".parquet")]
        if len(parquets) != 1 or set(names) != {"log.txt", "MANIFEST.json", parquets[0]}:
            return f"results folder holds {names}"
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        listed = {f["name"]: f["sha256"] for f in manifest.get("files", [])}
        digest = hashlib.sha256((folder / parquets[0]).read_bytes()).hexdigest()
        if listed != {parquets[0]: digest} or not isinstance(manifest.get("run"), str):
            return f"MANIFEST.json does not describe the results: {manifest}"
        table = pq.read_table(folder / parquets[0]).to_pydict()
        rows = job.rows
        if sorted(set(table["job_row"])) != list(range(len(rows))):
            return f"job_row values {sorted(set(table['job_row']))} for {len(rows)} CSV rows"
        per_row = collections.Counter(table["job_row"])
        if len(set(per_row.values())) != 1:
            return f"uneven rows per job_row: {dict(per_row)}"
        for i, job_row in enumerate(table["job_row"]):
            for name in PARAMS:
                if not math.isclose(
                    table[name][i], rows[job_row][name], rel_tol=1e-6, abs_tol=1e-7
                ):
                    return f"row {job_row} column {name} differs from the CSV"
        markers = (folder / "log.txt").read_text(errors="replace").splitlines().count(RUN_MARKER)
        if markers != 1:
            return f"log.txt holds {markers} run markers"
        return None

    def judge(self) -> None:
        r = self.report
        assert self.cloud is not None
        done_dir, failed_dir, inbox = self.root / "done", self.root / "failed", self.root / "inbox"
        done_names = set(os.listdir(done_dir))
        done_valid, failed_valid = self.outcomes()
        errors = self.error_files()
        runs = self.remote_runs()
        state = saved_jobs(self.root)  # state.json's jobs over history.jsonl's

        for name, job in self.valid.items():
            jid = job.job_id
            in_done, in_failed = name in done_valid, name in failed_valid
            n_runs = runs.get(jid, 0)
            r.runs[jid] = n_runs
            dups = [n for n in done_names if n.startswith(jid + ".dup-")]
            if dups:
                r.duplicated.append(f"{short(jid)}: also in done/ as {dups}")
            if not in_done and not in_failed:
                r.lost.append(jid)
                continue
            if job.expect == "done":
                if not in_done:
                    why = errors.get(jid, [{}])[-1].get("reason")
                    self.fail(f"valid job {short(jid)} ended in failed/: {why}")
                    r.failed += 1
                    continue
                r.done += 1
                problem = self.check_results(job)
                if problem is not None:
                    r.duplicated.append(f"{short(jid)}: {problem}")
                if n_runs < 1:
                    self.fail(f"{short(jid)} is done but the runs log never saw it run")
                if state.get(jid, {}).get("state") != "done":
                    self.fail(
                        f"the saved record says {state.get(jid, {}).get('state')} for done "
                        f"{short(jid)}"
                    )
                if name == self.duplicate:
                    refused = [e for e in errors.get(jid, []) if "already" in e["reason"]]
                    if len(refused) != 1:
                        self.fail(f"duplicate of {short(jid)} not refused once: {errors.get(jid)}")
                elif jid in errors:
                    self.fail(f"done job {short(jid)} also has an error file: {errors[jid]}")
            else:  # failed_run: the worker refuses it on every attempt
                if not in_failed or in_done:
                    self.fail(f"{short(jid)} should have failed for good (worker exit 1)")
                    continue
                r.failed += 1
                err = errors.get(jid, [{}])[-1]
                if err.get("attempts") != MAX_ATTEMPTS or err.get("last_exit_code") != 1:
                    err = {k: v for k, v in err.items() if k not in ("job", "_file")}
                    self.fail(
                        f"{short(jid)}: expected worker exit 1 x {MAX_ATTEMPTS}; error file {err}"
                    )
                if len(os.fsencode(err.get("_file", ""))) > 255:
                    self.fail(f"{short(jid)}: error file name too long")
                if n_runs < MAX_ATTEMPTS:
                    self.fail(f"{short(jid)} failed after {n_runs} remote runs (< {MAX_ATTEMPTS})")
                r.failed_justified.append(
                    f"{short(jid)}: {err.get('reason')}, {err.get('attempts')} attempts"
                )

        for entry in self.corpus:
            jid = entry.job_id
            if entry.expect == "refused":
                found = [
                    e for e in errors.get(jid, []) if entry.reason.lower() in e["reason"].lower()
                ]
                if not found:
                    self.fail(
                        f"hostile {entry.what} ({short(jid)}): no error file saying "
                        f"{entry.reason!r}: {errors.get(jid)}"
                    )
                else:
                    stem = found[0]["_file"][: -len(ERROR_SUFFIX)]
                    if not os.path.lexists(failed_dir / safe_name(stem, JOB_SUFFIX)):
                        self.fail(f"hostile {entry.what}: the entry is not in failed/")
                if os.path.lexists(inbox / entry.name):
                    self.fail(f"hostile {entry.what}: still in the inbox")
                if runs.get(jid):
                    self.fail(f"hostile {entry.what} ran remotely")
            elif entry.expect == "ignored":
                if not os.path.lexists(inbox / entry.name):
                    self.fail(f"ignored name {entry.name!r} was taken from the inbox")
                if jid in errors or runs.get(jid) or (jid and jid in state):
                    self.fail(f"ignored name {entry.name!r} was processed")
        if not Path("/etc/passwd").read_text().startswith("root:"):
            self.fail("/etc/passwd changed")

        # Re-runs: only faults may cause them.
        r.extra_runs = sum(
            max(0, n - (MAX_ATTEMPTS if self.valid[name].expect == "failed_run" else 1))
            for name, n in ((name, r.runs[j.job_id]) for name, j in self.valid.items())
        )
        instance_faults = sum(
            n for kind, n in r.faults.items() if kind.startswith(("sshd", "instance"))
        )
        r.extra_run_bound = r.faults["daemon SIGKILL"] + instance_faults
        if r.extra_runs > r.extra_run_bound:
            self.fail(
                f"{r.extra_runs} extra remote runs > {r.extra_run_bound} (kills + instance faults)"
            )
        unknown = set(runs) - {j.job_id for j in self.valid.values()}
        if unknown:
            self.fail(f"remote runs of jobs never submitted as valid: {sorted(unknown)[:5]}")

        r.rentals = int(self.cloud.cloud.stats.get("rent", 0))
        if r.rentals:
            self.fail(f"{r.rentals} instance(s) rented in adopt mode")
        r.canary = self.find_canaries()
        if r.faults["daemon SIGKILL"] != self.cfg.kills:
            self.fail(f"{r.faults['daemon SIGKILL']} kills of {self.cfg.kills} requested")

        # Secrets (behaviour 8), cheap to check here.
        key = self.cloud.api_key
        texts = [p for p in self.logs.iterdir()] + [self.root / "state.json"]
        texts += [p for p in failed_dir.iterdir() if p.name.endswith(ERROR_SUFFIX)]
        leaked = [p.name for p in texts if p.is_file() and key in p.read_text(errors="replace")]
        if leaked:
            self.fail(f"the API key appears in {leaked}")
        # Expected conditions are not errors (CONTRACT §8), whatever was injected.
        for path in sorted(self.logs.glob("daemon-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("level") in ("error", "critical"):
                        if path.name in self.refused_logs and event.get("event") == "daemon_fatal":
                            continue
                        self.fail(f"{path.name}: error-level log line: {line[:400]}")
            stderr = path.with_suffix(".stderr").read_text(errors="replace")
            if "Traceback" in stderr:
                self.fail(f"{path.name}: traceback on stderr: {stderr[-1500:]}")
        mode = (self.root / "state.json").stat().st_mode & 0o777
        if mode != 0o600:
            self.fail(f"state.json has mode {oct(mode)}")

    def find_canaries(self) -> list[str]:
        assert self.cloud is not None
        home = Path(os.path.expanduser(f"~{TEST_USER}"))
        needle = CANARY_PREFIX + self.token
        found: list[str] = []
        for base, deep in ((self.cloud.world, True), (self.work, True), (home, True),
                           (Path.home(), False), (Path("/tmp"), False), (Path("/"), False),
                           (REPO, False)):  # fmt: skip
            with contextlib.suppress(OSError):
                entries = base.rglob(f"{needle}*") if deep else base.glob(f"{needle}*")
                found += [str(p) for p in entries]
        return found


async def run_chaos_async(cfg: ChaosConfig) -> ChaosReport:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="vastd-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(cfg, workdir)
    report = await chaos.run()
    if report.ok and not cfg.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report.workdir = ""
    return report


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Run one chaos profile (blocking); the report's `ok` is the verdict."""
    return asyncio.run(run_chaos_async(cfg))


NOTES_START, NOTES_END = "<!-- chaos notes -->", "<!-- /chaos notes -->"


def write_results_md(report: ChaosReport, path: Path = RESULTS_MD) -> None:
    """Put the table under RESULTS_HEADING in RESULTS.md (only that section, the notes
    between NOTES_START and NOTES_END kept: the history of earlier runs)."""
    text = path.read_text() if path.exists() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    start = text.find(RESULTS_HEADING)
    end = text.find("\n## ", start + len(RESULTS_HEADING)) if start >= 0 else -1
    old = text[start : end if end >= 0 else len(text)] if start >= 0 else ""
    notes = ""
    a, b = old.find(NOTES_START), old.find(NOTES_END)
    if 0 <= a < b:
        notes = old[a : b + len(NOTES_END)] + "\n\n"
    section = (
        f"{RESULTS_HEADING}\n\n`make chaos` (`.venv/bin/python bench/chaos.py`), {stamp}, "
        f"{os.cpu_count()} cores. Verdict judged from disk only (see bench/chaos.py).\n\n"
        + notes
        + report.table()
        + "\n"
    )
    if start >= 0:
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--seed", type=int, default=ChaosConfig.seed)
    parser.add_argument(
        "--stage-ahead", type=int, default=0, help="[job] stage_ahead (default 0: no staging)"
    )
    parser.add_argument("--short", action="store_true", help="the profile of tests/test_chaos.py")
    parser.add_argument("--keep", action="store_true", help="keep the work folder even on success")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--no-results-md", action="store_true", help="do not write the table into RESULTS.md"
    )
    args = parser.parse_args(argv)
    from vastd.utils.logging import setup_logging

    setup_logging("WARNING", json=False, stream=sys.stderr)
    common: dict[str, Any] = {"seed": args.seed, "keep": args.keep, "workdir": args.workdir}
    common["stage_ahead"] = args.stage_ahead
    if args.short:
        cfg = ChaosConfig.short_profile(**common)
    else:
        cfg = ChaosConfig(jobs=args.jobs, kills=args.kills, instances=args.instances, **common)
    report = run_chaos(cfg)
    print()
    print(report.table())
    if report.workdir:
        print(f"\nwork folder kept: {report.workdir}")
    if not args.short and not args.no_results_md:
        write_results_md(report)
        print(f"table written to {RESULTS_MD}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
