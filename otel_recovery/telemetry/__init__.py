"""OpenTelemetry side of otel_recovery: one :class:`Telemetry` per pair of providers.

The engine and the policies know nothing of OpenTelemetry; drivers ask the telemetry for a
:class:`CallTrace` only when a call needs recovery. By default the global tracer and meter
providers are used (through the API's proxies, so providers installed later still receive
our data); pass explicit providers to :class:`Telemetry` or :func:`set_telemetry` to route
elsewhere (tests use in-memory exporters this way).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_recovery import __about__
from otel_recovery._clock import Clock
from otel_recovery._forksafe import new_lock
from otel_recovery.policies.circuit_breaker import CircuitBreaker, StateTransition
from otel_recovery.telemetry import attributes
from otel_recovery.telemetry._metrics import HealthSource, RecoveryMetrics, metrics_for
from otel_recovery.telemetry._suppressed import telemetry_suppressed
from otel_recovery.telemetry._tracing import CallTrace

__all__ = [
    "CallTrace",
    "Telemetry",
    "attributes",
    "check_telemetry",
    "get_telemetry",
    "set_telemetry",
    "watch_breaker_globally",
    "watch_health_globally",
]


class Telemetry:
    """A tracer and the metric instruments, created once and shared by every policy."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer("otel_recovery", __about__.VERSION, tracer_provider)
        self.metrics: RecoveryMetrics = metrics_for(meter_provider)
        self._watched: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._watch_lock = new_lock()

    def start_call(
        self,
        policy_name: str,
        started: float,
        clock: Clock,
        extra: dict[str, Any] | None = None,
        *,
        own_span: bool = True,
    ) -> CallTrace:
        return CallTrace(
            self.tracer, self.metrics, policy_name, started, clock, extra, own_span=own_span
        )

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Count the breaker's transitions, mark them on the current span, report its state.

        Idempotent: a breaker shared by several policies is watched once.
        """
        with self._watch_lock:
            if breaker in self._watched:
                return
            self._watched.add(breaker)
        self.metrics.track(breaker)
        breaker.add_listener(self._on_transition)

    def _on_transition(self, transition: StateTransition) -> None:
        if telemetry_suppressed():  # an exporter's own call moved it: record nothing
            return
        attrs = {
            attributes.BREAKER_NAME: transition.name,
            attributes.BREAKER_FROM: transition.from_state.value,
            attributes.BREAKER_TO: transition.to_state.value,
        }
        # A breaker may reach us by several listeners (a policy pinned to this telemetry
        # and one following the process-wide one, which may be this same telemetry, or
        # share its meter provider): each transition counts once per set of instruments,
        # and marks the current span once.
        if _DELIVERED.first(transition, ("metrics", id(self.metrics))):
            self.metrics.breaker_transitions.add(1, attrs)
        span = trace.get_current_span()
        if span.is_recording() and _DELIVERED.first(
            transition, ("span", span.get_span_context().span_id)
        ):
            span.add_event(
                attributes.EVENT_BREAKER_STATE_CHANGE,
                {**attrs, attributes.BREAKER_REASON: transition.reason},
            )


class _Deliveries:
    """Which sinks (a set of instruments, a span) a recent transition already reached.

    Bounded: a transition's listeners all run within one dispatch, so only the latest few
    can still arrive. Each entry holds its transition, so its id stays its own while
    remembered."""

    _KEEP = 256

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[int, str, int], StateTransition] = OrderedDict()
        self._lock = new_lock()

    def first(self, transition: StateTransition, sink: tuple[str, int]) -> bool:
        """Whether ``transition`` reaches ``sink`` for the first time: a set of instruments
        by its id (they live as long as their meter provider), a span by its span id (an
        ended span is not kept alive)."""
        key = (id(transition), *sink)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = transition  # held, so its id stays its own while remembered
            if len(self._seen) > self._KEEP:
                self._seen.popitem(last=False)
            return True


_DELIVERED = _Deliveries()
_default: Telemetry | None = None
_lock = new_lock()
_global_breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_global_monitors: weakref.WeakSet[HealthSource] = weakref.WeakSet()


def check_telemetry(telemetry: object) -> None:
    """Refuse a ``telemetry=`` setting that is not ``True``, ``False`` or a
    :class:`Telemetry` (``"yes"`` switched telemetry on or off by its truthiness)."""
    if not isinstance(telemetry, (bool, Telemetry)):
        raise TypeError(f"telemetry must be True, False or a Telemetry, got {telemetry!r}")


def get_telemetry() -> Telemetry:
    """The process-wide telemetry, built on first use from the global providers."""
    global _default
    current = _default
    if current is None:
        with _lock:
            if _default is None:
                _default = Telemetry()
                _report_globals(_default)
            current = _default
    return current


def set_telemetry(telemetry: Telemetry | None) -> None:
    """Replace the process-wide telemetry (``None`` rebuilds it from the globals on next use).

    Policies created with the default ``telemetry=True`` follow the change immediately;
    their breakers are reported by the new telemetry too.
    """
    global _default
    with _lock:
        _default = telemetry
        if telemetry is not None:
            _report_globals(telemetry)


def _report_globals(telemetry: Telemetry) -> None:
    """The breakers and health monitors that follow the process-wide telemetry (lock held)."""
    for breaker in list(_global_breakers):
        telemetry.metrics.track(breaker)
    for monitor in list(_global_monitors):
        telemetry.metrics.track_health(monitor)


def watch_health_globally(monitor: HealthSource) -> None:
    """Report a health monitor through whatever the process-wide telemetry is now or later
    becomes (as :func:`watch_breaker_globally` does for a breaker)."""
    with _lock:
        _global_monitors.add(monitor)
        current = _default
    (current or get_telemetry()).metrics.track_health(monitor)


def watch_breaker_globally(breaker: CircuitBreaker) -> None:
    """Report a breaker through whatever the process-wide telemetry is now or later becomes."""
    with _lock:
        if breaker in _global_breakers:
            return
        _global_breakers.add(breaker)
        current = _default
    if current is not None:
        current.metrics.track(breaker)
    breaker.add_listener(_forward_transition)


def _forward_transition(transition: StateTransition) -> None:
    get_telemetry()._on_transition(transition)
