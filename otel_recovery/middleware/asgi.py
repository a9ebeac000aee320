"""ASGI middleware: a circuit breaker per route, fallback responses, and retries of requests
that are safe to repeat.

    from otel_recovery.middleware.asgi import RecoveryMiddleware

    app = RecoveryMiddleware(app)                       # 5 failures open a route for 30 s
    app = RecoveryMiddleware(app, retry=Retry(2),       # one retry of a safe request
                             route=lambda scope: scope["path"].rsplit("/", 1)[0])

Put it inside OpenTelemetry's ASGI middleware (FastAPI's ``instrument_app`` does that for
middlewares added with ``app.add_middleware``), so its decisions land on the server span:

- **Per route**, a request that raises or answers with a 5xx counts as a failure on that
  route's breaker, anything else as a success. A route whose breaker is open is not called:
  the request gets ``fallback``'s response, or ``503`` with ``Retry-After`` (the seconds
  until the breaker lets a probe through), and the span an ``otel_recovery.rejected`` event.
- **Fallback**: ``fallback`` also answers a request whose app raised before it started its
  response (one that started cannot be replaced; the error propagates).
- **Retry** (off unless ``retry=`` is given): an app error before the response started is
  retried when the classifier (or ``Retry(on=...)``) calls it retryable, the method is safe
  (GET, HEAD, OPTIONS, TRACE) or the request has an ``Idempotency-Key``, and the app has not
  read a non-empty body: a consumed body is never replayed. Each attempt sees the request
  messages the first one read. A 5xx the app answered is passed on, not retried: it has
  already gone to the client.
- The breaker counts requests, not attempts: a request retried to success is one success.
- Anything but ``http`` (``websocket``, ``lifespan``) passes through untouched, and so does
  every request if working out its route fails (logged once): the middleware never breaks
  the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.middleware._guard import (
    GuardedApp,
    Response,
    may_repeat,
    shed,
)

__all__ = ["RecoveryMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RecoveryMiddleware(GuardedApp):
    """Guards an ASGI app per route (see the module docstring)."""

    protocol = "ASGI"

    @staticmethod
    def default_route(scope: Scope) -> str:
        """``"GET /orders/42"``: pass ``route=`` to group paths with ids in them."""
        return f"{scope.get('method', 'GET')} {scope.get('path', '/')}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        try:
            route = self.route(scope)
            breaker = self._options.breakers.get(route)
            permitted = breaker is None or breaker.can_execute()
        except Exception as error:  # our bug or the user's route=: never the request's
            report_internal_error("ASGI RecoveryMiddleware", error)
            await self.app(scope, receive, send)
            return
        if breaker is None:
            await self.app(scope, receive, send)
            return
        if not permitted:
            await _respond(send, shed(self._options, route, breaker))
            return
        request = _Request(scope, receive)
        options, retries, previous = self._options, 0, 0.0
        while True:
            response = _ResponseWatch(send)
            try:
                await self.app(scope, request.receive, response.send)
            except Exception as error:
                if response.status is None:
                    wait = (
                        options.retry_delay(error, retries, previous)
                        if request.replayable
                        else None
                    )
                    if wait is not None:
                        retries, previous = retries + 1, wait
                        await options.clock.asleep(wait)
                        request.rewind()
                        continue
                breaker.record_failure()
                answer = None if response.status is not None else options.answer(route, error)
                if answer is None:
                    raise
                await _respond(send, answer)
                return
            except BaseException:  # cancelled, interrupted: no outcome to count
                breaker.release()
                raise
            if response.status is None or options.is_failure(response.status):
                breaker.record_failure()
            else:
                breaker.record_success()
            return


class _Request:
    """The request's receive channel, replayable while no non-empty body was read."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        headers = {
            bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        self._receive = receive
        self._read: list[Message] = []
        self._position = 0
        self.replayable = may_repeat(str(scope.get("method", "GET")), headers)

    async def receive(self) -> Message:
        if self._position < len(self._read):
            message = self._read[self._position]
            self._position += 1
            return message
        message = await self._receive()
        if message.get("type") != "http.request" or message.get("body"):
            self.replayable = False  # a body (or a disconnect) cannot be read twice
        else:
            self._read.append(message)
            self._position += 1
        return message

    def rewind(self) -> None:
        self._position = 0


class _ResponseWatch:
    """Passes the app's messages on and remembers the status it started with."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None

    async def send(self, message: Message) -> None:
        if message.get("type") == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)


async def _respond(send: Send, response: Response) -> None:
    status, headers, body = response
    encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    if not any(name == b"content-length" for name, _ in encoded):
        encoded.append((b"content-length", str(len(body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})
