"""AsyncPGRecoveryInstrumentor against the real PostgreSQL with real faults.

Getting a connection is retried (``asyncpg.connect`` and ``pool.acquire`` against a refused
port that starts listening, or a server answering 57P03); statements never are. ``calls``
counts calls beneath our wrapper; PgFront counts TCP connections; tables count rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.pool
import pytest
import wrapt
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.utils import (
    suppress_instrumentation,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import StatusCode
from pg_harness import PgHarness
from servers import (
    PG_URL,
    PgFront,
    free_port,
    terminate_when_running,
)

from otel_recovery._clock import SYSTEM_CLOCK
from otel_recovery._policy_core import PolicyCore
from otel_recovery.instrumentors import (
    _asyncpg_plans,
    _asyncpg_targets,
    _wrapping,
    suppress_recovery,
)
from otel_recovery.instrumentors import asyncpg as ours_module
from otel_recovery.instrumentors._asyncpg_targets import dsn_target
from otel_recovery.instrumentors.asyncpg import AsyncPGCircuitOpenError, AsyncPGRecoveryInstrumentor
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker

Conn = asyncpg.connection.Connection
SITES = [
    (asyncpg, "connect"),
    (asyncpg.connection, "connect"),
    (asyncpg.pool.Pool, "_acquire"),
    (Conn, "execute"),
    (Conn, "fetchval"),
]
ALL_SITES = [(owner, attribute) for owner, attribute, _ in ours_module._sites()]
ORIGINALS = {site: vars(site[0])[site[1]] for site in ALL_SITES}


class Harness(PgHarness):
    library = "asyncpg"
    sites = SITES

    def __init__(self) -> None:
        super().__init__(AsyncPGRecoveryInstrumentor(), AsyncPGInstrumentor)

    def restore_sites(self) -> None:
        for owner, attribute in SITES:
            top = vars(owner)[attribute]
            assert _wrapping._wrapper_module(top) == PgHarness.__module__, (owner, attribute)
            setattr(owner, attribute, top.__wrapped__)
        for site, original in ORIGINALS.items():
            assert vars(site[0])[site[1]] is original, site


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/test?sslmode=disable"


def recovered(h: Harness, port: int, attempts: int) -> dict[str, Any]:
    (span,) = h.spans(f"recover asyncpg 127.0.0.1:{port}")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.retry.attempts"] == attempts
    assert span.status.status_code is StatusCode.UNSET
    failed = events(span, "otel_recovery.attempt.failed")
    assert len(failed) == attempts - 1
    return failed[0]


# -- getting a connection is retried ------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
async def test_refused_connection_is_retried_until_the_server_listens(h: Harness, order: str):
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="test")
    assert await conn.fetchval("SELECT 41 + 1") == 42
    await conn.close()
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1
    failed = recovered(h, port, attempts=2)
    assert failed["error.type"] == "ConnectionRefusedError"
    assert len(h.spans("SELECT")) == (1 if h.contrib else 0)


async def test_a_server_starting_up_57p03_is_retried(h: Harness) -> None:
    h.instrument()
    front = PgFront(starting_up=2)
    h.fronts.append(front)
    conn = await asyncpg.connect(url(front.port))
    await conn.close()
    assert h.calls["connect"] == 3 and front.accepted == 3
    failed = recovered(h, front.port, attempts=3)
    assert failed["error.type"] == "asyncpg.exceptions.CannotConnectNowError"
    assert failed["otel_recovery.error.code"] == "57P03"


async def test_pool_acquire_is_retried_once_not_at_every_layer(h: Harness) -> None:
    h.instrument()
    front = PgFront(starting_up=1)
    h.fronts.append(front)
    pool = await asyncpg.create_pool(url(front.port), min_size=0, max_size=2)
    h.reset()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 7") == 7
    await pool.close()
    assert h.calls["_acquire"] == 2 and h.calls["connect"] == 2 and front.accepted == 2
    recovered(h, front.port, attempts=2)  # the only recovery span: the nested connect is quiet


async def test_refused_port_fails_after_max_attempts_and_a_wrong_role_at_once(h: Harness):
    h.instrument(max_attempts=3)
    port = free_port()
    with pytest.raises(OSError):
        await asyncpg.connect(url(port))
    assert h.calls["connect"] == 3
    h.reset()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect("postgresql://otelrec_no_such_role@127.0.0.1:5432/test")
    assert h.calls["connect"] == 1


async def test_sql_retry_never_does_not_retry_connecting(h: Harness) -> None:
    h.instrument(sql_retry="never")
    with pytest.raises(OSError):
        await asyncpg.connect(url(free_port()))
    assert h.calls["connect"] == 1


# -- which server a connect counts on -------------------------------------------------------


def _breakers(h: Harness) -> dict[str, Any]:
    assert h.ours.targets is not None
    return {breaker.name: breaker for breaker in h.ours.targets.breakers()}


@pytest.mark.parametrize("spelling", ["lists", "url"])
async def test_a_dead_member_never_refuses_a_multi_host_connect(h: Harness, spelling: str):
    """Four failed connects to a dead replica open its circuit; a connect listing it first,
    then the live server, still fails over, and its statements count on the server reached."""
    h.instrument("ours_only", max_attempts=1, breaker_window=4, breaker_minimum_calls=4)
    dead = free_port()
    for _ in range(4):
        with pytest.raises(OSError):
            await asyncpg.connect(url(dead))
    assert _breakers(h)[f"asyncpg 127.0.0.1:{dead}"].state.value == "open"
    if spelling == "lists":
        both = {"host": ["127.0.0.1", "127.0.0.1"], "port": [dead, 5432]}
        conn = await asyncpg.connect(user="postgres", database="test", **both)
    else:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{dead},127.0.0.1:5432/test")
    try:
        assert await conn.fetchval("SELECT inet_server_port()") == 5432
    finally:
        await conn.close()
    breakers = _breakers(h)
    assert set(breakers) == {
        f"asyncpg 127.0.0.1:{dead}",
        f"asyncpg 127.0.0.1:{dead},127.0.0.1:5432",
        "asyncpg 127.0.0.1:5432",  # the statement
    }
    assert breakers[f"asyncpg 127.0.0.1:{dead},127.0.0.1:5432"].state.value == "closed"


@pytest.mark.parametrize(
    ("dsn", "keywords"),
    [
        (None, {"host": "/var/run/postgresql"}),
        (None, {"host": "/var/run/postgresql/", "port": 5432}),
        ("postgresql://postgres@/test?host=/var/run/postgresql", {}),
        ("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/test", {}),
        ("postgresql://postgres@/test", {}),  # no host: asyncpg's default socket directories
        (None, {}),
    ],
)
async def test_a_unix_socket_connect_counts_where_its_statements_do(
    h: Harness, monkeypatch: pytest.MonkeyPatch, dsn: str | None, keywords: dict[str, Any]
) -> None:
    """One breaker per server: a connect over a unix socket and the statements on it (whose
    address is ``/dir/.s.PGSQL.5432``) count on ``asyncpg /dir:5432``, however spelled."""
    for variable in ("PGHOST", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    if not os.path.exists("/var/run/postgresql/.s.PGSQL.5432"):
        pytest.skip("no PostgreSQL socket in /var/run/postgresql here")
    h.instrument("ours_only")
    conn = await asyncpg.connect(dsn, user="postgres", database="test", **keywords)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        (name,) = _breakers(h)
        assert name == "asyncpg {}:{}".format(*_asyncpg_targets.connection_target(conn))
        assert name.endswith("postgresql:5432")
    finally:
        await conn.close()


async def test_a_pool_over_a_unix_socket_acquires_where_its_statements_count(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("PGHOST", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)
    if not os.path.exists("/var/run/postgresql/.s.PGSQL.5432"):
        pytest.skip("no PostgreSQL socket in /var/run/postgresql here")
    h.instrument("ours_only")
    pool = await asyncpg.create_pool(
        "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/test", min_size=0, max_size=1
    )
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
    assert list(_breakers(h)) == [f"asyncpg {os.path.realpath('/var/run/postgresql')}:5432"]


# -- statements are never retried ---------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
async def test_insert_committed_then_connection_lost_is_not_applied_twice(h: Harness, order):
    h.instrument(order)
    table = h.table()
    conn = await asyncpg.connect(PG_URL)
    h.reset()
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await conn.execute(
            f"INSERT INTO {table} VALUES (1); COMMIT; SELECT pg_terminate_backend(pg_backend_pid())"
        )
    assert h.calls["execute"] == 1 and h.rows(table) == 1
    span = h.statement_span("INSERT")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "failure"
    (failed,) = events(span, "otel_recovery.attempt.failed")
    assert failed["error.type"] == "asyncpg.exceptions.ConnectionDoesNotExistError"
    if h.contrib:
        assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    assert span.status.status_code is StatusCode.ERROR
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1


async def test_pg_terminate_backend_mid_statement_and_after_it(h: Harness) -> None:
    h.instrument()
    conn = await asyncpg.connect(PG_URL)
    h.reset()
    killer = terminate_when_running(conn.get_server_pid(), "otelrec_sleep_marker")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await conn.fetchval("SELECT pg_sleep(5) /* otelrec_sleep_marker */")
    killer.join()
    with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
        await conn.fetchval("SELECT 1")
    assert h.calls["fetchval"] == 2
    spans = h.spans("SELECT")
    assert len(spans) == 2
    categories = [events(s, "otel_recovery.attempt.failed")[0] for s in spans]
    # a closed connection is the server's doing, so it counts against the breaker
    assert [c["otel_recovery.error.kind"] for c in categories] == ["connection", "connection"]
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 2


async def test_statement_timeout_in_a_transaction_is_not_retried(h: Harness) -> None:
    h.instrument()
    table = h.table()
    conn = await asyncpg.connect(PG_URL)
    await conn.execute("SET statement_timeout = 100")
    h.reset()
    with pytest.raises(asyncpg.QueryCanceledError):
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.execute(f"INSERT INTO {table} SELECT 2 FROM pg_sleep(1)")
    await conn.close()
    assert h.calls["execute"] == 4 and h.rows(table) == 0  # BEGIN, INSERT, INSERT, ROLLBACK


# -- lifecycle, suppression, never breaking the app -----------------------------------------


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("ours_leave_first", [True, False])
def test_uninstrument_restores_the_original_methods(ours_first: bool, ours_leave_first: bool):
    provider = TracerProvider()
    instrumentors = [AsyncPGRecoveryInstrumentor(), AsyncPGInstrumentor()]
    for instrumentor in instrumentors if ours_first else instrumentors[::-1]:
        instrumentor.instrument(tracer_provider=provider)
    top = vars(Conn)["execute"]  # contrib's wrapper is on top whichever came first
    assert _wrapping._wrapper_module(top).startswith("opentelemetry.instrumentation.")
    assert _wrapping._wrapper_module(top.__wrapped__).startswith("otel_recovery.instrumentors.")
    for instrumentor in instrumentors if ours_leave_first else instrumentors[::-1]:
        instrumentor.uninstrument()
    for site, original in ORIGINALS.items():
        assert vars(site[0])[site[1]] is original, site


async def test_suppressed_instrumentation_is_not_retried(h: Harness) -> None:
    h.instrument()
    front = PgFront(starting_up=5)
    h.fronts.append(front)
    with suppress_instrumentation(), pytest.raises(asyncpg.CannotConnectNowError):
        await asyncpg.connect(url(front.port))
    assert front.accepted == 1 and not h.exporter.get_finished_spans()


async def test_suppress_recovery_steps_aside_while_contrib_still_traces(h: Harness) -> None:
    """Inside ``suppress_recovery()`` a connect goes to asyncpg once, and an open circuit
    does not refuse a statement (on the compiled path too), which counts on no breaker."""
    h.instrument()
    front = PgFront(starting_up=5)
    h.fronts.append(front)
    with suppress_recovery(), pytest.raises(asyncpg.CannotConnectNowError):
        await asyncpg.connect(url(front.port))
    assert front.accepted == 1
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute("SELECT 1")  # plans remembered: the compiled layer serves execute
        assert h.ours.targets is not None
        breaker = next(b for b in h.ours.targets.breakers() if b.name.endswith(":5432"))
        breaker.force_open()
        before = breaker.snapshot()
        with suppress_recovery():
            assert await conn.fetchval("SELECT 2") == 2  # not refused
            assert await conn.execute("SELECT 3") == "SELECT 1"
        assert breaker.snapshot() == before
        with pytest.raises(AsyncPGCircuitOpenError):
            await conn.execute("SELECT 4")
    finally:
        conn.terminate()


async def test_a_wrapper_bug_does_not_break_the_call(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h.instrument()

    def broken(*args: Any) -> Any:
        raise RuntimeError("planner bug")

    monkeypatch.setattr(_asyncpg_plans.Planner, "statement", broken)
    monkeypatch.setattr(_asyncpg_plans.Planner, "connect", broken)
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        conn = await asyncpg.connect(PG_URL)
        assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.PostgresSyntaxError) as refused:
            await conn.fetchval("SELEC 1")
        await conn.close()
        with pytest.raises(OSError) as unreachable:
            await asyncpg.connect(url(free_port()), timeout=2)
    assert sum("otel_recovery internal error" in r.message for r in caplog.records) == 2
    # made outside our handlers: asyncpg's errors do not carry our bug as their context
    assert refused.value.__context__ is None
    assert not isinstance(unreachable.value.__context__, RuntimeError)


def test_dsn_targets_never_need_the_password() -> None:
    assert dsn_target("postgresql://u:secret@db.example:5433/d", None, None) == ("db.example", 5433)
    assert dsn_target("postgres://u@h1:1,h2:2/d", None, None) == ("h1:1,h2:2", None)
    assert dsn_target("postgres:///d?host=/run/pg&port=6000", None, None) == ("/run/pg", 6000)
    assert dsn_target(None, "127.0.0.1", 6543) == ("127.0.0.1", 6543)


@pytest.mark.parametrize("refused", ["begin", "commit"])
async def test_an_open_breaker_never_splits_a_transactions_bookkeeping(h: Harness, refused: str):
    """asyncpg's ``Transaction`` marks the connection before it sends BEGIN and unmarks it
    before COMMIT/ROLLBACK: transaction control passes through our layer, so an open
    breaker cannot leave the connection thinking it is in a transaction (every later BEGIN
    a SAVEPOINT the server rejects) or the server holding one the client forgot."""
    h.instrument()
    table = h.table()
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute("SELECT 1")  # plans remembered: the compiled layer serves execute
        assert h.ours.targets is not None
        (breaker,) = h.ours.targets.breakers()
        if refused == "begin":
            breaker.force_open()
            with pytest.raises(AsyncPGCircuitOpenError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
        else:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                breaker.force_open()
        assert not conn.is_in_transaction()
        breaker.reset()
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
    finally:
        conn.terminate()  # a transaction left open would hold its locks past the test
    assert h.rows(table) == (1 if refused == "begin" else 2)


async def test_an_open_breakers_rejection_is_asyncpgs_own_interface_error(h: Harness) -> None:
    """What an application (``except asyncpg.InterfaceError``) and SQLAlchemy's asyncpg
    dialect (which wraps asyncpg's errors as DBAPI errors and lets others escape) handle."""
    h.instrument()
    conn = await asyncpg.connect(PG_URL)
    try:
        assert h.ours.targets is not None
        (breaker,) = h.ours.targets.breakers()
        breaker.force_open()
        h.reset()
        with pytest.raises(asyncpg.InterfaceError) as rejected:
            await conn.fetchval("SELECT 1")
        assert isinstance(rejected.value, AsyncPGCircuitOpenError)
        assert rejected.value.name == breaker.name and h.calls["fetchval"] == 0
        annotated = rejected.value.with_msg("query argument $1: circuit open")
        assert isinstance(annotated, AsyncPGCircuitOpenError)
        assert str(annotated) == "query argument $1: circuit open"
        assert (annotated.name, annotated.retry_after) == (breaker.name, breaker.retry_after())
    finally:
        await conn.close()


async def test_an_answer_of_a_healthy_server_never_opens_its_circuit(h: Harness) -> None:
    """A PL/pgSQL ``RAISE`` (P0001) is the application's answer, not the server failing:
    four of them, on a breaker that opens at half of four calls failed, leave it closed."""
    h.instrument(breaker_window=4, breaker_minimum_calls=4, breaker_failure_rate=0.5)
    conn = await asyncpg.connect(PG_URL)
    try:
        for _ in range(4):
            with pytest.raises(asyncpg.RaiseError, match="insufficient funds"):
                await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'insufficient funds'; END $$")
        assert h.ours.targets is not None
        (breaker,) = h.ours.targets.breakers()
        snapshot = breaker.snapshot()
        assert (snapshot.state.name, snapshot.failed_calls) == ("CLOSED", 0)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# -- a bug of ours never replaces asyncpg's outcome; the pool's own wait is not the server's --


class Bug(RuntimeError):
    """What a broken piece of otel_recovery raises in these tests."""


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise Bug("a bug of ours")


@contextlib.contextmanager
def driver_errors(owner: Any, attribute: str) -> Iterator[list[BaseException]]:
    """What asyncpg's own ``owner.attribute`` raised, recorded beneath every layer (spliced
    under the harness's counting layer, so enter it before instrumenting)."""
    raised: list[BaseException] = []

    async def awaited(result: Any) -> Any:
        try:
            return await result
        except BaseException as error:
            raised.append(error)
            raise

    def record(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return awaited(wrapped(*args, **kwargs))

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
        f"otel_recovery internal error in asyncpg {target}: recovery; the call proceeds "
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
async def test_a_bug_of_ours_around_a_refused_connect_gives_asyncpgs_own_error_once(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken: tuple[Any, str],
) -> None:
    """The application gets asyncpg's own ``ConnectionRefusedError`` object, one connect is
    made (no retry because our code broke), and the bug is logged once."""
    port = free_port()
    monkeypatch.setattr(_wrapping, "_reported", set())
    with driver_errors(asyncpg, "connect") as raised, caplog.at_level(logging.ERROR):
        h.instrument()
        monkeypatch.setattr(*broken, _bug)
        with pytest.raises(OSError) as refused:
            await asyncpg.connect(url(port))
    assert raised == [refused.value] and not isinstance(refused.value, Bug)
    assert h.calls["connect"] == 1
    assert _internal_errors(caplog) == _reported(f"127.0.0.1:{port}")


@pytest.mark.parametrize("warm", [False, True], ids=["python_layer", "remembered_plan"])
async def test_a_bug_of_ours_counting_a_killed_statement_gives_asyncpgs_own_error_once(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, warm: bool
) -> None:
    """A backend terminated under its statement, and the breaker's ``record_failure``
    broken: asyncpg's own exception object, the statement sent once, one log record.
    ``remembered_plan``: the statement takes the compiled layer where it is built."""
    monkeypatch.setattr(_wrapping, "_reported", set())
    with driver_errors(Conn, "fetchval") as raised, caplog.at_level(logging.ERROR):
        h.instrument()
        conn = await asyncpg.connect(PG_URL)
        try:
            if warm:
                assert await conn.fetchval("SELECT 1") == 1
            h.reset()
            monkeypatch.setattr(CircuitBreaker, "record_failure", _bug)
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as killed:
                await conn.fetchval("SELECT pg_terminate_backend(pg_backend_pid())")
        finally:
            conn.terminate()
    assert raised == [killed.value]
    assert h.calls["fetchval"] == 1
    assert _internal_errors(caplog) == _reported("127.0.0.1:5432")


async def test_acquire_on_an_exhausted_pool_is_not_the_servers_failure(h: Harness) -> None:
    """``pool.acquire(timeout=)`` with every connection taken: asyncpg's own
    ``TimeoutError`` after the application's own timeout, tried once, counted neither way on
    the server's breaker and spending none of its retry budget; the server still answers."""
    ours = h.instrument().ours
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        h.reset()
        for asked in range(1, 26):  # a burst of impatient requests: enough to open a circuit
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await pool.acquire(timeout=0.1)
            # the pool's own wait, once: one more _acquire (counted below every layer)
            assert h.calls["_acquire"] == asked and time.monotonic() - started >= 0.09
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        snapshot = breaker.snapshot()
        assert (snapshot.state.name, snapshot.failed_calls) == ("CLOSED", 0)
        budget = ours.targets._target("127.0.0.1", 5432).budget.snapshot()
        assert (budget.total_retries, budget.total_refused) == (0, 0)
        await pool.release(held)
        assert await pool.fetchval("SELECT 3") == 3
        conn = await asyncpg.connect(PG_URL)
        assert await conn.fetchval("SELECT 4") == 4
        await conn.close()
    finally:
        pool.terminate()  # not close(): it would wait for a connection a failure left out


async def test_a_connect_failing_inside_an_acquire_is_still_the_servers(h: Harness) -> None:
    """What follows taking a holder (its connect, refused here) is the server's: retried at
    the acquire and counted, as before."""
    ours = h.instrument(max_attempts=2).ours
    port = free_port()
    pool = await asyncpg.create_pool(url(port), min_size=0, max_size=1)
    try:
        h.reset()
        with pytest.raises(OSError):
            await pool.acquire(timeout=5)
        assert h.calls["_acquire"] == 2
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        assert breaker.snapshot().failed_calls == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("callback", ["init", "setup"])
async def test_a_pools_callback_that_failed_after_writing_is_not_run_again(
    h: Harness, callback: str
) -> None:
    """A pool's ``init`` (per new connection) and ``setup`` (per acquire) run the
    application's statements after the connection is made. Here one writes an audit row,
    then its connection is terminated: the row is written, the callback fails. Retrying the
    acquire ran the callback again and wrote the row twice; it is raised as asyncpg raised
    it, counted on the breaker once (it was counted twice: by the statement and by the
    acquire it rose through), never repeated."""
    ours = h.instrument().ours
    table = h.table()
    admin = await asyncpg.connect(PG_URL)
    runs = 0

    async def audit(conn: Any) -> None:
        nonlocal runs
        runs += 1
        await conn.execute(f"INSERT INTO {table} VALUES ({runs})")
        if runs == 1:
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            for _ in range(500):  # until asyncpg has read the server's goodbye
                if conn.is_closed():
                    break
                await asyncio.sleep(0.01)
        await conn.execute("SELECT 1")

    pool = await asyncpg.create_pool(PG_URL, min_size=0, max_size=1, **{callback: audit})
    try:
        h.reset()
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)):
            await pool.acquire(timeout=10)
        assert (runs, h.rows(table), h.calls["_acquire"]) == (1, 1, 1)
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        # the connection lost: counted once, by the callback's statement (the acquire around
        # it raised the same error: it gives its permit back)
        assert breaker.snapshot().failed_calls == 1
        (span,) = h.spans("recover asyncpg 127.0.0.1:5432")
        assert span.attributes is not None
        assert span.attributes["otel_recovery.retry.disallowed"] == "statement_may_have_run"
        async with pool.acquire() as conn:  # the next acquire makes a new connection
            assert await conn.fetchval("SELECT 7") == 7
        assert (runs, h.rows(table)) == (2, 2)
    finally:
        pool.terminate()  # not close(): it would wait for a connection a failure left out
        await admin.close()


