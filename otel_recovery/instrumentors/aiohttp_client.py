"""Inline recovery for the ``aiohttp`` client: ``ClientSession._request`` is wrapped.

``session.get()``/``post()``/``request()`` all return ``_RequestContextManager(self._request(
...))``, so ``_request`` is the one coroutine every request runs through (private, but
stable across aiohttp 3.x). The contrib instrumentation hooks ``ClientSession.__init__`` to
add a ``TraceConfig`` whose signals fire once per ``_request`` call, so retrying ``_request``
gives every attempt its own CLIENT span, whatever the load order, and resends carry
``http.request.resend_count``.

Only bodies held in memory (``data=`` str/bytes/dict/pairs, ``json=``) are replayable;
streams, async generators, file objects and ``FormData`` run once. With
``raise_for_status=True`` a retryable status arrives as ``ClientResponseError``, which the
classifier reads like the response itself. The shared rules live in :mod:`._http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import TimerNoop
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from otel_recovery._clock import Clock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._attempt_site import limit_seconds
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._elsewhere import Server
from otel_recovery.instrumentors._http import (
    FALLBACK_HEADER,
    IDEMPOTENCY_KEY,
    ResponseClassifier,
    RetryableStatusError,
    fallback_body,
    has_header,
    install_resend_count,
    one_shot,
    plan_call,
    replayable_data,
    server_of_url,
    target_of,
)
from otel_recovery.instrumentors._http_layer import async_layer
from otel_recovery.instrumentors._http_plans import HttpPlan, HttpPlans
from otel_recovery.instrumentors._http_site import HttpSite
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._unsent import (
    frames_of,
    original_code,
    sending_frames,
    sources,
)
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = [
    "AioHttpAttemptTimeoutError",
    "AioHttpCircuitOpenError",
    "AioHttpClientRecoveryInstrumentor",
    "AioHttpTotalTimeoutError",
]


class AioHttpCircuitOpenError(CircuitOpenError, aiohttp.ClientConnectionError):
    """The target's circuit is open, so the request was not sent.

    Also an ``aiohttp.ClientConnectionError``, so an application's existing
    ``except aiohttp.ClientError`` handling covers it.
    """


class AioHttpAttemptTimeoutError(aiohttp.ServerTimeoutError):
    """An awaited request cancelled by ``OTEL_RECOVERY_ATTEMPT_TIMEOUT``.

    An ``aiohttp.ServerTimeoutError``, what aiohttp raises for its own socket timeouts: so
    both ``except aiohttp.ClientError`` and ``except asyncio.TimeoutError`` (the built-in
    ``TimeoutError`` from Python 3.11) catch it.
    """


class AioHttpTotalTimeoutError(asyncio.TimeoutError):
    """A request whose retries reached its own ``ClientTimeout.total``.

    aiohttp raises a plain ``asyncio.TimeoutError`` (the built-in ``TimeoutError`` from
    Python 3.11) when that total passes, not an ``aiohttp.ClientError``: so is this one, and
    an application's ``except aiohttp.ClientError`` clause ahead of its
    ``except asyncio.TimeoutError`` sees what it would without us.
    """


class AioHttpClientRecoveryInstrumentor(RecoveryInstrumentor):
    """Retries, breaks circuits and falls back for every ``aiohttp.ClientSession``."""

    library = "aiohttp"
    instruments = ("aiohttp >= 3.8",)
    span_mode = "own"
    fallback_is_a_body = True
    attempt_timeout_error = AioHttpAttemptTimeoutError
    fallback_on = (
        RetryableStatusError,
        CircuitOpenError,
        aiohttp.ClientConnectionError,
        asyncio.TimeoutError,
    )

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return ResponseClassifier(clock)

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        install_resend_count(kwargs)
        plan_of = _Planner(HttpPlans(targets)).plan
        patches.layer(aiohttp.ClientSession, "_request", async_layer(patches, _Site, plan_of))


class _Site(HttpSite[aiohttp.ClientResponse]):
    site = "aiohttp"
    status_attribute = "status"

    def close(self, response: aiohttp.ClientResponse) -> object:
        return response.release()  # a no-op awaitable in aiohttp 3.x; awaited by the caller

    def closed(self, args: tuple[Any, ...]) -> bool:
        # the runner's args: (outcomes, statuses, _request's args, _request's kwargs)
        return getattr(args[2][0], "closed", False) is True

    def time_limit(self, args: tuple[Any, ...]) -> float | None:
        """The request's ``ClientTimeout.total`` (its own, or its session's), which aiohttp
        calls cumulative for the whole request: our retries stay within it."""
        call_args, call_kwargs = args[2], args[3]
        timeout = call_kwargs.get("timeout", _NOT_GIVEN)
        if timeout is _NOT_GIVEN or timeout is aiohttp.helpers.sentinel:
            timeout = getattr(call_args[0], "_timeout", None)  # the session's
        return limit_seconds(
            timeout.total if isinstance(timeout, aiohttp.ClientTimeout) else timeout
        )

    def time_limit_error(self, message: str) -> BaseException:
        return AioHttpTotalTimeoutError(message)

    def asked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server | None:
        _, raw = _method_and_url(args, kwargs)
        if raw is None or _socket_of(args[0]):  # over a unix socket every URL is the socket's
            return None
        return server_of_url(_absolute(args[0], raw))

    def failed_at(self, error: Exception) -> Server | None:
        # what aiohttp's errors say of the request that failed (a redirect's, once one was
        # made); a dropped connection (ServerDisconnectedError) or aiohttp's own timeout says
        # nothing, but ClientSession._request's frame in its traceback still holds the URL
        # it was sending to when it failed (it follows redirects by rebinding ``url``)
        if isinstance(error, aiohttp.ClientConnectorError):
            return target_of("", error.host, error.port)
        if isinstance(error, aiohttp.ClientResponseError):
            return server_of_url(error.request_info.real_url)
        url = _url_being_sent(error)
        return server_of_url(url) if url is not None else None

    def rejected(
        self, error: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        return AioHttpCircuitOpenError(error.name, error.retry_after)

    def fallback(
        self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        method, raw = _method_and_url(args, kwargs)
        return _fallback_response(value, str(method).upper(), _absolute(args[0], raw))


class _Planner:
    """Finds the plan of a ``ClientSession._request(method, str_or_url, **options)`` call.

    Without a ``data=`` body to judge, the method, the URL as passed, the session's base
    URL and its socket decide the plan unless an ``Idempotency-Key`` could matter, so that
    plan is remembered under them and found again with one dictionary lookup.

    A session whose connector talks over a unix socket (``UnixConnector(path)``, or a
    Windows named pipe) is addressed as ``http://localhost/...`` like every other: its
    target is the socket's path (port None), so each socket has its own breaker, and the
    path is part of the key (None for TCP).

    A closed session's request is not planned: aiohttp raises its "Session is closed"
    ``RuntimeError`` before anything is sent, which says nothing of the server. Counted
    on its breaker, 20 calls of one closed session opened the circuit for every healthy
    session of that server, and the closed session's own calls then got our open-circuit
    error instead of aiohttp's.
    """

    def __init__(self, plans: HttpPlans) -> None:
        self.plans = plans
        self.shapes = plans.shapes

    def plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpPlan | None:
        if getattr(args[0], "closed", False) is True:
            return None  # refused by aiohttp before anything is sent: not the server's failure
        shape: Any = None
        # session.get(url) and friends; session.post(url) passes data=None
        if (
            len(args) == 3
            and ("data" not in kwargs or kwargs["data"] is None)
            and not (kwargs and one_shot(kwargs))
        ):
            session = args[0]
            try:
                connector = session._connector  # the socket inline, as _socket_of reads it
                shape = (
                    args[1],
                    args[2],
                    session._base_url,  # both set by ClientSession.__init__ since 3.8
                    None
                    if connector.__class__ is _TCP or not isinstance(connector, _SOCKETS)
                    else connector._path,
                )
                plan = self.shapes.get(shape)
            except (AttributeError, TypeError):  # an unhashable argument: aiohttp will judge
                plan, shape = None, None
            if plan is not None:
                return plan
        return self._plan(args, kwargs, shape)

    def _plan(self, args: tuple[Any, ...], kwargs: dict[str, Any], shape: Any) -> HttpPlan | None:
        """Plan afresh; remember the plan under ``shape`` unless that is None."""
        session = args[0]
        method, raw = _method_and_url(args, kwargs)
        if not isinstance(method, str) or raw is None:
            return None
        try:
            url = _absolute(session, raw)
            path = _socket_of(session)
            target = (path, None) if path else target_of(url.scheme, url.host, url.port)
        except ValueError:  # a URL that cannot be read: aiohttp reports it in its own words
            return None
        if target is None:
            return None
        call = plan_call(
            self.plans.targets,
            method,
            *target,
            url.path,
            has_key=lambda: _has_key(session, kwargs.get("headers")),
            replayable=replayable_data(kwargs.get("data")) and not one_shot(kwargs),
            unsent=_unsent,
        )
        plan = self.plans.compile(call)
        if shape is not None:
            self.plans.remember(shape, plan)
        return plan


_NOT_GIVEN = object()

_CONNECT_FAILURES: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    *((aiohttp.ConnectionTimeoutError,) if hasattr(aiohttp, "ConnectionTimeoutError") else ()),
)
"""Where aiohttp could not make the connection (refused, DNS, TLS, proxy; a connect timeout
from aiohttp 3.10 on, which before raised the ``ServerTimeoutError`` a read timeout also
raises): it connects before it writes the request."""


_LIBRARIES = sources(aiohttp)
_ENTRY = original_code(aiohttp.ClientSession, "_request", _LIBRARIES)
"""aiohttp's request coroutine, the function our layer calls: it follows redirects in a
loop, and its frame keeps the responses answered so far (``history``)."""
_DIGEST = getattr(aiohttp, "DigestAuthMiddleware", None)
_DIGEST_ROUNDS = (
    original_code(_DIGEST, "__call__", _LIBRARIES) if _DIGEST is not None else frozenset()
)
"""aiohttp's own middleware (3.12 on) that sends the request again after a 401: its frame's
``retry_count`` says which round failed."""


def _unsent(error: BaseException) -> bool:
    """Whether the request never left the client (:data:`_CONNECT_FAILURES`) and was the
    call's first, sent by aiohttp alone (see :mod:`._unsent`): nothing was answered yet
    (no ``history``: a redirect's next request fails after the server answered the first,
    which may have applied it), aiohttp did not send it again on a fresh connection after a
    kept-alive one broke (``retry_persistent_connection``, for idempotent methods), and no
    code of the application's (a middleware, a callable ``raise_for_status``) ran in
    between. Our open circuit's error is never resent."""
    if not isinstance(error, _CONNECT_FAILURES) or isinstance(error, CircuitOpenError):
        return False
    frames = sending_frames(error, _ENTRY, _LIBRARIES)
    if not frames or any(
        frame.f_code in _DIGEST_ROUNDS and frame.f_locals.get("retry_count", 1) != 0
        for frame in frames
    ):
        return False
    state = frames[0].f_locals
    if state.get("history", True):
        return False
    session, method = state.get("self"), state.get("method")
    # 3.10 resends without the session switch 3.11 added: unknown is "it may have"
    could_resend = getattr(session, "_retry_connection", True) and (
        method in getattr(aiohttp.client, "IDEMPOTENT_METHODS", ())
    )
    return not (could_resend and state.get("retry_persistent_connection") is False)


