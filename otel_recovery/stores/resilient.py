"""Keep working when the store is down: local state while it is unreachable, resync after.

A store outage must never take the application down (DESIGN.md section 6), so
:class:`ResilientStore` wraps any :class:`~otel_recovery.stores.Store`. The first call that
meets :class:`StoreUnavailableError` switches it to *degraded* mode and says so once: one
warning on the ``otel_recovery`` logger and one ``otel_recovery.store.degraded`` event on the
current span. While degraded, the store is not called at all, except for one probe every
``retry_interval`` seconds, so a dead Redis costs no timeout per operation.

What degraded mode does:

- **Writes** (``put``, ``delete``) are applied to a local overlay and appended to a journal.
  A put gets a *provisional* version (one past the newest version this process knows); a
  compare-and-set put is checked against what this process knows.
- **Reads** answer from the overlay, then from the last record this process read or wrote for
  that key (a bounded cache); a key known to neither raises :class:`StoreUnavailableError`.
  Such answers may be stale: another process may have written since.
- **Counters**: increments accumulate locally; a snapshot is the last snapshot read from the
  store plus every increment not yet replayed.

**Resync** happens on the first successful probe, before the call that probed, and means
exactly this:

1. Journal entries are replayed to the store in the order they were made. A plain put becomes
   the next version in the store (so the store's number may differ from the provisional one;
   later compare-and-set entries are translated accordingly). A compare-and-set put is replayed
   as a compare-and-set: if another writer moved the key on meanwhile, the store keeps its
   version, the local write is *not* applied, and it is reported (warning, the
   ``otel_recovery.store.conflicts`` count and :attr:`conflicts`); nothing is overwritten
   silently. A delete is replayed unless another process wrote the key after it (reported
   the same way); a put whose TTL ran out meanwhile is dropped.
2. Counter increments are sent as batches, each with a batch id that the store applies at most
   once, so a batch whose reply was lost is never counted twice when it is re-sent.

A write whose reply was lost may have been applied. A put sent without an answer looks
before it is written again (see :mod:`._replay`). An increment is exact only with a caller's
``batch_id`` (kept from its first send); without one, an increment whose reply was lost is
replayed and may count twice (at least once, never lost): giving every increment an id
would leave a marker in the store for each one, for days. :meth:`close` replays what is
still local, once, and warns about what is lost.
3. Only when the journal and the counter batches are empty does the store count as healthy
   again: one ``otel_recovery.store.resynced`` event and one info log line say how many
   entries were replayed and how long the outage was. That check and a degraded write's
   journaling exclude each other, so a write that chose local state while the resync ran is
   either replayed by it or, arriving after, sent to the store (see ``_keep_locally``).

If the store fails again mid-resync, what was not replayed stays queued, in order. The
journal is bounded (``journal_bytes``, 64 MiB); past it a write raises
:class:`StoreUnavailableError` rather than silently dropping older writes.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_recovery._clock import SYSTEM_CLOCK, Clock, Duration, to_seconds
from otel_recovery._redact import redact
from otel_recovery.stores._base import (
    Record,
    Store,
    StoreUnavailableError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)
from otel_recovery.stores._local_state import LocalState, ResyncConflict
from otel_recovery.stores._outage import Outage

__all__ = ["ResilientStore", "ResyncConflict"]

_log = logging.getLogger("otel_recovery")
_T = TypeVar("_T")


class ResilientStore:
    """A :class:`Store` that degrades to local state and resynchronises; see the module doc."""

    def __init__(
        self,
        store: Store,
        *,
        retry_interval: Duration = 5.0,
        cache_bytes: int = 16 * 1024 * 1024,
        journal_bytes: int = 64 * 1024 * 1024,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"ResilientStore wraps a Store, got {store!r}")
        self.store = store
        self.url = redact(store.url)  # third-party stores may not redact their own URL
        self.clock: Clock = clock or getattr(store, "clock", None) or SYSTEM_CLOCK
        self.retry_interval = to_seconds(retry_interval, "retry_interval")
        self.local = LocalState(self.url, self.clock, cache_bytes, journal_bytes)
        self._outage = Outage()

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and local state is in use."""
        return self._outage.since is not None

    @property
    def conflicts(self) -> builtins.list[ResyncConflict]:
        """Writes made while degraded that resync did not apply because the store had moved
        on (compare-and-set puts, deletes): the latest 100, oldest first."""
        return self.local.conflicts

    # -- routing: where each call goes (the outage decides: :mod:`._outage`) -------------------

    def _degrade(self, error: StoreUnavailableError) -> None:
        """Switch to local state: see :meth:`Outage.degrade`."""
        self._outage.degrade(self, error)

    def _route(self) -> str:
        """``"store"``, ``"resync"`` or ``"local"``: see :meth:`Outage.route`."""
        return self._outage.route(self)

    def _try(self, remote: Callable[[], _T]) -> tuple[bool, _T | None, bool]:
        """``(True, result, True)`` from the store, or ``(False, None, asked)`` when local state
        must answer; ``asked``: the store was sent the call and failed to answer it, so a
        write may have been applied there."""
        route = self._route()
        if route == "local" or (route == "resync" and not self._outage.resync(self)):
            return False, None, False
        try:
            # Our own storage traffic is neither traced nor retried by our instrumentors.
            with suppress_instrumentation():
                return True, remote(), True
        except StoreUnavailableError as error:
            self._degrade(error)
            return False, None, True

    async def _atry(self, remote: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None, bool]:
        route = self._route()
        if route == "local" or (route == "resync" and not await self._outage.aresync(self)):
            return False, None, False
        try:
            with suppress_instrumentation():
                return True, await remote(), True
        except StoreUnavailableError as error:
            self._degrade(error)
            return False, None, True

    def _keep_locally(self, asked: bool, write: Callable[[bool], _T]) -> _T | None:
        """Apply a write to local state (``write(asked)``); None if the store was declared
        healthy since this call chose local state: the caller then sends it to the store.

        Nothing may enter the journal once the store counts as healthy: no resync would
        replay it, its writer would read the store's older value, and the next resync (or
        :meth:`close`) would replay it over newer versions. Deciding to go local happens
        before (``_route``, or a failed call), so the decision is checked again here,
        under ``local.lock``, which ``Outage._settled`` holds while it finds the journal empty
        and declares the store healthy: either the write is journaled first and that resync
        goes round again to replay it, or it sees the store healthy and does not journal.

        The lock covers local work only, never a call to the store: a resync holding it
        across its replay would make a stalled store block every writer that would otherwise
        just journal locally (and the replay's own bookkeeping takes it per entry anyway).

        A write the store was sent and did not answer (``asked``) may have been applied
        there; sending it again could apply it twice. It is journaled anyway, marked as
        maybe applied (the replay looks before it writes), and the store is marked degraded
        again with a probe due at once, so the next call replays it.
        """
        with self.local.lock:
            healthy = self._outage.was_healthy(self, asked)
            if healthy and not asked:
                return None
            if healthy:
                _log.debug(
                    "otel_recovery: store %s resynced while a write it did not answer was on "
                    "its way to local state; journaled, replayed at the next call",
                    self.url,
                )
            return write(asked)

    def _write(
        self, remote: Callable[[], _T | None], local: Callable[[bool], _T]
    ) -> tuple[bool, _T]:
        """A write: ``(True, the store's answer)`` or ``(False, local state's)``."""
        while True:
            ok, result, asked = self._try(remote)
            if ok and result is not None:
                return True, result
            kept = self._keep_locally(asked, local)
            if kept is not None:
                return False, kept

    async def _awrite(
        self, remote: Callable[[], Awaitable[_T | None]], local: Callable[[bool], _T]
    ) -> tuple[bool, _T]:
        while True:
            ok, result, asked = await self._atry(remote)
            if ok and result is not None:
                return True, result
            kept = self._keep_locally(asked, local)
            if kept is not None:
                return False, kept

    # -- the Store interface ----------------------------------------------------------------------

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
        from_store, record = self._write(
            lambda: self.store.put(
                key, data, expected_version=expected, ttl=seconds, encoding=encoding
            ),
            lambda asked: self.local.put(key, data, expected, seconds, encoding, asked),
        )
        if from_store:
            self.local.remember(record)
        return record

    async def aput(
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
        from_store, record = await self._awrite(
            lambda: self.store.aput(
                key, data, expected_version=expected, ttl=seconds, encoding=encoding
            ),
            lambda asked: self.local.put(key, data, expected, seconds, encoding, asked),
        )
        if from_store:
            self.local.remember(record)
        return record

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        ok, record, _ = self._try(lambda: self.store.get(key, version))
        if not ok:
            return self.local.get(key, version)
        if version is None:
            self.local.remember(record) if record is not None else self.local.forget(key)
        return record

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        ok, record, _ = await self._atry(lambda: self.store.aget(key, version))
        if not ok:
            return self.local.get(key, version)
        if version is None:
            self.local.remember(record) if record is not None else self.local.forget(key)
        return record

    def list(self, prefix: str = "") -> builtins.list[Record]:
        ok, found, _ = self._try(lambda: self.store.list(prefix))
        return found if ok and found is not None else self.local.list(prefix)

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        ok, found, _ = await self._atry(lambda: self.store.alist(prefix))
        return found if ok and found is not None else self.local.list(prefix)

    def delete(self, key: str) -> int:
        check_key(key)
        from_store, count = self._write(
            lambda: self.store.delete(key), lambda _: self.local.delete(key)
        )
        if from_store:
            self.local.forget(key)
        return count

    async def adelete(self, key: str) -> int:
        check_key(key)
        from_store, count = await self._awrite(
            lambda: self.store.adelete(key), lambda _: self.local.delete(key)
        )
        if from_store:
            self.local.forget(key)
        return count

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        from_store, applied = self._write(
            lambda: self.store.incr(namespace, checked, batch_id=batch_id),
            lambda _: self.local.incr(namespace, checked, batch_id),
        )
        if from_store and applied:
            self.local.added(namespace, checked)
        return applied

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        from_store, applied = await self._awrite(
            lambda: self.store.aincr(namespace, checked, batch_id=batch_id),
            lambda _: self.local.incr(namespace, checked, batch_id),
        )
        if from_store and applied:
            self.local.added(namespace, checked)
        return applied

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)
        ok, values, _ = self._try(lambda: self.store.counters(namespace))
        if ok and values is not None:
            self.local.seen_counters(namespace, values)
            return values if wanted is None else {k: values[k] for k in wanted if k in values}
        return self.local.counters(namespace, wanted)

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)
        ok, values, _ = await self._atry(lambda: self.store.acounters(namespace))
        if ok and values is not None:
            self.local.seen_counters(namespace, values)
            return values if wanted is None else {k: values[k] for k in wanted if k in values}
        return self.local.counters(namespace, wanted)

    def resync(self) -> bool:
        """Try to reach the store now (ignoring ``retry_interval``); True if healthy after."""
        self._outage.probe_now()
        return self._try(lambda: True)[0]

    async def aresync(self) -> bool:
        self._outage.probe_now()

        async def healthy() -> bool:
            return True

        return (await self._atry(healthy))[0]

    def close(self) -> None:
        """Replay what is still local (one try, now), say what could not be, and close."""
        if self.local.pending():
            self.resync()
        self._report_unsent()
        self.store.close()

    async def aclose(self) -> None:
        if self.local.pending():
            await self.aresync()
        self._report_unsent()
        await self.store.aclose()

    def _report_unsent(self) -> None:
        """Local changes that never reached the store are lost with the process: say so."""
        unsent = self.local.pending()
        if unsent:
            _log.warning(
                "otel_recovery: closing store %s with %d local change(s) it never received "
                "(it is still unreachable); they are lost",
                self.url, unsent,
            )  # fmt: skip

    def __repr__(self) -> str:
        mode = "degraded" if self.degraded else "healthy"
        return f"ResilientStore({self.store!r}, {mode})"
