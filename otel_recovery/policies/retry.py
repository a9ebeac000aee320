"""``Retry``: which failures to repeat, how often, and how long to wait in between.

Retry decides only about a single failure; the order of policies and the loop live in the
engine and the drivers. What is retried is always explicit (``on=``) or comes from the
classifier's ``retryable`` verdict: nothing silently retries every ``Exception``.

Server-directed delays win over backoff: a ``Retry-After`` of *t* seconds gives a delay of
``t + U(0, retry_after_jitter)``, never less than *t* (the server asked for at least that),
and a retry is abandoned when *t* exceeds ``retry_after_cap`` rather than hammering early.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Protocol, TypeAlias, runtime_checkable

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies._error_match import ErrorMatch, check_error_match, error_matches
from otel_recovery.policies.backoff import (
    Backoff,
    CustomBackoff,
    ExponentialBackoff,
    refuse_backoff_class,
)

__all__ = ["Retry", "RetryAdvice", "RetryAdvisor", "RetryOn"]

_log = logging.getLogger("otel_recovery")

RetryOn: TypeAlias = ErrorMatch
"""Exception types, or a predicate, that mark a failure as worth retrying."""

_NEVER_RETRIED: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


class RetryAdvice(Protocol):
    """An advisor's answer for one failure: ``retry`` says whether to try again."""

    @property
    def retry(self) -> bool: ...


@runtime_checkable
class RetryAdvisor(Protocol):
    """A second opinion on retrying, consulted after the rules allow a retry (a learner).

    ``advise`` is asked once per retryable failure; ``learn`` is told how the advice turned
    out: for a retry, whether the next attempt succeeded; for giving up, at once.
    """

    def advise(self, error: BaseException, info: ErrorInfo, attempt: int) -> RetryAdvice: ...

    def learn(self, advice: RetryAdvice, *, success: bool, seconds: float) -> None: ...


class Retry:
    """Retry configuration.

    - ``attempts``: total attempts including the first (``attempts=1`` never retries).
    - ``deadline``: total time budget for all attempts and sleeps; a retry whose sleep would
      end past it is not started (Envoy's route timeout "includes all retries").
    - ``attempt_timeout``: limit for each single attempt (async calls are cancelled; sync
      calls see it through :func:`otel_recovery.remaining_time`).
    - ``backoff``: a :class:`Backoff` or a plain ``(retry_number, previous) -> seconds``.
    - ``on``: exception types or a predicate; ``None`` trusts the classifier.
    """

    __slots__ = (
        "advisor",
        "attempt_timeout",
        "attempts",
        "backoff",
        "deadline",
        "on",
        "retry_after_cap",
        "retry_after_jitter",
        "rng",
    )

    def __init__(
        self,
        attempts: int = 3,
        *,
        deadline: Duration | None = None,
        attempt_timeout: Duration | None = None,
        backoff: Backoff | Callable[[int, float], float] | None = None,
        on: RetryOn | None = None,
        retry_after_cap: Duration = 60.0,
        retry_after_jitter: Duration = 1.0,
        rng: random.Random | None = None,
        advisor: RetryAdvisor | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1 (1 means no retry), got {attempts!r}")
        self.attempts = attempts
        deadline_seconds = (
            None if deadline is None else to_seconds(deadline, "deadline", allow_inf=True)
        )
        self.deadline = None if deadline_seconds == math.inf else deadline_seconds  # no bound
        self.attempt_timeout = (
            None if attempt_timeout is None else to_seconds(attempt_timeout, "attempt_timeout")
        )
        if self.attempt_timeout == 0 or self.deadline == 0:
            raise ValueError("deadline and attempt_timeout must be > 0 seconds when given")
        refuse_backoff_class(backoff)
        if backoff is None:
            backoff = ExponentialBackoff()
        elif not isinstance(backoff, Backoff):
            if not callable(backoff):
                raise TypeError(
                    "backoff must be a Backoff (ExponentialBackoff, FixedBackoff, ...) or a "
                    f"function (retry_number, previous_delay) -> seconds; got {backoff!r}"
                )
            backoff = CustomBackoff(backoff)
        self.backoff: Backoff = backoff
        self.on = None if on is None else check_error_match(on, "Retry")
        self.retry_after_cap = to_seconds(retry_after_cap, "retry_after_cap", allow_inf=True)
        self.retry_after_jitter = to_seconds(retry_after_jitter, "retry_after_jitter")
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(
                f"rng must be a random.Random (seeded for repeatable tests), got {rng!r}"
            )
        self.rng = rng if rng is not None else random.Random()
        if advisor is not None and (
            isinstance(advisor, type) or not isinstance(advisor, RetryAdvisor)
        ):
            raise TypeError(
                f"advisor must be an object with advise() and learn() (an instance, not a "
                f"class), got {advisor!r}"
            )
        self.advisor = advisor

    def is_retryable(self, error: BaseException, info: ErrorInfo) -> bool:
        """Whether this failure may be repeated at all (ignoring attempts and budgets)."""
        if isinstance(error, _NEVER_RETRIED) or not isinstance(error, Exception):
            return False
        on = self.on
        if on is None:
            return info.retryable
        try:
            return error_matches(on, error)
        except Exception:
            # A broken predicate must not replace the caller's error with its own.
            _log.exception("Retry on= predicate %r raised; not retrying", on)
            return False

    def delay_for(self, retry_number: int, previous_delay: float, info: ErrorInfo) -> float | None:
        """Seconds to wait before retry ``retry_number``; None if the server asks for too long."""
        server_wait = info.retry_after
        if server_wait is not None:
            if server_wait > self.retry_after_cap:
                return None
            room = min(self.retry_after_jitter, self.retry_after_cap - server_wait)
            return server_wait + (self.rng.uniform(0.0, room) if room > 0 else 0.0)
        return self.backoff.delay(retry_number, previous_delay, self.rng)

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, deadline={self.deadline}, "
            f"attempt_timeout={self.attempt_timeout}, backoff={self.backoff!r}, on={self.on!r})"
        )
