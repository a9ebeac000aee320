"""Expired records of keys that are never written again leave the backing storage.

A put removes the expired versions of its own key; records of keys nobody writes again are
removed by a store-wide sweep (SQLite every 500 puts, PostgreSQL every 500 puts in bounded
batches, ``memory://`` a bounded number per put from an expiry heap). Only record data goes:
the version counters stay, so a key written again after its records were swept still gets
the next version, never one it had before. Every check looks at the storage itself (the
tables, the store's dicts), since reads hide expired records either way.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from servers import pg_admin

import otel_recovery.stores._postgres_sweep as sweep_module
import otel_recovery.stores.memory as memory_module
from otel_recovery.stores import Store
from otel_recovery.stores._postgres_sweep import ExpirySweep
from otel_recovery.stores.memory import MemoryStore
from otel_recovery.stores.postgres import PostgresStore
from otel_recovery.testing import FakeClock

from .conftest import POSTGRES_URL, Backend, backend_of, cleanup, require, unique

DATA = b'{"blob": "' + b"y" * 200 + b'"}'
SWEEPING = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=SWEEPING)
def sweeping(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    yield from backend_of(request.param, tmp_path)


@pytest.fixture
def table() -> Iterator[str]:
    require("postgres")
    name = unique("otr_x")
    yield name
    cleanup("postgres", name)


def stored(backend: Backend, store: Store) -> tuple[int, int, int]:
    """What the storage holds: (record rows, of which expired now, version-counter rows)."""
    now = backend.clock.wall()
    if backend.kind == "memory":
        assert isinstance(store, MemoryStore)
        records = [r for versions in store._records.values() for r in versions.values()]
        return len(records), sum(r.expired(now) for r in records), len(store._heads)
    query = (
        "SELECT (SELECT count(*) FROM {records}), "
        "(SELECT count(*) FROM {records} WHERE expires_at <= %s), (SELECT count(*) FROM {heads})"
    )
    if backend.kind == "sqlite":
        with sqlite3.connect(backend.tmp_path / f"{backend.name}.db") as conn:
            text = query.format(records="records", heads="heads").replace("%s", "?")
            row = conn.execute(text, (now,)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])
    return pg_counts(backend.name, now)


def pg_counts(table: str, now: float) -> tuple[int, int, int]:
    names = {p: sql.Identifier(f"{table}_{p}") for p in ("records", "heads")}
    query = sql.SQL(
        "SELECT (SELECT count(*) FROM {records}), "
        "(SELECT count(*) FROM {records} WHERE expires_at <= %s), (SELECT count(*) FROM {heads})"
    ).format(**names)
    with pg_admin() as admin:
        row = admin.execute(query, (now,)).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def test_expired_records_of_keys_never_written_again_are_removed(sweeping: Backend) -> None:
    store = sweeping.open()
    for n in range(600):
        store.put(f"job-{n}", DATA, ttl=1)
    store.put("again", b"1", ttl=1)
    store.put("again", b"2", ttl=1)
    store.put("kept", b"{}")
    sweeping.advance(2)
    assert store.list("job-") == [] and store.get("again") is None
    assert stored(sweeping, store) == (603, 602, 602)  # expired, hidden, but still stored

    for _ in range(1000):  # other work: the puts that sweep
        store.put("filler", b"{}")

    assert stored(sweeping, store) == (1 + 16, 0, 603)  # "kept" + filler's 16 versions
    if sweeping.kind == "memory":  # a key left without records is not kept either
        assert isinstance(store, MemoryStore)
        assert sorted(store._records) == ["filler", "kept"]
    # the version counters stayed: versions never repeat, even after the sweep
    assert store.put("again", b"3").version == 3
    assert store.put("job-7", DATA).version == 2
    assert store.get("kept") is not None and store.get("again", 2) is None


async def test_async_puts_sweep_too(sweeping: Backend) -> None:
    store = sweeping.open()
    for n in range(600):
        await store.aput(f"job-{n}", DATA, ttl=1)
    sweeping.advance(2)
    for _ in range(1000):
        await store.aput("filler", b"{}")
    assert stored(sweeping, store) == (16, 0, 601)
    assert (await store.aput("job-1", DATA)).version == 2
    await store.aclose()


# -- PostgreSQL: bounded batches, locks held elsewhere, failures ---------------------------


def _pg(table: str, **options: Any) -> PostgresStore:
    return PostgresStore(POSTGRES_URL, table=table, clock=FakeClock(), **options)


def _expired_wave(store: PostgresStore, count: int) -> None:
    for n in range(count):
        store.put(f"job-{n}", DATA, ttl=1)
    assert isinstance(store.clock, FakeClock)
    store.clock.advance(2)


def test_postgres_sweeps_in_bounded_batches_and_catches_up_while_they_come_back_full(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_module, "_SWEEP_EVERY", 10)
    monkeypatch.setattr(sweep_module, "_SWEEP_AGAIN", 3)
    monkeypatch.setattr(sweep_module, "_SWEEP_BATCH", 7)
    store = _pg(table)
    _expired_wave(store, 20)  # puts 1-20: sweeps at 10 and 20 found nothing expired yet
    now = store.clock.wall()
    left = []
    for _ in range(20):  # puts 21-40
        store.put("filler", b"{}")
        left.append(pg_counts(table, now)[1])
    # put 30 sweeps 7 (a full batch), so puts 33 and 36 sweep again; 36's batch is short
    assert left == [20] * 9 + [13] * 3 + [6] * 3 + [0] * 5
    store.close()


def test_postgres_sweep_skips_rows_locked_by_another_session(table: str) -> None:
    store = _pg(table)
    _expired_wave(store, 600)
    records = sql.Identifier(f"{table}_records")
    other = psycopg.connect(POSTGRES_URL)  # a transaction holding five expired rows
    try:
        other.execute(
            sql.SQL("SELECT 1 FROM {} WHERE key IN ('job-1','job-2','job-3','job-4','job-5') "
                    "FOR UPDATE").format(records)
        )  # fmt: skip
        started = time.monotonic()
        for _ in range(500):  # ends on put 1,100: sweeps at 1,000 and 1,050
            store.put("filler", b"{}")
        took = time.monotonic() - started
        assert pg_counts(table, store.clock.wall())[1] == 5  # only the locked rows are left
        assert took < 10  # nobody waited for the other session (its lock is still held)
    finally:
        other.rollback()
        other.close()
    for _ in range(500):
        store.put("filler", b"{}")
    assert pg_counts(table, store.clock.wall())[1] == 0
    store.close()


def test_postgres_sweep_blocked_by_a_table_lock_gives_up_at_once(
    table: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock on the whole table taken just before a put's sweep (a ``CREATE INDEX``, a
    ``LOCK TABLE``) and let go once the sweep gave up: the sweep's ``lock_timeout`` ends it
    at once, and the put returns its record."""
    store = _pg(table, operation_timeout=5)
    _expired_wave(store, 499)  # the 500th put sweeps
    other = psycopg.connect(POSTGRES_URL)
    real, real_failed = PostgresStore._sweep, ExpirySweep.failed

    def lock_first(self: PostgresStore, *args: Any) -> Any:
        other.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
            sql.Identifier(f"{table}_records")))  # fmt: skip
        return (yield from real(self, *args))

    def let_go(self: ExpirySweep, store: PostgresStore, exc: Exception) -> None:
        other.rollback()  # the lock's holder is done: the put itself goes through
        real_failed(self, store, exc)

    monkeypatch.setattr(PostgresStore, "_sweep", lock_first)
    monkeypatch.setattr(ExpirySweep, "failed", let_go)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="otel_recovery"):
            record = store.put("filler", b"{}")
        took = time.monotonic() - started
    finally:
        other.rollback()
        other.close()
    assert record.version == 1 and store.get("filler") == record
    # The sweep's lock_timeout (0.1 s) ended it, not its statement_timeout (1 s), the
    # watchdog (2 s) or the operation timeout (5 s): PostgreSQL says which, in the one
    # warning. The time is backed by that, so its bound is wide: half the operation timeout.
    (failure,) = [r.getMessage() for r in caplog.records if "sweep" in r.getMessage()]
    assert "canceling statement due to lock timeout" in failure, failure
    assert took < 2.5, f"the put waited {took:.2f} s for a sweep behind a table lock"
    assert pg_counts(table, store.clock.wall())[1] == 499  # nothing swept, nothing lost
    store.close()


