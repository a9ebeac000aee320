"""Every telemetry name otel_recovery emits, in one place.

There is no OpenTelemetry semantic convention for retries or circuit breakers yet
(semantic-conventions#2355), so these live in our own ``otel_recovery.*`` namespace, never in
``http.*``/``db.*`` and never in the reserved ``otel.*``. ``error.type`` and
``http.request.resend_count`` are the standard attributes and are reused as-is. The README's
telemetry reference is written from this list (not generated): change both together.
"""

from __future__ import annotations

from typing import Final

# Standard attributes reused as-is.
ERROR_TYPE: Final = "error.type"
HTTP_REQUEST_RESEND_COUNT: Final = "http.request.resend_count"

# Span
RECOVERY_SPAN_PREFIX: Final = "recover"
"""A call that needs recovery gets an INTERNAL span named ``recover <policy name>``."""

# Span and metric attributes.
POLICY_NAME: Final = "otel_recovery.policy.name"
OUTCOME: Final = "otel_recovery.outcome"
"""``success`` (recovered by a retry), ``failure``, ``fallback`` or ``rejected``."""
ATTEMPTS: Final = "otel_recovery.retry.attempts"
"""Attempts made by the call, on the recovery span."""
ATTEMPT: Final = "otel_recovery.retry.attempt"
"""1-based number of the attempt an event refers to."""
MAX_ATTEMPTS: Final = "otel_recovery.retry.max_attempts"
BACKOFF: Final = "otel_recovery.retry.backoff"
"""Seconds slept before the next attempt."""
STOP_REASON: Final = "otel_recovery.retry.stop_reason"
"""Why retrying stopped: not_retryable, attempts_exhausted, deadline, budget_exhausted,
retry_after_too_long, rejected, client_closed (an HTTP client closed during the backoff)."""
ATTEMPT_DURATION: Final = "otel_recovery.attempt.duration"
ERROR_CATEGORY: Final = "otel_recovery.error.category"
ERROR_SEVERITY: Final = "otel_recovery.error.severity"
ERROR_FINGERPRINT: Final = "otel_recovery.error.fingerprint"
ERROR_RETRYABLE: Final = "otel_recovery.error.retryable"
ERROR_KIND: Final = "otel_recovery.error.kind"
ERROR_CODE: Final = "otel_recovery.error.code"
ERROR_RETRY_AFTER: Final = "otel_recovery.error.retry_after"
ERROR_MESSAGE: Final = "otel_recovery.error.message"
BREAKER_NAME: Final = "otel_recovery.circuit_breaker.name"
BREAKER_STATE: Final = "otel_recovery.circuit_breaker.state"
BREAKER_FROM: Final = "otel_recovery.circuit_breaker.from"
BREAKER_TO: Final = "otel_recovery.circuit_breaker.to"
BREAKER_REASON: Final = "otel_recovery.circuit_breaker.reason"
BREAKER_OUTCOME: Final = "otel_recovery.circuit_breaker.outcome"
BREAKER_RETRY_AFTER: Final = "otel_recovery.circuit_breaker.retry_after"
BUDGET_NAME: Final = "otel_recovery.retry_budget.name"
BULKHEAD_NAME: Final = "otel_recovery.bulkhead.name"
FALLBACK_KIND: Final = "otel_recovery.fallback.kind"
"""``value``, ``function`` or ``last_known_good``."""
RETRY_DISALLOWED: Final = "otel_recovery.retry.disallowed"
"""Why a failed DB or Redis call was not retried although its error may be transient:
``non_idempotent_command``, ``transaction``, ``statement_may_have_run``, ``sql_retry_never``,
``session`` (a Redis client with a connection of its own, whose session state a resend
would not have), ``redirected`` (a redirect's target failed) or ``client_retried`` (the
client library's own retry already repeated it: redis-py's connection ``Retry``, urllib3's
``Retry`` under requests, httpx's transport ``retries``)."""
REDIS_CLIENT_RETRIES: Final = "otel_recovery.redis.client_retries"
"""redis-py's per-command connection retry limit, set when a failure it already retried
reaches us: that many resends happened inside the attempt."""
HTTP_CLIENT_RETRIES: Final = "otel_recovery.http.client_retries"
"""How many times the HTTP client's own retry (urllib3's ``Retry`` under requests, httpx's
transport ``retries``) repeats the failure that ended the call; set with
``otel_recovery.retry.disallowed=client_retried``."""

