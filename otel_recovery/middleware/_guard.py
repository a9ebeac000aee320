"""What the ASGI and WSGI middlewares share: per-route breakers, when a request may be
retried, the responses they answer with, and what they mark on the server span.

Why a server-side breaker: when a route keeps failing (its database is down, a dependency
times out), every request still costs a worker, a connection and the client's patience. An
open breaker answers at once with ``503`` and ``Retry-After``, which well-behaved clients
(ours included) honour, and lets one probe through after ``timeout`` to find out whether the
route has recovered. Envoy's outlier detection and resilience4j's server-side circuit do the
same.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from opentelemetry import trace

from otel_recovery._clock import Clock, clock_or_default
from otel_recovery._forksafe import new_lock
from otel_recovery._inner_recovery import OuterAttempt
from otel_recovery._type_profiles import error_type_of
from otel_recovery.classify import classify
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError
from otel_recovery.policies.retry import Retry
from otel_recovery.telemetry import attributes, watch_breaker_globally

_log = logging.getLogger("otel_recovery.middleware")

Response = tuple[int, Sequence[tuple[str, str]], bytes]
"""``(status, headers, body)``: what a middleware answers with in place of the app."""

Fallback = Response | Callable[[str, BaseException], Response]
"""A fixed response, or ``(route, error) -> response``; ``error`` is a
:class:`~otel_recovery.CircuitOpenError` when the route's breaker is open."""

BreakerChoice = CircuitBreaker | Callable[[str], CircuitBreaker] | None

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods a retry may repeat (RFC 9110 section 9.2.1), as DESIGN.md section 5 says; any
other method only with an ``Idempotency-Key`` header."""

INNER_RECOVERY = "inner_recovery"
"""``otel_recovery.retry.disallowed`` on the server span: a policy of ours inside the
handler already ended a call without success, so the request is not retried on top."""

DEFAULT_TIMEOUT = 30.0
"""How long a route's default breaker stays open before it lets a probe through."""


def default_breaker(route: str) -> CircuitBreaker:
    """Five failures in a row open the route for 30 seconds, in this process only.

    ``store="memory://"``: a named breaker would otherwise be shared through
    ``OTEL_RECOVERY_STORE_URL`` when one is set, and every service's ``GET /health`` would
    share one fleet-wide breaker. Pass ``breaker=`` to share route breakers on purpose.
    """
    return CircuitBreaker(
        failure_threshold=5,
        timeout=DEFAULT_TIMEOUT,
        name=f"http.server {route}",
        store="memory://",
    )


def default_is_failure(status: int) -> bool:
    """A 5xx is the server failing; a 4xx is the client's mistake and says nothing about
    the route's health."""
    return status >= 500


class RouteBreakers:
    """One breaker per route, made on first use; at most ``max_routes`` of them.

    Routes are keys the middleware computes per request (by default ``"GET /path"``). Raw
    paths with ids in them would make a breaker per id, so the count is capped: past the
    cap, new routes pass through unguarded and a warning says to pass ``route=`` (for
    instance the framework's path template).
    """

    def __init__(self, breaker: BreakerChoice, max_routes: int) -> None:
        if isinstance(max_routes, bool) or not isinstance(max_routes, int) or max_routes < 1:
            raise ValueError(f"max_routes must be an int >= 1, got {max_routes!r}")
        self._shared: CircuitBreaker | None = None
        self._factory: Callable[[str], CircuitBreaker] = default_breaker
        if isinstance(breaker, CircuitBreaker):
            self._shared = breaker
        elif callable(breaker):
            self._factory = breaker
        elif breaker is not None:
            raise TypeError(
                "breaker must be a CircuitBreaker (one for every route), a function "
                "route -> CircuitBreaker (one per route), or None for the default "
                f"(5 failures open a route for {DEFAULT_TIMEOUT:g} s); got {breaker!r}"
            )
        self._max_routes = max_routes
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = new_lock()
        self._warned = False
        if self._shared is not None:
            watch_breaker_globally(self._shared)

    def get(self, route: str) -> CircuitBreaker | None:
        if self._shared is not None:
            return self._shared
        breaker = self._breakers.get(route)
        if breaker is not None:
            return breaker
        with self._lock:
            breaker = self._breakers.get(route)
            if breaker is None:
                if len(self._breakers) >= self._max_routes:
                    self._warn_full()
                    return None
                breaker = self._factory(route)
                if not isinstance(breaker, CircuitBreaker):
                    raise TypeError(
                        f"the breaker function returned {breaker!r} for route {route!r}; "
                        "it must return a CircuitBreaker"
                    )
                watch_breaker_globally(breaker)  # before any request can use it
                self._breakers[route] = breaker
        return breaker

    def _warn_full(self) -> None:
        if not self._warned:
            self._warned = True
            _log.warning(
                "otel_recovery middleware: %d routes have breakers; new routes pass through "
                "unguarded. Pass route= (for instance the path template) so that routes "
                "do not multiply with path parameters, or raise max_routes.",
                self._max_routes,
            )

    def __getitem__(self, route: str) -> CircuitBreaker:
        """The breaker already made for ``route`` (for tests and dashboards)."""
        if self._shared is not None:
            return self._shared
        return self._breakers[route]


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
            _check_response(fallback, "fallback")
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
            _check_response(response, "the fallback's response")
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


