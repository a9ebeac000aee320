"""The trace of one call that needed recovery.

Nothing here runs for a call that succeeds first time. When the first attempt fails (or the
call is rejected), the driver opens a :class:`CallTrace`: an INTERNAL span named
``recover <policy>`` whose start time is set back to when the call began, parented to the
caller's current span. Later attempts run inside it, so the client spans of each attempt
nest under the recovery that caused them. Each decision is an event on it.

With ``own_span=False`` (the DB and Redis instrumentors, whose contrib span already covers the
whole logical operation, as the database conventions ask) no span is created: the events and
attributes go on the current span, whose status and end belong to its owner. Without a
recording current span it falls back to a span of its own.

Every method swallows its own failures (logged once): telemetry must never change what the
call returns or raises.

Status follows the recording-errors convention: a call recovered by a retry or answered by a
fallback ends with status unset; only a final failure sets ``ERROR`` and ``error.type``.
Handled intermediate exceptions are events of our own, not ``exception`` events.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from otel_recovery._clock import Clock
from otel_recovery.classify import ErrorInfo
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry._metrics import RecoveryMetrics

__all__ = ["CallTrace"]

_log = logging.getLogger("otel_recovery")
_failed_sites: set[str] = set()
P = ParamSpec("P")
R = TypeVar("R")


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """Run a telemetry step; on an internal error, log once per step and carry on."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            if method.__name__ not in _failed_sites:
                _failed_sites.add(method.__name__)
                _log.exception(
                    "otel_recovery telemetry failed in %s (logged once)", method.__name__
                )

    return guarded


