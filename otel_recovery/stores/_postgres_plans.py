"""The SQL of the PostgreSQL store, written once as plans (generators of statements).

A plan yields ``(statement, params)`` and is sent back the rows each statement returned, so the
same logic runs on a sync connection and on an asyncio one: :func:`drive_sync` and
:func:`drive_async` are the only code that executes a plan, and they report in a :class:`Step`
whether its first round trip was answered, which decides whether it may run once more
(:func:`._postgres_errors.runs_again`). Table names are composed with
:class:`psycopg.sql.Identifier`, never pasted into SQL.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Generator, Iterable
from typing import Any

import psycopg
from psycopg import sql

from otel_recovery.stores._base import CorruptRecordError, Record, StoreError, VersionConflictError

__all__ = [
    "SCHEMA_VERSION",
    "Plan",
    "Plans",
    "Step",
    "drive_async",
    "drive_sync",
    "jsonb_compatible",
]

SCHEMA_VERSION = 1
_TABLES = ("meta", "records", "heads", "counters", "batches")
_BATCH_RETENTION = 7 * 86400.0
_COLUMNS = "key, version, data::text, raw, created_at, expires_at, encoding"

# A plan yields (statement, params) and is sent back the rows the statement returned.
Plan = Generator[tuple[sql.Composed | sql.SQL, Any], builtins.list[tuple[Any, ...]], Any]

_PUT_ONE_STATEMENT = (
    "WITH h AS (INSERT INTO {heads} AS h (key, version) VALUES (%(k)s, 1) "
    "  ON CONFLICT (key) DO UPDATE SET version = h.version + 1 RETURNING version), "
    "ins AS (INSERT INTO {records} (key, version, created_at, expires_at, encoding, data, raw) "
    "  SELECT %(k)s::text, h.version, %(c)s::float8, %(e)s::float8, %(enc)s::text, "
    "  %(d)s::jsonb, %(r)s::bytea FROM h), "
    "del AS (DELETE FROM {records} WHERE key = %(k)s::text AND "
    "  (version <= (SELECT version FROM h) - %(m)s::bigint OR expires_at <= %(c)s::float8)) "
    "SELECT version FROM h"
)

# The store-wide sweep of expired records (every key's, see :meth:`Plans._sweep`): at most
# %(n)s rows, found through the partial index on expires_at; rows another session has locked
# (its put is pruning them, or another store is sweeping them) are skipped, never waited for.
# They are deleted by ctid (a TID scan of just those rows: a join on the key would let the
# planner hash the whole table), which is stable here since they are locked until the end.
_SWEEP_STATEMENT = (
    "WITH gone AS (DELETE FROM {records} WHERE ctid = ANY(ARRAY("
    "  SELECT ctid FROM {records} WHERE expires_at <= %(now)s::float8 "
    "  LIMIT %(n)s FOR UPDATE SKIP LOCKED)) RETURNING 1) "
    "SELECT count(*) FROM gone"
)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {meta} (name text PRIMARY KEY, value text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {records} (
        key text NOT NULL, version bigint NOT NULL, created_at double precision NOT NULL,
        expires_at double precision, encoding text, data jsonb, raw bytea,
        PRIMARY KEY (key, version))""",
    """CREATE TABLE IF NOT EXISTS {heads} (key text PRIMARY KEY, version bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {counters} (namespace text NOT NULL, key text NOT NULL,
        value double precision NOT NULL, PRIMARY KEY (namespace, key))""",
    """CREATE TABLE IF NOT EXISTS {batches} (id text PRIMARY KEY,
        applied_at double precision NOT NULL)""",
    # What the sweep of expired records looks through. Not part of the schema check (a
    # read-only server, or tables made by a release before it, work without it: the sweep
    # then scans the table, bounded by its statement_timeout, and the store says so once).
    """CREATE INDEX IF NOT EXISTS {expiry} ON {records} (expires_at)
        WHERE expires_at IS NOT NULL""",
)


