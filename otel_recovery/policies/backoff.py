"""Backoff strategies: how long to wait before retry number *n*.

Pure strategy objects in the tenacity tradition: a backoff holds only configuration and
computes a delay from ``(retry_number, previous_delay, rng)``. Randomness comes from the
caller's ``random.Random`` so a seeded test sees an exact schedule.

Jitter kinds follow Brooker's "Exponential Backoff And Jitter" (research/adaptive.md 1.9),
with ``v = min(maximum, initial * multiplier ** (n - 1))``:

- ``"none"``:          ``v``
- ``"full"``:          ``U(0, v)``           (the default: least total work under contention)
- ``"equal"``:         ``v/2 + U(0, v/2)``   (never shorter than half the nominal delay)
- ``"decorrelated"``:  ``min(maximum, U(initial, 3 * previous))``
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

from otel_recovery._clock import MAX_SECONDS, Duration, to_seconds

__all__ = ["Backoff", "CustomBackoff", "ExponentialBackoff", "FixedBackoff", "Jitter"]

Jitter = Literal["none", "full", "equal", "decorrelated"]
_JITTERS: tuple[str, ...] = ("none", "full", "equal", "decorrelated")


def refuse_backoff_class(backoff: object) -> None:
    """A Backoff class where an instance belongs (``backoff=ExponentialBackoff``) passes the
    protocol check, and failed only at the first retry (``delay()`` missing an argument),
    which then gave up: refused where it is given, with the fix."""
    if isinstance(backoff, type):
        raise TypeError(
            f"backoff must be a Backoff instance, got the class {backoff.__qualname__}: "
            f"write {backoff.__qualname__}()"
        )


@runtime_checkable
class Backoff(Protocol):
    """Anything with ``delay(retry_number, previous_delay, rng) -> seconds``.

    ``retry_number`` is 1 before the first retry. ``previous_delay`` is the delay used before
    the previous retry (0.0 before the first), which decorrelated jitter needs.
    """

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        """Seconds to wait before retry ``retry_number``; jitter draws from ``rng`` only,
        so a seeded ``rng`` makes a schedule repeatable in tests."""
        ...


class ExponentialBackoff:
    """Capped exponential backoff with a choice of jitter (default full jitter)."""

    __slots__ = ("initial", "jitter", "maximum", "multiplier")

    def __init__(
        self,
        initial: Duration = 0.1,
        multiplier: float = 2.0,
        maximum: Duration = 10.0,
        jitter: Jitter = "full",
    ) -> None:
        self.initial = to_seconds(initial, "initial")
        self.maximum = to_seconds(maximum, "maximum", allow_inf=True)
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
            raise TypeError(f"multiplier must be a number >= 1, got {multiplier!r}")
        if not 1 <= multiplier < math.inf:  # NaN fails this too
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        if self.maximum < self.initial:
            raise ValueError(
                f"maximum ({self.maximum}s) must be >= initial ({self.initial}s); "
                "raise maximum or lower initial"
            )
        if jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(_JITTERS)}; got {jitter!r}")
        self.multiplier = float(multiplier)
        self.jitter: Jitter = jitter

    def nominal(self, retry_number: int) -> float:
        """The un-jittered delay before retry ``retry_number``."""
        exponent = max(0, retry_number - 1)
        try:
            value = self.initial * self.multiplier**exponent
        except OverflowError:  # past any maximum, unless there is nothing to multiply
            value = math.inf if self.initial > 0 else 0.0
        return min(self.maximum, value, MAX_SECONDS)  # an uncapped maximum: still a sleep

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        """See :class:`Backoff`."""
        jitter = self.jitter
        if jitter == "decorrelated":
            upper = 3.0 * max(previous_delay, self.initial)
            return min(self.maximum, rng.uniform(self.initial, upper), MAX_SECONDS)
        nominal = self.nominal(retry_number)
        if jitter == "full":
            return rng.uniform(0.0, nominal)
        if jitter == "equal":
            half = nominal / 2.0
            return half + rng.uniform(0.0, half)
        return nominal

    def __repr__(self) -> str:
        return (
            f"ExponentialBackoff(initial={self.initial}, multiplier={self.multiplier}, "
            f"maximum={self.maximum}, jitter={self.jitter!r})"
        )


class FixedBackoff:
    """The same delay every time, plus optional additive jitter ``U(0, jitter)``."""

    __slots__ = ("jitter", "seconds")

    def __init__(self, seconds: Duration = 1.0, jitter: Duration = 0.0) -> None:
        self.seconds = to_seconds(seconds, "seconds")
        self.jitter = to_seconds(jitter, "jitter")

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        """See :class:`Backoff`."""
        if self.jitter:
            return self.seconds + rng.uniform(0.0, self.jitter)
        return self.seconds

    def __repr__(self) -> str:
        return f"FixedBackoff(seconds={self.seconds}, jitter={self.jitter})"


class CustomBackoff:
    """Adapts a plain function ``(retry_number, previous_delay) -> seconds`` to :class:`Backoff`.

    The result is validated on every call: a negative or non-numeric delay is a bug in the
    user's function and is reported as such rather than turned into a busy loop.
    """

    __slots__ = ("func",)

    def __init__(self, func: Callable[[int, float], float]) -> None:
        if not callable(func):
            raise TypeError(
                f"CustomBackoff needs a callable (retry_number, previous), got {func!r}"
            )
        self.func = func

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        """The function's delay, checked to be seconds (a number or a ``timedelta``)."""
        value = self.func(retry_number, previous_delay)
        # no bound here: a huge delay (inf to say "give up") meets the deadline, or the
        # clock's sleep caps it; it is not an error in the middle of a failure
        return to_seconds(value, f"delay returned by {self.func!r}", allow_inf=True)

    def __repr__(self) -> str:
        return f"CustomBackoff({self.func!r})"
