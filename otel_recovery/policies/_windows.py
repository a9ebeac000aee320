"""Sliding windows of call outcomes for the rate-based circuit breaker.

Both windows keep running totals (calls, failures, slow calls) so that recording an outcome and
reading the rates cost O(1): the breaker evaluates its thresholds after every recorded call and
must not rescan a buffer of a hundred outcomes each time.

The windows are not thread-safe on their own; :class:`~otel_recovery.policies.CircuitBreaker`
only touches them while holding its lock.
"""

from __future__ import annotations

import math

__all__ = ["CountWindow", "OutcomeWindow", "TimeWindow"]

# One byte per outcome in the count window: bit 0 marks a filled slot (so an all-zero ring
# means "empty"), bit 1 a failure, bit 2 a slow call.
_FILLED = 1
_FAILED = 2
_SLOW = 4


class CountWindow:
    """The last ``size`` outcomes, as a ring buffer of bytes.

    A ring rather than a deque because the outcome that falls out of the window has to be
    subtracted from the running totals, and a fixed-size ``bytearray`` does that without
    allocating.
    """

    __slots__ = ("_pos", "_ring", "_size", "calls", "failures", "recorded", "slows")

    needs_clock = False
    """The breaker skips the clock read for count windows; only time windows need ``now``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ring = bytearray(size)
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slows = 0
        self.recorded = 0
        """Outcomes ever recorded (cleared or not): which of them a window still holds."""

    def record(self, failed: bool, slow: bool, now: float) -> None:
        pos = self._pos
        old = self._ring[pos]
        if old:
            self.calls -= 1
            if old & _FAILED:
                self.failures -= 1
            if old & _SLOW:
                self.slows -= 1
        code = _FILLED
        if failed:
            code |= _FAILED
            self.failures += 1
        if slow:
            code |= _SLOW
            self.slows += 1
        self.calls += 1
        self.recorded += 1
        self._ring[pos] = code
        pos += 1
        self._pos = 0 if pos == self._size else pos

    def record_successes(self, count: int) -> None:
        """Record ``count`` plain successes at once (the breaker's deferred successes)."""
        if count >= self._size:
            self._ring = bytearray([_FILLED]) * self._size
            self._pos = 0
            self.calls, self.failures, self.slows = self._size, 0, 0
            self.recorded += count
            return
        for _ in range(count):
            self.record(False, False, 0.0)

    def expire(self, now: float) -> None:
        """Nothing expires by time in a count window."""

    def clear(self) -> None:
        self._ring = bytearray(self._size)
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slows = 0


class TimeWindow:
    """Outcomes of the last ``seconds`` whole seconds, in one bucket per second.

    The bucket of second ``s`` holds calls recorded at monotonic times in ``[s, s + 1)``; the
    window at time ``now`` is the buckets ``floor(now) - seconds + 1 .. floor(now)``. Buckets
    expire when time moves on, whether or not calls arrive: a burst of failures followed by a
    quiet minute must not trip the breaker on the first call after the quiet.

    Expiry walks at most ``seconds`` buckets and a gap of a whole window clears everything,
    so the cost is bounded by the elapsed seconds: O(1) amortised.
    """

    __slots__ = (
        "_b_calls",
        "_b_failures",
        "_b_slows",
        "_head",
        "_size",
        "calls",
        "failures",
        "slows",
    )

    needs_clock = True

    def __init__(self, seconds: int) -> None:
        self._size = seconds
        self._b_calls = [0] * seconds
        self._b_failures = [0] * seconds
        self._b_slows = [0] * seconds
        self._head: int | None = None  # the second of the newest bucket, None when empty
        self.calls = 0
        self.failures = 0
        self.slows = 0

    def expire(self, now: float) -> None:
        """Drop the buckets that fell out of the window by ``now``."""
        sec = math.floor(now)
        head = self._head
        if head is None:
            self._head = sec
            return
        if sec <= head:
            # Same second, or a clock that stepped back: keep filling the newest bucket.
            return
        size = self._size
        if sec - head >= size:
            self.clear()
        else:
            for s in range(head + 1, sec + 1):
                i = s % size
                self.calls -= self._b_calls[i]
                self.failures -= self._b_failures[i]
                self.slows -= self._b_slows[i]
                self._b_calls[i] = 0
                self._b_failures[i] = 0
                self._b_slows[i] = 0
        self._head = sec

    def newest_second(self) -> int | None:
        """The second of the newest outcome the window holds (None when it holds none): it
        leaves the window once the clock reaches that second plus ``seconds``."""
        head, size = self._head, self._size
        if head is None:
            return None
        for second in range(head, head - size, -1):
            if self._b_calls[second % size]:
                return second
        return None

    def record(self, failed: bool, slow: bool, now: float) -> None:
        self.expire(now)
        head = self._head
        assert head is not None  # set by expire()
        i = head % self._size
        self._b_calls[i] += 1
        self.calls += 1
        if failed:
            self._b_failures[i] += 1
            self.failures += 1
        if slow:
            self._b_slows[i] += 1
            self.slows += 1

    def clear(self) -> None:
        size = self._size
        self._b_calls = [0] * size
        self._b_failures = [0] * size
        self._b_slows = [0] * size
        self._head = None
        self.calls = 0
        self.failures = 0
        self.slows = 0


OutcomeWindow = CountWindow | TimeWindow
