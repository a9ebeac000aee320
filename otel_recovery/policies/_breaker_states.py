"""The states of a circuit breaker: the three automatic ones and the three manual modes.

What each state means, and what moves a breaker between them, is the state machine's story
(:mod:`otel_recovery.policies.circuit_breaker`). The enum lives apart from it because every
part of the breaker compares states (the state machine, the view that reads it, the manual
controls, the fleet-wide subclass), and each part imports it from here without importing the
others. ``otel_recovery.policies.circuit_breaker`` re-exports :class:`CircuitState`.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["CircuitState", "PERMIT_ALL"]


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"
    METRICS_ONLY = "metrics_only"


PERMIT_ALL = frozenset({CircuitState.CLOSED, CircuitState.DISABLED, CircuitState.METRICS_ONLY})
"""The states in which ``can_execute()`` permits every call, without taking the lock."""
