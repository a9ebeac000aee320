"""``sqlite:///path``: the embedded default for state that must outlive a restart.

Why these settings:

- **WAL journal**: readers never block the writer and a crash (even SIGKILL mid-commit) leaves
  either the old or the new transaction, never a torn one; several processes on one host can
  share the file.
- ``BEGIN IMMEDIATE`` for every write: the write lock is taken before reading the latest
  version, so "read latest, check expected_version, insert next" is one atomic step across
  processes, and two writers cannot both upgrade a read lock and deadlock.
- ``synchronous=NORMAL`` (``?synchronous=full`` to change): in WAL mode a committed
  transaction survives the process being killed; only an OS crash or power cut can lose the
  last commits, and even then the file is never corrupt.
- ``busy_timeout`` (5 s, ``?busy_timeout=seconds``): a writer waits for another process's
  transaction instead of failing at once; past it the store reports itself unavailable.
- The schema is versioned with ``PRAGMA user_version``: a file written by a newer release is
  refused with a clear error instead of being misread, and older files are migrated in place.

One connection per store guarded by a lock (SQLite serialises writers anyway); async methods
run the same code in a worker thread.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import (
    CorruptRecordError,
    Record,
    StoreError,
    StoreUnavailableError,
    VersionConflictError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 1
_T = TypeVar("_T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        key TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
        expires_at REAL, encoding TEXT NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (key, version)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at) WHERE expires_at NOT NULL",
    """CREATE TABLE IF NOT EXISTS heads (
        key TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS counters (
        namespace TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (namespace, key)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY, applied_at REAL NOT NULL) WITHOUT ROWID""",
)
_BATCH_RETENTION = 7 * 86400.0
_SWEEP_EVERY = 500
"""Every this many puts, expired rows of all keys are deleted (a put sweeps its own key)."""


class SQLiteStore:
    """Versioned records and counters in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_versions: int = 16,
        synchronous: str = "normal",
        busy_timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        if synchronous.lower() not in ("normal", "full", "extra"):
            raise ValueError(f"synchronous must be normal, full or extra, got {synchronous!r}")
        self.path = Path(path)
        self.url = redact(f"sqlite:///{self.path}")
        self.max_versions = max_versions
        self.clock: Clock = clock_or_default(clock)
        self._synchronous = synchronous.upper()
        self._busy_ms = int(busy_timeout * 1000)
        self._lock = new_lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._puts = 0

    # -- connection and schema --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection inherited across fork() must not be used by the child; open a new one.
        self._pid = os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(
            self.path, timeout=self._busy_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.url} has schema version {found}, written by a newer otel-recovery; "
                    f"this version understands up to {SCHEMA_VERSION}. Upgrade otel-recovery "
                    "or point OTEL_RECOVERY_STORE_URL at another file."
                )
            if found < SCHEMA_VERSION:  # 0: a new file. Later versions add steps here.
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, work: Any, *args: Any) -> Any:
        """Run ``work(conn, *args)`` under the lock, mapping SQLite failures to store errors."""
        with self._lock:
            try:
                return work(self._connect(), *args)
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                    raise
                if self._conn is not None:
                    # Reopen on the next call: a fresh connection is the simplest way to leave
                    # no half-open transaction or broken file handle behind.
                    self._conn.close()
                    self._conn = None
                raise StoreUnavailableError(
                    f"SQLite store {self.url} is unavailable: {redact(str(exc))}"
                ) from exc

    def _write(self, conn: sqlite3.Connection, body: Any, *args: Any) -> Any:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn, *args)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- records ----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        check_key(key)
        expected, seconds = check_put(expected_version, ttl, encoding)
        now = self.clock.wall()
        expires = None if seconds is None else now + seconds
        record: Record = self._run(
            self._write, self._put, key, bytes(data), expected, now, expires, encoding
        )
        return record

    def _put(
        self,
        conn: sqlite3.Connection,
        key: str,
        data: bytes,
        expected: int | None,
        now: float,
        expires: float | None,
        encoding: str,
    ) -> Record:
        if expected is not None:
            row = conn.execute(
                "SELECT max(version) FROM records WHERE key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (key, now),
            ).fetchone()
            actual = row[0] or 0
            if actual != expected:
                raise VersionConflictError(key, expected, actual)
        version = conn.execute(
            "INSERT INTO heads (key, version) VALUES (?, 1) "
            "ON CONFLICT (key) DO UPDATE SET version = version + 1 RETURNING version",
            (key,),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO records (key, version, created_at, expires_at, encoding, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, version, now, expires, encoding, data),
        )
        conn.execute(
            "DELETE FROM records WHERE key = ? AND (version <= ? OR expires_at <= ?)",
            (key, version - self.max_versions, now),
        )
        self._puts += 1
        if self._puts % _SWEEP_EVERY == 0:
            conn.execute("DELETE FROM records WHERE expires_at <= ?", (now,))
        return Record(key, version, data, now, expires, encoding)

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        now = self.clock.wall()
        sql = (
            "SELECT key, version, data, created_at, expires_at, encoding FROM records "
            "WHERE key = ? AND (expires_at IS NULL OR expires_at > ?) "
        )
        if version is None:
            row = self._run(
                lambda c: c.execute(sql + "ORDER BY version DESC LIMIT 1", (key, now)).fetchone()
            )
        else:
            row = self._run(
                lambda c: c.execute(sql + "AND version = ?", (key, now, version)).fetchone()
            )
        return None if row is None else _record(row)

    def list(self, prefix: str = "") -> builtins.list[Record]:
        now = self.clock.wall()
        # Range scan on the primary key: prefix <= key < prefix + U+10FFFF.
        rows = self._run(
            lambda c: c.execute(
                "SELECT r.key, r.version, r.data, r.created_at, r.expires_at, r.encoding "
                "FROM records r WHERE r.key >= ? AND r.key < ? "
                "AND (r.expires_at IS NULL OR r.expires_at > ?) AND r.version = ("
                "  SELECT max(version) FROM records x WHERE x.key = r.key "
                "  AND (x.expires_at IS NULL OR x.expires_at > ?)) ORDER BY r.key",
                (prefix, prefix + "\U0010ffff", now, now),
            ).fetchall()
        )
        return [_record(row) for row in rows if row[0].startswith(prefix)]

    def delete(self, key: str) -> int:
        check_key(key)
        now = self.clock.wall()

        def body(conn: sqlite3.Connection) -> int:
            live = conn.execute(
                "SELECT count(*) FROM records WHERE key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (key, now),
            ).fetchone()[0]
            conn.execute("DELETE FROM records WHERE key = ?", (key,))
            return int(live)

        deleted: int = self._run(self._write, body)
        return deleted

    # -- counters ---------------------------------------------------------------------------

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        now = self.clock.wall()

        def body(conn: sqlite3.Connection) -> bool:
            if batch_id is not None:
                seen = conn.execute(
                    "INSERT INTO batches (id, applied_at) VALUES (?, ?) "
                    "ON CONFLICT (id) DO NOTHING RETURNING id",
                    (batch_id, now),
                ).fetchone()
                if seen is None:
                    return False
                conn.execute("DELETE FROM batches WHERE applied_at < ?", (now - _BATCH_RETENTION,))
            conn.executemany(
                "INSERT INTO counters (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = value + excluded.value",
                [(namespace, key, amount) for key, amount in checked.items()],
            )
            return True

        applied: bool = self._run(self._write, body)
        return applied

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else set(keys)
        rows = self._run(
            lambda c: c.execute(
                "SELECT key, value FROM counters WHERE namespace = ?", (namespace,)
            ).fetchall()
        )
        return {k: float(v) for k, v in rows if wanted is None or k in wanted}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- async forms: the same code in a worker thread --------------------------------------

    async def aput(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        return await asyncio.to_thread(
            lambda: self.put(
                key, data, expected_version=expected_version, ttl=ttl, encoding=encoding
            )
        )

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        return await asyncio.to_thread(self.get, key, version)

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        return await asyncio.to_thread(self.list, prefix)

    async def adelete(self, key: str) -> int:
        return await asyncio.to_thread(self.delete, key)

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        return await asyncio.to_thread(lambda: self.incr(namespace, amounts, batch_id=batch_id))

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        return await asyncio.to_thread(self.counters, namespace, keys)

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r}, max_versions={self.max_versions})"


def _record(row: tuple[Any, ...]) -> Record:
    """A row as a :class:`Record`, refusing rows whose columns are not what was written."""
    key, version, data, created, expires, encoding = row
    if not isinstance(data, bytes):
        raise CorruptRecordError(
            key, f"data column holds {type(data).__name__}, not bytes", version
        )
    if not isinstance(version, int) or not isinstance(created, (int, float)):
        raise CorruptRecordError(key, "version or created_at has the wrong type", None)
    if expires is not None and not isinstance(expires, (int, float)):
        raise CorruptRecordError(key, "expires_at has the wrong type", version)
    if not isinstance(encoding, str):
        raise CorruptRecordError(key, "encoding has the wrong type", version)
    return Record(
        key, version, data, float(created), None if expires is None else float(expires), encoding
    )
