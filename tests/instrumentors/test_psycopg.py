"""PsycopgRecoveryInstrumentor against the real PostgreSQL with real faults.

Connecting is retried (a refused port that starts listening, a server answering 57P03);
statements never are (pg_terminate_backend mid-statement, a backend that commits and then
dies, statement_timeout). ``calls`` counts calls beneath our wrapper (a counting layer
installed first); PgFront counts TCP connections; tables count rows.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import wrapt
from opentelemetry.instrumentation import dbapi
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.utils import (
    suppress_instrumentation,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from ours import marked_by_us
from pg_harness import PgHarness
from servers import (
    PG_DSN,
    PgFront,
    free_port,
    kill_idle,
    pg_admin,
    quiet,
    terminate_when_running,
)

from otel_recovery._policy_core import PolicyCore
from otel_recovery.instrumentors import _wrapping, suppress_recovery
from otel_recovery.instrumentors import psycopg as ours_module
from otel_recovery.instrumentors.psycopg import (
    PsycopgAttemptTimeoutError,
    PsycopgCircuitOpenError,
    PsycopgRecoveryInstrumentor,
    ends_transaction_work,
)
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.testing import FakeClock

SITES = [
    (psycopg, "connect"),
    (psycopg.Connection, "connect"),
    (psycopg.AsyncConnection, "connect"),
    (psycopg.Cursor, "execute"),
    (psycopg.AsyncCursor, "execute"),
    (psycopg.ServerCursor, "execute"),
    (psycopg.AsyncServerCursor, "execute"),
]
ORIGINALS = {site: vars(site[0])[site[1]] for site in SITES}
ORIGINALS[psycopg.Cursor, "executemany"] = vars(psycopg.Cursor)["executemany"]
ORIGINALS[psycopg.AsyncCursor, "executemany"] = vars(psycopg.AsyncCursor)["executemany"]


class Harness(PgHarness):
    library = "psycopg"
    sites = SITES

    def __init__(self) -> None:
        super().__init__(PsycopgRecoveryInstrumentor(), PsycopgInstrumentor)

    def restore_sites(self) -> None:
        # contrib's unwrap turns the connect classmethods into bound methods (its own bug):
        # put the originals back whatever it left, after checking no layer of ours remains.
        for (owner, attribute), original in ORIGINALS.items():
            assert not _chain_has_ours(vars(owner)[attribute]), (owner, attribute)
            setattr(owner, attribute, original)


def _chain_has_ours(node: Any) -> bool:
    for _ in range(16):
        if _wrapping._wrapper_module(node).startswith("otel_recovery."):
            return True
        node = getattr(node, "__wrapped__", None)
        if node is None:
            return False
    return False


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def dsn(port: int, **extra: str) -> str:
    return " ".join([f"host=127.0.0.1 port={port} user=postgres dbname=test", *extra.values()])


def assert_connect_recovered(h: Harness, port: int, attempts: int) -> dict[str, Any]:
    (span,) = h.spans(f"recover psycopg 127.0.0.1:{port}")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.retry.attempts"] == attempts
    assert span.status.status_code is StatusCode.UNSET
    failed = events(span, "otel_recovery.attempt.failed")
    assert len(failed) == attempts - 1
    return failed[0]


TERMINATED = (
    psycopg.errors.AdminShutdown
    if tuple(int(part) for part in psycopg.__version__.split(".")[:3]) >= (3, 2, 4)
    else psycopg.OperationalError
)
"""What a statement gets when its backend is terminated under it. psycopg before 3.2.4
loses the server's FATAL message as the connection closes: a plain ``OperationalError``
without SQLSTATE (nothing to classify as 57P01; it is still never retried)."""

# -- connecting is retried ----------------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
def test_refused_connection_is_retried_until_the_server_listens(h: Harness, order: str) -> None:
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1
    failed = assert_connect_recovered(h, port, attempts=2)
    assert failed["error.type"] == "psycopg.OperationalError"
    assert "Connection refused" in failed["otel_recovery.error.message"]
    assert len(h.spans("SELECT")) == (1 if h.contrib else 0)  # contrib still traces it


def test_a_server_starting_up_57p03_is_retried(h: Harness) -> None:
    h.instrument()
    front = PgFront(starting_up=2)
    h.fronts.append(front)
    conn = psycopg.Connection.connect(dsn(front.port), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
    assert h.calls["connect"] == 3 and front.accepted == 3
    failed = assert_connect_recovered(h, front.port, attempts=3)
    assert "starting up" in failed["otel_recovery.error.message"]


def test_a_refused_port_fails_after_exactly_max_attempts(h: Harness) -> None:
    h.instrument(max_attempts=3)
    port = free_port()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(dsn(port))
    assert h.calls["connect"] == 3
    (span,) = h.spans(f"recover psycopg 127.0.0.1:{port}")
    assert dict(span.attributes or {})["otel_recovery.outcome"] == "failure"
    assert span.status.status_code is StatusCode.ERROR


def test_sql_retry_never_and_a_wrong_role_are_not_retried(h: Harness) -> None:
    h.instrument(sql_retry="never")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(free_port()))
    assert h.calls["connect"] == 1
    h.ours.uninstrument()
    h.ours.instrument(clock=FakeClock(), tracer_provider=h.provider)
    h.reset()
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(PG_DSN.replace("user=postgres", "user=otelrec_no_such_role"))
    assert h.calls["connect"] == 1  # a FATAL refusal is configuration, not a blip
    (span,) = h.spans("recover psycopg 127.0.0.1:5432")
    failed = events(span, "otel_recovery.attempt.failed")[0]
    assert failed["otel_recovery.error.category"] == "configuration"
    assert failed["otel_recovery.error.retryable"] is False


# -- statements are never retried ---------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
def test_insert_committed_then_connection_lost_is_not_applied_twice(h: Harness, order: str):
    h.instrument(order)
    table = h.table()
    conn = psycopg.connect(PG_DSN, autocommit=True)
    h.reset()
    with pytest.raises(TERMINATED):
        conn.execute(
            f"INSERT INTO {table} VALUES (1); COMMIT; SELECT pg_terminate_backend(pg_backend_pid())"
        )
    assert h.calls["execute"] == 1 and h.rows(table) == 1
    span = h.statement_span("INSERT")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "failure"
    assert attrs["otel_recovery.retry.attempts"] == 1
    (failed,) = events(span, "otel_recovery.attempt.failed")
    if TERMINATED is psycopg.errors.AdminShutdown:
        assert failed["error.type"] == "psycopg.errors.AdminShutdown"
        assert failed["otel_recovery.error.code"] == "57P01"
    if h.contrib:
        assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    assert span.status.status_code is StatusCode.ERROR
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1


def test_pg_terminate_backend_mid_statement_is_not_retried(h: Harness) -> None:
    h.instrument()
    conn = psycopg.connect(PG_DSN, autocommit=True)
    h.reset()
    killer = terminate_when_running(conn.info.backend_pid, "otelrec_sleep_marker")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT pg_sleep(5) /* otelrec_sleep_marker */")
    killer.join()
    assert h.calls["execute"] == 1
    (failed,) = events(h.statement_span("SELECT"), "otel_recovery.attempt.failed")
    assert failed["otel_recovery.error.retryable"] is True  # transient, yet not repeated


def test_statement_timeout_inside_a_transaction_is_not_retried(h: Harness) -> None:
    h.instrument()
    table = h.table()
    conn = psycopg.connect(PG_DSN)
    conn.execute("SET statement_timeout = 100")
    h.reset()
    with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction():
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.execute(f"INSERT INTO {table} SELECT 2 FROM pg_sleep(1)")
    conn.close()
    assert h.calls["execute"] == 2 and h.rows(table) == 0
    (span,) = [s for s in h.spans("INSERT") if s.events]
    (failed,) = events(span, "otel_recovery.attempt.failed")
    assert failed["otel_recovery.error.code"] == "57014"


def test_an_open_breaker_fails_statements_fast_and_sql_has_no_fallback(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rejection is psycopg's own ``OperationalError`` too: what ``except`` clauses,
    psycopg_pool and SQLAlchemy handle (tests/integrations shows SQLAlchemy's side). The
    process-wide fallback value (for HTTP and Redis reads) never stands in for SQL."""
    monkeypatch.setenv("OTEL_RECOVERY_FALLBACK_VALUE", "0")
    h.instrument()
    with pytest.raises(psycopg.OperationalError):  # a fallback never stands in for SQL
        psycopg.connect(dsn(free_port()), connect_timeout=1)
    conn = psycopg.connect(PG_DSN, autocommit=True)
    assert h.ours.targets is not None
    breaker = next(b for b in h.ours.targets.breakers() if b.name.endswith(":5432"))
    breaker.force_open()
    h.reset()
    with pytest.raises(psycopg.OperationalError) as rejected:
        conn.execute("SELECT 1")
    assert isinstance(rejected.value, PsycopgCircuitOpenError)
    assert rejected.value.name == breaker.name and rejected.value.sqlstate is None
    assert h.calls["execute"] == 0  # never sent
    (span,) = h.spans("SELECT")  # contrib's; a rejected call never ran, so no "why not"
    assert "otel_recovery.retry.disallowed" not in dict(span.attributes or {})
    assert [e.name for e in span.events if e.name.startswith("otel_recovery")] == [
        "otel_recovery.rejected"
    ]
    conn.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("COMMIT", True),
        ("commit;", True),
        (" ROLLBACK \n", True),
        ("ROLLBACK TO SAVEPOINT s1", True),
        ('ROLLBACK TO "s1_x"', True),
        ("RELEASE SAVEPOINT s1", True),
        ("release s1;", True),
        ("END", True),
        ("ABORT", True),
        ("BEGIN", False),  # starts work: refusing it leaves nothing open
        ("START TRANSACTION", False),
        ("SAVEPOINT s1", False),
        ("SELECT 1", False),
        ("COMMIT; DELETE FROM t", False),  # a script does work: gated
        ("ROLLBACKS", False),
        ("", False),
        (b"COMMIT", False),
        (psycopg.sql.SQL("COMMIT"), False),
    ],
)
def test_what_ends_transaction_work(query: object, expected: bool) -> None:
    assert ends_transaction_work(query) is expected


