"""A small factory of Contexts against a SimCluster, for the loop-step tests.

`SimEnv(tmp_path)` starts a simulated account (`await env.start(instances=M)`), builds
Contexts the way `Daemon.startup()` does (Layout, StateStore.open, VastClient, SSHPool
with StoreHostKeys) with short timings, and closes everything at `aclose()`: the
contexts, their pools and API clients, the cluster, and any remote job process group
still alive under the cluster's remote root (detached jobs outlive their SSH host).

Use it through a three-line fixture in each test module:

    @pytest.fixture
    async def env(tmp_path):
        async with SimEnv(tmp_path) as e:
            yield e
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers import async_wait_for
from vastd.core.files import JobFolder, Layout
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceStatus, JobRecord, JobState, StateStore
from vastd.core.submit import submit_file
from vastd.execution.job_runner import remote_job_paths
from vastd.instances.vast_api import VastClient
from vastd.orchestration import coordinator as co
from vastd.orchestration.context import Context, StoreHostKeys, build_context
from vastd.orchestration.workflow import (
    accept_inbox_file,
    coordinate_instance_preparation,
    discovery_once,
    loop_steps,
    run_due_tasks,
)
from vastd.sim.cluster import SimCluster, examples_dir, load_make_jobs
from vastd.utils.config import PrepareStep, Settings
from vastd.utils.supervise import Backoff

WORKER = f"{shlex.quote(sys.executable)} {shlex.quote(str(examples_dir() / 'garch_worker.py'))}"
# The example worker, quick: a few rows, few paths.
WORKER_COMMAND = f"{WORKER} {{input}} --num_sim 500 --num_quantiles 16 --stride 1"
# A job that waits until its instance's remote folder holds a `go` file (see open_gate):
# the test, not the clock, decides when it runs on.
GATE = "until [ -e ../../go ]; do sleep 0.05; done"
GATED_WORKER = f"{GATE}; {WORKER_COMMAND}"


class SimEnv:
    """A SimCluster plus Contexts built on it; everything closed by `aclose()`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cluster: SimCluster | None = None
        self.contexts: list[Context] = []
        self._jobs_made = 0
        self._groups: set[int] = set()

    async def __aenter__(self) -> SimEnv:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the cluster -----------------------------------------------------------------------
    async def start(self, instances: int = 2, **kwargs: Any) -> SimCluster:
        self.cluster = await SimCluster.start(self.tmp_path / "sim", instances=instances, **kwargs)
        return self.cluster

    @property
    def sim(self) -> SimCluster:
        assert self.cluster is not None, "call env.start() first"
        return self.cluster

    def instance_ids(self) -> list[str]:
        return sorted(str(i) for i in self.sim.cloud.instances)

    def settings(self, root: Path | None = None, **sections: dict[str, Any]) -> Settings:
        """Short timings; `sections` update the defaults section by section."""
        base: dict[str, dict[str, Any]] = {
            "vast": {"poll_interval_s": 0.5, "lost_grace_s": 1.0, "max_retries": 1},
            "ssh": {
                "command_timeout_s": 10.0,
                "unreachable_grace_s": 1.5,
                "connect_timeout_s": 3.0,
            },
            "job": {
                "command": WORKER_COMMAND,
                "poll_interval_s": 0.5,
                "timeout_s": 120,
                "max_attempts": 2,
            },
        }
        merged: dict[str, Any] = dict(base)
        for name, values in sections.items():
            if isinstance(values, dict):
                merged[name] = {**base.get(name, {}), **values}
            else:
                merged[name] = values
        return self.sim.settings(root or self.tmp_path / "vastd", **merged)

    # --- contexts ----------------------------------------------------------------------------
    def context(self, settings: Settings | None = None, *, api: bool = True) -> Context:
        """A Context as Daemon.startup() builds it (no recovery, no loops started)."""
        settings = settings or self.settings()
        layout = Layout(settings.paths.root)
        layout.ensure()
        store = StateStore.open(layout.state_file, coalesce_s=0.05)
        client = (
            VastClient(
                settings.vast.api_url,
                self.sim.api_key,
                timeout_s=5.0,
                max_retries=settings.vast.max_retries,
                backoff_base_s=0.0,
                backoff_max_s=0.0,
            )
            if api
            else None
        )
        pool = SSHPool(settings.ssh, host_keys=StoreHostKeys(store), backoff=Backoff.zero())
        ctx = build_context(settings, store=store, pool=pool, api=client, backoff=Backoff.zero())
        self.contexts.append(ctx)
        return ctx

    async def close_context(self, ctx: Context) -> None:
        """Cancel what the context runs and close its pool and client (no final save)."""
        with contextlib.suppress(Exception):
            await ctx.aclose()
        with contextlib.suppress(Exception):
            await ctx.pool.aclose()
        if ctx.cloud is not None:
            with contextlib.suppress(Exception):
                await ctx.cloud.aclose()
        if ctx in self.contexts:
            self.contexts.remove(ctx)

    def open_gate(self, instance_id: str) -> None:
        """Let GATE-d jobs on this instance go on."""
        folder = self.sim.remote_root / instance_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "go").touch()

    def track_group(self, pgid: int) -> None:
        """A remote process group to SIGKILL at teardown (its pid file may be gone)."""
        self._groups.add(pgid)

    async def aclose(self) -> None:
        for pgid in self._groups:
            with contextlib.suppress(OSError):
                if pgid > 1:
                    os.killpg(pgid, signal.SIGKILL)
        for ctx in list(self.contexts):
            await self.close_context(ctx)
        if self.cluster is not None:
            try:
                await self.cluster.aclose()
            finally:
                kill_remote_jobs(self.cluster.remote_root)

    # --- jobs --------------------------------------------------------------------------------
    def make_job_files(self, n: int, rows: int = 2, prefix: str = "garch_test_job") -> list[Path]:
        folder = self.tmp_path / f"jobs{self._jobs_made}"
        self._jobs_made += 1
        files: list[Path] = load_make_jobs()(folder, n, rows, 7 + self._jobs_made, prefix=prefix)
        return files

    async def submit(self, ctx: Context, n: int = 1, rows: int = 2, **kw: Any) -> list[str]:
        """Accept `n` fresh job files through the inbox; returns their ids in order."""
        return [await self.submit_file(ctx, p) for p in self.make_job_files(n, rows, **kw)]

    async def submit_file(self, ctx: Context, path: Path) -> str:
        """Put one file through the inbox and accept it; returns the job id."""
        await accept_inbox_file(ctx, submit_file(ctx.layout, path))
        assert path.stem in ctx.store.jobs, f"{path.name} was refused"
        return path.stem

    async def ready(
        self, ctx: Context, count: int | None = None, timeout_s: float = 15
    ) -> list[str]:
        """Discover and prepare instances until `count` (default: all listed) are READY."""
        want = len(self.sim.cloud.instances) if count is None else count
        await discovery_once(ctx)
        coordinate_instance_preparation(ctx)
        tasks = [t for t in ctx.preparing.values() if not t.done()]
        if tasks:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*tasks)
        ready = sorted(
            i.id for i in ctx.store.instances.values() if i.status is InstanceStatus.READY
        )
        assert len(ready) >= want, {i.id: i.status for i in ctx.store.instances.values()}
        return ready


