"""One circuit breaker and one retry budget per target server, built from the settings.

resilience4j's golden rule: one breaker per backend. A failing ``payments:443`` must not open
the circuit for ``search:443``, and retries against one must not spend another's budget. The
number of targets is bounded (least recently used are forgotten) so a client that talks to
unboundedly many hosts cannot grow memory without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias

from otel_recovery._clock import Clock
from otel_recovery._engine import Action, Decision, give_up
from otel_recovery._forksafe import new_lock
from otel_recovery._reraise import reraise
from otel_recovery.classify import Classifier, ErrorInfo
from otel_recovery.instrumentors._attempt_site import (
    cut_call_limit,
    past_call_limit,
    site_of,
    within_call_limit,
)
from otel_recovery.instrumentors._client_retries import client_retries
from otel_recovery.instrumentors._elsewhere import answered_elsewhere
from otel_recovery.instrumentors._settings import RecoverySettings, section_keys
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.learning.advisor import LearnedRetryAdvisor
from otel_recovery.learning.strategy import StrategyLearner
from otel_recovery.policies import (
    CircuitBreaker,
    ExponentialBackoff,
    Fallback,
    Retry,
    RetryBudget,
)
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry import CallTrace, Telemetry
from otel_recovery.telemetry.attributes import (
    HTTP_CLIENT_RETRIES,
    REDIS_CLIENT_RETRIES,
    RETRY_DISALLOWED,
)

__all__ = [
    "FallbackOn",
    "NeverRan",
    "TargetPolicies",
    "TargetPolicy",
    "hold_back",
    "is_session_bound",
    "session_bound",
]

FallbackOn: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
PassesRefused: TypeAlias = Callable[[tuple[Any, ...], dict[str, Any]], Callable[..., Any] | None]
"""``passes(args, kwargs)``: for a call an open circuit refuses that must still be sent (a
transaction's own ROLLBACK), the function that sends it ungated; None for every other call."""
Mend: TypeAlias = Callable[[BaseException, tuple[Any, ...]], None]
"""``mend(error, args)``: what an instrumentor repairs after a failed attempt of a call
with ``args`` (see ``PolicyCore._after_failure``)."""
AMend: TypeAlias = Callable[[BaseException, tuple[Any, ...]], Awaitable[None]]
NeverRan: TypeAlias = Callable[[BaseException], bool]
"""``never_ran(error)``: whether a failure proves the call never reached the server (a
connection that could not be made, a command the server refused before running it), so
that even a call that may not be repeated can be sent again. Asked only after a failure;
a module-level function, so plans that share it share their cache entries."""


class _LayeredRetry(Retry):
    """A retry that leaves alone the failures a lower layer has already retried (the
    lower layer repeats them ``repeats`` times: redis-py's connection ``Retry``)."""

    __slots__ = ("not_retried", "repeats")
    not_retried: tuple[type[BaseException], ...]
    repeats: int

    def is_retryable(self, error: BaseException, info: ErrorInfo) -> bool:
        if isinstance(error, self.not_retried):
            return False
        return super().is_retryable(error, info)


_HELD_BACK = "_otel_recovery_held_back"


def hold_back(error: BaseException) -> None:
    """Keep a ``never_ran`` failure from being resent: the mend that saw it knows the proof
    does not hold for this call, or that a resend could not help (see ``_NeverRanRetry``)."""
    with contextlib.suppress(Exception):  # an exception type with __slots__: resent as usual
        setattr(error, _HELD_BACK, True)


_SESSION_BOUND = "_otel_recovery_session_bound"


def session_bound(error: BaseException) -> None:
    """Keep a failed call from being resent at all: it was made in a session whose state
    a resend on a new connection would not have (a Redis ``single_connection_client``'s
    hand-sent ``MULTI``, ``WATCH`` or ``SELECT``). Said by the mend that knows the client."""
    with contextlib.suppress(Exception):  # an exception type with __slots__: resent as usual
        setattr(error, _SESSION_BOUND, True)


def is_session_bound(error: BaseException) -> bool:
    try:
        return getattr(error, _SESSION_BOUND, False) is True
    except Exception:  # a hostile __getattr__ must not replace the caller's error
        return False


class _NeverRanRetry(Retry):
    """A retry for a call that may not be repeated, except after a failure that proves it
    never ran (``never_ran``: a refused connection, Redis refusing a command with
    ``READONLY``), unless the instrumentor's mend held that failure back
    (:func:`hold_back`)."""

    __slots__ = ("never_ran",)
    never_ran: NeverRan

    def proves_never_ran(self, error: BaseException) -> bool:
        return self.never_ran(error) and not getattr(error, _HELD_BACK, False)

    def is_retryable(self, error: BaseException, info: ErrorInfo) -> bool:
        return self.proves_never_ran(error) and super().is_retryable(error, info)


_Left: TypeAlias = "tuple[CallTrace | None, int, bool]"
"""What the driver leaves of a call its own time limit cut: its trace, the attempts made,
and whether its outcome is already on the breaker."""


class TargetPolicy(RecoveryPolicy):
    """One target's policy as an instrumentor runs it.

    An open circuit raises ``rejection``: a ``CircuitOpenError`` that is also the client
    library's own connection error, so the application's ``except`` clauses, and frameworks
    that handle only the driver's errors (SQLAlchemy wraps DBAPI errors and lets anything
    else escape), treat it as the failure it stands for. A call that may not be retried
    says why on its trace (``otel_recovery.retry.disallowed``), on our own span as on
    contrib's.

    ``passes_refused`` names the calls an open circuit must not refuse (see
    :data:`PassesRefused`): they are sent as if we were not there, neither counted nor
    traced. It is asked only on the rejection path, so it costs nothing while the circuit
    is closed.

    A failure that the client library's own retry already repeated (marked by an HTTP
    site, see :mod:`._client_retries`) is not retried again; its trace says so.

    ``mend`` (and ``amend`` for awaited calls) repairs what a failed attempt revealed,
    before the call is sent again or given up; a failure of its own is logged once and the
    call goes on as if it had not been asked.
    """

    __slots__ = (
        "_amend",
        "_disallowed",
        "_home",
        "_mend",
        "_never_repeated",
        "_passes_refused",
        "_rejection_type",
        "_timeout_type",
    )
    _marks_resends = True  # the HTTP instrumentors' (Redis and SQL use GuardedPolicy)

    def __init__(
        self,
        rejection: type[CircuitOpenError],
        disallowed: str | None,
        passes_refused: PassesRefused | None = None,
        timeout: type[Exception] = TimeoutError,
        mend: Mend | None = None,
        amend: AMend | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._rejection_type = rejection
        self._passes_refused = passes_refused
        self._timeout_type = timeout
        self._mend = mend
        self._amend = amend
        self._home: object = None
        """The table's target whose breaker and budget this runs (``TargetPolicies._build``):
        a plan kept by a client keeps it for the table to find again."""
        self._disallowed: str | None = None
        # a call that may never be repeated stops because it may not be, as one whose
        # repeats are allowed only after some failures does on the others (not because its
        # one attempt was used up: the same POST would say two things by the settings)
        self._never_repeated: str | None = None
        if disallowed is not None and isinstance(self.retry, _NeverRanRetry):
            # retried after some failures: said only when it stops on one that may have run
            self._disallowed = disallowed
        else:
            self._never_repeated = disallowed

    def _after_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        mend = self._mend
        if mend is not None:
            try:
                mend(error, args)
            except Exception as problem:
                report_internal_error(f"{self.name} after a failure", problem)

    async def _aafter_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        amend = self._amend
        if amend is not None:
            try:
                await amend(error, args)
            except Exception as problem:
                report_internal_error(f"{self.name} after a failure", problem)

    def _before_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        site = site_of(fn)
        if site is not None:
            try:
                site.let_go(args)
            except Exception as problem:
                report_internal_error(f"{self.name} before a retry", problem)

    async def _abefore_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        site = site_of(fn)
        if site is not None:
            try:
                await site.alet_go(args)
            except Exception as problem:
                report_internal_error(f"{self.name} before a retry", problem)

    def _resend_refused(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        site = site_of(fn)
        if site is None:
            return False
        try:
            return site.closed(args)
        except Exception as problem:
            report_internal_error(f"{self.name} before a retry", problem)
            return False

    async def _arecover(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException,
        started: float,
        took: float,
    ) -> Any:
        """Recovery within the call's own time limit, where its site has one (aiohttp's
        ``ClientTimeout.total``): see :mod:`._attempt_site`."""
        site, limit = site_of(fn), None
        if site is not None:
            try:
                limit = site.time_limit(args)
            except Exception as problem:
                report_internal_error(f"{self.name} reading the call's time limit", problem)
        recovering = super()._arecover(fn, args, kwargs, error, started, took)
        del error  # the coroutine has it: kept here too, it would make a frame cycle
        if limit is None:
            return await recovering

        def timed_out() -> BaseException:
            message = f"the call exceeded its own {limit:.3g}s time limit, retries included"
            try:
                own = None if site is None else site.time_limit_error(message)
            except Exception as problem:
                report_internal_error(f"{self.name} reading the call's time limit", problem)
                own = None
            return self._timeout_type(message) if own is None else own

        async def answer(cut: BaseException, left: _Left | None) -> Any:
            """The call gave up at its limit: a fallback answers it, or it fails there."""
            if left is None:  # the driver had settled the call already (a fallback's await)
                try:
                    reraise(cut)
                finally:
                    del cut
            trace, attempts, settled = left
            info = self._classify(cut)
            decision = give_up(self.fallback, cut, "deadline")
            if not settled:
                self._stopped(decision, cut, info, attempts, started, trace)
            return await self._agive_up(decision, cut, info, attempts, trace, fn, args, kwargs)

        return await within_call_limit(
            started, started + limit, self.clock.now(), recovering, timed_out, answer
        )

    def _abandon(
        self,
        settled: bool,
        trace: CallTrace | None,
        attempts: int,
        info: ErrorInfo | None,
        escaped: BaseException,
        started: float,
    ) -> None:
        """A call its own time limit cut (:func:`within_call_limit`) is not abandoned: it
        gave up at that limit, and is settled as such once the cut is caught (``answer`` in
        :meth:`_arecover`): counted on the breaker as the failure it is, its trace ended
        with ``stop_reason=deadline`` and the error the application gets (aiohttp's timeout
        error), or answered by the fallback, as when the limit is found to have passed
        before a retry. Not as a cancellation: no one cancelled the call, and a server that
        keeps every call past its limit would never count."""
        if isinstance(escaped, asyncio.CancelledError):
            limit = cut_call_limit(started)
            if limit is not None:
                limit.left = (trace, attempts, settled)
                return
        super()._abandon(settled, trace, attempts, info, escaped, started)

    def _attempt_timed_out(self, limit: float) -> BaseException:
        """A ``TimeoutError`` that is also the client library's own timeout error, so an
        application's ``except redis.RedisError`` / ``psycopg.Error`` (and SQLAlchemy's
        wrapping of DBAPI errors) handle an attempt our time limit cancelled."""
        return self._timeout_type(f"attempt exceeded its {limit:.3g}s time limit")

    def _decide(
        self, error: BaseException, info: ErrorInfo, attempt: int, delay: float, started: float
    ) -> Decision:
        if (
            self._never_repeated
            or client_retries(error)
            or answered_elsewhere(error)
            or is_session_bound(error)
        ):
            return give_up(self.fallback, error, "not_retryable")
        decision = super()._decide(error, info, attempt, delay, started)
        if decision.action is Action.RETRY and past_call_limit(
            started, self.clock.now(), decision.delay
        ):
            return give_up(self.fallback, error, "deadline")  # the client's own limit
        return decision

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
        super()._stopped(decision, error, info, attempts, started, trace, took)
        if trace is None:
            return
        retry = self.retry
        # only where a retry could have mended it: a non-transient error (a WRONGTYPE) is
        # not retried for its own reason, which the classification gives
        why = self._never_repeated if info.retryable else None
        if (
            why is None
            and info.retryable
            and self._disallowed is not None
            and isinstance(retry, _NeverRanRetry)
            and not retry.proves_never_ran(error)
        ):
            why = self._disallowed
        if why is None and answered_elsewhere(error):  # a redirect's target failed
            why = "redirected"  # (see _elsewhere); a call never repeated says why not
        if why is None and info.retryable and is_session_bound(error):
            why = "session"  # (see session_bound)
        if why is not None and not isinstance(error, CircuitOpenError):
            try:
                trace.span.set_attribute(RETRY_DISALLOWED, why)
            except Exception:  # telemetry must never replace the caller's error
                return
        retries, attribute = client_retries(error), HTTP_CLIENT_RETRIES
        if (  # on our own span; under contrib's, the DB layer says it (explain_no_retry)
            not retries
            and self._own_span
            and isinstance(retry, _LayeredRetry)
            and isinstance(error, retry.not_retried)
        ):
            retries, attribute = retry.repeats, REDIS_CLIENT_RETRIES
        if retries:
            try:
                trace.span.set_attribute(RETRY_DISALLOWED, "client_retried")
                trace.span.set_attribute(attribute, retries)
            except Exception:  # telemetry must never replace the caller's error
                return

    def _record_outcome(
        self, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None:
        """A failure met at another server (a redirect's target, see :mod:`._elsewhere`)
        is an answer of this one: a success on its breaker."""
        if error is not None and answered_elsewhere(error):
            error, info = None, None
        super()._record_outcome(error, info, took)

    def _passing(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], release: bool
    ) -> Callable[..., Any] | None:
        passes = self._passes_refused
        if passes is None or release:  # release: a full bulkhead, not the circuit
            return None
        return passes(args, kwargs)

    def _reject(
        self,
        error: BaseException,
        started: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        release: bool,
    ) -> Any:
        send = self._passing(args, kwargs, release)
        if send is not None:
            return send(*args, **kwargs)
        return super()._reject(error, started, fn, args, kwargs, release=release)

    async def _areject(
        self,
        error: BaseException,
        started: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        release: bool,
    ) -> Any:
        send = self._passing(args, kwargs, release)
        if send is not None:
            return await send(*args, **kwargs)
        return await super()._areject(error, started, fn, args, kwargs, release=release)

    def _rejection(self) -> CircuitOpenError:
        breaker = self.breaker
        assert breaker is not None  # every target's policy has the target's breaker
        return self._rejection_type(breaker.name, breaker.retry_after())


class _Target:
    __slots__ = ("__weakref__", "advisor", "breaker", "budget", "policies", "resolved")

    def __init__(self, breaker: CircuitBreaker, budget: RetryBudget) -> None:
        self.breaker = breaker
        self.budget = budget
        self.policies: dict[tuple[object, ...], RecoveryPolicy] = {}
        self.advisor: LearnedRetryAdvisor | None = None
        self.resolved: set[tuple[Any, ...]] = set()
        """Its keys in ``TargetPolicies._resolved``, dropped from there when the table
        forgets it (some may have gone already, with a clear of the whole cache)."""

    def advisor_of(self, learner: StrategyLearner) -> LearnedRetryAdvisor:
        """The target's one advisor, shared by its policies: it tells the learner the calls
        the target's budget counted (each first attempt; the happy path does nothing more),
        so the retry-ratio cap compares retries with real traffic. One per target, or each
        policy's advisor would count the same calls again."""
        if self.advisor is None:
            budget = self.budget
            self.advisor = LearnedRetryAdvisor(
                learner, service=self.breaker.name, calls=lambda: budget.total_calls
            )
        return self.advisor


class TargetPolicies:
    """``policy_for(host, port, operation, retry_allowed)`` -> the policy to run a call under.

    A call that may not be repeated (a POST, an INCR, a statement that may have run) gets a
    policy with the same breaker but a single attempt: its failure is still classified,
    recorded and counted against the target, and re-raised unchanged.
    """

    def __init__(
        self,
        library: str,
        settings: RecoverySettings,
        *,
        span: Literal["own", "current"] = "own",
        clock: Clock | None = None,
        max_targets: int = 1024,
        classifier: Classifier | None = None,
        fallback_on: FallbackOn = Exception,
        telemetry: Telemetry | bool = True,
        learner: StrategyLearner | None = None,
        rejection: type[CircuitOpenError] = CircuitOpenError,
        passes_refused: PassesRefused | None = None,
        timeout: type[Exception] = TimeoutError,
        mend: Mend | None = None,
        amend: AMend | None = None,
        policy_class: type[TargetPolicy] | None = None,
    ) -> None:
        """``classifier`` replaces the process-wide one for these policies (the HTTP
        instrumentors classify retryable *responses* by status); ``fallback_on`` limits what
        a configured fallback answers for (transport failures, not programming errors);
        ``telemetry`` routes spans and metrics to the providers given to ``instrument()``;
        ``rejection`` is what an open circuit raises and ``passes_refused`` what it lets
        through all the same; ``timeout`` is what an awaited attempt that overran
        ``attempt_timeout`` raises, ``mend`` and ``amend`` what is repaired after a failure
        (see ``TargetPolicy``); ``policy_class`` is the class of the policies built (a
        :class:`TargetPolicy` subclass: the Redis and PostgreSQL instrumentors' guard their
        recovery step, ``_guarded.GuardedPolicy``)."""
        self.library = library
        self.settings = settings
        self._span: Literal["own", "current"] = span
        self._clock = clock
        self._classifier = classifier
        self._fallback_on = fallback_on
        self._telemetry = telemetry
        self.learner = learner
        self._rejection = rejection
        self._passes_refused = passes_refused
        self._timeout = timeout
        self._mend = mend
        self._amend = amend
        self._policy_class = policy_class or TargetPolicy
        self._forgetting: list[Callable[[], None]] = []
        self._max = max_targets
        self._targets: OrderedDict[tuple[str, int | None], _Target] = OrderedDict()
        # Targets the table forgot while a plan somewhere (a client's pool, a connection)
        # still runs one of their policies, each of which holds its target: asked for
        # again, such a target comes back, so one server never has two circuits and two
        # budgets. One nothing uses any more is gone from here too.
        self._forgotten: weakref.WeakValueDictionary[tuple[str, int | None], _Target]
        self._forgotten = weakref.WeakValueDictionary()
        self._lock = new_lock()
        # Resolved policies by call shape: the per-call cost is one dict lookup. Operations
        # only become part of the key where the settings have a section for them, so paths
        # with ids in them cannot grow this without bound. A target's entries go when the
        # table forgets it, or they would keep its breaker and budget alive.
        self._resolved: dict[tuple[Any, ...], RecoveryPolicy] = {}
        self._operation_sections = {
            key: frozenset(section.get("operations", {}))
            for key, section in settings.targets.items()
        }

    def _target(self, host: str, port: int | None) -> _Target:
        key = (host, port)
        with self._lock:
            target = self._targets.get(key)
            if target is not None:
                self._targets.move_to_end(key)
                return target
            revived = self._forgotten.get(key)
        # Made outside the lock. With OTEL_RECOVERY_STORE_URL the breaker and budget are
        # shared, and the first one starts the sync thread; under gevent starting a thread
        # switches greenlets, and this lock is a real one when instrument() ran before gevent
        # patched (gunicorn -k gevent): the next greenlet to get here would block the hub
        # for good. Two callers may each make one; the first kept is everyone's.
        made = revived if revived is not None else self._new_target(host, port)
        with self._lock:
            target = self._targets.setdefault(key, made)
            self._targets.move_to_end(key)
            forgot = len(self._targets) > self._max
            while len(self._targets) > self._max:
                old_key, old = self._targets.popitem(last=False)
                self._forgotten[old_key] = old
                # and its resolved policies: kept, they would keep its breaker and budget
                # alive (with OTEL_RECOVERY_STORE_URL, syncing with Redis for good)
                for resolved in old.resolved:
                    self._resolved.pop(resolved, None)
        if forgot:
            self._forgot()
        return target

    def on_forget(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the table forgets a target (past ``max_targets``):
        a cache of plans must drop what it remembered, or the plans it keeps for that
        target would go on with a breaker the table no longer has, while new calls to the
        same target get a new one (two circuits for one server)."""
        self._forgetting.append(callback)

    def _forgot(self) -> None:
        for callback in self._forgetting:
            try:
                callback()
            except Exception as problem:
                report_internal_error(f"{self.library}: forgetting a target's plans", problem)

    def _new_target(self, host: str, port: int | None) -> _Target:
        s = self.settings.for_target(host, port, None)
        name = f"{self.library} {host}:{port}" if port is not None else f"{self.library} {host}"
        breaker = CircuitBreaker(
            name=name,
            timeout=s.breaker_open_seconds,
            failure_rate_threshold=s.breaker_failure_rate,
            window="count",
            window_size=s.breaker_window,
            minimum_calls=min(s.breaker_minimum_calls, s.breaker_window),
            half_open_max_calls=s.breaker_half_open_calls,
            clock=self._clock,
        )
        budget = RetryBudget(
            ratio=s.budget_ratio,
            min_per_second=s.budget_min_per_second,
            name=name,
            clock=self._clock,
        )
        return _Target(breaker, budget)

    def policy_for(
        self,
        host: str,
        port: int | None,
        operation: str | None,
        *,
        retry_allowed: bool,
        span: Literal["own", "current"] | None = None,
        not_retried: tuple[type[BaseException], ...] = (),
        disallowed: str | None = None,
        timed: bool = True,
        repeats: int = 0,
        rejection: type[CircuitOpenError] | None = None,
        never_ran: NeverRan | None = None,
        reads: bool = False,
    ) -> RecoveryPolicy:
        """The policy for one call to ``host:port``.

        ``span`` overrides the span mode for this call (a DB instrumentor annotates contrib's
        span when contrib is above it, and opens its own span when it is not).
        ``not_retried`` lists failures a lower layer already retried (redis-py's connection
        ``Retry``, ``repeats`` times): repeating them here would multiply attempts, so they
        are only recorded.
        ``disallowed`` is why a call that may not be retried is not: a failure's trace says so.
        ``timed=False`` leaves out ``attempt_timeout`` (a call that waits on purpose, such as
        Redis's ``BLPOP``: the limit would cut the wait it asked for). ``rejection`` replaces
        the instrumentor's error for an open circuit at sites where that one would do harm
        (Redis Cluster: see ``RedisCircuitOpenError``). ``never_ran`` tells the failures that
        prove a call never ran: a call that may not be retried is retried after those.
        ``reads``: the call only reads (a GET, a Redis read), so a fallback set for the
        service or the target may answer it; anything else gets one only from its own
        operation section (``RecoverySettings.names_fallback``): a write that failed may
        have been applied, and a fallback would make it look done.
        """
        op_key = self._operation_key(host, port, operation)
        fast_key = (
            host,
            port,
            op_key,
            retry_allowed,
            span,
            not_retried,
            disallowed,
            timed,
            repeats,
            rejection,
            never_ran,
            reads,
        )
        resolved = self._resolved.get(fast_key)
        if resolved is not None and resolved.breaker is self.known_breaker(host, port):
            return resolved
        policy = self._build(
            host, port, op_key, retry_allowed, span, not_retried, disallowed, timed, repeats,
            rejection, never_ran, reads,
        )  # fmt: skip
        # Remembered only while its target is in the table, which forgets it with the target
        # (see _target); the lock keeps a target forgotten meanwhile from being remembered.
        with self._lock:
            target = self._targets.get((host, port))
            if target is not None and target.breaker is policy.breaker:
                if len(self._resolved) >= 4 * self._max:
                    self._resolved.clear()
                self._resolved[fast_key] = policy
                target.resolved.add(fast_key)
        return policy

    def _operation_key(self, host: str, port: int | None, operation: str | None) -> str | None:
        if operation is None or not self._operation_sections:
            return None
        keys = (host, f"{host}:{port}") if "@" not in host else section_keys(host, port)
        for key in keys:  # "@": a Sentinel service's name, see section_keys
            if operation in self._operation_sections.get(key, ()):
                return operation
        return None

    def known_breaker(self, host: str, port: int | None) -> CircuitBreaker | None:
        """The target's current breaker, None before a call to it (a target forgotten by the
        LRU gets a new one)."""
        target = self._targets.get((host, port))
        return target.breaker if target is not None else None

    def _build(
        self,
        host: str,
        port: int | None,
        operation: str | None,
        retry_allowed: bool,
        span: Literal["own", "current"] | None,
        not_retried: tuple[type[BaseException], ...],
        disallowed: str | None,
        timed: bool,
        repeats: int,
        rejection: type[CircuitOpenError] | None,
        never_ran: NeverRan | None,
        reads: bool,
    ) -> RecoveryPolicy:
        target = self._target(host, port)
        s = self.settings.for_target(host, port, operation)
        specific = operation if s != self.settings.for_target(host, port, None) else None
        mode = span or self._span
        key = (
            specific, retry_allowed, mode, not_retried, disallowed, timed, repeats, rejection,
            never_ran, reads,
        )  # fmt: skip
        policy = target.policies.get(key)
        if policy is not None:
            return policy
        never_ran = None if retry_allowed else never_ran
        retries = retry_allowed or never_ran is not None
        kind = _NeverRanRetry if never_ran is not None else _LayeredRetry if not_retried else Retry
        retry = kind(
            s.max_attempts if retries else 1,
            deadline=s.deadline,
            attempt_timeout=s.attempt_timeout if timed else None,
            backoff=ExponentialBackoff(
                initial=s.backoff_initial,
                maximum=max(s.backoff_max, s.backoff_initial),  # see _policy_file
                jitter="full",
            ),
            retry_after_cap=s.retry_after_cap,
            advisor=(
                target.advisor_of(self.learner)
                if self.learner is not None and retry_allowed
                else None
            ),
        )
        if isinstance(retry, _LayeredRetry):
            retry.not_retried, retry.repeats = not_retried, repeats
        elif isinstance(retry, _NeverRanRetry) and never_ran is not None:
            retry.never_ran = never_ran
        policy = self._policy_class(
            rejection or self._rejection,
            disallowed,
            self._passes_refused,
            self._timeout,
            self._mend,
            self._amend,
            retry=retry,
            breaker=target.breaker,
            budget=target.budget if retries else None,
            fallback=(
                Fallback(s.fallback_value, on=self._fallback_on)
                if s.has_fallback
                and self._fallback_on != ()  # an instrumentor no value can stand in for (SQL)
                and (reads or self.settings.names_fallback(host, port, operation))
                else None
            ),
            classifier=self._classifier,
            name=target.breaker.name,
            clock=self._clock,
            telemetry=self._telemetry,
            span=mode,
        )
        policy._home = target  # kept alive by the plans that run it: see _forgotten
        with self._lock:
            return target.policies.setdefault(key, policy)

    def breakers(self) -> list[CircuitBreaker]:
        with self._lock:
            return [target.breaker for target in self._targets.values()]
