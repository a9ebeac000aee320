"""The PostgreSQL store under real faults: sessions the server ends, a server that stops
answering, a read-only server, dropped tables, and a new event loop per ``asyncio.run``.

Every test uses tables (or, for server-wide settings, a database) of its own on the shared
server and kills or freezes only its own store's sessions: by backend pid, or through a TCP
front of its own that stops forwarding.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import PG_HOST, PG_PORT, TcpFront, eventually, kill_idle, pg_admin

from otel_recovery.stores import (
    ResilientStore,
    StoreConfigError,
    StoreUnavailableError,
    open_store,
)
from otel_recovery.stores._socket_watchdog import WATCHDOG
from otel_recovery.stores.postgres import PostgresStore
from otel_recovery.testing import FakeClock

from .conftest import POSTGRES_URL, cleanup, require, unique

pytestmark = pytest.mark.server


@pytest.fixture
def table() -> Iterator[str]:
    require("postgres")
    name = unique("otr_f")
    yield name
    cleanup("postgres", name)


@pytest.fixture
def private_db() -> Iterator[str]:
    """A database of our own, for settings that apply to a whole database."""
    require("postgres")
    name = f"otr_faults_{uuid.uuid4().hex[:10]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield name
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _store(table: str, url: str = POSTGRES_URL, **options: Any) -> PostgresStore:
    return PostgresStore(url, table=table, clock=FakeClock(), **options)


OPERATION_TIMEOUT = 1.2
"""The ``operation_timeout`` of the tests that freeze the server (or hold a lock) until an
operation gave up: the healthy operations of the same store must beat it, the first one with
its connect and its tables (20-35 ms on an idle machine; 0.3-0.5 s left a loaded one little
margin). The fault lasts until the limit fired, so a longer limit costs time only."""


def _backend(store: PostgresStore) -> int:
    assert store._conn is not None
    return int(store._conn.info.backend_pid)


def _versions(table: str, key: str) -> list[int]:
    with pg_admin() as admin:
        rows = admin.execute(
            f'SELECT version FROM "{table}_records" WHERE key = %s ORDER BY version', (key,)
        ).fetchall()
    return [int(row[0]) for row in rows]


# -- A: a session the server ended while it was idle ------------------------------------------


def test_every_operation_goes_through_after_the_idle_session_was_terminated(table: str) -> None:
    store = _store(table)
    assert store.put("job", b'{"n": 1}').version == 1
    assert store.incr("stats", {"calls": 1}, batch_id="b1")
    operations: list[tuple[str, Callable[[], object]]] = [
        ("put", lambda: store.put("job", b'{"n": 2}').version),
        ("get", lambda: store.get("job").version),  # type: ignore[union-attr]
        ("compare-and-set", lambda: store.put("job", b'{"n": 3}', expected_version=2).version),
        ("list", lambda: [r.version for r in store.list("jo")]),
        ("incr", lambda: store.incr("stats", {"calls": 1})),
        ("counters", lambda: store.counters("stats")),
        ("delete", lambda: store.delete("other")),
    ]
    answers = {}
    for name, operation in operations:
        kill_idle(_backend(store))
        answers[name] = operation()
    assert answers == {
        "put": 2,
        "get": 2,
        "compare-and-set": 3,
        "list": [3],
        "incr": True,
        "counters": {"calls": 2.0},
        "delete": 0,
    }
    assert _versions(table, "job") == [1, 2, 3]  # each applied once
    store.close()


async def test_every_awaited_operation_goes_through_after_the_session_was_terminated(
    table: str,
) -> None:
    application = unique("otr_app")
    store = _store(table, f"{POSTGRES_URL}?application_name={application}")
    assert (await store.aput("job", b"1")).version == 1

    async def killed() -> None:
        await asyncio.to_thread(_kill_sessions, application)

    await killed()
    assert (await store.aput("job", b"2")).version == 2
    await killed()
    assert (await store.aget("job")).data == b"2"  # type: ignore[union-attr]
    await killed()
    assert (await store.aput("job", b"3", expected_version=2)).version == 3
    await killed()
    assert await store.aincr("stats", {"calls": 1}, batch_id="b1")
    await killed()
    assert await store.acounters("stats") == {"calls": 1.0}
    await killed()
    assert [r.version for r in await store.alist("")] == [3]
    assert _versions(table, "job") == [1, 2, 3]
    await store.aclose()


def _kill_sessions(application: str) -> None:
    with pg_admin() as admin:
        pids = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
        ).fetchall()
    assert pids
    for (pid,) in pids:
        kill_idle(pid)


def test_a_checkpoint_store_stays_healthy_across_the_terminated_session(table: str) -> None:
    resilient = ResilientStore(_store(table))
    resilient.put("job", b"1")
    kill_idle(_backend(resilient.store))  # type: ignore[arg-type]
    assert resilient.put("job", b"2").version == 2
    assert not resilient.degraded
    assert _versions(table, "job") == [1, 2]  # in PostgreSQL now, not in a local journal
    resilient.close()


def _race(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server ends the session just after the idle check passed: kill the idle backend,
    and have the check pass anyway (the microseconds between check and send, made long)."""
    import otel_recovery.stores._postgres_connections as connections

    kill_idle(_backend(store))
    monkeypatch.setattr(connections, "stale", lambda conn: False)


