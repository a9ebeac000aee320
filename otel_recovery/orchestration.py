"""Recovering several services at once, in dependency order, without causing a cascade.

``RecoveryOrchestrator.dependencies`` maps each service to the services it needs. When
several services fail together, :meth:`RecoveryOrchestrator.orchestrate_recovery` recovers
prerequisites first (``graphlib.TopologicalSorter`` over the failed services; a failed service
depends on another failed one directly or through healthy services in between), and runs the
independent services of one layer concurrently. A cycle among them is a ``ValueError`` naming
the cycle: there is no correct order to recover it in.

What each action does for a service (its callables come from :meth:`register_service`; the
strategy's ``fallback`` wins over the registered one):

=========================  =============================================================
action                     effect and status
=========================  =============================================================
RETRY, EXPONENTIAL_BACKOFF run ``recover`` through a RecoveryPolicy (the service's circuit
SELF_HEAL                  breaker, ``max_attempts``, backoff, timeout); then the
                           ``health_check``, if any, must pass: ``success`` / ``failed`` /
                           ``fallback`` / ``circuit_open``. For SELF_HEAL the registered
                           ``recover`` is the remediation
CIRCUIT_BREAK              force-open the service's breaker: ``isolated``
FALLBACK                   run the fallback: ``fallback``
CHECKPOINT_RESTORE         restore ``params["checkpoint_id"]`` (default: the service name)
                           and hand the state to ``recover`` if it takes an argument
TRANSACTION_ROLLBACK       run ``params["compensations"]`` newest first
FAIL_FAST                  nothing: ``failed``
=========================  =============================================================

Cascading-failure prevention: a service whose dependency did not recover (status other than
``success`` or ``fallback``) is not attempted (``skipped``, naming the dependency), except for
CIRCUIT_BREAK and FALLBACK, which are what one does about a dead dependency. A service with no
callable for its action ends ``failed`` with a reason saying how to register one. Which
failures of ``recover`` are retried is the classifier's call unless ``params["retry_on"]``
names exception types or a predicate. Each
orchestration is one span ``orchestrate_recovery`` with an event per service.
"""

from __future__ import annotations

import asyncio
import difflib
import graphlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from opentelemetry.trace import Status, StatusCode

from otel_recovery._clock import Clock, Duration
from otel_recovery._health_monitor import HealthMonitor, ServiceHealth
from otel_recovery._recovery_spans import (
    activated,
    bounded,
    span_outcome,
    start_span,
    tracer_of,
)
from otel_recovery._service_recovery import ServiceRemediation, healthy
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.telemetry.attributes import (
    EVENT_ORCHESTRATION_SERVICE as EVENT_SERVICE,
)
from otel_recovery.telemetry.attributes import (
    ORCHESTRATION_SERVICES as SERVICES,
)
from otel_recovery.telemetry.attributes import (
    ORCHESTRATION_SPAN as SPAN_NAME,
)
from otel_recovery.telemetry.attributes import (
    OUTCOME as STATUS,
)
from otel_recovery.telemetry.attributes import (
    RECOVERY_REASON as REASON,
)
from otel_recovery.telemetry.attributes import (
    SERVICE_ID,
    STRATEGY,
)

__all__ = [
    "Correlation",
    "HealthMonitor",
    "RecoveryOrchestrator",
    "ServiceHealth",
    "ServiceRegistration",
]


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    """The callables of one service (each sync or async, taking no arguments)."""

    name: str
    recover: Callable[..., Any] | None = None
    health_check: Callable[[], Any] | None = None
    fallback: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Correlation:
    """Errors grouped by fingerprint, and the failed service the others depend on."""

    groups: dict[str, list[str]]
    root_cause: str | None
    dependents: list[str] = field(default_factory=list)
    reason: str = ""


