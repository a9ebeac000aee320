"""SQLAlchemy 2 asyncio (``create_async_engine``) over our asyncpg and psycopg layers.

SQLAlchemy's async engine runs its sync core in a greenlet and hands every driver
coroutine to the event loop through ``await_`` (``sqlalchemy.util.concurrency``). Its
asyncpg dialect connects with ``asyncpg.connect`` (ours: retried), prepares every statement
with ``Connection.prepare`` (not patched: it only parses) and runs it with
``PreparedStatement.fetch`` (ours: never retried); BEGIN, COMMIT and ROLLBACK go through
``Connection.execute`` (``asyncpg.Transaction``), its ping through
``Connection.fetchrow(";")``. Its psycopg dialect connects with
``AsyncConnection.connect`` and runs statements with ``AsyncCursor.execute`` (psycopg
begins and commits on its own, beneath our layer). Both decide what a failure means by
looking at the driver's exception (``is_disconnect``), so ours must reach them unchanged.

Every test runs on both drivers against the real server, counting what reached the driver
beneath our layer (``sent``, ``raised``, ``calls``), TCP connections (``PgFront.accepted``)
and rows. SQLAlchemy's own contrib instrumentation is not installed: what contrib adds is
the driver's (``contrib_first`` / ``ours_first``).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from instrumentors.test_asyncpg import events
from instrumentors.test_psycopg import TERMINATED as PSYCOPG_TERMINATED
from opentelemetry.trace import StatusCode
from servers import (
    PG_PORT,
    PgFront,
    free_port,
    kill_idle,
    pg_admin,
    quiet,
    terminate_when_running,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from integrations.async_pg import (
    ORDERS,
    AsyncpgStack,
    PsycopgStack,
    Stack,
    running,
)
from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors import _db
from otel_recovery.instrumentors._db import compiles
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.testing import FakeClock

pytestmark = pytest.mark.server

MakeEngine = Callable[..., AsyncEngine]

TERMINATED: dict[str, type[BaseException]] = {
    "asyncpg": asyncpg.ConnectionDoesNotExistError,
    "psycopg": PSYCOPG_TERMINATED,
}
"""The driver's error for a backend terminated under a running statement (psycopg before
3.2.4 loses the server's message: see ``test_psycopg.TERMINATED``)."""
UNIQUE: dict[str, type[BaseException]] = {
    "asyncpg": asyncpg.UniqueViolationError,
    "psycopg": psycopg.errors.UniqueViolation,
}
DIVISION: dict[str, type[BaseException]] = {
    "asyncpg": asyncpg.DivisionByZeroError,
    "psycopg": psycopg.errors.DivisionByZero,
}
CANCELED: dict[str, type[BaseException]] = {
    "asyncpg": asyncpg.QueryCanceledError,
    "psycopg": psycopg.errors.QueryCanceled,
}


