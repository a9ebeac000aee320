"""Virtual time for tests, re-exported as :class:`otel_recovery.testing.FakeClock`.

Kept apart from ``testing.py`` so that the test kit's OpenTelemetry SDK imports are not
needed by code that only wants virtual time (the benchmarks' simulations, for one).
"""

from __future__ import annotations

import math

from otel_recovery._clock import Duration, async_sleep, to_seconds
from otel_recovery._forksafe import new_lock

__all__ = ["FakeClock"]


class FakeClock:
    """A clock whose sleeps advance virtual time instantly and are recorded.

    ``sleeps`` lists every sleep in order, which is what backoff tests assert on.
    ``asleep`` yields to the event loop once (``asyncio.sleep(0)``, or trio's) so tasks interleave
    as they would with real sleeps, without waiting.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self._lock = new_lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: Duration) -> None:
        """Move virtual time forward without recording a sleep."""
        delta = to_seconds(seconds, "seconds", allow_inf=True)  # virtual: no overflow
        if delta == math.inf:
            raise ValueError("seconds must be finite: virtual time cannot reach infinity")
        with self._lock:
            self._now += delta

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(0.0, seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await async_sleep(0)

    @property
    def total_slept(self) -> float:
        return sum(self.sleeps)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleeps={len(self.sleeps)})"
