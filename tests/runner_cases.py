"""What the compiled runners are compared on: policies, steps, and what a step shows.

``tests/test_speedups.py`` (sync) and ``tests/test_async_run.py`` (async) run the same steps
through the compiled runner and the Python closure it mirrors and compare every observation.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry
from otel_recovery.recover import RecoveryPolicy

STEPS = ("ok", "flaky", "down", "invalid", "interrupted", "wait", "long_wait")
"""What a step does: succeed, fail once, fail every attempt, fail unretryably, raise a
BaseException, or let time pass (0.7 s, 12 s)."""


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt: not an Exception, so never recovered."""


def policy_for(kind: str, clock: FakeClock) -> RecoveryPolicy:
    """``guarded`` (breaker, budget, fallback), ``rate`` (a failure-rate breaker),
    ``last_known_good`` or ``unguarded`` (retry only)."""
    retry = Retry(3, rng=random.Random(7))
    if kind == "guarded":
        return RecoveryPolicy(
            retry=retry,
            breaker=CircuitBreaker(3, timeout=10.0, clock=clock),
            budget=RetryBudget(ratio=0.5, min_per_second=1.0, ttl=2.0, clock=clock),
            fallback=Fallback("fallback"),
            clock=clock,
            telemetry=False,
        )
    if kind == "rate":
        return RecoveryPolicy(
            retry=retry,
            breaker=CircuitBreaker(
                failure_rate_threshold=0.5, window_size=6, minimum_calls=4, clock=clock
            ),
            clock=clock,
            telemetry=False,
        )
    if kind == "last_known_good":
        return RecoveryPolicy(
            retry=retry, fallback=Fallback(last_known_good=True), clock=clock, telemetry=False
        )
    return RecoveryPolicy(retry=retry, clock=clock, telemetry=False)  # "unguarded"


def passes_time(step: str, clock: FakeClock) -> bool:
    """A waiting step moves the clock on (and makes no call)."""
    if step not in ("wait", "long_wait"):
        return False
    clock.advance(0.7 if step == "wait" else 12.0)
    return True


def attempt(step: str, value: int, calls: int) -> int:
    """Attempt number ``calls`` of a step: its result, or the error it raises."""
    if step == "flaky" and calls == 1 or step == "down":
        raise ConnectionError(f"refused {value}")
    if step == "invalid":
        raise ValueError(f"invalid {value}")
    if step == "interrupted":
        raise Interrupted()
    return value * 2


def raised(error: BaseException) -> tuple[Any, ...]:
    """What a step that raised shows: the error and the one it was raised while handling."""
    return ("raised", type(error).__name__, str(error), type(error.__context__).__name__)


def observed(
    step: str, outcome: tuple[Any, ...], calls: int, policy: RecoveryPolicy, clock: FakeClock
) -> tuple[Any, ...]:
    """Everything observable after a step: its outcome, its attempts, the breaker's and the
    budget's state and the time."""
    breaker, budget = policy.breaker, policy.budget
    return (
        step,
        outcome,
        calls,
        None if breaker is None else repr(breaker.snapshot()),
        None if budget is None else repr(budget.snapshot()),
        clock.now(),
    )


LEAK_STEPS = ["ok", "flaky", "down", "down", "down", "ok", "invalid", "interrupted", "long_wait"]
"""Every branch that builds or drops references: successes, recovered failures, rejections
by an open breaker, fallbacks and interrupts."""


def bytes_kept(cycle: Callable[[], None], times: int) -> int:
    """Bytes still allocated after ``cycle()`` ran ``times`` times more (run it once first:
    caches, interned strings, and each message's fingerprint, an lru_cache, fill then)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(times):
            cycle()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))