class Snapshot:
    """A request's mapping (an ASGI scope, a WSGI environ) as it came in, put back in place
    before a retry.

    In place, because the layers outside ours hold the very dict (and the very ``state``
    dict, the ``headers`` list in it) they passed in, and read them once we return: an
    access log, a metrics or an auth middleware must see what the attempt that answered
    stored there, as it would without a retry, not what the failed one did. Each list or
    dict value is copied too, as routers and header middlewares edit those in place
    (``scope["headers"].append(...)``): a retry would otherwise see the failed attempt's
    edits, twice over once it made them again. Anything deeper is shared.
    """

    def __init__(self, request: MutableMapping[str, Any]) -> None:
        self._request = request
        self._items = dict(request)
        self._contents: dict[str, list[Any] | dict[Any, Any]] = {
            key: value.copy()
            for key, value in self._items.items()
            if isinstance(value, (list, dict))
        }

    def restore(self) -> None:
        """The mapping, and each list or dict in it, holds again what it held at first."""
        for key, contents in self._contents.items():
            value = self._items[key]
            if isinstance(value, list):
                value[:] = contents
            elif isinstance(value, dict):
                value.clear()
                value.update(contents)
        self._request.clear()
        self._request.update(self._items)


def _header_ok(pair: object) -> bool:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        return False
    for text in pair:
        if not isinstance(text, str) or "\r" in text or "\n" in text:
            return False
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            return False
    return True


def _check_response(response: object, what: str) -> None:
    if not (
        isinstance(response, tuple)
        and len(response) == 3
        and isinstance(response[0], int)
        and 100 <= response[0] <= 599
        and isinstance(response[1], (list, tuple))
        and isinstance(response[2], bytes)
        and all(_header_ok(pair) for pair in response[1])
    ):
        raise TypeError(
            f"{what} must be (status, [(header, value), ...], body bytes) with latin-1 "
            "headers and no line breaks in them, for instance "
            f"(503, [('content-type', 'text/plain')], b'try later'); got {response!r}"
        )


_ROUTE_WORD = re.compile(r"\.?[a-z]+(?:[-_.][a-z]+)*|v\d{1,3}")
"""A path segment kept in a default route: lowercase words (``orders``, ``reset-password``,
``favicon.ico``, ``.well-known``) or an API version (``v1``)."""

_WORD_MAX = 40


def route_template(method: str, path: str) -> str:
    """``"GET /orders/{id}"`` for ``GET /orders/42``: the default route of both middlewares.

    A route is a breaker, and a breaker's name is a metric attribute: raw paths would make a
    breaker per order (up to ``max_routes``, then none) and put ids, tokens and personal
    data in metrics, as HTTP semantic conventions forbid for ``http.route``. So only
    segments that read as route words are kept, and every other one is ``{id}``: numbers,
    UUIDs and hashes, but also emails, short codes, tokens with or without digits, and
    anything with capitals, percent-escapes or punctuation. Telling a resource's name from
    a route's by its letters is a guess that errs on the side of folding (a route spelt
    ``/Search`` becomes ``/{id}``, and shares its breaker); a lowercase word that names a
    resource (``/users/alice``) still looks like a route. Pass ``route=`` for your
    framework's own templates."""
    segments = [
        segment
        if not segment or (len(segment) <= _WORD_MAX and _ROUTE_WORD.fullmatch(segment))
        else "{id}"
        for segment in path.split("/")
    ]
    return f"{method} {'/'.join(segments) or '/'}"


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