def test_after_the_check_a_read_or_a_transaction_runs_once_more(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session ended on the first round trip, which carried a read or a BEGIN: nothing
    can have run, so it runs once more on a new connection."""
    store = _store(table)
    store.put("job", b"1")
    _race(store, monkeypatch)
    assert store.get("job").version == 1  # type: ignore[union-attr]
    _race(store, monkeypatch)
    assert store.put("job", b"2", expected_version=1).version == 2
    _race(store, monkeypatch)
    assert store.incr("stats", {"calls": 1})
    assert store.counters("stats") == {"calls": 1.0}
    assert _versions(table, "job") == [1, 2]
    store.close()


async def test_after_the_check_an_awaited_read_runs_once_more(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import otel_recovery.stores._postgres_connections as connections

    application = unique("otr_app")
    store = _store(table, f"{POSTGRES_URL}?application_name={application}")
    await store.aput("job", b"1")
    await asyncio.to_thread(_kill_sessions, application)
    monkeypatch.setattr(connections, "stale", lambda conn: False)
    assert (await store.aget("job")).version == 1  # type: ignore[union-attr]
    await asyncio.to_thread(_kill_sessions, application)
    assert (await store.aput("job", b"2", expected_version=1)).version == 2
    await store.aclose()


def test_a_plain_put_whose_session_ended_under_it_is_never_sent_again(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain put is one statement, sent in the first round trip: when the session ends
    there, it may have committed, so it is reported unavailable, not sent a second time."""
    store = _store(table)
    store.put("job", b"1")
    _race(store, monkeypatch)
    with pytest.raises(StoreUnavailableError, match="terminating connection"):
        store.put("job", b"2")
    assert _versions(table, "job") == [1]
    store.close()


def test_a_write_cut_after_its_first_round_trip_is_not_sent_again(table: str) -> None:
    """Killed while it waits for the key's row lock (second round trip, after BEGIN): the
    server rolls it back, and the store reports it rather than running it again."""
    store = _store(table)
    store.put("job", b"1")
    pid = _backend(store)
    with pg_admin() as holder:
        holder.execute("BEGIN")
        holder.execute(f'SELECT 1 FROM "{table}_heads" WHERE key = %s FOR UPDATE', ("job",))
        killer = threading.Thread(target=_kill_when_waiting, args=(pid,), daemon=True)
        killer.start()
        with pytest.raises(StoreUnavailableError, match="terminating connection"):
            store.put("job", b"2", expected_version=1)
        killer.join(10)
        holder.execute("ROLLBACK")
    assert _versions(table, "job") == [1]
    assert store.put("job", b"2", expected_version=1).version == 2  # a new connection
    store.close()


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_plain_put_cut_at_the_timeout_does_not_land_later(table: str, driver: str) -> None:
    """A plain put blocked on the key's row lock past ``operation_timeout``: the watchdog
    closes our socket, but the server's statement would go on waiting and commit once the
    lock is free (autocommit), after the caller was told it failed, so the ResilientStore
    replay would write it a second time. The store cancels the statement on the server.
    (The lock is held until the put gave up, so a longer limit costs time only; the first
    put, which connects and makes the tables, must beat it on a loaded machine too.)"""
    store = _store(table, operation_timeout=OPERATION_TIMEOUT)
    store.put("job", b"1")

    async def put_async() -> None:
        try:
            await store.aput("job", b"2")
        finally:
            await store.aclose()

    with pg_admin() as holder:
        holder.execute("BEGIN")
        holder.execute(f'SELECT 1 FROM "{table}_heads" WHERE key = %s FOR UPDATE', ("job",))
        with pytest.raises(StoreUnavailableError, match=r"no reply within 1\.2 s"):
            if driver == "sync":
                store.put("job", b"2")
            else:
                asyncio.run(put_async())
        with pg_admin() as admin:  # the cut statement is no longer waiting for the lock
            eventually(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE %s",
                        (f'%"{table}_heads"%',),
                    ).fetchone()[0]
                    == 0
                ),
                timeout=5,
            )
        holder.execute("COMMIT")
    time.sleep(0.2)  # had it still been waiting, it would have committed by now
    assert _versions(table, "job") == [1]
    store.close()


