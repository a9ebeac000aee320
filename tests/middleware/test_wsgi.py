"""The WSGI RecoveryMiddleware, driven through httpx's WSGITransport: the ASGI twin's
behaviour, plus what WSGI makes different (bodies, lazily started responses)."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any
from wsgiref.handlers import SimpleHandler
from wsgiref.util import FileWrapper

import httpx
import pytest

from otel_recovery import CircuitBreaker, CircuitOpenError, Retry, recover
from otel_recovery._fake_clock import FakeClock
from otel_recovery.middleware import WSGIRecoveryMiddleware
from otel_recovery.middleware.wsgi import RecoveryMiddleware
from otel_recovery.policies.backoff import FixedBackoff


class App:
    """/ok 200, /down 500, /boom raises, /flaky raises its first N times, /lazy starts its
    response only when iterated and fails while doing so; counts calls and closes."""

    def __init__(self, failures_before_ok: int = 0) -> None:
        self.calls: dict[str, int] = {}
        self.failures_before_ok = failures_before_ok
        self.closed = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        self.calls[path] = self.calls.get(path, 0) + 1
        if path == "/boom" or (path == "/flaky" and self.calls[path] <= self.failures_before_ok):
            raise ConnectionError("the database went away")
        if path == "/lazy":
            return self._lazy(start_response)
        status = "500 Internal Server Error" if path == "/down" else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return _Closing(self, [b"done"])

    def _lazy(self, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"part"
        raise ConnectionError("lost while streaming")


class _Closing:
    def __init__(self, app: App, chunks: list[bytes]) -> None:
        self.app, self.chunks = app, chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.app.closed += 1


def _breakers(clock: FakeClock) -> Any:
    return lambda route: CircuitBreaker(2, timeout=10.0, name=route, clock=clock)


def _client(app: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test")


def test_a_failing_route_opens_sheds_with_retry_after_and_recovers_after_a_probe():
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    with _client(middleware) as client:
        assert [client.get("/down").status_code for _ in range(2)] == [500, 500]
        shed = client.get("/down")
        assert (shed.status_code, shed.headers["retry-after"]) == (503, "10")
        assert app.calls["/down"] == 2
        assert client.get("/ok").status_code == 200
        clock.advance(10.0)
        assert client.get("/down").status_code == 500  # the probe
        assert app.calls["/down"] == 3
    assert app.closed == 4  # every response the app made was closed through us
    assert middleware.breakers["GET /ok"].snapshot().successful_calls == 1


def test_a_fallback_answers_errors_and_open_routes():
    clock = FakeClock()
    app = App()
    seen: list[type[BaseException]] = []

    def fallback(route: str, error: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
        seen.append(type(error))
        return 200, [("Content-Type", "text/plain")], b"cached"

    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), fallback=fallback, clock=clock)
    with _client(middleware) as client:
        answers = [client.get("/boom") for _ in range(3)]
    assert [(r.status_code, r.text) for r in answers] == [(200, "cached")] * 3
    assert seen == [ConnectionError, ConnectionError, CircuitOpenError]
    assert app.calls["/boom"] == 2


def test_a_bodiless_safe_request_is_retried_a_post_with_a_body_never():
    clock = FakeClock()
    app = App(failures_before_ok=1)
    retry = Retry(3, backoff=FixedBackoff(0.25))
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), retry=retry, clock=clock)
    with _client(middleware) as client:
        assert client.get("/flaky").status_code == 200
        assert app.calls["/flaky"] == 2
        assert clock.sleeps == [0.25]
        app.calls["/flaky"] = 0
        with pytest.raises(ConnectionError):
            client.post("/flaky", content=b"order", headers={"Idempotency-Key": "k1"})
    assert app.calls["/flaky"] == 1
    assert clock.sleeps == [0.25]


def _app_whose_dependency_gives_up(clock: FakeClock, calls: list[str]) -> Any:
    """A WSGI app whose handler calls a dependency under ``@recover(Retry(3))`` that always
    fails; ``calls`` records each handler run and each dependency attempt."""

    @recover(retry=Retry(3, backoff=FixedBackoff(0.1)), clock=clock)
    def dependency() -> str:
        calls.append("dependency")
        raise ConnectionError("the dependency went away")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        calls.append("handler")
        dependency()
        start_response("200 OK", [])
        return [b"done"]

    return app


def test_a_request_whose_inner_call_gave_up_is_not_retried_on_top():
    """The WSGI twin of the ASGI rule: a dependency call under our policy retried 3 times
    and gave up, so the middleware's Retry(3) does not run the handler again (9 calls)."""
    clock = FakeClock()
    calls: list[str] = []
    app = _app_whose_dependency_gives_up(clock, calls)
    retry = Retry(3, backoff=FixedBackoff(0.25))
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), retry=retry, clock=clock)
    with _client(middleware) as client, pytest.raises(ConnectionError):
        client.get("/dep")
    assert calls == ["handler", "dependency", "dependency", "dependency"]
    assert clock.sleeps == [0.1, 0.1]