class CallTrace:
    """Span, events and metrics for one recovering call; created lazily by the drivers."""

    __slots__ = (
        "_attributes",
        "_clock",
        "_ended",
        "_metrics",
        "_owns_span",
        "_policy",
        "_span",
        "_started",
        "_token",
    )

    def __init__(
        self,
        tracer: Tracer,
        metrics: RecoveryMetrics,
        policy_name: str,
        started: float,
        clock: Clock,
        attributes: dict[str, Any] | None = None,
        *,
        own_span: bool = True,
    ) -> None:
        self._policy = policy_name
        self._started = started
        self._clock = clock
        self._metrics = metrics
        self._attributes: dict[str, Any] = {names.POLICY_NAME: policy_name}
        if attributes:
            self._attributes.update(attributes)
        self._token: object | None = None
        self._ended = False
        current = trace.get_current_span()
        self._owns_span = own_span or not current.is_recording()
        if not self._owns_span:
            self._span: Span = current
            current.set_attributes(self._attributes)
            return
        now = clock.now()
        start_ns = int((clock.wall() - (now - started)) * 1e9)
        self._span = tracer.start_span(
            f"{names.RECOVERY_SPAN_PREFIX} {policy_name}",
            kind=SpanKind.INTERNAL,
            attributes=self._attributes,
            start_time=start_ns,
        )

    @property
    def span(self) -> Span:
        return self._span

    def activate(self) -> None:
        """Make the recovery span current, so later attempts' spans become its children."""
        if self._token is None and self._owns_span:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def enter_attempt(self) -> object | None:
        """Make the recovery span current for one attempt of a retried block (``attempts()``),
        whose code runs between the loop's steps rather than inside them; the token to give
        :meth:`leave_attempt`. None when the span is not ours to parent (contrib's), or
        telemetry failed: the attempt then runs under its caller's span."""
        if not self._owns_span or self._ended:
            return None
        try:
            return otel_context.attach(trace.set_span_in_context(self._span))
        except Exception:  # telemetry must never break the block
            return None

    def leave_attempt(self, token: object | None) -> None:
        if token is not None:
            with contextlib.suppress(Exception):  # detaching must not break the block
                otel_context.detach(token)  # type: ignore[arg-type]

    def _deactivate(self) -> None:
        token = self._token
        if token is not None:
            self._token = None
            # Detaching from another context must not break the call.
            with contextlib.suppress(Exception):
                otel_context.detach(token)  # type: ignore[arg-type]

    @_never_raises
    def attempt_failed(self, attempt: int, info: ErrorInfo, duration: float) -> None:
        attributes: dict[str, Any] = {names.ATTEMPT: attempt, names.ATTEMPT_DURATION: duration}
        attributes.update(info.to_attributes())
        if info.message:
            attributes[names.ERROR_MESSAGE] = info.message
        self._span.add_event(names.EVENT_ATTEMPT_FAILED, attributes)

    @_never_raises
    def retrying(self, next_attempt: int, delay: float, info: ErrorInfo) -> None:
        """A retry is decided: the event, at the start of its backoff."""
        self._span.add_event(names.EVENT_RETRY, {names.ATTEMPT: next_attempt, names.BACKOFF: delay})

    @_never_raises
    def retried(self, info: ErrorInfo) -> None:
        """The retry :meth:`retrying` announced goes out, after its wait: counted only now,
        so one cancelled during the wait, or stopped after it (the circuit opened, the
        deadline passed, the client closed), is not an attempt in the metric."""
        self._metrics.retry_attempts.add(
            1, {names.POLICY_NAME: self._policy, names.ERROR_TYPE: info.error_type}
        )

    @_never_raises
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

    @_never_raises
    def rejected(self, reason: str, component: str, retry_after: float | None) -> None:
        attributes: dict[str, Any] = {
            names.STOP_REASON: reason,
            names.REJECTED_BY: component,
        }
        if retry_after is not None:
            attributes[names.BREAKER_RETRY_AFTER] = retry_after
        self._span.add_event(names.EVENT_REJECTED, attributes)
        self._span.set_attribute(names.STOP_REASON, reason)  # as a stopped call says it

    @_never_raises
    def fallback(self, kind: str, error: BaseException, info: ErrorInfo | None) -> None:
        error_type = info.error_type if info is not None else type(error).__qualname__
        self._span.add_event(
            names.EVENT_FALLBACK, {names.FALLBACK_KIND: kind, names.ERROR_TYPE: error_type}
        )
        self._metrics.fallback_invocations.add(
            1, {names.POLICY_NAME: self._policy, names.ERROR_TYPE: error_type}
        )

    @_never_raises
    def end(
        self,
        outcome: str,
        attempts: int,
        info: ErrorInfo | None,
        error: BaseException | None = None,
    ) -> None:
        """Close the span; only a failure or an unanswered rejection is an error.

        Idempotent: the first outcome wins, later calls (from cleanup paths) do nothing.
        """
        if self._ended:
            return
        self._ended = True
        metric_attributes: dict[str, Any] = {
            names.POLICY_NAME: self._policy,
            names.OUTCOME: outcome,
        }
        failed = error is not None and outcome in ("failure", "rejected")
        error_type = ""
        if failed:
            error_type = info.error_type if info is not None else type(error).__qualname__
            metric_attributes[names.ERROR_TYPE] = error_type
        try:
            # while the recovery span is still current: the duration's exemplar points to it
            duration = max(0.0, self._clock.now() - self._started)
            self._metrics.call_duration.record(duration, metric_attributes)
        finally:
            self._deactivate()
        span = self._span
        span.set_attribute(names.OUTCOME, outcome)
        span.set_attribute(names.ATTEMPTS, attempts)
        if info is not None:
            span.set_attribute(names.ERROR_CATEGORY, info.category.value)
            span.set_attribute(names.ERROR_SEVERITY, info.severity.value)
            span.set_attribute(names.ERROR_FINGERPRINT, info.fingerprint)
        if failed:
            existing = getattr(span, "attributes", None) or {}
            if self._owns_span or names.ERROR_TYPE not in existing:
                span.set_attribute(names.ERROR_TYPE, error_type)
            if self._owns_span:
                description = info.message if info is not None else ""
                span.set_status(Status(StatusCode.ERROR, description or None))
        if self._owns_span:
            span.end(end_time=int(self._clock.wall() * 1e9))
