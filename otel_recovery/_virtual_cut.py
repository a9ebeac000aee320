"""An async attempt's time limit on virtual time: the clock's alarm fires the timer's cut.

An async attempt's limit is the event loop's own timer (``asyncio.timeout``, trio's
``move_on_after``): real seconds, whatever the policy's clock. Under a clock that can call
back at a virtual time (:meth:`otel_recovery.testing.FakeClock.call_at`), the async driver
also arms an alarm at the attempt's deadline that fires the same cut. A callee that waits on
the clock (``await clock.asleep(10)`` standing in for a slow dependency) is then cut when
virtual time passes the deadline, at the deadline, as the timer would cut it, and a test of
a time limit waits for nothing real; whichever comes first cuts. A clock without ``call_at``
(the system clock) arms nothing.

The cut runs on the event loop's thread: an alarm fired there (the attempt's own sleep, or
another task's) cuts at once; one fired on another thread (a worker thread's ``clock.sleep``)
posts the cut to the loop. Once the attempt is over the alarm is disarmed, and a cut still
on its way to the loop does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeGuard

from otel_recovery._clock import Clock

__all__ = ["AlarmClock", "arm_cut", "expire_scope", "keeps_alarms", "loop_post"]


class AlarmClock(Clock, Protocol):
    """A clock that can call back at a virtual time, as ``FakeClock`` does."""

    def call_at(self, when: float, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` once the clock reaches ``when``; returns what cancels it."""


Post = Callable[[Callable[[], None]], object]
"""Runs a callable on the event loop's thread (``loop.call_soon_threadsafe``, a trio token's
``run_sync_soon``)."""


def keeps_alarms(clock: Clock) -> TypeGuard[AlarmClock]:
    """Whether ``clock`` can call back at a virtual time (a ``FakeClock``)."""
    return callable(getattr(clock, "call_at", None))


def arm_cut(
    clock: AlarmClock, end: float, cut: Callable[[], None], post: Post
) -> Callable[[], None]:
    """Run ``cut`` on this (the loop's) thread once ``clock`` reaches ``end``; returns what
    disarms it, to be called on this thread when the attempt is over."""
    loop_thread = threading.get_ident()
    live = True

    def cut_if_live() -> None:
        if live:
            cut()

    def fire() -> None:
        if threading.get_ident() == loop_thread:
            cut_if_live()
            return
        with contextlib.suppress(Exception):  # a closed loop, a finished trio run: no cut
            post(cut_if_live)

    cancel = clock.call_at(end, fire)

    def disarm() -> None:
        nonlocal live
        live = False
        cancel()

    return disarm


def loop_post() -> Post:
    """Runs a callable on the running event loop's thread, from any thread."""
    return asyncio.get_running_loop().call_soon_threadsafe


def expire_scope(scope: Any) -> Callable[[], None]:  # an asyncio.Timeout (Python 3.11+)
    """What expires ``scope`` now, as its own timer would (``asyncio.timeout``): the task is
    cancelled at its next suspension and the scope raises ``TimeoutError``. Nothing once the
    scope is expiring already (its timer came first)."""

    def expire() -> None:
        if not scope.expired():
            scope.reschedule(asyncio.get_running_loop().time())

    return expire