@pytest.mark.parametrize("order", ["ours_only", "contrib_first", "ours_first"])
async def test_an_open_breaker_lets_what_ends_a_transaction_through(h: Harness, order: str) -> None:
    """A transaction and its savepoints must be able to end while the circuit is open (an
    ORM's ``atomic``, such as Django's, sends them as plain statements; see
    tests/integrations/test_django.py): the data statement and a new SAVEPOINT are refused,
    ROLLBACK TO / RELEASE / COMMIT / ROLLBACK are sent, uncounted, and the connection ends
    idle, sync and awaited; ``executemany`` is never let through."""
    h.instrument(order)
    table = h.table()
    sync = psycopg.connect(PG_DSN, autocommit=True)
    aconn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    sync.execute(f"INSERT INTO {table} VALUES (1)")
    await aconn.execute("BEGIN")
    await aconn.execute("SAVEPOINT s1")
    sync.execute("BEGIN")
    breaker.force_open()
    h.reset()
    with pytest.raises(PsycopgCircuitOpenError):
        await aconn.execute(f"INSERT INTO {table} VALUES (2)")
    with pytest.raises(PsycopgCircuitOpenError):
        await aconn.execute("SAVEPOINT s2")
    await aconn.execute("ROLLBACK TO SAVEPOINT s1")
    await aconn.execute("RELEASE SAVEPOINT s1")
    await aconn.execute("COMMIT")
    with sync.cursor() as cursor:
        with pytest.raises(PsycopgCircuitOpenError):
            cursor.execute(f"INSERT INTO {table} VALUES (3)")
        with pytest.raises(PsycopgCircuitOpenError):
            cursor.executemany("RELEASE SAVEPOINT s9", params_seq=[])
        cursor.execute("ROLLBACK;")
    assert h.calls["execute"] == 4  # what ends work, and nothing else
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert sync.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert breaker.snapshot().failed_calls == 0
    await aconn.close()
    sync.close()
    breaker.reset()
    assert h.rows(table) == 1


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
def test_a_named_cursor_declares_through_our_layer(h: Harness, order: str) -> None:
    """Server-side cursors (Django's ``iterator()``, SQLAlchemy's ``stream_results``)
    declare through ``ServerCursor.execute``, which does not call ``Cursor.execute``: it is
    patched on its own, so an open circuit refuses it before anything is sent, and a lost
    backend is classified, counted and traced (contrib does not trace named cursors: our
    ``recover`` span does), never retried."""
    h.instrument(order)
    conn = psycopg.connect(PG_DSN)
    with conn.cursor(name="otelrec_rows") as cursor:
        cursor.execute("SELECT generate_series(1, 3)")
        assert cursor.fetchall() == [(1,), (2,), (3,)]
    conn.rollback()
    assert h.calls["execute"] == 1
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    with pytest.raises(PsycopgCircuitOpenError), conn.cursor(name="otelrec_refused") as cursor:
        cursor.execute("SELECT 1")
    assert h.calls["execute"] == 1  # nothing sent
    breaker.reset()
    conn.rollback()
    kill_idle(conn.info.backend_pid)
    h.reset()
    with pytest.raises(psycopg.OperationalError), conn.cursor(name="otelrec_lost") as cursor:
        cursor.execute("SELECT 1")
    assert h.calls["execute"] == 1 and breaker.snapshot().failed_calls == 1
    (span,) = h.spans("recover psycopg 127.0.0.1:5432")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.retry.attempts"] == 1
    assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    conn.close()


