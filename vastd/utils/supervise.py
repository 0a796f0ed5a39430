"""Retries and supervision: `Backoff` for every retry, `run_loop` for every loop step,
`TaskSet` as the one starter of background tasks.

A crash is always logged and recorded, never silent; cancellation always propagates.
Tests pass `Backoff.zero()` to retry at once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from vastd.utils.logging import get_logger
from vastd.utils.metrics import beat

log = get_logger("vastd.supervise")

Jitter = Literal["full", "equal", "none"]
CoroFactory = Callable[[], Coroutine[Any, Any, object]]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt n (0-based) waits up to `min(max_s, base_s * factor**n)`.

    Jitter "full" draws from [0, cap] (AWS's full jitter), "equal" from [cap/2, cap],
    "none" waits the cap. The defaults are those of core/ssh.py's Backoff.
    """

    base_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        for what, value in (("base_s", self.base_s), ("max_s", self.max_s)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Backoff.{what} must be finite and >= 0, not {value!r}")
        if not math.isfinite(self.factor) or self.factor < 1:
            raise ValueError(f"Backoff.factor must be finite and >= 1, not {self.factor!r}")
        if self.jitter not in ("full", "equal", "none"):
            raise ValueError(f"Backoff.jitter must be full, equal or none, not {self.jitter!r}")

    @classmethod
    def zero(cls) -> Backoff:
        """No wait at all (for tests)."""
        return cls(base_s=0.0, max_s=0.0, jitter="none")

    def cap_s(self, attempt: int) -> float:
        """The longest wait before retry `attempt` (0-based; negative counts as 0)."""
        if self.base_s == 0 or self.max_s == 0:
            return 0.0
        try:
            return min(self.max_s, self.base_s * self.factor ** max(0, attempt))
        except OverflowError:
            return self.max_s

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry `attempt`, jittered; `rng` makes it reproducible."""
        cap = self.cap_s(attempt)
        if cap == 0 or self.jitter == "none":
            return cap
        uniform = (rng or random).uniform
        if self.jitter == "equal":
            return cap / 2 + uniform(0, cap / 2)
        return uniform(0, cap)


# A failing loop step: 1 s, 2 s, 4 s ... up to 60 s, never less than half of that
# (today's workflow.run_loop formula: min(60, 0.5 * 2**failures) * U(0.5, 1)).
LOOP_BACKOFF = Backoff(base_s=1.0, max_s=60.0, jitter="equal")
# A supervised task restarted after a crash.
RESTART_BACKOFF = Backoff(base_s=1.0, max_s=60.0, jitter="equal")


async def run_loop(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    interval_s: float,
    wakeup: asyncio.Event | None = None,
    backoff: Backoff = LOOP_BACKOFF,
) -> None:
    """Call `step` every `interval_s` (sooner when `wakeup` is set); survive its crashes.

    A crash is logged as `loop_step_failed` and the step retried after `backoff`; the
    first success after crashes logs `loop_recovered`. Cancellation propagates.
    """
    failures = 0
    while True:
        if wakeup is not None:
            wakeup.clear()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            log.error(
                "loop_step_failed", loop=name, error=repr(exc), failures=failures, exc_info=exc
            )
            await asyncio.sleep(backoff.delay_s(failures - 1))
            continue
        beat(name)  # /healthz: this loop makes progress
        if failures:
            log.info("loop_recovered", loop=name, failures=failures)
            failures = 0
        if wakeup is None:
            await asyncio.sleep(interval_s)
        else:
            try:
                async with asyncio.timeout(interval_s):
                    await wakeup.wait()
            except TimeoutError:
                pass


@dataclass(frozen=True)
class Crash:
    """The latest crash of a task: its name, the error's repr, and when (epoch s)."""

    name: str
    error: str
    at: float


@dataclass
class _Entry:
    name: str
    supervised: bool
    restarts: int = 0


@dataclass(eq=False)
class TaskSet:
    """Starts, supervises and stops background tasks.

    With `group`, tasks are created in that TaskGroup (the daemon owns it), else on the
    running loop. Either way a task's exception is caught at its top: logged as
    `task_crashed`, recorded in `crashed` / `last_crash`, and never passed on, so one
    crash cannot cancel a TaskGroup's other tasks. A spawned task's result is dropped.
    """

    group: asyncio.TaskGroup | None = None
    backoff: Backoff = RESTART_BACKOFF
    # A supervised run that lasted this long was healthy: the next crash waits from scratch.
    healthy_s: float = 60.0
    crashed: dict[str, str] = field(default_factory=dict)
    last_crash: Crash | None = None
    crash_count: int = 0
    _tasks: dict[asyncio.Task[None], _Entry] = field(default_factory=dict, repr=False)

    def spawn(
        self,
        coro: Coroutine[Any, Any, object] | CoroFactory,
        *,
        name: str,
        restart: bool = False,
    ) -> asyncio.Task[None]:
        """Start `coro` (a coroutine, or a function making one) as task `name`.

        With `restart`, `coro` must be the function: after a crash it is called again
        after `backoff` (supervised); a normal return ends it; cancel ends it quietly.
        """
        if restart and isinstance(coro, Coroutine):
            coro.close()
            raise TypeError("restart=True needs a function that makes the coroutine")
        entry = _Entry(name, supervised=restart)
        inner: Coroutine[Any, Any, object] | None = None
        runner: Coroutine[Any, Any, None]
        if isinstance(coro, Coroutine):
            inner = coro
            runner = self._run_once(entry, inner)
        elif restart:
            runner = self._supervise(entry, coro)
        else:
            inner = coro()
            runner = self._run_once(entry, inner)
        try:
            if self.group is not None:
                task = self.group.create_task(runner, name=name)
            else:
                task = asyncio.get_running_loop().create_task(runner, name=name)
        except BaseException:
            # Nothing will await them now: close both, or each warns "never awaited".
            runner.close()
            if inner is not None:
                inner.close()
            raise
        self._tasks[task] = entry
        task.add_done_callback(functools.partial(self._forget, inner))
        return task

    def _forget(self, inner: Coroutine[Any, Any, object] | None, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if inner is not None and inspect.getcoroutinestate(inner) == inspect.CORO_CREATED:
            # Cancelled before its first step: the runner never awaited it, nothing will.
            inner.close()

    def _record(self, entry: _Entry, exc: Exception) -> None:
        crash = Crash(entry.name, repr(exc), time.time())
        self.crashed[entry.name] = crash.error
        self.last_crash = crash
        self.crash_count += 1

    async def _run_once(self, entry: _Entry, coro: Coroutine[Any, Any, object]) -> None:
        try:
            await coro
        except Exception as exc:
            self._record(entry, exc)
            log.error("task_crashed", task=entry.name, error=repr(exc), exc_info=exc)

    async def _supervise(self, entry: _Entry, factory: CoroFactory) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                await factory()
                return
            except Exception as exc:
                self._record(entry, exc)
                if loop.time() - started >= self.healthy_s:
                    attempt = 0
                delay_s = self.backoff.delay_s(attempt)
                attempt += 1
                entry.restarts += 1
                log.error(
                    "task_crashed",
                    task=entry.name,
                    error=repr(exc),
                    restart_in_s=round(delay_s, 3),
                    restarts=entry.restarts,
                    exc_info=exc,
                )
            await asyncio.sleep(delay_s)

    def names(self) -> list[str]:
        """The names of the tasks still running, sorted (a name may repeat)."""
        return sorted(e.name for e in self._tasks.values())

    def restarts(self, name: str) -> int:
        """How often the running supervised task(s) called `name` were restarted."""
        return sum(e.restarts for e in self._tasks.values() if e.name == name)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait_all(self, timeout_s: float) -> list[str]:
        """Let the one-shot tasks finish (graceful drain), at most `timeout_s`.

        Also waits for tasks they spawn meanwhile. Supervised tasks only end when
        cancelled, so they are not waited for. Returns the names still running.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            pending = [t for t, e in self._tasks.items() if not e.supervised and not t.done()]
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                return sorted(self._tasks[t].name for t in pending if t in self._tasks)
            await asyncio.wait(pending, timeout=remaining)

    async def cancel_all(self, timeout_s: float) -> list[str]:
        """Cancel every task and wait at most `timeout_s`; names of those that refused.

        A task still running at half the time is cancelled once more (one that swallowed
        the first cancel gets a second chance). The stacks of refusers are logged.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s / 2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout_s / 2)
        refused = [t for t in tasks if not t.done()]
        for task in refused:
            log.warning("task_refused_to_exit", task=task.get_name(), stack=task_stack(task))
        return sorted(t.get_name() for t in refused)


def task_stack(task: asyncio.Task[Any], limit: int = 8) -> list[str]:
    """Where a suspended task waits, outermost first, as `file:line function`.

    `Task.get_stack()` shows only the outermost frame of a suspended task (here always
    the TaskSet's wrapper); this follows the chain of awaited coroutines down instead.
    """
    where: list[str] = []
    obj: Any = task.get_coro()
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return where[-limit:]