@pytest.fixture(params=["asyncpg", "psycopg"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    harness: Stack = AsyncpgStack() if request.param == "asyncpg" else PsycopgStack()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
async def engines(stack: Stack) -> AsyncIterator[MakeEngine]:
    """Async engines with one pooled connection each (so a test knows which backend it
    gets), disposed of before the harness uninstruments."""
    made: list[AsyncEngine] = []

    def make(port: int = PG_PORT, **options: Any) -> AsyncEngine:
        options = {"pool_size": 1, "max_overflow": 0} | options
        url = f"{stack.url_scheme}://postgres@127.0.0.1:{port}/test"
        engine = create_async_engine(url, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.dispose()


def marker() -> str:
    return f"otelrec_{uuid.uuid4().hex[:8]}"


def driver_of(stack: Stack) -> str:
    return "asyncpg" if isinstance(stack, AsyncpgStack) else "psycopg"


async def backend_pid(engine: AsyncEngine) -> int:
    """Check a connection out (warming the pool) and say which backend serves it."""
    async with engine.connect() as conn:
        pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
        assert isinstance(pid, int)
        return pid


def span_attempts(stack: Stack) -> list[Any]:
    """``otel_recovery.retry.attempts`` of each span our instrumentor opened."""
    return [dict(s.attributes or {})["otel_recovery.retry.attempts"] for s in stack.ours_spans()]


def the_same(stack: Stack, error: BaseException) -> bool:
    """The driver error SQLAlchemy wraps is the very object the driver raised beneath us."""
    driver_error = stack.driver_error(error)
    return any(raised is driver_error for raised in stack.raised)


# -- an idle pooled connection whose backend was killed ------------------------------------


async def _use_after_idle_kill(
    stack: Stack, engine: AsyncEngine, noticed: bool
) -> tuple[tuple[Any, ...], sa.exc.DBAPIError]:
    """Kill the pooled connection's backend while idle, use it, and describe what the app
    saw; the next checkout must get a new backend. ``noticed``: let asyncpg's protocol
    see the socket close before the app uses the connection (it reads in the background;
    otherwise the app's BEGIN goes into the dead socket)."""
    async with engine.connect() as conn:
        pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
        driver = (await conn.get_raw_connection()).driver_connection
    kill_idle(pid)
    if noticed:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not driver.is_closed():
            assert loop.time() < deadline, "asyncpg never noticed its backend died"
            await asyncio.sleep(0.01)
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    error = caught.value
    assert await backend_pid(engine) != pid
    driver_error = stack.driver_error(error)
    seen = (type(error), type(error.orig), type(driver_error), str(driver_error))
    return (*seen, error.connection_invalidated), error


@pytest.mark.parametrize("noticed", [False, True], ids=["unnoticed", "noticed"])
async def test_an_idle_kill_is_seen_by_the_dialect_exactly_as_without_us(
    stack: Stack, engines: MakeEngine, noticed: bool
) -> None:
    """The dialect decides "disconnect" from the driver's exception: with our layer the app
    gets the same SQLAlchemy error, wrapping the same driver error, invalidated the same
    way, and the replacement connection is one plain connect (nothing retried). Where the
    failure went through our layer, it was the driver's own exception object, tried once
    and counted once on the breaker."""
    if noticed and isinstance(stack, PsycopgStack):
        pytest.skip("psycopg reads its socket only when used: it never notices on its own")
    stack.instrument("none")
    baseline, _ = await _use_after_idle_kill(stack, engines(), noticed)
    stack.instrument("ours_only")
    stack.reset()
    stack.raised.clear()
    instrumented, error = await _use_after_idle_kill(stack, engines(), noticed)
    assert instrumented == baseline
    assert instrumented[-1] is True  # connection_invalidated
    assert stack.calls["connect"] == 2  # the first connection and its replacement
    if noticed:
        # asyncpg knew its connection was closed: the dialect's BEGIN failed in
        # Connection.transaction() before any patched method was reached
        assert stack.raised == [] and stack.failures() == 0
    else:
        # the BEGIN (asyncpg) or the SELECT (psycopg) met the dead socket, through our layer
        assert len(stack.raised) == 1 and the_same(stack, error)
        assert stack.failures() in expected_failures(stack)
    assert span_attempts(stack) == [1] * stack.failures()  # one per failed call, not retried


def expected_failures(stack: Stack) -> set[int]:
    """Failures our breaker may count for one call that met a dead socket: psycopg's is a
    statement (counted once); asyncpg's is the dialect's BEGIN, transaction control, which
    an instrumentor may count once or pass through uncounted, but never count twice."""
    return {1} if isinstance(stack, PsycopgStack) else {0, 1}


async def test_pre_ping_replaces_a_killed_idle_connection_without_an_error(
    stack: Stack, engines: MakeEngine
) -> None:
    """``pool_pre_ping`` asks the dialect to ping; the ping's disconnect must still be
    recognised so the pool reconnects transparently: the app sees no error, and the pool
    makes exactly one new connection."""
    stack.instrument("ours_only")
    engine = engines(pool_pre_ping=True)
    pid = await backend_pid(engine)
    stack.reset()
    kill_idle(pid)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT 41 + 1")) == 42
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) != pid
    assert stack.calls["connect"] == 1
    # the ping met the dead socket through our layer: tried once, counted at most once
    assert len(stack.raised) == 1 and stack.failures() in expected_failures(stack)
    assert span_attempts(stack) == [1] * stack.failures()


@pytest.mark.parametrize("asked_too_early", [False, True])
async def test_an_open_breaker_skips_pre_ping_and_keeps_the_pooled_connection(
    stack: Stack, engines: MakeEngine, asked_too_early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asyncio dialects ping through an adapter (``driver_connection`` is the driver's
    connection): while our circuit is open the ping is not sent, the statement fails fast
    with the driver's rejection wrapped as a DBAPI error, and the connection is kept.
    ``asked_too_early``: ``would_refuse()`` said no, so the ping is sent and our refusal
    comes back wrapped by the dialect (asyncpg's is adapted): still answered "healthy"."""
    if asked_too_early:
        monkeypatch.setattr(CircuitBreaker, "would_refuse", lambda self: False)
    stack.instrument("ours_only")
    engine = engines(pool_pre_ping=True)
    pid = await backend_pid(engine)
    breaker = stack.breaker()
    breaker.force_open()
    stack.reset()
    stack.sent.clear()
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    assert caught.value.connection_invalidated is False
    # neither the ping (";") nor the statement; asyncpg's BEGIN/ROLLBACK pass by design
    assert [sql for sql in stack.sent if sql not in ("BEGIN;", "ROLLBACK;")] == []
    stack.sent.clear()
    breaker.reset()
    assert await backend_pid(engine) == pid
    assert stack.sent.count(";") == 1  # pinged again once the circuit closed


# -- a statement killed mid-flight ------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
async def test_insert_killed_mid_statement_in_a_transaction_is_sent_once(
    stack: Stack, engines: MakeEngine, order: str
) -> None:
    """The backend dies while the INSERT runs inside ``engine.begin()``: SQLAlchemy's
    disconnect error reaches the app (the driver's own exception inside it), the INSERT
    was sent once and applied never, and the next checkout works on a new backend."""
    stack.instrument(order)
    table = stack.table()
    engine = engines()
    pid = await backend_pid(engine)
    stack.reset()
    tag = marker()
    killer = terminate_when_running(pid, tag)
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(f"INSERT INTO {table} SELECT 1 FROM pg_sleep(5) /* {tag} */")
            )
    killer.join()
    error = caught.value
    assert error.connection_invalidated
    assert type(stack.driver_error(error)) is TERMINATED[driver_of(stack)]
    assert the_same(stack, error)
    assert stack.sent_with(tag) == 1
    assert stack.rows(table) == 0
    assert stack.failures() == 1

    span = stack.statement_span("INSERT")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "failure"
    assert attrs["otel_recovery.retry.attempts"] == 1
    if stack.contrib:
        assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    assert span.status.status_code is StatusCode.ERROR

    async with engine.begin() as conn:
        await conn.execute(sa.text(f"INSERT INTO {table} VALUES (2)"))
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) != pid
    assert stack.rows(table) == 1
    assert stack.calls["connect"] == 1  # the replacement, not retried


async def test_a_committed_call_whose_connection_dies_is_not_applied_twice(
    stack: Stack, engines: MakeEngine
) -> None:
    """The worst case for a retry: the server committed the INSERT, then the connection
    died before the reply (a procedure that commits and then terminates its own backend).
    The app sees the disconnect; the row is there exactly once."""
    stack.instrument("ours_only")
    table = stack.table()
    procedure = f"{table}_commit_then_die"
    with quiet(), pg_admin() as admin:
        admin.execute(
            f"CREATE PROCEDURE {procedure}() LANGUAGE plpgsql AS $$ BEGIN"
            f" INSERT INTO {table} VALUES (1); COMMIT;"
            " PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END $$"
        )
    try:
        engine = engines(isolation_level="AUTOCOMMIT")
        await backend_pid(engine)
        stack.reset()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            async with engine.connect() as conn:
                await conn.execute(sa.text(f"CALL {procedure}()"))
        assert caught.value.connection_invalidated
        assert type(stack.driver_error(caught.value)) is TERMINATED[driver_of(stack)]
        assert stack.sent_with(procedure) == 1
        assert stack.rows(table) == 1
    finally:
        with quiet(), pg_admin() as admin:
            admin.execute(f"DROP PROCEDURE IF EXISTS {procedure}")


# -- a server refusing connections briefly -----------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
async def test_a_refused_connect_is_recovered_by_our_retry(
    stack: Stack, engines: MakeEngine, order: str
) -> None:
    """Nothing listens for the pool's first connect; from the second attempt a front to
    PostgreSQL does. The app's first query succeeds: two connect calls, one TCP connection
    accepted, one recovery span."""
    stack.instrument(order)
    port = free_port()
    stack.listen_on_second_attempt(port)
    engine = engines(port)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT 41 + 1")) == 42
    assert stack.calls["connect"] == 2 and stack.fronts[0].accepted == 1
    span = stack.span(f"recover {stack.library} 127.0.0.1:{port}")
    attrs = dict(span.attributes or {})
    assert (attrs["otel_recovery.outcome"], attrs["otel_recovery.retry.attempts"]) == (
        "success",
        2,
    )
    assert span.status.status_code is StatusCode.UNSET
    (failed,) = events(span, "otel_recovery.attempt.failed")
    if isinstance(stack, AsyncpgStack):
        assert failed["error.type"] == "ConnectionRefusedError"
    else:
        assert failed["error.type"] == "psycopg.OperationalError"
        assert "Connection refused" in str(failed["otel_recovery.error.message"])


async def test_a_server_starting_up_57p03_is_recovered(stack: Stack, engines: MakeEngine) -> None:
    """A server answering ``FATAL 57P03`` twice, then serving: the pool's connect gets a
    connection on its third attempt, three TCP connections in all."""
    stack.instrument("ours_only")
    front = PgFront(starting_up=2)
    stack.fronts.append(front)
    engine = engines(front.port)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT 7")) == 7
    assert stack.calls["connect"] == 3 and front.accepted == 3
    span = stack.span(f"recover {stack.library} 127.0.0.1:{front.port}")
    assert dict(span.attributes or {})["otel_recovery.retry.attempts"] == 3


async def test_sql_retry_never_leaves_the_refusal_to_sqlalchemy(
    stack: Stack, engines: MakeEngine
) -> None:
    """With ``sql_retry="never"`` a refused connect is tried once and surfaces as
    SQLAlchemy's own connection error, as without us."""
    stack.instrument("ours_only", sql_retry="never")
    front = PgFront(starting_up=1)
    stack.fronts.append(front)
    engine = engines(front.port)
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with engine.connect():
            pass
    refusal: type[BaseException] = (
        asyncpg.CannotConnectNowError
        if isinstance(stack, AsyncpgStack)
        else psycopg.OperationalError
    )
    assert type(stack.driver_error(caught.value)) is refusal
    assert "starting up" in str(caught.value)
    assert stack.calls["connect"] == 1 and front.accepted == 1


# -- statement_timeout -------------------------------------------------------------------


async def test_statement_timeout_is_not_retried_and_the_connection_stays_usable(
    stack: Stack, engines: MakeEngine
) -> None:
    """A statement cancelled by ``statement_timeout`` is not a disconnect: SQLAlchemy keeps
    the connection, we do not repeat the statement, and the same backend answers next."""
    stack.instrument("ours_only")
    engine = engines()
    tag = marker()
    async with engine.connect() as conn:
        pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
        await conn.execute(sa.text("SET statement_timeout = 100"))
        stack.reset()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await conn.execute(sa.text(f"SELECT pg_sleep(2) /* {tag} */"))
        assert not caught.value.connection_invalidated
        assert type(stack.driver_error(caught.value)) is CANCELED[driver_of(stack)]
        assert the_same(stack, caught.value)
        await conn.rollback()
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) == pid
    assert stack.sent_with(tag) == 1
    assert stack.calls["connect"] == 0
    assert stack.failures() == 1  # statements count on the server's breaker (README)


# -- the greenlet bridge -------------------------------------------------------------------


def _slow_layer_code() -> CodeType:
    """The code of the Python async layer (``_db.async_layer``): what a compiled layer
    falls back to when it has no remembered plan; a call served compiled never enters it."""
    build = next(
        c for c in _db.async_layer.__code__.co_consts if getattr(c, "co_name", "") == "build"
    )
    layer: CodeType = next(c for c in build.co_consts if getattr(c, "co_name", "") == "layer")
    return layer


class SlowLayerEntries:
    """Counts, per patched site (the layer's ``where``), how often our Python async layer
    was entered (each resumption of its coroutine counts), and whether the driver's own
    Python ran at all (so a zero means "served compiled", not "the profiler saw nothing")."""

    def __init__(self) -> None:
        self.entries: Counter[str] = Counter()
        self.driver_frames = 0
        self._code = _slow_layer_code()

    def __enter__(self) -> SlowLayerEntries:
        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event != "call":
                return
            if frame.f_code is self._code:
                self.entries[str(frame.f_locals.get("where"))] += 1
            elif "/asyncpg/" in frame.f_code.co_filename or "/psycopg/" in frame.f_code.co_filename:
                self.driver_frames += 1

        sys.setprofile(profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


@pytest.mark.skipif(not compiles(), reason="otel_recovery._speedups not built")
async def test_many_statements_through_the_greenlet_bridge_run_compiled_and_recover(
    stack: Stack, engines: MakeEngine
) -> None:
    """A hundred transactions through the async engine, once their plan is remembered, are
    served by our compiled layer (its Python fallback is never entered for them) while
    the dialect's coroutines await them under ``greenlet_spawn``: asyncpg's BEGIN and
    COMMIT (``Connection.execute``; its prepared statements always take the Python layer,
    which has no compiled route), psycopg's statements (``AsyncCursor.execute``). Every
    row lands once; failures on that compiled path (a deferred unique violation at
    COMMIT; a division by zero) reach SQLAlchemy as its usual errors wrapping the driver's
    own exception, count nothing on the breaker, and leave the connection usable."""
    stack.instrument("ours_only")
    table = stack.table()
    with quiet(), pg_admin() as admin:
        admin.execute(f"ALTER TABLE {table} ADD UNIQUE (v) DEFERRABLE INITIALLY DEFERRED")
    compiled_site = (
        "asyncpg Connection.execute"
        if isinstance(stack, AsyncpgStack)
        else "psycopg AsyncCursor.execute"
    )
    engine = engines()
    pid = await backend_pid(engine)
    insert = sa.text(f"INSERT INTO {table} VALUES (:v)")
    async with engine.begin() as conn:  # every plan this test's calls need is remembered
        await conn.execute(insert, {"v": -1})
        await conn.execute(sa.text(f"DELETE FROM {table}"))
    failures_before = stack.failures()
    with SlowLayerEntries() as profiled:
        for v in range(100):
            async with engine.begin() as conn:
                await conn.execute(insert, {"v": v})
        with pytest.raises(sa.exc.IntegrityError) as violated:
            async with engine.begin() as conn:  # the violation surfaces at COMMIT
                await conn.execute(insert, {"v": 1000})
                await conn.execute(insert, {"v": 1000})
        with pytest.raises(sa.exc.DBAPIError) as divided:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1 / 0"))
    assert profiled.driver_frames > 0
    assert profiled.entries[compiled_site] == 0, profiled.entries
    if isinstance(stack, AsyncpgStack):
        assert profiled.entries["asyncpg PreparedStatement.fetch"] >= 102
    assert isinstance(stack.driver_error(violated.value), UNIQUE[driver_of(stack)])
    assert type(stack.driver_error(divided.value)) is DIVISION[driver_of(stack)]
    assert the_same(stack, divided.value)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text(f"SELECT sum(v) FROM {table}")) == sum(range(100))
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) == pid
    assert stack.rows(table) == 100
    assert stack.calls["connect"] == 1  # one connection served it all
    # a violated constraint and a division by zero are the caller's, not the server's
    assert stack.failures() == failures_before


