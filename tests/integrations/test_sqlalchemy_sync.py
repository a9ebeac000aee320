"""SQLAlchemy 2 (sync Engine, ``postgresql+psycopg``, QueuePool) over our psycopg layer.

SQLAlchemy decides what a failure means by looking at the psycopg exception itself: its
psycopg dialect's ``is_disconnect`` asks whether the DBAPI connection is ``closed`` or
``broken``, and a disconnect invalidates the pooled connection (``pool_pre_ping`` replaces
a dead one before the app sees it). So our layer must re-raise psycopg's exception
unchanged, must never repeat a statement (SQLAlchemy does not either), and may only add
connect attempts where nothing has run yet. Every test counts calls beneath our layer
(``h.calls``), TCP connections (``PgFront.accepted``) or rows, against the real server.

SQLAlchemy's own contrib instrumentation is not installed: what contrib adds here is
psycopg's (``contrib_first`` / ``ours_first``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from instrumentors.test_psycopg import TERMINATED, assert_connect_recovered, events
from servers import PG_PORT, PgFront, free_port, kill_idle, terminate_when_running

from integrations.sync_pg import ORDERS, SyncHarness, assert_not_retried
from otel_recovery.policies.circuit_breaker import CircuitOpenError

pytestmark = pytest.mark.server


class EngineHarness(SyncHarness):
    """The psycopg harness, plus engines it disposes of before uninstrumenting."""

    def __init__(self) -> None:
        super().__init__()
        self.engines: list[sa.Engine] = []

    def engine(self, port: int = PG_PORT, **options: Any) -> sa.Engine:
        """One pooled connection (QueuePool of 1), so a test knows which backend it gets."""
        options.setdefault("pool_size", 1)
        options.setdefault("max_overflow", 0)
        engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", **options)
        assert isinstance(engine.pool, sa.pool.QueuePool)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
        super().close()


@pytest.fixture
def h() -> Iterator[EngineHarness]:
    harness = EngineHarness()
    try:
        yield harness
    finally:
        harness.close()


def backend_pid(engine: sa.Engine) -> int:
    """Check a connection out (warming the pool) and say which backend serves it."""
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        pid: int = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        return pid


def select_42(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        pid: int = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        assert conn.execute(sa.text("SELECT 41 + 1")).scalar() == 42
        return pid


# -- an idle pooled connection whose backend was killed ------------------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_killed_idle_connection_is_still_a_disconnect_for_sqlalchemy(
    h: EngineHarness, order: str
) -> None:
    """SQLAlchemy invalidates a pooled connection only if its dialect recognises psycopg's
    own exception as a disconnect. With or without us (``none`` is the baseline) the app
    gets the same OperationalError, wrapping the same psycopg error, with
    ``connection_invalidated``; the statement ran once and the next checkout reconnects."""
    h.instrument(order)
    engine = h.engine()
    pid = backend_pid(engine)
    kill_idle(pid)
    h.reset()
    with pytest.raises(sa.exc.OperationalError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    error = caught.value
    assert error.connection_invalidated is True
    assert type(error.orig) is TERMINATED  # psycopg's exception, not one of ours
    assert "terminating connection due to administrator command" in str(error.orig)
    assert h.calls["execute"] == 1 and h.calls["connect"] == 0  # not retried
    assert engine.pool.checkedout() == 0

    h.reset()
    assert select_42(engine) != pid  # the pool let the dead connection go
    assert h.calls["connect"] == 1 and h.calls["execute"] == 1
    if order != "none":
        assert h.breaker_failures(PG_PORT) == 1
        assert not [s for s in h.exporter.get_finished_spans() if s.name.startswith("recover")]


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_pre_ping_replaces_a_killed_idle_connection_transparently(
    h: EngineHarness, order: str
) -> None:
    """``pool_pre_ping`` pings (``;``) a pooled connection at checkout; the ping meets the
    dead backend, SQLAlchemy sees a disconnect and connects again. The app sees no error:
    one ping, one connect, one statement, exactly as without us."""
    h.instrument(order)
    engine = h.engine(pool_pre_ping=True)
    pid = backend_pid(engine)
    kill_idle(pid)
    h.reset()
    assert select_42(engine) != pid
    assert h.calls["connect"] == 1
    assert h.calls["execute"] == 2  # the failed ping and the SELECT; the ping not repeated
    if order == "none":
        return
    assert h.breaker_failures(PG_PORT) == 1  # the ping's failure still counts on the breaker
    (ping,) = [s for s in h.exporter.get_finished_spans() if events(s, "otel_recovery.give_up")]
    assert ping.name == (";" if h.contrib else "recover psycopg 127.0.0.1:5432")
    failed = assert_not_retried(ping, contrib=h.contrib)
    assert failed["error.type"] == f"{TERMINATED.__module__}.{TERMINATED.__qualname__}"


# -- a statement killed while it runs ------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_insert_killed_mid_statement_is_not_retried_nor_applied(
    h: EngineHarness, order: str
) -> None:
    """pg_terminate_backend while an INSERT runs inside ``engine.begin()``: the app gets
    SQLAlchemy's OperationalError (the connection invalidated), the INSERT was sent once and
    is not in the table; the next checkout connects again and works."""
    h.instrument(order)
    table = h.table()
    engine = h.engine()
    pid = backend_pid(engine)
    h.reset()
    killer = terminate_when_running(pid, "otelrec_sa_insert_marker")
    with pytest.raises(sa.exc.OperationalError) as caught, engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {table} SELECT 1 FROM pg_sleep(5) /* otelrec_sa_insert_marker */")
        )
    killer.join()
    # the INSERT's own error (a wrapper raising anything else would surface as the failed
    # rollback's "the connection is lost" instead)
    assert caught.value.connection_invalidated is True
    assert type(caught.value.orig) is TERMINATED
    assert "INSERT INTO" in str(caught.value.statement)
    assert h.calls["execute"] == 1 and h.calls["connect"] == 0
    assert h.rows(table) == 0
    failed = assert_not_retried(h.statement_span("INSERT"), contrib=h.contrib)
    assert failed["otel_recovery.error.retryable"] is True  # transient, yet never repeated

    h.reset()
    with engine.begin() as conn:  # the next checkout works
        assert conn.connection.dbapi_connection.info.backend_pid != pid  # type: ignore[union-attr]
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (7)"))
    assert h.calls["connect"] == 1 and h.rows(table) == 1


@pytest.mark.parametrize("order", ORDERS)
def test_insert_committed_then_backend_killed_is_applied_exactly_once(
    h: EngineHarness, order: str
) -> None:
    """The worst case for a retry: the server committed the INSERT and then the connection
    died before the reply. A repeated statement would insert a second row; there must be
    exactly one, and the app must see the disconnect."""
    h.instrument(order)
    table = h.table()
    engine = h.engine()
    backend_pid(engine)
    h.reset()
    with pytest.raises(sa.exc.OperationalError) as caught, engine.connect() as conn:
        conn.execution_options(no_parameters=True).exec_driver_sql(
            f"INSERT INTO {table} VALUES (1); COMMIT; SELECT pg_terminate_backend(pg_backend_pid())"
        )
    assert caught.value.connection_invalidated is True
    assert type(caught.value.orig) is TERMINATED
    assert h.calls["execute"] == 1 and h.rows(table) == 1
    assert_not_retried(h.statement_span("INSERT"), contrib=h.contrib)


# -- a server that refuses connections for a while -----------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_new_pooled_connection_to_a_refused_port_is_recovered_by_our_retry(
    h: EngineHarness, order: str
) -> None:
    """The engine's first connection meets a refused port that starts listening on the
    second attempt: SQLAlchemy's pool gets the connection from our retry, with exactly two
    connect calls and one TCP connection, and the app sees no error."""
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    engine = h.engine(port, pool_pre_ping=True)
    select_42(engine)
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1
    failed = assert_connect_recovered(h, port, attempts=2)
    assert "Connection refused" in failed["otel_recovery.error.message"]
    assert engine.pool.checkedin() == 1 and engine.pool.checkedout() == 0


def test_pre_ping_reconnect_to_a_server_starting_up_is_retried_by_us_only(
    h: EngineHarness,
) -> None:
    """A pooled connection died and the server answers 57P03 to the next two connections:
    pre-ping fails once, SQLAlchemy connects once, our retry makes that three attempts (the
    third succeeds). SQLAlchemy adds no attempts of its own: 3 connects, 3 TCP connections."""
    h.instrument()
    front = PgFront()
    h.fronts.append(front)
    engine = h.engine(front.port, pool_pre_ping=True)
    pid = backend_pid(engine)
    front.starting_up = front.accepted + 2
    before = front.accepted
    kill_idle(pid)
    h.reset()
    assert select_42(engine) != pid
    assert h.calls["connect"] == 3 and front.accepted - before == 3
    assert h.calls["execute"] == 2  # one ping, one SELECT
    failed = assert_connect_recovered(h, front.port, attempts=3)
    assert "starting up" in failed["otel_recovery.error.message"]
    (span,) = h.spans(f"recover psycopg 127.0.0.1:{front.port}")
    assert len(events(span, "otel_recovery.retry")) == 2


def test_pre_ping_reconnect_gives_up_after_exactly_max_attempts(h: EngineHarness) -> None:
    """If the server keeps answering 57P03, the checkout fails after max_attempts connects
    (not max_attempts times anything SQLAlchemy does), as SQLAlchemy's OperationalError
    wrapping psycopg's; once the server is up, the next checkout needs one connect."""
    h.instrument(max_attempts=3)
    front = PgFront()
    h.fronts.append(front)
    engine = h.engine(front.port, pool_pre_ping=True)
    pid = backend_pid(engine)
    front.starting_up = 10**6
    before = front.accepted
    kill_idle(pid)
    h.reset()
    with pytest.raises(sa.exc.OperationalError, match="starting up") as caught:
        select_42(engine)
    assert type(caught.value.orig) is psycopg.OperationalError
    assert h.calls["connect"] == 3 and front.accepted - before == 3
    (span,) = h.spans(f"recover psycopg 127.0.0.1:{front.port}")
    assert dict(span.attributes or {})["otel_recovery.outcome"] == "failure"

    front.starting_up = 0  # the server is up again
    h.reset()
    select_42(engine)
    assert h.calls["connect"] == 1