async def test_an_async_named_cursor_is_refused_by_an_open_circuit(h: Harness) -> None:
    h.instrument()
    aconn = await psycopg.AsyncConnection.connect(PG_DSN)
    async with aconn.cursor(name="otelrec_rows") as cursor:
        await cursor.execute("SELECT generate_series(1, 2)")
        assert await cursor.fetchall() == [(1,), (2,)]
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    with pytest.raises(PsycopgCircuitOpenError):
        async with aconn.cursor(name="otelrec_refused") as cursor:
            await cursor.execute("SELECT 1")
    assert h.calls["execute"] == 1
    await aconn.close()


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
async def test_an_awaited_statement_past_the_attempt_limit_raises_psycopgs_error(
    h: Harness, order: str
) -> None:
    """``OTEL_RECOVERY_ATTEMPT_TIMEOUT`` cancels an awaited statement. What the app gets is a
    ``TimeoutError`` that is also a ``psycopg.OperationalError``, so ``except psycopg.Error``
    (and SQLAlchemy's wrapping of DBAPI errors) handles it; sent once, never retried. The
    limit bounds the connect too, which must beat it on a loaded machine (a few ms on an
    idle one; 0.3 s left it little margin); the sleep outlasts it by far."""
    h.instrument(order, attempt_timeout=1.0)
    aconn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    h.reset()
    with pytest.raises(psycopg.OperationalError) as caught:
        await aconn.execute("SELECT pg_sleep(5)")
    assert isinstance(caught.value, PsycopgAttemptTimeoutError)
    assert isinstance(caught.value, TimeoutError)
    assert "1s time limit" in str(caught.value)
    assert h.calls["execute"] == 1
    await aconn.close()