def _kill_when_waiting(pid: int) -> None:
    with pg_admin() as admin:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                (pid,),
            ).fetchone():
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                return
            time.sleep(0.01)


# -- B: a server that stops answering ----------------------------------------------------------


class FreezingFront(TcpFront):
    """A TCP front to PostgreSQL whose ``frozen`` event stops it answering."""

    def __init__(self) -> None:
        super().__init__((PG_HOST, PG_PORT))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"


@pytest.fixture
def front() -> Iterator[FreezingFront]:
    require("postgres")
    found = FreezingFront()
    yield found
    found.close()


def _bounded(call: Callable[[], object], limit: float) -> object:
    """``call()``'s result or exception, failing the test if it takes longer than ``limit``."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit} s"
    return outcome[0]


def test_a_server_that_stops_answering_fails_the_operation_at_the_timeout(
    table: str, front: FreezingFront
) -> None:
    store = _store(table, f"{front.url}?operation_timeout=1.2")  # see OPERATION_TIMEOUT
    assert store.operation_timeout == OPERATION_TIMEOUT
    store.put("job", b"1")
    front.frozen.set()
    started = time.monotonic()
    outcome = _bounded(lambda: store.get("job"), 5.0)
    assert isinstance(outcome, StoreUnavailableError), outcome
    assert "no reply within 1.2 s (operation_timeout)" in str(outcome)
    assert 1.1 <= time.monotonic() - started < 2.9
    assert store._conn is None  # discarded
    front.frozen.clear()
    assert store.get("job").data == b"1"  # type: ignore[union-attr]
    store.close()
    assert not WATCHDOG._armed and not WATCHDOG._fired  # every deadline was taken back


def test_other_query_options_reach_libpq_as_written(table: str) -> None:
    """Removing operation_timeout keeps the rest byte for byte (libpq decodes %20, not +)."""
    store = _store(
        table, f"{POSTGRES_URL}?options=-c%20statement_timeout%3D4321&operation_timeout=3"
    )
    assert store.operation_timeout == 3.0
    store.put("job", b"1")
    assert store._conn is not None
    assert store._conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
    store.close()


def test_a_url_without_a_host_keeps_its_empty_authority() -> None:
    """``postgresql:///db?host=/socket-dir`` (a Unix socket) lost its ``//`` when the option
    was cut out (``postgresql:/db``), which libpq cannot read."""
    from otel_recovery.stores.postgres import _split_option

    assert _split_option("postgresql:///test?host=/tmp&operation_timeout=2") == (
        "postgresql:///test?host=/tmp",
        "2",
    )
    assert _split_option("postgresql://u@h/db?operation_timeout=2") == ("postgresql://u@h/db", "2")


def test_other_threads_wait_for_the_connection_no_longer_than_the_timeout(
    table: str, front: FreezingFront
) -> None:
    store = _store(table, front.url, operation_timeout=OPERATION_TIMEOUT, connect_timeout=2)
    store.put("job", b"1")
    front.frozen.set()
    outcomes: list[object] = []
    # A thread that takes the lock just as the first one gives up connects anew, to the
    # frozen front: up to the operation timeout, then connect_timeout (3.2 s in all).
    threads = [
        threading.Thread(target=lambda: outcomes.append(_bounded(lambda: store.get("job"), 8)))
        for _ in range(3)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(outcomes) == 3
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
    assert time.monotonic() - started < 8.0
    front.frozen.clear()
    store.close()


async def test_an_awaited_operation_on_a_server_that_stops_answering_fails_at_the_timeout(
    table: str, front: FreezingFront
) -> None:
    store = _store(table, front.url, operation_timeout=OPERATION_TIMEOUT)
    await store.aput("job", b"1")
    front.frozen.set()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"no reply within 1\.2 s"):
        await asyncio.wait_for(store.aget("job"), 5.0)
    assert time.monotonic() - started < 2.9
    front.frozen.clear()
    assert (await store.aget("job")).data == b"1"  # type: ignore[union-attr]
    await store.aclose()


def test_a_checkpoint_store_degrades_when_the_server_stops_answering(
    table: str, front: FreezingFront
) -> None:
    resilient = ResilientStore(_store(table, front.url, operation_timeout=OPERATION_TIMEOUT))
    resilient.put("job", b"1")
    front.frozen.set()
    outcome = _bounded(lambda: resilient.get("job"), 5.0)
    assert outcome is not None and outcome.data == b"1"  # type: ignore[attr-defined]
    assert resilient.degraded
    front.frozen.clear()
    resilient.close()


def test_the_operation_timeout_comes_from_the_store_url(table: str) -> None:
    store = open_store(f"{POSTGRES_URL}?table={table}&operation_timeout=2.5")
    assert isinstance(store, PostgresStore)
    assert store.operation_timeout == 2.5
    assert "operation_timeout" not in store._target  # libpq refuses unknown URI options
    store.put("job", b"1")  # connects
    store.close()
    default = open_store(f"{POSTGRES_URL}?table={table}")
    assert default.operation_timeout == 5.0  # type: ignore[attr-defined]
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(StoreConfigError, match=f"operation_timeout.*{bad!r}"):
            open_store(f"{POSTGRES_URL}?table={table}&operation_timeout={bad}")


# -- C: a read-only server, a dropped table ---------------------------------------------------


def _read_only(db: str, on: bool) -> None:
    with pg_admin() as admin:
        if on:
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
        else:
            admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')


def _db_url(db: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{db}"


def test_a_read_only_server_serves_reads_and_refuses_writes_as_unavailable(
    private_db: str,
) -> None:
    _store("cp", _db_url(private_db)).put("job", b'{"n": 1}')
    _read_only(private_db, True)
    store = _store("cp", _db_url(private_db))
    assert store.get("job").data == b'{"n": 1}'  # type: ignore[union-attr]
    assert store.counters("stats") == {}
    with pytest.raises(StoreUnavailableError, match="read-only transaction"):
        store.put("job", b'{"n": 2}')
    with pytest.raises(StoreUnavailableError, match="read-only transaction"):
        store.put("job", b'{"n": 2}', expected_version=1)
    with pytest.raises(StoreUnavailableError, match="read-only transaction"):
        store.incr("stats", {"calls": 1}, batch_id="b1")
    store.close()


async def test_an_awaited_write_on_a_read_only_server_is_unavailable(private_db: str) -> None:
    await _store("cp", _db_url(private_db)).aput("job", b"1")
    _read_only(private_db, True)
    store = _store("cp", _db_url(private_db))
    assert (await store.aget("job")).data == b"1"  # type: ignore[union-attr]
    with pytest.raises(StoreUnavailableError, match="read-only transaction"):
        await store.aput("job", b"2")
    await store.aclose()


def test_a_checkpoint_store_degrades_on_a_read_only_server(private_db: str) -> None:
    _store("cp", _db_url(private_db)).put("job", b"1")
    _read_only(private_db, True)
    resilient = ResilientStore(_store("cp", _db_url(private_db)))
    assert resilient.get("job").data == b"1"  # type: ignore[union-attr]
    resilient.put("job", b"2")  # kept locally, replayed later
    assert resilient.degraded
    resilient.close()


def test_a_schema_that_could_not_be_created_is_tried_again_on_the_next_connection(
    private_db: str,
) -> None:
    _read_only(private_db, True)
    store = _store("cp", _db_url(private_db))
    with pytest.raises(StoreUnavailableError, match="read-only transaction"):
        store.get("job")
    _read_only(private_db, False)  # the primary is back (new sessions are writable)
    assert store.get("job") is None
    assert store.put("job", b"1").version == 1
    store.close()


def test_a_table_dropped_under_a_running_store_is_created_again(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(table)
    store.put("job", b"1")
    with pg_admin() as admin:
        admin.execute(f'DROP TABLE "{table}_records"')
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert store.get("job") is None  # what was in it is gone with it
    assert "created the missing tables again" in caplog.text
    assert store.put("job", b"2").version == 2  # the heads table kept the numbering
    with pg_admin() as admin:
        admin.execute(f'DROP TABLE "{table}_counters"')
    assert store.incr("stats", {"calls": 1})
    assert store.counters("stats") == {"calls": 1.0}
    store.close()


async def test_a_table_dropped_under_an_awaiting_store_is_created_again(table: str) -> None:
    store = _store(table)
    await store.aput("job", b"1")
    with pg_admin() as admin:
        admin.execute(f'DROP TABLE "{table}_records"')
    assert await store.aget("job") is None
    assert (await store.aput("job", b"2")).version == 2
    await store.aclose()


# -- D: one event loop per asyncio.run ----------------------------------------------------------


def _sessions(application: str) -> int:
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application,)
        ).fetchone()
    return int(row[0])


def test_connections_of_closed_event_loops_are_closed(table: str) -> None:
    application = unique("otr_app")
    store = _store(table, f"{POSTGRES_URL}?application_name={application}")
    store.put("job", b"1")
    gc.collect()  # earlier tests' garbage (a Redis client's socket) warns now, not below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            assert asyncio.run(store.aget("job")).data == b"1"  # type: ignore[union-attr]
        # the sync one, and at most the last loop's
        assert eventually(lambda: _sessions(application) <= 2)
        store.close()
        assert eventually(lambda: _sessions(application) == 0)
        gc.collect()
    leaked = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and _about_postgres(str(w.message))
    ]
    assert not leaked, leaked


def _about_postgres(message: str) -> bool:
    """A warning about a PostgreSQL session or socket (not another test's Redis client)."""
    return "psycopg" in message or f", {PG_PORT})" in message or f"port={PG_PORT}" in message


def test_aclose_closes_the_running_loop_s_connection_and_the_closed_loops(table: str) -> None:
    application = unique("otr_app")
    store = _store(table, f"{POSTGRES_URL}?application_name={application}")
    asyncio.run(store.aput("job", b"1"))

    async def last() -> None:
        await store.aget("job")
        await store.aclose()

    asyncio.run(last())
    assert eventually(lambda: _sessions(application) == 0)


def test_a_connection_is_never_closed_under_a_running_operation(table: str) -> None:
    """close() from another thread leaves a loop's connection alone while it is in use."""
    store = _store(table)
    asyncio.run(store.aput("job", b"1"))
    started, release = threading.Event(), threading.Event()

    async def busy() -> bytes:
        await store.aget("job")
        entry = store._aconns[asyncio.get_running_loop()]
        async with entry.lock:  # as an operation in progress holds it
            started.set()
            await asyncio.to_thread(release.wait, 10)
        record = await store.aget("job")
        assert record is not None
        return record.data

    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(busy())))
    thread.start()
    assert started.wait(10)
    store.close()
    release.set()
    thread.join(10)
    assert result == [b"1"]
    store.close()


def test_psycopg_connection_errors_are_unavailable(table: str) -> None:
    """Nothing listening: the connection phase fails as unavailable, not with a raw error."""
    with socket.socket() as held:  # bound, not listening, for the test: nobody else takes it
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        store = _store(table, f"postgresql://postgres@127.0.0.1:{port}/test")
        with pytest.raises(StoreUnavailableError):
            store.get("job")
        with pytest.raises(StoreUnavailableError):
            asyncio.run(store.aget("job"))


async def test_a_task_cancelled_as_the_connection_comes_free_is_cancelled(table: str) -> None:
    """Waiting for the loop's connection went through asyncio.wait_for, which (Python 3.11)
    returns normally when the cancellation lands just after the lock was handed over: the
    write of a task its caller had cancelled still ran."""
    store = _store(table)
    await store.aget("warm")
    entry = store._loop_entry(asyncio.get_running_loop())
    await entry.lock.acquire()  # another operation holds the connection
    waiting = asyncio.create_task(store.aput("k", b'"from a cancelled task"'))
    for _ in range(3):
        await asyncio.sleep(0)  # it waits for the lock
    entry.lock.release()  # the lock goes to it ...
    waiting.cancel()  # ... and it is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await store.aget("k") is None
    await store.aclose()