@pytest.mark.parametrize("inner_retry", [None, 2])
def test_nested_middlewares_do_not_retry_what_the_inner_layers_gave_up_on(inner_retry):
    """A middleware inside another (a framework's and the service's own): what a policy gave
    up on inside the inner one stops the outer one's retry too, whether the inner one
    retries nothing (it passes the give-up up) or retried and gave up itself."""
    clock = FakeClock()
    calls: list[str] = []
    inner = RecoveryMiddleware(
        _app_whose_dependency_gives_up(clock, calls),
        breaker=_breakers(clock),
        retry=None if inner_retry is None else Retry(inner_retry, backoff=FixedBackoff(1.0)),
        clock=clock,
    )
    outer = RecoveryMiddleware(
        inner, breaker=_breakers(clock), retry=Retry(3, backoff=FixedBackoff(0.25)), clock=clock
    )
    with _client(outer) as client, pytest.raises(ConnectionError):
        client.get("/dep")
    assert calls == ["handler", "dependency", "dependency", "dependency"]
    assert clock.sleeps == [0.1, 0.1]


def test_an_inner_middleware_that_retried_and_gave_up_stops_the_outer_one():
    """No policy inside, just two middlewares with a retry each: the inner one's give-up is
    final, or the outer one would run the handler 3 x 2 = 6 times."""
    clock = FakeClock()
    app = App()
    inner = RecoveryMiddleware(
        app, breaker=_breakers(clock), retry=Retry(2, backoff=FixedBackoff(1.0)), clock=clock
    )
    outer = RecoveryMiddleware(
        inner, breaker=_breakers(clock), retry=Retry(3, backoff=FixedBackoff(0.25)), clock=clock
    )
    with _client(outer) as client, pytest.raises(ConnectionError):
        client.get("/boom")
    assert app.calls["/boom"] == 2
    assert clock.sleeps == [1.0]


def test_an_error_while_streaming_counts_as_a_failure_and_propagates():
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(
        app, breaker=_breakers(clock), retry=Retry(3), fallback=(200, [], b"x"), clock=clock
    )
    with _client(middleware) as client, pytest.raises(ConnectionError):
        client.get("/lazy")
    assert app.calls["/lazy"] == 1
    snapshot = middleware.breakers["GET /lazy"].snapshot()
    assert (snapshot.successful_calls, snapshot.failed_calls) == (0, 1)


def test_one_breaker_for_every_route_and_a_status_predicate():
    clock = FakeClock()
    shared = CircuitBreaker(1, timeout=5.0, name="api", clock=clock)
    app = App()
    middleware = RecoveryMiddleware(
        app, breaker=shared, is_failure=lambda status: status >= 500 or status == 404
    )
    with _client(middleware) as client:
        assert client.get("/missing-in-app").status_code == 200
        assert client.get("/down").status_code == 500
        assert client.get("/ok").status_code == 503  # the shared breaker opened
    assert middleware.breakers["anything"] is shared


def test_the_package_re_exports_the_wsgi_middleware():
    assert WSGIRecoveryMiddleware is RecoveryMiddleware