async def pump(
    ctx: Context,
    predicate: Callable[[], object],
    timeout_s: float = 20.0,
    *,
    dispatch: bool = True,
    message: str | Callable[[], str] = "",
) -> None:
    """Drive dispatch and scheduled collections (what the loops would do) until `predicate`."""
    deadline = time.monotonic() + timeout_s

    def text() -> str:
        base = message() if callable(message) else message
        jobs = {j.id: (j.state.value, j.instance, j.attempts) for j in ctx.store.jobs.values()}
        return f"{base} jobs={jobs}"

    steps = loop_steps(ctx)
    # The deadline is checked between steps; a step that never returns fails at this
    # bound instead, with the stack it is stuck in.
    bound = asyncio.timeout(timeout_s + STEP_GRACE_S)
    try:
        async with bound:
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"condition not met within {timeout_s}s: {text()}")
                if dispatch:
                    await steps.dispatch()
                co.handle_system_failures(ctx)  # the preparation loop's sweep of unwatched jobs
                await run_due_tasks(ctx)  # the tasks loop: collections that are due
                # The follow-ups loop's step, once the saver would have written.
                if ctx.store.snapshot.followups and await ctx.store.flush():
                    await saving_while(ctx, steps.followups())
                await asyncio.sleep(0.05)
    except TimeoutError as exc:
        if not bound.expired():
            raise
        raise AssertionError(f"a step did not return within {timeout_s}s: {text()}") from exc


STEP_GRACE_S = 30.0


async def saving_while(ctx: Context, step: Coroutine[Any, Any, object]) -> None:
    """Await `step` while doing the saver's part, as the daemon would: write what changed
    every `coalesce_s`. The follow-ups step waits until every change made so far is on
    disk, and the jobs' watchers (tasks of their own) go on changing the store meanwhile:
    without a saver, a change that lands during the last write is never written and the
    step waits forever."""
    task = asyncio.ensure_future(step)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=max(ctx.store.coalesce_s, 0.05))
            if not task.done():
                await ctx.store.flush()
    finally:
        task.cancel()
    task.result()


async def wait_state(
    ctx: Context, job_id: str, *states: JobState, timeout_s: float = 30
) -> JobRecord:
    job = ctx.store.jobs[job_id]
    await pump(ctx, lambda: job.state in states, timeout_s, message=f"{job_id} -> {states}")
    return job


async def wait_saved(ctx: Context) -> None:
    """Write whatever changed (what the saver would do), bounded."""
    async with asyncio.timeout(10):
        assert await ctx.store.flush()


def group_alive(pgid: int) -> bool:
    """Whether the process group has a member that is not a zombie (pid 1 may not reap)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def remote_dir(ctx: Context, instance_id: str, job_id: str) -> Path:
    return Path(remote_job_paths(ctx.settings.remote.root, instance_id, job_id).job_dir)


def job_file_in(ctx: Context, job_id: str) -> list[str]:
    """The folders holding the job's CSV (there must be exactly one)."""
    return [f.value for f in JobFolder if ctx.layout.job_file(f, job_id).exists()]


def kill_remote_jobs(remote_root: Path) -> int:
    """SIGKILL every live job process group recorded under `remote_root` (teardown)."""
    killed = 0
    for pid_file in remote_root.glob("*/jobs/*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pgid = int(pid_file.read_text().strip())
            # Only a group whose leader still sits in that job folder (never a reused pid).
            if pgid > 1 and os.readlink(f"/proc/{pgid}/cwd") == str(pid_file.parent.resolve()):
                os.killpg(pgid, signal.SIGKILL)
                killed += 1
    return killed


def prepare_step(name: str, check: str, install: str, timeout_s: float = 20) -> dict[str, Any]:
    return PrepareStep(name=name, check=check, install=install, timeout_s=timeout_s).model_dump()


__all__ = [
    "GATE",
    "GATED_WORKER",
    "WORKER",
    "WORKER_COMMAND",
    "SimEnv",
    "async_wait_for",
    "group_alive",
    "job_file_in",
    "kill_remote_jobs",
    "prepare_step",
    "pump",
    "remote_dir",
    "wait_saved",
    "wait_state",
]
