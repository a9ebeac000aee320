"""What :class:`~otel_recovery.stores.ResilientStore` keeps locally while its store is down.

Four things, all in memory and bounded: the last record seen per key (an LRU cache by bytes,
so reads can still be answered), an overlay of records written while degraded (with
provisional versions), the journal of those writes in order (what resync replays), and
counter increments not yet sent. The replay bookkeeping (translating provisional versions to
the store's real ones, reporting refused compare-and-set writes) lives here too, so the
wrapper only decides *when* to talk to the store.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from otel_recovery._clock import Clock
from otel_recovery._forksafe import new_rlock
from otel_recovery.stores._base import Record, StoreUnavailableError, VersionConflictError

__all__ = [
    "JournalBatch",
    "JournalDelete",
    "JournalPut",
    "LocalState",
    "ResyncConflict",
    "Work",
]

_log = logging.getLogger("otel_recovery")


@dataclass(frozen=True)
class ResyncConflict:
    """A write made while degraded that resync did not apply, because the store moved on.

    ``operation`` is ``"put"`` for a compare-and-set put the store refused
    (``expected_version`` is what it was based on, ``store_version`` what the store held),
    or ``"delete"`` for a delete of a key that another process wrote again after it was made
    (``store_version`` is that newer version, ``provisional_version`` and ``data`` are empty).
    """

    key: str
    provisional_version: int
    expected_version: int
    store_version: int
    data: bytes = field(repr=False)
    operation: str = "put"


CONFLICTS_KEPT = 100
"""How many of the latest resync conflicts :attr:`ResilientStore.conflicts` keeps."""


@dataclass
class JournalPut:
    key: str
    data: bytes
    encoding: str
    expected: int | None
    expires_at: float | None
    provisional: int
    maybe_applied: bool = False
    """Sent to the store, which may have applied it before the reply was lost."""
    made_at: float = 0.0
    """Wall-clock time of the local write (just after the send that got no answer)."""
    known_head: int | None = None
    """The newest store version of the key this process knew before the write was first
    sent: a record at or below it existed before the send, so it is not this write (the
    same bytes written earlier, ``idle`` -> ``busy`` -> ``idle``). None if it knew none."""

    @property
    def size(self) -> int:
        return len(self.data) + len(self.key) + 64


@dataclass
class JournalDelete:
    key: str
    known_version: int | None
    """The latest version this process knew of the key when it deleted it (provisional
    numbers are translated on replay); None if it knew none."""
    made_at: float
    """Wall-clock time of the delete: a record created later is another writer's."""
    size: int = 64


@dataclass
class JournalBatch:
    namespace: str
    amounts: dict[str, float]
    batch_id: str
    size: int = 64


Work = JournalPut | JournalDelete | JournalBatch
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


