"""The PostgreSQL store's sweep of expired records: every key's, a bounded batch at a time.

A put deletes its own key's expired versions, but a key never written again (one id per job,
each with a TTL) would keep its rows for ever. So every :data:`_SWEEP_EVERY` puts through a
store (sync or async, counted together), the put that completes the count first deletes up
to :data:`_SWEEP_BATCH` expired rows of any key, in a transaction of its own
(:meth:`._postgres_plans.Plans._sweep`). A full batch means a backlog (older releases never
swept): the next sweep then comes after :data:`_SWEEP_AGAIN` puts, until a batch comes back
short.

The put pays for it, so the sweep is made cheap and harmless to the put. It runs before the
put is sent, so a cancellation landing in it stops a put that was not made yet (after, the
caller would see a put that was made fail, and might make it again). It runs only on the
connection the put will use, never connecting by itself. Rows locked by another session are
skipped (``FOR UPDATE SKIP LOCKED``) rather than waited for; ``lock_timeout``
(:data:`_SWEEP_LOCK_TIMEOUT`) and ``statement_timeout`` (1 s, or half the operation timeout
if that is shorter) end a sweep that would wait behind a lock on the whole table or run long,
and the watchdog bounds it at :data:`_SWEEP_TIMEOUT`. Its failure never fails the put: it is
logged (a warning the first time, debug after that) and leaves the rows for a later sweep.
Tables made by an older release lack the partial index the sweep looks through; it then
scans the table, and the store logs once how to create the index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from otel_recovery._redact import redact
from otel_recovery.stores._postgres_plans import Plan
from otel_recovery.stores._postgres_run import arun, run

if TYPE_CHECKING:
    from otel_recovery.stores.postgres import PostgresStore

__all__ = ["ExpirySweep"]

_log = logging.getLogger("otel_recovery")

_SWEEP_EVERY = 500
"""Puts between two sweeps of expired records (see the module doc)."""
_SWEEP_AGAIN = 50
"""Puts before the next sweep when the last one deleted a full batch (a backlog)."""
_SWEEP_BATCH = 500
"""Most expired rows one sweep deletes."""
_SWEEP_TIMEOUT = 2.0
"""Bound of a whole sweep (the watchdog's); never more than the operation timeout."""
_SWEEP_LOCK_TIMEOUT = 0.1
"""The sweep's ``lock_timeout``: it gives up rather than wait behind a table lock."""


class ExpirySweep:
    """When one store sweeps next, and what it has said about its sweeps."""

    def __init__(self) -> None:
        self.since = 0  # puts since the last sweep of expired records
        self.backlog = False  # the last sweep deleted a full batch
        self.failed_before = False
        self.index_reported = False

    def due(self) -> bool:
        """Count a put; whether the sweep is due before it is sent. Before, not after: a
        cancellation landing in the sweep then stops a put not yet made (after, the caller
        would see a put that was made fail, and might make it again). Threads and loops that
        race here at most sweep twice, or once a put late: both harmless."""
        self.since += 1
        return self.since >= (_SWEEP_AGAIN if self.backlog else _SWEEP_EVERY)

    def _args(self, store: PostgresStore) -> tuple[Callable[[], Plan], float]:
        """The sweep's plan and its bound; counting restarts here."""
        self.since = 0
        limit = min(store.operation_timeout, _SWEEP_TIMEOUT)
        statement_ms = max(1, int(min(1.0, limit / 2) * 1000))
        lock_ms = max(1, min(int(_SWEEP_LOCK_TIMEOUT * 1000), statement_ms))
        plan = partial(store._sweep, store.clock.wall(), _SWEEP_BATCH, lock_ms, statement_ms)
        return plan, limit

    def sweep(self, store: PostgresStore) -> None:
        plan, limit = self._args(store)
        try:
            outcome = run(store, plan, timeout=limit)
        except Exception as exc:  # the put goes ahead: nothing here may fail it
            self.failed(store, exc)
        else:
            self._swept(store, *outcome)

    async def asweep(self, store: PostgresStore) -> None:
        # A cancellation landing here propagates like any other: the put has not been sent.
        plan, limit = self._args(store)
        try:
            outcome = await arun(store, plan, timeout=limit)
        except Exception as exc:
            self.failed(store, exc)
        else:
            self._swept(store, *outcome)

    def _swept(self, store: PostgresStore, deleted: int, indexed: bool) -> None:
        self.backlog = deleted >= _SWEEP_BATCH
        if not indexed and not self.index_reported:
            self.index_reported = True
            _log.warning(
                "otel_recovery: PostgreSQL store %s: the index %s_records_expiry is missing "
                "(tables created by an older release), so each sweep of expired records scans "
                "the table; create it with: CREATE INDEX CONCURRENTLY IF NOT EXISTS "
                "%s_records_expiry ON %s_records (expires_at) WHERE expires_at IS NOT NULL",
                store.url,
                store.table,
                store.table,
                store.table,
            )

    def failed(self, store: PostgresStore, exc: Exception) -> None:
        self.backlog = False
        detail = redact(str(exc).strip()) or type(exc).__name__
        level = logging.DEBUG if self.failed_before else logging.WARNING
        self.failed_before = True
        _log.log(
            level,
            "otel_recovery: PostgreSQL store %s: a sweep of expired records failed (%s); the "
            "put goes ahead, and the records are left for a later sweep%s",
            store.url,
            detail,
            "" if level == logging.DEBUG else " (further failures are logged at debug level)",
        )
