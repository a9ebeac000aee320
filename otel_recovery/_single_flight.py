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
  gone in a forked child) leaves the work undone: the waiters take it over, in any loop,
  the leader's own included (the first of them leads a new flight, the rest join it). In a
  single-loop server a cancelled request (its client went away) is routine, and the other
  requests waiting on its reconnect still need one; a loop being shut down cancels its
  waiters too, and a cancelled waiter takes nothing over;
* the work raising in the leader: the waiters in the leader's loop get the ``cancelled``
  value (a failure, not run again for each of them), those in other loops take it over;
* the leader not making progress: waiters in other loops take it over the same way.

A waiter in another loop never waits without bound for a leader that has stopped making
progress. The leader runs in a loop the waiter has no say over, which may be *stopped*
without being closed (a thread that keeps one loop and calls ``run_until_complete`` per
request parks a fire-and-forget heal when its request returns, until its next request), or
*held* by sync code other than the work, perhaps code waiting for the waiter's own loop
(``run_coroutine_threadsafe(...).result()`` or a thread join on a heal of the same key): a
deadlock. Neither could happen while each loop ran its own work. So every ``_POLL`` seconds
a waiter in another loop checks that the leader's loop has turned since the last check (a
probe it posted there with ``call_soon_threadsafe`` has run) or that the leader is inside the
work at that moment (a sync reconnect holding its loop is progress). After ``_PARKED_POLLS``
checks in a row with neither, the loop being stopped, or ``_HELD_POLLS`` with the loop
running, the waiter marks the flight abandoned and takes it over. Independently, a waiter in
another loop waits at most ``patience`` seconds (``run``'s argument; the healing registry
passes its ``max_timeout``) from the leader's start: a leader still at it then is presumed
hung, whatever its loop does, and is taken over the same way. A leader taken over may still
finish later, for its own loop's callers: the work then runs twice, as it did once per loop
before flights spanned loops, but no caller waits forever. While leaders make progress and
finish within ``patience``, concurrent callers in every thread share one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types
from collections.abc import Awaitable, Callable, Generator, Hashable
from typing import Any, Generic, TypeVar, cast

from otel_recovery._forksafe import new_lock, reset_in_child

__all__ = ["SingleFlight"]

T = TypeVar("T")

_POLL = 0.1
"""Seconds between a waiter's checks that the leader in another loop is making progress."""

_PARKED_POLLS = 2
"""Checks in a row without progress, the leader's loop stopped, before a waiter takes over."""

_HELD_POLLS = 10
"""Checks in a row without progress, the leader's loop running (held by something other than
the work), before a waiter takes over."""


class _Abandoned:
    """What a flight ends with when its leader never finished the work."""


_ABANDONED = _Abandoned()


class _Flight(Generic[T]):
    __slots__ = (
        "abandoned",
        "leader_cancelled",
        "loop",
        "outcome",
        "started",
        "thread",
        "waiters",
        "working",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.started = time.monotonic()
        self.abandoned = False
        self.leader_cancelled = False
        """Whether the leader's task was cancelled (not the work raising): its waiters, in
        its own loop too, take the work over."""
        self.working = False
        """Whether the work's code is running at this moment (not waiting)."""
        self.outcome: T | _Abandoned = _ABANDONED
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[T | _Abandoned]]] = []

    def gone(self) -> bool:
        """Whether the leader can no longer finish (its loop closed, it is not in this
        process, or a waiter took its flight over)."""
        return self.abandoned or self.loop.is_closed()


