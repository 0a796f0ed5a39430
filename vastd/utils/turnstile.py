"""A bound on how many tasks take their next step in one turn of the event loop.

asyncio runs every callback that is ready when a loop iteration starts before it looks
at a timer again. When the answers of tens of remote commands arrive together (the jobs
of a wave start and end together), tens of tasks are woken at once and all take their
next step (parse a status, apply transitions, log, send the next request) in a single
iteration: 40-60 ms in which nothing else runs, the event-loop lag's p99 at scale.

`Turnstile.passage()` lets at most `per_turn` tasks through per loop turn; the others
wait, in arrival order, for the turns after it. Each wait is one loop turn for each
`per_turn` tasks ahead of it, and in between the loop looks at its timers and sockets.
A turnstile holds nothing once passed: there is nothing to release, and a task that is
cancelled while it waits leaves the queue.

The count is approximate at a turn's edge (a new turn starts when the turnstile's own
callback runs, somewhere among that turn's other callbacks), so one iteration can let
through up to twice `per_turn`; what it bounds is a herd of hundreds.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turnstile:
    """At most about `per_turn` passages per event-loop turn; the rest wait in order."""

    __slots__ = ("_passed", "_ticking", "_waiting", "per_turn")

    def __init__(self, per_turn: int) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be >= 1")
        self.per_turn = per_turn
        self._passed = 0  # passages since the current turn began
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._ticking = False

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiting if not f.done())

    async def passage(self) -> None:
        """Return at once when this turn has room and nobody waits, else a turn later."""
        loop = asyncio.get_running_loop()
        if not self._waiting and self._passed < self.per_turn:
            self._passed += 1
            self._tick_soon(loop)
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting.append(fut)
        self._tick_soon(loop)
        await fut  # a cancelled waiter's future is cancelled with it: _tick skips it

    def _tick_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._ticking:
            self._ticking = True
            loop.call_soon(self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new turn: let the next `per_turn` waiters through (they run next turn)."""
        self._ticking = False
        self._passed = 0
        waiting = self._waiting
        while waiting and self._passed < self.per_turn:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                self._passed += 1
        if waiting or self._passed:
            self._tick_soon(loop)
