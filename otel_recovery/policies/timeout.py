"""``Timeout``: a limit on each attempt, and the deadline a callee can read.

Async attempts are cancelled when the limit passes and fail with ``TimeoutError`` (which the
classifier treats as transient). Python cannot interrupt a running synchronous function
safely, so for sync calls the limit is *cooperative*: the driver publishes the attempt's
deadline and the callee passes :func:`remaining_time` to its client (socket timeout,
``statement_timeout``, httpx ``timeout=``), as gRPC propagates deadlines. Instrumentors do
this for the clients they wrap. A sync call that overruns is not thrown away: its result is
returned (nothing lost) and the breaker counts it as slow.
"""

from __future__ import annotations

import contextvars

from otel_recovery._clock import SYSTEM_CLOCK, Clock, Duration, to_seconds

__all__ = ["Timeout", "remaining_time"]

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "otel_recovery_deadline", default=None
)


class Timeout:
    """Per-attempt time limit in seconds (float or timedelta)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: Duration) -> None:
        self.seconds = to_seconds(seconds, "seconds", allow_inf=True)
        if self.seconds == 0:
            raise ValueError("Timeout seconds must be > 0")

    def __repr__(self) -> str:
        return f"Timeout({self.seconds})"


def remaining_time(clock: Clock = SYSTEM_CLOCK) -> float | None:
    """Seconds left for the current attempt, or ``None`` outside a limited attempt.

    Never negative: an expired deadline reads as 0.0, which clients treat as "fail now".
    """
    deadline = _deadline.get()
    if deadline is None:
        return None
    return max(0.0, deadline - clock.now())


def set_deadline(deadline: float | None) -> contextvars.Token[float | None]:
    """Publish an absolute monotonic deadline for the code running in this context."""
    return _deadline.set(deadline)


def reset_deadline(token: contextvars.Token[float | None]) -> None:
    _deadline.reset(token)
