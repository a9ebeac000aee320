"""Classification of real exceptions and of look-alikes of third-party ones.

Third-party libraries are never imported by otel_recovery; here they are imitated by classes
with the right ``__module__``/``__name__`` (and, where the library is installed, checked with
the real classes too).
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import re
import socket
import sys
import urllib.error
from datetime import datetime, timedelta, timezone
from email.message import Message
from email.utils import format_datetime
from typing import Any

import pytest

from otel_recovery._fake_clock import FakeClock
from otel_recovery._fingerprint import fingerprint, normalise_message
from otel_recovery.classify import (
    Classifier,
    ErrorCategory,
    ErrorInfo,
    ErrorKind,
    Rule,
    Severity,
    classify,
    classify_status,
    get_default_classifier,
    set_default_classifier,
)

Cat, Kind, Sev = ErrorCategory, ErrorKind, Severity


def fake(module: str, name: str, *bases: type, **attrs: Any) -> type:
    """A class that looks like ``module.name`` to the classifier."""
    return type(name, bases or (Exception,), {"__module__": module, **attrs})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def c(clock: FakeClock) -> Classifier:
    # a high threshold so that repeats never interfere unless a test wants them
    return Classifier(clock=clock, repeat_threshold=1000)


def check(info: ErrorInfo, category: ErrorCategory, kind: ErrorKind, retryable: bool) -> None:
    assert (info.category, info.kind, info.retryable) == (category, kind, retryable), info


# --- builtins ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "ECONNREFUSED"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "ECONNRESET"),
        (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), "ECONNABORTED"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "EPIPE"),
        (ConnectionError("plain"), None),
    ],
)
def test_connection_errors_are_transient(c: Classifier, exc: OSError, code: str | None) -> None:
    info = c.classify(exc)
    check(info, Cat.TRANSIENT, Kind.CONNECTION, True)
    assert info.code == code
    assert info.severity is Sev.LOW


@pytest.mark.parametrize(
    "exc",
    [TimeoutError(), socket.timeout("timed out"), asyncio.TimeoutError()],  # noqa: UP041 - the alias is the point
)
def test_timeouts_are_transient(c: Classifier, exc: BaseException) -> None:
    check(c.classify(exc), Cat.TRANSIENT, Kind.TIMEOUT, True)


def test_py310_style_asyncio_timeout_lookalike(c: Classifier) -> None:
    exc = fake("asyncio.exceptions", "TimeoutError")()
    check(c.classify(exc), Cat.TRANSIENT, Kind.TIMEOUT, True)


def test_memory_error(c: Classifier) -> None:
    info = c.classify(MemoryError())
    check(info, Cat.RESOURCE_EXHAUSTION, Kind.MEMORY, False)
    assert info.severity is Sev.HIGH


@pytest.mark.parametrize(
    ("name", "category", "kind", "retryable"),
    [
        ("ECONNREFUSED", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("ECONNRESET", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("ECONNABORTED", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("EPIPE", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("ETIMEDOUT", Cat.TRANSIENT, Kind.TIMEOUT, True),
        ("EHOSTUNREACH", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("ENETUNREACH", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("EAGAIN", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("EMFILE", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, False),
        ("ENFILE", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, False),
        ("ENOSPC", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, False),
        ("ENOMEM", Cat.RESOURCE_EXHAUSTION, Kind.MEMORY, False),
        ("ENOENT", Cat.CONFIGURATION, Kind.OTHER, False),
        ("EACCES", Cat.CONFIGURATION, Kind.AUTH, False),
        ("EPERM", Cat.CONFIGURATION, Kind.AUTH, False),
    ],
)
def test_oserror_by_errno(
    c: Classifier, name: str, category: ErrorCategory, kind: ErrorKind, retryable: bool
) -> None:
    number = getattr(errno, name)
    info = c.classify(OSError(number, "boom"))  # OSError() picks the subclass for some errnos
    check(info, category, kind, retryable)
    assert info.code == errno.errorcode[number]


def test_dns_failures(c: Classifier) -> None:
    if not hasattr(socket, "EAI_AGAIN"):
        pytest.skip("no EAI_AGAIN on this platform")
    again = c.classify(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    check(again, Cat.TRANSIENT, Kind.CONNECTION, True)
    assert again.code == "EAI_AGAIN"
    unknown = c.classify(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    check(unknown, Cat.CONFIGURATION, Kind.CONNECTION, False)


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), GeneratorExit()]
)
def test_cancellation_is_never_retryable(c: Classifier, exc: BaseException) -> None:
    info = c.classify(exc)
    assert info.kind is Kind.CANCELLED and info.retryable is False
    # not even a user rule, nor a dependency failure in its context, can make it retryable
    c.add_rule(Rule(on=BaseException, retryable=True))
    try:
        raise ConnectionRefusedError("db down")
    except ConnectionRefusedError as cause:
        exc.__context__ = cause
    info = c.classify(exc)
    assert info.kind is Kind.CANCELLED and info.retryable is False


@pytest.mark.parametrize("exc", [ValueError("x"), TypeError("x"), KeyError("x"), AttributeError()])
def test_programming_errors_are_invalid_requests(c: Classifier, exc: BaseException) -> None:
    info = c.classify(exc)
    check(info, Cat.INVALID_REQUEST, Kind.OTHER, False)
    assert info.severity is Sev.MEDIUM


def test_anything_else_is_unknown(c: Classifier) -> None:
    info = c.classify(RuntimeError("weird"))
    check(info, Cat.UNKNOWN, Kind.OTHER, False)
    assert info.severity is Sev.MEDIUM
    assert info.error_type == "RuntimeError"


def test_error_type_is_qualified_outside_builtins(c: Classifier) -> None:
    cls = fake("redis.exceptions", "ConnectionError")
    assert c.classify(cls()).error_type == "redis.exceptions.ConnectionError"
    assert c.classify(ConnectionRefusedError()).error_type == "ConnectionRefusedError"


# --- HTTP ----------------------------------------------------------------------------------------


class StatusError(Exception):
    def __init__(self, status: int, headers: Any = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = headers


@pytest.mark.parametrize(
    ("status", "category", "kind", "retryable"),
    [
        (408, Cat.TRANSIENT, Kind.TIMEOUT, True),
        (425, Cat.TRANSIENT, Kind.OTHER, True),
        (429, Cat.RATE_LIMITED, Kind.RATE_LIMIT, True),
        (500, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True),
        (502, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True),
        (503, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True),
        (504, Cat.EXTERNAL_SERVICE, Kind.TIMEOUT, True),
        (501, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, False),
        (505, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, False),
        (401, Cat.CONFIGURATION, Kind.AUTH, False),
        (403, Cat.CONFIGURATION, Kind.AUTH, False),
        (400, Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),
        (404, Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),
        (409, Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),
    ],
)
def test_http_status_table(
    c: Classifier,
    status: int,
    category: ErrorCategory,
    kind: ErrorKind,
    retryable: bool,
) -> None:
    for info in (c.classify(StatusError(status)), c.classify_status(status)):
        check(info, category, kind, retryable)
        assert info.status_code == status and info.code == str(status)
    assert c.classify_status(status).error_type == str(status)


class CaseInsensitiveHeaders:
    """Like httpx.Headers / CIMultiDict: ``get`` ignores case, ``dict()`` does not."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = {k.lower(): v for k, v in items.items()}

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key.lower(), default)


