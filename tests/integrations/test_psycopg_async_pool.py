"""``psycopg_pool.AsyncConnectionPool`` over our psycopg layer.

The pool connects in background workers with ``AsyncConnection.connect`` (ours: retried
when refused or answered 57P03), and has a reconnect loop of its own: a failed connect is
tried again after 1 s, 2 s, 4 s... until ``reconnect_timeout``. Its optional ``check``
(``AsyncConnectionPool.check_connection``) runs ``conn.execute("")`` on every checkout,
through ``AsyncCursor.execute`` (ours: a statement, never retried). So two retry loops
stack at connect time: one attempt of the pool is up to ``max_attempts`` of ours, never
more (nothing else beneath the pool is retried), and where ours recovers the pool never
sees a failure at all.

Every test counts ``connect`` calls beneath our layer, statements sent and errors raised
beneath it, TCP connections (``PgFront.accepted``) and the pool's own statistics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg_pool
import pytest
from instrumentors.test_psycopg import TERMINATED, dsn
from psycopg_pool.base import AttemptWithBackoff
from servers import PgFront, free_port, kill_idle

from integrations.async_pg import ORDERS, PsycopgStack
from otel_recovery.instrumentors.psycopg import PsycopgCircuitOpenError

pytestmark = pytest.mark.server

MakePool = Callable[..., psycopg_pool.AsyncConnectionPool[Any]]


@pytest.fixture
def stack() -> Iterator[PsycopgStack]:
    harness = PsycopgStack()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(autouse=True)
def quick_pool_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's own reconnect (and check) backoff starts at 10 ms instead of 1 s."""
    monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 0.01)


@pytest.fixture
async def pools(stack: PsycopgStack) -> AsyncIterator[MakePool]:
    """Pools of one connection, closed before the harness uninstruments."""
    made: list[psycopg_pool.AsyncConnectionPool[Any]] = []

    def make(port: int = 5432, **options: Any) -> psycopg_pool.AsyncConnectionPool[Any]:
        options = {"min_size": 1, "max_size": 1, "open": False} | options
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            dsn(port), **options
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def stats(pool: psycopg_pool.AsyncConnectionPool[Any]) -> dict[str, int]:
    """The pool's counters; a counter that never moved is absent, so read with .get."""
    return pool.get_stats()


async def select(pool: psycopg_pool.AsyncConnectionPool[Any], query: str) -> Any:
    async with pool.connection() as conn:
        cursor = await conn.execute(query)
        row = await cursor.fetchone()
        assert row is not None
        return row[0]


async def backend_pid(pool: psycopg_pool.AsyncConnectionPool[Any]) -> int:
    async with pool.connection() as conn:
        return conn.info.backend_pid


# -- a server refusing connections briefly -----------------------------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
async def test_refused_then_listening_is_recovered_before_the_pool_sees_it(
    stack: PsycopgStack, pools: MakePool, order: str
) -> None:
    """Nothing listens for the first connect; from the second one a front does. Without us
    the pool's reconnect loop gets there (one connect error in its statistics); with us our
    retry does, inside the pool's first attempt, so the pool sees no error. Either way it
    takes exactly two connect calls and one accepted TCP connection: the loops do not
    multiply."""
    stack.instrument(order)
    port = free_port()
    stack.listen_on_second_attempt(port)
    pool = pools(port)
    await pool.open(wait=True, timeout=10)
    assert await select(pool, "SELECT 41 + 1") == 42
    assert stack.calls["connect"] == 2 and stack.fronts[0].accepted == 1
    if order == "none":
        assert stats(pool)["connections_errors"] == 1 and stats(pool)["connections_num"] == 2
        return
    assert stats(pool).get("connections_errors", 0) == 0 and stats(pool)["connections_num"] == 1
    span = stack.span(f"recover psycopg 127.0.0.1:{port}")
    attrs = dict(span.attributes or {})
    assert (attrs["otel_recovery.outcome"], attrs["otel_recovery.retry.attempts"]) == (
        "success",
        2,
    )


async def test_a_server_starting_up_57p03_is_recovered_inside_one_pool_attempt(
    stack: PsycopgStack, pools: MakePool
) -> None:
    """Two ``FATAL 57P03`` answers, then service: three connects, three TCP connections,
    and the pool's statistics show one successful connection attempt."""
    stack.instrument("ours_only")
    front = PgFront(starting_up=2)
    stack.fronts.append(front)
    pool = pools(front.port)
    await pool.open(wait=True, timeout=10)
    assert await select(pool, "SELECT 7") == 7
    assert stack.calls["connect"] == 3 and front.accepted == 3
    assert stats(pool).get("connections_errors", 0) == 0 and stats(pool)["connections_num"] == 1


