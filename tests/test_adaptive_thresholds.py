"""AdaptiveThresholds and the tune/restore methods it uses on CircuitBreaker and RetryBudget."""

from __future__ import annotations

import random
import threading

import pytest

from otel_recovery.learning import (
    AdaptiveThresholds,
    AnomalyBus,
    AnomalyEvent,
    SeriesKey,
    Tightening,
)
from otel_recovery.policies import CircuitBreaker, CircuitState, RetryBudget

PAYMENTS = SeriesKey("checkout", "payments:443", "POST /charge")
SEARCH = SeriesKey("checkout", "search:443", "GET /q")


def event(key=PAYMENTS, *, active=True, signal="error_rate", score=0.99):
    return AnomalyEvent(key, signal, score, 0.4, 0.01, 1_700_000_000.0, active)


# -- CircuitBreaker.tune / restore ----------------------------------------------------------------


def test_breaker_tune_lowers_the_consecutive_threshold_until_restored(fake_clock):
    breaker = CircuitBreaker(5, 30.0, clock=fake_clock)
    breaker.tune(failure_threshold=2)
    assert breaker.failure_threshold == 2 and breaker.tuned
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    breaker.restore()
    assert breaker.failure_threshold == 5 and not breaker.tuned
    assert breaker.state is CircuitState.OPEN  # restoring never closes or trips by itself


def test_breaker_tune_changes_the_rate_threshold_in_rate_mode(fake_clock):
    breaker = CircuitBreaker(
        failure_rate_threshold=0.5, window_size=10, minimum_calls=10, clock=fake_clock
    )
    breaker.tune(failure_rate_threshold=0.2)
    assert breaker.failure_rate_threshold == 0.2
    for _ in range(8):
        breaker.record_success()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED  # 9 calls: below minimum_calls
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN  # 2 of 10 = 20 %
    breaker.restore()
    assert breaker.failure_rate_threshold == 0.5


def test_breaker_tune_validation(fake_clock):
    consecutive = CircuitBreaker(5, clock=fake_clock)
    assert consecutive.failure_rate_threshold is None
    with pytest.raises(ValueError, match="rate mode"):
        consecutive.tune(failure_rate_threshold=0.2)
    with pytest.raises(ValueError, match="failure_threshold"):
        consecutive.tune(failure_threshold=0)
    rate = CircuitBreaker(failure_rate_threshold=0.5, clock=fake_clock)
    with pytest.raises(ValueError, match="did you mean"):
        rate.tune(failure_rate_threshold=20)


def test_tuning_keeps_the_closed_fast_paths(fake_clock):
    breaker = CircuitBreaker(5, clock=fake_clock)
    breaker.tune(failure_threshold=3)
    assert breaker._permit_all and breaker._fast_record
    breaker.record_success()
    assert breaker.snapshot().successful_calls == 1


# -- RetryBudget.tune / restore -------------------------------------------------------------------


def test_budget_tune_shrinks_the_allowance_until_restored(fake_clock):
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=fake_clock)
    for _ in range(100):
        budget.record_call()
    budget.tune(ratio=0.05)
    assert budget.tuned and budget.snapshot().available == pytest.approx(5.0)
    assert sum(budget.try_spend() for _ in range(20)) == 5
    budget.restore()
    assert not budget.tuned and budget.ratio == 0.5 and budget.min_per_second == 0.0
    assert budget.snapshot().available == pytest.approx(45.0)
    with pytest.raises(ValueError):
        budget.tune(ratio=2.0)
    with pytest.raises(ValueError):
        budget.tune(min_per_second=-1)


# -- AdaptiveThresholds ---------------------------------------------------------------------------


@pytest.fixture
def parts(fake_clock):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(bus, clock=fake_clock)
    breaker = CircuitBreaker(6, 30.0, name="payments", clock=fake_clock)
    rate_breaker = CircuitBreaker(
        failure_rate_threshold=0.5, name="payments-rate", clock=fake_clock
    )
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, name="payments", clock=fake_clock)
    adaptive.register(PAYMENTS, breaker=breaker, budget=budget)
    adaptive.register(PAYMENTS, breaker=rate_breaker)
    return bus, adaptive, breaker, rate_breaker, budget