def test_httpx_status_error_lookalike(c: Classifier) -> None:
    response = type("Response", (), {"status_code": 503})()
    response.headers = CaseInsensitiveHeaders({"retry-after": "7"})
    exc = fake("httpx", "HTTPStatusError")("Server error '503'")
    exc.response = response
    info = c.classify(exc)
    check(info, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True)
    assert info.retry_after == 7.0


def test_aiohttp_client_response_error_lookalike(c: Classifier) -> None:
    cls = fake("aiohttp.client_exceptions", "ClientResponseError")
    exc = cls("Too Many Requests")
    exc.status, exc.headers = 429, CaseInsensitiveHeaders({"Retry-After": "3"})
    info = c.classify(exc)
    check(info, Cat.RATE_LIMITED, Kind.RATE_LIMIT, True)
    assert info.retry_after == 3.0


def test_urllib_http_error_with_message_headers(c: Classifier) -> None:
    headers = Message()
    headers["Retry-After"] = "11"
    exc = urllib.error.HTTPError("http://x/", 503, "Service Unavailable", headers, None)
    info = c.classify(exc)
    check(info, Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True)
    assert (info.status_code, info.retry_after) == (503, 11.0)


def test_urllib_url_error_is_classified_by_its_reason(c: Classifier) -> None:
    exc = urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    check(c.classify(exc), Cat.TRANSIENT, Kind.CONNECTION, True)


def test_real_requests_http_error() -> None:
    requests = pytest.importorskip("requests")
    response = requests.Response()
    response.status_code = 429
    response.headers["retry-after"] = "5"
    info = Classifier().classify(requests.HTTPError("429", response=response))
    check(info, Cat.RATE_LIMITED, Kind.RATE_LIMIT, True)
    assert info.retry_after == 5.0


def test_code_attribute_only_counts_on_http_errors(c: Classifier) -> None:
    exc = fake("grpc", "RpcError")("x")
    exc.code = 503
    assert c.classify(exc).status_code is None


# --- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_seconds_in_plain_dict_any_case(c: Classifier) -> None:
    assert c.classify(StatusError(503, {"RETRY-AFTER": "30"})).retry_after == 30.0
    assert c.classify_status(429, {"retry-after": "2"}).retry_after == 2.0


def test_retry_after_http_date_is_relative_to_clock_wall(c: Classifier, clock: FakeClock) -> None:
    when = datetime.fromtimestamp(clock.wall() + 120, tz=timezone.utc)
    headers = {"Retry-After": format_datetime(when, usegmt=True)}
    assert c.classify(StatusError(503, headers)).retry_after == pytest.approx(120.0)
    assert c.classify_status(503, headers).retry_after == pytest.approx(120.0)
    other = FakeClock(wall_start=clock.wall() + 100)
    assert c.classify_status(503, headers, clock=other).retry_after == pytest.approx(20.0)


def _fails_once_with_a_dated_retry_after(clock: FakeClock, seconds: float) -> Any:
    when = datetime.fromtimestamp(clock.wall() + seconds, tz=timezone.utc)
    failures = [StatusError(503, {"Retry-After": format_datetime(when, usegmt=True)})]

    def fetch() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    return fetch


def test_a_policy_reads_a_dated_retry_after_on_its_own_clock() -> None:
    """The process-wide classifier read the date on the system clock, so under a policy's
    ``FakeClock`` (years before today) a date 30 s ahead of it was long past: no wait."""
    from otel_recovery.policies import Retry
    from otel_recovery.recover import RecoveryPolicy

    clock = FakeClock()
    policy = RecoveryPolicy(retry=Retry(2), clock=clock, telemetry=False)
    assert policy.call(_fails_once_with_a_dated_retry_after(clock, 30)) == "ok"
    assert len(clock.sleeps) == 1 and 30.0 <= clock.sleeps[0] < 31.0  # plus up to 1 s of jitter


def test_a_classifier_subclass_without_a_clock_parameter_still_works() -> None:
    """A subclass overriding ``classify(exc, context)`` (written before ``clock=``) is
    called as before, not refused as a classifier bug."""
    from otel_recovery.policies import Retry
    from otel_recovery.recover import RecoveryPolicy

    class Tagging(Classifier):
        def classify(self, exc: BaseException, context: Any = None) -> Any:
            return super().classify(exc, context)

    clock = FakeClock()
    policy = RecoveryPolicy(
        retry=Retry(2), clock=clock, classifier=Tagging(clock=clock), telemetry=False
    )
    assert policy.call(_fails_once_with_a_dated_retry_after(clock, 30)) == "ok"
    assert len(clock.sleeps) == 1 and 30.0 <= clock.sleeps[0] < 31.0  # its own clock: the same


