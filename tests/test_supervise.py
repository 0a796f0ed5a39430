"""Backoff, run_loop and TaskSet: retries that tests can zero, crashes never silent."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from vastd.core.ssh import Backoff as SSHBackoff
from vastd.utils.supervise import LOOP_BACKOFF, Backoff, TaskSet, run_loop

DEADLINE_S = 5.0


async def until(predicate: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    """Wait for `predicate()` to hold, yielding to the loop; TimeoutError after the deadline."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)


# --- Backoff -------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", [0, 1, 3, 5, 10])
def test_backoff_defaults_match_the_ssh_backoff(attempt: int) -> None:
    """Same defaults and the same draw as core/ssh.py's Backoff, so one can replace the other."""
    for seed in range(20):
        random.seed(seed)
        theirs = SSHBackoff().delay_s(attempt)
        random.seed(seed)
        assert Backoff().delay_s(attempt) == theirs
    assert Backoff(base_s=0.0).delay_s(attempt) == SSHBackoff(base_s=0.0).delay_s(attempt) == 0


def test_zero_backoff_never_waits() -> None:
    """`Backoff.zero()` and base_s=0 give 0 for every attempt and jitter, even huge ones."""
    for backoff in (Backoff.zero(), Backoff(base_s=0, jitter="equal"), Backoff(base_s=0)):
        assert [backoff.delay_s(n) for n in (0, 1, 7, 10_000)] == [0, 0, 0, 0]