def test_a_role_at_its_connection_limit_counts_against_the_server_and_is_not_retried(
    h: Harness,
) -> None:
    """libpq reports it as a ``FATAL:`` without SQLSTATE, like a wrong password; but it is
    the server's shortage, so it counts on the breaker (a wrong password would not)."""
    role = f"otelrec_limit0_{uuid.uuid4().hex[:8]}"
    with pg_admin() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    try:
        h.instrument()
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(PG_DSN.replace("user=postgres", f"user={role}"), connect_timeout=5)
        assert h.calls["connect"] == 1  # not retried: it will not heal in a backoff
        assert h.ours.targets is not None
        (breaker,) = h.ours.targets.breakers()
        assert breaker.snapshot().failed_calls == 1
    finally:
        with pg_admin() as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def _raise(sqlstate: str) -> str:
    return f"DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{sqlstate}'; END $$"


@pytest.mark.parametrize(
    ("statement", "healthy"),
    [
        ("SELEC 1", True),  # 42601 syntax error
        ("SELECT * FROM no_such_table_anywhere", True),  # 42P01
        (_raise("23505"), True),  # unique violation
        (_raise("40001"), True),  # serialization failure: lost a race, the server is fine
        (_raise("40P01"), True),  # deadlock: the same
        ("DO $$ BEGIN RAISE EXCEPTION 'insufficient funds'; END $$", True),  # P0001
        ("SELECT (SELECT g FROM generate_series(1, 2) AS g)", True),  # 21000: two rows
        ("ROLLBACK TO SAVEPOINT never_made", True),  # 3B001 (25P01 without a transaction)
        (_raise("58030"), False),  # an I/O error of the server
        (_raise("53300"), False),  # too many connections: the server is in trouble
        (_raise("57P01"), False),  # admin shutdown
    ],
)
def test_only_failures_of_the_server_count_on_its_breaker(
    h: Harness, statement: str, healthy: bool
) -> None:
    """A server that answers "your query is wrong" or "you lost a race" is up: one bad
    endpoint, or one hot row, must not open the circuit for every query to that server."""
    h.instrument(breaker_window=4, breaker_minimum_calls=4, breaker_failure_rate=0.5)
    conn = psycopg.connect(PG_DSN, autocommit=True)
    raised = []
    for _ in range(4):  # with the connect: four calls, three of them failed, then a fourth
        with pytest.raises(psycopg.Error) as failed:
            conn.execute(statement)
        raised.append(type(failed.value))
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    snapshot = breaker.snapshot()
    if healthy:
        assert PsycopgCircuitOpenError not in raised
        assert (snapshot.state, snapshot.failed_calls) == ("closed", 0)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    else:
        assert raised[3] is PsycopgCircuitOpenError and PsycopgCircuitOpenError not in raised[:3]
        assert (snapshot.state, snapshot.failed_calls) == ("open", 3)
    conn.close()


# -- lifecycle, suppression, never breaking the app -----------------------------------------


@pytest.mark.parametrize("contrib_leaves_first", [True, False])
def test_uninstrument_removes_exactly_our_layer(h: Harness, contrib_leaves_first: bool) -> None:
    counted = {site: vars(site[0])[site[1]] for site in SITES}  # the harness's counters
    h.instrument("ours_first")  # contrib on top of us everywhere it wraps
    if contrib_leaves_first:
        PsycopgInstrumentor().uninstrument()
    h.ours.uninstrument()
    for (owner, attribute), counter in counted.items():
        top = vars(owner)[attribute]
        assert not _chain_has_ours(top)
        if contrib_leaves_first or (owner, attribute) not in SITES[:3]:
            # identity, not ``in``: wrapt proxies compare equal to what they wrap
            parent = getattr(top, "_self_parent", None)
            assert counter is top or counter is parent, (owner, attribute)


def test_suppressed_instrumentation_is_not_retried(h: Harness) -> None:
    h.instrument()
    front = PgFront(starting_up=5)
    h.fronts.append(front)
    with suppress_instrumentation(), pytest.raises(psycopg.OperationalError, match="starting"):
        psycopg.connect(dsn(front.port))
    assert front.accepted == 1 and not h.exporter.get_finished_spans()


