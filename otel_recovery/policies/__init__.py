"""The policy vocabulary: what to do about a failure, each concept in its own module.

Policies hold configuration and, where they must, shared state (a breaker's window, a
budget's counters). They never loop, sleep or emit telemetry: the engine decides and the
drivers act.
"""

from otel_recovery.policies.backoff import Backoff, CustomBackoff, ExponentialBackoff, FixedBackoff
from otel_recovery.policies.budget import BudgetSnapshot, RetryBudget
from otel_recovery.policies.bulkhead import Bulkhead, BulkheadFullError
from otel_recovery.policies.circuit_breaker import (
    BreakerSnapshot,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    StateTransition,
)
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry, RetryAdvice, RetryAdvisor
from otel_recovery.policies.timeout import Timeout, remaining_time

__all__ = [
    "Backoff",
    "BreakerSnapshot",
    "BudgetSnapshot",
    "Bulkhead",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "CustomBackoff",
    "ExponentialBackoff",
    "Fallback",
    "FixedBackoff",
    "Retry",
    "RetryAdvice",
    "RetryAdvisor",
    "RetryBudget",
    "StateTransition",
    "Timeout",
    "remaining_time",
]