def test_backoff_grows_then_caps_without_overflow() -> None:
    """Without jitter the waits double up to max_s; a huge attempt is max_s, not an error."""
    backoff = Backoff(base_s=1.0, max_s=60.0, jitter="none")
    assert [backoff.delay_s(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay_s(100_000) == 60.0
    assert backoff.delay_s(-3) == 1.0
    assert Backoff(base_s=1.0, max_s=100.0, factor=1.5, jitter="none").delay_s(2) == 2.25


def test_jitter_stays_within_its_range_and_is_reproducible() -> None:
    """Full jitter draws from [0, cap], equal from [cap/2, cap]; a seeded rng repeats."""
    full, equal = Backoff(base_s=1.0, max_s=8.0), Backoff(base_s=1.0, max_s=8.0, jitter="equal")
    rng = random.Random(7)
    for attempt in range(6):
        cap = min(8.0, 2.0**attempt)
        draws = [full.delay_s(attempt, rng) for _ in range(200)]
        assert min(draws) >= 0 and max(draws) <= cap and min(draws) < cap / 2
        draws = [equal.delay_s(attempt, rng) for _ in range(200)]
        assert cap / 2 <= min(draws) and max(draws) <= cap
    assert full.delay_s(3, random.Random(1)) == full.delay_s(3, random.Random(1))


@pytest.mark.parametrize(
    "values",
    [
        {"base_s": -1.0},
        {"max_s": float("nan")},
        {"base_s": float("inf")},
        {"factor": 0.5},
        {"jitter": "some"},
    ],
)
def test_backoff_refuses_nonsense(values: dict[str, object]) -> None:
    """Negative, NaN or infinite times, a shrinking factor and unknown jitter are refused."""
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Formula:
    """One of today's hand-written formulas and the Backoff that reproduces it."""

    where: str
    today: Callable[[int], float]
    backoff: Backoff
    shift: int  # Backoff attempt = today's counter - shift
    counters: range


# Today's jitter-free formulas (grep `2 \*\*` in vastd/), each as a Backoff plus the
# shift from today's counter (often incremented before use) to a 0-based attempt.
FORMULAS = [
    Formula(
        "coordinator.watch_instance: failures",
        lambda f: min(30.0, 0.5 * 2 ** min(f, 6)),
        Backoff(base_s=1.0, max_s=30.0, jitter="none"),
        1,
        range(1, 30),
    ),
    Formula(
        "coordinator.retry_delay: task.attempts",
        lambda a: min(60.0, 2.0 * 2**a),
        Backoff(base_s=2.0, max_s=60.0, jitter="none"),
        0,
        range(0, 30),
    ),
    Formula(
        "lifecycle.terminate_instance / confirm_destroy: attempt",
        lambda a: min(60.0, 1.0 * 2 ** (a - 1)),
        Backoff(base_s=1.0, max_s=60.0, jitter="none"),
        1,
        range(1, 30),
    ),
    Formula(
        "ssh._open_process: channel-open attempt",
        lambda a: 0.05 * 2**a,
        Backoff(base_s=0.05, max_s=0.4, jitter="none"),
        0,
        range(0, 4),  # _CHANNEL_OPEN_RETRIES - 1 waits at most
    ),
    Formula(
        "workflow.run_instance_preparation_workflow: prepare_failures (before its x U(0.8, 1.2))",
        lambda f: min(600.0, 2.0 * 2 ** min(f, 9)),
        Backoff(base_s=4.0, max_s=600.0, jitter="none"),
        1,
        range(1, 30),
    ),
]


@pytest.mark.parametrize("formula", FORMULAS, ids=[f.where for f in FORMULAS])
def test_backoff_reproduces_todays_formulas(formula: Formula) -> None:
    """Each jitter-free formula of today equals a Backoff, attempt for attempt."""
    for n in formula.counters:
        assert formula.backoff.delay_s(n - formula.shift) == pytest.approx(formula.today(n))


def test_loop_backoff_bounds_todays_run_loop_formula() -> None:
    """min(60, 0.5 * 2**min(f, 7)) * U(0.5, 1) has exactly LOOP_BACKOFF's range at f - 1."""
    rng = random.Random(3)
    for failures in range(1, 20):
        cap = min(60.0, 0.5 * 2 ** min(failures, 7))
        assert LOOP_BACKOFF.cap_s(failures - 1) == cap
        draws = [LOOP_BACKOFF.delay_s(failures - 1, rng) for _ in range(100)]
        assert cap * 0.5 <= min(draws) and max(draws) <= cap


# --- run_loop ------------------------------------------------------------------------------
async def test_a_crashing_step_is_logged_and_retried() -> None:
    """Two crashes are logged as loop_step_failed (with the traceback); the third call runs."""
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError(f"crash {calls}")

    with capture_logs() as logs:
        task = asyncio.create_task(
            run_loop("test", step, interval_s=3600, backoff=Backoff.zero()), name="loop"
        )
        await until(lambda: calls >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    failed = [e for e in logs if e["event"] == "loop_step_failed"]
    assert [(e["loop"], e["failures"], e["log_level"]) for e in failed] == [
        ("test", 1, "error"),
        ("test", 2, "error"),
    ]
    assert isinstance(failed[0]["exc_info"], RuntimeError)
    assert [e["failures"] for e in logs if e["event"] == "loop_recovered"] == [2]


async def test_cancellation_propagates_from_run_loop() -> None:
    """Cancelled while its step runs, and a step raising CancelledError, both end the loop."""
    entered = asyncio.Event()

    async def slow_step() -> None:
        entered.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(run_loop("slow", slow_step, interval_s=1, backoff=Backoff.zero()))
    await asyncio.wait_for(entered.wait(), DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def cancelling_step() -> None:
        raise asyncio.CancelledError

    with capture_logs() as logs, pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(
            run_loop("c", cancelling_step, interval_s=1, backoff=Backoff.zero()), DEADLINE_S
        )
    assert not [e for e in logs if e["event"] == "loop_step_failed"]


async def test_wakeup_runs_the_step_before_the_interval() -> None:
    """With an hour's interval, setting the wakeup (also during a step) runs the step again."""
    wakeup = asyncio.Event()
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            wakeup.set()  # set during the step: not lost by the clear before the next one

    task = asyncio.create_task(run_loop("w", step, interval_s=3600, wakeup=wakeup))
    try:
        await until(lambda: calls == 2)
        wakeup.set()
        await until(lambda: calls == 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_without_wakeup_the_step_runs_every_interval() -> None:
    """A short interval and no wakeup: the step keeps being called."""
    calls = 0

    async def step() -> int:
        nonlocal calls
        calls += 1
        return calls  # a report; run_loop ignores it

    task = asyncio.create_task(run_loop("i", step, interval_s=0.001))
    await until(lambda: calls >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- TaskSet -------------------------------------------------------------------------------
async def test_a_crashed_task_is_logged_and_recorded() -> None:
    """The crash is logged as task_crashed with its traceback and kept in crashed/last_crash."""
    tasks = TaskSet()

    async def boom() -> None:
        raise ValueError("boom")

    with capture_logs() as logs:
        task = tasks.spawn(boom(), name="boom:1")
        assert tasks.names() == ["boom:1"] and len(tasks) == 1
        await task  # the exception stops at the task's top
    assert tasks.crashed == {"boom:1": "ValueError('boom')"}
    assert tasks.last_crash is not None and tasks.last_crash.name == "boom:1"
    assert tasks.crash_count == 1 and len(tasks) == 0 and tasks.names() == []
    [event] = [e for e in logs if e["event"] == "task_crashed"]
    assert event["task"] == "boom:1" and event["log_level"] == "error"
    assert isinstance(event["exc_info"], ValueError)


async def test_a_supervised_task_is_restarted_after_crashes() -> None:
    """restart=True calls the function again after each crash; cancel ends it quietly."""
    tasks = TaskSet(backoff=Backoff.zero())
    starts = 0

    async def flaky() -> None:
        nonlocal starts
        starts += 1
        if starts <= 2:
            raise OSError(f"crash {starts}")
        await asyncio.sleep(3600)

    with capture_logs() as logs:
        task = tasks.spawn(flaky, name="flaky", restart=True)
        await until(lambda: starts == 3)
        assert tasks.restarts("flaky") == 2 and tasks.crash_count == 2
        assert tasks.crashed["flaky"] == "OSError('crash 2')"
        assert await tasks.cancel_all(timeout_s=DEADLINE_S) == []
    assert task.cancelled() and len(tasks) == 0
    crashes = [e for e in logs if e["event"] == "task_crashed"]
    assert [e["restarts"] for e in crashes] == [1, 2]
    assert all(e["restart_in_s"] == 0 for e in crashes)


async def test_a_supervised_task_that_returns_is_not_restarted() -> None:
    """A normal return ends a supervised task; it is not run again."""
    tasks = TaskSet(backoff=Backoff.zero())
    starts = 0

    async def once() -> None:
        nonlocal starts
        starts += 1

    await tasks.spawn(once, name="once", restart=True)
    await asyncio.sleep(0.01)
    assert starts == 1 and len(tasks) == 0 and tasks.crash_count == 0


async def test_restart_needs_a_function() -> None:
    """A coroutine object cannot be restarted: refused, and closed (no 'never awaited')."""

    async def work() -> None:
        pass

    coro = work()
    with pytest.raises(TypeError, match="function"):
        TaskSet().spawn(coro, name="x", restart=True)
    assert coro.cr_frame is None  # closed


async def test_a_task_cancelled_before_its_first_step_closes_its_coroutine() -> None:
    """Spawned, then cancelled before it ever ran (a shutdown right after the spawn): its
    coroutine is closed, not left to warn 'never awaited' when it is collected."""
    made: list[Coroutine[Any, Any, None]] = []

    async def work() -> None:
        pass

    def factory() -> Coroutine[Any, Any, None]:
        made.append(work())
        return made[-1]

    tasks = TaskSet()
    direct = work()
    spawned = [tasks.spawn(direct, name="direct"), tasks.spawn(factory, name="factory")]
    for task in spawned:
        task.cancel()
    await asyncio.gather(*spawned, return_exceptions=True)
    assert all(t.cancelled() for t in spawned)
    assert direct.cr_frame is None and made[0].cr_frame is None  # closed
    assert len(tasks) == 0


async def test_cancel_all_gives_a_task_that_ignores_one_cancel_a_second_chance() -> None:
    """A task swallowing the first cancel is cancelled again and ends; none refused."""
    tasks = TaskSet()
    ignored = asyncio.Event()

    async def ignores_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ignored.set()
        await asyncio.sleep(3600)

    started = asyncio.Event()

    async def plain() -> None:
        started.set()
        await asyncio.sleep(3600)

    stubborn = tasks.spawn(ignores_once(), name="stubborn")
    other = tasks.spawn(plain(), name="plain")
    await asyncio.wait_for(started.wait(), DEADLINE_S)
    async with asyncio.timeout(DEADLINE_S):
        assert await tasks.cancel_all(timeout_s=1.0) == []
    assert ignored.is_set() and stubborn.cancelled() and other.cancelled()


async def test_cancel_all_is_bounded_and_names_the_refusers() -> None:
    """A task that ignores every cancel is named, with its stack logged, within the bound."""
    tasks = TaskSet()
    release = asyncio.Event()
    cancels = 0

    async def refuses() -> None:
        nonlocal cancels
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1

    task = tasks.spawn(refuses(), name="refuses")
    await asyncio.sleep(0)
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(DEADLINE_S):
                assert await tasks.cancel_all(timeout_s=0.1) == ["refuses"]
        assert cancels == 2 and not task.done()
        [event] = [e for e in logs if e["event"] == "task_refused_to_exit"]
        assert event["task"] == "refuses"
        assert any(f.endswith(" refuses") for f in event["stack"]), event["stack"]
    finally:
        release.set()  # else the loop's teardown would wait for it for ever
        task.cancel()
        await task
    assert len(tasks) == 0


async def test_wait_all_drains_one_shot_tasks_but_not_supervised_loops() -> None:
    """wait_all waits for work (and work it spawns), not for loops; names what is left."""
    tasks = TaskSet(backoff=Backoff.zero())
    done: list[str] = []

    async def follow_up() -> None:
        await asyncio.sleep(0.01)
        done.append("follow-up")

    async def work() -> None:
        await asyncio.sleep(0.01)
        tasks.spawn(follow_up(), name="follow-up")
        done.append("work")

    async def loop() -> None:
        await asyncio.sleep(3600)

    tasks.spawn(loop, name="loop", restart=True)
    tasks.spawn(work(), name="work")
    assert await tasks.wait_all(timeout_s=DEADLINE_S) == []
    assert done == ["work", "follow-up"] and tasks.names() == ["loop"]

    tasks.spawn(loop(), name="forever")
    assert await tasks.wait_all(timeout_s=0.01) == ["forever"]
    assert await tasks.cancel_all(timeout_s=DEADLINE_S) == []


async def test_in_a_task_group_a_crash_does_not_cancel_the_others() -> None:
    """With group=, tasks live in the TaskGroup; one crashing leaves its siblings running."""
    finished = asyncio.Event()
    go = asyncio.Event()

    async def boom() -> None:
        raise KeyError("k")

    async def sibling() -> None:
        await go.wait()
        finished.set()

    async with asyncio.TaskGroup() as tg:
        tasks = TaskSet(group=tg)
        crash = tasks.spawn(boom(), name="boom")
        tasks.spawn(lambda: sibling(), name="sibling")
        await crash
        assert tasks.crashed == {"boom": "KeyError('k')"} and tasks.names() == ["sibling"]
        go.set()
    # Leaving the group waited for the sibling: it was the group's task.
    assert finished.is_set() and len(tasks) == 0


async def test_spawn_into_a_finished_group_raises_without_warnings() -> None:
    """A group that has exited refuses new tasks; both coroutines are closed, none leak."""
    async with asyncio.TaskGroup() as tg:
        tasks = TaskSet(group=tg)

    async def work() -> None:
        pass

    coro = work()
    with pytest.raises(RuntimeError):
        tasks.spawn(coro, name="late")
    assert coro.cr_frame is None and len(tasks) == 0
