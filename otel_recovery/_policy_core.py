"""The state and shared steps behind every driver of a :class:`~otel_recovery.RecoveryPolicy`.

The sync and async drivers differ only in how they call, sleep and await; everything they
share (validation, classification, asking the engine, counting outcomes on the breaker,
choosing the fallback, opening the trace) lives here once.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._engine import Decision, after_failure, after_rejection, give_up
from otel_recovery._first_times import FirstTimes
from otel_recovery._forksafe import new_lock
from otel_recovery._inner_recovery import note_decided
from otel_recovery.classify import (
    CRITICALITY_LEVELS,
    Classifier,
    ErrorCategory,
    ErrorInfo,
    ErrorKind,
    Severity,
    check_classifier,
    classify_on,
    get_default_classifier,
)
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.bulkhead import Bulkhead, BulkheadFullError
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError, CircuitState
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry, RetryAdvice
from otel_recovery.policies.timeout import Timeout, inherited_deadline
from otel_recovery.telemetry import (
    CallTrace,
    Telemetry,
    check_telemetry,
    get_telemetry,
    watch_breaker_globally,
)
from otel_recovery.telemetry._suppressed import telemetry_suppressed

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


_OPEN_STATES = (CircuitState.OPEN, CircuitState.FORCED_OPEN)
_NOT_CLOSED = (*_OPEN_STATES, CircuitState.HALF_OPEN)
_ANSWERED_CATEGORIES = frozenset({ErrorCategory.INVALID_REQUEST, ErrorCategory.CONFIGURATION})
_ANSWERED_KINDS = frozenset({ErrorKind.SERIALIZATION, ErrorKind.READONLY})


def _good_key(fn: Callable[..., Any], arguments: Hashable | None) -> Hashable | None:
    """The last-known-good key of a call of ``fn``: the function and its arguments' key.
    Functions hash by identity, bound methods by their object and function; a function
    made anew for every call (a lambda written at the call) or bound to an unhashable
    object is never remembered, rather than risk answering one caller with another's
    data."""
    if arguments is None:
        return None
    try:
        hash(fn)
    except TypeError:
        return None
    return (fn, arguments)


def says_dependency_is_up(info: ErrorInfo) -> bool:
    """Whether a failure is an answer from a healthy dependency, which a breaker counts as a
    success: the request was wrong (invalid, a syntax error, a missing table, bad
    credentials), lost a race to another one (a serialization failure, a deadlock, a
    Redis ``WATCH`` conflict) or reached a replica that refuses writes (Redis ``READONLY``,
    PostgreSQL 25006: a failover moved the primary, and reads there still work).

    Counting those as failures would let one endpoint's bad query, or one hot row, open the
    circuit for everything else that talks to the same server (Envoy's outlier detection
    likewise ignores 4xx answers). A configuration error of the connection itself (a name
    that does not resolve, a certificate that does not verify) is no answer: it counts.
    """
    if info.kind is ErrorKind.CONNECTION:
        return False
    return info.category in _ANSWERED_CATEGORIES or info.kind in _ANSWERED_KINDS


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


class PolicyCore:
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

    def _trace(self, started: float) -> CallTrace | None:
        """Open the recovery trace; a telemetry failure never breaks the call. None inside
        ``suppress_instrumentation()`` (an exporter's own send, recovered by ``@recover``,
        would otherwise export a span per failed export: see ``telemetry._suppressed``)."""
        telemetry = self._telemetry
        if telemetry is False or telemetry_suppressed():
            return None
        try:
            if telemetry is True:
                telemetry = get_telemetry()
            assert isinstance(telemetry, Telemetry)
            return telemetry.start_call(self.name, started, self.clock, own_span=self._own_span)
        except Exception:
            return None

    def _decide(
        self, error: BaseException, info: ErrorInfo, attempt: int, delay: float, started: float
    ) -> Decision:
        breaker = self.breaker
        if breaker is not None and breaker.state in _OPEN_STATES:
            # Another caller opened the circuit while we were failing: stop hammering.
            return after_rejection(self.fallback, error)
        return after_failure(
            retry=self.retry,
            budget=self.budget,
            fallback=self.fallback,
            error=error,
            info=info,
            attempt=attempt,
            previous_delay=delay,
            started=started,
            now=self.clock.now(),
            outer_deadline=inherited_deadline(self.clock),
        )

    def _after_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        """Called after each failed attempt, before deciding whether to repeat it: where an
        instrumentor repairs what the failure revealed (pooled connections to a server that
        became a replica), for the repeat or for the next call. Asked on the failure path
        only; nothing by default."""

    async def _aafter_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`_after_failure`."""

    def _before_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Called once a failed attempt will be repeated, before the backoff: where a call
        lets go of what that attempt holds (an HTTP response, and with it a pooled
        connection), so the wait does not keep it from others. Not called when the call
        gives up: what the last attempt holds is then the application's. Nothing by
        default."""

    async def _abefore_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`_before_retry`."""

    def _after_backoff(
        self, fn: Callable[..., Any], args: tuple[Any, ...], error: BaseException, started: float
    ) -> Decision | None:
        """Asked after the backoff, before the repeat: why the repeat must not go out after
        all, or None. The wait is where time passes, so what was decided before it may no
        longer hold: another caller opened the circuit meanwhile (or it went half-open, and
        its one probe is someone's: a straggler admitted while it was closed would send
        requests beside it), the total deadline passed during a sleep that woke late (the
        attempt would be refused unsent, and the call end with a made-up timeout instead of
        the failure it met), or the client was closed (:meth:`_resend_refused`)."""
        breaker = self.breaker
        if breaker is not None and breaker.state in _NOT_CLOSED:
            return after_rejection(self.fallback, error)
        now = self.clock.now()
        if self._deadline is not None and now >= started + self._deadline:
            return give_up(self.fallback, error, "deadline")
        outer = inherited_deadline(self.clock)
        if outer is not None and now >= outer:  # an outer policy's attempt is over
            return give_up(self.fallback, error, "deadline")
        if self._resend_refused(fn, args):  # the client was closed meanwhile
            return give_up(self.fallback, error, "client_closed")
        return None

    def _resend_refused(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        """Asked after the backoff, before the repeat: whether the call can no longer be
        made (an HTTP client the application closed during the wait). The call then gives
        up on the failure it has (``stop_reason=client_closed``), which is what the
        application would have had without the retry, instead of the client's own "closed"
        error, which no server caused. Never by default."""
        return False

    def _record_outcome(
        self, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None:
        """Tell the breaker how the logical call ended (once per call, never per attempt)."""
        breaker = self.breaker
        if breaker is None:
            return
        duration = took if self._needs_duration else None
        if error is None or (info is not None and says_dependency_is_up(info)):
            breaker.record_success(duration)
        else:
            breaker.record_failure(duration)

    def _remember(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        now: float,
    ) -> None:
        """Keep a success for last-known-good, per function and call arguments (never
        across them: one policy often serves several functions, and ``get_email(42)``
        must never be answered with what ``get_password_hash(42)`` returned)."""
        fallback = self.fallback
        if fallback is None or not fallback.last_known_good:
            return
        key = _good_key(fn, fallback.key_for(args, kwargs))
        if key is None:
            return
        with self._good_lock:
            self._last_good[key] = (result, now)
            self._last_good.move_to_end(key)
            while len(self._last_good) > fallback.max_entries:
                self._last_good.popitem(last=False)

    def _fallback_plan(
        self,
        error: BaseException,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, Any]:
        """Which fallback answers: a function, a value, the last known good result, or none."""
        fallback = self.fallback
        assert fallback is not None
        if fallback.func is not None:
            return "function", fallback.func
        if fallback.last_known_good:
            key = _good_key(fn, fallback.key_for(args, kwargs))
            with self._good_lock:
                remembered = self._last_good.get(key) if key is not None else None
            if remembered is None:
                return "none", None
            value, at = remembered
            if fallback.max_age is not None and self.clock.now() - at > fallback.max_age:
                return "none", None
            return "last_known_good", value
        return "value", fallback.value

    def _attempt_timed_out(self, limit: float) -> BaseException:
        """What an awaited attempt that overran its time limit raises (retryable)."""
        return TimeoutError(f"attempt exceeded its {limit:.3g}s time limit")

    def _rejection(self) -> CircuitOpenError:
        breaker = self.breaker
        assert breaker is not None
        return CircuitOpenError(breaker.name, breaker.retry_after())

    def _rejected(self, error: BaseException, started: float, *, release: bool) -> Decision:
        """Bookkeeping for a call the breaker or bulkhead refused before any attempt."""
        if release and self.breaker is not None:
            self.breaker.release()
        return after_rejection(self.fallback, error)

    def _open_rejection_trace(
        self, error: BaseException, started: float
    ) -> tuple[ErrorInfo, CallTrace | None]:
        info = self._classify(error)
        trace = self._trace(started)
        if trace is not None:
            trace.rejected("rejected", _component(error), getattr(error, "retry_after", None))
        return info, trace

    def _stopped(
        self,
        decision: Decision,
        error: BaseException,
        info: ErrorInfo,
        attempts: int,
        started: float,
        trace: CallTrace | None,
        took: float | None = None,
    ) -> None:
        """Retrying is over without success: count it on the breaker and in the trace.

        ``took``: the last attempt's duration, what the breaker's slow-call timing reads, as
        for a success after retries: the call as a whole includes our own backoff waits,
        and counted, they made a call of fast attempts "slow" and opened the circuit on
        ``slow_call_rate``. None (a call cut by its own limit): the whole call."""
        self._record_outcome(error, info, self.clock.now() - started if took is None else took)
        if trace is not None:
            trace.stopped(decision.reason, info, self.budget.name if self.budget else None)

    @staticmethod
    def _fallback_done(
        trace: CallTrace | None,
        kind: str,
        error: BaseException,
        info: ErrorInfo | None,
        attempts: int,
        value: Any,
    ) -> Any:
        if trace is not None:
            trace.fallback(kind, error, info)
            trace.end("fallback", attempts, info)
        return value

    def _learn(self, advice: RetryAdvice | None, *, success: bool, seconds: float) -> None:
        """Tell the retry advisor how its advice turned out (never raises)."""
        retry = self.retry
        if advice is None or retry is None or retry.advisor is None:
            return
        try:
            retry.advisor.learn(advice, success=success, seconds=seconds)
        except Exception:
            _log.exception("retry advisor %r failed to learn", retry.advisor)

    def _abandon(
        self,
        settled: bool,
        trace: CallTrace | None,
        attempts: int,
        info: ErrorInfo | None,
        escaped: BaseException,
        started: float,
    ) -> None:
        """Settle a call (started at ``started``) whose recovery was left by an exception
        (cancellation, a bug).

        The breaker gets its half-open permit back unless the outcome was already recorded,
        and the trace is ended (a no-op if the normal path already ended it).
        """
        if not settled and self.breaker is not None:
            self.breaker.release()
        if trace is not None:
            if isinstance(escaped, Exception):
                trace.end("failure", attempts, None, escaped)
            else:
                trace.end("cancelled", attempts, info)

    @staticmethod
    def _failed(
        trace: CallTrace | None, attempts: int, info: ErrorInfo | None, error: BaseException
    ) -> None:
        """The call ends without success (every way of giving up, rejections included)."""
        note_decided(error)
        if trace is not None:
            trace.end("failure" if attempts else "rejected", attempts, info, error)


def _stock(component: object, base: type, *methods: str) -> bool:
    """Whether ``component`` runs ``base``'s own code for ``methods``: only then may a
    compiled happy path read the state those methods keep instead of calling them."""
    if component is None:
        return False
    kind = type(component)
    return all(getattr(kind, name) is getattr(base, name) for name in methods)


def _component(error: BaseException) -> str:
    if isinstance(error, CircuitOpenError):
        return "circuit_breaker"
    if isinstance(error, BulkheadFullError):
        return "bulkhead"
    return type(error).__name__


def _check_type(name: str, value: object, expected: type, example: str) -> None:
    if value is not None and not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__} such as {example}, got {value!r}")
