"""RetryBudget: retries bounded by ratio x calls + floor, with expiry after ttl."""

from __future__ import annotations

import threading

import pytest

from otel_recovery import testing
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.retry import Retry
from otel_recovery.recover import RecoveryPolicy


def test_floor_alone_allows_min_per_second_times_ttl_retries():
    clock = testing.FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10, clock=clock)
    granted = sum(budget.try_spend() for _ in range(50))
    assert granted == 10
    assert budget.snapshot().total_refused == 40


def test_ratio_of_calls_adds_to_the_allowance():
    clock = testing.FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10, clock=clock)
    for _ in range(100):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(100)) == 20


def test_deposits_and_withdrawals_expire_after_ttl():
    clock = testing.FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10, clock=clock)
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.advance(10.5)
    assert budget.snapshot().calls_in_window == 0
    assert budget.try_spend() is False  # old deposits are gone
    for _ in range(4):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(4)) == 2  # old withdrawals are gone too


def test_budget_holds_retries_to_ratio_times_calls_plus_floor_against_a_dead_dependency():
    """Against a dependency that always fails, 3-attempt retries cost at most 1.1x + floor."""
    clock = testing.FakeClock()
    ratio, floor, ttl = 0.1, 1.0, 10.0
    budget = RetryBudget(ratio=ratio, min_per_second=floor, ttl=ttl, clock=clock)
    policy = RecoveryPolicy(
        retry=Retry(3, on=ConnectionError, backoff=lambda n, p: 0.0),
        budget=budget,
        clock=clock,
        telemetry=False,
    )
    attempts = 0

    def always_down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("refused")

    calls = 0
    for second in range(60):  # 60 s at 50 calls/s
        for _ in range(50):
            calls += 1
            with pytest.raises(ConnectionError):
                policy.call(always_down)
        clock.advance(1.0)
        # Invariant at every point in time: retries in any ttl window are bounded.
        snap = budget.snapshot()
        assert snap.retries_in_window <= ratio * snap.calls_in_window + floor * ttl
    retries = attempts - calls
    # Over 60 s the windows tile 6 times: bound is ratio*calls + floor*60 (+ one window's slack).
    assert retries <= ratio * calls + floor * (60 + ttl)
    assert retries >= ratio * calls * 0.9  # and the budget is actually used
    # Each call ends with both retries granted, or with exactly one refusal.
    refused = budget.snapshot().total_refused
    assert calls - retries / 2 <= refused <= calls


def test_budget_is_exact_under_threads():
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=60)
    barrier = threading.Barrier(16)

    def work() -> None:
        barrier.wait()
        for _ in range(1000):
            budget.record_call()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.snapshot().total_calls == 16_000
    assert budget.snapshot().calls_in_window == 16_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 20}, r"ratio must be in \[0, 1\], got 20; did you mean 0.2"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\], got -0.1$"),  # no hint: not a percent
        ({"ratio": float("nan")}, r"ratio must be in \[0, 1\], got nan$"),
        ({"min_per_second": -1}, "min_per_second must be a finite number >= 0"),
        ({"ttl": 0.5}, "ttl must be between 1 and 3600"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryBudget(**kwargs)


def test_the_compiled_runner_deposits_exactly_like_record_call():
    """``RecoveryPolicy.runner()`` deposits by reading the bucket's end and counting, without
    calling ``record_call``; across bucket rotations both must agree call for call."""
    clock = testing.FakeClock()
    compiled = RetryBudget(ratio=0.5, min_per_second=1.0, ttl=2.0, clock=clock)
    reference = RetryBudget(ratio=0.5, min_per_second=1.0, ttl=2.0, clock=clock)
    policy = RecoveryPolicy(retry=Retry(2), budget=compiled, clock=clock, telemetry=False)
    run = policy.runner()
    for step in range(300):
        assert run(lambda: step, (), {}) == step
        reference.record_call(clock.now())
        clock.advance(0.013 * (step % 17))  # sometimes within a bucket, sometimes past several
        if step % 50 == 49:  # reading rotates too: read rarely, so deposits must rotate
            ours, theirs = compiled.snapshot(), reference.snapshot()
            assert (ours.calls_in_window, ours.total_calls, ours.available) == (
                theirs.calls_in_window,
                theirs.total_calls,
                theirs.available,
            )
    assert compiled.snapshot().total_calls == 300
