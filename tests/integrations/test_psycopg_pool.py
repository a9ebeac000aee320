"""psycopg_pool.ConnectionPool over our psycopg layer, against the real PostgreSQL.

The pool's worker threads open connections with ``Connection.connect`` (patched: our
connect retry runs inside the worker) and have a reconnect loop of their own
(``AddConnection``, exponential backoff from 1 s until ``reconnect_timeout``). Its
``check()`` / ``check_connection`` run ``conn.execute("")`` (patched: a statement, never
retried) and drop a connection that fails. These tests check that the two layers add up
to an exact, bounded number of connection attempts, that what the pool hides from the app
stays hidden, and that nothing of ours outlives ``uninstrument()``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from instrumentors.test_psycopg import (
    SITES,
    TERMINATED,
    _chain_has_ours,
    assert_connect_recovered,
    dsn,
    events,
)
from ours import marked_by_us
from psycopg_pool import ConnectionPool, PoolTimeout
from servers import PG_DSN, PG_PORT, PgFront, free_port, kill_idle

from integrations.sync_pg import ORDERS, SyncHarness, assert_not_retried
from otel_recovery.instrumentors.psycopg import PsycopgCircuitOpenError
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitState
from otel_recovery.testing import FakeClock

pytestmark = pytest.mark.server


class PoolHarness(SyncHarness):
    """The psycopg harness, plus pools it closes before uninstrumenting."""

    def __init__(self) -> None:
        super().__init__()
        self.pools: list[ConnectionPool[Any]] = []

    def pool(self, conninfo: str = PG_DSN, **options: Any) -> ConnectionPool[Any]:
        """A closed pool of one connection with a unique name (its threads carry it)."""
        options.setdefault("min_size", 1)
        options.setdefault("max_size", 1)
        options.setdefault("name", f"otelrec-{uuid.uuid4().hex[:8]}")
        pool: ConnectionPool[Any] = ConnectionPool(conninfo, open=False, **options)
        self.pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        super().close()


@pytest.fixture
def h() -> Iterator[PoolHarness]:
    harness = PoolHarness()
    try:
        yield harness
    finally:
        harness.close()


def pool_threads(pool: ConnectionPool[Any]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{pool.name}-")]


def backend_pid(pool: ConnectionPool[Any]) -> int:
    with pool.connection(timeout=10) as conn:
        pid: int = conn.info.backend_pid
        return pid


def select_42(pool: ConnectionPool[Any]) -> int:
    with pool.connection(timeout=10) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        pid: int = conn.info.backend_pid
        return pid


# -- the pool's workers connect through our retry ------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_pool_opens_against_a_refused_port_that_starts_listening(
    h: PoolHarness, order: str
) -> None:
    """The worker's first connect meets a refused port; our retry connects on the second
    attempt, inside the worker, so the pool never sees a failure (no error in its stats, no
    1 s reconnect delay of its own) and ``open(wait=True)`` returns a full pool."""
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    pool = h.pool(dsn(port))
    pool.open(wait=True, timeout=10)
    stats = pool.get_stats()
    assert stats["connections_num"] == 1 and "connections_errors" not in stats
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1
    failed = assert_connect_recovered(h, port, attempts=2)
    assert "Connection refused" in failed["otel_recovery.error.message"]
    select_42(pool)
    assert h.calls["connect"] == 2  # the app used the connection the retry made


def test_pool_reconnect_loop_and_our_retry_multiply_to_an_exact_bound(h: PoolHarness) -> None:
    """A port that stays refused: each of the pool's reconnect attempts is max_attempts
    connects of ours (backoff on our virtual clock, so no worker thread sleeps), the pool
    gives up after ``reconnect_timeout`` as it would without us, and 2 pool attempts x 3 is
    exactly 6 connects. Once the server listens, the next request connects once: our
    breaker (2 logical failures) did not turn the outage into a longer one."""
    clock = FakeClock()
    h.instrument(max_attempts=3, clock=clock)
    port = free_port()
    gave_up = threading.Event()
    pool = h.pool(dsn(port), reconnect_timeout=0.2, reconnect_failed=lambda _: gave_up.set())
    pool.open(wait=False)
    assert gave_up.wait(10), "the pool never gave up reconnecting"
    stats = pool.get_stats()
    assert stats["connections_num"] == 2 and stats["connections_errors"] == 2
    assert h.calls["connect"] == 2 * 3
    assert len(clock.sleeps) == 2 * 2  # our backoffs, virtual
    assert h.breaker_failures(port) == 2  # one failure per logical connect
    spans = h.spans(f"recover psycopg 127.0.0.1:{port}")
    assert [dict(s.attributes or {})["otel_recovery.retry.attempts"] for s in spans] == [3, 3]

    h.fronts.append(PgFront(port))
    h.reset()
    select_42(pool)
    assert h.calls["connect"] == 1 and h.fronts[0].accepted == 1


# -- a terminated idle connection ----------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_pool_check_discards_a_terminated_idle_connection(h: PoolHarness, order: str) -> None:
    """``pool.check()`` runs ``execute("")`` on the idle connection whose backend was killed:
    the check fails once (not retried; psycopg's error on the span), the pool counts the
    connection lost and replaces it, and the app's next request gets a fresh connection
    with no error and exactly one new connect."""
    h.instrument(order)
    pool = h.pool()
    pool.open(wait=True, timeout=10)
    pid = backend_pid(pool)
    kill_idle(pid)
    h.reset()
    pool.check()
    assert select_42(pool) != pid
    assert pool.get_stats()["connections_lost"] == 1
    assert h.calls["connect"] == 1 and h.calls["execute"] == 2  # the check, the SELECT
    (span,) = [s for s in h.exporter.get_finished_spans() if events(s, "otel_recovery.give_up")]
    failed = assert_not_retried(span, contrib=h.contrib)
    assert failed["error.type"] == f"{TERMINATED.__module__}.{TERMINATED.__qualname__}"
    assert h.breaker_failures(PG_PORT) == 1


def test_getconn_check_hides_a_terminated_connection_from_the_app(h: PoolHarness) -> None:
    """With ``check=ConnectionPool.check_connection`` the pool tests a connection before
    handing it out: the dead one fails the check (once, not retried by us), the pool
    replaces it, and the app's ``connection()`` block runs without seeing any error."""
    h.instrument()
    pool = h.pool(check=ConnectionPool.check_connection)
    pool.open(wait=True, timeout=10)
    pid = backend_pid(pool)
    kill_idle(pid)
    h.reset()
    assert select_42(pool) != pid
    assert h.calls["connect"] == 1
    assert h.calls["execute"] == 3  # failed check, check of the new connection, SELECT
    assert pool.get_stats().get("requests_errors", 0) == 0


def checked_pool(h: PoolHarness) -> tuple[ConnectionPool[Any], int]:
    """An open pool that checks connections (``check_connection``) and gives up waiting
    for one after 2 s, and the backend its connection is on."""
    pool = h.pool(check=ConnectionPool.check_connection, timeout=2)
    pool.open(wait=True, timeout=10)
    return pool, backend_pid(pool)


@pytest.mark.parametrize("order", ORDERS)
def test_an_open_circuit_skips_the_check_and_keeps_the_pooled_connection(
    h: PoolHarness, order: str
) -> None:
    """While our circuit for the server refuses statements, the pool's check is not sent
    (it would be refused like any statement, the pool would discard the good connection
    and then wait until PoolTimeout for a new one our circuit also refuses): the app's
    statement fails at once with the circuit's error, and the same connection serves once
    the circuit closes. The skip is an event on the current span."""
    h.instrument(order)
    pool, pid = checked_pool(h)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    h.reset()
    with h.provider.get_tracer("test").start_as_current_span("request"):
        with pytest.raises(PsycopgCircuitOpenError), pool.connection() as conn:
            conn.execute("SELECT 1")
    assert h.calls["execute"] == 0 and h.calls["connect"] == 0  # nothing was sent
    (request,) = h.spans("request")
    (skipped,) = events(request, "otel_recovery.health_check.skipped")
    assert skipped == {
        "otel_recovery.health_check": "psycopg_pool ConnectionPool.check_connection",
        "otel_recovery.breaker": breaker.name,
    }
    breaker.reset()
    assert select_42(pool) == pid  # kept
    assert h.calls["execute"] == 2  # once closed, the check is sent again (then the SELECT)
    assert pool.get_stats().get("connections_lost", 0) == 0


def test_a_half_open_circuit_with_its_probe_out_skips_the_check_too(h: PoolHarness) -> None:
    """Half-open with every probe permit taken (another request is probing) refuses calls
    like an open circuit: the check is skipped then too (found by review: it was sent,
    refused, and the pool waited for PoolTimeout). Once the permit is back the check is
    the probe, sent through the breaker, and its success closes the circuit."""
    clock = FakeClock()
    h.instrument(clock=clock, breaker_minimum_calls=1, breaker_window=1, breaker_open_seconds=5)
    pool, pid = checked_pool(h)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.record_failure()
    clock.advance(5)
    assert breaker.can_execute()  # another request's probe
    h.reset()
    with pytest.raises(PsycopgCircuitOpenError), pool.connection() as conn:
        conn.execute("SELECT 1")
    assert h.calls["execute"] == 0
    breaker.release()
    assert select_42(pool) == pid
    assert h.calls["execute"] == 2 and breaker.state is CircuitState.CLOSED


def test_a_check_refused_as_it_asks_is_answered_healthy_too(
    h: PoolHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``would_refuse()`` can say no a moment before the circuit refuses (another thread
    takes the last probe permit; a fleet-wide breaker must ask Redis): the check is then
    sent, and our refusal comes back from it. That refusal is answered "healthy" as well,
    so the pool keeps its connection and the app fails fast (found by review)."""
    monkeypatch.setattr(CircuitBreaker, "would_refuse", lambda self: False)
    h.instrument()
    pool, pid = checked_pool(h)
    assert h.ours.targets is not None
    (breaker,) = h.ours.targets.breakers()
    breaker.force_open()
    h.reset()
    with pytest.raises(PsycopgCircuitOpenError), pool.connection() as conn:
        conn.execute("SELECT 1")
    assert h.calls["execute"] == 0
    breaker.reset()
    assert select_42(pool) == pid


# -- lifecycle -----------------------------------------------------------------------------


def test_closing_the_pool_and_uninstrumenting_leaves_nothing_behind(h: PoolHarness) -> None:
    """After ``pool.close()`` and ``uninstrument()``: no pool thread is left, no patched
    site has a layer of ours, and a new pool meeting a server that is starting up is not
    retried (its worker sees the 57P03 itself) and makes no span of ours."""
    h.instrument("ours_first")
    pool = h.pool()
    pool.open(wait=True, timeout=10)
    select_42(pool)
    pool.close()
    h.ours.uninstrument()
    assert pool_threads(pool) == []
    sites = [*SITES, (psycopg.Cursor, "executemany"), (psycopg.AsyncCursor, "executemany")]
    for owner, attribute in sites:
        assert not _chain_has_ours(vars(owner)[attribute]), (owner, attribute)
    assert h.ours.targets is None

    front = PgFront(starting_up=1)
    h.fronts.append(front)
    h.reset()
    gave_up = threading.Event()
    after = h.pool(dsn(front.port), reconnect_timeout=5, reconnect_failed=lambda _: gave_up.set())
    after.open(wait=True, timeout=10)  # the pool's own reconnect (about 1 s later) gets in
    assert h.calls["connect"] == 2 and front.accepted == 2
    assert after.get_stats()["connections_errors"] == 1  # the 57P03 reached the pool
    select_42(after)
    assert not marked_by_us(h.exporter.get_finished_spans())
    assert not gave_up.is_set()


def test_a_pool_timeout_is_the_pools_own_error(h: PoolHarness) -> None:
    """While every connection is in use, ``getconn`` times out with the pool's PoolTimeout:
    waiting is not a failure of ours to retry or to wrap."""
    h.instrument()
    pool = h.pool()
    pool.open(wait=True, timeout=10)
    with pool.connection() as busy:
        h.reset()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
        assert busy.execute("SELECT 1").fetchone() == (1,)
    assert h.calls["connect"] == 0
    assert not marked_by_us(h.exporter.get_finished_spans())