class RecoveryOrchestrator:
    """Dependency-aware recovery of many services; shares breakers with its interaction."""

    def __init__(
        self, interaction: ErrorRecoveryInteraction | None = None, clock: Clock | None = None
    ) -> None:
        self.interaction = interaction or ErrorRecoveryInteraction(clock=clock)
        self.clock: Clock = clock or self.interaction.clock
        self._dependencies: dict[str, list[str]] = {}
        self._services: dict[str, ServiceRegistration] = {}
        self._remediation = ServiceRemediation()

    @property
    def dependencies(self) -> Mapping[str, tuple[str, ...]]:
        """Service -> the services it needs, read-only: assign a new mapping to replace the
        graph (checked then; an item written into a live dict was not, and a string there
        was read one letter at a time)."""
        return MappingProxyType({k: tuple(v) for k, v in self._dependencies.items()})

    @dependencies.setter
    def dependencies(self, graph: Mapping[str, Iterable[str]]) -> None:
        if not isinstance(graph, Mapping):
            raise TypeError(f"dependencies must map service -> [services], got {graph!r}")
        checked: dict[str, list[str]] = {}
        for service, needs in graph.items():
            if isinstance(needs, str) or not isinstance(needs, Iterable):
                raise TypeError(f"dependencies[{service!r}] must be a list of service names")
            checked[_name(service)] = [_name(n) for n in needs]
        self._dependencies = checked

    def register_service(
        self,
        name: str,
        *,
        recover: Callable[..., Any] | None = None,
        health_check: Callable[[], Any] | None = None,
        fallback: Callable[[], Any] | None = None,
    ) -> None:
        """Name a service the orchestrator may recover: ``recover()`` brings it back,
        ``health_check()`` says whether it is up (a truthy result, possibly awaited; raising
        counts as down), and ``fallback()``
        serves in its place while it is not. Registering a name again replaces it."""
        for label, value in (
            ("recover", recover),
            ("health_check", health_check),
            ("fallback", fallback),
        ):
            if value is not None and not callable(value):
                raise TypeError(f"{label} for {name!r} must be callable, got {value!r}")
        self._services[_name(name)] = ServiceRegistration(name, recover, health_check, fallback)

    @property
    def services(self) -> dict[str, ServiceRegistration]:
        return dict(self._services)

    def _registration(self, name: str) -> ServiceRegistration:
        """The callables registered for ``name``, none if it was never registered."""
        return self._services.get(name) or ServiceRegistration(name)

    # -- ordering -------------------------------------------------------------------------------

    def _needs(self, service: str, failed: set[str] | None = None) -> set[str]:
        """What ``service`` needs, transitively; with ``failed``, only the failed services it
        reaches directly or through healthy ones (their own needs are ordered through them)."""
        found: set[str] = set()
        seen = {service}  # a loop back to the service itself orders nothing
        stack = list(self._dependencies.get(service, ()))
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if failed is None or current in failed:
                found.add(current)
                if failed is not None:
                    continue
            stack.extend(self._dependencies.get(current, ()))
        return found

    def _failed_dependencies(self, failed: Sequence[str]) -> dict[str, set[str]]:
        members = set(failed)
        return {service: self._needs(service, members) for service in failed}

    def recovery_order(self, failed_services: Iterable[str]) -> list[list[str]]:
        """The layers recovery runs in: each layer only needs services of earlier layers."""
        failed = _unique(failed_services)
        position = {name: index for index, name in enumerate(failed)}
        sorter = graphlib.TopologicalSorter(self._failed_dependencies(failed))
        try:
            sorter.prepare()
        except graphlib.CycleError as cycle:
            path = " -> ".join(cycle.args[1]) if len(cycle.args) > 1 else "?"
            raise ValueError(
                f"dependency cycle among the failed services: {path}; "
                "no recovery order exists, break the cycle in .dependencies"
            ) from None
        layers: list[list[str]] = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready(), key=position.__getitem__)
            layers.append(ready)
            sorter.done(*ready)
        return layers

    # -- orchestration --------------------------------------------------------------------------

    async def orchestrate_recovery(
        self,
        failed_services: Iterable[str],
        recovery_plan: Mapping[str, RecoveryStrategy | RecoveryAction] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Recover every failed service; services missing from the plan get
        EXPONENTIAL_BACKOFF. Returns one result dict per service, in input order."""
        failed = _unique(failed_services)
        plan = self._plan(recovery_plan, failed)
        layers = self.recovery_order(failed)
        needs = self._failed_dependencies(failed)
        tracer = tracer_of(self.interaction.telemetry)
        span = start_span(tracer, SPAN_NAME, {SERVICES: failed}, self.clock)
        results: dict[str, dict[str, Any]] = {}
        default = RecoveryStrategy(RecoveryAction.EXPONENTIAL_BACKOFF)
        try:
            with activated(span, tracer):
                for layer in layers:
                    done = await asyncio.gather(
                        *(
                            self._remediation.recover(
                                self, name, plan.get(name, default), needs[name], results
                            )
                            for name in layer
                        )
                    )
                    for name, result in zip(layer, done, strict=True):
                        results[name] = result
                        event = {
                            SERVICE_ID: name,
                            STATUS: span_outcome(result["status"]),
                            STRATEGY: result["strategy"],
                        }
                        if "reason" in result:
                            event[REASON] = bounded(result["reason"])
                        span.add_event(EVENT_SERVICE, event)
        finally:
            failures = sorted(n for n, r in results.items() if r["status"] == "failed")
            if failures:
                span.set_status(Status(StatusCode.ERROR, f"not recovered: {', '.join(failures)}"))
            span.end(end_time=int(self.clock.wall() * 1e9))
        return {name: results[name] for name in failed}

    def _plan(
        self,
        recovery_plan: Mapping[str, RecoveryStrategy | RecoveryAction] | None,
        failed: list[str],
    ) -> dict[str, RecoveryStrategy]:
        """The plan, checked: a key that names no service this orchestrator knows is a typo
        (``"databse"``), whose service would silently get the default strategy."""
        if recovery_plan is None:
            return {}
        if not isinstance(recovery_plan, Mapping):
            raise TypeError(
                "recovery_plan must map service -> RecoveryStrategy (or RecoveryAction), "
                f"got {type(recovery_plan).__name__}"
            )
        known = {*failed, *self._services, *self._dependencies}
        known.update(n for needs in self._dependencies.values() for n in needs)
        for name in recovery_plan:
            if name not in known:
                close = difflib.get_close_matches(str(name), sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"recovery_plan names {name!r}, which is not a failed service, a "
                    f"registered one or in dependencies{hint}"
                )
        return {name: _strategy(name, value) for name, value in recovery_plan.items()}

    # -- health and correlation -----------------------------------------------------------------

    async def check_health(self) -> dict[str, bool]:
        """Run every registered health check concurrently, once; a raising check counts as
        False. :meth:`monitor` runs them continuously."""
        checks = {n: r.health_check for n, r in self._services.items() if r.health_check}
        verdicts = await asyncio.gather(*(healthy(check) for check in checks.values()))
        return dict(zip(checks, verdicts, strict=True))

    def monitor(
        self,
        *,
        interval: Duration = 10.0,
        unhealthy_after: int = 1,
        healthy_after: int = 1,
        check_timeout: Duration | None = None,
        recovery_plan: Mapping[str, RecoveryStrategy | RecoveryAction] | None = None,
        recovery_interval: Duration | None = None,
        on_change: Callable[[ServiceHealth], Any] | None = None,
    ) -> HealthMonitor:
        """Continuous health monitoring of the registered services (a :class:`HealthMonitor`):
        ``async with orchestrator.monitor(interval=10, recovery_plan=plan) as health:``
        checks every ``interval`` seconds, reports each change (span, log, ``on_change``),
        and with ``recovery_plan`` recovers what went down, in dependency order."""
        return HealthMonitor(
            self, interval=interval, unhealthy_after=unhealthy_after,
            healthy_after=healthy_after, check_timeout=check_timeout,
            recovery_plan=recovery_plan, recovery_interval=recovery_interval,
            on_change=on_change,
        )  # fmt: skip

    def correlate(self, errors: Iterable[tuple[str, BaseException]]) -> Correlation:
        """Group failures by fingerprint and name the probable root cause: the failed service
        the most other failed services depend on, that itself needs no other failed one."""
        classifier = self.interaction.classifier
        groups: dict[str, list[str]] = {}
        order: list[str] = []
        for service, error in errors:
            if not isinstance(error, BaseException):
                raise TypeError(f"correlate() takes (service, exception) pairs, got {error!r}")
            fingerprint = classifier.classify(error, {"service_id": service}).fingerprint
            members = groups.setdefault(fingerprint, [])
            if service not in members:
                members.append(service)
            if service not in order:
                order.append(service)
        failed = set(order)
        reach = {s: self._needs(s) & failed for s in order}
        dependents = {c: [s for s in order if c in reach[s]] for c in order}
        roots = [c for c in order if not reach[c] and dependents[c]]
        if roots:
            root = max(roots, key=lambda c: len(dependents[c]))
            why = f"{len(dependents[root])} failed service(s) depend on {root!r}"
            return Correlation(groups, root, dependents[root], why)
        if len(order) == 1:
            return Correlation(groups, order[0], [], "the only failed service")
        return Correlation(groups, None, [], "no failed service is a dependency of another")


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"service names are non-empty strings, got {value!r}")
    return value


def _unique(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("failed_services must be a list of names, not a single string")
    return list(dict.fromkeys(_name(n) for n in names))


def _strategy(name: str, value: object) -> RecoveryStrategy:
    if isinstance(value, RecoveryStrategy):
        return value
    if isinstance(value, RecoveryAction):
        return RecoveryStrategy(value)
    raise TypeError(f"recovery_plan[{name!r}] must be a RecoveryStrategy, got {value!r}")
