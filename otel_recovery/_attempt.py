"""Which attempt of a recovered call is running, for code below the driver to read.

Set only by the drivers' retry loops (the slow path): a first attempt costs nothing and reads
as 1. Two things are published for a retried attempt:

- the attempt number, which :func:`current_attempt` returns to user code;
- for an HTTP instrumentor's policy only, a :class:`ResendClaim`, which its span processor
  turns into ``http.request.resend_count`` on the first HTTP client span the attempt starts.
  Only there: an HTTP request made in the second attempt of a recovered function, or of a
  Redis command, is that request's first send. And only once: a request made inside the
  resent one (a hook's) is a first send too.
"""

from __future__ import annotations

import contextvars

__all__ = ["current_attempt"]

ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("otel_recovery_attempt", default=1)


class ResendClaim:
    """The resend count a retried HTTP attempt offers to the first client span it starts."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def take(self) -> int:
        """The count, once; 0 afterwards."""
        count, self.count = self.count, 0
        return count


RESEND: contextvars.ContextVar[ResendClaim | None] = contextvars.ContextVar(
    "otel_recovery_resend", default=None
)

AttemptTokens = tuple["contextvars.Token[int]", "contextvars.Token[ResendClaim | None]"]


def enter_attempt(number: int, resends: bool) -> AttemptTokens:
    """Publish attempt ``number`` for the code it runs (``resends``: it sends an HTTP request
    again); undo with :func:`leave_attempt`. Any other attempt hides an outer resend."""
    claim = ResendClaim(number - 1) if resends else None
    return ATTEMPT.set(number), RESEND.set(claim)


def leave_attempt(tokens: AttemptTokens) -> None:
    """Restore what the caller saw before :func:`enter_attempt`."""
    attempt, resend = tokens
    RESEND.reset(resend)
    ATTEMPT.reset(attempt)


def current_attempt() -> int:
    """1 for a first attempt (or outside any recovery), 2 for the first retry, and so on.

    Inside a call recovered within another call's retry, this is the outer call's attempt
    until the inner call retries itself: a first attempt publishes nothing, which is what
    keeps it free.
    """
    return ATTEMPT.get()