class Plans:
    """The plans of one store; subclasses provide ``table``, ``url``, ``max_versions``."""

    table: str
    url: str
    max_versions: int

    def __init__(self, table: str) -> None:
        self._names = {part: sql.Identifier(f"{table}_{part}") for part in _TABLES}
        self._names["expiry"] = sql.Identifier(f"{table}_records_expiry")

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(**self._names)

    def _schema_ready(self) -> Plan:
        """Whether every table exists at this version: reads only, so a read-only server
        (a hot standby) whose tables exist is usable for reads without any DDL or lock."""
        names = [f"{self.table}_{part}" for part in _TABLES]
        rows = yield (
            sql.SQL("SELECT count(to_regclass(n)) FROM unnest(%s::text[]) AS t(n)"),
            (names,),
        )
        if int(rows[0][0]) != len(names):
            return False
        rows = yield self._q("SELECT value FROM {meta} WHERE name = 'schema_version'"), None
        found = int(rows[0][0]) if rows else 0
        if found > SCHEMA_VERSION:
            raise self._newer(found)
        return found == SCHEMA_VERSION

    def _newer(self, found: int) -> StoreError:
        return StoreError(
            f"{self.url} table {self.table!r} has schema version {found}, written by a newer "
            f"otel-recovery; this version understands up to {SCHEMA_VERSION}"
        )

    def _schema(self) -> Plan:
        """Create what is missing (run in one transaction, after :meth:`_schema_ready`
        found something missing): concurrent ``CREATE TABLE IF NOT EXISTS`` can race, hence
        the advisory lock."""
        yield sql.SQL("SELECT pg_advisory_xact_lock(hashtext(%s))"), (self.table,)
        for statement in _SCHEMA:
            yield self._q(statement), None
        rows = yield self._q("SELECT value FROM {meta} WHERE name = 'schema_version'"), None
        found = int(rows[0][0]) if rows else 0
        if found > SCHEMA_VERSION:
            raise self._newer(found)
        if found < SCHEMA_VERSION:
            yield (
                self._q(
                    "INSERT INTO {meta} VALUES ('schema_version', %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (str(SCHEMA_VERSION),),
            )

    def _put(
        self, key: str, data: bytes, expected: int | None, expires: float | None,
        encoding: str, now: float, as_json: bool,
    ) -> Plan:  # fmt: skip
        text = data.decode("utf-8") if as_json else None
        if expected is None:
            # A plain put is one statement, atomic by itself (run without BEGIN/COMMIT): claim
            # the next version, insert it, prune the oldest. The DELETE cannot see the new row.
            rows = yield self._q(_PUT_ONE_STATEMENT), {
                "k": key, "c": now, "e": expires, "enc": encoding, "d": text,
                "r": None if as_json else data, "m": self.max_versions,
            }  # fmt: skip
            return Record(key, int(rows[0][0]), data, now, expires, encoding)
        # Compare-and-set needs the head row locked *before* the check reads the records, which
        # one statement (one snapshot) cannot do: separate statements in one transaction.
        rows = yield (
            self._q(
                "INSERT INTO {heads} AS h (key, version) VALUES (%s, 1) "
                "ON CONFLICT (key) DO UPDATE SET version = h.version + 1 RETURNING version"
            ),
            (key,),
        )
        version = int(rows[0][0])
        if expected is not None:
            rows = yield (
                self._q(
                    "SELECT coalesce(max(version), 0) FROM {records} WHERE key = %s "
                    "AND (expires_at IS NULL OR expires_at > %s)"
                ),
                (key, now),
            )
            if int(rows[0][0]) != expected:
                raise VersionConflictError(key, expected, int(rows[0][0]))
        yield (
            self._q(
                "INSERT INTO {records} (key, version, created_at, expires_at, encoding, data, raw) "
                "VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)"
            ),
            (key, version, now, expires, encoding, text, None if as_json else data),
        )
        yield (
            self._q("DELETE FROM {records} WHERE key = %s AND (version <= %s OR expires_at <= %s)"),
            (key, version - self.max_versions, now),
        )
        return Record(key, version, data, now, expires, encoding)

    def _get(self, key: str, version: int | None, now: float) -> Plan:
        # Pick the version first and convert only that row's jsonb to text: sorting whole rows
        # would render every kept version's payload just to throw all but one away.
        live = "key = %s AND (expires_at IS NULL OR expires_at > %s)"
        if version is None:
            statement = (
                f"SELECT {_COLUMNS} FROM {{records}} WHERE key = %s AND version = "
                f"(SELECT version FROM {{records}} WHERE {live} ORDER BY version DESC LIMIT 1)"
            )
            rows = yield self._q(statement), (key, key, now)
        else:
            statement = f"SELECT {_COLUMNS} FROM {{records}} WHERE {live} AND version = %s"
            rows = yield self._q(statement), (key, now, version)
        return _record(rows[0]) if rows else None

    def _list(self, prefix: str, now: float) -> Plan:
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = yield (
            self._q(
                f"SELECT {_COLUMNS} FROM {{records}} WHERE (key, version) IN ("
                "  SELECT key, max(version) FROM {records} WHERE key LIKE %s"
                "  AND (expires_at IS NULL OR expires_at > %s) GROUP BY key)"
                # code point order, as every other store lists (not the database's locale)
                ' ORDER BY key COLLATE "C"'
            ),
            (pattern, now),
        )
        return [_record(row) for row in rows]

    def _delete(self, key: str, now: float) -> Plan:
        rows = yield (
            self._q(
                "WITH gone AS (DELETE FROM {records} WHERE key = %s RETURNING expires_at) "
                "SELECT count(*) FROM gone WHERE expires_at IS NULL OR expires_at > %s"
            ),
            (key, now),
        )
        return int(rows[0][0])

    def _sweep(self, now: float, batch: int, lock_ms: int, statement_ms: int) -> Plan:
        """Delete at most ``batch`` expired records of any key; run in a transaction whose
        ``lock_timeout`` and ``statement_timeout`` (milliseconds) bound it on the server, so a
        lock on the whole table held elsewhere ends the sweep instead of holding up the put
        that runs it. Returns (rows deleted, whether the expiry index exists). Only records
        go: the heads rows, which hold each key's last version, are never touched."""
        rows = yield (
            sql.SQL(
                "SELECT set_config('lock_timeout', %s, true), "
                "set_config('statement_timeout', %s, true), to_regclass(%s) IS NOT NULL"
            ),
            (str(lock_ms), str(statement_ms), f"{self.table}_records_expiry"),
        )
        indexed = bool(rows[0][2])
        rows = yield self._q(_SWEEP_STATEMENT), {"now": now, "n": batch}
        return int(rows[0][0]), indexed

    def _incr(
        self, namespace: str, amounts: dict[str, float], batch: str | None, now: float
    ) -> Plan:
        if batch is not None:
            rows = yield (
                self._q(
                    "INSERT INTO {batches} VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id"
                ),
                (batch, now),
            )
            if not rows:
                return False
            yield self._q("DELETE FROM {batches} WHERE applied_at < %s"), (now - _BATCH_RETENTION,)
        keys, values = builtins.list(amounts), builtins.list(amounts.values())
        yield (
            self._q(
                "INSERT INTO {counters} AS c (namespace, key, value) "
                "SELECT %s, k, v FROM unnest(%s::text[], %s::float8[]) AS t(k, v) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = c.value + excluded.value"
            ),
            (namespace, keys, values),
        )
        return True

    def _counters(self, namespace: str, keys: Iterable[str] | None) -> Plan:
        rows = yield self._q("SELECT key, value FROM {counters} WHERE namespace = %s"), (namespace,)
        wanted = None if keys is None else set(keys)
        return {k: float(v) for k, v in rows if wanted is None or k in wanted}


class Step:
    """How far an attempt got: is its first round trip still unanswered?"""

    __slots__ = ("first",)

    def __init__(self) -> None:
        self.first = True


def drive_sync(
    conn: psycopg.Connection[Any],
    plan: Plan,
    atomic: bool = True,
    step: Step | None = None,
) -> Any:
    """Run ``plan`` on ``conn``, in a transaction if ``atomic``; returns what it returns."""
    # A single-statement plan is atomic by itself: no BEGIN/COMMIT round trips for it.
    step = step or Step()
    with conn.transaction() if atomic else contextlib.nullcontext(), conn.cursor() as cur:
        step.first = not atomic  # BEGIN was answered
        try:
            statement, params = next(plan)
            while True:
                cur.execute(statement, params)
                step.first = False
                statement, params = plan.send(cur.fetchall() if cur.description else [])
        except StopIteration as done:
            return done.value


async def drive_async(
    conn: psycopg.AsyncConnection[Any],
    plan: Plan,
    atomic: bool = True,
    step: Step | None = None,
) -> Any:
    """The async twin of :func:`drive_sync`."""
    step = step or Step()
    async with conn.transaction() if atomic else contextlib.nullcontext(), conn.cursor() as cur:
        step.first = not atomic
        try:
            statement, params = next(plan)
            while True:
                await cur.execute(statement, params)
                step.first = False
                rows = await cur.fetchall() if cur.description else []
                statement, params = plan.send(rows)
        except StopIteration as done:
            return done.value


_JSONB_CHANGES = (b"\\u0000", b"e+", b"E+", b"-0.0")
"""What ``jsonb`` would not give back equal: it cannot hold NUL, prints a number as numeric
without an exponent (Python's ``1e+16`` comes back as the int ``10000000000000000``,
``1e+300`` as an int that is not even equal to it) and drops the sign of ``-0.0``. A payload
with any of these goes to the ``raw`` column; a string that merely contains one costs only
the ``jsonb`` view of that record."""


def jsonb_compatible(data: bytes, encoding: str) -> bool:
    if encoding != "json" or any(change in data for change in _JSONB_CHANGES):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _record(row: tuple[Any, ...]) -> Record:
    key, version, text, raw, created, expires, encoding = row
    if text is not None:
        data = text.encode("utf-8")
    elif isinstance(raw, (bytes, memoryview)):
        data = bytes(raw)
    else:
        raise CorruptRecordError(key, "neither the data nor the raw column holds a value", version)
    if not isinstance(encoding, str) or not encoding:
        raise CorruptRecordError(key, "the encoding column is empty", version)
    return Record(
        key,
        int(version),
        data,
        float(created),
        None if expires is None else float(expires),
        encoding,
    )