def test_suppress_recovery_steps_aside_while_contrib_still_traces(h: Harness) -> None:
    """Inside ``suppress_recovery()`` a connect goes to psycopg once (a server starting up
    is not waited for), an open circuit does not refuse a statement, which counts on no
    breaker, and contrib's span stays."""
    h.instrument()
    front = PgFront(starting_up=5)
    h.fronts.append(front)
    with suppress_recovery(), pytest.raises(psycopg.OperationalError, match="starting"):
        psycopg.connect(dsn(front.port))
    assert front.accepted == 1
    conn = psycopg.connect(PG_DSN, autocommit=True)
    conn.execute("SELECT 1")  # ours: a breaker now
    assert h.ours.targets is not None
    breaker = next(b for b in h.ours.targets.breakers() if b.name.endswith(":5432"))
    breaker.force_open()
    before = breaker.snapshot()
    h.reset()
    with suppress_recovery():
        assert conn.execute("SELECT 2").fetchone() == (2,)  # not refused
    assert h.calls["execute"] == 1 and breaker.snapshot() == before
    (span,) = h.spans("SELECT")
    assert marked_by_us([span]) == []
    with pytest.raises(PsycopgCircuitOpenError):
        conn.execute("SELECT 3")
    conn.close()


def test_a_wrapper_bug_does_not_break_the_call(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("planner bug")

    # before instrumenting: the layers bind the planner's methods when installed
    monkeypatch.setattr(ours_module._Planner, "statement", broken)
    monkeypatch.setattr(ours_module._Planner, "connect", broken)
    h.instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        with psycopg.connect(PG_DSN) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.SyntaxError) as refused:
                conn.execute("SELEC 1")
        with pytest.raises(psycopg.OperationalError) as unreachable:
            psycopg.connect(dsn(free_port()), connect_timeout=2)
    assert sum("otel_recovery internal error" in r.message for r in caplog.records) == 2
    # made outside our handlers: psycopg's errors do not carry our bug as their context
    assert refused.value.__context__ is None
    assert not isinstance(unreachable.value.__context__, RuntimeError)


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://postgres:Sup3r%zzSecret@127.0.0.1:5432/test",  # a bad %-escape
        "host=127.0.0.1 user=postgres password='Sup3rSecret dbname=test",  # an open quote
    ],
)
def test_a_connection_string_psycopg_cannot_read_is_its_error_not_ours(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, conninfo: str
) -> None:
    """psycopg reports it in its own words; logged as our internal error, its traceback
    echoed the string, password and all."""
    h.instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.DEBUG, logger="otel_recovery"):
        with pytest.raises(psycopg.ProgrammingError):
            psycopg.connect(conninfo)
    assert not caplog.records
    assert "Sup3r" not in caplog.text


# -- which server a connect counts on ---------------------------------------------------------


def _breakers(h: Harness) -> dict[str, Any]:
    assert h.ours.targets is not None
    return {breaker.name: breaker for breaker in h.ours.targets.breakers()}


def _open_by_failing_connects(h: Harness, conninfo: str) -> None:
    for _ in range(4):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo, connect_timeout=2)


def test_a_dead_member_never_refuses_a_multi_host_connect(h: Harness) -> None:
    """Four failed connects to a dead replica open its circuit; a connection string listing
    it first, then the live server, still fails over (it was refused by the dead member's
    circuit), and its statements count on the server it reached."""
    h.instrument("ours_only", max_attempts=1, breaker_window=4, breaker_minimum_calls=4)
    dead = free_port()
    _open_by_failing_connects(h, dsn(dead))
    assert _breakers(h)[f"psycopg 127.0.0.1:{dead}"].state.value == "open"
    both = f"host=127.0.0.1,127.0.0.1 port={dead},5432 user=postgres dbname=test"
    with psycopg.connect(both, connect_timeout=2) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (5432,)
    breakers = _breakers(h)
    assert set(breakers) == {
        f"psycopg 127.0.0.1:{dead}",
        f"psycopg 127.0.0.1:{dead},127.0.0.1:5432",
        "psycopg 127.0.0.1:5432",  # the statement
    }
    assert breakers[f"psycopg 127.0.0.1:{dead},127.0.0.1:5432"].state.value == "closed"


SERVICES = """\
[prod]
host=127.0.0.1
port=5432
user=postgres
dbname=test

[analytics]
host=127.0.0.1
port={dead}
user=postgres
dbname=test
"""