def test_retry_after_date_in_the_past_is_zero(c: Classifier, clock: FakeClock) -> None:
    past = datetime.fromtimestamp(clock.wall() - 3600, tz=timezone.utc)
    headers = {"Retry-After": format_datetime(past, usegmt=True)}
    assert c.classify(StatusError(503, headers)).retry_after == 0.0


@pytest.mark.parametrize("value", ["soon", "", "-5", "Mon, 99 Foo 2024 99:99:99 GMT", "1e400"])
def test_garbage_retry_after_is_none(c: Classifier, value: str) -> None:
    assert c.classify(StatusError(503, {"Retry-After": value})).retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"), [(2.5, 2.5), (timedelta(seconds=9), 9.0), (-1, 0.0)]
)
def test_explicit_retry_after_attribute(c: Classifier, value: Any, expected: float) -> None:
    exc = StatusError(429, {"Retry-After": "100"})
    exc.retry_after = value  # type: ignore[attr-defined]
    assert c.classify(exc).retry_after == expected


# --- redis ---------------------------------------------------------------------------------------

R = "redis.exceptions"
RedisError = fake(R, "RedisError")
RConnectionError = fake(R, "ConnectionError", RedisError)
RTimeoutError = fake(R, "TimeoutError", RedisError)
BusyLoadingError = fake(R, "BusyLoadingError", RConnectionError)
AuthenticationError = fake(R, "AuthenticationError", RConnectionError)
ResponseError = fake(R, "ResponseError", RedisError)
ReadOnlyError = fake(R, "ReadOnlyError", ResponseError)
RedisClusterException = fake(R, "RedisClusterException", Exception)
RedisClusterUnreachableError = fake(R, "RedisClusterUnreachableError", RedisClusterException)


@pytest.mark.parametrize(
    ("exc", "category", "kind", "retryable", "code"),
    [
        (RConnectionError("Error 111 connecting"), Cat.TRANSIENT, Kind.CONNECTION, True, None),
        (RTimeoutError("Timeout reading"), Cat.TRANSIENT, Kind.TIMEOUT, True, None),
        (  # redis-py 8.2: a slot-map refresh reached no node of the cluster
            RedisClusterUnreachableError("Redis Cluster cannot be connected"),
            Cat.TRANSIENT,
            Kind.CONNECTION,
            True,
            None,
        ),
        (BusyLoadingError("loading"), Cat.TRANSIENT, Kind.SERVER_ERROR, True, "LOADING"),
        (ReadOnlyError("You can't write"), Cat.TRANSIENT, Kind.READONLY, True, "READONLY"),
        (ResponseError("READONLY You can't write"), Cat.TRANSIENT, Kind.READONLY, True, "READONLY"),
        (  # a write refused inside a Lua script before Redis 7.0
            ResponseError(
                "Error running script (call to f_0b): @user_script:1: @user_script: 1: "
                "-READONLY You can't write against a read only replica."
            ),
            Cat.TRANSIENT,
            Kind.READONLY,
            True,
            "READONLY",
        ),
        (
            ResponseError("OOM command not allowed"),
            Cat.RESOURCE_EXHAUSTION,
            Kind.MEMORY,
            False,
            "OOM",
        ),
        (
            ResponseError("CLUSTERDOWN The cluster is down"),
            Cat.TRANSIENT,
            Kind.SERVER_ERROR,
            True,
            "CLUSTERDOWN",
        ),
        (
            ResponseError("TRYAGAIN Multiple keys"),
            Cat.TRANSIENT,
            Kind.SERVER_ERROR,
            True,
            "TRYAGAIN",
        ),
        (ResponseError("MOVED 3999 127.0.0.1:6381"), Cat.TRANSIENT, Kind.REDIRECT, True, "MOVED"),
        (ResponseError("ASK 3999 127.0.0.1:6381"), Cat.TRANSIENT, Kind.REDIRECT, True, "ASK"),
        (AuthenticationError("invalid password"), Cat.CONFIGURATION, Kind.AUTH, False, None),
        (
            ResponseError("NOAUTH Authentication required"),
            Cat.CONFIGURATION,
            Kind.AUTH,
            False,
            "NOAUTH",
        ),
        (
            ResponseError("WRONGPASS invalid username-password"),
            Cat.CONFIGURATION,
            Kind.AUTH,
            False,
            "WRONGPASS",
        ),
        (
            ResponseError("WRONGTYPE Operation against a key"),
            Cat.INVALID_REQUEST,
            Kind.CLIENT_ERROR,
            False,
            "WRONGTYPE",
        ),
        (
            ResponseError("unknown command 'FOO'"),
            Cat.INVALID_REQUEST,
            Kind.CLIENT_ERROR,
            False,
            None,
        ),
    ],
)
def test_redis(
    c: Classifier,
    exc: BaseException,
    category: ErrorCategory,
    kind: ErrorKind,
    retryable: bool,
    code: str | None,
) -> None:
    info = c.classify(exc)
    check(info, category, kind, retryable)
    assert info.code == code


def test_valkey_is_treated_like_redis(c: Classifier) -> None:
    exc = fake("valkey.exceptions", "ConnectionError")("down")
    check(c.classify(exc), Cat.TRANSIENT, Kind.CONNECTION, True)


def test_real_redis_classes() -> None:
    exceptions = pytest.importorskip("redis.exceptions")
    c = Classifier()
    check(c.classify(exceptions.ConnectionError("x")), Cat.TRANSIENT, Kind.CONNECTION, True)
    check(c.classify(exceptions.ReadOnlyError("x")), Cat.TRANSIENT, Kind.READONLY, True)
    check(c.classify(exceptions.AuthenticationError("x")), Cat.CONFIGURATION, Kind.AUTH, False)