def compiled_run() -> type:
    assert SPEEDUPS is not None
    return SPEEDUPS.AsyncRun  # type: ignore[no-any-return]


@pytest.mark.skipif(not compiles(), reason="otel_recovery._speedups not built")
async def test_await_only_drives_a_compiled_run_directly(stack: Stack, engines: MakeEngine) -> None:
    """An ``AsyncRun`` handed straight to SQLAlchemy's ``await_`` crosses the greenlet
    switch and is awaited by ``greenlet_spawn``: results come back, a server error is
    thrown back into the greenlet as the driver's own exception, a backend killed under a
    compiled call reaches the greenlet as the driver's disconnect (counted once, sent
    once); outside a greenlet ``await_`` refuses it and closes it without a warning."""
    stack.instrument("ours_only")
    engine = engines(isolation_level="AUTOCOMMIT")  # a failed call aborts no transaction
    tag = marker()

    def asyncpg_calls(sync_conn: sa.Connection) -> list[Any]:
        driver = sync_conn.connection.driver_connection
        seen: list[Any] = [await_(driver.fetchval("SELECT 1"))]  # remembers the plan
        pending = driver.fetchval("SELECT 2")
        seen += [type(pending), await_(pending)]
        with pytest.raises(asyncpg.DivisionByZeroError):
            await_(driver.fetchval("SELECT 1 / 0"))
        seen.append(await_(driver.fetchval("SELECT 3")))
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await_(driver.fetchval(f"SELECT pg_terminate_backend(pg_backend_pid()) /* {tag} */"))
        return seen

    def psycopg_calls(sync_conn: sa.Connection) -> list[Any]:
        driver = sync_conn.connection.driver_connection
        cursor = driver.cursor()
        await_(cursor.execute("SELECT 1"))
        seen: list[Any] = [await_(cursor.fetchone())[0]]
        pending = cursor.execute("SELECT 2")
        seen.append(type(pending))
        assert await_(pending) is cursor
        seen.append(await_(cursor.fetchone())[0])
        with pytest.raises(psycopg.errors.DivisionByZero):
            await_(cursor.execute("SELECT 1 / 0"))
        await_(cursor.execute("SELECT 3"))
        seen.append(await_(cursor.fetchone())[0])
        with pytest.raises(PSYCOPG_TERMINATED):
            await_(cursor.execute(f"SELECT pg_terminate_backend(pg_backend_pid()) /* {tag} */"))
        return seen

    calls = asyncpg_calls if isinstance(stack, AsyncpgStack) else psycopg_calls
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        stack.reset()
        seen = await conn.run_sync(calls)
        await conn.invalidate()
    assert seen == [1, compiled_run(), 2, 3]
    assert stack.sent_with(tag) == 1
    assert stack.failures() == 1  # the disconnect; not the division by zero

    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        pending = (
            driver.fetchval("SELECT 4")
            if isinstance(stack, AsyncpgStack)
            else driver.cursor().execute("SELECT 4")
        )
        assert type(pending) is compiled_run()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "was never awaited" would fail the test
            with pytest.raises(sa.exc.MissingGreenlet):
                await_(pending)
            del pending
            gc.collect()
        assert await conn.scalar(sa.text("SELECT 5")) == 5