@pytest.mark.parametrize("how", ["service=", "PGSERVICE"])
def test_services_connect_on_their_own_servers_breakers(
    h: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    """Two services of a service file no longer share ``localhost:5432``: a dead one opens
    its own server's circuit, never the healthy one's, and a service's connect counts on the
    breaker its statements count on."""
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE", "PGSYSCONFDIR"):
        monkeypatch.delenv(variable, raising=False)
    dead = free_port()
    services = tmp_path / "pg_service.conf"
    services.write_text(SERVICES.format(dead=dead))
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    h.instrument("ours_only", max_attempts=1, breaker_window=4, breaker_minimum_calls=4)

    def connect(service: str) -> psycopg.Connection[Any]:
        if how == "PGSERVICE":
            monkeypatch.setenv("PGSERVICE", service)
            return psycopg.connect("", connect_timeout=2)
        return psycopg.connect(f"service={service}", connect_timeout=2)

    for _ in range(4):
        with pytest.raises(psycopg.OperationalError):
            connect("analytics")
    with connect("prod") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    breakers = _breakers(h)
    assert set(breakers) == {f"psycopg 127.0.0.1:{dead}", "psycopg 127.0.0.1:5432"}
    assert breakers[f"psycopg 127.0.0.1:{dead}"].state.value == "open"


def test_a_connect_without_a_host_counts_where_its_statements_do(
    h: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No host: libpq's default socket directory (``conn.info.host``), for the connect too,
    so a policy-file section for that directory reaches the one breaker of the server."""
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    try:
        with quiet(), psycopg.connect("user=postgres dbname=test", connect_timeout=3) as probe:
            directory = probe.info.host
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL's default unix socket is not reachable here ({error})")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[targets."{directory}"]\nbreaker_minimum_calls = 7\n')
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(policy))
    h.instrument("ours_only")
    for conninfo in ("user=postgres dbname=test", f"host={directory}/ user=postgres dbname=test"):
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    breakers = _breakers(h)
    named = os.path.realpath(directory)  # a socket directory by its real path
    assert list(breakers) == [f"psycopg {named}:5432"]
    assert breakers[f"psycopg {named}:5432"]._minimum_calls == 7


# -- asyncio ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_only"])
async def test_async_refused_then_listening_is_retried(h: Harness, order: str) -> None:
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    conn = await psycopg.AsyncConnection.connect(dsn(port), autocommit=True)
    cur = await conn.execute("SELECT 42")
    assert await cur.fetchone() == (42,)
    await conn.close()
    assert h.calls["connect"] == 2
    assert_connect_recovered(h, port, attempts=2)


async def test_async_57p03_then_statements_never_retried(h: Harness) -> None:
    h.instrument()
    table = h.table()
    front = PgFront(starting_up=1)
    h.fronts.append(front)
    conn = await psycopg.AsyncConnection.connect(dsn(front.port), autocommit=True)
    assert h.calls["connect"] == 2 and front.accepted == 2
    h.reset()
    with pytest.raises(TERMINATED):
        await conn.execute(
            f"INSERT INTO {table} VALUES (1); COMMIT; SELECT pg_terminate_backend(pg_backend_pid())"
        )
    assert h.calls["execute"] == 1 and h.rows(table) == 1
    assert_awaited_statement_not_retried(h, "INSERT")


async def test_async_statement_timeout_is_not_retried(h: Harness) -> None:
    """The INSERT's plan is remembered from the SET before it: with the extension built
    it runs compiled (an AsyncRun), and still says on contrib's span why it was not retried."""
    h.instrument()
    table = h.table()
    conn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    await conn.execute("SET statement_timeout = 100")
    h.reset()
    with pytest.raises(psycopg.errors.QueryCanceled):
        await conn.execute(f"INSERT INTO {table} SELECT 1 FROM pg_sleep(1)")
    await conn.close()
    assert h.calls["execute"] == 1 and h.rows(table) == 0
    assert_awaited_statement_not_retried(h, "INSERT")


CONTRIB_AWAITS_IN_ITS_SPAN = hasattr(dbapi.CursorTracer, "traced_execution_async")
"""Contrib's dbapi before ``traced_execution_async`` ends an awaited statement's span before
the statement runs (it returns the coroutine from inside the span), so our layer finds no
span of contrib's around it and records the failure as it does without contrib."""


def assert_awaited_statement_not_retried(h: Harness, keyword: str) -> None:
    """Why the statement was not retried is on contrib's span, where contrib's span is
    current around the statement."""
    if CONTRIB_AWAITS_IN_ITS_SPAN:
        attrs = dict(h.statement_span(keyword).attributes or {})
        assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    else:
        (span,) = marked_by_us(h.exporter.get_finished_spans())
        assert span.name.startswith("recover psycopg 127.0.0.1:")
        assert (span.attributes or {})["otel_recovery.outcome"] == "failure"


# -- a bug of ours never replaces psycopg's outcome; the pool's own wait is not the server's --


class Bug(RuntimeError):
    """What a broken piece of otel_recovery raises in these tests."""


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise Bug("a bug of ours")


@contextlib.contextmanager
def driver_errors(owner: Any, attribute: str) -> Iterator[list[BaseException]]:
    """What psycopg's own ``owner.attribute`` raised, recorded beneath every layer (spliced
    under the harness's counting layer, so enter it before instrumenting)."""
    raised: list[BaseException] = []

    def record(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            raised.append(error)
            raise
        if not inspect.isawaitable(result):
            return result

        async def awaited() -> Any:
            try:
                return await result
            except BaseException as error:
                raised.append(error)
                raise

        return awaited()

    counting = vars(owner)[attribute]
    beneath = counting.__wrapped__
    counting.__wrapped__ = wrapt.FunctionWrapper(beneath, record)
    try:
        yield raised
    finally:
        counting.__wrapped__ = beneath


def _internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.message for r in caplog.records if "otel_recovery internal error" in r.message]


def _reported(target: str) -> list[str]:
    return [
        f"otel_recovery internal error in psycopg {target}: recovery; the call proceeds "
        "uninstrumented (reported once per site)"
    ]


@pytest.mark.parametrize(
    "broken",
    [
        (PolicyCore, "_decide"),  # deciding whether to retry the refused connect
        (RetryBudget, "record_call"),  # counting the call, before its first attempt
    ],
    ids=["decide", "record_call"],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_bug_of_ours_around_a_refused_connect_gives_psycopgs_own_error_once(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    broken: tuple[Any, str],
) -> None:
    """The application gets psycopg's own ``OperationalError`` object, one connect is
    made (no retry because our code broke), and the bug is logged once."""
    port = free_port()
    site = (psycopg, "connect") if kind == "sync" else (psycopg.AsyncConnection, "connect")
    monkeypatch.setattr(_wrapping, "_reported", set())
    with driver_errors(*site) as raised, caplog.at_level(logging.ERROR):
        h.instrument()
        monkeypatch.setattr(*broken, _bug)
        try:
            if kind == "sync":
                psycopg.connect(dsn(port))
            else:
                await psycopg.AsyncConnection.connect(dsn(port))
        except Exception as caught:
            error: BaseException = caught
        else:
            raise AssertionError("connected to a refused port")
    assert type(error) is psycopg.OperationalError and "refused" in str(error)
    assert raised == [error]
    assert h.calls["connect"] == 1
    assert _internal_errors(caplog) == _reported(f"127.0.0.1:{port}")


@pytest.mark.parametrize("warm", [False, True], ids=["python_layer", "remembered_plan"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_bug_of_ours_counting_a_killed_statement_gives_psycopgs_own_error_once(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    warm: bool,
) -> None:
    """A backend terminated under its statement, and the breaker's ``record_failure``
    broken: psycopg's own exception object, the statement sent once, one log record.
    ``remembered_plan``: the statement takes the compiled layer where it is built."""
    owner = psycopg.Cursor if kind == "sync" else psycopg.AsyncCursor
    kill = "SELECT pg_terminate_backend(pg_backend_pid())"
    monkeypatch.setattr(_wrapping, "_reported", set())
    with driver_errors(owner, "execute") as raised, caplog.at_level(logging.ERROR):
        h.instrument()
        if kind == "sync":
            conn: Any = psycopg.connect(PG_DSN, autocommit=True)
        else:
            conn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
        try:
            if warm:
                await maybe_await(conn.execute("SELECT 1"))
            h.reset()
            monkeypatch.setattr(CircuitBreaker, "record_failure", _bug)
            try:
                await maybe_await(conn.execute(kill))
            except Exception as caught:
                error: BaseException = caught
            else:
                raise AssertionError("the backend survived")
        finally:
            await maybe_await(conn.close())
    assert isinstance(error, TERMINATED) and not isinstance(error, Bug)
    assert raised == [error]
    assert h.calls["execute"] == 1
    assert _internal_errors(caplog) == _reported("127.0.0.1:5432")


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def pool_requests(pool: Any) -> tuple[int, int]:
    """(connections asked of a psycopg_pool pool so far, how many of them waited in its
    queue), from the pool's own counters: how often a call waited for the pool, counted
    rather than timed."""
    stats = pool.get_stats()
    return stats.get("requests_num", 0), stats.get("requests_queued", 0)


def test_a_pool_timeout_of_psycopg_pool_is_not_the_servers_failure(h: Harness) -> None:
    """psycopg_pool's ``PoolTimeout`` (no connection free within ``timeout``) is raised by
    the pool's own wait, which none of our layers is in: not retried, not counted."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    h.instrument()
    # The pool's own timeout (30 s) for the healthy calls, whose first waits for the pool's
    # first connect (a 0.2 s limit for every call left that little margin on a loaded
    # machine); 0.2 s only for the call that meets the exhausted pool.
    with psycopg_pool.ConnectionPool(PG_DSN, min_size=1, max_size=1) as pool:
        with pool.connection() as held:
            held.execute("SELECT 1")
            h.reset()
            asked, queued = pool_requests(pool)
            started = time.monotonic()
            with pytest.raises(psycopg_pool.PoolTimeout):
                pool.getconn(timeout=0.2)
            took = time.monotonic() - started
            assert pool_requests(pool) == (asked + 1, queued + 1)  # its own wait, once
            assert took >= 0.9 * 0.2
        assert h.calls["connect"] == 0
        assert h.ours.targets is not None
        (breaker,) = h.ours.targets.breakers()
        snapshot = breaker.snapshot()
        assert (snapshot.state.name, snapshot.failed_calls) == ("CLOSED", 0)
        with pool.connection() as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)


def test_statements_a_pipeline_skipped_after_an_error_never_open_the_circuit(h: Harness) -> None:
    """In ``conn.pipeline()``, after one statement fails (a division by zero: an answer),
    psycopg raises ``PipelineAborted`` for the ones the server skipped. An
    ``OperationalError`` by type, it counted as a connection failure, and a few such
    pipelines opened a healthy server's circuit for every statement of the process."""
    h.instrument(breaker_window=10, breaker_minimum_calls=5)
    conn = psycopg.connect(PG_DSN, autocommit=True)
    seen: set[str] = set()
    for _ in range(6):
        with contextlib.suppress(psycopg.Error), conn.pipeline():
            cursor = conn.cursor()
            cursor.execute("SELECT 1/0")
            for number in range(3):
                try:
                    cursor.executemany("SELECT %s", [(number,)], returning=True)
                except psycopg.Error as error:
                    seen.add(type(error).__name__)
    assert "PipelineAborted" in seen and "PsycopgCircuitOpenError" not in seen, seen
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().state.name == "CLOSED"
    assert conn.execute("SELECT 8").fetchone() == (8,)
    conn.close()


def _closed_cursor(how: str) -> Any:
    """A cursor whose connection has been used, then closed by the application or broken
    by the server (what a worker that keeps its cursor across a server restart holds)."""
    conn = psycopg.connect(PG_DSN, autocommit=True)
    cursor = conn.cursor()
    cursor.execute("SELECT 1")  # its statement plan is remembered on the connection
    if how == "closed":
        conn.close()
    else:
        with pytest.raises(TERMINATED):
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    return cursor


@pytest.mark.parametrize("how", ["closed", "broken"])
@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
def test_statements_on_a_closed_connection_never_open_the_circuit(
    h: Harness, how: str, order: str
) -> None:
    """psycopg refuses to send on a closed connection (``the connection is closed``, or
    ``the connection is lost`` once libpq let go of the socket) without a byte sent: the
    client's own failure. Counted, twenty such refusals opened a healthy server's circuit,
    and every other connection's statements and connects were refused for 30 s."""
    h.instrument(order, breaker_window=10, breaker_minimum_calls=5)
    cursor = _closed_cursor(how)
    for _ in range(8):
        with pytest.raises(psycopg.OperationalError) as refused:
            cursor.execute("SELECT 1")
        assert type(refused.value) is psycopg.OperationalError  # psycopg's, unchanged
        assert str(refused.value) in ("the connection is closed", "the connection is lost")
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().failed_calls == (0 if how == "closed" else 1)  # the kill only
    with psycopg.connect(PG_DSN) as conn:
        assert conn.execute("SELECT 8").fetchone() == (8,)


async def test_async_statements_on_a_closed_connection_never_open_the_circuit(
    h: Harness,
) -> None:
    h.instrument(breaker_window=10, breaker_minimum_calls=5)
    conn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    cursor = conn.cursor()
    await cursor.execute("SELECT 1")
    await conn.close()
    for _ in range(8):
        with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
            await cursor.execute("SELECT 1")
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 0
    async with await psycopg.AsyncConnection.connect(PG_DSN) as other:
        assert await (await other.execute("SELECT 9")).fetchone() == (9,)


def test_application_mistakes_are_psycopgs_errors_not_our_internal_errors(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement on a cursor whose connection was closed before it ran any, and a
    connection string that is not a ``str``: psycopg refuses both in its own words. Taken
    for internal errors of ours, they were logged at ERROR, and used up the one report
    per site that a real bug of ours there would have had."""
    h.instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    conn = psycopg.connect(PG_DSN)
    cursor = conn.cursor()
    conn.close()
    with caplog.at_level(logging.DEBUG, logger="otel_recovery"):
        with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
            cursor.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
            cursor.executemany("SELECT %s", [(1,)])
        with pytest.raises(AttributeError):
            psycopg.connect(12345)  # type: ignore[arg-type]
    assert not caplog.records, caplog.text


def test_a_fallback_set_for_a_sql_target_leaves_its_recovery_on(
    h: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``fallback_value`` in a PostgreSQL target's ``operations."connect"`` section was
    built into a fallback no SQL failure may take: every connect to that target raised an
    internal error of ours, and ran with no retry and no breaker from then on."""
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[targets."127.0.0.1:{port}".operations."connect"]\nfallback_value = "x"\n')
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(policy))
    h.instrument("ours_only")
    h.listen_on_second_attempt(port)
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        conn = psycopg.connect(dsn(port), autocommit=True)
    assert conn.execute("SELECT 5").fetchone() == (5,)  # refused once, retried
    conn.close()
    assert h.calls["connect"] == 2
    assert "internal error" not in caplog.text.lower()


def test_instrument_refuses_a_fallback_value_for_sql() -> None:
    from otel_recovery.instrumentors._setting_values import SettingsError

    with pytest.raises(SettingsError, match="no value can stand in for a connection"):
        PsycopgRecoveryInstrumentor().instrument(fallback_value=[["row"]])
