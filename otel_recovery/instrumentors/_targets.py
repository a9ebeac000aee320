"""One circuit breaker and one retry budget per target server, built from the settings.

resilience4j's golden rule: one breaker per backend. A failing ``payments:443`` must not open
the circuit for ``search:443``, and retries against one must not spend another's budget. The
number of targets is bounded (least recently used are forgotten) so a client that talks to
unboundedly many hosts cannot grow memory without limit.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from otel_recovery._clock import Clock
from otel_recovery._forksafe import new_lock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._settings import RecoverySettings, section_keys
from otel_recovery.instrumentors._target_policy import AMend, Mend, PassesRefused, TargetPolicy
from otel_recovery.instrumentors._target_retries import LayeredRetry, NeverRan, NeverRanRetry
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
from otel_recovery.telemetry import Telemetry

__all__ = ["FallbackOn", "TargetPolicies"]

FallbackOn: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)


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
        kind = NeverRanRetry if never_ran is not None else LayeredRetry if not_retried else Retry
        retry = kind(
            s.max_attempts if retries else 1,
            deadline=s.deadline,
            attempt_timeout=s.attempt_timeout if timed else None,
            backoff=ExponentialBackoff(
                initial=s.backoff_initial,
                maximum=max(s.backoff_max, s.backoff_initial),  # see _ordered_settings
                jitter="full",
            ),
            retry_after_cap=s.retry_after_cap,
            advisor=(
                target.advisor_of(self.learner)
                if self.learner is not None and retry_allowed
                else None
            ),
        )
        if isinstance(retry, LayeredRetry):
            retry.not_retried, retry.repeats = not_retried, repeats
        elif isinstance(retry, NeverRanRetry) and never_ran is not None:
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
