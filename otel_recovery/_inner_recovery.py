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
(``raise_for_status()`` on a final 503); an exception group (a ``TaskGroup``'s) when every
exception in it is. A failure the application caught and handled does
not stop a later, unrelated one from being retried; a fallback's answer is a success.

Attempts nest (a middleware inside another): what an inner attempt recorded is passed to the
enclosing one when it ends, and a middleware that declines to retry records the error too.
Tasks started inside the attempt copy the context, so their calls record there; work handed
to a thread pool without ``contextvars.copy_context()`` does not. Nothing runs on a call's
success path.
"""

from __future__ import annotations

import builtins
import contextvars
import logging
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OuterAttempt", "note_decided", "outer_attempt"]

_REMEMBERED = 64
"""Errors kept per attempt: a handler looping over failing calls cannot grow it unbounded."""
_CHAIN = 16
"""How many exceptions of a wrapped error's ``__cause__`` / ``__context__`` chain (and of
its groups) are looked at."""

_log = logging.getLogger("otel_recovery")


def _attr(error: object, name: str) -> object | None:
    """``error.name`` if it is an object a response can be told by; None otherwise, and
    when reading it raises (a property of the application's exception must not replace it)."""
    try:
        value = getattr(error, name, None)
    except Exception:
        return None
    return None if isinstance(value, _NOT_MARKS) else value


_NOT_MARKS = (str, bytes, int, float, type(None))
"""Values that are shared or equal by value (``response = ""``): never an identity mark."""


def _members(error: BaseException) -> tuple[BaseException, ...]:
    """The exceptions an exception group holds (a ``TaskGroup``'s, anyio's); () otherwise."""
    groups = tuple(
        group
        for group in (
            getattr(builtins, "BaseExceptionGroup", None),
            getattr(sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None),
        )
        if isinstance(group, type)
    )
    if groups and isinstance(error, groups):
        members = getattr(error, "exceptions", ())
        return tuple(m for m in members if isinstance(m, BaseException))
    return ()


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
        response = _attr(error, "response")
        if response is not None:
            given_up.append(response)
            request_info = _attr(response, "request_info")  # aiohttp's errors hold it
            if request_info is not None:
                given_up.append(request_info)

    def pass_up(self) -> None:
        parent = self.parent
        if parent is not None and self._given_up:
            parent._given_up.extend(tuple(self._given_up))  # a snapshot: threads may record

    def decided(self, escaped: BaseException) -> bool:
        """Whether ``escaped`` is, was raised from, or was raised for a response of, a
        failure a policy of ours gave up on inside this attempt; an exception group is,
        when every exception it holds is."""
        given_up = tuple(self._given_up)  # a snapshot: a thread that copied the context
        if not given_up:  # may still be recording
            return False
        return _traces_to(escaped, given_up, set())


def _traces_to(error: BaseException, given_up: tuple[object, ...], seen: set[int]) -> bool:
    if id(error) in seen or len(seen) >= _CHAIN:
        return False
    seen.add(id(error))
    for mark in (error, _attr(error, "response"), _attr(error, "request_info")):
        if mark is not None and any(mark is known for known in given_up):
            return True
    members = _members(error)
    if members and all(_traces_to(member, given_up, seen) for member in members):
        return True
    return any(
        linked is not None and _traces_to(linked, given_up, seen)
        for linked in (error.__cause__, error.__context__)
    )


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
    must not retry it. Never raises: it runs on the failure path of every call."""
    attempt = _CURRENT.get()
    if attempt is not None:
        try:
            attempt.record(error)
        except Exception as failure:
            _log.debug("could not record a give-up for the outer attempt", exc_info=failure)
