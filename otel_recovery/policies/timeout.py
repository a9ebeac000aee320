"""``Timeout``: a limit on each attempt, and the deadline a callee can read.

Async attempts are cancelled when the limit passes and fail with ``TimeoutError`` (which the
classifier treats as transient). Python cannot interrupt a running synchronous function
safely, so for sync calls the limit is *cooperative*: the driver publishes the attempt's
deadline and the callee passes :func:`remaining_time` to its client (socket timeout,
``statement_timeout``, httpx ``timeout=``), as gRPC propagates deadlines. Instrumentors do
this for the clients they wrap. A sync call that overruns is not thrown away: its result is
returned (nothing lost); a breaker with ``slow_call_duration`` counts it as slow by its own
measure (the limit itself is not linked to the breaker). ``Timeout(math.inf)`` is no limit:
nothing is published. A policy called inside another's attempt (on the same clock) publishes
the sooner of its own deadline and the outer one, and does not retry past the outer one.
"""

from __future__ import annotations

import contextvars

from otel_recovery._clock import Clock, Duration, to_seconds

__all__ = ["Timeout", "remaining_time"]

_deadline: contextvars.ContextVar[tuple[float, Clock] | None] = contextvars.ContextVar(
    "otel_recovery_deadline", default=None
)
"""The current attempt's deadline and the clock it is measured on (the policy's)."""


class Timeout:
    """Per-attempt time limit in seconds (float or timedelta)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: Duration) -> None:
        self.seconds = to_seconds(seconds, "seconds", allow_inf=True)
        if self.seconds == 0:
            raise ValueError("Timeout must be > 0 seconds, got 0 (None: no limit)")

    def __repr__(self) -> str:
        return f"Timeout({self.seconds})"


def remaining_time(clock: Clock | None = None) -> float | None:
    """Seconds left for the current attempt, or ``None`` outside a limited attempt.

    Measured on the clock of the policy that set the deadline (a ``FakeClock`` in tests),
    unless ``clock`` is given. Never negative: an expired deadline reads as 0.0, which
    clients treat as "fail now".
    """
    published = _deadline.get()
    if published is None:
        return None
    deadline, own_clock = published
    return max(0.0, deadline - (own_clock if clock is None else clock).now())


def set_deadline(deadline: float, clock: Clock) -> contextvars.Token[tuple[float, Clock] | None]:
    """Publish an absolute deadline on ``clock`` for the code running in this context: the
    sooner of ``deadline`` and the one already published on the same clock (an outer
    policy's attempt), as gRPC narrows an inherited deadline and never widens it."""
    outer = inherited_deadline(clock)
    if outer is not None and outer < deadline:
        deadline = outer
    return _deadline.set((deadline, clock))


def inherited_deadline(clock: Clock) -> float | None:
    """The deadline published around the running code (an outer policy's attempt), if it
    is measured on ``clock``; None without one, or on another clock (not comparable)."""
    published = _deadline.get()
    if published is None or published[1] is not clock:
        return None
    return published[0]


def reset_deadline(token: contextvars.Token[tuple[float, Clock] | None]) -> None:
    _deadline.reset(token)
