"""Virtual time for tests, re-exported as :class:`otel_recovery.testing.FakeClock`.

Kept apart from ``testing.py`` so that the test kit's OpenTelemetry SDK imports are not
needed by code that only wants virtual time (the benchmarks' simulations, for one).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from otel_recovery._clock import Duration, async_sleep, to_seconds
from otel_recovery._forksafe import new_lock

__all__ = ["FakeClock"]


@dataclass(order=True, slots=True)
class _Alarm:
    """A callback waiting for virtual time ``when`` (``order`` keeps equal times in order)."""

    when: float
    order: int
    callback: Callable[[], object] | None = field(compare=False)


class FakeClock:
    """A clock whose sleeps advance virtual time instantly and are recorded.

    ``sleeps`` lists every sleep in order, which is what backoff tests assert on.
    ``asleep`` yields to the event loop once (``asyncio.sleep(0)``, or trio's) so tasks interleave
    as they would with real sleeps, without waiting.

    Time limits follow virtual time too: an async attempt's ``Timeout`` (or what is left of the
    retry deadline) is cut when a sleep or :meth:`advance` takes virtual time past it, at that
    instant, as the event loop's timer would cut it in real time (:meth:`call_at`).
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self._lock = new_lock()
        self._alarms: list[_Alarm] = []  # a heap
        self._order = itertools.count()
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
            target = self._now + delta
        self._run_to(target)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            target = self._now + max(0.0, seconds)
        self._run_to(target)

    async def asleep(self, seconds: float) -> None:
        with self._lock:
            target = self._now + max(0.0, seconds)
            alarmed = bool(self._alarms) and self._alarms[0].when <= target
        if not alarmed:  # the plain path, through sleep(): a subclass's sleep applies
            self.sleep(seconds)
            await async_sleep(0)
            return
        with self._lock:
            self.sleeps.append(seconds)
        while (callback := self._next_due(target)) is not None:
            callback()
            await async_sleep(0)  # a time limit the alarm cut lands here, at the alarm's time
        self._reach(target)
        await async_sleep(0)

    def call_at(self, when: float, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` once virtual time reaches ``when``; returns what cancels it.

        The sleep or :meth:`advance` that takes time to ``when`` stops there, calls it (on its
        own thread), then goes on; one already past ``when`` is met by the next sleep or
        advance, even of zero seconds. The async drivers arm one at each limited attempt's
        deadline, so a callee awaiting :meth:`asleep` past it is cut at the deadline.
        """
        alarm = _Alarm(float(when), next(self._order), callback)
        with self._lock:
            heapq.heappush(self._alarms, alarm)

        def cancel() -> None:
            alarm.callback = None  # left in the heap, skipped when it comes up

        return cancel

    def _next_due(self, until: float) -> Callable[[], object] | None:
        """The earliest alarm due by ``until``, taken off, with time moved to it."""
        with self._lock:
            while self._alarms and self._alarms[0].when <= until:
                alarm = heapq.heappop(self._alarms)
                if alarm.callback is not None:
                    self._now = max(self._now, alarm.when)
                    return alarm.callback
            return None

    def _reach(self, target: float) -> None:
        with self._lock:
            self._now = max(self._now, target)

    def _run_to(self, target: float) -> None:
        while (callback := self._next_due(target)) is not None:
            callback()
        self._reach(target)

    @property
    def total_slept(self) -> float:
        return sum(self.sleeps)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleeps={len(self.sleeps)})"