def test_active_anomaly_tightens_and_inactive_relaxes(parts):
    bus, adaptive, breaker, rate_breaker, budget = parts
    bus.publish(event())
    assert breaker.failure_threshold == 3
    assert rate_breaker.failure_rate_threshold == 0.375
    assert budget.ratio == pytest.approx(0.02) and budget.min_per_second == pytest.approx(1.0)
    assert all(s["tightened"] for s in adaptive.status())
    bus.publish(event())  # staying anomalous does not tighten further
    assert breaker.failure_threshold == 3 and budget.ratio == pytest.approx(0.02)
    bus.publish(event(active=False))
    assert breaker.failure_threshold == 6 and rate_breaker.failure_rate_threshold == 0.5
    assert budget.ratio == 0.2 and budget.min_per_second == 10.0
    assert not any(s["tightened"] for s in adaptive.status())


def test_other_series_and_unwatched_signals_change_nothing(parts):
    bus, _, breaker, _, budget = parts
    bus.publish(event(SEARCH))
    bus.publish(event(signal="calls"))
    assert breaker.failure_threshold == 6 and not budget.tuned


def test_stays_tight_until_every_overlapping_anomaly_is_over(parts):
    bus, _, breaker, _, _ = parts
    bus.publish(event(signal="error_rate"))
    bus.publish(event(signal="latency"))
    bus.publish(event(signal="error_rate", active=False))
    assert breaker.failure_threshold == 3
    bus.publish(event(signal="latency", active=False))
    assert breaker.failure_threshold == 6


def test_matcher_min_score_and_unregister(fake_clock):
    adaptive = AdaptiveThresholds(clock=fake_clock, tightening=Tightening(min_score=0.9))
    breaker = CircuitBreaker(4, clock=fake_clock)
    unregister = adaptive.register(
        AdaptiveThresholds.matching(server_address="payments:443"), breaker=breaker
    )
    adaptive.on_event(event(score=0.5))
    assert breaker.failure_threshold == 4
    adaptive.on_event(event(score=0.95))
    assert breaker.failure_threshold == 2
    unregister()
    assert breaker.failure_threshold == 4  # unregistering relaxes what it tightened
    adaptive.on_event(event())
    assert breaker.failure_threshold == 4
    with pytest.raises(ValueError):
        adaptive.register(PAYMENTS)


def test_a_breaker_two_registrations_share_stays_tight_until_the_last_one_goes(fake_clock):
    """Unregistering one of two registrations of the same breaker used to relax it (and
    forget it) while the other still watched an ongoing anomaly."""
    adaptive = AdaptiveThresholds(clock=fake_clock)
    breaker = CircuitBreaker(4, clock=fake_clock)
    first = adaptive.register(PAYMENTS, breaker=breaker)
    second = adaptive.register(PAYMENTS, breaker=breaker)
    adaptive.on_event(event())
    assert breaker.failure_threshold == 2
    first()
    assert breaker.failure_threshold == 2  # the second registration still holds it
    adaptive.on_event(event(active=False))
    assert breaker.failure_threshold == 4
    adaptive.on_event(event())
    assert breaker.failure_threshold == 2  # still watched: tightened again
    second()
    assert breaker.failure_threshold == 4


def test_a_silent_detector_cannot_leave_a_dependency_throttled(fake_clock):
    adaptive = AdaptiveThresholds(clock=fake_clock, max_tightened=60.0)
    budget = RetryBudget(ratio=0.2, clock=fake_clock)
    adaptive.register(PAYMENTS, budget=budget)
    adaptive.on_event(event())
    fake_clock.advance(59)
    adaptive.sweep()
    assert budget.tuned
    fake_clock.advance(2)
    adaptive.sweep()
    assert not budget.tuned


def test_close_unsubscribes_and_relaxes(fake_clock):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(bus, clock=fake_clock)
    breaker = CircuitBreaker(4, clock=fake_clock)
    adaptive.register(PAYMENTS, breaker=breaker)
    bus.publish(event())
    adaptive.close()
    assert breaker.failure_threshold == 4
    bus.publish(event())
    assert breaker.failure_threshold == 4


