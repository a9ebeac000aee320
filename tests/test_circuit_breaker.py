"""Behaviour of CircuitBreaker, on virtual time (FakeClock): no test sleeps for real."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
from datetime import timedelta
from typing import Any

import pytest

from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import (
    BreakerSnapshot,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    StateTransition,
)

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1000.0)


def fail(b: CircuitBreaker, n: int, duration: float | None = None) -> None:
    for _ in range(n):
        assert b.can_execute()
        b.record_failure(duration)


def succeed(b: CircuitBreaker, n: int, duration: float | None = None) -> None:
    for _ in range(n):
        assert b.can_execute()
        b.record_success(duration)


# -- seed API and consecutive mode --------------------------------------------------------


def test_seed_snippet_opens_after_five_failures_and_rejects() -> None:
    breaker = CircuitBreaker(failure_threshold=5, timeout=60.0)
    ran = 0
    for _ in range(8):
        if breaker.can_execute():
            ran += 1
            try:
                raise ConnectionError("down")
            except Exception:
                breaker.record_failure()
    assert ran == 5
    assert breaker.state is OPEN
    assert breaker.state == "open"  # str enum: seed code comparing to strings keeps working
    assert breaker.failure_count == 5
    assert breaker.snapshot().not_permitted_calls == 3


def test_success_resets_consecutive_count(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=3, timeout=10, clock=clock)
    fail(b, 2)
    succeed(b, 1)
    assert b.failure_count == 0
    fail(b, 2)
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN


def test_open_waits_timeout_then_half_open_probe_closes(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=timedelta(seconds=60), clock=clock)
    fail(b, 1)
    clock.advance(59.9)
    assert not b.can_execute()
    assert b.state is OPEN
    clock.advance(0.1)
    assert b.state is OPEN  # reading state never transitions
    assert b.can_execute()
    assert b.state is HALF_OPEN
    assert not b.can_execute()  # single probe permit taken
    b.record_success()
    assert b.state is CLOSED
    assert b.can_execute()


def test_probe_failure_reopens_for_full_timeout(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=10, clock=clock)
    fail(b, 1)
    clock.advance(10)
    assert b.can_execute()
    b.record_failure()
    assert b.state is OPEN
    assert b.retry_after() == 10.0
    assert b.snapshot().open_until == clock.now() + 10


def test_retry_after_values(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=30, clock=clock)
    assert b.retry_after() is None
    fail(b, 1)
    assert b.retry_after() == 30.0
    clock.advance(12.5)
    assert b.retry_after() == 17.5
    clock.advance(100)
    assert b.retry_after() == 0.0  # eligible, not yet probed
    assert b.can_execute()
    assert b.retry_after() is None  # half-open
    b.force_open()
    assert b.retry_after() is None


def test_slow_calls_ignored_in_consecutive_mode(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=2, clock=clock)
    succeed(b, 50, duration=1e6)
    assert b.state is CLOSED
    assert b.snapshot().failure_rate is None


# -- half-open probes and open-time growth ------------------------------------------------


def test_half_open_probe_limit_and_success_threshold(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_threshold=1, timeout=5, half_open_max_calls=3, success_threshold=4, clock=clock
    )
    fail(b, 1)
    clock.advance(5)
    assert [b.can_execute() for _ in range(5)] == [True, True, True, False, False]
    b.record_success()  # frees a permit, 1 of 4 successes
    assert b.state is HALF_OPEN
    assert b.can_execute()
    assert not b.can_execute()
    b.release()  # a cancelled probe gives its permit back without counting
    assert b.can_execute()
    b.record_success()
    b.record_success()
    assert b.state is HALF_OPEN
    b.record_success()
    assert b.state is CLOSED
    assert b.snapshot().not_permitted_calls == 3


def test_release_outside_half_open_is_harmless(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    b.release()
    fail(b, 1)
    b.release()
    clock.advance(5)
    assert b.can_execute()
    b.release()
    b.release()  # extra releases do not mint permits
    assert b.can_execute()
    assert not b.can_execute()


def test_timeout_grows_is_capped_and_resets_after_close(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_threshold=1, timeout=10, timeout_multiplier=2.0, max_timeout=35, clock=clock
    )
    fail(b, 1)
    seen = []
    for _ in range(4):
        seen.append(b.snapshot().current_timeout)
        clock.advance(b.retry_after() or 0)
        assert b.can_execute()
        b.record_failure()
    seen.append(b.snapshot().current_timeout)
    assert seen == [10, 20, 35, 35, 35]
    clock.advance(35)
    assert b.can_execute()
    b.record_success()
    assert b.state is CLOSED
    assert b.snapshot().current_timeout == 10
    fail(b, 1)
    assert b.retry_after() == 10


def test_reset_clears_growth(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=10, timeout_multiplier=3.0, clock=clock)
    fail(b, 1)
    clock.advance(10)
    b.can_execute()
    b.record_failure()
    assert b.snapshot().current_timeout == 30
    b.reset()
    assert b.state is CLOSED
    assert b.snapshot().current_timeout == 10


def test_stale_outcomes_while_open_only_count(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=2, timeout=10, clock=clock)
    assert b.can_execute() and b.can_execute() and b.can_execute()
    b.record_failure()
    b.record_failure()
    assert b.state is OPEN
    b.record_success()  # the third call, permitted before the trip, finishes late
    assert b.state is OPEN
    s = b.snapshot()
    assert (s.successful_calls, s.failed_calls, s.consecutive_failures) == (1, 2, 2)


# -- rate mode: count window --------------------------------------------------------------


def test_count_window_failure_rate(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_rate_threshold=0.5, window="count", window_size=10, minimum_calls=4, clock=clock
    )
    succeed(b, 10)
    fail(b, 4)  # window: 6 successes, 4 failures
    assert b.state is CLOSED
    assert b.snapshot().failure_rate == 0.4
    assert b.failure_count == 4
    fail(b, 1)  # 5/10
    assert b.state is OPEN
    assert b.snapshot().failure_rate == 0.5


def test_count_window_forgets_oldest_outcomes(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_rate_threshold=0.5, window_size=4, minimum_calls=4, clock=clock)
    fail(b, 1)
    succeed(b, 2)
    assert b.snapshot().buffered_calls == 3
    succeed(b, 3)  # the failure has fallen out
    s = b.snapshot()
    assert (s.buffered_calls, s.failure_rate) == (4, 0.0)
    fail(b, 1)
    assert b.snapshot().failure_rate == 0.25
    fail(b, 1)
    assert b.state is OPEN


def test_minimum_calls_gates_the_rate(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_rate_threshold=0.5, window_size=100, minimum_calls=5, clock=clock)
    fail(b, 4)
    assert b.state is CLOSED
    assert b.snapshot().failure_rate is None
    b.can_execute()
    b.record_success()  # 4/5 failures: the success that reaches minimum_calls trips it
    assert b.state is OPEN


def test_minimum_calls_capped_by_count_window(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_rate_threshold=1.0, window_size=3, minimum_calls=10, clock=clock)
    fail(b, 3)
    assert b.state is OPEN


def test_slow_call_rate_opens(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_rate_threshold=0.9,
        window_size=10,
        minimum_calls=4,
        slow_call_duration=2.0,
        slow_call_rate_threshold=0.5,
        clock=clock,
    )
    succeed(b, 2, duration=1.99)
    succeed(b, 1, duration=None)  # no duration: never slow
    succeed(b, 1, duration=2.0)  # at the threshold counts as slow
    assert b.snapshot().slow_call_rate == 0.25
    fail(b, 1, duration=5.0)  # a slow failure counts as both
    s = b.snapshot()
    assert (s.failure_rate, s.slow_call_rate, s.state) == (0.2, 0.4, CLOSED)
    succeed(b, 1, duration=3.0)
    assert b.state is OPEN
    assert b.snapshot().slow_call_rate == 0.5


def test_slow_probe_reopens_in_rate_mode(clock: FakeClock) -> None:
    b = CircuitBreaker(
        timeout=10,
        failure_rate_threshold=0.5,
        window_size=2,
        minimum_calls=2,
        slow_call_duration=1.0,
        clock=clock,
    )
    fail(b, 2)
    clock.advance(10)
    assert b.can_execute()
    b.record_success(duration=0.5)  # fast probe: closes (success_threshold=1)
    assert b.state is CLOSED
    fail(b, 2)
    clock.advance(10)
    assert b.can_execute()
    b.record_success(duration=1.5)
    assert b.state is OPEN


def test_window_cleared_on_half_open_and_close(clock: FakeClock) -> None:
    b = CircuitBreaker(
        timeout=1, failure_rate_threshold=0.5, window_size=10, minimum_calls=2, clock=clock
    )
    fail(b, 2)
    assert b.snapshot().buffered_calls == 2  # kept while open, for telemetry
    clock.advance(1)
    assert b.can_execute()
    assert b.snapshot().buffered_calls == 0
    b.record_success()
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is CLOSED  # 1 call < minimum_calls: the old failures are gone


# -- rate mode: time window ---------------------------------------------------------------


def test_time_window_expires_buckets_with_time(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_rate_threshold=0.5, window="time", window_size=10, minimum_calls=3, clock=clock
    )
    succeed(b, 3)  # second 1000
    clock.advance(5)
    fail(b, 2)  # second 1005: 2/5 failures
    assert b.snapshot().failure_rate == 0.4
    clock.advance(4.5)  # 1009.5: bucket 1000 is still in the window
    assert b.snapshot().buffered_calls == 5
    clock.advance(0.5)  # 1010.0: bucket 1000 expires without any call arriving
    s = b.snapshot()
    assert (s.buffered_calls, s.failure_rate) == (2, None)  # below minimum_calls
    assert b.failure_count == 2
    succeed(b, 1)  # 2/3 now that the old successes are gone (2/6 had they stayed)
    assert b.state is OPEN


def test_time_window_long_gap_clears_everything(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_rate_threshold=0.5, window="time", window_size=10, minimum_calls=3, clock=clock
    )
    fail(b, 2)
    clock.advance(3600)
    assert b.snapshot().buffered_calls == 0
    fail(b, 1)
    assert b.state is CLOSED  # the two old failures must not combine with this one
    succeed(b, 2)
    assert b.state is CLOSED
    assert b.snapshot().failure_rate == pytest.approx(1 / 3)


class _CountedBuckets(list[int]):
    """A time window's per-second buckets that count each read and write, failing at once
    past ``limit``: the work a call did on the window, counted instead of timed (a walk over
    every idle second of a long gap fails here at once instead of running for minutes)."""

    def __init__(self, buckets: list[int], limit: int) -> None:
        super().__init__(buckets)
        self.limit, self.touched = limit, 0

    def _touch(self) -> None:
        self.touched += 1
        assert self.touched <= self.limit, f"more than {self.limit} bucket reads and writes"

    def __getitem__(self, index: Any) -> Any:
        self._touch()
        return super().__getitem__(index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._touch()
        super().__setitem__(index, value)


def test_time_window_gap_costs_no_more_than_the_window(clock: FakeClock) -> None:
    """A service idle for years must not walk one bucket per idle second on its next call."""
    b = CircuitBreaker(
        failure_rate_threshold=0.5, window="time", window_size=60, minimum_calls=1, clock=clock
    )
    succeed(b, 1)
    clock.advance(10**8)
    window = b._window
    counted = []
    for name in ("_b_calls", "_b_failures", "_b_slows"):
        # a few passes over the 60 buckets at most, never one per idle second (10**8)
        counted.append(_CountedBuckets(getattr(window, name), limit=3 * 60))
        setattr(window, name, counted[-1])
    succeed(b, 1)
    assert b.snapshot().buffered_calls == 1
    assert all(buckets.touched <= buckets.limit for buckets in counted)


def test_time_window_partial_gap_expires_only_old_buckets(clock: FakeClock) -> None:
    b = CircuitBreaker(
        failure_rate_threshold=0.9, window="time", window_size=5, minimum_calls=1, clock=clock
    )
    for _ in range(5):
        succeed(b, 1)
        clock.advance(1)
    # Buckets 1000..1004 hold one success each; now = 1005 so 1000 has expired.
    assert b.snapshot().buffered_calls == 4
    clock.advance(2)  # now 1007: window 1003..1007
    assert b.snapshot().buffered_calls == 2


# -- manual modes -------------------------------------------------------------------------


def test_forced_open_rejects_and_counts(clock: FakeClock) -> None:
    b = CircuitBreaker(clock=clock)
    b.force_open()
    assert b.state is CircuitState.FORCED_OPEN
    clock.advance(10_000)
    assert not b.can_execute()
    assert not b.can_execute()
    assert b.snapshot().not_permitted_calls == 2
    assert b.snapshot().open_until is None
    b.reset()
    assert b.state is CLOSED
    assert b.can_execute()


def test_disabled_permits_and_counts_nothing(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, clock=clock)
    b.disable()
    fail(b, 20)
    succeed(b, 3)
    s = b.snapshot()
    assert s.state is CircuitState.DISABLED
    assert (s.failed_calls, s.successful_calls, s.consecutive_failures) == (0, 0, 0)


def test_metrics_only_counts_but_never_trips(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_rate_threshold=0.5, window_size=10, minimum_calls=2, clock=clock)
    b.metrics_only()
    fail(b, 10)
    s = b.snapshot()
    assert s.state is CircuitState.METRICS_ONLY
    assert (s.failure_rate, s.failed_calls, s.consecutive_failures) == (1.0, 10, 10)
    b.reset()
    assert b.snapshot().buffered_calls == 0
    assert b.snapshot().failed_calls == 10  # cumulative counters survive reset


def test_metrics_only_in_consecutive_mode(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=2, clock=clock)
    b.metrics_only()
    fail(b, 5)
    assert b.failure_count == 5
    assert b.state is CircuitState.METRICS_ONLY


def test_reset_from_open_and_half_open(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    fail(b, 1)
    b.reset()
    assert b.state is CLOSED and b.failure_count == 0
    fail(b, 1)
    clock.advance(5)
    assert b.can_execute()
    b.reset()
    assert b.state is CLOSED
    assert all(b.can_execute() for _ in range(3))


def test_probe_now_ends_the_open_time_and_the_next_calls_decide(clock: FakeClock) -> None:
    """An outside signal (a router sending traffic back) ends the open time early: the
    breaker goes half-open with the reason given, and its probes decide as ever (a failed
    one opens it again, for longer). The signal counts as no call."""
    seen: list[StateTransition] = []
    b = CircuitBreaker(
        failure_threshold=1, timeout=30, timeout_multiplier=2, clock=clock, listeners=[seen.append]
    )
    fail(b, 1)
    assert not b.can_execute()
    counted = b.snapshot()
    assert b.probe_now("router_back") is True
    assert b.state is HALF_OPEN and b.snapshot().successful_calls == counted.successful_calls
    assert b.can_execute() and not b.can_execute()  # half_open_max_calls=1: one probe
    b.record_failure()
    assert b.state is OPEN and b.snapshot().current_timeout == 60.0
    assert b.probe_now() is True
    succeed(b, 1)
    assert b.state is CLOSED
    assert [(t.from_state.value, t.to_state.value, t.reason) for t in seen] == [
        ("closed", "open", "failure_threshold"),
        ("open", "half_open", "router_back"),
        ("half_open", "open", "probe_failed"),
        ("open", "half_open", "probe_now"),
        ("half_open", "closed", "probes_succeeded"),
    ]


@pytest.mark.parametrize("mode", ["closed", "half_open", "force_open", "disable", "metrics_only"])
def test_probe_now_leaves_every_other_state_alone(clock: FakeClock, mode: str) -> None:
    """Only an open time ends: a breaker forced open stays so (the operator's word), and the
    others already let calls through; a half-open one keeps its probe out."""
    seen: list[StateTransition] = []
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock, listeners=[seen.append])
    if mode == "half_open":
        fail(b, 1)
        clock.advance(5)
        assert b.can_execute()  # the probe is out
    elif mode != "closed":
        getattr(b, mode)()
    state, before, transitions = b.state, b.snapshot(), len(seen)
    assert b.probe_now() is False
    assert (b.state, b.snapshot(), len(seen)) == (state, before, transitions)


# -- listeners ----------------------------------------------------------------------------


def test_listeners_see_transitions_in_order(clock: FakeClock) -> None:
    seen: list[StateTransition] = []
    b = CircuitBreaker(
        failure_threshold=2, timeout=5, name="db", clock=clock, listeners=[seen.append]
    )
    fail(b, 2)
    clock.advance(5)
    b.can_execute()
    b.record_failure()
    clock.advance(5)
    b.can_execute()
    b.record_success()
    b.force_open()
    b.force_open()  # no change, no event
    b.disable()
    b.metrics_only()
    b.reset()
    b.reset()
    got = [(t.from_state.value, t.to_state.value, t.reason) for t in seen]
    assert got == [
        ("closed", "open", "failure_threshold"),
        ("open", "half_open", "timeout_elapsed"),
        ("half_open", "open", "probe_failed"),
        ("open", "half_open", "timeout_elapsed"),
        ("half_open", "closed", "probes_succeeded"),
        ("closed", "forced_open", "force_open"),
        ("forced_open", "disabled", "disable"),
        ("disabled", "metrics_only", "metrics_only"),
        ("metrics_only", "closed", "reset"),
    ]
    assert all(t.name == "db" for t in seen)
    assert [t.at for t in seen[:3]] == [1000.0, 1005.0, 1005.0]


def test_rate_transition_reasons(clock: FakeClock) -> None:
    seen: list[StateTransition] = []
    b = CircuitBreaker(
        failure_rate_threshold=0.5,
        window_size=2,
        minimum_calls=2,
        slow_call_duration=1,
        timeout=1,
        clock=clock,
        listeners=[seen.append],
    )
    fail(b, 2)
    clock.advance(1)
    b.can_execute()
    b.record_success(duration=9)
    b.reset()
    succeed(b, 2, duration=9)
    assert [t.reason for t in seen] == [
        "failure_rate",
        "timeout_elapsed",
        "probe_slow",
        "reset",
        "slow_call_rate",
    ]


def test_unsubscribe(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=1, clock=clock)
    a: list[StateTransition] = []
    c: list[StateTransition] = []
    unsubscribe = b.add_listener(a.append)
    b.add_listener(c.append)
    b.force_open()
    unsubscribe()
    unsubscribe()  # idempotent
    b.reset()
    assert len(a) == 1
    assert len(c) == 2


def test_raising_listener_is_logged_once_and_others_still_run(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[CircuitState] = []

    def broken(t: StateTransition) -> None:
        raise RuntimeError("listener bug")

    b = CircuitBreaker(failure_threshold=1, clock=clock, listeners=[broken])
    b.add_listener(lambda t: seen.append(t.to_state))
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        fail(b, 1)
        b.reset()
        fail(b, 1)
    assert seen == [OPEN, CLOSED, OPEN]
    assert b.state is OPEN
    errors = [r for r in caplog.records if r.name == "otel_recovery"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "listener bug"


def test_listener_may_call_back_into_breaker(clock: FakeClock) -> None:
    seen: list[str] = []
    b = CircuitBreaker(failure_threshold=1, clock=clock)

    def on_transition(t: StateTransition) -> None:
        seen.append(t.to_state.value)
        if t.to_state is OPEN:
            assert b.snapshot().state is OPEN  # no deadlock: the lock is released
            b.force_open()  # re-entrant transition is queued, delivered after this one

    b.add_listener(on_transition)
    fail(b, 1)
    assert seen == ["open", "forced_open"]


# -- snapshot, errors, validation ---------------------------------------------------------


def test_snapshot_fields(clock: FakeClock) -> None:
    b = CircuitBreaker(failure_threshold=3, timeout=7, clock=clock)
    succeed(b, 2)
    fail(b, 3)
    b.can_execute()
    assert b.snapshot() == BreakerSnapshot(
        state=OPEN,
        failure_rate=None,
        slow_call_rate=None,
        buffered_calls=0,
        consecutive_failures=3,
        successful_calls=2,
        failed_calls=3,
        not_permitted_calls=1,
        open_until=1007.0,
        current_timeout=7.0,
    )


def test_circuit_open_error() -> None:
    e = CircuitOpenError("payments", 12.34)
    assert (e.name, e.retry_after) == ("payments", 12.34)
    assert str(e) == "circuit 'payments' is open; retry after 12.3s"
    assert str(CircuitOpenError("x", None)) == "circuit 'x' is open"
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.name, copy.retry_after, str(copy)) == ("payments", 12.34, str(e))


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"failure_threshold": 0}, ValueError, ["failure_threshold", ">= 1", "0"]),
        ({"failure_threshold": 2.5}, TypeError, ["failure_threshold", "2.5"]),
        ({"failure_threshold": True}, TypeError, ["failure_threshold"]),
        ({"timeout": -1}, ValueError, ["timeout", "-1"]),
        ({"timeout": "60"}, TypeError, ["timeout", "str"]),
        (
            {"failure_rate_threshold": 50},
            ValueError,
            ["failure_rate_threshold must be in (0, 1], got 50; did you mean 0.5?"],
        ),
        ({"failure_rate_threshold": 0}, ValueError, ["failure_rate_threshold", "(0, 1]", "0"]),
        ({"failure_rate_threshold": 500}, ValueError, ["failure_rate_threshold", "500"]),
        ({"slow_call_rate_threshold": 1.5}, ValueError, ["slow_call_rate_threshold", "1.5"]),
        (
            {"failure_rate_threshold": 0.5, "window": "sliding"},
            ValueError,
            ["window", "'count' or 'time'", "sliding"],
        ),
        (
            {"failure_rate_threshold": 0.5, "window_size": 0},
            ValueError,
            ["window_size", ">= 1", "0"],
        ),
        (
            {"failure_rate_threshold": 0.5, "window_size": 10.0},
            TypeError,
            ["window_size", "window='count'", "10.0"],
        ),
        (
            {"failure_rate_threshold": 0.5, "window": "time", "window_size": 2.5},
            ValueError,
            ["window_size", "whole number of seconds", "2.5"],
        ),
        ({"minimum_calls": 0}, ValueError, ["minimum_calls", "0"]),
        ({"slow_call_duration": 1.0}, ValueError, ["slow_call_duration", "failure_rate_threshold"]),
        (
            {"failure_rate_threshold": 0.5, "slow_call_duration": 0},
            ValueError,
            ["slow_call_duration", "> 0"],
        ),
        ({"half_open_max_calls": 0}, ValueError, ["half_open_max_calls", "0"]),
        ({"success_threshold": -1}, ValueError, ["success_threshold", "-1"]),
        ({"timeout_multiplier": 0.5}, ValueError, ["timeout_multiplier", ">= 1", "0.5"]),
        ({"timeout_multiplier": "2"}, TypeError, ["timeout_multiplier"]),
        ({"timeout": 60, "max_timeout": 30}, ValueError, ["max_timeout", ">= timeout", "30"]),
        ({"clock": object()}, TypeError, ["clock"]),
        ({"listeners": [42]}, TypeError, ["listeners", "42"]),
        ({"listeners": 5}, TypeError, ["listeners", "iterable of callables", "5"]),
        # checked in consecutive mode too, where they would have waited for rate mode
        ({"window": "x"}, ValueError, ["window", "'count' or 'time'", "'x'"]),
        ({"window_size": 0}, ValueError, ["window_size", ">= 1", "0"]),
        ({"window_size": "big"}, TypeError, ["window_size", "'big'"]),
        ({"name": ""}, ValueError, ["name"]),
        ({"name": 3}, TypeError, ["name"]),
    ],
)
def test_validation_messages(
    kwargs: dict[str, object], exc: type[Exception], fragments: list[str]
) -> None:
    with pytest.raises(exc) as info:
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(info.value)


def test_accepts_timedeltas() -> None:
    b = CircuitBreaker(
        timeout=timedelta(seconds=30),
        max_timeout=timedelta(minutes=5),
        failure_rate_threshold=0.5,
        window="time",
        window_size=timedelta(minutes=1),
        slow_call_duration=timedelta(milliseconds=500),
    )
    assert b.timeout == 30.0
    assert b.snapshot().current_timeout == 30.0


# -- concurrency --------------------------------------------------------------------------

THREADS = 64
ITERATIONS = 1000


def test_threads_count_exactly() -> None:
    b = CircuitBreaker(failure_threshold=10**9)
    barrier = threading.Barrier(THREADS)
    rejected = []

    def worker(i: int) -> None:
        barrier.wait()
        for n in range(ITERATIONS):
            if not b.can_execute():
                rejected.append(i)
            if (n + i) % 3 == 0:
                b.record_failure()
            else:
                b.record_success()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected_failures = sum(
        1 for i in range(THREADS) for n in range(ITERATIONS) if (n + i) % 3 == 0
    )
    s = b.snapshot()
    assert not rejected
    assert s.failed_calls == expected_failures
    assert s.successful_calls + s.failed_calls == THREADS * ITERATIONS


def test_threads_count_exactly_in_rate_mode() -> None:
    b = CircuitBreaker(failure_rate_threshold=1.0, window_size=1000, minimum_calls=1000)
    barrier = threading.Barrier(THREADS)

    def worker() -> None:
        barrier.wait()
        for n in range(ITERATIONS):
            assert b.can_execute()
            if n % 2:
                b.record_failure(0.0)
            else:
                b.record_success(0.0)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = b.snapshot()
    assert (s.successful_calls, s.failed_calls) == (THREADS * ITERATIONS // 2,) * 2
    assert s.buffered_calls == 1000


async def test_asyncio_tasks_count_exactly() -> None:
    b = CircuitBreaker(failure_threshold=10**9)

    async def worker(i: int) -> None:
        for n in range(ITERATIONS):
            assert b.can_execute()
            await asyncio.sleep(0)
            if (n * 7 + i) % 5 == 0:
                b.record_failure()
            else:
                b.record_success()
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(i) for i in range(THREADS)))
    expected_failures = sum(
        1 for i in range(THREADS) for n in range(ITERATIONS) if (n * 7 + i) % 5 == 0
    )
    s = b.snapshot()
    assert s.failed_calls == expected_failures
    assert s.successful_calls == THREADS * ITERATIONS - expected_failures


def test_half_open_permits_are_exact_under_a_thread_race(clock: FakeClock) -> None:
    for _ in range(20):
        b = CircuitBreaker(failure_threshold=1, timeout=1, half_open_max_calls=3, clock=clock)
        fail(b, 1)
        clock.advance(1)
        transitions: list[StateTransition] = []
        b.add_listener(transitions.append)
        barrier = threading.Barrier(THREADS)
        granted: list[bool] = []

        def worker() -> None:
            barrier.wait()
            granted.append(b.can_execute())  # list.append is atomic

        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert granted.count(True) == 3
        assert b.snapshot().not_permitted_calls == THREADS - 3
        assert [t.to_state for t in transitions] == [HALF_OPEN]  # one transition, not 64
        assert b.state is HALF_OPEN


def test_would_refuse_answers_as_can_execute_would_without_taking_a_permit():
    """A pool's health check asks this (instrumentors/_health_checks.py): it must not spend
    the half-open probe, nor move OPEN to HALF_OPEN, by asking."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, timeout=10.0, name="pg", clock=clock)
    assert not breaker.would_refuse()  # closed
    breaker.record_failure()
    assert breaker.would_refuse() and not breaker.can_execute()
    clock.advance(10.0)
    assert not breaker.would_refuse()
    assert breaker.state is CircuitState.OPEN  # asking moved nothing
    assert breaker.can_execute() and breaker.state is CircuitState.HALF_OPEN
    assert breaker.would_refuse() and not breaker.can_execute()  # the one permit is out
    breaker.release()
    assert not breaker.would_refuse() and breaker.can_execute()
    breaker.force_open()
    assert breaker.would_refuse()
    breaker.disable()
    assert not breaker.would_refuse()


# -- whose probe permit is whose --------------------------------------------------------------
# A call admitted while the breaker was closed (a straggler) that ends during the half-open
# period is no probe: its cancellation gives back no permit, and its outcome does not decide.


def _contexts(n: int) -> list:
    """Contexts of their own, made before any permit is taken, as other threads' or asyncio
    tasks' are (a task started later by a permit's holder inherits it)."""
    import contextvars

    return [contextvars.copy_context() for _ in range(n)]


def _elsewhere(fn, *args):
    return _contexts(1)[0].run(fn, *args)


def test_a_straggler_cancelled_in_half_open_does_not_free_the_probes_permit(clock):
    straggler, other = _contexts(2)
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    assert straggler.run(b.can_execute)  # admitted while closed
    fail(b, 1)
    clock.advance(5)
    assert b.can_execute()  # the probe, in this context
    straggler.run(b.release)  # the straggler is cancelled (asyncio.timeout)
    assert not other.run(b.can_execute)  # still one probe out: no second one
    b.release()  # the probe itself gives its permit back
    assert other.run(b.can_execute)


def test_a_stragglers_late_outcome_does_not_decide_the_half_open_circuit(clock):
    straggler, twin = _contexts(2)
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    assert straggler.run(b.can_execute)
    assert twin.run(b.can_execute)
    fail(b, 1)
    clock.advance(5)
    assert b.can_execute()
    straggler.run(b.record_success)  # answers late: not the probe's answer
    assert b.state is HALF_OPEN
    twin.run(b.record_failure)
    assert b.state is HALF_OPEN
    snapshot = b.snapshot()
    assert (snapshot.successful_calls, snapshot.failed_calls) == (1, 2)  # still counted
    b.record_success()  # the probe's answer closes it
    assert b.state is CLOSED


def test_a_probe_permit_abandoned_elsewhere_is_presumed_lost_after_its_lease(clock):
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    fail(b, 1)
    clock.advance(5)
    assert _elsewhere(b.can_execute)  # a probe whose holder never reports
    clock.advance(29.9)  # a probe to a stalled dependency is slow: no second one yet
    assert b.would_refuse() and not b.can_execute()
    clock.advance(0.1)  # out for 30 s (the open time if longer): presumed lost
    assert not b.would_refuse()  # a pool's health check may go through again too
    assert b.can_execute()
    b.record_success()
    assert b.state is CLOSED


def test_a_probe_presumed_lost_that_reports_late_is_no_probe(clock):
    """Past the lease a second probe goes out; the first one's late success closed the
    circuit while the second (to a dependency that may still be down) had not answered,
    and its failure then counted nowhere: two probes at once, decided by the stale one."""
    lost, second = _contexts(2)
    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    fail(b, 1)
    clock.advance(5)
    assert lost.run(b.can_execute)
    clock.advance(30)  # presumed lost
    assert second.run(b.can_execute)
    lost.run(b.record_success)  # the first probe answers after all
    assert b.state is HALF_OPEN  # counted as a straggler's: totals only
    assert b.snapshot().successful_calls == 1
    assert not b.can_execute()  # the second probe is still out
    second.run(b.record_failure)
    assert b.state is CircuitState.OPEN


def test_a_probe_of_an_earlier_half_open_period_is_no_probe_of_this_one(clock):
    first, second = _contexts(2)
    b = CircuitBreaker(failure_threshold=1, timeout=5, half_open_max_calls=2, clock=clock)
    fail(b, 1)
    clock.advance(5)
    assert b.can_execute() and first.run(b.can_execute)  # two probes of the first period
    first.run(b.record_failure)  # one fails: reopened
    assert b.state is CircuitState.OPEN
    clock.advance(5)
    assert second.run(b.can_execute)  # a probe of the second period
    b.record_success()  # the first period's other probe answers late
    assert b.state is HALF_OPEN
    second.run(b.record_success)
    assert b.state is CLOSED


async def test_stragglers_cut_by_asyncio_timeout_let_no_extra_probe_through(clock):
    """Thirty calls admitted while closed hang on a stalled dependency; the circuit trips
    and half-opens; its one probe hangs too; the thirty are cut by the application's
    ``asyncio.timeout``. Each cut used to give a permit back: thirty-one probes at once."""
    from otel_recovery import RecoveryPolicy

    b = CircuitBreaker(failure_threshold=1, timeout=5, clock=clock)
    policy = RecoveryPolicy(breaker=b, clock=clock, telemetry=False)
    stalled = asyncio.Event()
    started = 0

    async def call() -> str:
        nonlocal started
        started += 1
        await stalled.wait()
        return "late"

    stragglers = [asyncio.ensure_future(policy.acall(call)) for _ in range(30)]
    await asyncio.sleep(0)
    b.record_failure()  # the dependency fails: open
    clock.advance(5)
    probe = asyncio.ensure_future(policy.acall(call))
    await asyncio.sleep(0)
    assert b.state is HALF_OPEN and started == 31
    for straggler in stragglers:
        straggler.cancel()
    await asyncio.gather(*stragglers, return_exceptions=True)
    refused = await asyncio.wait_for(  # an admitted call would wait for ever: fail instead
        asyncio.gather(*(policy.acall(call) for _ in range(5)), return_exceptions=True), 5.0
    )
    assert all(isinstance(r, CircuitOpenError) for r in refused) and started == 31
    stalled.set()
    assert await probe == "late" and b.state is CLOSED
