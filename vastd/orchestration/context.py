"""The explicit context every loop and workflow takes: settings, store, pool, API.

No globals: the daemon builds one Context and hands it down; tests build their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from vastd.core.files import Layout
from vastd.core.ssh import Endpoint, SSHPool
from vastd.core.state import InstanceRecord, StateStore
from vastd.instances.vast_api import VastClient
from vastd.orchestration.scheduler import Scheduler
from vastd.utils.config import Settings
from vastd.utils.logging import get_logger

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
class Counters:
    """What happened since start: for `status`, the demo summary and benchmarks."""

    accepted: int = 0
    refused: int = 0
    dispatched: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    loop_crashes: int = 0


@dataclass
class Context:
    settings: Settings
    layout: Layout
    store: StateStore
    pool: SSHPool
    api: VastClient | None
    scheduler: Scheduler = field(default_factory=Scheduler)
    dispatch_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    counters: Counters = field(default_factory=Counters)
    # jobs whose upload/start is under way (the watcher leaves them alone)
    dispatching: set[str] = field(default_factory=set)
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    preparing: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    collecting: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    # how long the remote status command may wait for an exit before answering
    watch_wait_s: float = 5.0

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
            self.counters.loop_crashes += 1
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
        """Cancel what the context spawned and wait for it, bounded."""
        tasks = [*self.tasks, *self.watchers.values(), *self.preparing.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*tasks, return_exceptions=True)
