"""One job per GPU (`[job] jobs_per_instance = "gpus"`) against a simulated account.

A simulated instance lists `num_gpus` in the API; a fake `nvidia-smi` on PATH (the sim
hosts run commands on this machine) answers the health check's query. Each job writes
the CUDA_VISIBLE_DEVICES it was started with and its `{gpus}` placeholder into its
results, and the tests read them back.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import GATE, SimEnv, async_wait_for, pump, wait_saved
from tests.test_daemon_process import DaemonProcess, cluster, daemons, submit, write_config
from vastd.core import gpus
from vastd.core import state as st
from vastd.core.files import JobFolder, Layout
from vastd.core.records import InstanceRecord, JobRecord, OrphanRun
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceStatus, JobState, StateStore
from vastd.orchestration import coordinator as co
from vastd.orchestration import fleet
from vastd.orchestration import health as hl
from vastd.orchestration.context import Context, build_context
from vastd.orchestration.workflow import loop_steps, recover_after_restart
from vastd.sim.cluster import SimCluster, load_make_jobs
from vastd.status import build_status, format_status, load_snapshot_readonly
from vastd.utils.config import JobSettings, Settings
from vastd.utils.supervise import Backoff
from vastd.views import format_jobs, job_rows, read_campaign

# Writes what the job was given, then waits for its instance's gate (tests/ctxfactory.py).
GPU_JOB = (
    "printf '%s\\n' \"$CUDA_VISIBLE_DEVICES\" > {output_dir}/cvd.gpu; "
    "printf '%s\\n' {gpus} > {output_dir}/arg.gpu; " + GATE
)

__all__ = ["cluster", "daemons"]  # the fixtures, used by name


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimEnv]:
    # Nothing from this machine's environment may leak into the jobs' GPU lists.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    async with SimEnv(tmp_path) as e:
        yield e


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    """An `nvidia-smi` on PATH that prints `lines` (the query's CSV answer)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def gpu_settings(env: SimEnv, gpus_per_job: int = 1) -> Settings:
    return env.settings(
        job={
            "command": GPU_JOB,
            "result_glob": "out/*.gpu",
            "validate": "none",
            "jobs_per_instance": "gpus",
            "gpus_per_job": gpus_per_job,
        }
    )


def started(ctx: Context, ids: list[str]) -> bool:
    return all(ctx.store.jobs[j].state is JobState.RUNNING and ctx.store.jobs[j].pgid for j in ids)


def result_text(ctx: Context, job_id: str, name: str) -> str:
    """A file the job wrote into out/, as installed under results/<job>/."""
    found = sorted((ctx.layout.results / job_id).rglob(name))
    assert found, sorted(p.name for p in (ctx.layout.results / job_id).rglob("*"))
    return found[0].read_text().strip()


async def dispatch_rounds(ctx: Context, n: int = 3) -> None:
    """`n` rounds of the dispatch loop's step (what the loop would do meanwhile)."""
    steps = loop_steps(ctx)
    for _ in range(n):
        await steps.dispatch()
        await asyncio.sleep(0.05)


async def finish(env: SimEnv, ctx: Context, iid: str, ids: list[str]) -> None:
    env.open_gate(iid)
    await pump(
        ctx,
        lambda: all(ctx.store.jobs[j].state is JobState.DONE for j in ids),
        60,
        message="all done",
    )


async def test_four_gpus_run_four_jobs_at_once_each_on_its_own_gpu(
    env: SimEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4-GPU instance (nvidia-smi lists indices 0-3, the API says 1): the health check's
    indices win, four jobs run at once with CUDA_VISIBLE_DEVICES 0, 1, 2 and 3 (and the
    same `{gpus}`), a fifth waits for a free GPU; the manifest names the GPU and indices."""
    fake_nvidia_smi(tmp_path, monkeypatch, [f"{i}, 0, 5, 24564" for i in range(4)])
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=1)
    ctx = env.context(gpu_settings(env))
    [iid] = await env.ready(ctx)
    assert ctx.store.instances[iid].num_gpus == 1
    await hl.health_once(ctx)
    assert ctx.store.instances[iid].gpu_indices == [0, 1, 2, 3]

    ids = await env.submit(ctx, 5)
    first, fifth = ids[:4], ids[4]
    await pump(ctx, lambda: started(ctx, first), 30, message="four started")
    await dispatch_rounds(ctx)  # the fifth still finds no free GPU
    assert ctx.store.jobs[fifth].state is JobState.QUEUED
    assert sorted(tuple(ctx.store.jobs[j].gpus) for j in first) == [(0,), (1,), (2,), (3,)]
    assert len(ctx.store.instances[iid].current_jobs) == 4
    given = {j: ctx.store.jobs[j].gpus for j in first}

    await finish(env, ctx, iid, ids)
    seen = {j: result_text(ctx, j, "cvd.gpu") for j in first}
    assert sorted(seen.values()) == ["0", "1", "2", "3"], seen
    assert all(seen[j] == ",".join(map(str, given[j])) for j in first)
    for j in ids:
        assert result_text(ctx, j, "cvd.gpu") == result_text(ctx, j, "arg.gpu")
        manifest = json.loads((ctx.layout.results / j / "MANIFEST.json").read_text())
        assert manifest["gpu"] == ctx.store.instances[iid].gpu_name
        assert [int(g) for g in result_text(ctx, j, "cvd.gpu").split(",")] == manifest["gpus"]


async def test_two_gpus_per_job_on_four_gpus_gives_two_jobs(env: SimEnv) -> None:
    """No nvidia-smi: the API's num_gpus = 4 counts; gpus_per_job = 2 gives two jobs at
    once with "0,1" and "2,3"; a third waits."""
    assert not any((Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(os.pathsep))
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=4)
    ctx = env.context(gpu_settings(env, gpus_per_job=2))
    [iid] = await env.ready(ctx)
    await hl.health_once(ctx)
    assert ctx.store.instances[iid].gpu_indices is None  # nvidia-smi absent
    ids = await env.submit(ctx, 3)
    await pump(ctx, lambda: started(ctx, ids[:2]), 30, message="two started")
    await dispatch_rounds(ctx)
    assert ctx.store.jobs[ids[2]].state is JobState.QUEUED
    await finish(env, ctx, iid, ids)
    assert sorted(result_text(ctx, j, "cvd.gpu") for j in ids[:2]) == ["0,1", "2,3"]
    assert result_text(ctx, ids[2], "cvd.gpu") in ("0,1", "2,3")


async def test_an_instance_with_too_few_gpus_gets_no_job_and_is_logged_once(env: SimEnv) -> None:
    """gpus_per_job = 2 on a 1-GPU instance: no slot, the job stays queued, and
    `instance_too_few_gpus` is logged once however many dispatch rounds pass."""
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=1)
    ctx = env.context(gpu_settings(env, gpus_per_job=2))
    [iid] = await env.ready(ctx)
    [job] = await env.submit(ctx, 1)
    with capture_logs() as logs:
        await dispatch_rounds(ctx, 5)
    assert ctx.store.jobs[job].state is JobState.QUEUED
    short = [e for e in logs if e.get("event") == "instance_too_few_gpus"]
    assert len(short) == 1 and short[0]["instance"] == iid and short[0]["gpus"] == 1


async def test_saved_gpu_assignments_survive_a_restart(env: SimEnv) -> None:
    """Three jobs run on GPUs 0-2 of a 4-GPU instance; vastd restarts (a new Context on
    the same state, the remote jobs still running). The saved indices are what counts:
    the running jobs keep theirs, the next job gets GPU 3 and the one after waits, and no
    two jobs ran on one GPU."""
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=4)
    settings = gpu_settings(env)
    ctx = env.context(settings)
    [iid] = await env.ready(ctx)
    ids = await env.submit(ctx, 3)
    await pump(ctx, lambda: started(ctx, ids), 30, message="three started")
    before = {j: list(ctx.store.jobs[j].gpus) for j in ids}
    assert sorted(before.values()) == [[0], [1], [2]]
    await wait_saved(ctx)
    await env.close_context(ctx)

    ctx2 = env.context(settings)
    recover_after_restart(ctx2)
    await env.ready(ctx2)
    assert {j: list(ctx2.store.jobs[j].gpus) for j in ids} == before
    more = await env.submit(ctx2, 2, prefix="after_restart")
    await pump(ctx2, lambda: started(ctx2, [*ids, more[0]]), 30, message="fourth started")
    await dispatch_rounds(ctx2)
    assert ctx2.store.jobs[more[0]].gpus == [3]
    assert ctx2.store.jobs[more[1]].state is JobState.QUEUED
    running = [ctx2.store.jobs[j] for j in [*ids, more[0]]]
    assert sorted(g for j in running for g in j.gpus) == [0, 1, 2, 3]

    await finish(env, ctx2, iid, [*ids, *more])
    first_four = [result_text(ctx2, j, "cvd.gpu") for j in [*ids, more[0]]]
    assert sorted(first_four) == ["0", "1", "2", "3"]


# --- the GPU idle watch ---------------------------------------------------------------------
async def test_a_job_whose_gpu_stays_idle_is_flagged_not_killed(
    env: SimEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpu_idle_s`: the job on GPU 0 (0% at every health check for that long) is flagged
    in the log (`job_gpu_idle`, once), `vastd jobs` and `vastd status`, and keeps running;
    the job on GPU 1 (busy) is not; a busy reading clears the flag. "[N/A]" never flags."""
    answer = tmp_path / "nvidia-smi.out"
    answer.write_text("0, 0, 5, 24564\n1, 57, 900, 24564\n")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat '{answer}'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=2)
    settings = gpu_settings(env)
    settings.job.gpu_idle_s = 0.3
    ctx = env.context(settings)
    [iid] = await env.ready(ctx)
    ids = await env.submit(ctx, 2)
    await pump(ctx, lambda: started(ctx, ids), 30, message="two started")
    on = {ctx.store.jobs[j].gpus[0]: ctx.store.jobs[j] for j in ids}
    idle, busy = on[0], on[1]

    with capture_logs() as logs:
        await hl.health_once(ctx)
        assert idle.gpu_idle_since is not None and not idle.gpu_idle  # not for long yet
        await asyncio.sleep(0.4)
        await hl.health_once(ctx)
        await hl.health_once(ctx)
    flagged = [e for e in logs if e.get("event") == "job_gpu_idle"]
    assert [(e["job"], e["gpus"]) for e in flagged] == [(idle.id, "0")]
    assert idle.gpu_idle and idle.state is JobState.RUNNING and idle.pgid is not None
    assert not busy.gpu_idle and busy.gpu_idle_since is None

    await wait_saved(ctx)
    rows = {r["id"]: r for r in job_rows(read_campaign(ctx.layout))}
    assert rows[idle.id]["gpu_idle"] and not rows[busy.id]["gpu_idle"]
    assert rows[idle.id]["gpus"] == [0]
    table = format_jobs(list(rows.values()), True, None)
    assert [line.split()[0] for line in table.splitlines() if "gpu idle" in line] == [idle.id]
    status = build_status(ctx.layout, load_snapshot_readonly(ctx.layout))
    text = format_status(status)
    assert f"{idle.id}  GPU IDLE" in text and f"{busy.id}  GPU IDLE" not in text

    answer.write_text("0, 12, 5, 24564\n1, [N/A], 900, 24564\n")
    with capture_logs() as logs:
        await hl.health_once(ctx)
        await asyncio.sleep(0.4)
        await hl.health_once(ctx)
    assert not idle.gpu_idle and idle.gpu_idle_since is None
    assert not busy.gpu_idle and busy.gpu_idle_since is None  # unknown is not idle
    assert [e["job"] for e in logs if e.get("event") == "job_gpu_busy_again"] == [idle.id]
    await finish(env, ctx, iid, ids)


async def test_the_idle_watch_is_off_by_default(
    env: SimEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpu_idle_s = 0` (the default): a job at 0% is never flagged."""
    fake_nvidia_smi(tmp_path, monkeypatch, ["0, 0, 5, 24564"])
    sim = await env.start(instances=0)
    await sim.cloud.add_instance(num_gpus=1)
    ctx = env.context(gpu_settings(env))
    [iid] = await env.ready(ctx)
    [job] = await env.submit(ctx, 1)
    await pump(ctx, lambda: started(ctx, [job]), 30, message="started")
    for _ in range(3):
        await hl.health_once(ctx)
    record = ctx.store.jobs[job]
    assert not record.gpu_idle and record.gpu_idle_since is None
    await finish(env, ctx, iid, [job])


# --- the rules, on records ----------------------------------------------------------------
def test_gpu_rules_on_records() -> None:
    """nvidia-smi's indices win over num_gpus, which wins over "one GPU"; slots are
    GPUs // gpus_per_job; held indices (jobs and orphaned runs; a job given none holds
    every GPU) are never picked again; too few free gives None."""
    per = JobSettings(jobs_per_instance="gpus", gpus_per_job=2)
    inst = InstanceRecord(id="7", num_gpus=4)
    assert gpus.instance_gpus(InstanceRecord(id="8")) == [0]
    assert gpus.instance_gpus(inst) == [0, 1, 2, 3] and gpus.slots(per, inst) == 2
    inst.gpu_indices = [4, 5, 6]
    assert gpus.instance_gpus(inst) == [4, 5, 6] and gpus.slots(per, inst) == 1
    assert gpus.slots(JobSettings(jobs_per_instance=3), inst) == 3
    running = JobRecord(id="a", file_name="a.csv", instance="7", gpus=[5])
    elsewhere = JobRecord(id="b", file_name="b.csv", instance="9", gpus=[4])
    orphaned = JobRecord(
        id="c", file_name="c.csv", orphans=[OrphanRun(instance="7", run="ab", gpus=(6,))]
    )
    taken = gpus.held_gpus(inst, [running, elsewhere], [orphaned])
    assert taken == {5, 6}
    assert gpus.pick_gpus(JobSettings(jobs_per_instance="gpus"), inst, taken) == [4]
    assert gpus.pick_gpus(per, inst, taken) is None
    legacy = JobRecord(id="d", file_name="d.csv", instance="7")
    assert gpus.held_gpus(inst, [legacy], []) == {4, 5, 6}
    assert gpus.gpu_list([0, 1]) == "0,1"


def offline_ctx(tmp_path: Path, **job: Any) -> Context:
    """A Context with no cloud and no SSH use: for the placement and fleet rules."""
    settings = Settings(
        paths={"root": str(tmp_path / "root")},
        vast={"api_key": "x", "api_key_file": None},
        job={"command": "true {gpus}", **job},
    )
    layout = Layout(settings.paths.root)
    layout.ensure()
    return build_context(
        settings,
        store=StateStore(layout.state_file),
        pool=SSHPool(settings.ssh),
        cloud=None,
        backoff=Backoff.zero(),
    )


def queued(ctx: Context, job_id: str) -> JobRecord:
    ctx.layout.job_file(JobFolder.QUEUED, job_id).write_text("a,b\n1,2\n")
    return st.add_job(ctx.store, job_id, f"{job_id}.csv", 1)


def test_an_orphaned_run_keeps_its_gpus_until_settled(tmp_path: Path) -> None:
    """A job given up on a silent instance leaves an orphaned run holding its GPU (the
    transition records it): the next job there gets another GPU, and when only that
    one is left, none."""
    ctx = offline_ctx(tmp_path, jobs_per_instance="gpus")
    inst = InstanceRecord(id="7", status=InstanceStatus.READY, num_gpus=2)
    ctx.store.instances["7"] = inst
    queued(ctx, "a")
    st.mark_job_assigned(ctx.store, "a", "7", co.free_gpus(ctx, inst) or ())
    assert ctx.store.jobs["a"].gpus == [0]
    st.requeue_job(ctx.store, "a", reason="silent", orphan=True)
    assert ctx.store.jobs["a"].orphans[0].gpus == (0,)
    assert co.free_gpus(ctx, inst) == [1]
    queued(ctx, "b")
    st.mark_job_assigned(ctx.store, "b", "7", co.free_gpus(ctx, inst) or ())
    assert ctx.store.jobs["b"].gpus == [1]
    assert co.free_gpus(ctx, inst) is None
    assert co.find_best_instance_for_job(ctx, queued(ctx, "c")) is None


def test_autoscale_counts_each_instance_for_its_gpu_slots(tmp_path: Path) -> None:
    """With one job per GPU the fleet's wish counts an instance for the mean slots of
    the live ones (1 before any is known): 8 jobs on 4-GPU instances want 2."""
    ctx = offline_ctx(tmp_path, jobs_per_instance="gpus")
    for n in range(8):
        queued(ctx, f"j{n}")
    ctx.settings.fleet.max_instances = 64
    assert fleet.slots_per_instance(ctx) == 1 and fleet.desired_instances(ctx) == 8
    ctx.store.instances["7"] = InstanceRecord(id="7", status=InstanceStatus.READY, num_gpus=4)
    assert fleet.slots_per_instance(ctx) == 4 and fleet.desired_instances(ctx) == 2


# --- `vastd run` as a process ------------------------------------------------------------
def saved_gpus(root: Path) -> dict[str, list[int]] | None:
    """Each job's GPUs as state.json holds them, once every job there has some."""
    jobs = json.loads((root / "state.json").read_text())["jobs"]
    given = {name: list(j.get("gpus") or []) for name, j in jobs.items()}
    return given if given and all(given.values()) else None


@pytest.mark.e2e
async def test_the_daemon_process_runs_one_job_per_gpu(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster: Callable[..., Awaitable[SimCluster]],
    daemons: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """`vastd run` with `jobs_per_instance = "gpus"` in its config file, on a simulated
    instance whose nvidia-smi lists 4 GPUs (the API: 2): the health check reports them
    (`instance_gpus`), four jobs run at once, each saved with its own GPU and seeing it
    as CUDA_VISIBLE_DEVICES; all end done."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_nvidia_smi(tmp_path, monkeypatch, [f"{i}, 3, 5, 24564" for i in range(4)])
    sim = await cluster()
    iid = str(await sim.cloud.add_instance(num_gpus=2))
    job = {"command": GPU_JOB, "result_glob": "out/*.gpu", "validate": "none"}
    job |= {"jobs_per_instance": "gpus", "poll_interval_s": 0.5}
    config, root = write_config(sim, tmp_path, job=job, fleet={"health_interval_s": 0.5})
    assert '"jobs_per_instance" = "gpus"' in config.read_text()
    daemon = await daemons(config)
    await daemon.wait_event("instance_gpus", gpus=4, instance=iid)
    sources = load_make_jobs()(tmp_path / "jobs", 4, 2, 5, prefix="gpu_job")
    await submit(config, sources)
    await async_wait_for(
        lambda: len({e["job"] for e in daemon.events("job_started")}) == 4,
        30,
        message=lambda: f"four started: {daemon.tail()}",
    )
    saved = await async_wait_for(lambda: saved_gpus(root), 10, message="gpus saved")
    assert sorted(saved.values()) == [[0], [1], [2], [3]]
    assert sorted(e["gpus"] for e in daemon.events("job_dispatched")) == ["0", "1", "2", "3"]
    gate = sim.remote_root / iid
    gate.mkdir(parents=True, exist_ok=True)
    (gate / "go").touch()
    await async_wait_for(
        lambda: all((root / "done" / p.name).is_file() for p in sources),
        60,
        message=lambda: f"all done: {daemon.tail()}",
    )
    assert await daemon.stop() == 0
    seen = sorted(
        next((root / "results" / p.stem).rglob("cvd.gpu")).read_text().strip() for p in sources
    )
    assert seen == ["0", "1", "2", "3"]