class _Probe:
    """Posted into the leader's loop: answered when that loop next runs its callbacks."""

    __slots__ = ("answered",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answered = False
        # A closed loop (RuntimeError) never answers; the flight's gone() says so anyway.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._answer)

    def _answer(self) -> None:
        self.answered = True


class SingleFlight(Generic[T]):
    """Concurrent ``run(key, ...)`` calls share one run of the work, across threads and loops."""

    def __init__(self) -> None:
        self._lock = new_lock()
        self._flights: dict[Hashable, _Flight[T]] = {}
        reset_in_child(self)

    async def run(
        self, key: Hashable, work: Callable[[], Awaitable[T]], cancelled: T, *, patience: float
    ) -> T:
        """The result of ``work()``, run once for every caller of ``key`` that arrives while
        it runs; ``cancelled`` for callers in the leader's loop when the work raised (a
        cancelled leader's work is taken over by its waiters).
        A caller in another loop waits at most ``patience`` seconds from the leader's start
        (less if the leader stops making progress), then runs the work itself.
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
            outcome = await self._wait(key, flight, waiter, patience)
            if not isinstance(outcome, _Abandoned):
                return outcome
            if flight.loop is loop and not flight.leader_cancelled:
                return cancelled  # the work raised: a failure, not run once more per waiter
            # The leader will never finish: lead a new flight, or join whoever got there first.

    async def _lead(self, key: Hashable, flight: _Flight[T], work: Callable[[], Awaitable[T]]) -> T:
        outcome: T | _Abandoned = _ABANDONED
        try:
            # One loop turn before acting, so callers that are already due (other tasks that
            # met the same failure) join this run: sync work finishes without ever yielding,
            # and would otherwise be done before they arrive.
            await asyncio.sleep(0)
            result = await _marking_steps(flight, work)
            outcome = result
            return result
        except asyncio.CancelledError:
            flight.leader_cancelled = True
            raise
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
        self,
        key: Hashable,
        flight: _Flight[T],
        waiter: asyncio.Future[T | _Abandoned],
        patience: float,
    ) -> T | _Abandoned:
        try:
            if flight.loop is asyncio.get_running_loop():
                return await waiter
            deadline = flight.started + patience
            probe = _Probe(flight.loop)
            idle = 0  # checks in a row with neither the leader's loop turning nor its work running
            while not waiter.done():
                await asyncio.wait((waiter,), timeout=_POLL)
                if waiter.done():
                    break
                idle = 0 if probe.answered or flight.working else idle + 1
                if probe.answered:
                    probe = _Probe(flight.loop)
                limit = _HELD_POLLS if flight.loop.is_running() else _PARKED_POLLS
                if flight.gone() or idle >= limit or time.monotonic() >= deadline:
                    return self._give_up(key, flight)
            return waiter.result()
        finally:
            # Cancelled, or given up on: the leader's settling it later is then a no-op.
            waiter.cancel()

    def _give_up(self, key: Hashable, flight: _Flight[T]) -> T | _Abandoned:
        """Stop waiting for ``flight``'s leader: abandon the flight, so that this caller leads
        a new one and the other waiters in other loops join that. A leader that finished just
        now has settled the waiter, but the settling may not have run here yet: its outcome."""
        with self._lock:
            if isinstance(flight.outcome, _Abandoned):
                flight.abandoned = True
                if self._flights.get(key) is flight:
                    del self._flights[key]
            return flight.outcome

    def _after_fork_in_child(self) -> None:
        """A forked child has only the forking thread: flights led by any other thread will
        never finish there. Their waiters (in the forking thread's loop) take over."""
        me = threading.get_ident()
        with self._lock:
            for key, flight in list(self._flights.items()):
                if flight.thread != me:
                    flight.abandoned = True
                    del self._flights[key]


@types.coroutine
def _marking_steps(flight: _Flight[T], work: Callable[[], Awaitable[T]]) -> Generator[Any, Any, T]:
    """Await ``work()``, with ``flight.working`` set while the work's code runs (not while it
    waits): a sync reconnect holding its loop is the leader making progress, the loop held by
    anything else is not. A cancellation thrown in goes on to the work, as with ``await``."""
    flight.working = True
    try:
        steps = work().__await__()
    finally:
        flight.working = False
    resume: Callable[[Any], Any] = steps.send
    sent: Any = None
    while True:
        flight.working = True
        try:
            signal = resume(sent)
        except StopIteration as done:
            return cast("T", done.value)
        finally:
            flight.working = False
        try:
            sent = yield signal
            resume = steps.send
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as error:  # thrown in (a cancellation): the work's to handle
            sent, resume = error, steps.throw


def _settle(waiter: asyncio.Future[T | _Abandoned], outcome: T | _Abandoned) -> None:
    if not waiter.done():
        waiter.set_result(outcome)
