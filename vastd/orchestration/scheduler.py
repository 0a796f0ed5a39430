"""Task scheduling: a delay-aware priority queue of follow-up work.

Dispatch itself is event driven (a queued job and a free instance meet in
`coordinate_job_distribution`), and so is preparation (`coordinate_instance_preparation`
honours each instance's back-off); the scheduler holds the work that must happen
later or again: collecting a job's results, re-trying a collection after a
network or disk error.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from vastd.utils.supervise import Backoff

# a collection that could not finish: 2 s, 4 s, ... up to a minute
RETRY_BACKOFF = Backoff(base_s=2.0, max_s=60.0, jitter="none")


class TaskType(StrEnum):
    COLLECT_RESULTS = "collect_results"


@dataclass
class Task:
    type: TaskType
    args: dict[str, Any]
    id: str = ""
    attempts: int = 0
    due: float = 0.0
    priority: int = 0

    @property
    def key(self) -> str:
        """Tasks with the same key are the same work: scheduling one twice is a no-op."""
        return f"{self.type}:{sorted(self.args.items())}"


@dataclass
class Scheduler:
    _heap: list[tuple[float, int, int, Task]] = field(default_factory=list)
    # tasks whose time has come, by (priority, seq): priority decides among due tasks
    _ready: list[tuple[int, int, Task]] = field(default_factory=list)
    _pending: dict[str, Task] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    completed: int = 0

    def __len__(self) -> int:
        return len(self._pending)

    def schedule_task(self, task: Task, priority: int = 0, delay_s: float = 0.0) -> bool:
        """Queue a task (lower priority runs first); False if the same work is queued."""
        if task.key in self._pending:
            return False
        seq = next(self._counter)
        task.id = task.id or f"{task.type}-{seq}"
        task.priority = priority
        task.due = time.monotonic() + max(0.0, delay_s)
        self._pending[task.key] = task
        heapq.heappush(self._heap, (task.due, priority, seq, task))
        self._changed.set()
        return True

    def pending(self, task_type: TaskType | None = None) -> list[Task]:
        return [t for t in self._pending.values() if task_type is None or t.type is task_type]

    def pop_due(self, now: float | None = None) -> Task | None:
        """The next due task, or None."""
        now = time.monotonic() if now is None else now
        while self._heap and self._heap[0][0] <= now:
            _due, priority, seq, task = heapq.heappop(self._heap)
            heapq.heappush(self._ready, (priority, seq, task))
        if self._ready:
            task = heapq.heappop(self._ready)[2]
            self._pending.pop(task.key, None)
            return task
        return None

    async def get_next_task(self) -> Task:
        """Wait for the next task whose time has come."""
        while True:
            task = self.pop_due()
            if task is not None:
                return task
            self._changed.clear()
            timeout = self._heap[0][0] - time.monotonic() if self._heap else None
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def mark_task_completed(self, task: Task) -> None:
        self.completed += 1

    def reschedule_failed_task(self, task: Task, delay: timedelta) -> bool:
        task.attempts += 1
        return self.schedule_task(task, task.priority, delay.total_seconds())


def create_task(task_type: TaskType, **kwargs: Any) -> Task:
    return Task(type=task_type, args=kwargs)


def schedule_result_collection(scheduler: Scheduler, job_id: str, delay_s: float = 0.0) -> bool:
    return scheduler.schedule_task(create_task(TaskType.COLLECT_RESULTS, job=job_id), 0, delay_s)


def retry_delay(attempt: int) -> timedelta:
    """How long follow-up work that could not finish waits before its next try."""
    return timedelta(seconds=RETRY_BACKOFF.delay_s(attempt))
