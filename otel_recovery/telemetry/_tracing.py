"""The trace of one call that needed recovery.

Nothing here runs for a call that succeeds first time. When the first attempt fails (or the
call is rejected), the driver opens a :class:`CallTrace`: an INTERNAL span named
``recover <policy>`` whose start time is set back to when the call began, parented to the
caller's current span. Later attempts run inside it, so the client spans of each attempt
nest under the recovery that caused them. Each decision is an event on it.

Status follows the recording-errors convention: a call recovered by a retry or answered by a
fallback ends with status unset; only a final failure sets ``ERROR`` and ``error.type``.
Handled intermediate exceptions are events of our own, not ``exception`` events.
"""

from __future__ import annotations

import contextlib
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from otel_recovery._clock import Clock
from otel_recovery.classify import ErrorInfo
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry._metrics import RecoveryMetrics

__all__ = ["CallTrace"]


class CallTrace:
    """Span, events and metrics for one recovering call; created lazily by the drivers."""

    __slots__ = ("_attributes", "_clock", "_metrics", "_policy", "_span", "_started", "_token")

    def __init__(
        self,
        tracer: Tracer,
        metrics: RecoveryMetrics,
        policy_name: str,
        started: float,
        clock: Clock,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self._policy = policy_name
        self._started = started
        self._clock = clock
        self._metrics = metrics
        self._attributes: dict[str, Any] = {names.POLICY_NAME: policy_name}
        if attributes:
            self._attributes.update(attributes)
        now = clock.now()
        start_ns = int((clock.wall() - (now - started)) * 1e9)
        self._span: Span = tracer.start_span(
            f"{names.RECOVERY_SPAN_PREFIX} {policy_name}",
            kind=SpanKind.INTERNAL,
            attributes=self._attributes,
            start_time=start_ns,
        )
        self._token: object | None = None

    @property
    def span(self) -> Span:
        return self._span

    def activate(self) -> None:
        """Make the recovery span current, so later attempts' spans become its children."""
        if self._token is None:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def _deactivate(self) -> None:
        token = self._token
        if token is not None:
            self._token = None
            # Detaching from another context must not break the call.
            with contextlib.suppress(Exception):
                otel_context.detach(token)  # type: ignore[arg-type]

    def attempt_failed(self, attempt: int, info: ErrorInfo, duration: float) -> None:
        attributes: dict[str, Any] = {names.ATTEMPT: attempt, names.ATTEMPT_DURATION: duration}
        attributes.update(info.to_attributes())
        if info.message:
            attributes[names.ERROR_MESSAGE] = info.message
        self._span.add_event(names.EVENT_ATTEMPT_FAILED, attributes)

    def retrying(self, next_attempt: int, delay: float, info: ErrorInfo) -> None:
        self._span.add_event(names.EVENT_RETRY, {names.ATTEMPT: next_attempt, names.BACKOFF: delay})
        self._metrics.retry_attempts.add(
            1, {names.POLICY_NAME: self._policy, names.ERROR_TYPE: info.error_type}
        )

    def stopped(self, reason: str, info: ErrorInfo | None, budget_name: str | None) -> None:
        """Retrying ended without success; a budget refusal gets an event of its own."""
        if reason == "budget_exhausted":
            self._span.add_event(
                names.EVENT_BUDGET_EXHAUSTED, {names.BUDGET_NAME: budget_name or "default"}
            )
            self._metrics.budget_refusals.add(
                1, {names.POLICY_NAME: self._policy, names.BUDGET_NAME: budget_name or "default"}
            )
        self._span.add_event(names.EVENT_GIVE_UP, {names.STOP_REASON: reason})
        self._span.set_attribute(names.STOP_REASON, reason)

    def rejected(self, reason: str, component: str, retry_after: float | None) -> None:
        attributes: dict[str, Any] = {
            names.STOP_REASON: reason,
            names.REJECTED_BY: component,
        }
        if retry_after is not None:
            attributes[names.BREAKER_RETRY_AFTER] = retry_after
        self._span.add_event(names.EVENT_REJECTED, attributes)

    def fallback(self, kind: str, error: BaseException, info: ErrorInfo | None) -> None:
        error_type = info.error_type if info is not None else type(error).__qualname__
        self._span.add_event(
            names.EVENT_FALLBACK, {names.FALLBACK_KIND: kind, names.ERROR_TYPE: error_type}
        )
        self._metrics.fallback_invocations.add(
            1, {names.POLICY_NAME: self._policy, names.ERROR_TYPE: error_type}
        )

    def end(
        self,
        outcome: str,
        attempts: int,
        info: ErrorInfo | None,
        error: BaseException | None = None,
    ) -> None:
        """Close the span; only a failure or an unanswered rejection is an error."""
        self._deactivate()
        span = self._span
        span.set_attribute(names.OUTCOME, outcome)
        span.set_attribute(names.ATTEMPTS, attempts)
        metric_attributes: dict[str, Any] = {
            names.POLICY_NAME: self._policy,
            names.OUTCOME: outcome,
        }
        if info is not None:
            span.set_attribute(names.ERROR_CATEGORY, info.category.value)
            span.set_attribute(names.ERROR_SEVERITY, info.severity.value)
            span.set_attribute(names.ERROR_FINGERPRINT, info.fingerprint)
        if error is not None and outcome in ("failure", "rejected"):
            error_type = info.error_type if info is not None else type(error).__qualname__
            span.set_attribute(names.ERROR_TYPE, error_type)
            description = info.message if info is not None else ""
            span.set_status(Status(StatusCode.ERROR, description or None))
            metric_attributes[names.ERROR_TYPE] = error_type
        duration = max(0.0, self._clock.now() - self._started)
        self._metrics.call_duration.record(duration, metric_attributes)
        span.end(end_time=int(self._clock.wall() * 1e9))
