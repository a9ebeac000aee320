"""The state and shared steps behind every driver of a :class:`~otel_recovery.RecoveryPolicy`.

The sync and async drivers differ only in how they call, sleep and await; everything they
share (validation, classification, asking the engine, counting outcomes on the breaker,
choosing the fallback, opening the trace) lives in :class:`PolicyCore` once.

This module is the policy's configuration (its slots, checked in ``__init__``) and its happy
path: what the compiled runners read (:meth:`PolicyCore._happy_path`), each attempt's time
limit and classification. The steps of the failure path are mixed in from one module per
concern, none with slots of its own: between a failed attempt and its repeat
(``_policy_retrying``), how a recovered call is recorded on its trace, the breaker and the
retry advisor (``_policy_outcome``), the fallback's answers and the successes they remember
(``_policy_fallback``), and a call refused before any attempt (``_policy_rejection``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._first_times import FirstTimes
from otel_recovery._forksafe import new_lock
from otel_recovery._mixins import plain_self
from otel_recovery._policy_fallback import PolicyFallback
from otel_recovery._policy_outcome import PolicyOutcome, says_dependency_is_up
from otel_recovery._policy_rejection import PolicyRejection
from otel_recovery._policy_retrying import PolicyRetrying
from otel_recovery.classify import (
    CRITICALITY_LEVELS,
    Classifier,
    ErrorCategory,
    ErrorInfo,
    Severity,
    check_classifier,
    classify_on,
    get_default_classifier,
)
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.bulkhead import Bulkhead
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry
from otel_recovery.policies.timeout import Timeout
from otel_recovery.telemetry import Telemetry, check_telemetry, watch_breaker_globally

__all__ = ["AsyncRunner", "HappyPath", "PolicyCore", "Runner", "says_dependency_is_up"]

Runner = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""``run(fn, args, kwargs)``: ``policy.call(fn, *args, **kwargs)`` compiled for a hot path."""
AsyncRunner = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Awaitable[Any]]
"""The async twin of :data:`Runner`."""

_log = logging.getLogger("otel_recovery")
_reported_bugs = FirstTimes()


def _report_classifier_bug(classifier: object, error: BaseException, bug: Exception) -> None:
    """Log a classifier that raised, with its traceback, once per (classifier class, error
    type, bug type): a broken rule meets every failure of a busy service, and a traceback per
    call would bury the log (and cost the failure path). Later ones go to DEBUG."""
    message = "otel_recovery: classifying %s failed; not retrying it"
    if _reported_bugs.first((type(classifier), type(error), type(bug))):
        _log.error(message + " (logged once per classifier and error type)", type(error),
                   exc_info=bug)  # fmt: skip
    else:
        _log.debug(message, type(error), exc_info=bug)


class HappyPath(NamedTuple):
    """The components a compiled happy path touches; see ``PolicyCore._happy_path``."""

    breaker: CircuitBreaker | None
    gate_unlocked: bool
    """``breaker._permit_all`` may stand in for ``breaker.can_execute()`` while True."""
    tallied: bool
    """``next(breaker._tally)`` may stand in for ``breaker.record_success()`` while not None."""
    budget: RetryBudget | None
    deposit: Callable[[], object] | None
    """The budget's deposit counter, or None: call ``budget.record_call`` instead."""
    remember: Callable[..., None] | None


