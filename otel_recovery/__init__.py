"""otel-recovery: error recovery that lives inside OpenTelemetry.

Classify failures, retry with jittered backoff under a budget, break circuits, fall back,
and see every decision as spans, events and metrics. This module is the public face: it
imports no optional library (httpx, requests, aiohttp, redis, psycopg, asyncpg,
statsmodels); instrumentors, middleware, stores and learning live in their own modules.
"""

from otel_recovery.__about__ import VERSION as __version__  # noqa: N811
from otel_recovery._attempt import current_attempt
from otel_recovery._config import is_active, is_testing, set_active, set_testing
from otel_recovery.classify import (
    Classifier,
    ErrorCategory,
    ErrorInfo,
    ErrorKind,
    Rule,
    Severity,
    classify,
    classify_status,
)
from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction, RecoveryStrategy
from otel_recovery.orchestration import RecoveryOrchestrator
from otel_recovery.policies import (
    Backoff,
    BreakerSnapshot,
    BudgetSnapshot,
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    CustomBackoff,
    ExponentialBackoff,
    Fallback,
    FixedBackoff,
    Retry,
    RetryBudget,
    StateTransition,
    Timeout,
    remaining_time,
)
from otel_recovery.recover import RecoveryPolicy, recover

__all__ = [
    "Backoff",
    "BreakerSnapshot",
    "BudgetSnapshot",
    "Bulkhead",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Classifier",
    "CustomBackoff",
    "ErrorCategory",
    "ErrorInfo",
    "ErrorKind",
    "ErrorRecoveryInteraction",
    "ExponentialBackoff",
    "Fallback",
    "FixedBackoff",
    "RecoveryAction",
    "RecoveryOrchestrator",
    "RecoveryPolicy",
    "RecoveryStrategy",
    "Retry",
    "RetryBudget",
    "Rule",
    "Severity",
    "StateTransition",
    "Timeout",
    "__version__",
    "classify",
    "classify_status",
    "current_attempt",
    "is_active",
    "is_testing",
    "recover",
    "remaining_time",
    "set_active",
    "set_testing",
]