class LocalState:
    """The local side of a :class:`ResilientStore`. Every method takes the one lock."""

    def __init__(self, url: str, clock: Clock, cache_bytes: int, journal_bytes: int) -> None:
        self.url = url
        self.clock = clock
        self.lock = new_rlock()
        self._cache_limit = cache_bytes
        self._journal_limit = journal_bytes
        self._known: OrderedDict[str, Record] = OrderedDict()
        self._known_bytes = 0
        self._overlay: dict[str, dict[int, Record]] = {}
        self._deleted: set[str] = set()
        self._journal: builtins.list[Work] = []
        self._journal_size = 0
        self._mapping: dict[tuple[str, int], int] = {}
        self._refused: dict[tuple[str, int], int] = {}
        self._deltas: dict[str, dict[str, float]] = {}
        self._snapshots: dict[str, dict[str, float]] = {}
        self.replayed = 0
        self.conflicts: builtins.list[ResyncConflict] = []  # the latest CONFLICTS_KEPT
        self.conflict_count = 0  # every one since the start

    # -- what the healthy path records ----------------------------------------------------------

    def remember(self, record: Record | None) -> None:
        """Keep the latest record of a key for reads while degraded (LRU, bounded in bytes)."""
        if record is None:
            return
        with self.lock:
            old = self._known.get(record.key)
            if old is not None and old.version > record.version:
                return
            if old is not None:
                del self._known[record.key]
                self._known_bytes -= len(old.data)
            self._known[record.key] = record
            self._known_bytes += len(record.data)
            while self._known_bytes > self._cache_limit and len(self._known) > 1:
                _, dropped = self._known.popitem(last=False)
                self._known_bytes -= len(dropped.data)

    def forget(self, key: str) -> None:
        with self.lock:
            old = self._known.pop(key, None)
            if old is not None:
                self._known_bytes -= len(old.data)

    def seen_counters(self, namespace: str, values: dict[str, float]) -> dict[str, float]:
        with self.lock:
            self._snapshots[namespace] = dict(values)
        return values

    def added(self, namespace: str, amounts: dict[str, float]) -> None:
        with self.lock:
            snapshot = self._snapshots.get(namespace)
            if snapshot is not None:
                for key, amount in amounts.items():
                    snapshot[key] = snapshot.get(key, 0.0) + amount

    # -- degraded-mode operations ---------------------------------------------------------------

    def _queue(self, work: Work) -> None:
        if self._journal_size + work.size > self._journal_limit:
            raise StoreUnavailableError(
                f"store {self.url} is unreachable and the local journal is full "
                f"({self._journal_limit} bytes); this write was not kept"
            )
        self._journal.append(work)
        self._journal_size += work.size

    def _latest(self, key: str) -> Record | None:
        now = self.clock.wall()
        versions = self._overlay.get(key, {})
        for number in sorted(versions, reverse=True):
            if not versions[number].expired(now):
                return versions[number]
        if key in self._deleted:
            return None
        known = self._known.get(key)
        return None if known is None or known.expired(now) else known

    def put(
        self,
        key: str,
        data: bytes,
        expected: int | None,
        seconds: float | None,
        encoding: str,
        maybe_applied: bool = False,
    ) -> Record:
        """A write while degraded; ``maybe_applied``: the store was asked and did not answer,
        so it may hold this write already (resync then looks before it writes again)."""
        now = self.clock.wall()
        with self.lock:
            latest = self._latest(key)
            # Check what can be checked here; the store checks again when this is replayed.
            if expected is not None and (latest is not None or key in self._deleted):
                actual = latest.version if latest else 0
                if actual != expected:
                    raise VersionConflictError(key, expected, actual)
            known = self._known.get(key)
            version = max([known.version if known else 0, *self._overlay.get(key, {})]) + 1
            expires = None if seconds is None else now + seconds
            record = Record(key, version, bytes(data), now, expires, encoding)
            head = known.version if known is not None and maybe_applied else None
            self._queue(
                JournalPut(
                    key, record.data, encoding, expected, expires, version, maybe_applied, now,
                    head,
                )
            )  # fmt: skip
            self._overlay.setdefault(key, {})[version] = record
            return record

    def get(self, key: str, version: int | None) -> Record | None:
        with self.lock:
            if version is None:
                latest = self._latest(key)
                if latest is not None or key in self._deleted:
                    return latest
            else:
                record = self._overlay.get(key, {}).get(version)
                if record is None and key not in self._deleted:
                    known = self._known.get(key)
                    record = known if known is not None and known.version == version else None
                if record is not None:
                    return None if record.expired(self.clock.wall()) else record
        raise StoreUnavailableError(
            f"store {self.url} is unreachable and this process has no local copy of {key!r}"
        )

    def list(self, prefix: str) -> builtins.list[Record]:
        with self.lock:
            keys = {k for k in (*self._known, *self._overlay) if k.startswith(prefix)}
            found = [self._latest(k) for k in sorted(keys)]
        return [r for r in found if r is not None]

    def delete(self, key: str) -> int:
        with self.lock:
            now = self.clock.wall()
            latest = self._latest(key)
            self._queue(JournalDelete(key, None if latest is None else latest.version, now))
            live = [r for r in self._overlay.pop(key, {}).values() if not r.expired(now)]
            known = self._known.get(key)
            self.forget(key)
            self._deleted.add(key)
            return len(live) + int(known is not None and not known.expired(now))

    def incr(self, namespace: str, amounts: dict[str, float], batch_id: str | None) -> bool:
        with self.lock:
            if batch_id is not None:
                self._queue(JournalBatch(namespace, amounts, batch_id))
                return True
            deltas = self._deltas.setdefault(namespace, {})
            for key, amount in amounts.items():
                deltas[key] = deltas.get(key, 0.0) + amount
            return True

    def counters(self, namespace: str, keys: Iterable[str] | None) -> dict[str, float]:
        with self.lock:
            values = dict(self._snapshots.get(namespace, {}))
            pending = [
                w.amounts
                for w in self._journal
                if isinstance(w, JournalBatch) and w.namespace == namespace
            ]
            for amounts in [*pending, self._deltas.get(namespace, {})]:
                for key, amount in amounts.items():
                    values[key] = values.get(key, 0.0) + amount
        return values if keys is None else {k: values[k] for k in keys if k in values}

    # -- resync ---------------------------------------------------------------------------------

    def take(self) -> builtins.list[Work]:
        """Everything to replay, in order; pending increments become idempotent batches."""
        with self.lock:
            for namespace, amounts in self._deltas.items():
                self._queue_batch(JournalBatch(namespace, amounts, uuid.uuid4().hex))
            self._deltas = {}
            work, self._journal = self._journal, []
            return work

    def _queue_batch(self, batch: JournalBatch) -> None:
        self._journal.append(batch)  # never refused: the increments were already accepted

    def give_back(self, rest: builtins.list[Work]) -> None:
        """Put what could not be replayed back at the front of the journal."""
        with self.lock:
            self._journal[:0] = rest

    def sent_unanswered(self, work: Work) -> None:
        """``work`` was sent and its reply lost: the store may have applied it."""
        if isinstance(work, JournalPut):
            work.maybe_applied = True

    def delete_basis(self, work: JournalDelete) -> int | None:
        """The store version a replayed delete was based on: the version this process knew
        when it deleted, translated from a provisional number. -1 if that version was a
        local write the store refused (the delete's basis never reached it)."""
        known = work.known_version
        if known is None:
            return None
        with self.lock:
            if (work.key, known) in self._refused:
                return -1
            return self._mapping.get((work.key, known), known)

    def _conflict(self, conflict: ResyncConflict) -> None:
        """Keep a conflict for :attr:`ResilientStore.conflicts` (lock held): the latest
        :data:`CONFLICTS_KEPT` only. Each one keeps the refused write's data (a learner's
        whole snapshot, say), and a fleet whose store blips now and then would otherwise
        keep every one for the life of the process; each is also logged when it happens."""
        self.conflict_count += 1
        self.conflicts.append(conflict)
        if len(self.conflicts) > CONFLICTS_KEPT:
            del self.conflicts[0]

    def delete_refused(self, work: JournalDelete, store_version: int, basis: int | None) -> None:
        """A replayed delete found a version another process wrote after it: not applied."""
        with self.lock:
            self._conflict(
                ResyncConflict(work.key, 0, max(basis or 0, 0), store_version, b"", "delete")
            )
        _log.warning(
            "otel_recovery: while %s was unreachable, %r was deleted; on resync the store holds "
            "version %d, written after that by another process, so the delete was not applied "
            "(see ResilientStore.conflicts)",
            self.url, work.key, store_version,
        )  # fmt: skip

    def pending(self) -> int:
        """How many local changes have not reached the store yet."""
        with self.lock:
            return len(self._journal) + sum(len(d) > 0 for d in self._deltas.values())

    def call_for(self, work: Work) -> Call | None:
        """The store call that replays ``work``; None when there is nothing left to send.

        Raises :class:`VersionConflictError` for a compare-and-set write made over a local
        version that never reached the store (refused or expired): its basis is gone, and its
        provisional number might even equal an unrelated version in the store.
        """
        if isinstance(work, JournalDelete):
            return "delete", (work.key,), {}
        if isinstance(work, JournalBatch):
            return "incr", (work.namespace, work.amounts), {"batch_id": work.batch_id}
        expected = work.expected
        with self.lock:
            if work.known_head is None:  # before its first send: see JournalPut.known_head
                known = self._known.get(work.key)
                work.known_head = None if known is None else known.version
            if expected is not None:
                if (work.key, expected) in self._refused:
                    actual = self._refused[(work.key, expected)]
                    raise VersionConflictError(work.key, expected, actual)
                expected = self._mapping.get((work.key, expected), expected)
            ttl = None
            if work.expires_at is not None:
                ttl = work.expires_at - self.clock.wall()
                if ttl <= 0:  # expired while the store was down: nothing to restore
                    self._refused[(work.key, work.provisional)] = 0
                    return None
        options = {"expected_version": expected, "ttl": ttl, "encoding": work.encoding}
        return "put", (work.key, work.data), options

    def replayed_one(self, work: Work, result: Any) -> None:
        """Book the store's answer to a replayed entry."""
        with self.lock:
            self.replayed += 1
            if not isinstance(work, JournalPut):
                return
            if isinstance(result, Record):
                self._mapping[(work.key, work.provisional)] = result.version
                self.remember(result)
                return
            if not isinstance(result, VersionConflictError):
                return
            self._refused[(work.key, work.provisional)] = result.actual
            expected = self._mapping.get((work.key, work.expected or 0), work.expected or 0)
            self._conflict(
                ResyncConflict(work.key, work.provisional, expected, result.actual, work.data)
            )
        _log.warning(
            "otel_recovery: while %s was unreachable, a compare-and-set write to %r (provisional "
            "version %d) was made; on resync the store holds version %d, not the expected %d, so "
            "the local write was not applied (see ResilientStore.conflicts)",
            self.url, work.key, work.provisional, result.actual, expected,
        )  # fmt: skip

    def settle(self) -> int | None:
        """If nothing is left to replay, clear the overlay; returns how many were replayed."""
        with self.lock:
            if self._journal or self._deltas:
                return None
            self._overlay.clear()
            self._deleted.clear()
            self._mapping.clear()
            self._refused.clear()
            self._journal_size = 0
            replayed, self.replayed = self.replayed, 0
            return replayed