def test_a_failing_postgres_sweep_never_fails_the_put_and_is_reported_once(
    table: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sweep_module, "_SWEEP_EVERY", 5)

    def broken(self: PostgresStore, *args: Any) -> Any:
        yield sql.SQL("SELECT 1 / 0"), None

    monkeypatch.setattr(PostgresStore, "_sweep", broken)
    store = _pg(table)
    with caplog.at_level(logging.DEBUG, logger="otel_recovery"):
        versions = [store.put("k", b"{}").version for _ in range(12)]  # sweeps at 5 and 10
    assert versions == list(range(1, 13))
    failures = [r for r in caplog.records if "sweep" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG]
    assert "division by zero" in failures[0].getMessage()
    store.close()


def test_new_postgres_tables_have_the_expiry_index_the_sweep_uses(table: str) -> None:
    store = _pg(table)
    _expired_wave(store, 10)
    with pg_admin() as admin:
        (index,) = admin.execute("SELECT to_regclass(%s)", (f"{table}_records_expiry",)).fetchone()
    assert index is not None
    store.close()


def test_tables_without_the_expiry_index_are_swept_and_the_store_says_how_to_add_it(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _pg(table)
    store.put("first", b"{}")
    with pg_admin() as admin:  # tables as a release before the index made them
        admin.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(f"{table}_records_expiry")))
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        _expired_wave(store, 600)
        for _ in range(500):
            store.put("filler", b"{}")
    assert pg_counts(table, store.clock.wall())[1] == 0
    assert caplog.text.count("CREATE INDEX CONCURRENTLY IF NOT EXISTS") == 1
    store.close()


