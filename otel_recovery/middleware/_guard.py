"""What the ASGI and WSGI middlewares share: their checked options, the answers they give
(503 or the fallback while a route's breaker is open, whether and when a failed request is
retried, how a response counts on the breaker), and what they mark on the server span.

:class:`GuardedApp` is the base of both middlewares. What they guard with lives apart: the
breakers per route in :mod:`._route_breakers`, the default route in :mod:`._route_template`,
the response shape and its check in :mod:`._responses`, and the request put back in place
before a retry in :mod:`._request_snapshot`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from opentelemetry import trace

from otel_recovery._clock import Clock, clock_or_default
from otel_recovery._inner_recovery import OuterAttempt
from otel_recovery._type_profiles import error_type_of
from otel_recovery.classify import classify
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.middleware._responses import Fallback, Response, check_response
from otel_recovery.middleware._route_breakers import BreakerChoice, RouteBreakers
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError
from otel_recovery.policies.retry import Retry
from otel_recovery.telemetry import attributes

__all__ = [
    "INNER_RECOVERY",
    "SAFE_METHODS",
    "GuardedApp",
    "Options",
    "default_is_failure",
    "mark",
    "may_repeat",
    "shed",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods a retry may repeat (RFC 9110 section 9.2.1), as DESIGN.md section 5 says; any
other method only with an ``Idempotency-Key`` header."""

INNER_RECOVERY = "inner_recovery"
"""``otel_recovery.retry.disallowed`` on the server span: a policy of ours inside the
handler already ended a call without success, so the request is not retried on top."""


def default_is_failure(status: int) -> bool:
    """A 5xx is the server failing; a 4xx is the client's mistake and says nothing about
    the route's health."""
    return status >= 500


@dataclass(frozen=True)
class Options:
    """The middlewares' options, checked once at construction."""

    breakers: RouteBreakers
    is_failure: Callable[[int], bool]
    fallback: Fallback | None
    retry: Retry | None
    clock: Clock

    @classmethod
    def build(
        cls,
        *,
        breaker: BreakerChoice,
        max_routes: int,
        is_failure: Callable[[int], bool] | None,
        fallback: Fallback | None,
        retry: Retry | None,
        clock: Clock | None,
    ) -> Options:
        if is_failure is not None and not callable(is_failure):
            raise TypeError(f"is_failure must be a function status -> bool, got {is_failure!r}")
        if fallback is not None and not callable(fallback):
            check_response(fallback, "fallback")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry (for instance Retry(3)) or None, got {retry!r}")
        if retry is not None and (retry.attempt_timeout is not None or retry.advisor is not None):
            raise ValueError(
                "the middleware cannot time out an app attempt or consult a retry advisor: "
                "pass Retry(attempts, deadline=..., backoff=...) without attempt_timeout or "
                "advisor (your server's own timeout bounds a request)"
            )
        return cls(
            RouteBreakers(breaker, max_routes),
            is_failure or default_is_failure,
            fallback,
            retry,
            clock_or_default(clock),
        )

    def answer(self, route: str, error: BaseException) -> Response | None:
        """The fallback's response for ``error``, or None without a fallback (or when the
        fallback itself fails: that is logged once, and the app's error stands)."""
        fallback = self.fallback
        if fallback is None:
            return None
        try:
            response = fallback(route, error) if callable(fallback) else fallback
            check_response(response, "the fallback's response")
        except Exception as failure:
            report_internal_error("middleware fallback", failure)
            return None
        mark(
            attributes.EVENT_FALLBACK,
            {
                attributes.FALLBACK_KIND: "response",
                attributes.ERROR_TYPE: error_type_of(type(error)),
            },
        )
        return response

    def retry_delay(
        self,
        error: BaseException,
        retries_done: int,
        previous: float,
        started: float,
        *,
        attempt: OuterAttempt | None = None,
    ) -> float | None:
        """Seconds to wait before retrying after ``error``, or None: give up (no attempt
        left, not retryable, or the wait would end past ``Retry(deadline=...)``). A failure
        in deciding (a broken ``Retry(on=...)``) is logged once and means no retry.

        ``attempt``: the attempt that failed. If a policy of ours inside it already gave up
        on ``error`` (retried it to the end, refused it, or was not allowed to repeat it),
        retrying the request would multiply its retries and escape its budget, so the
        request is not retried; the server span says why (see ``_inner_recovery``). A
        failure in that check is logged once and means "not decided"."""
        retry = self.retry
        if retry is None or retries_done + 1 >= retry.attempts:
            return None
        if attempt is not None and _decided(attempt, error):
            _on_span(lambda span: span.set_attribute(attributes.RETRY_DISALLOWED, INNER_RECOVERY))
            return None
        try:
            info = classify(error)
            if not retry.is_retryable(error, info):
                return None
            wait = retry.delay_for(retries_done + 1, previous, info)
        except Exception as failure:
            report_internal_error("middleware retry decision", failure)
            return None
        if wait is None:
            return None
        if retry.deadline is not None and self.clock.now() + wait - started > retry.deadline:
            return None
        mark(
            attributes.EVENT_RETRY, {attributes.ATTEMPT: retries_done + 2, attributes.BACKOFF: wait}
        )
        return wait

    def count(self, breaker: CircuitBreaker, status: int) -> None:
        """A response with ``status`` on its route's breaker, as ``is_failure`` judges it.
        A predicate that raises is logged once; the outcome is then unknown, and the
        permit is given back uncounted."""
        try:
            failed = bool(self.is_failure(status))
        except Exception as failure:
            report_internal_error("middleware is_failure", failure)
            breaker.release()
            return
        if failed:
            breaker.record_failure()
        else:
            breaker.record_success()