# The seed API, self-healing and orchestration.
RECOVER_FROM_ERROR_SPAN: Final = "recover_from_error"
"""``ErrorRecoveryInteraction.recover_from_error`` opens ``recover_from_error <service_id>``."""
ORCHESTRATION_SPAN: Final = "orchestrate_recovery"
SERVICE_ID: Final = "otel_recovery.service.id"
STRATEGY: Final = "otel_recovery.strategy"
"""The RecoveryAction chosen, e.g. ``exponential_backoff``."""
STRATEGY_REASON: Final = "otel_recovery.strategy.reason"
RECOVERY_REASON: Final = "otel_recovery.recovery.reason"
ENDPOINT: Final = "otel_recovery.endpoint"
OPERATION: Final = "otel_recovery.operation"
CRITICALITY: Final = "otel_recovery.criticality"
CONTEXT_PREFIX: Final = "otel_recovery.context."
"""Other recovery-context keys, stringified, redacted and bounded."""
REJECTED_BY: Final = "otel_recovery.rejected_by"
CHECKPOINT_ID: Final = "otel_recovery.checkpoint.id"
CHECKPOINT_VERSION: Final = "otel_recovery.checkpoint.version"
EVENT_CHECKPOINT_RESTORED: Final = "otel_recovery.checkpoint.restored"
STORE_URL: Final = "otel_recovery.store.url"
"""The store's URL with the password replaced by ``***``."""
STORE_REPLAYED: Final = "otel_recovery.store.replayed"
"""Writes and counter batches replayed to the store when it came back."""
STORE_CONFLICTS: Final = "otel_recovery.store.conflicts"
"""Replayed compare-and-set writes the store refused (another writer got there first)."""
STORE_OUTAGE: Final = "otel_recovery.store.outage"
"""Seconds the store was unreachable, on the resynced event."""
EVENT_STORE_DEGRADED: Final = "otel_recovery.store.degraded"
"""The store became unreachable; the component now works on local state."""
EVENT_STORE_RESYNCED: Final = "otel_recovery.store.resynced"
"""The store is reachable again and local changes were replayed to it."""
STORE_COMPONENTS: Final = "otel_recovery.store.components"
"""Fleet-wide components on the degraded/resynced events, e.g. ``circuit_breaker payments``."""
STORE_SPAN: Final = "otel_recovery.store"
"""A short INTERNAL span carrying a store event noticed outside any span (a sync thread)."""
EVENT_COMPENSATION: Final = "otel_recovery.compensation"
COMPENSATION_NAME: Final = "otel_recovery.compensation.name"
COMPENSATION_OUTCOME: Final = "otel_recovery.compensation.outcome"
EVENT_SELF_HEAL: Final = "otel_recovery.self_heal"
HEAL_ACTION: Final = "otel_recovery.heal.action"
HEAL_OUTCOME: Final = "otel_recovery.heal.outcome"
HEAL_DETAIL: Final = "otel_recovery.heal.detail"
EVENT_ORCHESTRATION_SERVICE: Final = "otel_recovery.orchestration.service"
ORCHESTRATION_SERVICES: Final = "otel_recovery.orchestration.services"
HEALTH_SPAN: Final = "service_health"
"""A health-monitoring round in which a service's health changed."""
EVENT_HEALTH_CHANGED: Final = "otel_recovery.health.changed"
HEALTH_HEALTHY: Final = "otel_recovery.health.healthy"

# Span events.
EVENT_ATTEMPT_FAILED: Final = "otel_recovery.attempt.failed"
EVENT_RETRY: Final = "otel_recovery.retry"
"""A backoff sleep is about to start; carries the delay and the next attempt number."""
EVENT_GIVE_UP: Final = "otel_recovery.give_up"
EVENT_BUDGET_EXHAUSTED: Final = "otel_recovery.retry_budget.exhausted"
EVENT_REJECTED: Final = "otel_recovery.rejected"
EVENT_FALLBACK: Final = "otel_recovery.fallback"
EVENT_BREAKER_STATE_CHANGE: Final = "otel_recovery.circuit_breaker.state_change"
EVENT_ANOMALY: Final = "otel_recovery.anomaly"
"""A dependency's series turned anomalous (or normal again); on the next call of that series."""

# Anomaly detection (span event and ``otel_recovery.anomalies`` attributes).
SERVER_ADDRESS: Final = "server.address"
"""Standard attribute, reused as-is for the dependency of an anomaly."""
ANOMALY_SERVICE: Final = "otel_recovery.anomaly.service"
"""The calling service (its ``service.name``)."""
ANOMALY_OPERATION: Final = "otel_recovery.anomaly.operation"
"""Operation group of the series, e.g. ``HTTP GET`` or ``postgresql SELECT``."""
ANOMALY_SIGNAL: Final = "otel_recovery.anomaly.signal"
"""``error_rate``, ``latency`` or ``calls``."""
ANOMALY_ACTIVE: Final = "otel_recovery.anomaly.active"
ANOMALY_SCORE: Final = "otel_recovery.anomaly.score"
ANOMALY_VALUE: Final = "otel_recovery.anomaly.value"
ANOMALY_EXPECTED: Final = "otel_recovery.anomaly.expected"

# Metrics (research/otel-conventions.md section 4.4).
METRIC_CALL_DURATION: Final = "otel_recovery.call.duration"
METRIC_RETRY_ATTEMPTS: Final = "otel_recovery.retry.attempts"
METRIC_BUDGET_REFUSALS: Final = "otel_recovery.retry_budget.refusals"
METRIC_BREAKER_STATE: Final = "otel_recovery.circuit_breaker.state"
METRIC_BREAKER_TRANSITIONS: Final = "otel_recovery.circuit_breaker.transitions"
METRIC_BREAKER_CALLS: Final = "otel_recovery.circuit_breaker.calls"
METRIC_FALLBACK_INVOCATIONS: Final = "otel_recovery.fallback.invocations"
METRIC_ANOMALIES: Final = "otel_recovery.anomalies"
METRIC_SERVICE_HEALTH: Final = "otel_recovery.service.health"
"""1 while a monitored service is up, 0 while down (not reported before a first verdict)."""

CALL_DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
"""The HTTP duration bucket advice, extended to a minute because recoveries wait."""
