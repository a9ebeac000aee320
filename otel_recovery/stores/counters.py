"""Learned statistics: named counters, added atomically, read back as one snapshot.

This is the persistence API for learning components (which strategy worked for which kind of
error, how long recoveries took): a learner adds what it observed with :meth:`Counters.add_many`
and rebuilds its view from :meth:`Counters.snapshot`. Additions are commutative, so any number
of processes can add to the same namespace without coordination or lost updates, which a
read-modify-write of a JSON document could not offer. Values are floats (sums of seconds are
statistics too); counts stay exact up to 2**53.

Like checkpoints, counters default to ``OTEL_RECOVERY_STORE_URL`` (else the SQLite state
file) and survive an unreachable store: increments are kept locally and sent once, in batches
the store applies at most once, when it is back (see :class:`ResilientStore`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from otel_recovery._clock import Clock, Duration
from otel_recovery.stores import MemoryStore, ResilientStore, Store, resolve_store
from otel_recovery.stores._base import check_key

__all__ = ["Counters"]


class Counters:
    """The counters of one ``namespace`` in a store (a URL, a Store, or None for the default)."""

    def __init__(
        self,
        namespace: str,
        store: Store | str | None = None,
        *,
        resilient: bool = True,
        retry_interval: Duration = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self.namespace = check_key(namespace, "namespace")
        backend = resolve_store(store, clock=clock)
        if resilient and not isinstance(backend, (MemoryStore, ResilientStore)):
            backend = ResilientStore(backend, retry_interval=retry_interval, clock=clock)
        self.store: Store = backend

    def add(self, key: str, amount: float = 1.0) -> None:
        """Add ``amount`` to one counter."""
        self.store.incr(self.namespace, {key: amount})

    def add_many(self, amounts: Mapping[str, float]) -> None:
        """Add to several counters in one atomic step (all or none)."""
        if amounts:
            self.store.incr(self.namespace, amounts)

    def snapshot(self, keys: Iterable[str] | None = None) -> dict[str, float]:
        """Every counter of the namespace (or just ``keys``), read at one moment."""
        return self.store.counters(self.namespace, keys)

    async def aadd(self, key: str, amount: float = 1.0) -> None:
        await self.store.aincr(self.namespace, {key: amount})

    async def aadd_many(self, amounts: Mapping[str, float]) -> None:
        if amounts:
            await self.store.aincr(self.namespace, amounts)

    async def asnapshot(self, keys: Iterable[str] | None = None) -> dict[str, float]:
        return await self.store.acounters(self.namespace, keys)

    def __repr__(self) -> str:
        return f"Counters({self.namespace!r}, {self.store.url!r})"