def _no_reachable_node(cause: BaseException | None) -> BaseException:
    """What redis-py's cluster clients before 8.2 raise when a slot-map refresh reached no
    node: the base class, raised from the last node's error."""
    exceptions = pytest.importorskip("redis.exceptions")
    error = exceptions.RedisClusterException(
        f"Redis Cluster cannot be connected. Please provide at least one reachable node: {cause}"
    )
    error.__cause__ = cause
    return error


def test_a_cluster_that_no_node_answers_is_judged_by_why_before_redis_py_8_2() -> None:
    exceptions = pytest.importorskip("redis.exceptions")
    c = Classifier()
    refused = exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:7000.")
    check(c.classify(_no_reachable_node(refused)), Cat.TRANSIENT, Kind.CONNECTION, True)
    slow = exceptions.TimeoutError("Timeout connecting to server")
    check(c.classify(_no_reachable_node(slow)), Cat.TRANSIENT, Kind.TIMEOUT, True)
    password = exceptions.AuthenticationError("invalid username-password pair")
    check(c.classify(_no_reachable_node(password)), Cat.CONFIGURATION, Kind.AUTH, False)
    check(c.classify(_no_reachable_node(None)), Cat.TRANSIENT, Kind.CONNECTION, True)
    # the base class's other messages keep their verdicts: refusals of the client's own
    # (neither retried nor counted, see the instrumentor) and the rest unknown
    other = exceptions.RedisClusterException("No targets were found to execute GET command on")
    assert c.classify(other).category is Cat.UNKNOWN


def test_a_cluster_that_no_node_answered_stays_a_redis_failure_whatever_its_cause() -> None:
    """Judged by a cause the knowledge base does not count as a dependency's failure (a
    ValueError of the client's settings, anything unknown), the error keeps the Redis
    family's mark, as before it was judged by its cause: an application error raised from
    it is cascading. A chain that loops ends as a connection failure."""
    pytest.importorskip("redis.exceptions")
    c = Classifier()
    for cause in (ValueError("Invalid SSL Certificate Requirements Flag: x"), Exception("?")):
        unreachable = _no_reachable_node(cause)
        assert c.classify(unreachable).kind is Kind.OTHER  # the cause's verdict: no retry
        assert not c.classify(unreachable).retryable
        app = RuntimeError("the cart is unavailable")
        app.__cause__ = unreachable
        assert c.classify(app).category is Cat.CASCADING
    first, second = _no_reachable_node(None), _no_reachable_node(None)
    first.__cause__, second.__cause__ = second, first
    check(c.classify(first), Cat.TRANSIENT, Kind.CONNECTION, True)


# --- PostgreSQL ----------------------------------------------------------------------------------

PsycopgError = fake("psycopg", "Error")
PsycopgOperational = fake("psycopg", "OperationalError", PsycopgError, sqlstate=None)
Psycopg2Error = fake("psycopg2", "Error")
AsyncpgPostgresError = fake("asyncpg.exceptions._base", "PostgresError")


def pg3(sqlstate: str | None, message: str = "pg error") -> BaseException:
    exc = PsycopgOperational(message)
    exc.sqlstate = sqlstate
    return exc


