"""An async attempt's time limit follows a FakeClock: virtual time past the deadline cuts it.

The event loop's timer still cuts on real time (tests/test_recover.py); here the callee waits
on the fake clock, or on nothing at all while another task or thread moves the clock, and the
limit must cut it at the virtual deadline without a real wait. Each wait that only the
virtual cut can end is guarded by a generous real wait: a broken cut fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio

from otel_recovery import FixedBackoff, RecoveryPolicy, Retry, Timeout
from otel_recovery.testing import FakeClock

HOUR = 3600.0
"""A wait the loop's real timer never ends during a test: only virtual time can cut it."""

T = TypeVar("T")


async def guarded(call: Awaitable[T]) -> T:
    """``call``, failed after 10 real seconds should the virtual cut not come (with an
    AssertionError: a TimeoutError would pass for the cut)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=10)
    if not done:
        task.cancel()
        raise AssertionError("not cut on virtual time: 10 real seconds went by")
    return task.result()


def slow_the_first_time(clock: FakeClock, started: list[float]) -> Callable[[], Awaitable[str]]:
    """A callee whose first call waits an hour on ``clock`` (far past any limit here) and
    whose later calls answer at once; ``started`` gets the virtual time of each call."""

    async def call() -> str:
        started.append(clock.now())
        if len(started) == 1:
            await clock.asleep(HOUR)
            return "too late"
        return "fast"

    return call


def policy(clock: FakeClock, **options: object) -> RecoveryPolicy:
    return RecoveryPolicy(clock=clock, telemetry=False, **options)  # type: ignore[arg-type]


# -- FakeClock.call_at -------------------------------------------------------------------------


def test_alarms_fire_in_order_at_their_own_time_as_time_passes() -> None:
    clock = FakeClock(start=0.0)
    fired: list[tuple[str, float]] = []
    clock.call_at(5.0, lambda: fired.append(("b", clock.now())))
    clock.call_at(2.0, lambda: fired.append(("a", clock.now())))
    clock.call_at(5.0, lambda: fired.append(("c", clock.now())))
    clock.advance(4)
    assert fired == [("a", 2.0)] and clock.now() == 4.0
    clock.sleep(10)
    assert fired == [("a", 2.0), ("b", 5.0), ("c", 5.0)] and clock.now() == 14.0
    assert clock.sleeps == [10]  # an alarm is no sleep


def test_a_cancelled_alarm_never_fires_and_a_past_one_fires_at_the_next_move() -> None:
    clock = FakeClock(start=10.0)
    fired: list[str] = []
    cancel = clock.call_at(11.0, lambda: fired.append("cancelled"))
    cancel()
    clock.call_at(3.0, lambda: fired.append("past"))
    assert fired == []
    clock.advance(0)
    assert fired == ["past"]
    clock.advance(5)
    assert fired == ["past"] and clock.now() == 15.0


# -- asyncio -------------------------------------------------------------------------------------


async def test_a_callee_sleeping_past_the_limit_is_cut_at_the_deadline_and_retried() -> None:
    clock = FakeClock(start=0.0)
    started: list[float] = []

    slow_then_fast = slow_the_first_time(clock, started)
    retried = policy(clock, retry=Retry(2, backoff=FixedBackoff(0.5)), timeout=Timeout(2))
    assert await guarded(retried.acall(slow_then_fast)) == "fast"
    assert started == [0.0, 2.5]  # cut at 2 s (its deadline), then the 0.5 s backoff
    assert clock.sleeps == [HOUR, 0.5]


async def test_the_cut_is_the_attempts_timeout_error_at_the_virtual_deadline() -> None:
    clock = FakeClock(start=0.0)

    async def slow() -> None:
        await clock.asleep(30)

    with pytest.raises(TimeoutError, match="exceeded its 2s time limit"):
        await guarded(policy(clock, timeout=Timeout(2)).acall(slow))
    assert clock.now() == 2.0


async def test_the_retry_deadline_cuts_on_virtual_time_too() -> None:
    clock = FakeClock(start=0.0)
    calls: list[float] = []

    async def slow() -> None:
        calls.append(clock.now())
        await clock.asleep(HOUR)

    limited = policy(clock, retry=Retry(5, backoff=FixedBackoff(1), deadline=7), timeout=3)
    with pytest.raises(TimeoutError):
        await guarded(limited.acall(slow))
    assert calls == [0.0, 4.0]  # the second attempt has 3 s left of the deadline: cut at 7
    assert clock.now() == 7.0


async def test_another_task_moving_the_clock_cuts_an_attempt_waiting_on_nothing() -> None:
    clock = FakeClock(start=0.0)
    never = asyncio.Event()

    async def waits_forever() -> None:
        await never.wait()  # a real wait: only the virtual cut can end it

    async def time_passes() -> None:
        await asyncio.sleep(0)  # the attempt is waiting by now
        clock.advance(HOUR + 1)

    mover = asyncio.create_task(time_passes())
    with pytest.raises(TimeoutError, match="exceeded its 3.6e[+]03s time limit"):
        await guarded(policy(clock, timeout=Timeout(HOUR)).acall(waits_forever))
    await mover
    assert clock.now() == HOUR + 1


async def test_a_thread_sleeping_on_the_clock_cuts_the_attempt_on_the_loop() -> None:
    clock = FakeClock(start=0.0)
    never = asyncio.Event()
    waiting = threading.Event()

    async def waits_forever() -> None:
        waiting.set()
        await never.wait()

    worker = threading.Thread(target=lambda: (waiting.wait(10), clock.sleep(HOUR + 1)))
    worker.start()
    try:
        with pytest.raises(TimeoutError):
            await guarded(policy(clock, timeout=Timeout(HOUR)).acall(waits_forever))
    finally:
        worker.join(10)
    assert clock.now() == HOUR + 1


async def test_an_attempt_that_ended_in_time_is_never_cut_later() -> None:
    clock = FakeClock(start=0.0)

    async def quick() -> str:
        await clock.asleep(1)
        return "ok"

    assert await policy(clock, timeout=Timeout(2)).acall(quick) == "ok"
    clock.advance(10)  # past the attempt's deadline: its alarm was disarmed
    for _ in range(3):
        await asyncio.sleep(0)  # a stray cut would cancel this task here
    assert clock.now() == 11.0


async def test_the_loops_real_timer_still_cuts_a_callee_that_ignores_the_clock() -> None:
    clock = FakeClock(start=0.0)

    async def really_slow() -> None:
        await asyncio.sleep(HOUR)

    with pytest.raises(TimeoutError):
        await guarded(policy(clock, timeout=Timeout(0.01)).acall(really_slow))
    assert clock.now() == 0.0  # no virtual time passed: the real timer cut it


# -- trio ------------------------------------------------------------------------------------------


def test_under_trio_a_callee_sleeping_past_the_limit_is_cut_at_the_deadline() -> None:
    clock = FakeClock(start=0.0)
    started: list[float] = []

    slow_then_fast = slow_the_first_time(clock, started)
    retried = policy(clock, retry=Retry(2, backoff=FixedBackoff(0)), timeout=Timeout(2))

    async def main() -> str:
        with trio.fail_after(10):
            return await retried.acall(slow_then_fast)

    assert trio.run(main) == "fast"
    assert started == [0.0, 2.0]
