"""ASGI middleware: a circuit breaker per route, fallback responses, and retries of requests
that are safe to repeat.

    from otel_recovery.middleware.asgi import RecoveryMiddleware

    app = RecoveryMiddleware(app)                       # 5 failures open a route for 30 s
    app = RecoveryMiddleware(app, retry=Retry(2),       # one retry of a safe request
                             route=lambda scope: scope["path"].rsplit("/", 1)[0])

Put it inside OpenTelemetry's ASGI middleware, so its decisions land on the server span. With
Starlette or FastAPI add it with ``app.add_middleware(RecoveryMiddleware, ...)``: that puts it
inside both OpenTelemetry's middleware (``instrument_app``) and Starlette's
``ServerErrorMiddleware``. Wrapped around the whole app instead, it only ever sees errors as
500 responses that have already started: breakers still count them, but nothing can be
retried or replaced.

- **Per route**, a request that raises or answers with a 5xx counts as a failure on that
  route's breaker, anything else as a success. An error raised once the whole response
  was sent (a ``BackgroundTask`` failing) counts by that response's status, as in WSGI: the
  client got its answer (the error still propagates to the server). A route whose breaker
  is open is not called: the request gets ``fallback``'s response, or ``503`` with
  ``Retry-After`` (the seconds until the breaker lets a probe through), and the span an
  ``otel_recovery.rejected`` event. A request whose client went away (``http.disconnect``)
  counts neither way.
- **Fallback**: ``fallback`` also answers a request whose app raised before it started its
  response (one that started cannot be replaced; the error propagates).
- **Retry** (off unless ``retry=`` is given): an app error before the response started is
  retried when the classifier (or ``Retry(on=...)``) calls it retryable, the method is safe
  (GET, HEAD, OPTIONS, TRACE) or the request has an ``Idempotency-Key``, and the app has not
  read a non-empty body: a consumed body is never replayed. Each attempt gets the scope as it
  first came (routers rewrite it in place) and the request messages the first one read; the
  scope is put back in place, the same dict and ``state`` dict, so the layers outside this
  one read what the attempt that answered left there.
  ``Retry(deadline=...)`` bounds the waits; a downstream ``Retry-After`` is honoured up to
  ``Retry(retry_after_cap=...)`` (60 s by default: lower it for a server). A 5xx the app
  answered is passed on, not retried: it has already gone to the client.
- The breaker counts requests, not attempts: a request retried to success is one success.
  Every permit ends in exactly one outcome, or is given back (cancelled, interrupted,
  client gone, a broken ``is_failure``).
- ASGI3 apps only: a class (an ASGI2 "double callable") is refused at construction; wrap
  it with ``asgiref.compatibility.guarantee_single_callable`` first.
- Anything but ``http`` (``websocket``, ``lifespan``) passes through untouched, and so does
  every request if working out its route fails (logged once): the middleware never breaks
  the app.
- The default breakers (5 failures open a route for 30 s) stay in the process even when
  ``OTEL_RECOVERY_STORE_URL`` is set; pass ``breaker=`` to share them across a fleet.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from otel_recovery._inner_recovery import note_decided, outer_attempt
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.middleware._guard import GuardedApp, Options, may_repeat, shed
from otel_recovery.middleware._request_snapshot import Snapshot
from otel_recovery.middleware._responses import Response
from otel_recovery.middleware._route_template import route_template
from otel_recovery.policies.circuit_breaker import CircuitBreaker

__all__ = ["RecoveryMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RecoveryMiddleware(GuardedApp):
    """Guards an ASGI app per route (see the module docstring)."""

    protocol = "ASGI"

    @classmethod
    def check_app(cls, app: Any) -> None:
        """An ASGI2 app (a class: ``app(scope)`` makes the instance that takes ``receive``
        and ``send``) is refused, by uvicorn's test: called the ASGI3 way it would fail on
        every request, and adapting it here would hide what the server sees."""
        super().check_app(app)
        if inspect.isclass(app) and not hasattr(app, "__await__"):
            raise TypeError(
                f"app {app!r} is a class: an ASGI2 (double-callable) application, which "
                "RecoveryMiddleware does not adapt. Wrap it in an ASGI3 callable first, for "
                "instance asgiref.compatibility.guarantee_single_callable(app) or "
                "uvicorn.middleware.asgi2.ASGI2Middleware(app)"
            )

    @staticmethod
    def default_route(scope: Scope) -> str:
        """``"GET /orders/{id}"`` for ``/orders/42`` (:func:`route_template`)."""
        return route_template(str(scope.get("method", "GET")), str(scope.get("path", "/")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        options = self._options
        try:
            route = self.route(scope)
            breaker = options.breakers.get(route)
            request = _Request(scope, receive, retries=options.retry is not None)
            permitted = breaker is None or breaker.can_execute()
        except Exception as error:  # our bug or the user's route=: never the request's
            report_internal_error("ASGI RecoveryMiddleware", error)
            await self.app(scope, receive, send)
            return
        if breaker is None:
            await self.app(scope, receive, send)
            return
        if not permitted:
            await _respond(send, shed(options, route, breaker))
            return
        settled = False  # every permit ends in exactly one record_* or release()
        try:
            retries, previous = 0, 0.0
            started = options.clock.now() if request.replayable else 0.0  # for the deadline
            while True:
                response = _ResponseWatch(send)
                try:
                    with outer_attempt() as attempt:
                        await self.app(scope, request.receive, response.send)
                except Exception as error:
                    if response.status is None and request.replayable:
                        wait = options.retry_delay(
                            error, retries, previous, started, attempt=attempt
                        )
                        if wait is not None:
                            retries, previous = retries + 1, wait
                            await options.clock.asleep(wait)
                            request.rewind()
                            continue
                    settled = True
                    # raised after the client had its whole response (a background task):
                    # that response is the route's outcome, as in the WSGI twin
                    _count(
                        breaker,
                        options,
                        response.status,
                        request.disconnected,
                        raised=not response.complete,
                    )
                    answer = None if response.status is not None else options.answer(route, error)
                    if answer is None:
                        if options.retry is not None:  # decided here: an outer one must not retry
                            note_decided(error)
                        raise
                    await _respond(send, answer)
                    return
                settled = True
                _count(breaker, options, response.status, request.disconnected, raised=False)
                return
        finally:
            if not settled:  # cancelled or interrupted (even while waiting to retry)
                breaker.release()


def _count(
    breaker: CircuitBreaker,
    options: Options,
    status: int | None,
    disconnected: bool,
    *,
    raised: bool,
) -> None:
    """One request's outcome on its route's breaker. A client that went away says nothing
    about the route: its request neither fails nor succeeds (the permit is given back)."""
    if raised or status is None:
        if disconnected:
            breaker.release()
        else:
            breaker.record_failure()
    else:
        options.count(breaker, status)


class _Request:
    """The request's receive channel, replayable to a retry while no non-empty body and no
    disconnect was read (with the scope put back as it first came); it notes a disconnect
    either way."""

    def __init__(self, scope: Scope, receive: Receive, *, retries: bool) -> None:
        self._receive = receive
        self._read: list[Message] = []
        self._position = 0
        self.disconnected = False
        self.replayable = retries and may_repeat(str(scope.get("method", "GET")), _headers(scope))
        # routers rewrite the scope in place; request.state (scope["state"]) is written into
        self._scope = Snapshot(scope) if self.replayable else None

    async def receive(self) -> Message:
        if self._position < len(self._read):
            message = self._read[self._position]
            self._position += 1
            return message
        message = await self._receive()
        kind = message.get("type")
        if kind == "http.disconnect":
            self.disconnected = True
        if kind != "http.request" or message.get("body"):
            self.replayable = False  # a body (or a disconnect) cannot be read twice
        elif self.replayable:
            self._read.append(message)
            self._position += 1
        return message

    def rewind(self) -> None:
        """Start the messages over, and put the scope back as it first came, in place (see
        :class:`Snapshot`): its ``state`` (``request.state``, which uvicorn gives every
        request from the lifespan's) included, so what a failed attempt stored there is
        neither the next attempt's nor what the layers outside ours read afterwards."""
        self._position = 0
        if self._scope is not None:
            self._scope.restore()


def _headers(scope: Scope) -> dict[str, str]:
    """Header names (lower case) and values; tolerates str where bytes belong."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1") if isinstance(name, (bytes, bytearray)) else str(name)
        text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        found[key.lower()] = text
    return found


_LAST_BODY = frozenset({"http.response.body", "http.response.zerocopysend"})
"""Body messages that end the response unless ``more_body`` says otherwise."""


class _ResponseWatch:
    """Passes the app's messages on; remembers the status it started with, and whether the
    whole response went out (``complete``): an error after that (a Starlette
    ``BackgroundTask`` failing) did not fail the client, who has the response."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.complete = False

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)
        if self.status is not None and (
            kind == "http.response.pathsend"
            or (kind in _LAST_BODY and not message.get("more_body"))
        ):
            self.complete = True  # once sent: a send that raised delivered nothing


async def _respond(send: Send, response: Response) -> None:
    status, headers, body = response
    encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    if not any(name == b"content-length" for name, _ in encoded):
        encoded.append((b"content-length", str(len(body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})
