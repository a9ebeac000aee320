"""WSGI middleware: the twin of :mod:`otel_recovery.middleware.asgi`, same options and names.

    from otel_recovery.middleware.wsgi import RecoveryMiddleware

    app.wsgi_app = RecoveryMiddleware(app.wsgi_app)     # Flask

Wrap it inside OpenTelemetry's ``OpenTelemetryMiddleware`` so its decisions land on the
server span. What differs from ASGI:

- A request is retried only if it has no body at all (no ``Content-Length`` above 0, no
  ``Transfer-Encoding``): WSGI gives no way to tell whether the app read ``wsgi.input``.
- The outcome is counted when the server closes the response iterable (after the body was
  sent), since a WSGI app may call ``start_response`` lazily while its body is iterated; an
  error while iterating counts as a failure and propagates. A body the server must get as
  it is (a list or any sized body, whose ``len()`` gives ``Content-Length``, or an instance
  of the server's ``wsgi.file_wrapper``, which it may send with ``sendfile()``) is returned
  unchanged once the status is known, and counted then, by that status.
- A retry gets the environ as it first came, put back in place (the same dict), so the
  layers outside this one read what the attempt that answered left there.
- ``start_response`` is called with ``exc_info`` only when the app passed one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import Any

from otel_recovery._inner_recovery import note_decided, outer_attempt
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.middleware._guard import GuardedApp, Options, may_repeat, shed
from otel_recovery.middleware._request_snapshot import Snapshot
from otel_recovery.middleware._responses import Response
from otel_recovery.middleware._route_template import route_template
from otel_recovery.policies.circuit_breaker import CircuitBreaker

__all__ = ["RecoveryMiddleware"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]


class RecoveryMiddleware(GuardedApp):
    """Guards a WSGI app per route (see the module docstring and the ASGI twin's)."""

    protocol = "WSGI"

    @staticmethod
    def default_route(environ: Environ) -> str:
        """``"GET /orders/{id}"`` for ``/orders/42`` (:func:`route_template`)."""
        method = str(environ.get("REQUEST_METHOD", "GET"))
        return route_template(method, str(environ.get("PATH_INFO", "") or "/"))

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        options = self._options
        try:
            route = self.route(environ)
            breaker = options.breakers.get(route)
            replayable = (
                options.retry is not None
                and _without_body(environ)
                and may_repeat(str(environ.get("REQUEST_METHOD", "GET")), _headers(environ))
            )
            permitted = breaker is None or breaker.can_execute()
        except Exception as error:  # our bug or the user's route=: never the request's
            report_internal_error("WSGI RecoveryMiddleware", error)
            return self._call_app(environ, start_response)
        if breaker is None:
            return self._call_app(environ, start_response)
        if not permitted:
            return _respond(start_response, shed(options, route, breaker))
        settled = False  # every permit ends in exactly one record_* or release()
        try:
            # dispatchers rewrite the environ in place; the layers outside read it afterwards
            initial = Snapshot(environ) if replayable else None
            retries, previous = 0, 0.0
            started = options.clock.now() if replayable else 0.0  # for the deadline
            while True:
                watch = _StartWatch(start_response)
                try:
                    with outer_attempt() as attempt:
                        body = self._call_app(environ, watch)
                except Exception as error:
                    if watch.status is None and initial is not None:
                        wait = options.retry_delay(
                            error, retries, previous, started, attempt=attempt
                        )
                        if wait is not None:
                            retries, previous = retries + 1, wait
                            options.clock.sleep(wait)
                            initial.restore()
                            continue
                    settled = True
                    breaker.record_failure()
                    answer = None if watch.status is not None else options.answer(route, error)
                    if answer is None:
                        if options.retry is not None:  # decided here: an outer one must not retry
                            note_decided(error)
                        raise
                    return _respond(start_response, answer)
                settled = True
                if watch.status is not None and _as_it_came(body, environ):
                    options.count(breaker, watch.status)  # the one count: we will not see close
                    return body
                return _Outcome(body, watch, breaker, options)  # counts when closed
        finally:
            if not settled:  # interrupted (even while waiting to retry)
                breaker.release()

    def _call_app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        body: Iterable[bytes] = self.app(environ, start_response)
        return body


class _StartWatch:
    """``start_response`` for the app: passes it on and remembers the status."""

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response
        self.status: int | None = None

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is None:  # as the app called it: a server's may take two arguments only
            write = self._start_response(status, headers)
        else:
            write = self._start_response(status, headers, exc_info)
        self.status = int(status.split(" ", 1)[0])
        return write


class _Outcome:
    """The app's body, passed through; counts the request when the server closes it.

    An iterator of its own (not a generator): a generator the server abandoned would close
    the app's iterable a second time when it is collected.
    """

    def __init__(
        self, body: Iterable[bytes], watch: _StartWatch, breaker: CircuitBreaker, options: Options
    ) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._watch = watch
        self._breaker = breaker
        self._options = options
        self._failed = False
        self._counted = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            try:
                self._iterator = iter(self._body)
            except Exception:
                self._failed = True
                raise
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            iter(self)
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception:
            self._failed = True
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._count()

    def _count(self) -> None:
        if self._counted:
            return
        self._counted = True
        status = self._watch.status
        if self._failed:
            self._breaker.record_failure()
        elif status is None:  # never started: closed unread, the route said nothing
            self._breaker.release()
        else:
            self._options.count(self._breaker, status)


def _as_it_came(body: Iterable[bytes], environ: Environ) -> bool:
    """Whether the server must get ``body`` itself, not our wrapper around it: its own
    ``wsgi.file_wrapper`` (sent by ``sendfile()`` when it recognises its type) or a sized
    body (a list; wsgiref sends ``Content-Length`` from ``len()``).

    The server then closes the body itself, so the request is counted as it is returned,
    by its status, the one count it gets: an error the server meets while iterating such a
    body is not seen (a list cannot fail; a file read can, after the headers went out)."""
    if hasattr(body, "__len__"):
        return True
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


def _without_body(environ: Environ) -> bool:
    length = str(environ.get("CONTENT_LENGTH") or "0").strip()
    return length in ("", "0") and not environ.get("HTTP_TRANSFER_ENCODING")


def _headers(environ: Environ) -> dict[str, str]:
    return {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    status, headers, body = response
    names = {name.lower() for name, _ in headers}
    pairs = list(headers)
    if "content-length" not in names:
        pairs.append(("Content-Length", str(len(body))))
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    start_response(f"{status} {reason}", pairs)
    return [body]
