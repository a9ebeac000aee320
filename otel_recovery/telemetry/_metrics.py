"""Metric instruments, created once per meter provider.

Happy-path calls write no metric at all: breaker call counts are plain integers inside the
breaker, read by observable instruments at collection time. Instruments that are written
(durations, retries, fallbacks, transitions) are written only when a call needed recovery.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
    get_meter,
)

from otel_recovery import __about__
from otel_recovery._forksafe import new_lock
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitState
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry._call_counts import BreakerCallCounts

__all__ = ["RecoveryMetrics", "metrics_for"]

_STATES: tuple[CircuitState, ...] = tuple(CircuitState)
_UNNAMED = "default"  # what CircuitBreaker() is called without name=
_logger = logging.getLogger("otel_recovery.telemetry")


class _Health(Protocol):
    @property
    def healthy(self) -> bool | None: ...


class HealthSource(Protocol):
    """What a health monitor shows the metric (``otel_recovery.orchestration.HealthMonitor``)."""

    @property
    def status(self) -> Mapping[str, _Health]: ...


def _duration_histogram(meter: Meter) -> Histogram:
    """The call-duration histogram, with bucket boundaries in seconds where the API can say so.

    The ``explicit_bucket_boundaries_advisory`` parameter came with opentelemetry-api 1.30.
    Without it the SDK's default boundaries (0 to 10,000, meant for milliseconds) put nearly
    every recovered call in one bucket; the README tells users of an older API to set a View.
    """
    options: dict[str, Any] = {
        "unit": "s",
        "description": "Duration of calls that needed recovery, all attempts and waits included.",
    }
    try:
        return meter.create_histogram(
            names.METRIC_CALL_DURATION,
            explicit_bucket_boundaries_advisory=list(names.CALL_DURATION_BUCKETS),
            **options,
        )
    except TypeError:  # opentelemetry-api < 1.30
        return meter.create_histogram(names.METRIC_CALL_DURATION, **options)


class RecoveryMetrics:
    """The instruments of section 4.4 of research/otel-conventions.md."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        meter = get_meter("otel_recovery", __about__.VERSION, meter_provider)
        self._breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._calls = BreakerCallCounts()
        self._lock = new_lock()
        self._told_unnamed = False
        self.call_duration = _duration_histogram(meter)
        self.retry_attempts = meter.create_counter(
            names.METRIC_RETRY_ATTEMPTS,
            unit="{attempt}",
            description="Retries started (first attempts are not counted).",
        )
        self.budget_refusals = meter.create_counter(
            names.METRIC_BUDGET_REFUSALS,
            unit="{retry}",
            description="Retries a retry budget refused.",
        )
        self.fallback_invocations = meter.create_counter(
            names.METRIC_FALLBACK_INVOCATIONS,
            unit="{invocation}",
            description="Calls answered by a fallback.",
        )
        self.breaker_transitions = meter.create_counter(
            names.METRIC_BREAKER_TRANSITIONS,
            unit="{transition}",
            description="Circuit breaker state transitions.",
        )
        meter.create_observable_up_down_counter(
            names.METRIC_BREAKER_STATE,
            callbacks=[self._observe_states],
            unit="{state}",
            description=(
                "Circuit breakers of a name in each state: 1 for a breaker's current state, "
                "0 for the others."
            ),
        )
        self._monitors: weakref.WeakSet[HealthSource] = weakref.WeakSet()
        meter.create_observable_up_down_counter(
            names.METRIC_SERVICE_HEALTH,
            callbacks=[self._observe_health],
            unit="{service}",
            description="1 while a monitored service is healthy, 0 while it is down.",
        )
        meter.create_observable_counter(
            names.METRIC_BREAKER_CALLS,
            callbacks=[self._observe_calls],
            unit="{call}",
            description="Calls seen by each circuit breaker, by outcome.",
        )

    def track(self, breaker: CircuitBreaker) -> None:
        """Report this breaker's state and call counts (held weakly).

        Breakers are told apart in the metrics by name only, so breakers sharing a name add
        up in one series. For breakers left unnamed (``CircuitBreaker()`` on two different
        dependencies) that is seldom what the user meant: the second one is pointed out,
        once per process, with the fix.
        """
        with self._lock:
            if breaker.name == _UNNAMED and not self._told_unnamed:
                others = [b for b in self._breakers if b is not breaker and b.name == _UNNAMED]
                if others:
                    self._told_unnamed = True
                    _logger.warning(
                        "otel-recovery: two or more circuit breakers have no name, so their "
                        "metrics add up in one series named %r; give each its own "
                        "CircuitBreaker(name=...) to tell them apart",
                        _UNNAMED,
                    )
            self._breakers.add(breaker)
            self._calls.track(breaker)

    def track_health(self, monitor: HealthSource) -> None:
        """Report the services a health monitor watches (held weakly)."""
        with self._lock:
            self._monitors.add(monitor)

    def _observe_health(self, options: CallbackOptions) -> Iterable[Observation]:
        """One point per service: a stopped monitor says nothing (its verdict is stale), and
        where two monitors watch one service, down wins (the SDK would keep either)."""
        with self._lock:
            monitors: list[HealthSource] = list(self._monitors)
        verdicts: dict[str, int] = {}
        for monitor in monitors:
            if getattr(monitor, "stopped", False) is True:
                continue
            for name, health in monitor.status.items():
                if health.healthy is not None:
                    verdicts[name] = min(verdicts.get(name, 1), int(health.healthy))
        for name, verdict in verdicts.items():
            yield Observation(verdict, {names.SERVICE_ID: name})

    def _tracked(self) -> list[CircuitBreaker]:
        with self._lock:
            return list(self._breakers)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        """Per name, how many breakers are in each state (the state-set pattern: 1 and 0s).

        Breakers sharing a name are added here rather than left to the SDK, whose handling
        of one attribute set observed twice in a callback differs between releases."""
        counts: dict[tuple[str, CircuitState], int] = {}
        for breaker in self._tracked():
            current = breaker.snapshot().state
            for state in _STATES:
                key = (breaker.name, state)
                counts[key] = counts.get(key, 0) + (state is current)
        for (name, state), count in counts.items():
            yield Observation(count, {names.BREAKER_NAME: name, names.BREAKER_STATE: state.value})

    def _observe_calls(self, options: CallbackOptions) -> Iterable[Observation]:
        """Per name and outcome, the calls the breakers of that name have seen, never less
        than at the last collection (see :mod:`._call_counts`)."""
        with self._lock:
            totals = self._calls.observe(list(self._breakers))
        for (name, outcome), count in totals.items():
            yield Observation(count, {names.BREAKER_NAME: name, names.BREAKER_OUTCOME: outcome})


_shared_global: list[RecoveryMetrics] = []
_shared_lock = new_lock()
_ATTRIBUTE = "_otel_recovery_metrics"


def metrics_for(meter_provider: MeterProvider | None) -> RecoveryMetrics:
    """The one :class:`RecoveryMetrics` of a meter provider (None: the global one).

    An SDK meter provider keeps the first instrument of each name: observable instruments
    made again for a second ``Telemetry`` on the same provider are dropped, with their
    callbacks, so the breakers and monitors reported through them vanish from the metrics.
    Every ``Telemetry`` of a provider therefore shares its instruments, kept on the provider
    itself (they live and die with it)."""
    with _shared_lock:
        if meter_provider is None:
            if not _shared_global:
                _shared_global.append(RecoveryMetrics(None))
            return _shared_global[0]
        found = getattr(meter_provider, _ATTRIBUTE, None)
        if isinstance(found, RecoveryMetrics):
            return found
        made = RecoveryMetrics(meter_provider)
        # a provider that takes no attribute is not shared
        with contextlib.suppress(AttributeError, TypeError):
            setattr(meter_provider, _ATTRIBUTE, made)
        return made
