"""The only place in otel_recovery that reads time or sleeps.

Every policy takes a ``Clock``. Production code gets :data:`SYSTEM_CLOCK` (monotonic time,
``time.sleep`` and ``asyncio.sleep``, or ``trio.sleep`` under trio); tests pass
:class:`otel_recovery.testing.FakeClock`, whose sleeps advance virtual time, so no test
ever waits for real.

Monotonic time drives every decision (deadlines, windows, open-circuit timers) because the
wall clock jumps. The wall clock is read only to interpret HTTP dates (``Retry-After``) and
to timestamp telemetry, through :meth:`Clock.wall`.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable
from datetime import timedelta
from typing import Protocol, TypeVar, runtime_checkable

from otel_recovery._trio import running_trio

__all__ = [
    "MAX_SECONDS",
    "SYSTEM_CLOCK",
    "Clock",
    "Duration",
    "MonotonicClock",
    "async_sleep",
    "clock_or_default",
    "to_seconds",
    "within",
]

Duration = float | int | timedelta
"""Every time parameter accepts float seconds or a :class:`datetime.timedelta`."""


@runtime_checkable
class Clock(Protocol):
    """Time source and sleeper used by every policy."""

    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""

    def wall(self) -> float:
        """Seconds since the epoch, for HTTP dates and telemetry timestamps."""

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""


async def async_sleep(seconds: float) -> None:
    """``asyncio.sleep``, or ``trio.sleep`` when the calling task runs under trio (httpx,
    hypercorn or a coroutine there: no asyncio loop, so ``asyncio.sleep`` would raise)."""
    trio = running_trio()
    if trio is not None:
        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


_T = TypeVar("_T")


async def within(seconds: float, awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` for at most ``seconds`` (``asyncio.TimeoutError`` past them),
    keeping a cancellation that lands just as it finishes.

    ``asyncio.wait_for`` before Python 3.12 returns normally then, and the cancelled task
    goes on (writes what its caller had given up on): ``asyncio.timeout`` (3.11+) does not.
    Python 3.10 has only ``wait_for``."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


class MonotonicClock:
    """The real clock: ``time.monotonic``, ``time.time``, ``time.sleep``, ``asyncio.sleep``."""

    __slots__ = ()

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def sleep(self, seconds: float) -> None:
        # ``time.sleep`` looked up per call, not bound at import: gevent and eventlet replace
        # it when they monkey-patch, which under gunicorn's gevent worker happens after
        # opentelemetry-instrument imported us. The original would stop every greenlet of
        # the worker for the whole backoff, not just the one retrying.
        time.sleep(min(seconds, MAX_SECONDS))  # past about 292 years it would overflow

    asleep = staticmethod(async_sleep)

    def __repr__(self) -> str:
        return "MonotonicClock()"


SYSTEM_CLOCK: Clock = MonotonicClock()


def clock_or_default(clock: object) -> Clock:
    """``clock``, or :data:`SYSTEM_CLOCK` for None; anything else that is not a
    :class:`Clock` is refused where it is passed in, not met as an ``AttributeError`` on the
    first failure, when the policy asks it for the time."""
    if clock is None:
        return SYSTEM_CLOCK
    if isinstance(clock, type) or not isinstance(clock, Clock):  # a class passes the check
        raise TypeError(
            f"clock must implement otel_recovery Clock (now, wall, sleep, asleep), got {clock!r}; "
            "pass otel_recovery.testing.FakeClock() (an instance) in tests, or leave it out"
        )
    return clock


MAX_SECONDS = 1e9
"""The longest finite duration a parameter takes, about 31 years: past it ``time.sleep``,
lock timeouts, ``Retry-After`` headers and store TTLs overflow, so a setting that large
would surface as an ``OverflowError`` in the middle of a failure instead of at start-up."""


def to_seconds(
    value: Duration | None, name: str, *, allow_none: bool = False, allow_inf: bool = False
) -> float:
    """Normalise a duration parameter to float seconds, rejecting nonsense early.

    Raises ``TypeError``/``ValueError`` naming the parameter, so configuration mistakes
    surface at construction time rather than at the first failure in production. A duration
    is finite and at most :data:`MAX_SECONDS`; ``allow_inf`` lifts the bound, ``float("inf")``
    included, where the parameter may mean "no bound" (a cap, a patience, a deadline) and
    the code that reads it only compares with it or caps what it computes from it.
    """
    if value is None:
        if allow_none:
            return float("inf")
        raise TypeError(f"{name} must be a number of seconds or a timedelta, not None")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds or a timedelta, got {type(value).__name__}"
        )
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    if seconds > MAX_SECONDS and not allow_inf:
        raise ValueError(
            f"{name} must be at most {MAX_SECONDS:g} seconds (about 31 years), got {value!r}"
        )
    return seconds