def shed(options: Options, route: str, breaker: CircuitBreaker) -> Response:
    """The answer while ``route``'s breaker is open: the fallback's, or 503 + Retry-After."""
    wait = breaker.retry_after()
    error = CircuitOpenError(breaker.name, wait)
    values: dict[str, str | float | int] = {
        attributes.REJECTED_BY: "circuit_breaker",
        attributes.BREAKER_NAME: breaker.name,
        attributes.BREAKER_STATE: breaker.state.value,
    }
    if wait is not None:
        values[attributes.BREAKER_RETRY_AFTER] = wait
    mark(attributes.EVENT_REJECTED, values)
    response = options.answer(route, error)
    if response is not None:
        return response
    seconds = max(1, math.ceil(wait if wait is not None else breaker.timeout))
    headers = [("retry-after", str(seconds)), ("content-type", "text/plain; charset=utf-8")]
    return 503, headers, b"Service Unavailable: this route's circuit breaker is open\n"


def may_repeat(method: str, headers: Mapping[str, str]) -> bool:
    """Whether the request's method lets a retry repeat it (the body is checked apart)."""
    return method.upper() in SAFE_METHODS or "idempotency-key" in headers


def mark(event: str, values: dict[str, str | float | int]) -> None:
    """An event (and the breaker's state) on the current span: the server span of the
    OpenTelemetry middleware this one sits inside."""

    def write(span: trace.Span) -> None:
        state = values.get(attributes.BREAKER_STATE)
        if isinstance(state, str):
            span.set_attribute(attributes.BREAKER_STATE, state)
        span.add_event(event, values)

    _on_span(write)


def _on_span(write: Callable[[trace.Span], None]) -> None:
    """``write`` on the current span if it records. A span or tracer that raises (a vendor
    bridge's bug) is logged once and the request goes on as if the mark had been made: the
    telemetry must never turn a 503, a fallback or a retry into an error of ours."""
    try:
        span = trace.get_current_span()
        if span.is_recording():
            write(span)
    except Exception as failure:
        report_internal_error("middleware span", failure)


class GuardedApp:
    """What both middlewares are made of: the app, how a request maps to a route, and the
    checked options. Subclasses say which protocol they speak (``protocol``) and how they
    name a route by default (``default_route``)."""

    protocol: ClassVar[str]

    def __init__(
        self,
        app: Any,
        *,
        breaker: BreakerChoice = None,
        route: Callable[[Any], str] | None = None,
        is_failure: Callable[[int], bool] | None = None,
        fallback: Fallback | None = None,
        retry: Retry | None = None,
        max_routes: int = 512,
        clock: Clock | None = None,
    ) -> None:
        self.check_app(app)
        if route is not None and not callable(route):
            raise TypeError(f"route must be a function (the request) -> str, got {route!r}")
        self.app = app
        self.route: Callable[[Any], str] = route or self.default_route
        self._options = Options.build(
            breaker=breaker,
            max_routes=max_routes,
            is_failure=is_failure,
            fallback=fallback,
            retry=retry,
            clock=clock,
        )

    @classmethod
    def check_app(cls, app: Any) -> None:
        """Refuse at construction what could never serve a request (subclasses add their
        protocol's own rules)."""
        if not callable(app):
            raise TypeError(f"app must be an {cls.protocol} application (a callable), got {app!r}")

    @staticmethod
    def default_route(request: Any) -> str:
        raise NotImplementedError

    @property
    def breakers(self) -> RouteBreakers:
        """The breakers per route (``middleware.breakers["GET /orders"]``)."""
        return self._options.breakers


def _decided(attempt: OuterAttempt, error: BaseException) -> bool:
    """``attempt.decided(error)``; our failure in deciding is logged once and means "not
    decided" (the request is then retried as before the rule existed), never the app's."""
    try:
        return attempt.decided(error)
    except Exception as failure:
        report_internal_error("middleware inner-recovery check", failure)
        return False
