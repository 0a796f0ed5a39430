"""The context every loop and workflow takes: the daemon's resources, frozen.

No globals: `build_context(settings, **overrides)` makes the one Context that
`vastd run` uses, and the tests' too (with a store, pool, API or timings of their
own). The Context holds resources (settings, layout, store, SSH pool, API client,
scheduler, the TaskSet that starts every background task, the Backoff every retry
uses); the subsystems' working state (jobs being dispatched, watchers, preparations)
lives in their own small holders, reached through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from vastd.core.files import Layout
from vastd.core.ssh import Endpoint, SSHPool
from vastd.core.state import InstanceRecord, StateStore
from vastd.instances.listing import SharedListing
from vastd.instances.provider import CloudProvider
from vastd.instances.vast_api import LIST_INSTANCES, VastClient
from vastd.instances.vast_provider import VastProvider
from vastd.orchestration.scheduler import Scheduler
from vastd.utils.config import Settings
from vastd.utils.exceptions import ConfigError
from vastd.utils.logging import RepeatedFailures, get_logger, register_secret
from vastd.utils.looplag import LoopLagMonitor
from vastd.utils.supervise import Backoff, TaskSet

log = get_logger("vastd")


class StoreHostKeys:
    """The SSH pool's HostKeyStore, backed by the snapshot (keys survive restarts)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def get_pinned_host_key(self, instance_id: str) -> str | None:
        inst = self.store.instances.get(instance_id)
        return inst.host_key if inst is not None else None

    def pin_host_key(self, instance_id: str, key: str) -> None:
        inst = self.store.instances.get(instance_id)
        if inst is not None:
            inst.host_key = key
            self.store.mark_dirty()


@dataclass
class Dispatch:
    """The dispatcher's working state: jobs whose upload/start is under way, its wakeup.

    A claim is for one run: a dispatch of an older run that ends late releases only
    its own claim, never the claim of the run that replaced it.
    """

    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # job id -> the run whose start is under way (the watcher leaves it alone until then)
    in_flight: dict[str, str | None] = field(default_factory=dict)

    def claim(self, job_id: str, run_id: str | None) -> None:
        self.in_flight[job_id] = run_id

    def release(self, job_id: str, run_id: str | None) -> None:
        if job_id in self.in_flight and self.in_flight[job_id] == run_id:
            del self.in_flight[job_id]