# -- statement_timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_statement_timeout_is_not_retried_and_the_connection_stays_usable(
    h: EngineHarness, order: str
) -> None:
    """A statement cancelled by statement_timeout inside a transaction: the app gets
    SQLAlchemy's OperationalError wrapping QueryCanceled, not a disconnect; nothing was
    retried or committed; after the rollback the same backend serves the next statement."""
    h.instrument(order)
    table = h.table()
    engine = h.engine(connect_args={"options": "-c statement_timeout=100"})
    pid = backend_pid(engine)
    h.reset()
    with engine.connect() as conn:
        with pytest.raises(sa.exc.OperationalError) as caught, conn.begin():
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            conn.execute(sa.text(f"INSERT INTO {table} SELECT 2 FROM pg_sleep(1)"))
        assert type(caught.value.orig) is psycopg.errors.QueryCanceled
        assert caught.value.connection_invalidated is False
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid
    assert h.calls["execute"] == 3 and h.calls["connect"] == 0
    assert h.rows(table) == 0
    spans = [s for s in h.exporter.get_finished_spans() if events(s, "otel_recovery.give_up")]
    (span,) = spans
    failed = assert_not_retried(span, contrib=h.contrib)
    assert failed["otel_recovery.error.code"] == "57014"
    assert select_42(engine) == pid  # still the same pooled connection