async def test_a_pools_reset_on_release_passes_an_open_circuit(h: Harness) -> None:
    """The circuit opens while a connection is out; the work done on it committed. Releasing
    it (``async with`` exit) resets it through ``Connection.reset``: that housekeeping is
    sent as without us, so the exit raises nothing and the pool keeps its connection."""
    ours = h.instrument().ours
    table = h.table()
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")  # autocommitted
            await conn.execute("SET application_name = 'otelrec_reset_check'")
            assert ours.targets is not None
            (breaker,) = ours.targets.breakers()
            breaker.force_open()
            h.reset()
        assert h.rows(table) == 1
        assert h.calls["execute"] == 1  # the reset, sent
        breaker.reset()
        async with pool.acquire() as conn:  # the same connection, reset (RESET ALL)
            assert await conn.fetchval("SHOW application_name") != "otelrec_reset_check"
        assert pool.get_size() == 1
    finally:
        await pool.close()


async def test_statements_outside_a_reset_are_still_refused_by_an_open_circuit(
    h: Harness,
) -> None:
    """Only the reset's own statements pass: the application's, on a pooled connection,
    are refused as before."""
    ours = h.instrument().ours
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    try:
        async with pool.acquire() as conn:
            breaker.force_open()
            with pytest.raises(AsyncPGCircuitOpenError):
                await conn.execute("SELECT 1")
            with pytest.raises(AsyncPGCircuitOpenError):
                await conn.execute("RESET ALL")
            breaker.reset()
    finally:
        breaker.reset()
        await pool.close()