_SOCKETS: tuple[type[Any], ...] = tuple(
    kind
    for kind in (getattr(aiohttp, name, None) for name in ("UnixConnector", "NamedPipeConnector"))
    if isinstance(kind, type)
)
"""aiohttp's connectors to a local socket, which keep its path as ``_path``."""
_TCP = aiohttp.TCPConnector
"""The usual connector: told apart from those by one identity test."""


def _url_being_sent(error: BaseException) -> URL | None:
    """The ``url`` local of the ``ClientSession._request`` frame ``error`` passed through:
    the URL of the request that failed, a redirect's included. None where the error did not
    come through it (our own time limit, raised outside it)."""
    for frame in frames_of(error):
        if frame.f_code in _ENTRY:
            url = frame.f_locals.get("url")
            return url if isinstance(url, URL) and url.is_absolute() else None
    return None


def _socket_of(session: Any) -> str | None:
    """The path of the unix socket (or named pipe) ``session``'s connector talks over, None
    for TCP or another connector. Never raises: a connector may be anything."""
    try:
        connector = getattr(session, "_connector", None)
        path = connector._path if isinstance(connector, _SOCKETS) else None
        return os.fsdecode(path) if path else None
    except Exception:  # not a path: named as before, by the URL
        return None


def _method_and_url(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``_request(self, method, str_or_url, ...)``'s method and URL as given."""
    method = args[1] if len(args) > 1 else kwargs.get("method")
    return method, args[2] if len(args) > 2 else kwargs.get("str_or_url")


def _absolute(session: Any, raw: Any) -> URL:
    """The URL a request goes to: ``raw`` joined to the session's ``base_url``, if any."""
    url = raw if isinstance(raw, URL) else URL(str(raw))
    base = getattr(session, "_base_url", None)
    if not url.is_absolute() and isinstance(base, URL):
        url = base.join(url)
    return url


def _has_key(session: Any, headers: object) -> bool:
    """An ``Idempotency-Key`` on the request or on the session."""
    return has_header(headers, IDEMPOTENCY_KEY) or has_header(
        getattr(session, "headers", None), IDEMPOTENCY_KEY
    )


def _fallback_response(value: Any, method: str, url: URL) -> aiohttp.ClientResponse:
    """A 200 ``ClientResponse`` carrying the configured fallback value, marked with a header.

    aiohttp has no public way to build a response without a connection; its class-level
    defaults make an already-read, connectionless response from a few attributes. If a
    future aiohttp breaks this, the caller reports it and the real outcome stands.
    """
    body, content_type = fallback_body(value)
    headers = CIMultiDict(
        {"Content-Type": content_type, "Content-Length": str(len(body)), FALLBACK_HEADER: "value"}
    )
    response = aiohttp.ClientResponse.__new__(aiohttp.ClientResponse)
    response.method = method
    response.status, response.reason = 200, "OK"
    fields: dict[str, Any] = {
        "_real_url": url,
        "_url": url,
        "_body": body,
        "_headers": CIMultiDictProxy(headers),
        "_raw_headers": tuple((k.encode(), v.encode()) for k, v in headers.items()),
        "_cache": {},
        "_traces": [],
        "_loop": asyncio.get_running_loop(),
        "_request_info": aiohttp.RequestInfo(url, method, CIMultiDictProxy(CIMultiDict()), url),
    }
    for name, field in fields.items():
        setattr(response, name, field)
    response._timer = TimerNoop()
    with contextlib.suppress(Exception):  # without it, read(), json() and text() still work
        response.content = _read_stream(body, fields["_loop"])
    return response


def _read_stream(body: bytes, loop: asyncio.AbstractEventLoop) -> aiohttp.StreamReader:
    """``body`` as a finished ``StreamReader``, for code that reads ``response.content``
    (``iter_chunked``, ``readline``) as it would a real response's. Its limit is above the
    body, so feeding it never asks the (absent) connection to pause."""
    stream = aiohttp.StreamReader(BaseProtocol(loop), max(2**16, len(body)), loop=loop)
    if body:
        stream.feed_data(body)
    stream.feed_eof()
    return stream
