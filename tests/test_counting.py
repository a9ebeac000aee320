"""The lock-free counters of the breakers and budgets (``policies/_counting.py``): the
compiled ``Counter`` where the extension is built, ``itertools.count`` otherwise. Both must
count the same, peek the same, and lose no count between threads."""

from __future__ import annotations

import copy
import itertools
import pickle
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from otel_recovery._compiled import SPEEDUPS
from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies._counting import new_counter, peek
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.retry import Retry
from otel_recovery.recover import RecoveryPolicy

KINDS: dict[str, Callable[[], Iterator[int]]] = {"itertools": itertools.count}
if SPEEDUPS is not None:
    KINDS["compiled"] = SPEEDUPS.Counter
compiled_only = pytest.mark.skipif(SPEEDUPS is None, reason="otel_recovery._speedups not built")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_next_returns_the_count_and_peek_does_not_advance(kind):
    counter = KINDS[kind]()
    assert [next(counter) for _ in range(3)] == [0, 1, 2]
    assert peek(counter) == 3
    assert peek(counter) == 3
    assert next(counter) == 3


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_threads_lose_no_count(kind):
    counter = KINDS[kind]()

    def count() -> None:
        for _ in range(20_000):
            next(counter)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peek(counter) == 80_000


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_copied_or_pickled_counter_goes_on_from_the_same_count(kind):
    counter = KINDS[kind]()
    next(counter)
    next(counter)
    for copy_of in (copy.copy(counter), copy.deepcopy(counter), _round_trip(counter)):
        assert peek(copy_of) == 2 and next(copy_of) == 2
    assert peek(counter) == 2  # the original did not move


def _round_trip(counter: Iterator[int]) -> Iterator[int]:
    if isinstance(counter, itertools.count) and sys.version_info >= (3, 14):
        return copy.copy(counter)  # itertools objects no longer pickle from 3.14 on
    copied: Iterator[int] = pickle.loads(pickle.dumps(counter))
    return copied


def test_new_counter_is_the_compiled_one_where_it_is_built():
    expected = itertools.count if SPEEDUPS is None else SPEEDUPS.Counter
    assert type(new_counter()) is expected


@compiled_only
def test_compiled_counter_start_repr_and_bad_input():
    assert SPEEDUPS is not None
    counter = SPEEDUPS.Counter(5)
    assert (next(counter), counter.value, repr(counter)) == (5, 6, "Counter(6)")
    with pytest.raises(ValueError, match="start must be >= 0"):
        SPEEDUPS.Counter(-1)
    last = SPEEDUPS.Counter(2**63 - 1)
    with pytest.raises(OverflowError, match="maximum"):
        next(last)
    assert last.value == 2**63 - 1  # nothing counted twice or lost on the error


def test_remembered_calls_deposit_and_tally_through_the_counters():
    """The compiled runner advances the counters in place: the budget's calls and the
    breaker's successes are exact after many happy calls."""
    clock = FakeClock()
    breaker = CircuitBreaker(3, timeout=10.0, clock=clock)
    budget = RetryBudget(ratio=0.5, min_per_second=1.0, ttl=2.0, clock=clock)
    policy = RecoveryPolicy(
        retry=Retry(3), breaker=breaker, budget=budget, clock=clock, telemetry=False
    )
    run = policy.runner()
    for _ in range(250):
        assert run(lambda: "ok", (), {}) == "ok"
    assert budget.total_calls == 250
    assert breaker.snapshot().successful_calls == 250


@compiled_only
def test_a_compiled_next_that_cannot_make_its_int_consumes_no_count():
    """Nothing is lost: when making the int fails, the count stays where it was."""
    testcapi = pytest.importorskip("_testcapi")
    if not hasattr(testcapi, "set_nomemory"):
        pytest.skip("this CPython's _testcapi cannot make allocations fail")
    assert SPEEDUPS is not None
    counter = SPEEDUPS.Counter(10_000)  # past the small ints CPython keeps made

    def next_with_no_memory() -> object:
        testcapi.set_nomemory(0, 1)  # the next allocation fails
        try:
            return next(counter)
        except MemoryError as error:
            return error
        finally:
            testcapi.remove_mem_hooks()

    assert isinstance(next_with_no_memory(), MemoryError)
    assert counter.value == 10_000
    assert next(counter) == 10_000