async def test_async_postgres_sweep_failure_never_fails_the_put(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_module, "_SWEEP_EVERY", 2)

    def broken(self: PostgresStore, *args: Any) -> Any:
        yield sql.SQL("SELECT 1 / 0"), None

    monkeypatch.setattr(PostgresStore, "_sweep", broken)
    store = _pg(table)
    assert [(await store.aput("k", b"{}")).version for _ in range(5)] == [1, 2, 3, 4, 5]
    await store.aclose()


async def test_an_aput_cancelled_during_its_sweep_was_not_made(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep runs before the put is sent: a cancellation landing in it (the caller's
    ``asyncio.timeout``) stops a put not yet made. Swept after, the put was made, and the
    caller, told it was cancelled, might make it again."""
    monkeypatch.setattr(sweep_module, "_SWEEP_EVERY", 2)

    def slow(self: PostgresStore, *args: Any) -> Any:
        yield sql.SQL("SELECT pg_sleep(0.5)"), None

    store = _pg(table)
    await store.aput("k", b"{}")  # connected; the next put sweeps
    monkeypatch.setattr(PostgresStore, "_sweep", slow)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.aput("k", b'{"late": 1}'), 0.1)
    record = await store.aget("k")
    assert record is not None and (record.version, record.data) == (1, b"{}")
    await store.aclose()


def test_postgres_sync_and_async_puts_count_towards_one_sweep(table: str) -> None:
    store = _pg(table)
    _expired_wave(store, 300)
    for _ in range(4):
        asyncio.run(_aputs(store, 60))  # a new loop (and connection) each time: 540 puts
    assert pg_counts(table, store.clock.wall())[1] == 0
    store.close()


async def _aputs(store: PostgresStore, count: int) -> None:
    for _ in range(count):
        await store.aput("filler", b"{}")


# -- memory: bounded work per put, bounded bookkeeping -----------------------------------


def test_memory_put_removes_a_bounded_number_of_expired_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_module, "_SWEEP_BATCH", 7)
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for n in range(20):
        store.put(f"job-{n}", DATA, ttl=1)
    clock.advance(2)
    left = []
    for _ in range(4):
        store.put("filler", b"{}")
        left.append(sum(key.startswith("job-") for key in store._records))
    assert left == [13, 6, 0, 0]
    assert len(store._heads) == 21


def test_memory_expiry_bookkeeping_stays_bounded_when_versions_are_pruned_first() -> None:
    """Versions pruned by ``max_versions`` (or deleted) before they expire leave entries in
    the expiry heap; the heap is rebuilt from the records whenever it doubles."""
    clock = FakeClock()
    store = MemoryStore(max_versions=2, clock=clock)
    for n in range(20_000):
        store.put(f"k{n % 3}", DATA, ttl=3600)
        if n % 1000 == 0:
            store.delete("k0")
    assert len(store._expiry) <= 2 * memory_module._EXPIRY_SLACK
    assert store.put("k1", DATA).version == 6668
    clock.advance(3601)
    for _ in range(3):  # at most _SWEEP_BATCH entries leave the heap per put
        store.put("other", DATA)
    assert sorted(store._records) == ["k1", "other"]  # k1's put without a ttl stays
    assert store._expiry == []
