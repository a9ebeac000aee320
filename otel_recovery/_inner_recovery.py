"""Whether a recovery of ours already decided on a failure inside an outer attempt.

Retries at several layers multiply: a request handler retried 3 times by the middleware,
whose client call is retried 3 times by its instrumentor, sends 9 requests upstream, and the
middleware's repeats escape the client's retry budget (each rerun even counts as a new call
that raises its allowance). The layer closest to the failure knows most about it (whether
the call may be repeated, the server's breaker, its budget, its ``Retry-After``), so it
decides, and an outer layer retries only what no policy of ours has decided on.

The outer layer (the ASGI and WSGI ``RecoveryMiddleware``) runs each attempt inside
:func:`outer_attempt`. Every policy that ends a call without success (it gave up after its
attempts, was refused by its breaker, bulkhead or budget, answered from a fallback, or was
not allowed to repeat the call) marks the innermost such attempt (:func:`note_decided`);
the outer layer then does not retry it. Tasks started inside the attempt copy the context,
so their calls mark it too. Nothing runs on a call's success path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OuterAttempt", "note_decided", "outer_attempt"]


class OuterAttempt:
    """One attempt of an outer retry loop; ``decided`` once a policy inside it gave up."""

    __slots__ = ("decided",)

    def __init__(self) -> None:
        self.decided = False


_CURRENT: contextvars.ContextVar[OuterAttempt | None] = contextvars.ContextVar(
    "otel_recovery_outer_attempt", default=None
)


@contextmanager
def outer_attempt() -> Iterator[OuterAttempt]:
    """Run one attempt of an outer retry loop; the attempt says whether it was decided."""
    attempt = OuterAttempt()
    token = _CURRENT.set(attempt)
    try:
        yield attempt
    finally:
        _CURRENT.reset(token)


def note_decided() -> None:
    """A policy ended a call without success: the enclosing outer attempt must not retry."""
    attempt = _CURRENT.get()
    if attempt is not None:
        attempt.decided = True