async def test_a_pool_with_its_own_reset_callback_releases_through_an_open_circuit(
    h: Harness,
) -> None:
    """A pool made with ``reset=`` does not call ``Connection.reset`` on release: asyncpg
    runs ``Connection._reset`` (a bare ``ROLLBACK`` for a transaction left open) and the
    callback. With the circuit open they were refused, so ``async with pool.acquire()``
    raised after the work had committed."""
    if "reset" not in inspect.signature(asyncpg.create_pool).parameters:
        pytest.skip("asyncpg before 0.30 has no reset= callback for pools")
    ours = h.instrument().ours
    table = h.table()
    reset_runs = 0

    async def reset(conn: Any) -> None:
        nonlocal reset_runs
        reset_runs += 1
        await conn.execute("RESET ALL")

    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1, reset=reset)
    try:
        async with pool.acquire() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")  # autocommitted
            await conn.execute("BEGIN")  # left open: the release rolls it back
            assert ours.targets is not None
            (breaker,) = ours.targets.breakers()
            breaker.force_open()
        assert (h.rows(table), reset_runs) == (1, 1)
        breaker.reset()
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
        assert pool.get_size() == 1
    finally:
        await pool.close()


async def test_the_attempt_timeout_never_cuts_the_wait_for_the_applications_own_pool(
    h: Harness,
) -> None:
    """``OTEL_RECOVERY_ATTEMPT_TIMEOUT`` bounds what is asked of the server. An acquire
    that asked for no timeout waits for a busy pool as long as it takes; cut at 0.2 s, it
    failed with our TimeoutError and counted on the breaker, and 25 such waits opened the
    circuit of a healthy server. The statements after the wait are bounded by the limit and
    must beat it on a loaded machine too (a few ms on an idle one; 0.2 s left them little
    margin); the wait outlasts it."""
    ours = h.instrument(attempt_timeout=1.0).ours
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    try:
        held = await pool.acquire()

        async def wait_for_it() -> int:
            async with pool.acquire() as conn:
                return int(await conn.fetchval("SELECT 5"))

        waiting = [asyncio.ensure_future(wait_for_it()) for _ in range(5)]
        await asyncio.sleep(1.5)  # past the attempt timeout
        await pool.release(held)
        assert await asyncio.gather(*waiting) == [5] * 5
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        assert breaker.snapshot().failed_calls == 0
    finally:
        await pool.close()


