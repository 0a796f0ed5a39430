"""The explicit context every loop and workflow takes: settings, store, pool, API.

No globals: the daemon builds one Context and hands it down; tests build their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from vastd.core.files import Layout
from vastd.core.ssh import Endpoint, SSHPool
from vastd.core.state import InstanceRecord, StateStore
from vastd.daemon_lock import RootLock
from vastd.instances.vast_api import VastClient
from vastd.orchestration.scheduler import Scheduler
from vastd.utils.config import Settings
from vastd.utils.exceptions import ConfigError
from vastd.utils.logging import get_logger, register_secret

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
class Context:
    settings: Settings
    layout: Layout
    store: StateStore
    pool: SSHPool
    api: VastClient | None
    scheduler: Scheduler = field(default_factory=Scheduler)
    dispatch_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # jobs whose upload/start is under way (the watcher leaves them alone)
    dispatching: set[str] = field(default_factory=set)
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    preparing: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    # how long the remote status command may wait for an exit before answering
    # (default: [job] poll_interval_s)
    watch_wait_s: float = -1.0

    def __post_init__(self) -> None:
        if self.watch_wait_s < 0:
            self.watch_wait_s = self.settings.job.poll_interval_s

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """A background task the context owns; its crash is logged, never silent."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_crashed", task=task.get_name(), error=repr(exc), exc_info=exc)

    def wake_dispatch(self) -> None:
        self.dispatch_wakeup.set()

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
        tasks = list(self.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def aclose(self) -> None:
        """Cancel what the context spawned and wait for it, bounded (resources stay open)."""
        tasks = [*self.tasks, *self.watchers.values(), *self.preparing.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*tasks, return_exceptions=True)


def build_context(
    settings: Settings, *, client_keys: list[asyncssh.SSHKey] | None = None
) -> Context:
    """The snapshot, API client and SSH pool that `vastd run` uses, as one Context."""
    api_key = settings.api_key()
    if not api_key:
        raise ConfigError(
            [
                "vast.api_key: no vast.ai API key (set VASTD_VAST__API_KEY or "
                "VAST_API_KEY, or write it to [vast] api_key_file)"
            ]
        )
    register_secret(api_key)
    layout = Layout(settings.paths.root)  # the callers created it before locking it
    store = StateStore.open(layout.state_file)
    api = VastClient(
        settings.vast.api_url,
        api_key,
        timeout_s=settings.vast.request_timeout_s,
        max_retries=settings.vast.max_retries,
    )
    pool = SSHPool(settings.ssh, client_keys=client_keys, host_keys=StoreHostKeys(store))
    ctx = Context(settings, layout, store, pool, api)
    return ctx


async def close_context(ctx: Context) -> None:
    """Stop the context's tasks, save, close connections and the API session (each runs)."""
    try:
        await ctx.aclose()
        await ctx.store.flush()
    finally:
        try:
            await ctx.pool.aclose()
        finally:
            if ctx.api is not None:
                await ctx.api.aclose()


@contextlib.asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    client_keys: list[asyncssh.SSHKey] | None = None,
    recover: bool = True,
) -> AsyncIterator[Context]:
    """A Context built as `vastd run` builds one, closed afterwards (for library use).

    With `recover`, the snapshot is reconciled with the folders first, as at daemon
    start-up. It takes the root's lock, so it refuses the root of a running daemon.
    """
    from vastd.orchestration.workflow import recover_after_restart  # workflow imports us

    Layout(settings.paths.root).ensure()
    lock = RootLock(settings.paths.root)
    lock.acquire()
    try:
        ctx = build_context(settings, client_keys=client_keys)
        try:
            if recover:
                recover_after_restart(ctx)
                await ctx.store.flush()
            yield ctx
        finally:
            await close_context(ctx)
    finally:
        lock.release()
