"""Which things were already met, process-wide: what lets a message be logged once.

A misconfiguration or a broken rule meets every instrumentor, or every failure of a busy
service; logged each time, it would bury the log. Each place that logs once keeps its own
:class:`FirstTimes` (tests clear it), bounded so keys made from data cannot grow it forever.
"""

from __future__ import annotations

from collections.abc import Hashable

from otel_recovery._forksafe import new_lock

__all__ = ["FirstTimes"]


class FirstTimes:
    """A thread-safe set of keys met so far, at most ``bound`` of them."""

    __slots__ = ("_bound", "_lock", "_seen")

    def __init__(self, bound: int = 1024) -> None:
        self._seen: set[Hashable] = set()
        self._bound = bound
        self._lock = new_lock()

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is met (and while fewer than ``bound`` were)."""
        with self._lock:
            if key in self._seen or len(self._seen) >= self._bound:
                return False
            self._seen.add(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
