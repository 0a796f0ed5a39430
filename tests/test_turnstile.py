"""The turnstile: a herd of tasks woken together takes its next steps a few a loop turn."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.helpers import LoopTurns
from vastd.utils.turnstile import Turnstile


async def _herd(
    gate: Turnstile, n: int, turns: LoopTurns, go: asyncio.Event
) -> list[tuple[int, int]]:
    """`n` tasks, all woken by one event (ready in the same turn), each noting the loop
    turn in which it got through, in the order they got through."""
    passed: list[tuple[int, int]] = []

    async def one(i: int) -> None:
        await go.wait()
        await gate.passage()
        passed.append((i, turns.count))

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0)  # all of them waiting on the event
    go.set()
    await asyncio.gather(*tasks)
    return passed


async def test_a_herd_goes_through_a_few_a_turn_in_arrival_order() -> None:
    gate = Turnstile(4)
    async with LoopTurns() as turns:
        passed = await _herd(gate, 40, turns, asyncio.Event())
    assert [i for i, _ in passed] == list(range(40))  # first come, first through
    per_turn = Counter(turn for _, turn in passed)
    assert max(per_turn.values()) <= 2 * gate.per_turn
    assert len(per_turn) >= 40 // (2 * gate.per_turn)  # spread over many turns
    assert gate.waiting == 0


async def test_without_the_turnstile_the_herd_steps_in_one_turn() -> None:
    """The control of the test above: the same herd, no turnstile, all in one turn."""

    class Open(Turnstile):
        async def passage(self) -> None:
            return None

    async with LoopTurns() as turns:
        passed = await _herd(Open(4), 40, turns, asyncio.Event())
    assert len({turn for _, turn in passed}) == 1


async def test_a_lone_caller_passes_without_waiting_for_a_turn() -> None:
    gate = Turnstile(2)
    async with LoopTurns() as turns:
        await asyncio.sleep(0)
        before = turns.count
        for _ in range(2):
            await gate.passage()
        assert turns.count == before  # no suspension at all
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the next turns: room again
        before = turns.count
        await gate.passage()
        assert turns.count == before


async def test_a_waiter_cancelled_in_the_queue_leaves_it_and_takes_no_place() -> None:
    gate = Turnstile(1)
    order: list[str] = []

    async def one(name: str) -> None:
        await gate.passage()
        order.append(name)

    a = asyncio.create_task(one("a"))
    b = asyncio.create_task(one("b"))
    c = asyncio.create_task(one("c"))
    await gate.passage()  # this turn's one place: the three queue behind it
    await asyncio.sleep(0)
    assert gate.waiting >= 2 and order == []
    b.cancel()
    await asyncio.gather(a, c)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert order == ["a", "c"]
    assert gate.waiting == 0


def test_per_turn_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_turn"):
        Turnstile(0)
