"""Policies at their edges: slots, deadlines and inputs (twenty-fifth session's review).

Each test failed before: a bulkhead slot kept after an ``async for`` ended, queueing for a
slot charged to the attempt's time limit, an inner policy publishing a later deadline than
the outer attempt allowed, and mistakes accepted that only failed at the first failure.
"""

from __future__ import annotations

import asyncio
import random
import typing

import pytest

from otel_recovery import (
    Bulkhead,
    ExponentialBackoff,
    FixedBackoff,
    RecoveryPolicy,
    Retry,
    RetryBudget,
    Timeout,
    remaining_time,
)
from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction, RecoveryStrategy
from otel_recovery.policies import BulkheadFullError, Fallback
from otel_recovery.testing import FakeClock

# -- the bulkhead slot of attempts() / aattempts() ----------------------------------------


async def test_aattempts_gives_the_slot_back_the_moment_the_loop_ends(fake_clock):
    """The slot was released by the async generator's finaliser, turns later: the next
    call was refused by a bulkhead with nothing in flight."""
    bulkhead = Bulkhead(1)
    policy = RecoveryPolicy(
        retry=Retry(3, on=ConnectionError), bulkhead=bulkhead, clock=fake_clock, telemetry=False
    )
    with pytest.raises(ValueError):
        async for attempt in policy.aattempts():
            with attempt:
                raise ValueError("not retryable")
    assert bulkhead.in_use == 0
    assert await policy.acall(asyncio.sleep, 0, "next") == "next"
    async for attempt in policy.aattempts():
        with attempt:
            pass
    assert bulkhead.in_use == 0
    failures = [ConnectionError("reset")] * 3
    with pytest.raises(ConnectionError):
        async for attempt in policy.aattempts():
            with attempt:
                raise failures.pop()
    assert bulkhead.in_use == 0


def test_attempts_count_for_the_budget_only_once_the_bulkhead_admitted_them(fake_clock):
    """``call()`` deposited nothing for a call the bulkhead refused; ``attempts()`` did,
    so refused blocks raised the retry allowance."""
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=fake_clock)
    bulkhead = Bulkhead(1)
    policy = RecoveryPolicy(
        retry=Retry(2), budget=budget, bulkhead=bulkhead, clock=fake_clock, telemetry=False
    )
    bulkhead.acquire()
    with pytest.raises(BulkheadFullError):
        policy.call(lambda: 1)
    with pytest.raises(BulkheadFullError):
        for attempt in policy.attempts():
            with attempt:
                pass
    assert budget.total_calls == 0
    bulkhead.release()
    for attempt in policy.attempts():
        with attempt:
            pass
    assert budget.total_calls == 1


# -- queueing for a slot is not the attempt's time ------------------------------------------