def test_paths_with_ids_share_their_routes_breaker_by_default():
    """A breaker per raw path made one per order (up to max_routes, then none) and put ids
    and tokens in the breaker metrics' names."""
    middleware = RecoveryMiddleware(App())
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    with _client(middleware) as client:
        for order in range(300):
            assert client.get(f"/orders/{order}").status_code == 200
        client.get("/users/550e8400-e29b-41d4-a716-446655440000/cart")
        client.get(f"/reset/{token}")
        client.get("/v1/quotes")
    assert sorted(middleware.breakers._breakers) == [
        "GET /orders/{id}", "GET /reset/{id}", "GET /users/{id}/cart", "GET /v1/quotes",
    ]  # fmt: skip
    assert middleware.breakers["GET /orders/{id}"].snapshot().successful_calls == 300


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/users/alice.pii@example.com/profile", "GET /users/{id}/profile"),
        ("/reset/AbcdefGhijklMnopqrStuvwXyzTOKEN", "GET /reset/{id}"),
        ("/verify/OTP9X2", "GET /verify/{id}"),
        ("/files/s3cretShortTok1", "GET /files/{id}"),
        ("/hooks/XXXXSLACKTOKENNODIGITSXXXX", "GET /hooks/{id}"),
        ("/search/caf%C3%A9", "GET /search/{id}"),
        ("/api/v2/reset-password", "GET /api/v2/reset-password"),
        ("/.well-known/openid-configuration", "GET /.well-known/openid-configuration"),
        ("/favicon.ico", "GET /favicon.ico"),
        ("/", "GET /"),
    ],
)
def test_the_default_route_keeps_route_words_only(path, route):
    """Emails, short codes and tokens without digits or shorter than 24 characters were kept
    as they were: personal data and secrets in the breaker metrics' names (a security
    review)."""
    from otel_recovery.middleware._route_template import route_template

    assert route_template("GET", path) == route


class _Server(SimpleHandler):
    """wsgiref's own server handler on in-memory streams: what a real server does with the
    body it gets. ``sendfile()`` stands for the zero-copy path gunicorn takes for a body of
    its ``wsgi.file_wrapper`` type; wsgiref's does nothing, this one notes it was taken."""

    used_sendfile = False

    def sendfile(self) -> bool:
        self.used_sendfile = True
        self.write(self.result.filelike.read())  # type: ignore[union-attr]
        return True


def _serve(app: Any, path: str) -> tuple[bytes, bool]:
    """The raw response ``app`` gets from :class:`_Server`, and whether it used sendfile."""
    out = io.BytesIO()
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    server = _Server(io.BytesIO(), out, sys.stderr, environ, multithread=False)
    server.run(app)
    return out.getvalue(), server.used_sendfile


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    return lambda data: None


