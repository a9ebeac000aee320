"""Deferred successes in rate mode (count window): exact counts, same decisions."""

from __future__ import annotations

import threading

from otel_recovery.policies import CircuitBreaker, CircuitState
from otel_recovery.testing import FakeClock


def test_deferred_successes_are_counted_exactly_under_threads():
    breaker = CircuitBreaker(
        failure_rate_threshold=1.0, window_size=1000, minimum_calls=1000, clock=FakeClock()
    )
    barrier = threading.Barrier(32)

    def work(index: int) -> None:
        barrier.wait()
        for step in range(1000):
            breaker.can_execute()
            if (index + step) % 10 == 0:
                breaker.record_failure()
            else:
                breaker.record_success()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = breaker.snapshot()
    assert snap.successful_calls + snap.failed_calls == 32_000
    assert snap.failed_calls == 3_200
    assert snap.buffered_calls == 1000  # the window holds exactly its size
    assert breaker.state is CircuitState.CLOSED


def test_a_success_that_completes_minimum_calls_still_trips():
    breaker = CircuitBreaker(
        failure_rate_threshold=0.5, window_size=10, minimum_calls=4, clock=FakeClock()
    )
    for _ in range(3):
        breaker.record_failure()
    breaker.record_success()  # 3 of 4 failed: this success reaches minimum_calls
    assert breaker.state is CircuitState.OPEN


def test_deferred_successes_dilute_the_rate_before_the_next_failure_is_judged():
    breaker = CircuitBreaker(
        failure_rate_threshold=0.5, window_size=10, minimum_calls=4, clock=FakeClock()
    )
    for _ in range(6):
        breaker.record_success()
    for _ in range(4):
        breaker.record_failure()  # 4/10 failed: still closed, the six successes count
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()  # the oldest success falls out: 5/10 failed
    assert breaker.state is CircuitState.OPEN