class _Holder:
    """Holds the bulkhead's one slot while ``seconds`` pass on the policy's clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    async def __call__(self) -> str:
        await asyncio.sleep(0.01)  # the others queue meanwhile
        self.clock.advance(self.seconds)
        return "held"


async def test_a_wait_for_a_bulkhead_slot_is_not_taken_from_the_attempts_limit(fake_clock):
    """Queued 0.45 s behind a call, the next attempt of a ``Timeout(0.5)`` policy had 0.05 s
    left; one queued longer failed with a TimeoutError without running."""
    policy = RecoveryPolicy(
        bulkhead=Bulkhead(1, max_wait=5), timeout=Timeout(0.5), clock=fake_clock, telemetry=False
    )

    async def left() -> float | None:
        return remaining_time()

    first = asyncio.ensure_future(policy.acall(_Holder(fake_clock, 0.45)))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(policy.acall(left))
    assert await first == "held"
    assert await second == pytest.approx(0.5)
    third = asyncio.ensure_future(policy.acall(_Holder(fake_clock, 0.6)))
    await asyncio.sleep(0)
    fourth = asyncio.ensure_future(policy.acall(left))
    assert await third == "held"
    assert await fourth == pytest.approx(0.5)  # queued past the limit, and it still ran


# -- a policy inside another's attempt --------------------------------------------------------


def test_an_inner_policy_publishes_the_outer_attempts_deadline_when_it_is_sooner(fake_clock):
    outer = RecoveryPolicy(timeout=Timeout(1.0), clock=fake_clock, telemetry=False)
    inner = RecoveryPolicy(timeout=Timeout(30.0), clock=fake_clock, telemetry=False)
    assert outer.call(lambda: inner.call(remaining_time)) == pytest.approx(1.0)
    assert inner.call(remaining_time) == pytest.approx(30.0)  # alone: its own

    async def aleft() -> float | None:
        return remaining_time()

    async def middle() -> float | None:
        return await inner.acall(aleft)

    assert asyncio.run(outer.acall(middle)) == pytest.approx(1.0)


def test_an_inner_policy_does_not_retry_past_the_outer_attempts_deadline(fake_clock):
    """It retried for 8 virtual seconds inside an attempt limited to 1 s."""
    outer = RecoveryPolicy(timeout=Timeout(1.0), clock=fake_clock, telemetry=False)
    inner = RecoveryPolicy(
        retry=Retry(5, on=ConnectionError, deadline=30, backoff=FixedBackoff(0.3)),
        clock=fake_clock,
        telemetry=False,
    )
    seen: list[float | None] = []

    def leaf() -> None:
        seen.append(remaining_time())
        fake_clock.advance(0.1)
        raise ConnectionError("down")

    start = fake_clock.now()
    with pytest.raises(ConnectionError):
        outer.call(lambda: inner.call(leaf))
    assert seen == [pytest.approx(1.0), pytest.approx(0.6), pytest.approx(0.2)]
    assert fake_clock.now() - start == pytest.approx(0.9)


def test_an_outer_deadline_on_another_clock_is_not_compared(fake_clock):
    outer = RecoveryPolicy(timeout=Timeout(1.0), telemetry=False)  # the system clock
    inner = RecoveryPolicy(timeout=Timeout(30.0), clock=fake_clock, telemetry=False)
    assert outer.call(lambda: inner.call(remaining_time)) == pytest.approx(30.0)


# -- inputs refused where they are given --------------------------------------------------------


def test_a_class_where_an_instance_belongs_is_refused_with_the_fix():
    """``backoff=ExponentialBackoff`` passed the protocol check and disabled retrying at the
    first failure (``delay()`` missing an argument); a clock class failed at the first
    call."""
    with pytest.raises(TypeError, match=r"write ExponentialBackoff\(\)"):
        Retry(3, backoff=ExponentialBackoff)
    with pytest.raises(TypeError, match=r"write ExponentialBackoff\(\)"):
        ErrorRecoveryInteraction(backoff=ExponentialBackoff, telemetry=False, store="memory://")
    with pytest.raises(TypeError, match=r"write FixedBackoff\(\)"):
        RecoveryStrategy(RecoveryAction.RETRY, backoff=FixedBackoff)

    class Advisor:
        def advise(self, error, info, attempt):
            return None

        def learn(self, advice, *, success, seconds):
            return None

    with pytest.raises(TypeError, match="an instance, not a class"):
        Retry(3, advisor=Advisor)
    Retry(3, advisor=Advisor())
    with pytest.raises(TypeError, match=r"FakeClock\(\) \(an instance\)"):
        RecoveryPolicy(clock=FakeClock)
    with pytest.raises(TypeError, match=r"FakeClock\(\) \(an instance\)"):
        RetryBudget(clock=FakeClock)


def test_an_infinite_timeout_is_no_limit():
    """It published ``remaining_time() == inf``, which socket timeouts refuse."""
    policy = RecoveryPolicy(timeout=Timeout(float("inf")), telemetry=False)
    assert policy.call(remaining_time) is None


def test_on_takes_a_union_and_refuses_what_can_never_act(fake_clock):
    policy = RecoveryPolicy(
        retry=Retry(3, on=ConnectionError | TimeoutError, backoff=FixedBackoff(0)),
        clock=fake_clock,
        telemetry=False,
    )
    failures = [TimeoutError("slow"), ConnectionError("reset")]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert policy.call(flaky) == "ok"
    for never in (KeyboardInterrupt, asyncio.CancelledError, (SystemExit, GeneratorExit)):
        with pytest.raises(ValueError, match="an interruption"):
            Retry(on=never)
        with pytest.raises(ValueError, match="an interruption"):
            Fallback("cached", on=never)
    Retry(on=(ConnectionError, SystemExit))  # one type that can act is enough

    class Base(BaseException):
        pass

    class Both(Base, Exception):  # an Exception a policy acts on: so Base can match
        pass

    assert Retry(on=Base).on is Base
    union = typing.Union[ConnectionError, OSError]  # noqa: UP007 - the older spelling
    assert Retry(on=union).on == (ConnectionError, OSError)
    with pytest.raises(TypeError, match=r"write a tuple, on=\(ConnectionError, OSError\)"):
        Retry(on=[ConnectionError, OSError])
    with pytest.raises(TypeError, match=r"write a tuple, on=\(ValueError,\)"):
        Retry(on=[ValueError])  # one type: the hint's tuple keeps its comma


def test_an_exponential_backoff_from_zero_stays_zero_past_the_overflow():
    """``multiplier ** n`` overflowing became infinity before the zero initial delay was
    applied: the wait jumped from 0 to the maximum."""
    backoff = ExponentialBackoff(initial=0, multiplier=2, maximum=10, jitter="none")
    rng = random.Random(1)
    assert [backoff.delay(n, 0.0, rng) for n in (1, 1025, 5000)] == [0.0, 0.0, 0.0]
    assert ExponentialBackoff(initial=1, maximum=10, jitter="none").delay(5000, 0.0, rng) == 10


async def test_work_started_inside_an_attempt_is_not_bound_by_it_once_it_is_over(fake_clock):
    """A task started inside an outer attempt copies its context, deadline included: once
    the attempt was over, that task's own policies read the spent deadline (0 s left) and
    refused to retry."""
    outer = RecoveryPolicy(timeout=Timeout(1.0), clock=fake_clock, telemetry=False)
    inner = RecoveryPolicy(
        retry=Retry(3, on=ConnectionError, backoff=FixedBackoff(0)),
        timeout=Timeout(5.0),
        clock=fake_clock,
        telemetry=False,
    )
    seen: list[float | None] = []
    failures = [ConnectionError("reset")]
    later = asyncio.Event()

    async def leaf() -> str:
        seen.append(remaining_time())
        if failures:
            raise failures.pop()
        return "ok"

    async def background() -> str:
        await later.wait()
        return await inner.acall(leaf)

    async def handler() -> asyncio.Task[str]:
        task = asyncio.ensure_future(background())
        seen.append(remaining_time())  # while the attempt runs: its deadline
        return task

    task = await outer.acall(handler)
    fake_clock.advance(10)
    later.set()
    assert await task == "ok"
    assert seen == [pytest.approx(1.0), pytest.approx(5.0), pytest.approx(5.0)]
