"""Staged jobs (`[job] stage_ahead`): the next run of a slot waits on the instance and is
started there the moment the running one exits, by the instance itself.

The scripts against a real /bin/sh (LocalRunner), the daemon's own steps over the
simulator (SimEnv), and `vastd run` as a process that is SIGSTOPped mid-campaign.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.ctxfactory import GATE, SimEnv, async_wait_for, pump
from tests.localrunner import LocalRunner
from tests.test_daemon_process import DaemonProcess, cluster, daemons, submit, write_config
from tests.test_job_runner import runner
from vastd.core import state as st
from vastd.core.records import JobRecord, OrphanRun
from vastd.core.state import JobState
from vastd.execution.job_runner import (
    ProcessInfo,
    RemoteJobPaths,
    StagedAfter,
    execute_job_on_instance,
    remote_job_paths,
    withdraw_staged_runs,
)
from vastd.execution.process_monitor import (
    RemoteJobStatus,
    handle_job_timeout,
    monitor_job_execution,
)
from vastd.orchestration import coordinator
from vastd.orchestration.context import Context
from vastd.orchestration.control import ControlServer
from vastd.orchestration.coordinator import (
    DISPATCH_SLACK,
    coordinate_job_distribution,
    handle_job_status,
    staging_slots,
)
from vastd.sim.cluster import SimCluster, load_make_jobs
from vastd.utils.config import Settings
from vastd.views import JobView, format_jobs, job_row

# Each run appends its job's name to its instance's ran.log (a second start of a job
# would show as a second line) and writes sub-second start and end times.
STAMPED = (
    "echo {job} >> ../../ran.log; date +%s.%N > {output_dir}/t_start; "
    "sleep {secs}; date +%s.%N > {output_dir}/t_end"
)

__all__ = ["cluster", "daemons", "runner"]  # the fixtures, used by name


# --- the scripts, on this machine's /bin/sh ----------------------------------------------------
class Slot:
    """Runs on one 'instance' folder of this machine."""

    def __init__(self, runner: LocalRunner, tmp_path: Path) -> None:
        self.runner = runner
        self.root = tmp_path / "remote"
        self.root.mkdir()
        self.csv = tmp_path / "job.csv"
        self.csv.write_text("a\n1\n")

    def paths(self, job: str) -> RemoteJobPaths:
        return remote_job_paths(str(self.root), "1", job)

    async def start(
        self, job: str, run: str, secs: float, after: tuple[str, str] | None = None
    ) -> ProcessInfo:
        staged = StagedAfter(self.paths(after[0]), after[1]) if after else None
        return await execute_job_on_instance(
            self.runner,
            remote_root=str(self.root),
            instance_id="1",
            job_id=job,
            local_csv=self.csv,
            command_template=STAMPED,
            vars={"secs": str(secs)},
            attempt=1,
            timeout_s=20,
            run_id=run,
            after=staged,
        )

    def stamp(self, job: str, name: str) -> float | None:
        path = self.root / "1" / "jobs" / job / "out" / name
        try:
            return float(path.read_text())
        except (OSError, ValueError):  # not there, or being written
            return None

    def ran(self) -> list[str]:
        path = self.root / "1" / "ran.log"
        return path.read_text().split() if path.is_file() else []


async def until(predicate: Callable[[], object], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


async def test_a_staged_run_starts_when_the_one_before_exits(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """B staged behind A, C behind B: each starts only after the one before ended,
    without anyone asking (the wrapper starts it); staging again is a no-op."""
    slot = Slot(runner, tmp_path)
    a = await slot.start("A", "aa", 0.6)
    assert a.started and not a.staged
    b = await slot.start("B", "bb", 0.3, after=("A", "aa"))
    c = await slot.start("C", "cc", 0.1, after=("B", "bb"))
    assert b.staged and c.staged and b.pid == 0
    again = await slot.start("B", "bb", 0.3, after=("A", "aa"))
    assert again.staged
    status = await monitor_job_execution(runner, [("B", slot.paths("B"))], timeout_s=10)
    assert status["B"].stage == "staged" and status["B"].pid is None
    await until(lambda: slot.stamp("C", "t_end") is not None)
    a_end, b_start = slot.stamp("A", "t_end"), slot.stamp("B", "t_start")
    b_end, c_start = slot.stamp("B", "t_end"), slot.stamp("C", "t_start")
    assert a_end is not None and b_start is not None and b_start >= a_end
    assert b_end is not None and c_start is not None and c_start >= b_end
    assert slot.ran() == ["A", "B", "C"]
    status = await monitor_job_execution(runner, [("B", slot.paths("B"))], timeout_s=10)
    assert status["B"].exit_code == 0 and status["B"].stage is None


async def test_a_withdrawn_run_never_starts(runner: LocalRunner, tmp_path: Path) -> None:
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 0.4)
    await slot.start("B", "bb", 0.1, after=("A", "aa"))
    answers = await withdraw_staged_runs(
        runner,
        [("B", slot.paths("B"), "bb"), ("A", slot.paths("A"), "aa"), ("X", slot.paths("X"), None)],
        timeout_s=10,
    )
    assert answers == {"B": "withdrawn", "A": "started", "X": "gone"}
    await until(lambda: slot.stamp("A", "t_end") is not None)
    await asyncio.sleep(0.5)
    assert slot.ran() == ["A"]
    status = await monitor_job_execution(runner, [("B", slot.paths("B"))], timeout_s=10)
    assert status["B"].stage == "withdrawn" and status["B"].pid is None
    # staging it again (a restart that lost the withdrawal's record) stages it anew
    again = await slot.start("B", "bb", 0.1, after=("A", "aa"))
    assert not again.staged and again.started  # A has ended: it starts at once
    await until(lambda: slot.stamp("B", "t_end") is not None)
    assert slot.ran() == ["A", "B"]


async def test_a_run_withdrawn_and_staged_again_elsewhere_starts_only_behind_its_new_run(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """B is staged behind A, withdrawn, then staged again behind C (another slot of the
    same instance). A's folder still names B's in `next`: A's exit must not start B,
    which now waits for C (and holds C's GPUs); C's exit does."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 0.8)
    await slot.start("B", "bb", 0.1, after=("A", "aa"))
    assert await withdraw_staged_runs(runner, [("B", slot.paths("B"), "bb")], timeout_s=10) == {
        "B": "withdrawn"
    }
    await slot.start("C", "cc", 2.5)
    again = await slot.start("B", "b2", 0.1, after=("C", "cc"))
    assert again.staged
    await until(lambda: slot.stamp("A", "t_end") is not None)
    await asyncio.sleep(0.5)
    assert slot.stamp("B", "t_start") is None, "A's exit started B, staged behind C"
    await until(lambda: slot.stamp("B", "t_end") is not None)
    c_end, b_start = slot.stamp("C", "t_end"), slot.stamp("B", "t_start")
    assert c_end is not None and b_start is not None and b_start >= c_end
    assert slot.ran() == ["A", "C", "B"]


async def test_a_second_start_waits_while_the_claimed_run_is_still_being_launched(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """A ended and B was claimed (`staged` -> `go`), but B's launcher stalls before the
    wrapper's pid is written; vastd, seeing no pid for a while, starts the same run
    again. While that launcher lives, the start answers `staged` and launches nothing
    (two wrappers would run the job twice in one folder); once it is gone, it does."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 30)
    await slot.start("B", "bb", 0.1, after=("A", "aa"))
    stalled = await asyncio.create_subprocess_exec("sleep", "30")
    folder = slot.root / "1" / "jobs" / "B"
    try:
        (folder / "staged").rename(folder / "go")  # the claim of a launcher that stalls
        (folder / "go").write_text(f"{stalled.pid}\n")
        await handle_job_timeout(runner, slot.paths("A"), grace_s=0.2, timeout_s=10)
        again = await slot.start("B", "bb", 0.1, after=("A", "aa"))
        assert again.staged and not (folder / "pid").exists()
        await asyncio.sleep(0.3)
        assert slot.ran() == ["A"]
    finally:
        stalled.kill()
        await stalled.wait()
    again = await slot.start("B", "bb", 0.1, after=("A", "aa"))
    assert again.started
    await until(lambda: slot.stamp("B", "t_end") is not None)
    assert slot.ran() == ["A", "B"]


@pytest.mark.parametrize("launcher", ["zombie", "another process on its pid"])
async def test_a_claimed_run_whose_launcher_is_gone_is_launched_by_the_next_start(
    runner: LocalRunner, tmp_path: Path, launcher: str
) -> None:
    """The pid in `go` is no launcher any more: a zombie (not reaped where pid 1 does not
    reap), or a live process that took the pid over (its start time differs). The next
    start launches the run instead of waiting for it forever."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 30)
    await slot.start("B", "bb", 0.1, after=("A", "aa"))
    folder = slot.root / "1" / "jobs" / "B"
    if launcher == "zombie":
        other = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie
        await until(lambda: Path(f"/proc/{other.pid}/stat").read_text().split(") ")[1][0] == "Z")
        claim = f"{other.pid}\n"
    else:
        other = subprocess.Popen(["sleep", "30"])
        claim = f"{other.pid} 1\n"  # a start time that is not this process's
    try:
        (folder / "staged").rename(folder / "go")
        (folder / "go").write_text(claim)
        await handle_job_timeout(runner, slot.paths("A"), grace_s=0.2, timeout_s=10)
        again = await slot.start("B", "bb", 0.1, after=("A", "aa"))
        assert again.started
        await until(lambda: slot.stamp("B", "t_end") is not None)
        assert slot.ran() == ["A", "B"]
    finally:
        other.kill()
        other.wait()


async def test_a_run_staged_before_a_restart_of_its_machine_is_seen_alive_after_it(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """B's folder was made at staging, in an earlier boot (its `boot_key` says so), and
    claimed in this one: the launcher writes this boot's key, so the status sees B
    running (a pid from another boot would be taken for gone, and B for vanished)."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 30)
    await slot.start("B", "bb", 3, after=("A", "aa"))
    (slot.root / "1" / "jobs" / "B" / "boot_key").write_text("an-earlier-boot:1")
    await handle_job_timeout(runner, slot.paths("A"), grace_s=0.2, timeout_s=10)
    await until(lambda: slot.stamp("B", "t_start") is not None)
    status = await monitor_job_execution(runner, [("B", slot.paths("B"))], timeout_s=10)
    assert status["B"].alive and status["B"].pid is not None and status["B"].exit_code is None
    await until(lambda: slot.stamp("B", "t_end") is not None)


async def test_staging_over_a_live_earlier_run_of_the_job_writes_a_whole_launcher(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """B's folder still holds an earlier run of B, alive, when B is staged again behind
    A: the staging kills it (its liveness check sets the helpers' S) and still writes
    the launcher whole, so A's end starts B."""
    slot = Slot(runner, tmp_path)
    await slot.start("B", "b1", 30)
    await slot.start("A", "aa", 30)
    again = await slot.start("B", "b2", 0.1, after=("A", "aa"))
    assert again.staged
    launcher = (slot.root / "1" / "jobs" / "B" / "start.sh").read_text()
    assert "mv staged go" in launcher
    await handle_job_timeout(runner, slot.paths("A"), grace_s=0.2, timeout_s=10)
    await until(lambda: slot.stamp("B", "t_end") is not None)
    assert slot.ran() == ["B", "A", "B"]


async def test_killing_the_run_before_starts_the_staged_one(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """A timeout kills the whole group of A, its wrapper too: the kill starts B."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 30)
    await slot.start("B", "bb", 0.1, after=("A", "aa"))
    outcome = await handle_job_timeout(runner, slot.paths("A"), grace_s=0.2, timeout_s=10)
    assert outcome.was_alive and not outcome.still_alive
    await until(lambda: slot.stamp("B", "t_end") is not None)
    assert slot.ran() == ["A", "B"]


async def test_staging_behind_a_run_that_already_ended_starts_at_once(
    runner: LocalRunner, tmp_path: Path
) -> None:
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 0)
    await until(lambda: slot.stamp("A", "t_end") is not None)
    await asyncio.sleep(0.2)
    b = await slot.start("B", "bb", 0, after=("A", "aa"))
    assert b.started and not b.staged and b.pid > 1
    # and behind a run that is itself still staged, it waits
    await slot.start("C", "cc", 5)
    await slot.start("D", "dd", 0, after=("C", "cc"))
    e = await slot.start("E", "ee", 0, after=("D", "dd"))
    assert e.staged
    await withdraw_staged_runs(
        runner, [("E", slot.paths("E"), "ee"), ("D", slot.paths("D"), "dd")], timeout_s=10
    )
    await handle_job_timeout(runner, slot.paths("C"), grace_s=0.1, timeout_s=10)
    await asyncio.sleep(0.5)
    assert slot.ran() == ["A", "B", "C"]


# --- the daemon's steps over the simulator ----------------------------------------------------
@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


def staged_settings(env: SimEnv, ahead: int = 1) -> Settings:
    return env.settings(
        job={
            "command": f"{GATE}; " + STAMPED,
            "vars": {"secs": "0"},
            "result_glob": "out/t_*",
            "validate": "none",
            "stage_ahead": ahead,
        }
    )


def ran_on(env: SimEnv, iid: str) -> list[str]:
    path = env.sim.remote_root / iid / "ran.log"
    return path.read_text().split() if path.is_file() else []


async def staged_world(env: SimEnv, jobs: int = 3) -> tuple[Context, str, list[str]]:
    """One instance, stage_ahead = 1, gated jobs: the first runs, the second is staged."""
    await env.start(instances=1)
    ctx = env.context(staged_settings(env))
    [iid] = await env.ready(ctx)
    ids = await env.submit(ctx, jobs)
    await pump(
        ctx,
        lambda: ctx.store.jobs[ids[1]].staged_at is not None,
        20,
        message="second staged",
    )
    return ctx, iid, ids


async def staged_two_deep(env: SimEnv, jobs: int = 4) -> tuple[Context, str, list[str]]:
    """One instance, stage_ahead = 2: the first job runs, the next two wait behind it."""
    await env.start(instances=1)
    ctx = env.context(staged_settings(env, ahead=2))
    [iid] = await env.ready(ctx)
    ids = await env.submit(ctx, jobs)
    await pump(ctx, lambda: all(ctx.store.jobs[j].staged_at for j in ids[1:3]), 20)
    return ctx, iid, ids


async def test_the_daemon_stages_one_job_per_slot_and_the_instance_starts_it(
    env: SimEnv,
) -> None:
    ctx, iid, ids = await staged_world(env)
    first, second, third = (ctx.store.jobs[j] for j in ids)
    assert first.state is JobState.RUNNING and not first.staged and first.pgid
    assert second.state is JobState.RUNNING and second.staged and second.after == first.id
    assert third.state is JobState.QUEUED  # one staged per slot
    assert st.slot_load(ctx.store, ctx.store.instances[iid]) == 1
    rows = {j.id: job_row(JobView.of(j), time.time()) for j in (first, second)}
    assert rows[second.id]["staged"] and rows[second.id]["started"] is None
    assert not rows[first.id]["staged"] and "(staged)" in format_jobs(
        list(rows.values()), True, None
    )
    # saved before its upload: the snapshot on disk knows where it waits
    assert await ctx.store.flush()
    env.open_gate(iid)
    await pump(ctx, lambda: all(ctx.store.jobs[j].state is JobState.DONE for j in ids), 60)
    assert sorted(ran_on(env, iid)) == sorted(ids)  # each ran once
    for j in ids:
        job = ctx.store.jobs[j]
        assert (job.runs, job.attempts, job.staged) == (1, 0, False)
        assert (ctx.layout.results / j / "t_start").is_file()


async def test_draining_withdraws_staged_jobs_and_they_run_elsewhere_later(
    env: SimEnv,
) -> None:
    ctx, iid, ids = await staged_world(env)
    inst = ctx.store.instances[iid]
    st.drain_instance(ctx.store, inst, st.MANUAL_DRAIN, requeue_jobs=False)
    await pump(ctx, lambda: ctx.store.jobs[ids[1]].state is JobState.QUEUED, 20)
    second = ctx.store.jobs[ids[1]]
    assert second.attempts == 0 and not second.staged and "draining" in (second.last_error or "")
    assert ctx.store.jobs[ids[0]].state is JobState.RUNNING  # the running one goes on
    assert st.undrain_instance(ctx.store, inst)
    env.open_gate(iid)
    await pump(ctx, lambda: all(ctx.store.jobs[j].state is JobState.DONE for j in ids), 60)
    assert Counter(ran_on(env, iid)) == Counter(ids)  # the withdrawn one never started


async def test_cancelling_a_staged_job_withdraws_it_and_the_one_behind(env: SimEnv) -> None:
    await env.start(instances=1)
    ctx = env.context(staged_settings(env, ahead=2))
    [iid] = await env.ready(ctx)
    ids = await env.submit(ctx, 3)
    await pump(ctx, lambda: ctx.store.jobs[ids[2]].staged_at is not None, 20)
    assert ctx.store.jobs[ids[2]].after == ids[1]
    control = ControlServer(ctx)
    [answer] = await control.cancel([ids[1]])
    assert answer["ok"], answer
    assert ctx.store.job_state(ids[1]) is JobState.FAILED
    await pump(ctx, lambda: ctx.store.jobs[ids[2]].state is JobState.QUEUED, 20, dispatch=False)
    env.open_gate(iid)
    await pump(ctx, lambda: ctx.store.job_state(ids[2]) is JobState.DONE, 60)
    assert ctx.store.job_state(ids[0]) is JobState.DONE
    assert ran_on(env, iid) == [ids[0], ids[2]]  # the cancelled one never ran


# --- `vastd run`, stopped for a while -----------------------------------------------------------
@pytest.mark.e2e
async def test_staged_jobs_start_while_the_daemon_is_stopped_and_none_runs_twice(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """`vastd run` with stage_ahead = 1 on two instances, jobs of 1 s: the daemon is
    SIGSTOPped for 4 s mid-run; jobs start on the instances meanwhile (their own start
    times say so), every job ends done, and each started exactly once.

    The jobs wait for their instance's gate, opened once the daemon is stopped: the
    staged ones cannot have started before the stop however slowly the daemon staged
    them (with free-running jobs a slow stage could start before the stop, and then
    nothing was staged during it)."""
    job = {"command": f"{GATE}; {STAMPED}", "vars": {"secs": "1"}, "result_glob": "out/t_*"}
    job |= {"validate": "none", "stage_ahead": 1, "poll_interval_s": 0.5}
    sim = await cluster(instances=2)
    config, root = write_config(sim, tmp_path, job=job)
    daemon = await daemons(config)
    await daemon.wait_event("daemon_started")
    sources = load_make_jobs()(tmp_path / "jobs", 12, 1, 3, prefix="staged_job")
    await submit(config, sources)
    await async_wait_for(
        lambda: len(daemon.events("job_staged")) >= 2,
        30,
        message=lambda: f"two staged: {daemon.tail()}",
    )
    stopped_at = time.time()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    for iid in sim.cloud.instances:
        (sim.remote_root / str(iid) / "go").touch()
    await asyncio.sleep(4)
    resumed_at = time.time()
    os.kill(daemon.proc.pid, signal.SIGCONT)
    await async_wait_for(
        lambda: all((root / "done" / p.name).is_file() for p in sources),
        90,
        message=lambda: f"all done: {daemon.tail()}",
    )
    assert await daemon.stop() == 0
    starts = {p.stem: float((root / "results" / p.stem / "t_start").read_text()) for p in sources}
    during = [j for j, t in starts.items() if stopped_at < t < resumed_at]
    assert during, starts  # the instances went on while the daemon could not
    ran: Counter[str] = Counter()
    for iid in sim.cloud.instances:
        log = sim.remote_root / str(iid) / "ran.log"
        if log.is_file():
            ran.update(log.read_text().split())
    assert ran == Counter(p.stem for p in sources)


async def test_a_staged_run_on_an_instance_vastd_stopped_looking_at_withdraws_itself(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """Past the lease (vastd's unreachable grace, after which it gives the instance's jobs
    to others) a staged run does not start: it could run twice."""
    slot = Slot(runner, tmp_path)
    await slot.start("A", "aa", 0.3)
    b = await execute_job_on_instance(
        runner,
        remote_root=str(slot.root),
        instance_id="1",
        job_id="B",
        local_csv=slot.csv,
        command_template=STAMPED,
        vars={"secs": "0"},
        attempt=1,
        timeout_s=20,
        run_id="bb",
        after=StagedAfter(slot.paths("A"), "aa"),
        lease_s=60,
    )
    assert b.staged
    lease = slot.root / "1" / "lease"
    assert lease.is_file()  # staging wrote it
    assert abs(int(lease.read_text()) - time.time()) < 5  # the instance's clock
    lease.write_text(f"{int(time.time()) - 120}\n")
    await until(lambda: slot.stamp("A", "t_end") is not None)
    await asyncio.sleep(0.5)
    assert slot.ran() == ["A"]
    status = await monitor_job_execution(runner, [("B", slot.paths("B"))], timeout_s=10)
    assert status["B"].stage == "withdrawn"


async def test_the_launcher_takes_the_clock_passed_on_only_when_it_is_a_number(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """`start.sh` compares the lease with the clock the wrapper before passed on
    (VASTD_NOW), or reads the clock itself when that is missing or not a number; the job
    never sees the variable."""
    slot = Slot(runner, tmp_path)
    lease = slot.root / "1" / "lease"
    await slot.start("A", "aa", 30)
    for job, clock, lease_age, started in (
        ("B", "junk", 0, True),  # junk: the instance's clock, the lease is fresh
        ("C", "junk", 120, False),  # ... and here it is old: withdrawn
        ("D", str(int(time.time()) + 120), 0, False),  # the clock passed on, 2 min ahead
    ):
        await execute_job_on_instance(
            runner,
            remote_root=str(slot.root),
            instance_id="1",
            job_id=job,
            local_csv=slot.csv,
            command_template="echo ${{VASTD_NOW-unset}} > {output_dir}/seen",
            vars={},
            attempt=1,
            timeout_s=20,
            run_id=job.lower() * 2,
            after=StagedAfter(slot.paths("A"), "aa"),
            lease_s=60,
        )
        lease.write_text(f"{int(time.time()) - lease_age}\n")
        folder = slot.root / "1" / "jobs" / job
        proc = await asyncio.create_subprocess_exec(
            "sh", "./start.sh", cwd=folder, env={**os.environ, "VASTD_NOW": clock}
        )
        assert await proc.wait() == 0
        seen = folder / "out" / "seen"
        if started:
            await until(seen.is_file)
            await until(lambda seen=seen: seen.read_text() != "")
            assert seen.read_text() == "unset\n"
        else:
            await asyncio.sleep(0.3)
            assert not seen.exists() and (folder / "withdrawn").is_file()


async def test_what_a_run_leaves_behind_is_told_to_go_before_the_staged_one_starts(
    runner: LocalRunner, tmp_path: Path
) -> None:
    slot = Slot(runner, tmp_path)
    await execute_job_on_instance(
        runner,
        remote_root=str(slot.root),
        instance_id="1",
        job_id="A",
        local_csv=slot.csv,
        command_template="(sleep 30 & echo $! > {output_dir}/child); sleep 0.3",
        vars={},
        attempt=1,
        timeout_s=20,
        run_id="aa",
    )
    await slot.start("B", "bb", 0, after=("A", "aa"))
    await until(lambda: slot.stamp("B", "t_end") is not None)
    child = int((slot.root / "1" / "jobs" / "A" / "out" / "child").read_text())
    await until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_staging_whose_answer_was_lost_is_confirmed_by_the_status_check(
    env: SimEnv,
) -> None:
    ctx, iid, ids = await staged_world(env)
    second = ctx.store.jobs[ids[1]]
    second.staged_at = None  # as if the staging's answer never came back
    await pump(ctx, lambda: second.staged_at is not None, 20, dispatch=False)
    assert second.staged and second.state is JobState.RUNNING
    env.open_gate(iid)
    await pump(ctx, lambda: all(ctx.store.jobs[j].state is JobState.DONE for j in ids), 60)
    assert Counter(ran_on(env, iid)) == Counter(ids)


async def test_a_staged_run_seen_started_while_the_run_ahead_reads_running_keeps_one_slot(
    env: SimEnv,
) -> None:
    """The status command reads a slot's runs one after the other, so the run ahead can
    be read still running and the staged run, started by its exit in between, already
    started. Until the run ahead is seen ended, both hold the one slot: nothing is
    staged behind the run ahead (its staging would find it ended and start at once,
    beside the run already started) and nothing else is placed there."""
    ctx, iid, ids = await staged_world(env, jobs=4)
    inst = ctx.store.instances[iid]
    first, second = ctx.store.jobs[ids[0]], ctx.store.jobs[ids[1]]
    # The statuses of one such command, in its order, through the watcher's own handler.
    await handle_job_status(ctx, inst, first, status_of(first, pid=first.pgid, alive=True))
    started = status_of(second, pid=4242, alive=True, started_at=time.time())
    await handle_job_status(ctx, inst, second, started)
    assert not second.staged and first.state is JobState.RUNNING
    assert [[j.id for j in c] for c in st.slot_chains(ctx.store, inst)] == [ids[:2]]
    assert st.slot_load(ctx.store, inst) == 1
    assert staging_slots(ctx) == []
    assert await coordinate_job_distribution(ctx) == 0
    assert [ctx.store.job_state(j) for j in ids[2:]] == [JobState.QUEUED] * 2
    # Once the run ahead is seen ended, the started run heads the slot: the next is
    # staged behind it.
    st.mark_job_exited(ctx.store, first.id, exit_code=0, error=None)
    assert staging_slots(ctx) == [(inst, second)]


@pytest.mark.parametrize("host_clock", ["2001", "a day ahead", "right"])
async def test_a_staged_runs_deadline_takes_the_hosts_start_time_only_when_plausible(
    env: SimEnv, host_clock: str
) -> None:
    """A staged run's start time comes from its instance's clock. One before the job's
    assignment (a host clock in 2001: RTC unset, no NTP) or after now is not used: the
    deadline counts from when vastd first saw the start, so the run is not killed as
    timed out the moment it starts. A plausible one is kept."""
    ctx, iid, ids = await staged_world(env)
    inst = ctx.store.instances[iid]
    first, second = ctx.store.jobs[ids[0]], ctx.store.jobs[ids[1]]
    assert second.dispatched_at is not None
    host_start = {
        "2001": 1_000_000_000.0,
        "a day ahead": time.time() + 86400,
        "right": second.dispatched_at + 0.001,
    }[host_clock]
    st.mark_job_exited(ctx.store, first.id, exit_code=0, error=None)
    before = time.time()
    started = status_of(second, pid=4242, alive=True, started_at=host_start)
    await handle_job_status(ctx, inst, second, started)

    assert not second.staged and second.started_at is not None
    if host_clock == "right":
        assert second.started_at == host_start
    else:
        assert before <= second.started_at <= time.time()
    assert second.kill_reason is None and second.state is JobState.RUNNING
    await handle_job_status(ctx, inst, second, started)  # the next look
    assert second.kill_reason is None and second.state is JobState.RUNNING


def status_of(job: JobRecord, **fields: object) -> RemoteJobStatus:
    return RemoteJobStatus(job_id=job.id, exists=True, run=job.run_id, **fields)  # type: ignore[arg-type]


async def test_the_runs_of_a_slot_ended_or_started_between_two_reads_keep_that_one_slot(
    env: SimEnv,
) -> None:
    """stage_ahead = 2, X running, Y and W staged behind it. One status command reads X
    running; X ends and starts Y, which ends and starts W, before the command reads
    them. Y's exit is handled (it leaves the slot) while X still reads running: W is in
    X's slot all the same (by slot number, not by Y's link), so nothing is staged behind
    X, whose staging would start at once beside W. The next job goes behind W."""
    ctx, iid, ids = await staged_two_deep(env, jobs=5)
    inst = ctx.store.instances[iid]
    x, y, w = (ctx.store.jobs[j] for j in ids[:3])
    assert (x.slot, y.slot, w.slot) == (0, 0, 0) and (y.after, w.after) == (x.id, y.id)
    now = time.time()
    await handle_job_status(ctx, inst, x, status_of(x, pid=x.pgid, alive=True))
    await handle_job_status(
        ctx, inst, y, status_of(y, pid=4242, exit_code=0, started_at=now, ended_at=now)
    )
    await handle_job_status(ctx, inst, w, status_of(w, pid=4343, alive=True, started_at=now))
    assert x.state is JobState.RUNNING and y.state is JobState.COLLECTING and not w.staged
    assert [[j.id for j in c] for c in st.slot_chains(ctx.store, inst)] == [[x.id, w.id]]
    assert st.slot_load(ctx.store, inst) == 1
    assert staging_slots(ctx) == [(inst, w)]
    assert await coordinate_job_distribution(ctx) == 1
    [staged] = [j for j in ctx.store.jobs.values() if j.staged]
    assert (staged.after, staged.slot) == (w.id, 0)


async def test_a_staged_run_completed_by_another_run_withdraws_the_runs_behind_it(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stage_ahead = 2, X running, Y and W staged behind it; an orphaned run of Y
    elsewhere brings its results in. Y's staged run never starts (its folder is cleaned
    up), so W, linked behind it on the instance, is withdrawn with it: never kicked to
    start beside X (its staging would find Y's folder gone and start at once)."""
    monkeypatch.setattr(coordinator, "STAGED_KICK_S", 0.0)
    ctx, iid, ids = await staged_two_deep(env, jobs=4)
    inst = ctx.store.instances[iid]
    x, y, w = (ctx.store.jobs[j] for j in ids[:3])
    y.orphans = [OrphanRun(instance="elsewhere", run="abc123", started_at=time.time())]
    assert await st.complete_job(
        ctx.store, y, instance_id="elsewhere", run_id="abc123", result_files=[]
    )
    assert y.state is JobState.DONE and not y.staged
    assert w.kill_reason is not None and w.kill_reason.startswith(st.WITHDRAWN)
    kicked: list[str] = []
    monkeypatch.setattr(coordinator, "_kick", lambda ctx, inst, job, why: kicked.append(job.id))
    await handle_job_status(ctx, inst, w, status_of(w, stage="staged"))
    assert kicked == [] and x.state is JobState.RUNNING
    await pump(ctx, lambda: w.state is JobState.QUEUED, 20, dispatch=False)


async def test_runs_from_a_snapshot_before_slot_numbers_are_numbered_by_their_links(
    env: SimEnv,
) -> None:
    """A snapshot from before slot numbers: its runs' slots follow `after` until the
    start numbers them (`number_slots`, in recovery); what is staged later is numbered."""
    ctx, iid, ids = await staged_world(env, jobs=2)
    inst = ctx.store.instances[iid]
    x, y = (ctx.store.jobs[j] for j in ids)
    for job in (x, y):
        job.slot, job.slot_pos = None, 0
    assert [[j.id for j in c] for c in st.slot_chains(ctx.store, inst)] == [ids]
    assert st.slot_load(ctx.store, inst) == 1
    assert st.number_slots(ctx.store) == 2
    assert [(j.slot, j.slot_pos) for j in (x, y)] == [(0, 0), (0, 1)]
    assert st.number_slots(ctx.store) == 0


async def test_a_slot_runs_in_its_staging_order_whatever_the_clock_says(env: SimEnv) -> None:
    """The clock stepped back between two stagings: the slot's order is still the order
    the runs wait in (their places), so the next job goes behind the last of them."""
    ctx, iid, ids = await staged_two_deep(env)
    inst = ctx.store.instances[iid]
    x, y, w = (ctx.store.jobs[j] for j in ids[:3])
    assert [j.slot_pos for j in (x, y, w)] == [0, 1, 2]
    w.dispatched_at = (x.dispatched_at or 0.0) - 3600
    assert [[j.id for j in c] for c in st.slot_chains(ctx.store, inst)] == [ids[:3]]


async def test_a_staged_run_recovered_as_done_withdraws_the_runs_behind_it(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart finds Y, staged behind X with W behind it, done already (an orphaned
    run's results were moved in before a crash): W is withdrawn with Y, never kicked to
    start beside X."""
    monkeypatch.setattr(coordinator, "STAGED_KICK_S", 0.0)
    ctx, iid, ids = await staged_two_deep(env)
    inst = ctx.store.instances[iid]
    x, y, w = (ctx.store.jobs[j] for j in ids[:3])
    st.mark_job_recovered(ctx.store, y.id, JobState.DONE)
    assert not y.staged and w.kill_reason is not None
    assert w.kill_reason.startswith(st.WITHDRAWN)
    kicked: list[str] = []
    monkeypatch.setattr(coordinator, "_kick", lambda ctx, inst, job, why: kicked.append(job.id))
    w.kill_reason = None  # even without the withdrawal: X runs ahead of it in its slot
    await handle_job_status(ctx, inst, w, status_of(w, stage="staged"))
    assert kicked == [] and x.state is JobState.RUNNING


async def test_a_job_that_cannot_wait_behind_one_slot_leaves_the_others_to_be_staged(
    env: SimEnv,
) -> None:
    """Staging looks at each slot in turn: a queued retry that must avoid the first
    slot's instance is staged behind the next slot, not left waiting for a free one
    with every later slot unstaged."""
    await env.start(instances=2)
    ctx = env.context(staged_settings(env))
    iids = await env.ready(ctx)
    ids = await env.submit(ctx, 2)
    await pump(ctx, lambda: all(ctx.store.jobs[j].pgid for j in ids), 20, message="both run")
    assert sorted(ctx.store.jobs[j].instance or "" for j in ids) == iids
    [retry_id] = await env.submit(ctx, 1, prefix="retry")
    first_slot = staging_slots(ctx)[0][0].id
    retry = ctx.store.jobs[retry_id]
    retry.avoid_instances = [first_slot]  # as if it had failed there
    assert await coordinate_job_distribution(ctx) == 1
    assert retry.staged and retry.instance not in (None, first_slot)
    for iid in iids:
        env.open_gate(iid)
    every = [*ids, retry_id]
    await pump(ctx, lambda: all(ctx.store.jobs[j].state is JobState.DONE for j in every), 60)


async def test_staging_looks_past_a_queue_head_of_jobs_that_must_avoid_the_slot(
    env: SimEnv,
) -> None:
    """More retries at the head of the queue than one round looks at, all failed on the
    only busy instance: the fresh job behind them is still staged there."""
    await env.start(instances=1)
    ctx = env.context(staged_settings(env))
    [iid] = await env.ready(ctx)
    [first] = await env.submit(ctx, 1)
    await pump(ctx, lambda: ctx.store.jobs[first].pgid, 20, message="first runs")
    retries = await env.submit(ctx, DISPATCH_SLACK + 8, prefix="retry")
    for job_id in retries:
        ctx.store.jobs[job_id].avoid_instances = [iid]  # as if each had failed there
    [fresh] = await env.submit(ctx, 1, prefix="fresh")
    assert await coordinate_job_distribution(ctx) == 1
    assert ctx.store.jobs[fresh].staged and ctx.store.jobs[fresh].instance == iid
    assert all(ctx.store.job_state(j) is JobState.QUEUED for j in retries)