# -- an open breaker -----------------------------------------------------------------------


def test_an_open_breaker_reaches_sqlalchemy_as_a_dbapi_error(h: EngineHarness) -> None:
    """While our breaker for the server is open, statements and connects fail fast (README).
    SQLAlchemy handles only DBAPI errors: anything else escapes its wrapping, so an app's
    ``except sqlalchemy.exc.OperationalError`` (its "database unavailable" path) misses it.
    The HTTP instrumentors make their rejection also the library's connection error so that
    existing except clauses catch it; under SQLAlchemy the psycopg rejection must likewise be
    a ``psycopg.OperationalError``: wrapped, not a disconnect, nothing sent, and the healthy
    pooled connection kept for when the circuit closes."""
    h.instrument()
    engine = h.engine()
    pid = backend_pid(engine)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    h.reset()
    with pytest.raises(Exception) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert isinstance(caught.value, sa.exc.OperationalError), repr(caught.value)
    assert isinstance(caught.value.orig, CircuitOpenError)
    assert caught.value.connection_invalidated is False
    with pytest.raises(Exception) as refused:
        h.engine().connect()
    assert isinstance(refused.value, sa.exc.OperationalError), repr(refused.value)
    assert h.calls["execute"] == 0 and h.calls["connect"] == 0  # nothing was sent
    breaker.reset()
    assert select_42(engine) == pid  # the healthy pooled connection was kept


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
def test_an_open_breaker_skips_pre_ping_and_keeps_the_pooled_connection(
    h: EngineHarness, order: str
) -> None:
    """``pool_pre_ping`` pings at checkout. Refused by our open circuit, the ping would fail
    the checkout and the pool would lose its connection; the ping is not sent instead, and
    the app's statement fails fast with the circuit's (DBAPI) error. The connection serves
    again once the circuit closes, pinged as usual."""
    h.instrument(order)
    engine = h.engine(pool_pre_ping=True)
    pid = backend_pid(engine)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    h.reset()
    with pytest.raises(sa.exc.OperationalError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert isinstance(caught.value.orig, CircuitOpenError)
    assert h.calls["execute"] == 0
    breaker.reset()
    assert select_42(engine) == pid
    assert h.calls["execute"] == 2  # the ping, then the statement


def test_streamed_results_declare_through_our_layer(h: EngineHarness) -> None:
    """``stream_results`` (and ``Connection.stream``'s sync twin) reads through a psycopg
    server-side cursor, declared by ``ServerCursor.execute`` (patched on its own): rows
    stream as usual, and an open circuit refuses the declaration as SQLAlchemy's
    OperationalError, nothing sent."""
    h.instrument()
    engine = h.engine()
    backend_pid(engine)  # SQLAlchemy's first-connect statements
    h.reset()
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=2).execute(
            sa.text("SELECT generate_series(1, 5)")
        )
        assert [row[0] for row in result] == [1, 2, 3, 4, 5]
    assert h.calls["execute"] == 1
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    h.reset()
    with pytest.raises(sa.exc.OperationalError) as caught, engine.connect() as conn:
        conn.execution_options(stream_results=True).execute(sa.text("SELECT 1"))
    assert isinstance(caught.value.orig, CircuitOpenError)
    assert h.calls["execute"] == 0


# -- what the README promises on the span -------------------------------------------------


def test_without_contrib_our_span_says_why_a_statement_was_not_retried(
    h: EngineHarness,
) -> None:
    """README ("Redis and PostgreSQL"): statements are never retried
    (``otel_recovery.retry.disallowed=statement_may_have_run``), and without contrib a call
    that needed recovery gets a ``recover psycopg`` span. That span should say why the
    statement was not retried, as contrib's span does."""
    h.instrument("ours_only")
    engine = h.engine()
    pid = backend_pid(engine)
    kill_idle(pid)
    h.reset()
    with pytest.raises(sa.exc.OperationalError), engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    span = h.span("recover psycopg 127.0.0.1:5432")
    assert_not_retried(span, contrib=False)
    attrs = dict(span.attributes or {})
    assert attrs.get("otel_recovery.retry.disallowed") == "statement_may_have_run"
