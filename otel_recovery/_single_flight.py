"""One run of a piece of async work per key at a time, shared by every thread and event loop.

A threaded service (Flask or Django under gunicorn threads) runs each request in its own
event loop (``asyncio.run`` per request), so an ``asyncio.Future`` cannot carry a result from
the run to the waiters: it belongs to one loop. :class:`SingleFlight` keeps the flight in a
plain structure under a fork-safe lock instead. The first caller for a key leads: it runs the
work in its own loop. Every caller that arrives meanwhile, in any thread and any loop, waits
on a future of its *own* loop, which the leader settles with ``call_soon_threadsafe`` when it
is done, so no waiter ever blocks its loop.

How a flight ends without a result:

* a waiter cancelled is simply no longer waiting; the run goes on for the others;
* the leader cancelled (or its loop closed with the leader unfinished, or the leader's thread
  gone in a forked child) leaves the work undone: waiters in other loops take it over (the
  first of them leads a new flight, the rest join it). Waiters in the leader's own loop get
  the ``cancelled`` value instead, as they always have: a loop whose task was cancelled is
  often a loop being shut down. Waiters in other loops check every ``_POLL`` seconds that the
  leader's loop still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from otel_recovery._forksafe import new_lock, reset_in_child

__all__ = ["SingleFlight"]

T = TypeVar("T")

_POLL = 0.1
"""Seconds between a waiter's checks that the leader's loop still exists."""


class _Abandoned:
    """What a flight ends with when its leader never finished the work."""


_ABANDONED = _Abandoned()


class _Flight(Generic[T]):
    __slots__ = ("abandoned", "loop", "outcome", "thread", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.abandoned = False
        self.outcome: T | _Abandoned = _ABANDONED
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[T | _Abandoned]]] = []

    def gone(self) -> bool:
        """Whether the leader can no longer finish (its loop closed, or it is not in this
        process)."""
        return self.abandoned or self.loop.is_closed()


class SingleFlight(Generic[T]):
    """Concurrent ``run(key, ...)`` calls share one run of the work, across threads and loops."""

    def __init__(self) -> None:
        self._lock = new_lock()
        self._flights: dict[Hashable, _Flight[T]] = {}
        reset_in_child(self)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]], cancelled: T) -> T:
        """The result of ``work()``, run once for every caller of ``key`` that arrives while
        it runs; ``cancelled`` for callers in the leader's loop when the leader is cancelled.
        ``work`` should not raise: an exception propagates to the leader only, and counts as
        a cancellation for the others."""
        loop = asyncio.get_running_loop()
        while True:
            waiter: asyncio.Future[T | _Abandoned] = loop.create_future()
            with self._lock:
                flight = self._flights.get(key)
                if flight is None or flight.gone():
                    flight = self._flights[key] = _Flight(loop)
                    leading = True
                else:
                    flight.waiters.append((loop, waiter))
                    leading = False
            if leading:
                return await self._lead(key, flight, work)
            outcome = await self._wait(flight, waiter)
            if not isinstance(outcome, _Abandoned):
                return outcome
            if flight.loop is loop:
                return cancelled
            # The leader will never finish: lead a new flight, or join whoever got there first.

    async def _lead(self, key: Hashable, flight: _Flight[T], work: Callable[[], Awaitable[T]]) -> T:
        outcome: T | _Abandoned = _ABANDONED
        try:
            # One loop turn before acting, so callers that are already due (other tasks that
            # met the same failure) join this run: sync work finishes without ever yielding,
            # and would otherwise be done before they arrive.
            await asyncio.sleep(0)
            result = await work()
            outcome = result
            return result
        finally:
            self._finish(key, flight, outcome)

    def _finish(self, key: Hashable, flight: _Flight[T], outcome: T | _Abandoned) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            waiters, flight.waiters = flight.waiters, []
            flight.outcome = outcome
        for loop, waiter in waiters:
            # A waiter's loop that is closed (RuntimeError) has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, waiter, outcome)

    async def _wait(
        self, flight: _Flight[T], waiter: asyncio.Future[T | _Abandoned]
    ) -> T | _Abandoned:
        try:
            if flight.loop is asyncio.get_running_loop():
                return await waiter
            while not waiter.done():
                await asyncio.wait((waiter,), timeout=_POLL)
                if not waiter.done() and flight.gone():
                    # A leader that finished just before its loop closed has settled this
                    # waiter, but the settling may not have run here yet.
                    with self._lock:
                        return flight.outcome
            return waiter.result()
        finally:
            # Cancelled, or given up on: the leader's settling it later is then a no-op.
            waiter.cancel()

    def _after_fork_in_child(self) -> None:
        """A forked child has only the forking thread: flights led by any other thread will
        never finish there. Their waiters (in the forking thread's loop) take over."""
        me = threading.get_ident()
        with self._lock:
            for key, flight in list(self._flights.items()):
                if flight.thread != me:
                    flight.abandoned = True
                    del self._flights[key]


def _settle(waiter: asyncio.Future[T | _Abandoned], outcome: T | _Abandoned) -> None:
    if not waiter.done():
        waiter.set_result(outcome)
