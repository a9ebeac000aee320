"""A failed call leaves no reference cycle behind.

An exception's traceback holds every frame it passed through; a frame that also keeps the
exception in a local closes a cycle that only the garbage collector frees, and until it runs
every frame of the failed call stays alive with all its locals (request bodies, responses,
rows). Under a burst of failures that is memory held for no one. These tests keep the
collector off and check, through weak references, that each exception of a failed call
(every attempt's, the rejection, the one a fallback answered for) is freed the moment the
application lets go of it. The instrumentors' equivalents are in their own test files.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest
from cycles import collected, ours

from otel_recovery.policies import CircuitBreaker, Fallback, Retry
from otel_recovery.recover import RecoveryPolicy, recover
from otel_recovery.testing import FakeClock


@pytest.fixture(autouse=True)
def no_collector() -> Iterator[None]:
    """Only reference counting frees anything while a test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Outage(ConnectionError):
    """A retryable failure that, unlike the built-in ones, weak references can point at."""


class Failing:
    """A function failing ``times`` times (then answering ``"ok"``), keeping only weak
    references to the exceptions it raised."""

    def __init__(self, times: int = 99) -> None:
        self.times = times
        self.raised: list[weakref.ref[BaseException]] = []

    def __call__(self) -> str:
        if len(self.raised) < self.times:
            error = Outage(f"attempt {len(self.raised) + 1}")
            self.raised.append(weakref.ref(error))
            try:
                raise error
            finally:
                del error  # or this frame itself would close a cycle
        return "ok"

    def alive(self) -> list[BaseException]:
        return [error for ref in self.raised if (error := ref()) is not None]


def _policy(**components: object) -> RecoveryPolicy:
    clock = FakeClock()
    return RecoveryPolicy(clock=clock, **components)  # type: ignore[arg-type]


def test_a_call_that_gives_up_frees_every_attempts_exception() -> None:
    failing = Failing()
    with pytest.raises(ConnectionError):
        recover(_policy(retry=Retry(3)))(failing)()
    assert len(failing.raised) == 3
    assert failing.alive() == []


def test_a_recovered_call_frees_the_failed_attempts_exceptions() -> None:
    failing = Failing(times=2)
    assert recover(_policy(retry=Retry(3)))(failing)() == "ok"
    assert failing.alive() == []


def test_a_call_answered_by_a_fallback_frees_the_exceptions() -> None:
    failing = Failing()
    policy = _policy(retry=Retry(2), fallback=Fallback("cached"))
    assert recover(policy)(failing)() == "cached"
    assert len(failing.raised) == 2 and failing.alive() == []


def test_a_rejected_call_frees_the_rejection() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    breaker.record_failure()
    guarded = recover(RecoveryPolicy(breaker=breaker, clock=clock))(Failing())
    with pytest.raises(Exception) as raised:
        guarded()
    rejection = weakref.ref(raised.value)
    del raised
    assert rejection() is None


def test_an_awaited_call_that_gives_up_frees_every_attempts_exception() -> None:
    failing = Failing()

    @recover(_policy(retry=Retry(3)))
    async def call() -> str:
        return failing()

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await call()

    asyncio.run(main())
    assert len(failing.raised) == 3 and failing.alive() == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10's wait_for keeps a cycle of its own")
@pytest.mark.parametrize("ending", ["failed", "cut"])
def test_attempts_under_attempt_timeout_leave_no_cycle_of_ours(ending: str) -> None:
    """An attempt limit runs each attempt in a timeout scope; ``asyncio.wait_for``'s task
    kept each failed attempt's exception in a cycle. Real time, briefly: a cut attempt
    waits 20 ms."""
    failing = Failing()

    @recover(_policy(retry=Retry(3, attempt_timeout=0.02)))
    async def call() -> str:
        if ending == "cut":
            await asyncio.sleep(10)
        return failing()

    async def main() -> None:
        with pytest.raises((TimeoutError, Outage)):
            await call()

    gc.enable()  # collected() switches it off itself, and keeps what only it could free
    with collected() as garbage:
        asyncio.run(main())
    assert ours(garbage) == []
    assert failing.alive() == []
