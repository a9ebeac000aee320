"""``ErrorRecoveryInteraction`` keeps one breaker per service id, and no more idle ones than
``max_breakers``: ids made up per request grew it without bound."""

from __future__ import annotations

import gc

import pytest

from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.policies import CircuitState
from otel_recovery.stores import MemoryStore
from otel_recovery.testing import FakeClock


def _interaction(max_breakers: int = 4) -> ErrorRecoveryInteraction:
    return ErrorRecoveryInteraction(
        clock=FakeClock(), store=MemoryStore(), telemetry=False, max_breakers=max_breakers
    )


def test_idle_breakers_past_the_bound_are_forgotten_oldest_first():
    recovery = _interaction()
    for n in range(1000):
        recovery.get_circuit_breaker(f"user-{n}")
    assert sorted(recovery.circuit_breakers) == [f"user-{n}" for n in range(996, 1000)]


def test_a_breaker_with_state_to_keep_is_never_forgotten():
    """Open, forced open, or counting failures: forgetting it would send traffic to a
    service known to be failing, or lose failures on the way to opening."""
    recovery = _interaction()
    recovery.get_circuit_breaker("down").record_failure()
    for _ in range(5):
        recovery.get_circuit_breaker("down").record_failure()
    recovery.get_circuit_breaker("isolated").force_open()
    recovery.get_circuit_breaker("flaky").record_failure()
    for n in range(100):
        recovery.get_circuit_breaker(f"user-{n}")
    kept = recovery.circuit_breakers
    assert kept["down"].state is CircuitState.OPEN
    assert kept["isolated"].state is CircuitState.FORCED_OPEN
    assert kept["flaky"].failure_count == 1
    assert len(kept) == 4  # the three, and the newest idle one


def test_a_forgotten_breaker_still_held_comes_back_with_its_state():
    """A caller (or a policy) holding the breaker must never see a second one for the
    same service."""
    recovery = _interaction(max_breakers=2)
    held = recovery.get_circuit_breaker("pay")
    for n in range(10):
        recovery.get_circuit_breaker(f"user-{n}")
    assert "pay" not in recovery.circuit_breakers
    held.force_open()
    assert recovery.get_circuit_breaker("pay") is held
    assert recovery.get_circuit_breaker("pay").state is CircuitState.FORCED_OPEN


def test_a_forgotten_breaker_nobody_holds_is_released():
    recovery = _interaction(max_breakers=2)
    recovery.get_circuit_breaker("gone")
    for n in range(10):
        recovery.get_circuit_breaker(f"user-{n}")
    gc.collect()
    assert recovery.get_circuit_breaker("gone").state is CircuitState.CLOSED
    assert len(recovery.circuit_breakers) == 2


def test_a_recently_used_breaker_outlives_older_idle_ones():
    recovery = _interaction(max_breakers=3)
    for name in ("a", "b", "c"):
        recovery.get_circuit_breaker(name)
    recovery.get_circuit_breaker("a")  # used again: now the most recent
    recovery.get_circuit_breaker("d")
    assert sorted(recovery.circuit_breakers) == ["a", "c", "d"]


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_max_breakers_must_be_a_positive_int(value, error):
    with pytest.raises(error, match="max_breakers must be an int >= 1"):
        ErrorRecoveryInteraction(store=MemoryStore(), telemetry=False, max_breakers=value)


@pytest.mark.parametrize("failures", [1, 5], ids=["failed_once", "opened"])
def test_many_ids_that_failed_do_not_stop_the_forgetting(failures):
    """The scan looked at the 64 oldest breakers only and skipped busy ones where they
    were: 64 ids that had failed (once, or enough to open) and were never asked for again
    blocked it for good, and the registry grew without bound again."""
    recovery = _interaction(max_breakers=100)
    for n in range(64):
        breaker = recovery.get_circuit_breaker(f"failed-{n}")
        for _ in range(failures):
            breaker.record_failure()
    for n in range(2_000):  # 1,900 past the bound: each had to forget one
        recovery.get_circuit_breaker(f"user-{n}")
    kept = recovery.circuit_breakers
    assert len(kept) <= 100 + (64 if failures == 5 else 0)  # open circuits are kept
    if failures == 5:
        assert all(kept[f"failed-{n}"].state is CircuitState.OPEN for n in range(64))