def test_concurrent_events_end_in_a_consistent_state(fake_clock):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(bus, clock=fake_clock)
    breakers = [CircuitBreaker(8, name=f"b{i}", clock=fake_clock) for i in range(4)]
    budget = RetryBudget(ratio=0.2, clock=fake_clock)
    keys = [SeriesKey("checkout", f"dep{i}:443", "op") for i in range(4)]
    for key, breaker in zip(keys, breakers):
        adaptive.register(key, breaker=breaker, budget=budget)  # one budget shared by all
    start = threading.Barrier(8)
    seen = set()

    def flap(seed):
        rng = random.Random(seed)
        start.wait()
        for _ in range(300):
            key = rng.choice(keys)
            signal = rng.choice(["error_rate", "latency"])
            bus.publish(event(key, signal=signal, active=rng.random() < 0.5))
            seen.add(breakers[keys.index(key)].failure_threshold)
            seen.add(round(budget.ratio, 6))

    threads = [threading.Thread(target=flap, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen <= {4, 8, 0.2, 0.02}  # never a half-applied or doubly applied value
    # each component is tight exactly when some anomaly on it is still active
    targets = {f"breaker {b.name!r}": b for b in breakers}
    targets[f"retry budget {budget.name!r}"] = budget
    for status in adaptive.status():
        assert targets[status["component"]].tuned == bool(status["anomalies"])
    for key in keys:
        for signal in ("error_rate", "latency"):
            bus.publish(event(key, signal=signal, active=False))
    assert all(b.failure_threshold == 8 for b in breakers)
    assert budget.ratio == 0.2


def test_a_tightening_expires_on_the_bus_tick_without_a_sweep(fake_clock):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(bus, clock=fake_clock, max_tightened=60.0)
    budget = RetryBudget(ratio=0.2, clock=fake_clock)
    breaker = CircuitBreaker(4, clock=fake_clock)
    adaptive.register(PAYMENTS, budget=budget, breaker=breaker)
    bus.publish(event())
    fake_clock.advance(30)
    bus.publish(event())  # reconfirmed: the 60 s run from here
    fake_clock.advance(59)
    bus.tick()
    assert budget.tuned and breaker.tuned
    fake_clock.advance(2)
    bus.tick()  # what AnomalySpanProcessor does every flush_interval
    assert not budget.tuned and not breaker.tuned
    assert adaptive.status()[0]["anomalies"] == []


def test_status_does_not_report_an_expired_tightening(fake_clock):
    adaptive = AdaptiveThresholds(clock=fake_clock, max_tightened=60.0)
    budget = RetryBudget(ratio=0.2, clock=fake_clock)
    adaptive.register(PAYMENTS, budget=budget)
    adaptive.on_event(event())
    fake_clock.advance(61)
    assert [s["tightened"] for s in adaptive.status()] == [False]
    assert not budget.tuned


def test_ticks_stop_when_detached_and_a_failing_ticker_is_logged(fake_clock, caplog):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(clock=fake_clock, max_tightened=60.0)
    detach = adaptive.attach(bus)
    budget = RetryBudget(ratio=0.2, clock=fake_clock)
    adaptive.register(PAYMENTS, budget=budget)
    bus.publish(event())
    detach()
    fake_clock.advance(61)
    bus.tick()
    assert budget.tuned  # no longer listening to this bus
    bus.publish(event())
    assert budget.tuned and budget.ratio == pytest.approx(0.02)

    def broken() -> None:
        raise RuntimeError("boom")

    stop = bus.on_tick(broken)
    with caplog.at_level("ERROR", logger="otel_recovery"):
        bus.tick()
    assert any("tick subscriber" in m for m in caplog.messages)
    stop()
    bus.tick()


def test_signals_must_name_anomaly_signals():
    """``signals="error_rate"`` became the set of its letters, and a misspelt name matched
    nothing: either way, nothing was ever tightened."""
    with pytest.raises(TypeError, match="signals must be a set of signal names"):
        Tightening(signals="error_rate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'errors'.*'calls', 'error_rate', 'latency'"):
        Tightening(signals=frozenset({"errors"}))
    assert Tightening(signals={"calls"}).signals == frozenset({"calls"})  # type: ignore[arg-type]


def test_a_raising_predicate_leaves_the_other_registrations_working(fake_clock, caplog):
    bus = AnomalyBus()
    adaptive = AdaptiveThresholds(bus, clock=fake_clock)
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, name="payments", clock=fake_clock)

    def broken(key: SeriesKey) -> bool:
        raise IndexError("a bug in the application's predicate")

    adaptive.register(broken, budget=RetryBudget(ratio=0.2, clock=fake_clock))
    adaptive.register(PAYMENTS, budget=budget)
    bus.publish(event())
    assert budget.ratio == pytest.approx(0.02)
    bus.publish(event(active=False))
    assert budget.ratio == pytest.approx(0.2)
    assert caplog.text.count("AdaptiveThresholds predicate raised") == 1
