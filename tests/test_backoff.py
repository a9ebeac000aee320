"""Backoff schedules: exact for deterministic kinds, statistical for jitter (seeded)."""

from __future__ import annotations

import random
import statistics
from datetime import timedelta

import pytest

from otel_recovery.policies.backoff import CustomBackoff, ExponentialBackoff, FixedBackoff


def schedule(backoff, retries: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    delays, previous = [], 0.0
    for n in range(1, retries + 1):
        previous = backoff.delay(n, previous, rng)
        delays.append(previous)
    return delays


def test_exponential_without_jitter_is_exact_and_capped():
    backoff = ExponentialBackoff(initial=0.1, multiplier=2, maximum=1.0, jitter="none")
    assert schedule(backoff, 6) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_timedelta_parameters_are_accepted():
    backoff = ExponentialBackoff(initial=timedelta(milliseconds=250), maximum=timedelta(seconds=2))
    assert backoff.initial == 0.25 and backoff.maximum == 2.0


def test_huge_retry_numbers_do_not_overflow():
    backoff = ExponentialBackoff(initial=1, multiplier=10, maximum=30, jitter="none")
    assert backoff.delay(10_000, 0.0, random.Random(0)) == 30


@pytest.mark.parametrize("retry_number", [1, 3, 6])
def test_full_jitter_is_uniform_between_zero_and_nominal(retry_number):
    backoff = ExponentialBackoff(initial=0.1, multiplier=2, maximum=5.0, jitter="full")
    rng = random.Random(42)
    nominal = backoff.nominal(retry_number)
    samples = [backoff.delay(retry_number, 0.0, rng) for _ in range(20_000)]
    assert min(samples) >= 0 and max(samples) <= nominal
    # Uniform(0, v): mean v/2, stdev v/sqrt(12); 20k samples put the mean within ~1 %.
    assert statistics.fmean(samples) == pytest.approx(nominal / 2, rel=0.02)
    assert statistics.pstdev(samples) == pytest.approx(nominal / 12**0.5, rel=0.03)


def test_equal_jitter_never_goes_below_half_the_nominal_delay():
    backoff = ExponentialBackoff(initial=0.2, multiplier=2, maximum=5.0, jitter="equal")
    rng = random.Random(7)
    nominal = backoff.nominal(3)
    samples = [backoff.delay(3, 0.0, rng) for _ in range(20_000)]
    assert min(samples) >= nominal / 2 and max(samples) <= nominal
    assert statistics.fmean(samples) == pytest.approx(0.75 * nominal, rel=0.02)


def test_decorrelated_jitter_grows_from_the_previous_delay_and_respects_the_cap():
    backoff = ExponentialBackoff(initial=0.1, maximum=2.0, jitter="decorrelated")
    rng = random.Random(3)
    for previous in (0.0, 0.1, 0.5, 1.5):
        lower, upper = 0.1, min(2.0, 3 * max(previous, 0.1))
        samples = [backoff.delay(2, previous, rng) for _ in range(5_000)]
        assert lower <= min(samples) and max(samples) <= upper
        if upper < 2.0:  # uncapped: uniform on [base, 3*previous]
            assert statistics.fmean(samples) == pytest.approx((lower + upper) / 2, rel=0.03)


def test_seeded_schedules_are_reproducible():
    backoff = ExponentialBackoff(jitter="full")
    assert schedule(backoff, 5, seed=11) == schedule(backoff, 5, seed=11)
    assert schedule(backoff, 5, seed=11) != schedule(backoff, 5, seed=12)


def test_fixed_backoff_with_and_without_jitter():
    assert schedule(FixedBackoff(0.5), 3) == [0.5, 0.5, 0.5]
    jittered = schedule(FixedBackoff(0.5, jitter=0.1), 200)
    assert all(0.5 <= d <= 0.6 for d in jittered) and len(set(jittered)) > 100


def test_custom_backoff_gets_retry_number_and_previous_delay():
    seen = []

    def linear(n: int, previous: float) -> float:
        seen.append((n, previous))
        return 0.1 * n

    assert schedule(CustomBackoff(linear), 3) == pytest.approx([0.1, 0.2, 0.3])
    assert seen == [(1, 0.0), (2, 0.1), (3, pytest.approx(0.2))]


def test_custom_backoff_rejects_negative_delays_with_a_clear_message():
    with pytest.raises(ValueError, match="delay returned by"):
        CustomBackoff(lambda n, p: -1).delay(1, 0.0, random.Random())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jitter": "fuzzy"}, "jitter must be one of"),
        ({"multiplier": 0.5}, "multiplier must be a finite number >= 1"),
        ({"multiplier": float("nan")}, "multiplier must be a finite number >= 1"),
        ({"multiplier": float("inf")}, "multiplier must be a finite number >= 1"),
        # past time.sleep's range: refused here, not an OverflowError mid-failure
        ({"initial": float("inf")}, r"initial must be at most 1e\+09 seconds"),
        ({"initial": 10**400, "maximum": 10**400}, r"initial must be at most 1e\+09 seconds"),
        ({"initial": 2, "maximum": 1}, "maximum .* must be >= initial"),
        ({"initial": -1}, "initial must be >= 0"),
        ({"initial": "1s"}, "initial must be a number of seconds or a timedelta"),
    ],
)
def test_bad_configuration_is_reported_by_name(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ExponentialBackoff(**kwargs)
