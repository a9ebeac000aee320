"""What a target's policy may ask of the call site whose attempts it runs.

The engine knows calls only as ``fn(*args)``. Two things about a call are known only to the
site that sends it, and matter only once an attempt has failed, so they are asked there and
never on the happy path:

- **What a failed attempt holds.** An HTTP response, and with it a connection of the
  client's pool: held through the backoff, a ``Retry-After: 2`` would keep it from every
  other request for two seconds. Once a repeat is decided, before the wait, the policy asks
  the site to let go (:meth:`AttemptSite.let_go`). Not when the call gives up: what the last
  attempt holds is then the application's.
- **The whole call's own time limit.** aiohttp's ``ClientTimeout(total=...)`` bounds the
  whole request, and callers rely on it ("this call ends within a second"); each of our
  attempts would start it afresh, so three attempts could take three times as long. With
  the limit from :meth:`AttemptSite.time_limit`, the policy retries only while a retry can
  start before the limit has passed (:func:`past_call_limit`, asked by the decision), and
  the recovery as a whole is cut at it (:func:`within_call_limit`).

The site's attempt function is a bound method of it: the policy finds the site as
``fn.__self__`` (:func:`site_of`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["AttemptSite", "is_call_limit", "past_call_limit", "site_of", "within_call_limit"]

T = TypeVar("T")


class AttemptSite:
    """A call site that can say what its failed attempts hold and how long its calls may
    take; by default nothing, and no limit of their own."""

    def let_go(self, args: tuple[Any, ...]) -> None:
        """Release what the failed attempt with these arguments holds (nothing by default)."""

    async def alet_go(self, args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`let_go`."""

    def time_limit(self, args: tuple[Any, ...]) -> float | None:
        """The seconds the whole call may take by the client's own settings, retries
        included; None (the default) when it has no such limit."""
        return None


def site_of(fn: Callable[..., Any]) -> AttemptSite | None:
    """The site whose bound method ``fn`` is, if it is one."""
    site = getattr(fn, "__self__", None)
    return site if isinstance(site, AttemptSite) else None


_CALL_END: ContextVar[tuple[float, float] | None] = ContextVar(
    "otel_recovery_call_end", default=None
)
"""``(started, end)`` of the call being recovered under a time limit, on the policy's clock.
Keyed by its start, so a call made inside one of its attempts (an aiohttp middleware's),
which inherits the context, is not held to it."""


_CUT = "_otel_recovery_call_limit"


def is_call_limit(error: BaseException) -> bool:
    """Whether ``error`` is what :func:`within_call_limit` raised when the limit passed."""
    return getattr(error, "__dict__", {}).get(_CUT, False) is True


def past_call_limit(started: float, now: float, delay: float) -> bool:
    """Whether a retry of the call that started at ``started``, after waiting ``delay``
    seconds from ``now``, would begin at or past that call's own time limit."""
    limit = _CALL_END.get()
    return limit is not None and limit[0] == started and now + delay >= limit[1]


async def within_call_limit(
    started: float,
    end: float,
    now: float,
    recover: Awaitable[T],
    timed_out: Callable[[], BaseException],
) -> T:
    """Await ``recover`` (a call's recovery: its backoffs and later attempts) so that it
    ends by ``end``, ``started`` and ``end`` being on the policy's clock (``now`` is that
    clock's time): :func:`past_call_limit` answers for this call meanwhile, and if the limit
    passes with an attempt in flight, that attempt is cancelled and ``timed_out()`` raised.

    The cut is the running task's own cancellation, scheduled on the event loop (as
    ``asyncio.timeout`` does, which Python 3.10 lacks), told apart from one that came from
    elsewhere by whether it fired; a cancellation from elsewhere that came as well (a
    shutdown, a task group) wins, as under ``asyncio.timeout`` (Python 3.11 and later,
    which count cancellations). The error raised is marked (:func:`is_call_limit`), so a
    site can tell it from one of its own, wherever it was cut (an attempt, or a backoff)."""
    token = _CALL_END.set((started, end))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # 3.11 and later count cancellations
    before = cancelling() if cancelling is not None else 0
    fired = False

    def cut() -> None:
        nonlocal fired
        fired = True
        if task is not None:
            task.cancel()

    handle = loop.call_later(max(0.0, end - now), cut)
    try:
        return await recover
    except asyncio.CancelledError:
        if not fired:
            raise
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None and uncancel() > before:
            raise  # cancelled from elsewhere too: that cancellation wins
        error = timed_out()
        error.__dict__[_CUT] = True
        raise error from None
    finally:
        handle.cancel()
        _CALL_END.reset(token)
