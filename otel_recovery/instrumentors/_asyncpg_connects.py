"""The wrapper of asyncpg's connects and pool acquisitions, the calls that may be retried.

``asyncpg.connect`` and ``Pool._acquire`` run under their plan (:mod:`._asyncpg_plans`); a
connect made inside an acquire passes straight through, so attempts do not multiply and the
breaker counts one outcome per acquire. The call's own ``timeout=`` bounds the whole call,
retries included, as asyncpg documents it. Each attempt of an acquire tells the wait for the
application's own pool apart from what follows taking a connection holder (:func:`holding`):
a failure in the wait is the client's, neither retried nor counted on the server's breaker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from otel_recovery.instrumentors._asyncpg_acquire import ACQUIRING, Acquiring
from otel_recovery.instrumentors._asyncpg_plans import Planner
from otel_recovery.instrumentors._attempt_site import AttemptSite, limit_seconds
from otel_recovery.instrumentors._db import run_async
from otel_recovery.instrumentors._guarded import clients_own, told_beneath
from otel_recovery.instrumentors._span_mode import Site
from otel_recovery.instrumentors._suppression import instrumentation_enabled
from otel_recovery.instrumentors._wrapping import report_internal_error

__all__ = ["Kind", "connect_wrapper", "holding"]


Kind = Literal["connect", "acquire", "holder", "reset", "statement", "prepared"]
"""What an asyncpg patch site is, as the instrumentor installs it; the wrapper here serves
``connect`` and ``acquire``."""


def connect_wrapper(planner: Planner, kind: Kind, site: Site) -> Callable[..., Any]:
    """Connecting and pool acquisition: a wrapt wrapper (the sites are not all methods)."""
    where = f"asyncpg {getattr(site.owner, '__name__', site.owner)}.{site.attribute}"

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not instrumentation_enabled() or (kind == "connect" and ACQUIRING.get() is not None):
            return await wrapped(*args, **kwargs)
        plan = None
        try:
            plan = planner.connect(args, kwargs) if kind == "connect" else planner.acquire(instance)
        except Exception as error:
            report_internal_error(where, error)
        if plan is None:  # nothing we may name it after, or a bug of ours: as without us
            # (called outside the handler: asyncpg's errors carry no context of ours)
            return await wrapped(*args, **kwargs)
        if kind == "acquire":
            attempt, limit = _acquiring(wrapped), args[0] if args else kwargs.get("timeout")
        else:
            attempt, limit = wrapped, kwargs.get("timeout", _CONNECT_TIMEOUT)
        seconds = limit_seconds(limit)
        if seconds is not None:
            attempt = _WithinTimeout(attempt, seconds).attempt
        return await run_async(plan, attempt, args, kwargs)

    return wrapper


_CONNECT_TIMEOUT = 60.0
"""``asyncpg.connect``'s own default ``timeout``."""


class _WithinTimeout(AttemptSite):
    """A connect or a pool acquire whose ``timeout=`` bounds the whole call, retries
    included: asyncpg documents it as the time the call may take, and callers rely on it
    ("this acquire gives up within a second"). Each attempt would start it afresh, so three
    attempts took three times as long; with it as the call's limit
    (:mod:`._attempt_site`), a retry starts only while there is time left, and the
    recovery as a whole ends at it with asyncpg's own ``TimeoutError``."""

    __slots__ = ("_call", "_limit")

    def __init__(self, call: Callable[..., Any], limit: float) -> None:
        self._call, self._limit = call, limit

    async def attempt(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(*args, **kwargs)

    def time_limit(self, args: tuple[Any, ...]) -> float | None:
        return self._limit

    def time_limit_error(self, message: str) -> BaseException:
        return asyncio.TimeoutError(message)  # what asyncpg raises when its timeout passes


def _acquiring(acquire: Callable[..., Any]) -> Callable[..., Any]:
    """``Pool._acquire``, each attempt under an :class:`~._asyncpg_acquire.Acquiring` of
    its own: a failure before a holder was taken is the pool's own wait (or its closing),
    marked as the client's (:func:`clients_own`): not retried, not counted on the server's
    breaker, and raised as asyncpg raised it, after the wait the application asked for. One
    after (a connect refused, a server starting up) is the server's, retried as before; one
    a pool callback's statement already counted is not counted again
    (:func:`told_beneath`)."""

    async def attempt(*args: Any, **kwargs: Any) -> Any:
        state = Acquiring()
        token = ACQUIRING.set(state)
        try:
            return await acquire(*args, **kwargs)
        except Exception as error:
            if not state.holding:
                clients_own(error)
            elif state.counted is error:  # a pool callback's statement counted it already
                told_beneath(error)
            raise
        finally:
            ACQUIRING.reset(token)

    return attempt


def holding(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``PoolConnectionHolder.acquire``: the acquire in progress has a holder now."""
    state = ACQUIRING.get()
    if state is not None:
        state.holding = True
    return wrapped(*args, **kwargs)
