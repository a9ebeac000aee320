"""The seed API: ``ErrorRecoveryInteraction.recover_from_error(error, context)``.

The caller has already seen ``error`` (that failure is attempt zero); this chooses what to do
next, does it through the ordinary engine (:class:`~otel_recovery.recover.RecoveryPolicy`,
so there is one retry loop in the library, not two) and returns a dict describing the outcome.
Every recovery is an INTERNAL span ``recover_from_error <service_id>``; the engine's
``recover <service_id>`` span nests inside it when retries fail.

Strategy selection, first match wins:

=====================================================  ==========================================
situation                                              action
=====================================================  ==========================================
``context["strategy"]`` given                          that strategy (its ``params`` override
                                                       context keys)
``context["checkpoint_id"]`` given                     CHECKPOINT_RESTORE: restore the state,
                                                       hand it to ``retry_func`` if that takes
                                                       one positional argument (a fresh copy
                                                       per call), else just call it; without
                                                       ``retry_func`` the restored state is the
                                                       result
the service's circuit breaker is open                  FALLBACK with ``fallback_func``, else
                                                       CIRCUIT_BREAK: ``"circuit_open"``, no call
``context["idempotent"] is False`` and a row below    FALLBACK / FAIL_FAST: the call is not
would make the call again                              made again
``context["retry_on"]`` given                          it decides instead of the classifier: a
                                                       match is retried (SELF_HEAL if the kind
                                                       has healing actions, else
                                                       EXPONENTIAL_BACKOFF), anything else gets
                                                       FALLBACK / FAIL_FAST
category CONFIGURATION or INVALID_REQUEST              FALLBACK / FAIL_FAST: no call
kind has healing actions (CONNECTION, SHUTDOWN,        SELF_HEAL: run the healing actions
TIMEOUT when retryable; MEMORY always, as freeing      (:mod:`otel_recovery.healing`), then
memory is what makes a retry worth it)                 retry
not retryable                                          FALLBACK / FAIL_FAST: no call
category RATE_LIMITED                                  EXPONENTIAL_BACKOFF; the wait is exactly
                                                       the error's ``retry_after`` when it has one
any other retryable error                              EXPONENTIAL_BACKOFF
=====================================================  ==========================================

A retrying action without ``retry_func`` cannot recover: ``"failed"`` with reason
``"no retry_func in context"`` (or the fallback). ``retry_func`` is called up to
``max_attempts`` times, after a first backoff wait (the original failure counts as the first
try); which of its failures are retried is the classifier's call, or ``retry_on``'s. An
explicit CIRCUIT_BREAK force-opens the breaker until :meth:`reset_circuit`.
TRANSACTION_ROLLBACK runs ``context["compensations"]`` in reverse order. Sync ``retry_func``
run on the event loop thread: offload blocking work yourself (``asyncio.to_thread``).

Context keys beyond the seed's: ``strategy``, ``criticality`` (raises severity),
``checkpoint_version``, ``reconnect`` and ``timeout`` (for healing), ``compensations``,
``retry_on`` (exception types or a predicate deciding what is retried, the first error
included; by default the classifier decides). Other keys
become span attributes ``otel_recovery.context.<key>``: stringified, redacted, 256 chars.

With ``learner=StrategyLearner(...)``, wherever the table picks EXPONENTIAL_BACKOFF or
SELF_HEAL automatically, the learner chooses instead among giving up, RETRY,
EXPONENTIAL_BACKOFF and that SELF_HEAL (retrying only what is retryable and not marked
``context["idempotent"] = False``), with its learned backoff and retry cap, and learns from
the outcome; results then carry ``learned_action`` and ``learner_mode``. A shadow-mode
learner learns and reports but the table's choice runs.

One :class:`CircuitBreaker` per ``service_id`` (default ``failure_threshold=5, timeout=60``)
counts the outcome of each recovery that calls ``retry_func``; recoveries that make no call
leave it alone, as they say nothing new about the dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from otel_recovery._breaker_registry import BreakerRegistry
from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._recovery_actions import circuit_is_open, execute
from otel_recovery._recovery_context import (
    as_strategy,
    classification_context,
    context_attributes,
    idempotent,
    optional_callable,
    retry_on_verdict,
)
from otel_recovery._recovery_run import Run, finish
from otel_recovery._recovery_spans import activated, start_span, tracer_of
from otel_recovery._recovery_stats import RecoveryStats
from otel_recovery._strategy_selection import (
    RecoveryAction,
    RecoveryStrategy,
    feed_back,
    learned,
    select_action,
)
from otel_recovery.checkpoint import Checkpoints
from otel_recovery.classify import (
    Classifier,
    check_classifier,
    classify_on,
    get_default_classifier,
)
from otel_recovery.healing import HealingRegistry
from otel_recovery.learning.strategy import StrategyLearner
from otel_recovery.policies import Backoff, CircuitBreaker, CircuitState, ExponentialBackoff
from otel_recovery.policies.backoff import refuse_backoff_class
from otel_recovery.stores import Store
from otel_recovery.telemetry import Telemetry, check_telemetry
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry.attributes import (
    RECOVER_FROM_ERROR_SPAN as SPAN_NAME,
)
from otel_recovery.telemetry.attributes import SERVICE_ID, STRATEGY, STRATEGY_REASON

__all__ = ["ErrorRecoveryInteraction", "RecoveryAction", "RecoveryStrategy"]


class ErrorRecoveryInteraction:
    """Recover from errors the caller caught, with checkpoints and statistics (the seed API)."""

    def __init__(
        self,
        *,
        classifier: Classifier | None = None,
        clock: Clock | None = None,
        telemetry: Telemetry | bool = True,
        store: Store | str | None = None,
        healing: HealingRegistry | None = None,
        breaker_factory: Callable[[str], CircuitBreaker] | None = None,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        learner: StrategyLearner | None = None,
        max_breakers: int = 1024,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        refuse_backoff_class(backoff)
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(
                f"backoff must be a Backoff such as ExponentialBackoff(), got {backoff!r}"
            )
        if breaker_factory is not None and not callable(breaker_factory):
            raise TypeError(
                f"breaker_factory must be callable(service_id), got {breaker_factory!r}"
            )
        check_telemetry(telemetry)
        check_classifier(classifier)
        if healing is not None and not isinstance(healing, HealingRegistry):
            raise TypeError(
                f"healing must be a HealingRegistry (register actions with "
                f"healing.register(...)), got {healing!r}"
            )
        self._classifier = classifier
        self.clock: Clock = clock_or_default(clock)
        self.telemetry: Telemetry | bool = telemetry
        self.checkpoints = Checkpoints(store, clock=self.clock)
        self._owns_store = not isinstance(store, Store)  # made here from a URL or the default
        self.healing = healing if healing is not None else HealingRegistry()
        self.max_attempts = max_attempts
        self.backoff: Backoff = backoff if backoff is not None else ExponentialBackoff()
        if learner is not None and not isinstance(learner, StrategyLearner):
            raise TypeError(f"learner must be a StrategyLearner, got {learner!r}")
        self.learner = learner
        self._breaker_factory = breaker_factory
        self._breakers = BreakerRegistry(self._new_breaker, max_breakers)
        self._stats = RecoveryStats()

    @property
    def classifier(self) -> Classifier:
        return self._classifier or get_default_classifier()

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the checkpoint store this interaction made (from ``store="redis://..."``
        or the default), releasing its connections; a store object you passed in is yours
        to close. Also ``with ErrorRecoveryInteraction(...) as recovery:``."""
        if self._owns_store:
            self.checkpoints.close()

    async def aclose(self) -> None:
        """The async twin of :meth:`close`, for a store used through its async client
        (``restore_checkpoint``): also ``async with``."""
        if self._owns_store:
            await self.checkpoints.aclose()

    def __enter__(self) -> ErrorRecoveryInteraction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ErrorRecoveryInteraction:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- circuit breakers ---------------------------------------------------------------------

    def get_circuit_breaker(self, service_id: str) -> CircuitBreaker:
        """The breaker of ``service_id``, created on first use (at most ``max_breakers``
        closed ones are kept: see :mod:`otel_recovery._breaker_registry`)."""
        return self._breakers.get(service_id)

    def _new_breaker(self, service_id: str) -> CircuitBreaker:
        if self._breaker_factory is None:
            return CircuitBreaker(5, 60.0, name=service_id, clock=self.clock)
        breaker = self._breaker_factory(service_id)
        if not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker_factory returned {breaker!r}, not a CircuitBreaker")
        return breaker

    @property
    def circuit_breakers(self) -> dict[str, CircuitBreaker]:
        return self._breakers.items()

    def reset_circuit(self, service_id: str) -> None:
        """Close the service's breaker (also ends a CIRCUIT_BREAK isolation)."""
        self.get_circuit_breaker(service_id).reset()

    # -- checkpoints ----------------------------------------------------------------------------

    def create_checkpoint(
        self,
        process_id: str,
        state: Any,
        ttl: Duration | None = None,
        *,
        expected_version: int | None = None,
    ) -> int:
        """Save a copy of ``state``; returns its version (see :mod:`.checkpoint`).

        ``expected_version`` makes it compare-and-set: it raises
        :class:`~otel_recovery.checkpoint.CheckpointConflictError` if another writer saved first.
        """
        return self.checkpoints.save(process_id, state, ttl, expected_version=expected_version)

    async def acreate_checkpoint(
        self,
        process_id: str,
        state: Any,
        ttl: Duration | None = None,
        *,
        expected_version: int | None = None,
    ) -> int:
        """:meth:`create_checkpoint` without blocking the event loop on a network store."""
        return await self.checkpoints.asave(
            process_id, state, ttl, expected_version=expected_version
        )

    async def restore_checkpoint(
        self, process_id: str, version: int | None = None
    ) -> dict[str, Any]:
        """``{"recovery_status": "success", "state", "version", "checkpoint_id"}`` or a failure.

        A missing checkpoint (or an unreachable store without a local copy) is a ``"failed"``
        result with the reason; a corrupt one raises
        :class:`~otel_recovery.checkpoint.CheckpointCorruptError`, naming it.
        """
        try:
            found = await self.checkpoints.aload(process_id, version)
        except LookupError as missing:
            return {
                "recovery_status": "failed",
                "reason": str(missing),
                "checkpoint_id": process_id,
            }
        return {
            "recovery_status": "success",
            "state": found.state,
            "version": found.version,
            "checkpoint_id": process_id,
        }

    _restore_checkpoint = restore_checkpoint

    def list_checkpoints(self, prefix: str = "") -> list[dict[str, Any]]:
        """The live checkpoints whose process id starts with ``prefix``, newest version of
        each, as dicts (``checkpoint_id``, ``version``, ``created_at``, ``expires_at``)."""
        return [_listed(r) for r in self.checkpoints.list(prefix)]

    async def alist_checkpoints(self, prefix: str = "") -> list[dict[str, Any]]:
        """The async twin of :meth:`list_checkpoints` (the store's own async client)."""
        return [_listed(r) for r in await self.checkpoints.alist(prefix)]

    def delete_checkpoint(self, process_id: str) -> int:
        """Delete every version of ``process_id``'s checkpoint; returns how many were live
        (0 when none: deleting twice is not an error)."""
        return self.checkpoints.delete(process_id)

    async def adelete_checkpoint(self, process_id: str) -> int:
        """The async twin of :meth:`delete_checkpoint`."""
        return await self.checkpoints.adelete(process_id)

    # -- statistics -----------------------------------------------------------------------------

    def get_recovery_stats(self) -> dict[str, Any]:
        """What this interaction has recovered so far: totals, success rate and average
        recovery time, counts by strategy, error category and status, and the state of each
        service's circuit breaker (``active_circuit_breakers`` counts those not closed)."""
        stats = self._stats.snapshot()
        states = {name: b.state.value for name, b in self.circuit_breakers.items()}
        stats["active_circuit_breakers"] = sum(
            s != CircuitState.CLOSED.value for s in states.values()
        )
        stats["circuit_breakers"] = states
        return stats

    def reset_stats(self) -> None:
        """Start the counts of :meth:`get_recovery_stats` again (breakers keep their state)."""
        self._stats.reset()

    # -- recovery -------------------------------------------------------------------------------

    async def recover_from_error(
        self, error: BaseException, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Recover from ``error`` as the context allows; see the module docstring."""
        if not isinstance(error, BaseException):
            raise TypeError(f"recover_from_error() takes the exception, got {error!r}")
        if context is not None and not isinstance(context, Mapping):
            raise TypeError(
                "recover_from_error(error, context) takes the context as a mapping such as "
                f"{{'service_id': 'payments', 'retry_func': fetch}}, got {context!r}"
            )
        started = self.clock.now()
        ctx = dict(context) if context else {}
        strategy = as_strategy(ctx.get("strategy"))
        if strategy is not None:
            ctx.update(strategy.params)
        service_id = str(ctx.get("service_id") or "default")
        retry_func = optional_callable(ctx, "retry_func")
        fallback = (strategy.fallback if strategy else None) or optional_callable(
            ctx, "fallback_func"
        )
        repeatable = idempotent(ctx)
        optional_callable(ctx, "reconnect")  # refused here, not a failed heal later
        if ctx.get("timeout") is not None:  # handed to retry_func(timeout=...) as given
            try:
                timeout = to_seconds(ctx["timeout"], "context['timeout']")
            except ValueError:  # negative or NaN: one message for every bad number, 0 included
                timeout = 0.0
            if not timeout > 0:
                raise ValueError(f"context['timeout'] must be > 0 seconds, got {ctx['timeout']!r}")
        info = classify_on(self.classifier, error, classification_context(ctx), self.clock)
        breaker = self.get_circuit_breaker(service_id)
        selection = select_action(
            info,
            explicit=strategy,
            has_checkpoint=ctx.get("checkpoint_id") is not None,
            circuit_open=circuit_is_open(breaker),
            has_fallback=fallback is not None,
            heals=self.healing.heals,
            retry_on=retry_on_verdict(ctx, error, info),
            idempotent=repeatable,
        )
        selection, rec, learned_strategy = learned(
            self.learner, selection, info, service_id=service_id,
            has_fallback=fallback is not None, has_retry_func=retry_func is not None,
            idempotent=repeatable, max_attempts=self.max_attempts,
            backoff=self.backoff,
        )  # fmt: skip
        strategy = strategy or learned_strategy
        action = selection.action
        attributes: dict[str, Any] = {
            SERVICE_ID: service_id,
            STRATEGY: action.value,
            STRATEGY_REASON: selection.reason,
            **{k: v for k, v in info.to_attributes().items() if k != names.ERROR_TYPE},
            **context_attributes(ctx),
        }
        tracer = tracer_of(self.telemetry)
        span = start_span(tracer, f"{SPAN_NAME} {service_id}", attributes, self.clock)
        run = Run(service_id, error, info, ctx, strategy, retry_func, fallback, breaker, span)
        try:
            with activated(span, tracer):
                outcome = await execute(self, action, selection.reason, run)
        except BaseException as stopped:  # cancelled, or an error no step caught
            outcome_name = "failure" if isinstance(stopped, Exception) else "cancelled"
            span.set_attribute(names.OUTCOME, outcome_name)
            span.end(end_time=int(self.clock.wall() * 1e9))
            raise
        elapsed = max(0.0, self.clock.now() - started)
        if rec is not None and self.learner is not None:
            run.extra.update(feed_back(self.learner, rec, outcome.status, run.calls, elapsed))
        self._stats.record(
            status=outcome.status, strategy=action.value, category=info.category.value,
            recovery_time=elapsed,
        )  # fmt: skip
        return finish(run, action, outcome, elapsed, self.clock)

    def __repr__(self) -> str:
        return (
            f"ErrorRecoveryInteraction(max_attempts={self.max_attempts}, backoff={self.backoff!r}, "
            f"services={sorted(self.circuit_breakers)})"
        )


def _listed(record: Any) -> dict[str, Any]:
    return {
        "checkpoint_id": record.key,
        "version": record.version,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }
