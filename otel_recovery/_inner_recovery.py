"""Whether a policy of ours already gave up on the failure that ends an outer attempt.

Retries at several layers multiply: a request handler retried 3 times by the middleware,
whose client call is retried 3 times by its instrumentor, sends 9 requests upstream, and the
middleware's repeats escape the client's retry budget (each rerun even counts as a new call
that raises its allowance). The layer closest to the failure knows most about it (whether
the call may be repeated, the server's breaker, its budget, its ``Retry-After``), so it
decides, and an outer layer does not retry a failure that such a layer gave up on.

The outer layer (the ASGI and WSGI ``RecoveryMiddleware``) runs each attempt inside
:func:`outer_attempt`. Every policy that ends a call without success (it gave up after its
attempts, was refused by its breaker, bulkhead or budget, or was not allowed to repeat the
call) records the error it gave up on (:func:`note_decided`). The outer layer asks
:meth:`OuterAttempt.decided` whether what escaped the attempt is that error, was raised from
it (``raise ... from``, or while handling it: Django and SQLAlchemy wrap driver errors so),
or is the error a client raised for the response the policy gave up on
(``raise_for_status()`` on a final 503). A failure the application caught and handled does
not stop a later, unrelated one from being retried; a fallback's answer is a success.

Attempts nest (a middleware inside another): what an inner attempt recorded is passed to the
enclosing one when it ends, and a middleware that declines to retry records the error too.
Tasks started inside the attempt copy the context, so their calls record there; work handed
to a thread pool without ``contextvars.copy_context()`` does not. Nothing runs on a call's
success path.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OuterAttempt", "note_decided", "outer_attempt"]

_REMEMBERED = 64
"""Errors kept per attempt: a handler looping over failing calls cannot grow it unbounded."""
_CHAIN = 16
"""How far a wrapped error's ``__cause__`` / ``__context__`` chain is followed."""


class OuterAttempt:
    """One attempt of an outer retry loop and the failures policies inside it gave up on."""

    __slots__ = ("_given_up", "parent")

    def __init__(self, parent: OuterAttempt | None) -> None:
        self.parent = parent
        self._given_up: deque[object] = deque(maxlen=_REMEMBERED)

    def record(self, error: BaseException) -> None:
        """``error`` was given up on; so was the response it carries, if any."""
        given_up = self._given_up
        given_up.append(error)
        response = getattr(error, "response", None)
        if response is not None:
            given_up.append(response)
            request_info = getattr(response, "request_info", None)  # aiohttp's errors hold it
            if request_info is not None:
                given_up.append(request_info)

    def pass_up(self) -> None:
        parent = self.parent
        if parent is not None and self._given_up:
            parent._given_up.extend(self._given_up)

    def decided(self, escaped: BaseException) -> bool:
        """Whether ``escaped`` is, was raised from, or was raised for a response of, a
        failure a policy of ours gave up on inside this attempt."""
        given_up = self._given_up
        if not given_up:
            return False
        pending: list[BaseException] = [escaped]
        seen: set[int] = set()
        while pending and len(seen) < _CHAIN:
            error = pending.pop()
            if id(error) in seen:
                continue
            seen.add(id(error))
            marks = (error, getattr(error, "response", None), getattr(error, "request_info", None))
            if any(mark is not None and any(mark is known for known in given_up) for mark in marks):
                return True
            pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        return False


_CURRENT: contextvars.ContextVar[OuterAttempt | None] = contextvars.ContextVar(
    "otel_recovery_outer_attempt", default=None
)


@contextmanager
def outer_attempt() -> Iterator[OuterAttempt]:
    """Run one attempt of an outer retry loop; the attempt knows what was given up on."""
    attempt = OuterAttempt(_CURRENT.get())
    token = _CURRENT.set(attempt)
    try:
        yield attempt
    finally:
        _CURRENT.reset(token)
        attempt.pass_up()


def note_decided(error: BaseException) -> None:
    """A policy (or an inner middleware) gave up on ``error``: the enclosing outer attempt
    must not retry it."""
    attempt = _CURRENT.get()
    if attempt is not None:
        attempt.record(error)
