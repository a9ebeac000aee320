"""``memory://``: the store in a dict. Fast, per process, gone on restart.

It is the reference implementation of :class:`~otel_recovery.stores.Store` (the behavioural
test suite runs the same assertions against every back end), the local state that
:class:`~otel_recovery.stores.ResilientStore` falls back to while a shared store is down, and
the right choice for tests. One lock guards everything: the work under it is a few dict
operations, far cheaper than any contention it could cause.

Expired records leave memory even when their key is never written again (one id per job with a
TTL): a put with a TTL also pushes ``(expires_at, key, version)`` on a heap, and every put first
pops what has expired, removing those records (and a key left without any), at most
``_SWEEP_BATCH`` (500) per put. A put adds at most one record, so this outpaces expiry by far
while no put pays for a whole wave expiring at once; a put with nothing expired pays one
comparison (and a heap push if it has a TTL). The version counters (``_heads``) are never
swept: versions never repeat. Entries of versions pruned or deleted before they expire stay
on the heap until then (no data, a small tuple); whenever the heap has doubled it is
filtered down to the entries whose version still exists, so it stays proportional to the
records with a TTL (amortised O(1) per put, whatever the number of records without one).
"""

from __future__ import annotations

import builtins
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery._forksafe import new_lock
from otel_recovery.stores._base import (
    Record,
    VersionConflictError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)

__all__ = ["MemoryStore"]

_BATCH_MEMORY = 4096
"""How many applied batch ids are remembered; replays happen soon after the outage ends."""
_SWEEP_BATCH = 500
"""At most this many expired records are removed by one put (see the module doc)."""
_EXPIRY_SLACK = 1024
"""The expiry heap is rebuilt when it exceeds twice its size at the last rebuild, or this."""


class MemoryStore:
    """Versioned records and counters in process memory."""

    def __init__(self, *, max_versions: int = 16, clock: Clock | None = None) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        self.url = "memory://"
        self.max_versions = max_versions
        self.clock: Clock = clock_or_default(clock)
        self._lock = new_lock()
        self._records: dict[str, OrderedDict[int, Record]] = {}
        self._heads: dict[str, int] = {}
        self._counters: dict[str, dict[str, float]] = {}
        self._batches: OrderedDict[str, None] = OrderedDict()
        self._expiry: list[tuple[float, str, int]] = []  # a heap of (expires_at, key, version)
        self._expiry_limit = _EXPIRY_SLACK

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
        with self._lock:
            self._sweep(now)
            versions = self._records.setdefault(key, OrderedDict())
            if expected is not None:
                latest = self._latest(versions, now)
                actual = latest.version if latest else 0
                if actual != expected:
                    if not versions:  # not even an expired record: keep no entry for the key
                        del self._records[key]
                    raise VersionConflictError(key, expected, actual)
            version = self._heads.get(key, 0) + 1
            self._heads[key] = version
            expires = None if seconds is None else now + seconds
            record = Record(key, version, bytes(data), now, expires, encoding)
            versions[version] = record
            while len(versions) > self.max_versions:
                versions.popitem(last=False)
            if expires is not None:
                heapq.heappush(self._expiry, (expires, key, version))
                if len(self._expiry) > self._expiry_limit:
                    self._rebuild_expiry()
            return record

    def _sweep(self, now: float) -> None:
        """Remove up to ``_SWEEP_BATCH`` expired records, soonest expired first (lock held)."""
        heap = self._expiry
        for _ in range(_SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                return
            _, key, number = heapq.heappop(heap)
            versions = self._records.get(key)
            if versions is None:
                continue  # deleted meanwhile
            record = versions.get(number)
            if record is not None and record.expired(now):
                del versions[number]
            if not versions:
                del self._records[key]

    def _rebuild_expiry(self) -> None:
        """The heap again without the entries of versions that were pruned or deleted (lock
        held). Filtered from the heap itself, not rebuilt from every record: O(heap), so a
        store holding many records without a TTL does not pay for them on a TTL put."""
        records = self._records
        self._expiry = [
            entry
            for entry in self._expiry
            if (versions := records.get(entry[1])) is not None and entry[2] in versions
        ]
        heapq.heapify(self._expiry)
        self._expiry_limit = max(_EXPIRY_SLACK, 2 * len(self._expiry))

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        now = self.clock.wall()
        with self._lock:
            versions = self._records.get(key)
            if not versions:
                return None
            if version is not None:
                record = versions.get(version)
                return None if record is None or record.expired(now) else record
            return self._latest(versions, now)

    def list(self, prefix: str = "") -> builtins.list[Record]:
        now = self.clock.wall()
        with self._lock:
            found = []
            for key in sorted(k for k in self._records if k.startswith(prefix)):
                latest = self._latest(self._records[key], now)
                if latest is not None:
                    found.append(latest)
            return found

    def delete(self, key: str) -> int:
        check_key(key)
        now = self.clock.wall()
        with self._lock:
            versions = self._records.pop(key, None)
            return sum(not r.expired(now) for r in versions.values()) if versions else 0

    @staticmethod
    def _latest(versions: Mapping[int, Record], now: float) -> Record | None:
        for number in sorted(versions, reverse=True):
            if not versions[number].expired(now):
                return versions[number]
        return None

    # -- counters ---------------------------------------------------------------------------

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        with self._lock:
            if batch_id is not None:
                if batch_id in self._batches:
                    return False
                self._batches[batch_id] = None
                while len(self._batches) > _BATCH_MEMORY:
                    self._batches.popitem(last=False)
            values = self._counters.setdefault(namespace, {})
            for key, amount in checked.items():
                values[key] = values.get(key, 0.0) + amount
            return True

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        with self._lock:
            values = self._counters.get(namespace, {})
            if keys is None:
                return dict(values)
            return {k: values[k] for k in keys if k in values}

    def close(self) -> None:
        """Nothing to release; the data stays readable (closing a dict loses nothing)."""

    # -- async forms: the work is a few dict operations, so no thread hop ---------------------

    async def aput(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        return self.put(key, data, expected_version=expected_version, ttl=ttl, encoding=encoding)

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        return self.get(key, version)

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        return self.list(prefix)

    async def adelete(self, key: str) -> int:
        return self.delete(key)

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        return self.incr(namespace, amounts, batch_id=batch_id)

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        return self.counters(namespace, keys)

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._records)}, max_versions={self.max_versions})"
