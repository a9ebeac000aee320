"""Which server a PostgreSQL connect or statement counts on (its "target"), for psycopg and
asyncpg: read as each driver reads its connection string, one spelling for connects and
statements, and never a name made of a password.

The connect/statement pairs against the real server are in test_psycopg.py and
test_asyncpg.py; here: the parsing itself, and the end-to-end check that a malformed DSN puts
no part of its password into a breaker name, a metric attribute, a span or a log record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import require_postgres

from otel_recovery.instrumentors import _asyncpg_targets, _pg_targets, _wrapping
from otel_recovery.instrumentors import psycopg as psycopg_module
from otel_recovery.instrumentors._asyncpg_targets import dsn_target
from otel_recovery.instrumentors._settings import load_settings
from otel_recovery.instrumentors.asyncpg import AsyncPGRecoveryInstrumentor
from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor

SECRETS = ("Sup3r", "S3cret", "4242")
"""Pieces of the passwords below: none may appear in any name we make."""
SOCKETS = os.path.realpath("/var/run/postgresql")
"""The target of a /var/run/postgresql socket: its directory's real path."""

MALFORMED = [
    # an unescaped "#", "/" or "?" ends the URL's authority inside the password
    "postgresql://postgres:Sup3rS3cret#x@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3rS3cret/x@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3rS3cret?x@127.0.0.1:5432/test",
    # ... and where the password's head is a number, it reads as a port
    "postgresql://localhost:4242#Sup3rS3cret@127.0.0.1:5432/test",
    "postgresql://localhost:4242/Sup3rS3cret@127.0.0.1:5432/test",
    "postgresql://localhost:4242?Sup3rS3cret@127.0.0.1:5432/test",
    # an unescaped "@": the password's tail reads as the host
    "postgresql://postgres:Sup3r@S3cret@127.0.0.1:5432/test",
    "postgresql://postgres:4242@Sup3rS3cret@127.0.0.1:5432/test",
    # ... followed by a "/", "#" or "?": one "@" left in the authority, the tail the host
    "postgresql://postgres:Sup3r@S3cret/x@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3r@S3cret#x@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3r@S3cret?x@127.0.0.1:5432/test",
    # a bad %-escape, a list that does not match
    "postgresql://postgres:Sup3r%zzS3cret@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3rS3cret@127.0.0.1,127.0.0.2:5432/test?port=1,2,3",
]
WELL_FORMED = [
    # what a password may hold unescaped where the drivers still read the URL right
    "postgresql://postgres:Sup3r,S3cret@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3r:S3cret@127.0.0.1:5432/test",
    "postgresql://postgres:Sup3r%40S3cret@127.0.0.1:5432/test",
]


def _psycopg_target(conninfo: str) -> tuple[str, int | None] | None:
    try:
        return psycopg_module._connect_target((conninfo,), {})
    except psycopg.ProgrammingError:
        return None


@pytest.mark.parametrize("dsn", MALFORMED + WELL_FORMED)
def test_no_target_is_named_after_a_password(dsn: str) -> None:
    for target in (dsn_target(dsn, None, None), _psycopg_target(dsn)):
        assert not any(secret in str(target) for secret in SECRETS), (dsn, target)
    if dsn in WELL_FORMED:
        assert dsn_target(dsn, None, None) == ("127.0.0.1", 5432)
        assert _psycopg_target(dsn) == ("127.0.0.1", 5432)


def _texts(attributes: Any) -> list[str]:
    """The attribute values as text, but for floats: a float is a measurement (a duration),
    whose digits spell "4242" by chance (0.0037424250003823545 once did); a port taken
    from a password is an int, and is kept."""
    return [str(value) for value in (attributes or {}).values() if not isinstance(value, float)]


def _everything_named(
    reader: InMemoryMetricReader, exporter: InMemorySpanExporter, *instrumentors: Any
) -> list[str]:
    """Every breaker name, metric attribute value, span name and span attribute value."""
    named: list[str] = []
    for instrumentor in instrumentors:
        named += [breaker.name for breaker in instrumentor.targets.breakers()]
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    named += _texts(point.attributes)
    for span in exporter.get_finished_spans():
        named.append(span.name)
        named += _texts(span.attributes)
        for event in span.events:
            named += _texts(event.attributes)
    return named


@pytest.fixture
def instrumented() -> Iterator[tuple[InMemoryMetricReader, InMemorySpanExporter, list[Any]]]:
    require_postgres()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    ours: list[Any] = [PsycopgRecoveryInstrumentor(), AsyncPGRecoveryInstrumentor()]
    try:
        for instrumentor in ours:
            instrumentor.instrument(meter_provider=meters, tracer_provider=tracers, max_attempts=1)
        yield reader, exporter, ours
    finally:
        for instrumentor in ours:
            instrumentor.uninstrument()
        tracers.shutdown()
        meters.shutdown()


