"""The pure decision step, tested as a function over constructed inputs."""

from __future__ import annotations

import random

import pytest

from otel_recovery import testing
from otel_recovery._config import set_testing
from otel_recovery._engine import Action, after_failure, after_rejection
from otel_recovery.classify import classify
from otel_recovery.policies import Fallback, FixedBackoff, Retry, RetryBudget


class Boom(Exception):
    pass


def decide(retry=None, *, budget=None, fallback=None, error=None, attempt=1, now=0.0, started=0.0):
    error = error if error is not None else ConnectionError("refused")
    return after_failure(
        retry=retry,
        budget=budget,
        fallback=fallback,
        error=error,
        info=classify(error),
        attempt=attempt,
        previous_delay=0.0,
        started=started,
        now=now,
    )


def test_retryable_failure_with_attempts_left_is_retried_after_the_backoff():
    d = decide(Retry(3, backoff=FixedBackoff(0.5)))
    assert d.action is Action.RETRY and d.delay == 0.5


def test_no_retry_policy_means_give_up():
    assert decide(None).reason == "not_retryable"


def test_classifier_decides_when_on_is_not_given():
    d = decide(Retry(3), error=ValueError("bad input"))
    assert (d.action, d.reason) == (Action.GIVE_UP, "not_retryable")


def test_explicit_on_overrides_the_classifier():
    assert decide(Retry(3, on=Boom), error=Boom()).action is Action.RETRY
    assert decide(Retry(3, on=Boom), error=ConnectionError()).reason == "not_retryable"
    assert (
        decide(Retry(3, on=lambda e: "again" in str(e)), error=Boom("again")).action is Action.RETRY
    )


def test_base_exceptions_are_never_retried_even_when_named():
    d = decide(Retry(3, on=BaseException), error=KeyboardInterrupt())
    assert d.reason == "not_retryable"


def test_attempts_exhausted():
    assert decide(Retry(3), attempt=3).reason == "attempts_exhausted"
    assert decide(Retry(3), attempt=2).action is Action.RETRY


def test_deadline_stops_a_retry_whose_sleep_would_end_too_late():
    retry = Retry(10, deadline=5.0, backoff=FixedBackoff(1.0))
    assert decide(retry, started=0.0, now=3.9).action is Action.RETRY
    assert decide(retry, started=0.0, now=4.0).reason == "deadline"


def test_retry_after_is_honoured_with_jitter_never_early_and_capped():
    class RateLimited(Exception):
        retry_after = 2.0
        status_code = 429

    retry = Retry(3, retry_after_cap=10, retry_after_jitter=0.5, rng=random.Random(1))
    delays = [decide(retry, error=RateLimited()).delay for _ in range(200)]
    assert all(2.0 <= d <= 2.5 for d in delays) and len(set(delays)) > 100
    capped = Retry(3, retry_after_cap=1.0)
    assert decide(capped, error=RateLimited()).reason == "retry_after_too_long"


def test_budget_is_consulted_last_and_its_refusal_is_a_reason():
    clock = testing.FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10, clock=clock)  # one retry
    retry = Retry(3, backoff=FixedBackoff(0))
    assert decide(retry, budget=budget, now=clock.now()).action is Action.RETRY
    assert decide(retry, budget=budget, now=clock.now()).reason == "budget_exhausted"
    # A non-retryable failure must not consume or count against the budget.
    before = budget.snapshot().total_refused
    decide(retry, budget=budget, error=ValueError(), now=clock.now())
    assert budget.snapshot().total_refused == before


def test_give_up_becomes_fallback_only_for_handled_errors():
    fallback = Fallback(0, on=ConnectionError)
    assert decide(Retry(1), fallback=fallback).action is Action.FALLBACK
    assert decide(Retry(1), fallback=fallback, error=Boom()).action is Action.GIVE_UP
    assert after_rejection(fallback, ConnectionError()).action is Action.FALLBACK
    assert after_rejection(None, ConnectionError()).reason == "rejected"


def test_testing_mode_removes_waits_and_caps_attempts():
    retry = Retry(5, backoff=FixedBackoff(3.0))
    with set_testing(True, attempts=2):
        d = decide(retry, attempt=1)
        assert d.action is Action.RETRY and d.delay == 0.0
        assert decide(retry, attempt=2).reason == "attempts_exhausted"
    assert decide(retry, attempt=2).delay == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "attempts must be an int >= 1"),
        ({"attempts": 3, "deadline": 0}, "must be > 0"),
        ({"attempts": 3, "on": 42}, "on= must be exception types or a predicate"),
        ({"attempts": 3, "on": (ValueError, int)}, "exception types only"),
        ({"attempts": 3, "on": ()}, r"Retry on=\(\) names no exception type"),
        ({"attempts": 3, "rng": "seed-1"}, r"rng must be a random.Random"),
        ({"attempts": 3, "backoff": "fast"}, "backoff must be a Backoff"),
    ],
)
def test_retry_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Retry(**kwargs)
