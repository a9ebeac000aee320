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


class _Published:
    """An attempt's deadline as published: when, on which clock, and whether the attempt is
    still running. Tasks and threads started inside the attempt copy the context, and with
    it this object: once the attempt is over (:func:`reset_deadline`) they no longer read
    its deadline, which bounded the attempt, not work that outlives it. It is also what
    :func:`set_deadline` returns: it holds the context variable's token, to restore the
    deadline published before it."""

    __slots__ = ("at", "clock", "live", "token")

    def __init__(self, at: float, clock: Clock) -> None:
        self.at = at
        self.clock = clock
        self.live = True
        self.token: contextvars.Token[_Published | None] | None = None


DeadlineToken = _Published
"""What :func:`set_deadline` returns, for :func:`reset_deadline`."""

_deadline: contextvars.ContextVar[_Published | None] = contextvars.ContextVar(
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
    if published is None or not published.live:
        return None
    own_clock = published.clock
    return max(0.0, published.at - (own_clock if clock is None else clock).now())


def set_deadline(deadline: float, clock: Clock) -> DeadlineToken:
    """Publish an absolute deadline on ``clock`` for the code running in this context: the
    sooner of ``deadline`` and the one already published on the same clock (an outer
    policy's attempt), as gRPC narrows an inherited deadline and never widens it."""
    outer = inherited_deadline(clock)
    if outer is not None and outer < deadline:
        deadline = outer
    published = _Published(deadline, clock)
    published.token = _deadline.set(published)
    return published


def inherited_deadline(clock: Clock) -> float | None:
    """The deadline of the attempt running around this code (an outer policy's), if it is
    measured on ``clock``; None without one, on another clock (not comparable), or when
    that attempt is over (this code is a task or thread it started)."""
    published = _deadline.get()
    if published is None or not published.live or published.clock is not clock:
        return None
    return published.at


def reset_deadline(token: DeadlineToken) -> None:
    """The attempt that published ``token``'s deadline is over: copies of its context held
    by work it started stop reading it, and this context gets the one before."""
    token.live = False
    if token.token is not None:
        _deadline.reset(token.token)