async def test_a_malformed_dsn_leaves_no_part_of_its_password_anywhere(
    instrumented: tuple[InMemoryMetricReader, InMemorySpanExporter, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connect with each (they fail, in the drivers' own words, or reach a port nothing
    listens on), then look at everything we named: breakers, metrics, spans, our log."""
    reader, exporter, ours = instrumented
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.DEBUG, logger="otel_recovery"):
        for dsn in MALFORMED:
            with contextlib.suppress(Exception):
                connection = await asyncio.wait_for(asyncpg.connect(dsn, timeout=3), 5)
                await connection.close()
            with contextlib.suppress(Exception):
                psycopg.connect(dsn, connect_timeout=3).close()
    named = _everything_named(reader, exporter, *ours)
    assert not [text for text in named if any(secret in text for secret in SECRETS)]
    assert not any(secret in caplog.text for secret in SECRETS)


# -- several hosts --------------------------------------------------------------------------


def test_several_hosts_are_one_target_named_by_the_whole_list() -> None:
    """A dead member's circuit must never refuse the connect that fails over past it."""
    connect = psycopg_module._connect_target
    assert connect(("host=a,b port=5433,5432",), {}) == ("a:5433,b:5432", None)
    assert connect(("host=a,b port=5433",), {}) == ("a:5433,b:5433", None)
    assert connect(("postgresql://u@a:1,b/d",), {}) == ("a:1,b:5432", None)
    assert connect(("host=a,a port=5433",), {}) == ("a", 5433)  # one server after all
    assert connect(("host=db.x,db.y hostaddr=10.0.0.1,10.0.0.2",), {}) == (
        "db.x:5432,db.y:5432",
        None,
    )  # conn.info.host names the host, not its address
    assert connect(("host=a,b port=1,2,3",), {}) is None  # psycopg's own error

    assert dsn_target("postgres://u@h1:1,h2:2/d", None, None) == ("h1:1,h2:2", None)
    assert dsn_target(None, ["h1", "h2"], [5433, 5432]) == ("h1:5433,h2:5432", None)
    assert dsn_target(None, ["h1", "h2"], 5433) == ("h1:5433,h2:5433", None)
    assert dsn_target("postgres:///d?host=h1,h2&port=1,2", None, None) == ("h1:1,h2:2", None)
    assert dsn_target(None, ["h1", "h2"], [1, 2, 3]) is None  # asyncpg's own error


# -- one spelling for connects and statements ----------------------------------------------


def test_a_socket_path_is_its_directory_and_port() -> None:
    socket = _pg_targets.pg_socket_target
    assert socket("/run/postgresql/.s.PGSQL.5432") == ("/run/postgresql", 5432)
    assert socket("/tmp/.s.PGSQL.6000") == ("/tmp", 6000)
    assert socket("/.s.PGSQL.1") == ("/", 1)
    assert socket("/run/odd") == ("/run/odd", None)
    # a socket directory is named by its real path (where /var/run links to /run, as on
    # Debian, asyncpg's default /run/postgresql and libpq's /var/run/postgresql are one)
    assert _pg_targets.pg_host("/var/run/postgresql/") == SOCKETS
    assert _pg_targets.pg_host("/") == "/"
    assert _pg_targets.pg_target([("/tmp/", 5432), ("/tmp", 5432)]) == ("/tmp", 5432)


class _Connection:
    __slots__ = ("_addr",)

    def __init__(self, address: Any) -> None:
        self._addr = address


def test_asyncpg_statements_count_where_the_connect_did() -> None:
    statement = _asyncpg_targets.connection_target
    assert statement(_Connection(("127.0.0.1", 5432))) == ("127.0.0.1", 5432)
    assert statement(_Connection("/var/run/postgresql/.s.PGSQL.5432")) == (SOCKETS, 5432)
    for dsn, host, port in [
        ("postgresql://postgres@/test?host=/var/run/postgresql", None, None),
        ("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/test", None, None),
        ("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql:5432/test", None, None),
        (None, "/var/run/postgresql/", 5432),
        (None, "/var/run/postgresql", "5432"),
    ]:
        assert dsn_target(dsn, host, port) == (SOCKETS, 5432), (dsn, host)


def test_asyncpg_without_a_host_targets_the_socket_it_will_find(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """asyncpg tries /run/postgresql, /var/run/postgresql, /tmp, /private/tmp, then
    localhost: a directory without the server's socket fails at once."""
    for variable in ("PGHOST", "PGPORT"):
        monkeypatch.delenv(variable, raising=False)
    here = {"/tmp/.s.PGSQL.6123"}
    monkeypatch.setattr(_asyncpg_targets.os.path, "exists", lambda path: path in here)
    assert dsn_target("postgresql://u@/d", None, 6123) == ("/tmp", 6123)
    assert dsn_target(None, None, 6124) == ("localhost", 6124)
    monkeypatch.setenv("PGPORT", "6123")
    assert dsn_target(None, None, None) == ("/tmp", 6123)
    monkeypatch.setenv("PGHOST", "db.example")
    assert dsn_target(None, None, None) == ("db.example", 6123)


def test_psycopg_without_a_host_targets_libpqs_default_socket_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq's compiled default, as ``conn.info.host`` reports it after connecting."""
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    default = psycopg_module._default_host()
    assert default.startswith("/") or default == "localhost"
    named = _pg_targets.pg_host(default)
    assert psycopg_module._connect_target(("user=u dbname=d",), {}) == (named, 5432)
    assert psycopg_module._connect_target(("postgresql:///d",), {"port": 6000}) == (named, 6000)
    monkeypatch.setenv("PGHOST", "db.example,db2.example")
    monkeypatch.setenv("PGPORT", "6000")
    assert psycopg_module._connect_target(("user=u",), {}) == (
        "db.example:6000,db2.example:6000",
        None,
    )


# -- service files ----------------------------------------------------------------------------

SERVICES = """\
# the services of this test
[analytics]
host=10.1.1.1
port=5433
dbname=a

[prod]
host=/var/run/postgresql
port=5432
[replicas]
host=r1,r2
"""


def test_a_service_is_resolved_through_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two services never share the connect breaker of ``localhost:5432``."""
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE", "PGSYSCONFDIR"):
        monkeypatch.delenv(variable, raising=False)
    services = tmp_path / "services.conf"
    services.write_text(SERVICES)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    connect = psycopg_module._connect_target
    assert connect(("service=analytics",), {}) == ("10.1.1.1", 5433)
    assert connect(("service=prod user=u",), {}) == (SOCKETS, 5432)
    assert connect(("service=replicas",), {}) == ("r1:5432,r2:5432", None)
    assert connect(("service=analytics host=other",), {}) == ("other", 5433)  # given wins
    assert connect(("postgresql:///d?service=analytics",), {}) == ("10.1.1.1", 5433)
    monkeypatch.setenv("PGSERVICE", "analytics")
    assert connect(("user=u",), {}) == ("10.1.1.1", 5433)
    monkeypatch.setenv("PGHOST", "ignored")  # the service file beats the environment
    assert connect(("user=u",), {}) == ("10.1.1.1", 5433)


def test_a_service_we_cannot_find_is_its_own_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """libpq may find it in the system directory it was built with, which we cannot name:
    the target is the service itself, never libpq's defaults."""
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE", "PGSYSCONFDIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "missing.conf"))
    connect = psycopg_module._connect_target
    assert connect(("service=analytics",), {}) == ("service analytics", None)
    assert connect(("service=prod",), {}) == ("service prod", None)
    assert connect(("service=prod host=db",), {}) == ("db", 5432)
    system = tmp_path / "etc"
    system.mkdir()
    (system / "pg_service.conf").write_text(SERVICES)
    monkeypatch.setenv("PGSYSCONFDIR", str(system))
    assert connect(("service=analytics",), {}) == ("10.1.1.1", 5433)


def test_asyncpg_reads_a_dsns_service_as_asyncpg_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in ("PGHOST", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    services = tmp_path / "services.conf"
    services.write_text(SERVICES)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    assert dsn_target("postgresql:///d?service=analytics", None, None) == ("10.1.1.1", 5433)
    assert dsn_target("postgresql:///d", None, None, service="prod") == (SOCKETS, 5432)


def test_policy_sections_reach_the_targets_as_named(tmp_path: Path) -> None:
    """A section for one host applies to it; a multi-host connect takes the section spelled
    as its list (as its breaker is named), a service we cannot find its ``service`` one."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[targets."127.0.0.1:5433,127.0.0.1:5432"]\nbreaker_minimum_calls = 7\n'
        '[targets."127.0.0.1:5432"]\nbreaker_minimum_calls = 9\n'
        '[targets."/var/run/postgresql"]\nbreaker_minimum_calls = 11\n'
        '[targets."service analytics"]\nbreaker_minimum_calls = 13\n'
    )
    settings = load_settings(environ={"OTEL_RECOVERY_CONFIG": str(policy)})
    expected = {
        "host=127.0.0.1,127.0.0.1 port=5433,5432": 7,
        "host=127.0.0.1 port=5432": 9,
        "host=/var/run/postgresql/ port=5432": 11,
        "host=127.0.0.1,127.0.0.1 port=5433,5434": 20,  # another list: the default
    }
    for conninfo, minimum_calls in expected.items():
        target = psycopg_module._connect_target((conninfo,), {})
        assert target is not None
        assert settings.for_target(*target, None).breaker_minimum_calls == minimum_calls
    section = settings.for_target("service analytics", None, None)
    assert section.breaker_minimum_calls == 13
