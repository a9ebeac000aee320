"""Bringing one service back for the orchestrator: the action its strategy names, run once.

:meth:`~otel_recovery.orchestration.RecoveryOrchestrator.orchestrate_recovery` decides the
order; :class:`ServiceRemediation` does the work for each service in it (the action table is
in :mod:`otel_recovery.orchestration`): it skips a service whose dependency did not recover,
turns any failure of a remediation into that service's result instead of an exception loose
in the layer's ``gather``, and runs one remediation per service at a time, so overlapping
orchestrations (a health monitor's round and an operator's call) share the one in progress.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from otel_recovery._callables import accepts_one_positional, resolve
from otel_recovery._recovery_spans import describe
from otel_recovery._rollback import rollback
from otel_recovery._single_flight import SingleFlight
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.policies import CircuitOpenError, Fallback, FixedBackoff, Retry
from otel_recovery.recover import RecoveryPolicy

if TYPE_CHECKING:
    from otel_recovery.orchestration import RecoveryOrchestrator, ServiceRegistration

__all__ = ["ServiceRemediation", "healthy"]


_RECOVERED = frozenset({"success", "fallback"})
_ISOLATION = frozenset({RecoveryAction.CIRCUIT_BREAK, RecoveryAction.FALLBACK})

_REMEDIATION_PATIENCE = 300.0
"""Seconds a caller in another event loop waits for a running remediation of the same
service before it runs one itself (a restart may take minutes; see ``_single_flight``)."""


class ServiceRemediation:
    """The remediations an orchestrator runs. A method that needs the orchestrator's
    interaction, clock or registered services is given the orchestrator (``owner``) and
    reads them there, at the call."""

    def __init__(self) -> None:
        self.running: SingleFlight[dict[str, Any]] = SingleFlight()
        """One remediation per service at a time: overlapping orchestrations (a health
        monitor's round and an operator's call) share the one in progress."""

    async def recover(
        self,
        owner: RecoveryOrchestrator,
        name: str,
        strategy: RecoveryStrategy,
        needs: set[str],
        results: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """The result of recovering ``name``; ``needs`` are the failed services it depends
        on, whose ``results`` are in."""
        started = owner.clock.now()
        action = strategy.action
        outcome: dict[str, Any] = {"service": name, "strategy": action.value, "attempts": 0}
        outcome["result"] = None
        blocked = sorted(d for d in needs if results[d]["status"] not in _RECOVERED)
        if blocked and action not in _ISOLATION:
            listed = ", ".join(f"{d!r} ({results[d]['status']})" for d in blocked)
            outcome.update(status="skipped", reason=f"dependency {listed} did not recover")
        else:

            async def remediate() -> dict[str, Any]:
                try:
                    return await self._apply(owner, name, strategy)
                except Exception as exc:  # a corrupt checkpoint, a store down, a raising plan
                    # One service's failure is its result: raised, it left the gather's
                    # other recoveries running unawaited and skipped every later layer.
                    reason = f"{action.value} raised {type(exc).__name__}"
                    return {"status": "failed", "reason": reason, "error": describe(exc)}

            shared = await self.running.run(
                name,
                remediate,
                {"status": "failed", "reason": "cancelled before it finished"},
                patience=_REMEDIATION_PATIENCE,
            )
            outcome.update(dict(shared))  # each caller's own copy of the shared result
        outcome["recovery_time"] = max(0.0, owner.clock.now() - started)
        return outcome

    async def _apply(
        self, owner: RecoveryOrchestrator, name: str, strategy: RecoveryStrategy
    ) -> dict[str, Any]:
        action = strategy.action
        registered = owner._registration(name)
        interaction = owner.interaction
        if action is RecoveryAction.CIRCUIT_BREAK:
            interaction.get_circuit_breaker(name).force_open()
            return {
                "status": "isolated",
                "reason": f"circuit forced open until reset_circuit({name!r})",
            }
        if action is RecoveryAction.FALLBACK:
            fallback = strategy.fallback or registered.fallback
            if fallback is None:
                return _missing(name, "fallback")
            try:
                return {"status": "fallback", "result": await resolve(fallback())}
            except Exception as exc:
                return {"status": "failed", "reason": "fallback failed", "error": describe(exc)}
        if action is RecoveryAction.TRANSACTION_ROLLBACK:
            status, reason, error, _ = await rollback(
                strategy.params.get("compensations"), trace.get_current_span()
            )
            result: dict[str, Any] = {"status": status}
            if reason:
                result["reason"] = reason
            if error is not None:
                result["error"] = describe(error)
            return result
        if action is RecoveryAction.FAIL_FAST:
            return {"status": "failed", "reason": "FAIL_FAST: no recovery attempted"}
        recover = registered.recover
        if action is RecoveryAction.CHECKPOINT_RESTORE:
            checkpoint_id = str(strategy.params.get("checkpoint_id", name))
            restored = await interaction.restore_checkpoint(checkpoint_id)
            if restored["recovery_status"] != "success":
                return {"status": "failed", "reason": restored["reason"]}
            if recover is None:
                return {"status": "success", "result": restored["state"]}
            if accepts_one_positional(recover):
                func, state = recover, restored["state"]

                def recover() -> Any:
                    return func(state)

        elif recover is None:
            return _missing(name, "recover")
        return await self._retry(owner, name, strategy, recover, registered)

    async def _retry(
        self,
        owner: RecoveryOrchestrator,
        name: str,
        strategy: RecoveryStrategy,
        recover: Callable[[], Any],
        registered: ServiceRegistration,
    ) -> dict[str, Any]:
        backoff = strategy.backoff or (
            FixedBackoff(0.1)
            if strategy.action is RecoveryAction.RETRY
            else owner.interaction.backoff
        )
        fallback = strategy.fallback or registered.fallback
        used: list[bool] = []

        async def answer(_: BaseException) -> Any:
            used.append(True)
            return await resolve(fallback() if fallback else None)

        policy = RecoveryPolicy(
            retry=Retry(
                strategy.max_attempts,
                backoff=backoff,
                attempt_timeout=strategy.timeout,
                on=strategy.params.get("retry_on"),
            ),
            breaker=owner.interaction.get_circuit_breaker(name),
            fallback=Fallback(func=answer) if fallback else None,
            classifier=owner.interaction.classifier,
            name=name,
            clock=owner.clock,
            telemetry=owner.interaction.telemetry,
        )
        calls = 0

        def attempt() -> Any:
            nonlocal calls
            calls += 1
            return recover()

        try:
            value = await policy.acall(attempt)
        except CircuitOpenError as rejected:
            status = "circuit_open" if calls == 0 else "failed"
            return {
                "status": status,
                "attempts": calls,
                "reason": str(rejected),
                "error": describe(rejected),
            }
        except Exception as exc:
            reason = f"recover failed {calls} time(s)"
            return {"status": "failed", "attempts": calls, "reason": reason, "error": describe(exc)}
        if used:
            reason = f"recover failed {calls} time(s); answered by the fallback"
            return {"status": "fallback", "attempts": calls, "result": value, "reason": reason}
        if registered.health_check is not None and not await healthy(registered.health_check):
            reason = "recovered, but the health check still fails"
            return {"status": "failed", "attempts": calls, "result": value, "reason": reason}
        return {"status": "success", "attempts": calls, "result": value}


def _missing(name: str, what: str) -> dict[str, Any]:
    how = f"register_service({name!r}, {what}=...)"
    if what == "fallback":
        how += " or RecoveryStrategy(action=RecoveryAction.FALLBACK, fallback=...)"
    return {"status": "failed", "reason": f"no {what} callable for {name!r}: {how}"}


async def healthy(check: Callable[[], Any]) -> bool:
    """A health check's verdict: its result (awaited if need be) as a bool; raising is down."""
    try:
        return bool(await resolve(check()))
    except Exception:
        return False
