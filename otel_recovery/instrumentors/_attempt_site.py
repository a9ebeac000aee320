"""What a target's policy may ask of the call site whose attempts it runs.

The engine knows calls only as ``fn(*args)``. Three things about a call are known only to the
site that sends it, and matter only once an attempt has failed, so they are asked there and
never on the happy path:

- **What a failed attempt holds.** An HTTP response, and with it a connection of the
  client's pool: held through the backoff, a ``Retry-After: 2`` would keep it from every
  other request for two seconds. Once a repeat is decided, before the wait, the policy asks
  the site to let go (:meth:`AttemptSite.let_go`). Not when the call gives up: what the last
  attempt holds is then the application's.
- **Whether the call can still be made.** An application that closes its HTTP client
  (at shutdown, say) while a call of it waits to be repeated would get the client's own
  "closed" error from the repeat, where without us it had the failure the call met; the
  policy asks :meth:`AttemptSite.closed` after the wait, and gives up on that failure.
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

__all__ = [
    "AttemptSite",
    "cut_call_limit",
    "is_call_limit",
    "limit_seconds",
    "past_call_limit",
    "site_of",
    "within_call_limit",
]

T = TypeVar("T")


class AttemptSite:
    """A call site that can say what its failed attempts hold and how long its calls may
    take; by default nothing, and no limit of their own."""

    def let_go(self, args: tuple[Any, ...]) -> None:
        """Release what the failed attempt with these arguments holds (nothing by default)."""

    async def alet_go(self, args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`let_go`."""

    def closed(self, args: tuple[Any, ...]) -> bool:
        """Whether the client this call was made with was closed since its last attempt
        (by the application, during the backoff): a resend would only meet the client's
        own "closed" error. False by default."""
        return False

    def time_limit(self, args: tuple[Any, ...]) -> float | None:
        """The seconds the whole call may take by the client's own settings, retries
        included; None (the default) when it has no such limit."""
        return None

    def time_limit_error(self, message: str) -> BaseException | None:
        """The error the client itself raises when that limit passes, for a call our
        retries made reach it: what the application's handlers expect. None (the default):
        the instrumentor's attempt time-limit error."""
        return None


def limit_seconds(value: object) -> float | None:
    """A client's own time limit as seconds: a positive number; None (no limit) for
    anything else (``None``, a sentinel, ``0``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def site_of(fn: Callable[..., Any]) -> AttemptSite | None:
    """The site whose bound method ``fn`` is, if it is one."""
    site = getattr(fn, "__self__", None)
    return site if isinstance(site, AttemptSite) else None


class _CallLimit:
    """The time limit of the call being recovered, on the policy's clock, and whether it
    has cut the call."""

    __slots__ = ("_before", "_error", "_task", "_timed_out", "end", "fired", "left", "started")

    def __init__(
        self,
        started: float,
        end: float,
        task: asyncio.Task[Any] | None,
        timed_out: Callable[[], BaseException],
    ) -> None:
        self.started, self.end = started, end
        self.fired = False
        self._task = task
        cancelling = getattr(task, "cancelling", None)  # 3.11 and later count cancellations
        self._before: int = cancelling() if cancelling is not None else 0
        self._timed_out = timed_out
        self._error: BaseException | None = None
        self.left: Any = None
        """What the policy's driver left unsettled when the cut reached it (its trace, say),
        for whoever answers the cut call."""

    def others_cancelled(self) -> bool:
        """Whether a cancellation from elsewhere (a shutdown, a task group) came besides the
        cut: that one wins, as under ``asyncio.timeout`` (Python 3.11 and later)."""
        cancelling = getattr(self._task, "cancelling", None)
        return cancelling is not None and cancelling() > self._before + int(self.fired)

    def error(self) -> BaseException:
        """The error the call ends with once cut: made once, marked (:func:`is_call_limit`)."""
        if self._error is None:
            self._error = self._timed_out()
            self._error.__dict__[_CUT] = True
        return self._error


_CALL_LIMIT: ContextVar[_CallLimit | None] = ContextVar("otel_recovery_call_end", default=None)
"""The limit of the call being recovered under one. Keyed by the call's start, so a call
made inside one of its attempts (an aiohttp middleware's), which inherits the context, is not
held to it."""


_CUT = "_otel_recovery_call_limit"


def is_call_limit(error: BaseException) -> bool:
    """Whether ``error`` is what :func:`within_call_limit` raised when the limit passed."""
    return getattr(error, "__dict__", {}).get(_CUT, False) is True


def past_call_limit(started: float, now: float, delay: float) -> bool:
    """Whether a retry of the call that started at ``started``, after waiting ``delay``
    seconds from ``now``, would begin at or past that call's own time limit."""
    limit = _CALL_LIMIT.get()
    return limit is not None and limit.started == started and now + delay >= limit.end


def cut_call_limit(started: float) -> _CallLimit | None:
    """The limit of the call that started at ``started`` if that limit has cut it (and
    nothing else cancelled it): the policy settles the call at its limit instead of as a
    cancellation, and leaves what it needs for that on it (``left``). None otherwise."""
    limit = _CALL_LIMIT.get()
    if limit is None or limit.started != started or not limit.fired or limit.others_cancelled():
        return None
    return limit


async def within_call_limit(
    started: float,
    end: float,
    now: float,
    recover: Awaitable[T],
    timed_out: Callable[[], BaseException],
    answer: Callable[[BaseException, Any], Awaitable[T]],
) -> T:
    """Await ``recover`` (a call's recovery: its backoffs and later attempts) so that it
    ends by ``end``, ``started`` and ``end`` being on the policy's clock (``now`` is that
    clock's time): :func:`past_call_limit` answers for this call meanwhile, and if the limit
    passes with an attempt in flight, that attempt is cancelled and the call answered by
    ``answer(timed_out(), left)`` (``left``: what the policy left on the limit when the cut
    reached it, see :func:`cut_call_limit`), which returns a fallback or raises.

    The cut is the running task's own cancellation, scheduled on the event loop (as
    ``asyncio.timeout`` does, which Python 3.10 lacks), told apart from one that came from
    elsewhere by whether it fired; a cancellation from elsewhere that came as well (a
    shutdown, a task group) wins, as under ``asyncio.timeout`` (Python 3.11 and later,
    which count cancellations). The error raised is marked (:func:`is_call_limit`), so a
    site can tell it from one of its own, wherever it was cut (an attempt, or a backoff)."""
    task = asyncio.current_task()
    limit = _CallLimit(started, end, task, timed_out)
    token = _CALL_LIMIT.set(limit)

    def cut() -> None:
        limit.fired = True
        if task is not None:
            task.cancel()

    handle = asyncio.get_running_loop().call_later(max(0.0, end - now), cut)
    try:
        try:
            return await recover
        except asyncio.CancelledError:
            if not limit.fired:
                raise
            others = limit.others_cancelled()
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            if others:
                raise  # cancelled from elsewhere too: that cancellation wins
        handle.cancel()
        error = limit.error()
        error.__context__ = None  # the cut's cancellation is our own doing
        return await answer(error, limit.left)  # outside the handler: its errors are its own
    finally:
        handle.cancel()
        _CALL_LIMIT.reset(token)
