"""Inline recovery for ``httpx``: ``Client.send`` and ``AsyncClient.send`` are wrapped.

The contrib instrumentation patches the transports (``HTTPTransport.handle_request`` and its
async twin), which ``send`` reaches through auth and redirect handling; wrapping ``send``
puts our retry loop *above* contrib whatever the load order, so every attempt gets its own
CLIENT span and resends carry ``http.request.resend_count``. ``send`` is also what
``get``/``post``/``request``/``stream`` all end in, so every way of issuing a request is
covered, including clients with custom transports or mounts that contrib cannot see.

A request is re-sent as the same ``httpx.Request`` object; only a body held in memory
(``httpx.ByteStream``: ``content=bytes``, ``data=``, ``json=``) is replayable. Streaming and
multipart bodies run once. What is retried, and how failing responses are returned
unchanged, is shared with the other HTTP instrumentors (:mod:`._http`).

A connection that failed although the transport was built with ``retries=N`` has been
tried N + 1 times by httpcore already, so it is not retried again (:mod:`._client_retries`).
That reads two private attributes (``Client._transport_for_url``, the pool's ``_retries``);
where they are missing, nothing is marked and our retry decides as before.
"""

from __future__ import annotations

import datetime
import os
import ssl
from typing import Any

import httpcore
import httpx

from otel_recovery._clock import Clock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._elsewhere import Server
from otel_recovery.instrumentors._http import (
    FALLBACK_HEADER,
    IDEMPOTENCY_KEY,
    ResponseClassifier,
    RetryableStatusError,
    fallback_body,
    install_resend_count,
    plan_call,
    server_of_url,
    target_of,
)
from otel_recovery.instrumentors._http_layer import async_layer, sync_layer
from otel_recovery.instrumentors._http_plans import HttpPlan, HttpPlans
from otel_recovery.instrumentors._http_site import HttpSite
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._unsent import (
    frames_of,
    only_known_frames,
    original_code,
    sending_frames,
    sources,
)
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["HTTPXAttemptTimeoutError", "HTTPXCircuitOpenError", "HTTPXRecoveryInstrumentor"]


class HTTPXCircuitOpenError(CircuitOpenError, httpx.ConnectError):
    """The target's circuit is open, so the request was not sent.

    Also an ``httpx.ConnectError`` (a ``TransportError``), so an application's existing
    ``except httpx.HTTPError`` / ``except httpx.TransportError`` handling covers it.
    """


class HTTPXAttemptTimeoutError(TimeoutError, httpx.TimeoutException):
    """An awaited request cancelled by ``OTEL_RECOVERY_ATTEMPT_TIMEOUT``.

    Also an ``httpx.TimeoutException``, what httpx raises for its own timeouts, so
    ``except httpx.HTTPError`` / ``except httpx.TimeoutException`` catch it, with the
    ``request`` httpx's errors carry; still a ``TimeoutError`` for code that expects the
    built-in one.
    """

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request  # type: ignore[assignment]  # httpx types it non-optional


class HTTPXRecoveryInstrumentor(RecoveryInstrumentor):
    """Retries, breaks circuits and falls back for every ``httpx`` client, sync and async."""

    library = "httpx"
    instruments = ("httpx >= 0.23",)
    span_mode = "own"
    fallback_is_a_body = True
    attempt_timeout_error = HTTPXAttemptTimeoutError
    fallback_on = (
        RetryableStatusError,
        CircuitOpenError,
        httpx.TimeoutException,
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        httpx.ProxyError,
    )

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return ResponseClassifier(clock)

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        install_resend_count(kwargs)
        plan_of = _Planner(HttpPlans(targets)).plan
        client, async_client = _defining(httpx.Client), _defining(httpx.AsyncClient)
        patches.layer(client, "send", sync_layer(patches, _Site, plan_of))
        patches.layer(async_client, "send", async_layer(patches, _AsyncSite, plan_of))