class KeyedLocks:
    """One asyncio.Lock per key, forgotten once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]

    def locked(self, key: Hashable) -> bool:
        """Whether someone holds the key now (to skip, rather than wait)."""
        lock = self._locks.get(key)
        return lock is not None and lock.locked()


@dataclass(frozen=True)
class Context:
    settings: Settings
    layout: Layout
    store: StateStore
    pool: SSHPool
    cloud: CloudProvider | None  # None: no cloud API (tests of the SSH side only)
    scheduler: Scheduler = field(default_factory=Scheduler)
    tasks: TaskSet = field(default_factory=TaskSet)
    backoff: Backoff = field(default_factory=Backoff)
    dispatch: Dispatch = field(default_factory=Dispatch)
    # (instance, job): a job's remote folder is uploaded into, started in, or removed by
    # one task at a time (a clean-up of an older run never races a new run's upload)
    remote_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # job: one collection (download, validation, install into results/<job>/) at a time
    job_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # instance: one re-attach of the SSH key at a time (market.reattach_key)
    key_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # instance -> when a drained instance's job folders may next be swept (followups.py)
    sweeps: dict[str, float] = field(default_factory=dict)
    # per instance: the task watching its jobs, the task preparing it
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    preparing: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # how long the remote status command may wait for an exit before answering
    # (default: [job] poll_interval_s)
    watch_wait_s: float = -1.0
    # the event loop's lag, measured by the `loop_lag` supervisor (utils/looplag.py)
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    # the cycle's instance listing: discovery takes it, destroy confirmations reuse it
    listing: SharedListing = field(default_factory=SharedListing)
    # failures that repeat each cycle (API listing, offer search): logged once per change
    repeats: RepeatedFailures = field(default_factory=RepeatedFailures)
    # instances with fewer GPUs than `[job] gpus_per_job` (no slot): logged once each
    gpu_shortfalls: set[str] = field(default_factory=set)
    # staged runs whose run before has ended without starting them: since when (monotonic)
    staged_waiting: dict[str, float] = field(default_factory=dict)
    # job -> (run, its folder's listing) as the status that saw the run exit 0 printed it:
    # the collection that follows lists nothing itself (taken by its first attempt)
    listed: dict[str, tuple[str | None, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.watch_wait_s < 0:
            object.__setattr__(self, "watch_wait_s", self.settings.job.poll_interval_s)

    @property
    def dispatching(self) -> dict[str, str | None]:
        return self.dispatch.in_flight

    @property
    def dispatch_wakeup(self) -> asyncio.Event:
        return self.dispatch.wakeup

    def spawn(self, coro: Any, *, name: str) -> asyncio.Task[None]:
        """A background task (through the TaskSet: its crash is logged, never silent)."""
        return self.tasks.spawn(coro, name=name)

    def wake_dispatch(self) -> None:
        self.dispatch.wakeup.set()

    def endpoints(self, inst: InstanceRecord) -> list[Endpoint]:
        """The SSH endpoints to try for an instance, per `[ssh] endpoint`."""
        proxy = Endpoint(inst.ssh_host, inst.ssh_port) if inst.ssh_host and inst.ssh_port else None
        direct = (
            Endpoint(inst.public_ipaddr, inst.direct_port)
            if inst.public_ipaddr and inst.direct_port
            else None
        )
        mode = self.settings.ssh.endpoint
        if mode == "proxy":
            order = [proxy]
        elif mode == "direct":
            order = [direct]
        else:
            order = [direct, proxy]
        out: list[Endpoint] = []
        for ep in order:
            if ep is not None and ep not in out:
                out.append(ep)
        return out

    async def drain(self, timeout_s: float) -> None:
        """Give the background tasks (uploads, collections, clean-ups) a bounded time."""
        await self.tasks.wait_all(timeout_s)

    async def aclose(self) -> None:
        """Cancel what the context started and wait for it, bounded (resources stay open)."""
        await self.tasks.cancel_all(timeout_s=5.0)
        self.watchers.clear()
        self.preparing.clear()


_UNSET: Any = object()
LIST_MIN_INTERVAL_S = 2.0  # at most, between two listings (half the poll interval if less)


def build_context(
    settings: Settings,
    *,
    client_keys: list[asyncssh.SSHKey] | None = None,
    store: StateStore | None = None,
    pool: SSHPool | None = None,
    api: VastClient | None = _UNSET,
    cloud: CloudProvider | None = _UNSET,
    **overrides: Any,
) -> Context:
    """The Context `vastd run` uses: the snapshot, vast.ai as a CloudProvider, the SSH pool.

    Tests pass their own `store`, `pool`, `api` (a VastClient, wrapped) or `cloud`
    (`api=None`: no cloud, no key needed) and any other Context field (`backoff`,
    `watch_wait_s`, ...) as overrides.
    """
    layout = Layout(settings.paths.root)  # the callers created it before locking it
    if store is None:
        store = StateStore.open(layout.state_file)
    if cloud is not _UNSET:
        api = None
    elif api is _UNSET:
        api_key = settings.api_key()
        if not api_key:
            raise ConfigError(
                [
                    "vast.api_key: no vast.ai API key (set VASTD_VAST__API_KEY or "
                    "VAST_API_KEY, or write it to [vast] api_key_file)"
                ]
            )
        register_secret(api_key)
        api = VastClient(
            settings.vast.api_url,
            api_key,
            timeout_s=settings.vast.request_timeout_s,
            max_retries=settings.vast.max_retries,
            # the listing is the heaviest call: never more often than this, whoever asks
            min_interval_s={
                LIST_INSTANCES: min(LIST_MIN_INTERVAL_S, settings.vast.poll_interval_s / 2)
            },
        )
    if pool is None:
        pool = SSHPool(settings.ssh, client_keys=client_keys, host_keys=StoreHostKeys(store))
    if cloud is _UNSET:
        cloud = VastProvider(api) if api is not None else None
    return Context(settings, layout, store, pool, cloud, **overrides)


async def close_context(ctx: Context) -> None:
    """Stop the context's tasks, save, close connections and the API session (each runs)."""
    try:
        await ctx.aclose()
        await ctx.store.flush()
    finally:
        try:
            await ctx.pool.aclose()
        finally:
            if ctx.cloud is not None:
                await ctx.cloud.aclose()