@pytest.mark.parametrize(
    ("settings", "per_pool_attempt"),
    [
        ({"max_attempts": 3, "budget_ratio": 1.0, "budget_min_per_second": 1000}, 3),
        ({"sql_retry": "never"}, 1),
    ],
    ids=["three_attempts", "sql_retry_never"],
)
async def test_a_server_that_stays_down_costs_max_attempts_per_pool_attempt(
    stack: PsycopgStack, pools: MakePool, settings: dict[str, Any], per_pool_attempt: int
) -> None:
    """Against a port that never listens, the pool retries until ``reconnect_timeout`` and
    calls ``reconnect_failed``. Each of its attempts is exactly ``max_attempts`` connects
    of ours (with a budget that never runs out), or exactly one with
    ``sql_retry="never"``: the two loops multiply, by a known factor, and no further."""
    stack.instrument("ours_only", **settings)
    gave_up = asyncio.Event()

    async def reconnect_failed(pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
        gave_up.set()

    pool = pools(free_port(), reconnect_timeout=0.3, reconnect_failed=reconnect_failed)
    await pool.open(wait=False)
    await asyncio.wait_for(gave_up.wait(), 10)
    pool_attempts = stats(pool)["connections_num"]
    assert pool_attempts >= 2 and stats(pool)["connections_errors"] == pool_attempts
    assert stack.calls["connect"] == per_pool_attempt * pool_attempts
    recoveries = stack.spans_all()
    assert len(recoveries) == pool_attempts
    attempts = [dict(s.attributes or {})["otel_recovery.retry.attempts"] for s in recoveries]
    assert attempts == [per_pool_attempt] * pool_attempts


# -- a terminated idle connection ----------------------------------------------------------


async def test_the_pools_check_replaces_a_terminated_idle_connection(
    stack: PsycopgStack, pools: MakePool
) -> None:
    """With ``check=check_connection`` the pool finds the dead connection itself: its check
    statement fails once (not retried by us; counted on the breaker, as statements are),
    the pool discards the connection, connects anew (one plain connect), and the app gets
    a working connection without seeing an error."""
    stack.instrument("ours_only")
    pool = pools(check=psycopg_pool.AsyncConnectionPool.check_connection)
    await pool.open(wait=True, timeout=10)
    pid = await backend_pid(pool)
    stack.reset()
    stack.sent.clear()
    stack.raised.clear()
    kill_idle(pid)
    async with pool.connection() as conn:
        assert conn.info.backend_pid != pid
        cursor = await conn.execute("SELECT 41 + 1")
        assert await cursor.fetchone() == (42,)
    assert stack.sent == ["", "", "SELECT 41 + 1"]  # the failed check, the passing one
    (raised,) = stack.raised
    assert isinstance(raised, TERMINATED)
    assert stats(pool)["connections_num"] == 2 and stats(pool).get("connections_errors", 0) == 0
    assert stack.calls["connect"] == 1
    assert stack.failures() == 1


async def test_without_a_check_the_app_sees_the_disconnect_once_and_the_pool_heals(
    stack: PsycopgStack, pools: MakePool
) -> None:
    """Without a check the app's statement meets the dead backend: it gets psycopg's own
    error, sent once; the pool notices the broken connection when it comes back, replaces
    it, and the next checkout works."""
    stack.instrument("ours_only")
    pool = pools()
    await pool.open(wait=True, timeout=10)
    pid = await backend_pid(pool)
    stack.reset()
    stack.sent.clear()
    kill_idle(pid)
    with pytest.raises(TERMINATED) as caught:
        await select(pool, "SELECT 1 /* otelrec_after_idle_kill */")
    assert any(raised is caught.value for raised in stack.raised)
    assert stack.sent_with("otelrec_after_idle_kill") == 1
    assert await select(pool, "SELECT pg_backend_pid()") != pid
    assert stats(pool)["returns_bad"] == 1  # noticed when the app gave it back
    assert stack.calls["connect"] == 1
    assert stack.failures() == 1


# -- lifecycle -----------------------------------------------------------------------------


async def test_an_open_circuit_skips_the_check_and_keeps_the_pooled_connection(
    stack: PsycopgStack, pools: MakePool
) -> None:
    """The async pool's check, while our circuit refuses statements: not sent, the app's
    statement fails at once (not a PoolTimeout after the pool's wait), same connection
    after the circuit closes."""
    stack.instrument("contrib_first")
    pool = pools(check=psycopg_pool.AsyncConnectionPool.check_connection, timeout=2)
    await pool.open(wait=True, timeout=10)
    pid = await backend_pid(pool)
    breaker = stack.breaker()
    breaker.force_open()
    stack.reset()
    stack.sent.clear()
    with pytest.raises(PsycopgCircuitOpenError):
        await select(pool, "SELECT 1")
    assert stack.sent == [] and stack.calls["connect"] == 0
    breaker.reset()
    assert await backend_pid(pool) == pid
    assert stack.sent == [""]  # once closed, the check is sent again
    assert stats(pool).get("connections_lost", 0) == 0


async def test_close_and_uninstrument_leave_nothing_behind(
    stack: PsycopgStack, pools: MakePool
) -> None:
    """A pool used while instrumented, then closed, then our instrumentor removed: no task
    of the pool's is left running, a pool still open across the uninstrument keeps working
    with nothing of ours on its path (a refused reconnect is the pool's own business
    again, tried once per pool attempt, and no span of ours is made)."""
    stack.instrument("ours_only")
    closed = pools()
    await closed.open(wait=True, timeout=10)
    assert await select(closed, "SELECT 1") == 1
    kept = pools()
    await kept.open(wait=True, timeout=10)
    assert await select(kept, "SELECT 2") == 2
    await closed.close()
    stack.ours.uninstrument()
    stack.reset()

    assert await select(kept, "SELECT 3") == 3  # a connection made while instrumented
    port = free_port()
    stack.listen_on_second_attempt(port)
    fresh = pools(port)
    await fresh.open(wait=True, timeout=10)
    assert await select(fresh, "SELECT 4") == 4
    assert stack.calls["connect"] == 2
    assert stats(fresh)["connections_errors"] == 1  # the pool's own loop retried
    assert stack.spans_all() == []
    await fresh.close()
    await kept.close()
    mine = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not mine and not t.done()] == []