class _SizedBody:
    """A response iterable that knows its length (not a list), and counts its closes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.closed = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def close(self) -> None:
        self.closed += 1


class _Bodies:
    """An app answering ``/file`` with the server's ``wsgi.file_wrapper`` and ``/sized`` with
    a :class:`_SizedBody`, ``/down`` with a sized 500; keeps what it returned."""

    def __init__(self) -> None:
        self.returned: list[Any] = []
        self.files: list[io.BytesIO] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        status = "500 Internal Server Error" if path == "/down" else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        if path == "/file":
            self.files.append(io.BytesIO(b"filedata"))
            body = environ["wsgi.file_wrapper"](self.files[-1], 4)
        else:
            body = _SizedBody([b"one-chunk"])
        self.returned.append(body)
        return body


def test_the_servers_file_wrapper_reaches_it_as_it_came_and_counts_once():
    """Wrapped in our iterator, the body was no longer the server's own type: gunicorn read
    the file through Python instead of sendfile() (found by review)."""
    clock = FakeClock()
    app = _Bodies()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    assert _serve(app, "/file")[1]  # the bare app takes the zero-copy path
    response, used_sendfile = _serve(middleware, "/file")
    assert used_sendfile and response.endswith(b"\r\n\r\nfiledata")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/file", "wsgi.file_wrapper": FileWrapper}
    result = middleware(environ, _start_response)
    assert result is app.returned[-1]
    result.close()  # type: ignore[attr-defined]  # the server closes the body itself
    assert app.files[-1].closed
    snapshot = middleware.breakers["GET /file"].snapshot()
    assert (snapshot.successful_calls, snapshot.failed_calls) == (2, 0)  # one per request


def test_a_sized_body_reaches_the_server_as_it_came_and_counts_once_by_its_status():
    """Without ``len()`` wsgiref sent no Content-Length (found by review). The server
    closes the body itself, once; the request is counted once, when the app returns it."""
    clock = FakeClock()
    app = _Bodies()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    response, _ = _serve(middleware, "/sized")
    assert b"Content-Length: 9\r\n" in response and response.endswith(b"one-chunk")
    assert app.returned[-1].closed == 1
    result = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/down"}, _start_response)
    assert result is app.returned[-1] and len(result) == 1  # type: ignore[arg-type]
    result.close()  # type: ignore[attr-defined]
    ok = middleware.breakers["GET /sized"].snapshot()
    down = middleware.breakers["GET /down"].snapshot()
    assert (ok.successful_calls, ok.failed_calls) == (1, 0)
    assert (down.successful_calls, down.failed_calls) == (0, 1)
    assert app.returned[-1].closed == 1


def test_after_a_retry_the_layers_outside_read_what_the_answering_attempt_left():
    """The environ is put back in place, not replaced by a copy: an outer middleware read
    the failed attempt's values while the response came from the retry (found by review)."""
    clock = FakeClock()
    attempts: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        attempts.append(len(attempts) + 1)
        environ["myapp.attempt"] = attempts[-1]
        environ["webob.adhoc_attrs"]["attempt"] = attempts[-1]
        if len(attempts) == 1:
            environ["myapp.failed"] = True
            raise ConnectionError("the database went away")
        environ["myapp.user_id"] = 42
        start_response("200 OK", [])
        return [b"ok"]

    middleware = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock)
    adhoc: dict[str, Any] = {"from": "outer"}
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/me",
        "wsgi.input": io.BytesIO(),
        "webob.adhoc_attrs": adhoc,
    }
    assert middleware(environ, _start_response) == [b"ok"]
    assert attempts == [1, 2]
    assert (environ["myapp.user_id"], environ["myapp.attempt"]) == (42, 2)
    assert "myapp.failed" not in environ
    assert environ["webob.adhoc_attrs"] is adhoc and adhoc == {"from": "outer", "attempt": 2}


def test_start_response_gets_exc_info_only_when_the_app_passed_one():
    """A server (or a test harness) whose ``start_response(status, headers)`` takes two
    arguments failed every request, and the failures opened the route (found by review)."""
    calls: list[tuple[Any, ...]] = []

    def two_arguments(status: str, headers: Any) -> Any:
        calls.append((status,))
        return lambda data: None

    def three_arguments(status: str, headers: Any, exc_info: Any = None) -> Any:
        calls.append((status, exc_info))
        return lambda data: None

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        if environ["PATH_INFO"] == "/replaced":
            try:
                raise ValueError("late")
            except ValueError:
                start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"hello"]

    middleware = RecoveryMiddleware(app)
    assert middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, two_arguments) == [b"hello"]
    assert calls == [("200 OK",)]
    calls.clear()
    middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/replaced"}, three_arguments)
    assert calls[0] == ("200 OK", None)
    assert calls[1][0] == "500 Internal Server Error" and calls[1][1][0] is ValueError


def test_a_file_wrapper_that_is_a_function_is_no_type_to_check_against():
    """Some servers (uWSGI) give ``wsgi.file_wrapper`` as a function: an unsized body then
    goes through our iterator and counts when closed, as before."""

    def file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        return iter(lambda: filelike.read(block_size), b"")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"data"), 2)

    clock = FakeClock()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/f", "wsgi.file_wrapper": file_wrapper}
    result = middleware(environ, _start_response)
    assert b"".join(result) == b"data"
    assert middleware.breakers["GET /f"].snapshot().successful_calls == 0
    result.close()  # type: ignore[attr-defined]
    assert middleware.breakers["GET /f"].snapshot().successful_calls == 1
