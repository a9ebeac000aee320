"""When a failed call may be sent again, beyond what the plain ``Retry`` decides.

A target's policy retries what classifies as transient; two kinds of call need a narrower
rule. A failure that a lower layer has already repeated (redis-py's connection ``Retry``) is
left alone, or the attempts would multiply (:class:`LayeredRetry`). A call that may not be
sent twice (a POST, an ``INCR``) is sent again only after a failure that proves it never
reached the server (:class:`NeverRanRetry`, asking the instrumentor's :data:`NeverRan`).

The instrumentor's mends know the client, and the shared rule does not: they mark a failure
on the error itself, to overrule that proof for it (:func:`hold_back`) or to keep it from
being resent at all (:func:`session_bound`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeAlias

from otel_recovery.classify import ErrorInfo
from otel_recovery.policies import Retry

__all__ = [
    "LayeredRetry",
    "NeverRan",
    "NeverRanRetry",
    "hold_back",
    "is_session_bound",
    "session_bound",
]

NeverRan: TypeAlias = Callable[[BaseException], bool]
"""``never_ran(error)``: whether a failure proves the call never reached the server (a
connection that could not be made, a command the server refused before running it), so
that even a call that may not be repeated can be sent again. Asked only after a failure;
a module-level function, so plans that share it share their cache entries."""


class LayeredRetry(Retry):
    """A retry that leaves alone the failures a lower layer has already retried (the
    lower layer repeats them ``repeats`` times: redis-py's connection ``Retry``)."""

    __slots__ = ("not_retried", "repeats")
    not_retried: tuple[type[BaseException], ...]
    repeats: int

    def is_retryable(self, error: BaseException, info: ErrorInfo) -> bool:
        if isinstance(error, self.not_retried):
            return False
        return super().is_retryable(error, info)


_HELD_BACK = "_otel_recovery_held_back"


def hold_back(error: BaseException) -> None:
    """Keep a ``never_ran`` failure from being resent: the mend that saw it knows the proof
    does not hold for this call, or that a resend could not help (see ``NeverRanRetry``)."""
    with contextlib.suppress(Exception):  # an exception type with __slots__: resent as usual
        setattr(error, _HELD_BACK, True)


_SESSION_BOUND = "_otel_recovery_session_bound"


def session_bound(error: BaseException) -> None:
    """Keep a failed call from being resent at all: it was made in a session whose state
    a resend on a new connection would not have (a Redis ``single_connection_client``'s
    hand-sent ``MULTI``, ``WATCH`` or ``SELECT``). Said by the mend that knows the client."""
    with contextlib.suppress(Exception):  # an exception type with __slots__: resent as usual
        setattr(error, _SESSION_BOUND, True)


def is_session_bound(error: BaseException) -> bool:
    try:
        return getattr(error, _SESSION_BOUND, False) is True
    except Exception:  # a hostile __getattr__ must not replace the caller's error
        return False


class NeverRanRetry(Retry):
    """A retry for a call that may not be repeated, except after a failure that proves it
    never ran (``never_ran``: a refused connection, Redis refusing a command with
    ``READONLY``), unless the instrumentor's mend held that failure back
    (:func:`hold_back`)."""

    __slots__ = ("never_ran",)
    never_ran: NeverRan

    def proves_never_ran(self, error: BaseException) -> bool:
        return self.never_ran(error) and not getattr(error, _HELD_BACK, False)

    def is_retryable(self, error: BaseException, info: ErrorInfo) -> bool:
        return self.proves_never_ran(error) and super().is_retryable(error, info)
