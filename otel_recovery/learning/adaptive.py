"""``AdaptiveThresholds``: tighten a dependency's breaker and retry budget while it is anomalous.

Static thresholds are a compromise: loose enough not to trip on a normal bad minute, so they
react late when the dependency is really in trouble. Anomaly detection knows what "normal"
looks like for each dependency; when it reports an anomaly (an :class:`AnomalyEvent` with
``active=True`` on the :class:`AnomalyBus`), the breaker trips sooner and the retry budget
shrinks, so retries cannot add load to a dependency that may be overloaded (the sustaining
loop of a metastable failure, research/adaptive.md 1.8). When the detector reports the
signal normal again (``active=False``), everything relaxes back to the configured values.

A component stays tightened while *any* anomaly that matches it is active, so two signals
(error rate and latency) or two series (two operations on one host) can overlap safely.
``max_tightened`` bounds how long a tightening survives without a fresh active event, so a
detector that stops publishing cannot leave a dependency throttled forever. Expiry is checked on
every event and every :meth:`AnomalyBus.tick` of an attached bus (``AnomalySpanProcessor`` ticks
each ``flush_interval``, about once a second), by :meth:`status` and by :meth:`sweep`; never on
a call through the breaker or budget, whose happy path stays as cheap as untightened. A
publisher of your own should tick its bus (or call :meth:`sweep`) every few seconds: with no
event, tick or sweep at all, nothing runs to notice the deadline. The processor also ends an
anomaly itself (``active=False``) when its series gets no calls for ``reconfirm`` seconds, is
evicted, or the processor shuts down, which relaxes at once.

Thread-safe: events from any thread; one lock orders tighten/relax per instance.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._first_times import FirstTimes
from otel_recovery._forksafe import new_lock
from otel_recovery.learning._events import SIGNALS, AnomalyBus, AnomalyEvent, SeriesKey
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker

__all__ = ["AdaptiveThresholds", "Tightening"]

_log = logging.getLogger("otel_recovery")
_reported_matchers = FirstTimes()

Matcher = Callable[[SeriesKey], bool]


def _factor(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a factor in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Tightening:
    """How hard an anomaly tightens: factors applied to the *configured* values.

    - ``failure_threshold``: consecutive-failure threshold of a consecutive-mode breaker
      (rounded down, at least 1); ``failure_rate``: rate threshold of a rate-mode breaker.
    - ``budget_ratio`` / ``budget_floor``: a retry budget's ratio and ``min_per_second``.
    - ``signals``: which anomaly signals count (``"error_rate"``, ``"latency"``, ``"calls"``).
    - ``min_score``: active events with a lower score are ignored.

    The default budget factors are steep (a 20 % budget becomes 2 %) because during an
    anomaly the caller cannot tell independent blips from overload, and only overload can
    turn retries into a metastable failure; the learner's per-error statistics, not the
    budget, are what keep retrying worthwhile errors in normal times. The breaker factors
    are gentle on purpose: in benchmarks/fault_sim.py a breaker tightened below the failure
    rate of a 429 storm (about 50 %) sheds calls the quota would have admitted.
    """

    failure_threshold: float = 0.6
    failure_rate: float = 0.75
    budget_ratio: float = 0.1
    budget_floor: float = 0.1
    signals: frozenset[str] = field(default=frozenset({"error_rate", "latency"}))
    min_score: float = 0.0

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "failure_rate", "budget_ratio", "budget_floor"):
            object.__setattr__(self, name, _factor(getattr(self, name), name))
        if isinstance(self.signals, (str, bytes)):  # frozenset("latency"): its letters
            raise TypeError(
                f"signals must be a set of signal names such as {{'error_rate'}}, got "
                f"{self.signals!r}"
            )
        signals = frozenset(self.signals)
        unknown = sorted(map(str, signals - SIGNALS))
        if unknown:
            raise ValueError(
                f"signals names {', '.join(map(repr, unknown))}; the anomaly signals are "
                f"{', '.join(map(repr, sorted(SIGNALS)))}"
            )
        object.__setattr__(self, "signals", signals)
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score!r}")


class _Component:
    """One breaker or budget, its tightening, and the anomalies currently holding it tight."""

    __slots__ = ("active", "target", "tightening")

    def __init__(self, target: CircuitBreaker | RetryBudget, tightening: Tightening) -> None:
        self.target = target
        self.tightening = tightening
        self.active: dict[tuple[SeriesKey, str], float] = {}  # -> clock time of last event

    def tighten(self) -> None:
        t, target = self.tightening, self.target
        if isinstance(target, CircuitBreaker):
            target.restore()  # compute from the configured values, not from a tuned state
            rate = target.failure_rate_threshold
            if rate is None:
                threshold = max(1, math.floor(target.failure_threshold * t.failure_threshold))
                target.tune(failure_threshold=threshold)
            else:
                target.tune(failure_rate_threshold=max(0.01, rate * t.failure_rate))
        else:
            target.restore()
            target.tune(
                ratio=target.ratio * t.budget_ratio,
                min_per_second=target.min_per_second * t.budget_floor,
            )

    def relax(self) -> None:
        self.target.restore()

    @property
    def name(self) -> str:
        kind = "breaker" if isinstance(self.target, CircuitBreaker) else "retry budget"
        return f"{kind} {self.target.name!r}"


class AdaptiveThresholds:
    """Subscribes to anomaly events and tightens/relaxes the registered components."""

    def __init__(
        self,
        bus: AnomalyBus | None = None,
        *,
        tightening: Tightening | None = None,
        max_tightened: Duration | None = 900.0,
        clock: Clock | None = None,
    ) -> None:
        self.tightening = tightening if tightening is not None else Tightening()
        self.max_tightened = (
            math.inf
            if max_tightened is None
            else to_seconds(max_tightened, "max_tightened", allow_inf=True)
        )
        self.clock: Clock = clock_or_default(clock)
        self._lock = new_lock()
        self._registrations: list[tuple[Matcher, list[_Component]]] = []
        self._components: dict[int, _Component] = {}
        self._unsubscribers: list[Callable[[], None]] = []
        self._next_expiry = math.inf  # no tightening can expire before this clock time
        if bus is not None:
            self.attach(bus)

    @staticmethod
    def matching(
        *,
        service: str | None = None,
        server_address: str | None = None,
        operation: str | None = None,
    ) -> Matcher:
        """A matcher for series whose given fields are equal (None matches anything)."""

        def match(key: SeriesKey) -> bool:
            return (
                (service is None or key.service == service)
                and (server_address is None or key.server_address == server_address)
                and (operation is None or key.operation == operation)
            )

        return match

    def attach(self, bus: AnomalyBus) -> Callable[[], None]:
        """Listen to ``bus`` (events and ticks); returns a function that stops listening."""
        unsubscribers = [bus.subscribe(self.on_event), bus.on_tick(self._tick)]

        def unsubscribe() -> None:
            for stop in unsubscribers:
                stop()

        with self._lock:
            self._unsubscribers.append(unsubscribe)
        return unsubscribe

    def close(self) -> None:
        """Stop listening to every bus and relax everything that is tightened."""
        with self._lock:
            unsubscribers, self._unsubscribers = self._unsubscribers, []
            for component in self._components.values():
                if component.active:
                    component.active.clear()
                    component.relax()
        for unsubscribe in unsubscribers:
            unsubscribe()

    def register(
        self,
        match: SeriesKey | Matcher,
        *,
        breaker: CircuitBreaker | None = None,
        budget: RetryBudget | None = None,
        tightening: Tightening | None = None,
    ) -> Callable[[], None]:
        """Tighten ``breaker`` and/or ``budget`` while an anomaly of a matching series lasts.

        ``match`` is a :class:`SeriesKey` (exact) or a predicate (see :meth:`matching`).
        Returns a function that unregisters and relaxes what this registration tightened.
        """
        if breaker is None and budget is None:
            raise ValueError("register() needs breaker= and/or budget=")
        matcher: Matcher
        if isinstance(match, SeriesKey):
            matcher = functools.partial(operator.eq, match)
        elif callable(match):
            matcher = match
        else:
            raise TypeError(f"match must be a SeriesKey or a predicate, got {match!r}")
        _check_type(breaker, CircuitBreaker, "breaker")
        _check_type(budget, RetryBudget, "budget")
        chosen = tightening if tightening is not None else self.tightening
        with self._lock:
            components = []
            for target in (breaker, budget):
                if target is not None:
                    component = self._components.get(id(target))
                    if component is None:
                        component = self._components[id(target)] = _Component(target, chosen)
                    components.append(component)
            entry = (matcher, components)
            self._registrations.append(entry)

        def unregister() -> None:
            with self._lock:
                if entry not in self._registrations:
                    return
                self._registrations.remove(entry)
                still_used = {id(c.target) for _, cs in self._registrations for c in cs}
                for component in components:
                    if id(component.target) not in still_used:
                        del self._components[id(component.target)]
                        if component.active:
                            component.active.clear()
                            component.relax()

        return unregister

    def on_event(self, event: AnomalyEvent) -> None:
        """The bus callback: tighten on an active anomaly, relax when the last one ends."""
        now = self.clock.now()
        with self._lock:
            if now >= self._next_expiry:
                self._expire(now)
            for matcher, components in self._registrations:
                try:
                    matched = matcher(event.key)
                except Exception:  # one registration's bug must not stop the others
                    if _reported_matchers.first(id(matcher)):
                        _log.exception(
                            "otel_recovery: an AdaptiveThresholds predicate raised on %r; "
                            "that registration ignores the event (logged once per predicate)",
                            event.key,
                        )
                    continue
                if not matched:
                    continue
                for component in components:
                    self._apply(component, event, now)

    def _apply(self, component: _Component, event: AnomalyEvent, now: float) -> None:
        tightening = component.tightening
        if event.signal not in tightening.signals:
            return
        cause = (event.key, event.signal)
        if event.active and event.score >= tightening.min_score:
            if not component.active:
                component.tighten()
                _log.info(
                    "otel_recovery: %s tightened: %s anomaly on %s (score %.2f)",
                    component.name,
                    event.signal,
                    event.key,
                    event.score,
                )
            component.active[cause] = now
            self._next_expiry = min(self._next_expiry, now + self.max_tightened)
        elif (
            not event.active
            and component.active.pop(cause, None) is not None
            and not component.active
        ):
            component.relax()
            _log.info("otel_recovery: %s relaxed: %s normal again", component.name, event.key)

    def sweep(self) -> None:
        """Relax components whose anomalies have not been confirmed for ``max_tightened``.

        Attached buses do this on every event and tick; call it only for components tightened
        through :meth:`on_event` by a publisher that never ticks.
        """
        with self._lock:
            self._expire(self.clock.now())

    def _tick(self) -> None:
        """Bus tick: one clock read unless some tightening may have expired."""
        if self.clock.now() >= self._next_expiry:
            with self._lock:
                self._expire(self.clock.now())

    def _expire(self, now: float) -> None:
        if self.max_tightened == math.inf:
            return
        horizon = now - self.max_tightened
        oldest = math.inf
        for component in self._components.values():
            if not component.active:
                continue
            for cause, at in list(component.active.items()):
                if at <= horizon:
                    del component.active[cause]
                else:
                    oldest = min(oldest, at)
            if not component.active:
                component.relax()
                _log.warning(
                    "otel_recovery: %s relaxed: no anomaly update for %.0fs",
                    component.name,
                    self.max_tightened,
                )
        self._next_expiry = oldest + self.max_tightened

    def status(self) -> list[dict[str, Any]]:
        """Each registered component, whether it is tightened, and by which anomalies."""
        with self._lock:
            now = self.clock.now()
            if now >= self._next_expiry:
                self._expire(now)
            return [
                {
                    "component": c.name,
                    "tightened": bool(c.active),
                    "anomalies": [
                        {"key": key, "signal": signal} for key, signal in sorted(c.active, key=str)
                    ],
                }
                for c in self._components.values()
            ]


def _check_type(value: object, expected: type, name: str) -> None:
    if value is not None and not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {value!r}")