class PolicyCore(PolicyRetrying, PolicyOutcome, PolicyFallback, PolicyRejection):
    """Configuration and the steps both drivers share; see ``RecoveryPolicy`` for the API."""

    _marks_resends: ClassVar[bool] = False
    """Its retries resend an HTTP request (an HTTP instrumentor's policy): they publish the
    ``http.request.resend_count`` claim (:mod:`otel_recovery._attempt`)."""

    __slots__ = (
        "_attempt_limit",
        "_deadline",
        "_good_lock",
        "_last_good",
        "_limits_attempts",
        "_needs_duration",
        "_own_span",
        "_telemetry",
        "breaker",
        "budget",
        "bulkhead",
        "classifier",
        "clock",
        "context",
        "fallback",
        "name",
        "retry",
        "timeout",
    )

    def __init__(
        self,
        *,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        budget: RetryBudget | None = None,
        timeout: Timeout | Duration | None = None,
        fallback: Fallback | None = None,
        bulkhead: Bulkhead | None = None,
        classifier: Classifier | None = None,
        name: str | None = None,
        context: Mapping[str, Any] | None = None,
        clock: Clock | None = None,
        telemetry: Telemetry | bool = True,
        span: Literal["own", "current"] = "own",
    ) -> None:
        _check_type("retry", retry, Retry, "Retry(attempts=3)")
        _check_type("breaker", breaker, CircuitBreaker, "CircuitBreaker(failure_threshold=5)")
        _check_type("budget", budget, RetryBudget, "RetryBudget(ratio=0.2)")
        _check_type("fallback", fallback, Fallback, "Fallback(value) or Fallback(func=...)")
        _check_type("bulkhead", bulkhead, Bulkhead, "Bulkhead(max_concurrent=10)")
        if budget is not None and retry is None:
            raise ValueError("a retry budget needs a retry policy: pass retry=Retry(...) as well")
        if timeout is not None and not isinstance(timeout, Timeout):
            timeout = Timeout(to_seconds(timeout, "timeout", allow_inf=True))
        if span not in ("own", "current"):
            raise ValueError(f"span must be 'own' or 'current', got {span!r}")
        self._own_span = span == "own"
        # Attributes the trace of a call that ran and failed carries (an instrumentor says
        # there why its call was not retried); never a rejection's, which did not run.
        self.retry = retry
        self.breaker = breaker
        self.budget = budget
        self.timeout = timeout
        self.fallback = fallback
        self.bulkhead = bulkhead
        check_classifier(classifier)
        self.classifier = classifier
        if context is not None and not isinstance(context, Mapping):
            raise TypeError(
                f"context must be a mapping of span attributes, such as {{'tenant': 'acme'}}, "
                f"got {type(context).__name__}"
            )
        self.context = dict(context) if context else None
        self.clock = clock_or_default(clock)
        self.name = name or (breaker.name if breaker is not None else "default")
        limits = [
            t
            for t in (
                timeout.seconds if timeout else None,
                retry.attempt_timeout if retry else None,
            )
            if t is not None and t != math.inf  # Timeout(inf): no bound, nothing published
        ]
        self._attempt_limit: float | None = min(limits) if limits else None
        self._deadline: float | None = retry.deadline if retry is not None else None
        self._limits_attempts = self._attempt_limit is not None or self._deadline is not None
        self._needs_duration = breaker is not None and breaker.slow_call_duration is not None
        self._last_good: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self._good_lock = new_lock()
        for component, label in ((breaker, "breaker"), (budget, "budget")):
            own = getattr(component, "clock", None) or getattr(component, "_clock", None)
            if component is not None and own is not self.clock:
                raise ValueError(
                    f"the {label} and the policy read different clocks ({own!r} vs "
                    f"{self.clock!r}); pass the same clock= to both"
                )
        criticality = (self.context or {}).get("criticality")
        if criticality is not None and str(criticality).lower() not in CRITICALITY_LEVELS:
            raise ValueError(
                f"context['criticality'] must be one of {', '.join(CRITICALITY_LEVELS)}, "
                f"got {criticality!r}"
            )
        check_telemetry(telemetry)
        # True follows the process-wide telemetry (resolved at each recovery, so a test
        # kit or a late provider set-up is honoured); a Telemetry pins it; False disables.
        self._telemetry: Telemetry | bool = telemetry
        if breaker is not None:
            if isinstance(telemetry, Telemetry):
                telemetry.watch_breaker(breaker)
            elif telemetry:
                watch_breaker_globally(breaker)

    def _happy_path_inlinable(self) -> bool:
        """True when the happy path needs no slot, deadline or timing (see ``wrap``)."""
        return (
            self.bulkhead is None
            and self._attempt_limit is None
            and self._deadline is None
            and not self._needs_duration
        )

    def _attempt_end(self, attempt_start: float, started: float) -> float | None:
        """When the current attempt must end: its own limit or the total deadline, sooner."""
        end = None if self._attempt_limit is None else attempt_start + self._attempt_limit
        if self._deadline is not None:
            total = started + self._deadline
            end = total if end is None else min(end, total)
        return end

    def _happy_path(self) -> HappyPath:
        """What the compiled happy paths (``SyncDriver.runner``/``AsyncDriver.arunner``) need.

        A hot path pays per Python call, so where the breaker and the budget are the stock
        classes it reads their lock-free state directly instead of calling their methods:
        ``CircuitBreaker._permit_all`` (True while CLOSED, DISABLED or METRICS_ONLY: exactly
        when ``can_execute()`` returns True without the lock), ``CircuitBreaker._tally``
        (set while a success is recorded by one ``next()``: what ``record_success`` does
        then) and ``RetryBudget._bucket_end`` with the deposit counter (what ``record_call``
        does when no bucket rotates). A subclass that overrides those methods, or the ones
        that keep that state (the fleet-wide Redis breaker does), is always called.
        """
        breaker, budget, fallback = self.breaker, self.budget, self.fallback
        return HappyPath(
            breaker=breaker,
            gate_unlocked=_stock(breaker, CircuitBreaker, "can_execute", "_enter"),
            tallied=_stock(
                breaker, CircuitBreaker, "record_success", "record_failure", "_record", "_enter"
            ),
            budget=budget,
            deposit=(
                budget._call_count.__next__
                if budget is not None and _stock(budget, RetryBudget, "record_call", "_rotate")
                else None
            ),
            remember=(
                self._remember if fallback is not None and fallback.last_known_good else None
            ),
        )

    # -- shared steps ----------------------------------------------------------------------

    def _classify(self, error: BaseException) -> ErrorInfo:
        """Classify; a classifier bug must not replace the caller's error with ours."""
        classifier = self.classifier or get_default_classifier()
        try:
            # a Retry-After date is read on the policy's clock (a FakeClock in tests)
            return classify_on(classifier, error, self.context, self.clock)
        except Exception as problem:
            _report_classifier_bug(classifier, error, problem)
            return ErrorInfo(
                category=ErrorCategory.UNKNOWN,
                severity=Severity.MEDIUM,
                retryable=False,
                retry_after=None,
                error_type=type(error).__qualname__,
                fingerprint="0" * 16,
            )

    def _attempt_timed_out(self, limit: float) -> BaseException:
        """What an awaited attempt that overran its time limit raises (retryable)."""
        return TimeoutError(f"attempt exceeded its {limit:.3g}s time limit")


def _stock(component: object, base: type, *methods: str) -> bool:
    """Whether ``component`` runs ``base``'s own code for ``methods``: only then may a
    compiled happy path read the state those methods keep instead of calling them."""
    if component is None:
        return False
    kind = type(component)
    return all(getattr(kind, name) is getattr(base, name) for name in methods)


def _check_type(name: str, value: object, expected: type, example: str) -> None:
    if value is not None and not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__} such as {example}, got {value!r}")


plain_self(PolicyCore)