@pytest.mark.parametrize(
    ("sqlstate", "category", "kind", "retryable"),
    [
        ("08006", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("08001", Cat.TRANSIENT, Kind.CONNECTION, True),
        ("40001", Cat.TRANSIENT, Kind.SERIALIZATION, True),
        ("40P01", Cat.TRANSIENT, Kind.SERIALIZATION, True),
        ("53300", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, True),
        ("53100", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, True),
        ("57P01", Cat.TRANSIENT, Kind.SHUTDOWN, True),
        ("57P02", Cat.TRANSIENT, Kind.SHUTDOWN, True),
        ("57P03", Cat.TRANSIENT, Kind.SHUTDOWN, True),
        ("57014", Cat.TRANSIENT, Kind.TIMEOUT, True),
        ("28P01", Cat.CONFIGURATION, Kind.AUTH, False),
        ("42P01", Cat.CONFIGURATION, Kind.SYNTAX, False),
        ("42601", Cat.CONFIGURATION, Kind.SYNTAX, False),
        ("23505", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),
        ("25006", Cat.TRANSIENT, Kind.READONLY, True),
        ("25P03", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # the app idled in a txn
        ("3D000", Cat.CONFIGURATION, Kind.OTHER, False),
        ("3F000", Cat.CONFIGURATION, Kind.OTHER, False),
        ("99999", Cat.UNKNOWN, Kind.OTHER, False),
        # answers of a healthy server about the statement or its transaction
        ("P0001", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # PL/pgSQL RAISE
        ("P0004", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # ASSERT failed
        ("21000", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # two rows for one
        ("25P02", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # in a failed transaction
        ("25001", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # active transaction
        ("3B001", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # no such savepoint
        ("34000", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # no such cursor
        ("2BP01", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # objects depend on it
        ("55006", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # object in use
        ("40002", Cat.INVALID_REQUEST, Kind.CLIENT_ERROR, False),  # constraint at COMMIT
        ("55P03", Cat.TRANSIENT, Kind.RESOURCE, True),  # lock not available: a race
        # failures of the server, or outcomes unknown: counted
        ("40003", Cat.UNKNOWN, Kind.OTHER, False),  # statement completion unknown
        ("XX000", Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, False),
        ("58030", Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, False),
        ("72000", Cat.UNKNOWN, Kind.OTHER, False),  # snapshot too old
        ("HV000", Cat.UNKNOWN, Kind.OTHER, False),  # the foreign server behind a table
    ],
)
def test_sqlstate_table(
    c: Classifier,
    sqlstate: str,
    category: ErrorCategory,
    kind: ErrorKind,
    retryable: bool,
) -> None:
    psycopg2_exc = fake("psycopg2.errors", "X", Psycopg2Error)("x")
    psycopg2_exc.pgcode = sqlstate
    asyncpg_exc = fake("asyncpg.exceptions", "X", AsyncpgPostgresError, sqlstate=sqlstate)("x")
    for exc in (pg3(sqlstate), psycopg2_exc, asyncpg_exc):
        info = c.classify(exc)
        check(info, category, kind, retryable)
        assert info.code == sqlstate


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "10.0.0.3", port 5432 failed: Connection refused',
        "server closed the connection unexpectedly",
        "could not connect to server: No such file or directory",
    ],
)
def test_operational_error_without_sqlstate_is_a_connection_failure(
    c: Classifier, message: str
) -> None:
    check(c.classify(pg3(None, message)), Cat.TRANSIENT, Kind.CONNECTION, True)
    psycopg2_exc = fake("psycopg2", "OperationalError", Psycopg2Error)(message)
    check(c.classify(psycopg2_exc), Cat.TRANSIENT, Kind.CONNECTION, True)


def test_connect_phase_auth_failure_is_configuration(c: Classifier) -> None:
    exc = pg3(None, 'FATAL:  password authentication failed for user "app"')
    check(c.classify(exc), Cat.CONFIGURATION, Kind.AUTH, False)


def test_asyncpg_connection_errors(c: Classifier) -> None:
    base = fake("asyncpg.exceptions._base", "InterfaceError")
    gone = fake("asyncpg.exceptions", "ConnectionDoesNotExistError", base)
    check(c.classify(gone("connection was closed")), Cat.TRANSIENT, Kind.CONNECTION, True)
    check(c.classify(base("connection is closed")), Cat.TRANSIENT, Kind.CONNECTION, True)
    check(
        c.classify(base("another operation is in progress")), Cat.INVALID_REQUEST, Kind.OTHER, False
    )


# --- HTTP client libraries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "category", "kind"),
    [
        ("httpx", "ConnectError", Cat.TRANSIENT, Kind.CONNECTION),
        ("httpx", "ConnectTimeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("httpx", "ReadTimeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("httpx", "WriteTimeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("httpx", "PoolTimeout", Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE),
        ("httpx", "ReadError", Cat.TRANSIENT, Kind.CONNECTION),
        ("httpx", "RemoteProtocolError", Cat.TRANSIENT, Kind.CONNECTION),
        ("httpx", "NetworkError", Cat.TRANSIENT, Kind.CONNECTION),
        ("requests.exceptions", "ConnectionError", Cat.TRANSIENT, Kind.CONNECTION),
        ("requests.exceptions", "ConnectTimeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("requests.exceptions", "ReadTimeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("requests.exceptions", "Timeout", Cat.TRANSIENT, Kind.TIMEOUT),
        ("requests.exceptions", "ChunkedEncodingError", Cat.TRANSIENT, Kind.CONNECTION),
        ("aiohttp.client_exceptions", "ClientConnectorError", Cat.TRANSIENT, Kind.CONNECTION),
        ("aiohttp.client_exceptions", "ServerDisconnectedError", Cat.TRANSIENT, Kind.CONNECTION),
        ("aiohttp.client_exceptions", "ClientOSError", Cat.TRANSIENT, Kind.CONNECTION),
        ("aiohttp.client_exceptions", "ServerTimeoutError", Cat.TRANSIENT, Kind.TIMEOUT),
        ("aiohttp.client_exceptions", "ClientPayloadError", Cat.TRANSIENT, Kind.CONNECTION),
    ],
)
def test_http_client_lookalikes(
    c: Classifier, module: str, name: str, category: ErrorCategory, kind: ErrorKind
) -> None:
    check(c.classify(fake(module, name)("boom")), category, kind, True)


def test_closest_class_in_the_mro_wins(c: Classifier) -> None:
    timeout = fake("httpx", "TimeoutException")
    pool = fake("httpx", "PoolTimeout", timeout)
    custom = fake("myapp.http", "MyPoolTimeout", pool)
    check(c.classify(custom("x")), Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, True)


def test_real_requests_exceptions() -> None:
    requests = pytest.importorskip("requests")
    c = Classifier()
    check(
        c.classify(requests.exceptions.ConnectionError("x")), Cat.TRANSIENT, Kind.CONNECTION, True
    )
    check(c.classify(requests.exceptions.ConnectTimeout("x")), Cat.TRANSIENT, Kind.TIMEOUT, True)
    check(c.classify(requests.exceptions.ReadTimeout("x")), Cat.TRANSIENT, Kind.TIMEOUT, True)
    check(
        c.classify(requests.exceptions.ChunkedEncodingError("x")),
        Cat.TRANSIENT,
        Kind.CONNECTION,
        True,
    )


def test_real_httpx_exceptions() -> None:
    httpx = pytest.importorskip("httpx")
    c = Classifier()
    check(c.classify(httpx.ConnectError("x")), Cat.TRANSIENT, Kind.CONNECTION, True)
    check(c.classify(httpx.PoolTimeout("x")), Cat.RESOURCE_EXHAUSTION, Kind.RESOURCE, True)


# --- circuit breaker -----------------------------------------------------------------------------


def test_circuit_open_error(c: Classifier) -> None:
    cls = fake("otel_recovery.policies.circuit_breaker", "CircuitOpenError")
    exc = cls("circuit 'db' is open")
    exc.retry_after = 12.5
    info = c.classify(exc)
    check(info, Cat.CASCADING, Kind.CIRCUIT_OPEN, False)
    assert info.retry_after == 12.5


# --- context -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("criticality", "expected"),
    [("low", Sev.LOW), ("normal", Sev.MEDIUM), ("high", Sev.HIGH), ("critical", Sev.CRITICAL)],
)
def test_criticality_shifts_severity(c: Classifier, criticality: str, expected: Severity) -> None:
    info = c.classify(RuntimeError("x"), {"criticality": criticality, "service_id": "db"})
    assert info.severity is expected


def test_criticality_caps_at_the_ends(c: Classifier) -> None:
    assert c.classify(ConnectionError(), {"criticality": "low"}).severity is Sev.LOW
    assert c.classify(MemoryError(), {"criticality": "critical"}).severity is Sev.CRITICAL


def test_bad_criticality_is_rejected_with_the_accepted_values(c: Classifier) -> None:
    with pytest.raises(ValueError, match=r"criticality.*'low', 'normal', 'high', 'critical'"):
        c.classify(RuntimeError(), {"criticality": "urgent"})


# --- repeats -------------------------------------------------------------------------------------


def test_repeats_raise_severity_and_decay(clock: FakeClock) -> None:
    c = Classifier(clock=clock, repeat_threshold=3, repeat_window=10.0)
    severities = []
    for _ in range(30):
        severities.append(c.classify(ConnectionRefusedError("refused")).severity)
        clock.advance(0.1)
    assert severities[:2] == [Sev.LOW, Sev.LOW]
    assert severities[2] is Sev.MEDIUM  # 3rd occurrence within the window
    assert severities[28] is Sev.MEDIUM
    assert severities[29] is Sev.HIGH  # 30 = 10x threshold
    clock.advance(10.0)  # the window has passed: back to the base severity
    assert c.classify(ConnectionRefusedError("refused")).severity is Sev.LOW


def test_repeats_count_per_fingerprint(clock: FakeClock) -> None:
    c = Classifier(clock=clock, repeat_threshold=2)
    c.classify(ConnectionRefusedError("a"))
    assert c.classify(TimeoutError("b")).severity is Sev.LOW
    assert c.classify(ConnectionRefusedError("a")).severity is Sev.MEDIUM


def test_tracked_fingerprints_are_bounded(clock: FakeClock) -> None:
    c = Classifier(clock=clock, repeat_threshold=2, max_tracked_fingerprints=2)
    c.classify(RuntimeError("a"))
    c.classify(ValueError("b"))
    c.classify(KeyError("c"))  # evicts the oldest, RuntimeError("a")
    assert c.classify(RuntimeError("a")).severity is Sev.MEDIUM  # counted afresh: 1st again
    assert c.classify(KeyError("c")).severity is Sev.HIGH  # still tracked: 2nd


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeat_threshold": 0}, "repeat_threshold"),
        ({"max_tracked_fingerprints": 0}, "max_tracked_fingerprints"),
        ({"repeat_window": 0}, "repeat_window"),
        ({"repeat_window": -1}, "repeat_window"),
    ],
)
def test_classifier_validates_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Classifier(**kwargs)


def test_repeat_window_accepts_timedelta(clock: FakeClock) -> None:
    c = Classifier(clock=clock, repeat_threshold=2, repeat_window=timedelta(seconds=5))
    c.classify(RuntimeError("x"))
    clock.advance(6)
    assert c.classify(RuntimeError("x")).severity is Sev.MEDIUM


# --- cascading and groups ------------------------------------------------------------------------


def test_explicit_cause_makes_it_cascading(c: Classifier) -> None:
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except ConnectionRefusedError as exc:
            raise RuntimeError("could not load user") from exc
    except RuntimeError as exc:
        info = c.classify(exc)
    check(info, Cat.CASCADING, Kind.CONNECTION, True)
    assert info.code == "ECONNREFUSED"
    assert info.error_type == "RuntimeError"


def test_implicit_context_and_non_retryable_cause(c: Classifier) -> None:
    try:
        try:
            raise StatusError(501)
        except StatusError:
            raise KeyError("user")  # noqa: B904 - implicit __context__ on purpose
    except KeyError as exc:
        info = c.classify(exc)
    check(info, Cat.CASCADING, Kind.SERVER_ERROR, False)
    assert info.status_code == 501


def test_deep_chain_and_redis_cause(c: Classifier) -> None:
    root = RConnectionError("down")
    middle = ValueError("parse")
    middle.__cause__ = root
    top = RuntimeError("top")
    top.__cause__ = middle
    check(c.classify(top), Cat.CASCADING, Kind.CONNECTION, True)


def test_non_dependency_cause_is_not_cascading(c: Classifier) -> None:
    top = RuntimeError("x")
    top.__cause__ = ValueError("y")
    assert c.classify(top).category is Cat.UNKNOWN


def test_dependency_failure_itself_is_not_cascading(c: Classifier) -> None:
    top = TimeoutError("x")
    top.__cause__ = ConnectionRefusedError("y")
    assert c.classify(top).category is Cat.TRANSIENT


def test_cycles_in_the_chain_terminate(c: Classifier) -> None:
    a, b = RuntimeError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert c.classify(a).category is Cat.UNKNOWN
    a.__context__ = a
    assert c.classify(a).category is Cat.UNKNOWN


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is 3.11+")
def test_exception_group_uses_first_dependency_failure(c: Classifier) -> None:
    group_cls: Any = getattr(builtins, "ExceptionGroup")
    group = group_cls("many", [ValueError("v"), TimeoutError("t"), ConnectionRefusedError("c")])
    info = c.classify(group)
    check(info, Cat.TRANSIENT, Kind.TIMEOUT, True)
    assert info.error_type == "ExceptionGroup"
    assert c.classify(group_cls("many", [ValueError("v"), KeyError("k")])).category is Cat.UNKNOWN
    nested = group_cls("outer", [ValueError("v"), group_cls("inner", [StatusError(503)])])
    check(c.classify(nested), Cat.EXTERNAL_SERVICE, Kind.SERVER_ERROR, True)


def test_exception_group_lookalike_from_backport(c: Classifier) -> None:
    cls = fake("exceptiongroup", "ExceptionGroup")
    group = cls("x")
    group.exceptions = (RuntimeError("r"), RConnectionError("down"))
    check(c.classify(group), Cat.TRANSIENT, Kind.CONNECTION, True)


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_groups_variable_parts() -> None:
    a = "Connection refused to 10.0.0.3:5432 after 312 ms (id 7f3a9c2e-1b2c-4d5e-8f90-123456789abc)"
    b = "Connection refused to 10.0.0.4:5432 after 298 ms (id 0a1b2c3d-4e5f-4a6b-9c8d-abcdefabcdef)"
    assert normalise_message(a) == "connection refused to <addr> after <num> ms (id <uuid>)"
    assert fingerprint("ConnectionRefusedError", "ECONNREFUSED", a) == fingerprint(
        "ConnectionRefusedError", "ECONNREFUSED", b
    )
    c = Classifier()
    assert (
        c.classify(ConnectionRefusedError(a)).fingerprint
        == c.classify(ConnectionRefusedError(b)).fingerprint
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('relation "users" does not exist', "relation <str> does not exist"),
        ("can't reach 'db-1'", "can't reach <str>"),
        ("object at 0x7f3a9c2e10 freed", "object at <hex> freed"),
        ("token=deadbeefcafe1234 bad", "token=*** bad"),
        ("digest deadbeefcafe1234 bad", "digest <hex> bad"),
        ("peer [2001:db8::1]:8080 gone", "peer <addr> gone"),
        ("peer fe80::1 gone", "peer <addr> gone"),
        ("host db.internal:5432 down", "host <addr> down"),
        ("  Many   SPACES\n", "many spaces"),
        ("took 9999999 ms", "took <num> ms"),
        ("took 10000000 ms", "took <num> ms"),
    ],
)
def test_normalise_message(message: str, expected: str) -> None:
    assert normalise_message(message) == expected


def test_fingerprint_differs_for_different_errors() -> None:
    base = fingerprint("ConnectionRefusedError", "ECONNREFUSED", "refused")
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert fingerprint("TimeoutError", "ECONNREFUSED", "refused") != base
    assert fingerprint("ConnectionRefusedError", "ECONNRESET", "refused") != base
    assert fingerprint("ConnectionRefusedError", "ECONNREFUSED", "reset by peer") != base
    assert fingerprint("ConnectionRefusedError", "ECONNREFUSED", "refused") == base


# --- rules ---------------------------------------------------------------------------------------


class PaymentDeclined(Exception):
    pass


def test_rule_beats_builtin_and_keeps_unset_fields(c: Classifier) -> None:
    c.add_rule(Rule(on=ConnectionRefusedError, retryable=False))
    info = c.classify(ConnectionRefusedError("x"))
    check(info, Cat.TRANSIENT, Kind.CONNECTION, False)  # only retryable changed


def test_first_matching_rule_wins_and_first_inserts_in_front(c: Classifier) -> None:
    c.add_rule(Rule(on=PaymentDeclined, category=Cat.INVALID_REQUEST))
    c.add_rule(Rule(on=PaymentDeclined, category=Cat.EXTERNAL_SERVICE))
    assert c.classify(PaymentDeclined()).category is Cat.INVALID_REQUEST
    c.add_rule(Rule(on=PaymentDeclined, category=Cat.RATE_LIMITED), first=True)
    assert c.classify(PaymentDeclined()).category is Cat.RATE_LIMITED


def test_rule_matchers(c: Classifier) -> None:
    c = Classifier(
        [
            Rule(status=[418], category=Cat.TRANSIENT, retryable=True),
            Rule(code="wrongtype", severity=Sev.LOW),
            Rule(message=r"quota exceeded", category=Cat.RATE_LIMITED, kind=Kind.RATE_LIMIT),
            Rule(on=PaymentDeclined, when=lambda e: "card" in str(e), severity="critical"),  # type: ignore[arg-type]
        ]
    )
    check(c.classify(StatusError(418)), Cat.TRANSIENT, Kind.CLIENT_ERROR, True)
    check(c.classify_status(418), Cat.TRANSIENT, Kind.CLIENT_ERROR, True)
    assert c.classify(ResponseError("WRONGTYPE Operation")).severity is Sev.LOW
    check(
        c.classify(RuntimeError("daily quota exceeded")), Cat.RATE_LIMITED, Kind.RATE_LIMIT, False
    )
    assert c.classify(PaymentDeclined("card expired")).severity is Sev.CRITICAL
    assert c.classify(PaymentDeclined("bank offline")).severity is Sev.MEDIUM


def test_rule_can_make_a_custom_error_a_dependency_for_cascading(c: Classifier) -> None:
    class ServiceDown(Exception):
        pass

    c.add_rule(Rule(on=ServiceDown, category=Cat.EXTERNAL_SERVICE, retryable=True))
    top = RuntimeError("x")
    top.__cause__ = ServiceDown()
    info = c.classify(top)
    assert (info.category, info.retryable) == (Cat.CASCADING, True)


def test_broken_rule_predicate_is_ignored(c: Classifier) -> None:
    def boom(exc: BaseException) -> bool:
        raise RuntimeError("bug in predicate")

    c.add_rule(Rule(when=boom, retryable=True))
    assert c.classify(ValueError("x")).retryable is False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"retryable": True}, ValueError, "at least one matcher"),
        ({"on": ValueError}, ValueError, "no outcome"),
        ({"on": int, "retryable": True}, TypeError, r"on=.*exception class"),
        ({"on": (ValueError, "x"), "retryable": True}, TypeError, r"on="),
        ({"on": (), "retryable": True}, ValueError, r"on=\(\)"),
        ({"message": "(unclosed", "retryable": True}, ValueError, r"message=.*regex"),
        ({"status": 999, "retryable": True}, ValueError, r"status="),
        ({"status": "503", "retryable": True}, TypeError, r"status="),
        ({"code": [], "retryable": True}, ValueError, r"code=.*empty"),
        ({"on": ValueError, "category": "bogus"}, ValueError, r"category=.*'transient'"),
        ({"on": ValueError, "retryable": "yes"}, TypeError, r"retryable="),
        ({"when": 3, "retryable": True}, TypeError, r"when="),
    ],
)
def test_rule_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Rule(**kwargs)


def test_rule_accepts_enum_values_as_strings() -> None:
    rule = Rule(on=ValueError, category="transient", severity="HIGH", kind="timeout")  # type: ignore[arg-type]
    assert (rule.category, rule.severity, rule.kind) == (Cat.TRANSIENT, Sev.HIGH, Kind.TIMEOUT)


def test_add_rule_type_checks(c: Classifier) -> None:
    with pytest.raises(TypeError, match="Rule"):
        c.add_rule("not a rule")  # type: ignore[arg-type]


# --- ErrorInfo, Severity, module functions, robustness ------------------------------------------


def test_to_attributes(c: Classifier) -> None:
    info = c.classify(StatusError(503, {"Retry-After": "4"}))
    assert info.to_attributes() == {
        "otel_recovery.error.category": "external_service",
        "otel_recovery.error.severity": "medium",
        "otel_recovery.error.fingerprint": info.fingerprint,
        "otel_recovery.error.retryable": True,
        "otel_recovery.error.kind": "server_error",
        "error.type": "test_classify.StatusError",
        "otel_recovery.error.retry_after": 4.0,
        "otel_recovery.error.code": "503",
    }
    plain = c.classify(RuntimeError()).to_attributes()
    assert "otel_recovery.error.retry_after" not in plain
    assert "otel_recovery.error.code" not in plain


def test_enum_values() -> None:
    assert [m.value for m in Cat] == [m.name.lower() for m in Cat]
    assert [m.value for m in Sev] == ["low", "medium", "high", "critical"]
    assert [m.value for m in Kind] == [m.name.lower() for m in Kind]


def test_severity_rank_raised_and_ordering() -> None:
    assert [s.rank for s in Sev] == [0, 1, 2, 3]
    assert Sev.LOW.raised(1) is Sev.MEDIUM
    assert Sev.HIGH.raised(5) is Sev.CRITICAL
    assert Sev.MEDIUM.raised(-3) is Sev.LOW
    assert Sev.LOW < Sev.MEDIUM < Sev.HIGH < Sev.CRITICAL
    assert max(Sev.CRITICAL, Sev.HIGH) is Sev.CRITICAL
    assert Sev.CRITICAL >= Sev.HIGH and Sev.LOW <= Sev.LOW


def test_message_is_truncated(c: Classifier) -> None:
    assert len(c.classify(RuntimeError("x" * 5000)).message) == 512


def test_module_functions_use_the_default_classifier(clock: FakeClock) -> None:
    previous = get_default_classifier()
    mine = Classifier([Rule(on=PaymentDeclined, retryable=True)], clock=clock)
    set_default_classifier(mine)
    try:
        assert classify(PaymentDeclined()).retryable is True
        when = datetime.fromtimestamp(clock.wall() + 60, tz=timezone.utc)
        info = classify_status(503, {"Retry-After": format_datetime(when, usegmt=True)})
        assert info.retry_after == pytest.approx(60.0)
    finally:
        set_default_classifier(previous)
    assert get_default_classifier() is previous
    with pytest.raises(TypeError):
        set_default_classifier(object())  # type: ignore[arg-type]


def test_bad_inputs_raise_clear_errors(c: Classifier) -> None:
    with pytest.raises(TypeError, match="exception"):
        c.classify("not an exception")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="100..599"):
        c.classify_status(99)
    with pytest.raises(TypeError):
        c.classify_status(True)


def test_hostile_exceptions_do_not_break_classification(c: Classifier) -> None:
    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

        @property
        def status_code(self) -> int:
            raise RuntimeError("no")

        @property
        def headers(self) -> Any:
            raise RuntimeError("no")

    info = c.classify(BadStr())
    assert info.category is Cat.UNKNOWN
    assert info.message == "<unprintable BadStr>"


def test_plain_2xx_status_is_not_retryable(c: Classifier) -> None:
    info = c.classify_status(200)
    assert (info.category, info.retryable, info.severity) == (Cat.UNKNOWN, False, Sev.LOW)


def test_an_error_type_is_named_where_its_library_exports_it():
    """``asyncpg.exceptions._base.InterfaceError`` on our metric, ``InterfaceError`` on
    contrib's span: a private module path is an implementation detail, and differed between
    a span and its metric."""
    import asyncpg
    import httpx

    assert classify(asyncpg.exceptions.InterfaceError("x")).error_type == (
        "asyncpg.exceptions.InterfaceError"
    )
    assert classify(httpx.ConnectError("x")).error_type == "httpx.ConnectError"
    assert classify(ValueError("x")).error_type == "ValueError"


@pytest.mark.parametrize("delegating", ["http", "postgres", "interaction"])
def test_a_replaced_default_classifier_without_a_clock_parameter_still_decides(delegating):
    """The instrumentors' classifiers delegate to the process-wide one, and passed it
    ``clock=`` unconditionally: a user's default written as ``classify(exc, context)``
    raised, and every instrumented failure was classified UNKNOWN and never retried."""
    from otel_recovery.classify import get_default_classifier, set_default_classifier
    from otel_recovery.instrumentors._http import ResponseClassifier
    from otel_recovery.instrumentors._pg_errors import PostgresClassifier
    from otel_recovery.interaction import ErrorRecoveryInteraction
    from otel_recovery.policies import Retry
    from otel_recovery.recover import RecoveryPolicy
    from otel_recovery.stores import MemoryStore

    class Tagging(Classifier):
        def classify(self, exc: BaseException, context: Any = None) -> Any:
            return super().classify(exc, context)

    clock = FakeClock()
    previous = get_default_classifier()
    set_default_classifier(Tagging(clock=clock))
    try:
        if delegating == "interaction":
            recovery = ErrorRecoveryInteraction(clock=clock, store=MemoryStore(), telemetry=False)
            result = asyncio.run(
                recovery.recover_from_error(
                    ConnectionError("reset"), {"retry_func": lambda: "ok", "service_id": "s"}
                )
            )
            assert result["recovery_status"] == "success"
            return
        own = ResponseClassifier(clock) if delegating == "http" else PostgresClassifier()
        policy = RecoveryPolicy(retry=Retry(2), classifier=own, clock=clock, telemetry=False)
        failures = [ConnectionError("reset")]

        def flaky() -> str:
            if failures:
                raise failures.pop()
            return "ok"

        assert policy.call(flaky) == "ok"
    finally:
        set_default_classifier(previous)