def _defining(cls: type) -> type:
    """The class in ``cls``'s MRO that defines ``send``: httpx's own client class.

    Contrib's httpx instrumentation before 0.49b0 rebinds ``httpx.Client`` to a subclass of
    its own while it is instrumented, and back when it is not. Patching the name's class
    of the moment would leave our layer on that subclass, and out of every client created
    after contrib's ``uninstrument``; the defining class serves both.
    """
    return next(base for base in cls.__mro__ if "send" in vars(base))


class _Site(HttpSite[httpx.Response]):
    site = "httpx"
    status_attribute = "status_code"

    def close(self, response: httpx.Response) -> object:
        response.close()
        return None

    def closed(self, args: tuple[Any, ...]) -> bool:
        # the runner's args: (outcomes, statuses, send's args, send's kwargs)
        return getattr(args[2][0], "is_closed", False) is True

    def let_go(self, args: tuple[Any, ...]) -> None:
        super().let_go(args)
        _restore_headers(args)

    async def alet_go(self, args: tuple[Any, ...]) -> None:
        await super().alet_go(args)
        _restore_headers(args)

    def rejected(
        self, error: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        rejection = HTTPXCircuitOpenError(error.name, error.retry_after)
        rejection.request = _request_of(args, kwargs)
        return rejection

    def fallback(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> httpx.Response:
        return _fallback_response(value, _request_of(args, kwargs))

    def timed_out(
        self, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        request = _request_of(args, kwargs)
        if isinstance(error, HTTPXAttemptTimeoutError) and isinstance(request, httpx.Request):
            error.request = request
        return error

    def retried_error(self, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        # ``HTTPTransport(retries=N)`` hands N to httpcore's pool, whose connections repeat a
        # connection that failed (refused, unreachable, timed out) N times, nothing else.
        if not isinstance(error, _CONNECTION_FAILURES) or isinstance(error, CircuitOpenError):
            return 0
        if not _TLS_REPEATED and not _failed_connecting(error):
            return 0
        request = _request_of(args, kwargs)
        transport_for_url = getattr(args[0], "_transport_for_url", None) if args else None
        if transport_for_url is None or not isinstance(request, httpx.Request):
            return 0
        pool = getattr(transport_for_url(request.url), "_pool", None)
        retries = getattr(pool, "_retries", 0)
        return retries if type(retries) is int else 0

    def asked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server | None:
        request = _request_of(args, kwargs)
        if not isinstance(request, httpx.Request) or _socket_of(args[0] if args else None):
            return None  # over a unix socket every URL is the socket's
        return server_of_url(request.url)

    def failed_at(self, error: Exception) -> Server | None:
        # httpx's errors name the request that failed (a redirect's, once one was made)
        if not isinstance(error, (httpx.RequestError, httpx.HTTPStatusError)):
            return None
        try:
            request = error.request
        except RuntimeError:  # raised without a request: unknown
            return None
        return server_of_url(request.url)


_CONNECTION_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)
"""What httpcore's connection retries repeat."""


_LIBRARIES = sources(httpx, httpcore)
_ENTRY = original_code(httpx.Client, "send", _LIBRARIES) | original_code(
    httpx.AsyncClient, "send", _LIBRARIES
)
"""httpx's own ``send``, the function our layer calls."""
_REDIRECT_LOOPS = original_code(
    httpx.Client, "_send_handling_redirects", _LIBRARIES
) | original_code(httpx.AsyncClient, "_send_handling_redirects", _LIBRARIES)
"""httpx's redirect loops, whose frames say which request failed and what was answered
before it (none in another httpx: then nothing counts as never sent)."""


def _unsent(error: BaseException) -> bool:
    """Whether the request never left the client: httpcore raises ``ConnectError`` and
    ``ConnectTimeout`` only while it makes a connection (TCP, TLS, a proxy's tunnel),
    before it writes a request; a connection lost later is a ``ReadError``, a
    ``WriteError`` or a ``RemoteProtocolError``. And it was the call's first request, sent
    by httpx alone (see :mod:`._unsent`): in the outermost redirect loop nothing was
    answered yet (no ``history``: no redirect, no auth round), the failed request is the
    loop's own, and no code of the application's (a transport, a connection pool under
    it, an auth flow, an event hook) ran in between. Our open circuit's error is a
    ``ConnectError`` too, and is never resent."""
    if not isinstance(error, _CONNECTION_FAILURES) or isinstance(error, CircuitOpenError):
        return False
    frames = sending_frames(error, _ENTRY, _LIBRARIES)
    loop = next((frame for frame in frames or () if frame.f_code in _REDIRECT_LOOPS), None)
    if loop is None:
        return False
    mapped = error.__cause__  # httpcore's error: its traceback shows the connection pool
    if mapped is not None and not only_known_frames(mapped, _LIBRARIES):
        return False
    try:
        failed = error.request
    except RuntimeError:  # raised without a request: unknown
        return False
    state = loop.f_locals
    return not state.get("history", True) and state.get("request") is failed


_TLS_REPEATED = tuple(int(part) for part in httpcore.__version__.split(".")[:2]) >= (0, 17)
"""httpcore 0.17 moved the TLS handshake inside its retry loop; before, only the TCP connect
was repeated, and a failed handshake (also a ``ConnectError``) was tried once."""


def _failed_connecting(error: BaseException) -> bool:
    """Whether ``error`` came from the TCP connect itself (an ``OSError`` other than a TLS
    error or a timeout, somewhere in its cause chain, not raised in the TLS handshake: a
    server that hangs up mid-handshake may reset the socket instead of closing it): what
    httpcore before 0.17 repeats. Unsure is no: leaving a failure unmarked costs sends,
    marking it wrongly a retry."""
    link: BaseException | None = error
    for _ in range(8):
        link = link.__cause__ or link.__context__ if link is not None else None
        if link is None or isinstance(link, (ssl.SSLError, TimeoutError)):
            return False
        if isinstance(link, OSError):
            return not _raised_in_tls(link)
    return False


def _raised_in_tls(error: BaseException) -> bool:
    """Whether ``error`` was raised inside the ``ssl`` module (a handshake's read or write)."""
    return any(frame.f_code.co_filename == ssl.__file__ for frame in frames_of(error))


_SENT_HEADERS = "_otel_recovery_headers"
"""Where a request that an auth flow or a request hook may change keeps its headers as the
application gave them (see :func:`_keep_headers`)."""


def _keep_headers(args: tuple[Any, ...], kwargs: dict[str, Any], request: Any) -> None:
    """Keep ``request``'s headers as given, if what ``send`` runs may change them.

    A retry sends the same ``httpx.Request`` again, and ``send`` hands it to the auth flow
    and the request event hooks, which may write to it: a flow that answers a 401 by
    setting ``Authorization`` leaves that header on the request, and the resend would go
    out first with the previous round's credentials, which httpx never sends first. So
    before a resend the headers are put back as they were (:meth:`_Site.let_go`). Kept only
    where an auth or a request hook is in play (the client's, or ``send(auth=...)``):
    other requests are sent as httpx leaves them, unchanged."""
    try:
        client = args[0]
        auth = kwargs.get("auth", httpx.USE_CLIENT_DEFAULT) if kwargs else client._auth
        if auth is httpx.USE_CLIENT_DEFAULT:
            auth = client._auth
        if (auth is None and not client._event_hooks["request"]) or not isinstance(
            request, httpx.Request
        ):
            return
        setattr(request, _SENT_HEADERS, request.headers.copy())
    except Exception:  # another httpx: the resend goes as before
        return


def _restore_headers(args: tuple[Any, ...]) -> None:
    """Put a request's headers back as the application gave them (:func:`_keep_headers`);
    ``args`` are the runner's: ``(outcomes, statuses, call_args, call_kwargs)``."""
    request = _request_of(args[2], args[3])
    kept = getattr(request, _SENT_HEADERS, None)
    if isinstance(kept, httpx.Headers):
        request.headers = kept.copy()


class _AsyncSite(_Site):
    def close(self, response: httpx.Response) -> object:
        return response.aclose()


class _Planner:
    """Finds the plan of a ``send(request)`` call, sync or async.

    A request with its body in memory (``httpx.ByteStream``, also what a body-less request
    has) is planned by its method and URL alone unless an ``Idempotency-Key`` could matter,
    so that plan is remembered under them and found again with one dictionary lookup. The
    URL's parsed form (``URL._uri_reference``, a tuple) is the key, as hashing the
    ``httpx.URL`` itself formats it to a string first; an httpx without it is planned
    afresh every time.

    A client whose transport talks over a unix socket (``HTTPTransport(uds=path)``) is
    addressed as ``http://localhost/...`` like every other: its target is the socket's path
    (port None), so each socket has its own breaker, and the path is part of the key (None
    for TCP). It is read from the client's own transport (:func:`_socket_of`), not from a
    transport mounted for some URLs (``mounts=``): the key is read on every request, and
    finding the mounted transport would cost a pattern match per mount.

    A closed client's request is not planned: httpx raises its "client has been closed"
    ``RuntimeError`` before anything is sent, which says nothing of the server. Counted
    on its breaker, 20 calls of one closed client opened the circuit for every healthy
    client of that server, and the closed client's own calls then got our open-circuit
    error instead of httpx's.
    """

    def __init__(self, plans: HttpPlans) -> None:
        self.plans = plans
        self.shapes = plans.shapes

    def plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpPlan | None:
        if args and getattr(args[0], "is_closed", False) is True:
            return None  # refused by httpx before anything is sent: not the server's failure
        request = _request_of(args, kwargs)
        _keep_headers(args, kwargs, request)
        shape: Any = None
        try:
            if request.stream.__class__ is httpx.ByteStream:  # a body in memory, or none
                # the socket inline (see _socket_of): a call would cost more than the lookup
                transport = args[0]._transport
                uds = transport._pool._uds if isinstance(transport, _POOLED) else None
                shape = (request.method, request.url._uri_reference, uds)
                plan = self.shapes.get(shape)
                if plan is not None:
                    return plan
        except (AttributeError, TypeError, IndexError):  # another httpx, an odd _uds: afresh
            shape = None
        return self._plan(request, shape, args[0] if args else None)

    def _plan(self, request: Any, shape: Any, client: Any) -> HttpPlan | None:
        """Plan afresh; remember the plan under ``shape`` unless that is None."""
        if not isinstance(request, httpx.Request):
            return None
        url = request.url
        uds = _path(_socket_of(client))
        if uds:  # the socket's path names the server
            target: tuple[str, int | None] | None = (uds, None)
        else:
            target = target_of(url.scheme, url.host, url.port)
        if target is None:
            return None
        call = plan_call(
            self.plans.targets,
            request.method,
            *target,
            url.path,
            has_key=lambda: IDEMPOTENCY_KEY in request.headers,
            replayable=isinstance(request.stream, httpx.ByteStream),
            unsent=_unsent,
        )
        plan = self.plans.compile(call)
        if shape is not None:
            self.plans.remember(shape, plan)
        return plan


_POOLED = (httpx.HTTPTransport, httpx.AsyncHTTPTransport)
"""httpx's own transports: an httpcore pool, which keeps ``HTTPTransport(uds=)`` as
``_uds``. Another transport (the application's, a mock) is not looked into."""


def _socket_of(client: Any) -> Any:
    """The unix socket ``client``'s own transport talks over, None for TCP or another
    transport; as :meth:`_Planner.plan` reads it for the key. Never raises."""
    try:
        transport = client._transport
        return transport._pool._uds if isinstance(transport, _POOLED) else None
    except Exception:
        return None


def _path(uds: Any) -> str | None:
    """A socket's path as text (httpcore takes a str; bytes or a ``Path`` work too)."""
    try:
        return os.fsdecode(uds) if uds else None
    except Exception:  # not a path: named as before, by the URL
        return None


def _request_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The request ``send(self, request, ...)`` was given."""
    return args[1] if len(args) > 1 else kwargs.get("request")


def _fallback_response(value: Any, request: httpx.Request) -> httpx.Response:
    """A 200 response carrying the configured fallback value, marked with a header."""
    body, content_type = fallback_body(value)
    response = httpx.Response(
        200,
        headers={"Content-Type": content_type, FALLBACK_HEADER: "value"},
        content=body,
        request=request,
    )
    response.elapsed = datetime.timedelta(0)  # set by the transport's close on a real one
    return response