# -- cancellation --------------------------------------------------------------------------


async def _cancelled_query(engine: AsyncEngine, tag: str) -> type[BaseException]:
    """``asyncio.wait_for`` around a slow query on a warm engine (the checkout takes
    milliseconds, so the statement is running when the second is up); what the app gets."""

    async def slow() -> None:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f"SELECT pg_sleep(5) /* {tag} */"))

    try:
        await asyncio.wait_for(slow(), 1.0)
    except BaseException as error:  # noqa: BLE001 - what the app sees is the point
        return type(error)
    raise AssertionError("the query was not cancelled")


async def _server_stopped(tag: str, timeout: float = 5.0) -> bool:
    """The server stops running the cancelled query (the driver cancelled it or the dialect
    closed the connection): nothing of ours keeps it busy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(running, tag):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_cancelled_query_is_not_retried_nor_counted_and_the_pool_recovers(
    stack: Stack, engines: MakeEngine
) -> None:
    """A task cancelled mid-query (``wait_for`` timing out) gets ``TimeoutError`` exactly as
    without us; the statement was sent once; our breaker counts no failure (README:
    ``CancelledError`` is never a failure); the server stops running the query; the pool
    hands out a working connection next."""
    stack.instrument("none")
    baseline_tag = marker()
    uninstrumented = engines()
    await backend_pid(uninstrumented)
    baseline = await _cancelled_query(uninstrumented, baseline_tag)
    assert await _server_stopped(baseline_tag)

    stack.instrument("ours_only")
    engine = engines()
    await backend_pid(engine)
    stack.reset()
    tag = marker()
    seen = await _cancelled_query(engine, tag)
    assert seen is baseline is TimeoutError
    assert stack.sent_with(tag) == 1
    assert await _server_stopped(tag)
    snapshot = stack.breaker().snapshot()
    assert snapshot.failed_calls == 0
    assert not stack.ours_spans()  # nothing to recover, nothing failed
    assert stack.raised and isinstance(stack.raised[-1], asyncio.CancelledError)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT 41 + 1")) == 42
    assert isinstance(engine.pool, sa.pool.AsyncAdaptedQueuePool)
    assert engine.pool.checkedout() == 0


async def test_a_cancelled_half_open_probe_gives_its_permit_back(
    stack: Stack, engines: MakeEngine
) -> None:
    """A breaker in half-open state lets one probe through; if the task running that probe
    is cancelled, the permit must come back, or the target stays rejected until the
    process restarts. The breaker is opened by a real failure (a statement_timeout, with a
    window of one call), then virtual time passes its open period."""
    clock = FakeClock()
    stack.instrument(
        "ours_only", clock=clock, breaker_window=1, breaker_minimum_calls=1, breaker_open_seconds=30
    )
    slow = engines(isolation_level="AUTOCOMMIT")  # no BEGIN: the SELECT itself is the probe
    await backend_pid(slow)  # connected before the breaker opens
    timeout = (
        {"server_settings": {"statement_timeout": "50"}}
        if isinstance(stack, AsyncpgStack)
        else {"options": "-c statement_timeout=50"}
    )
    failing = engines(isolation_level="AUTOCOMMIT", connect_args=timeout)
    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with failing.connect() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(1)"))
    assert type(stack.driver_error(caught.value)) is CANCELED[driver_of(stack)]
    breaker = stack.breaker()
    assert breaker.state.value == "open"
    clock.advance(31)
    tag = marker()
    assert await _cancelled_query(slow, tag) is TimeoutError
    assert await _server_stopped(tag)
    assert stack.sent_with(tag) == 1  # the probe: let through, then cancelled
    assert breaker.state.value == "half_open"  # neither a success nor a failure
    async with slow.connect() as conn:  # a new connection (the cancelled one was dropped)
        assert await conn.scalar(sa.text("SELECT 42")) == 42
    assert breaker.state.value == "closed"


# -- an open breaker -----------------------------------------------------------------------


def transaction_state(pid: int) -> str | None:
    """``pg_stat_activity.state`` of backend ``pid`` (None once it has gone)."""
    with quiet(), pg_admin() as admin:
        row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        return None if row is None else str(row[0])


class BreakerTrip:
    """Opens our breaker for 127.0.0.1:5432 with a real failure: a window of one call, and
    a statement cancelled by ``statement_timeout`` on an engine of its own. Virtual time
    (``pass_open_period``) lets the next call through as the half-open probe."""

    def __init__(self, stack: Stack, engines: MakeEngine) -> None:
        self.clock = FakeClock()
        stack.instrument(
            "ours_only",
            clock=self.clock,
            breaker_window=1,
            breaker_minimum_calls=1,
            breaker_open_seconds=30,
        )
        timeout = (
            {"server_settings": {"statement_timeout": "50"}}
            if isinstance(stack, AsyncpgStack)
            else {"options": "-c statement_timeout=50"}
        )
        self.engine = engines(isolation_level="AUTOCOMMIT", connect_args=timeout)
        self.stack = stack

    async def warm(self) -> None:
        """Connect the failing engine now, so opening the breaker later sends one query."""
        await backend_pid(self.engine)

    async def trip(self) -> None:
        with pytest.raises(sa.exc.DBAPIError):
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(1)"))
        assert self.stack.breaker().state.value == "open"

    def pass_open_period(self) -> None:
        self.clock.advance(31)


async def test_a_rejected_begin_leaves_the_pooled_connection_usable(
    stack: Stack, engines: MakeEngine
) -> None:
    """While our breaker is open (a real failure opened it), a transaction's first
    statement is refused (its BEGIN is sent: transaction control passes). Once the open
    period has passed, the same pooled connection must serve the next transaction.
    (asyncpg's ``Transaction.start`` marks the connection as inside a transaction before it
    executes BEGIN, through ``Connection.execute``: a refused BEGIN would leave asyncpg
    believing it is in a transaction, so every later BEGIN on that connection would become
    a SAVEPOINT the server rejects, for as long as the connection lives.)"""
    breaker = BreakerTrip(stack, engines)
    table = stack.table()
    engine = engines()
    pid = await backend_pid(engine)
    await breaker.warm()
    await breaker.trip()
    with pytest.raises(Exception, match="is open"):  # what the app sees: not the point here
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
    breaker.pass_open_period()
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"INSERT INTO {table} VALUES (2)"))
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) == pid
    assert stack.rows(table) == 1


async def test_a_breaker_opening_mid_transaction_leaves_no_transaction_open(
    stack: Stack, engines: MakeEngine
) -> None:
    """The breaker opens (another call failing) between a transaction's INSERT and its
    COMMIT. Whatever the app is told must match the database (an error and no row, or no
    error and the row), the server must not be left holding the transaction open (its row
    locks would block everyone else), and the pooled connection must work once the open
    period has passed. (asyncpg's COMMIT and ROLLBACK go through ``Connection.execute``: a
    refused COMMIT leaves the server transaction open, and so does the refused ROLLBACK.)"""
    breaker = BreakerTrip(stack, engines)
    table = stack.table()
    engine = engines()
    pid = await backend_pid(engine)
    await breaker.warm()
    failed: BaseException | None = None
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            await breaker.trip()
    except Exception as error:  # noqa: BLE001 - either outcome may be right; see below
        failed = error
    assert stack.rows(table) == (0 if failed is not None else 1)
    assert transaction_state(pid) in ("idle", None)  # not "idle in transaction"
    breaker.pass_open_period()
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"INSERT INTO {table} VALUES (2)"))
    assert stack.rows(table) == (1 if failed is not None else 2)