async def test_statements_on_a_connection_known_closed_count_once(h: Harness) -> None:
    """asyncpg refuses a statement on a closed connection before sending it. The first
    refusal may be the only news that the server ended it, and counts; every later one on
    that connection says nothing of the server. Counted each time, they opened the circuit
    for every other connection."""
    ours = h.instrument(breaker_window=10, breaker_minimum_calls=5).ours
    conn = await asyncpg.connect(PG_URL)
    await conn.close()
    for _ in range(25):
        with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
            await conn.fetchval("SELECT 1")
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1
    other = await asyncpg.connect(PG_URL)
    try:
        assert await other.fetchval("SELECT 6") == 6
    finally:
        await other.close()


class SlowToRefuse(PgFront):
    """A server starting up that takes 1.2 s to say so (57P03) on every connection."""

    def _refuse(self, client: Any, target: tuple[str, int]) -> None:
        time.sleep(1.2)
        super()._refuse(client, target)


@pytest.mark.parametrize("call", ["connect", "acquire"])
async def test_a_callers_timeout_bounds_the_whole_connect_or_acquire(h: Harness, call: str) -> None:
    """``asyncpg.connect(timeout=2)`` and ``pool.acquire(timeout=2)`` are the time the call
    may take. Each retry started the timeout afresh: three refusals of 0.6 s each made a
    call asked to end within 1 s take 1.9 s (here, of 1.2 s each: 3.7 s for 2 s). Real
    time, and the real clock: the server's slowness is the fault, and the limit is read on
    the policy's clock. The refusal takes 0.6 of the limit: the retry has 0.8 s to start
    in time on a loaded machine, and a third attempt cannot start before the limit."""
    h.instrument(clock=SYSTEM_CLOCK)
    front = SlowToRefuse(starting_up=10)
    h.fronts.append(front)
    pool = None
    started = time.monotonic()
    try:
        if call == "connect":
            with pytest.raises((asyncio.TimeoutError, asyncpg.CannotConnectNowError)):
                await asyncpg.connect(url(front.port), timeout=2.0)
        else:
            pool = await asyncpg.create_pool(url(front.port), min_size=0, max_size=1)
            with pytest.raises((asyncio.TimeoutError, asyncpg.CannotConnectNowError)):
                await pool.acquire(timeout=2.0)
        took = time.monotonic() - started
        assert front.accepted == 2  # the third attempt could not have ended in time
        # Ends at the 2 s limit; with the timeout restarted per attempt the call takes
        # 3 x 1.2 s plus backoffs (and the count above would be 3). 1 s of margin for load.
        assert took < 3.0, f"took {took:.2f} s"
    finally:
        if pool is not None:
            pool.terminate()
