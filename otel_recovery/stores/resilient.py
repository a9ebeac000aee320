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
before it is written again (see ``_replay``). An increment is exact only with a caller's
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
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_recovery._clock import SYSTEM_CLOCK, Clock, Duration, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import (
    Record,
    Store,
    StoreUnavailableError,
    VersionConflictError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)
from otel_recovery.stores._local_state import (
    Call,
    JournalDelete,
    JournalPut,
    LocalState,
    ResyncConflict,
    Work,
)
from otel_recovery.telemetry import attributes as names

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
        self._mode = new_lock()
        self._degraded_at: float | None = None
        self._next_probe = 0.0
        self._resyncing = False
        self._conflicts_reported = 0  # local.conflict_count at the last resynced event

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and local state is in use."""
        return self._degraded_at is not None

    @property
    def conflicts(self) -> builtins.list[ResyncConflict]:
        """Writes made while degraded that resync did not apply because the store had moved
        on (compare-and-set puts, deletes): the latest 100, oldest first."""
        return self.local.conflicts

    # -- mode switching -------------------------------------------------------------------------

    def _degrade(self, error: StoreUnavailableError) -> None:
        """Switch to local state. A resync under way keeps its claim: only the resync ends
        it (:meth:`_settled`, :meth:`_failed_resync`). A call sent while the store was
        healthy that fails late used to clear it, and a second resync then ran beside the
        first (finding the journal already taken, it declared the store healthy while the
        first still had older writes to replay over newer ones)."""
        with self._mode:
            now = self.clock.now()
            self._next_probe = now + self.retry_interval
            if self._degraded_at is not None:
                return
            self._degraded_at = now
        _log.warning(
            "otel_recovery: store %s is unreachable (%s); using local state until it is back, "
            "then replaying local changes to it",
            self.url,
            redact(str(error)),
        )
        cause = type(error.__cause__ or error).__name__
        trace.get_current_span().add_event(
            names.EVENT_STORE_DEGRADED, {names.STORE_URL: self.url, names.ERROR_TYPE: cause}
        )

    def _route(self) -> str:
        """Where this call goes: ``"store"`` (healthy), ``"resync"`` (degraded, and this call
        has claimed the resync that is due), or ``"local"``. Decided in one step under
        ``_mode``: a call that found the store healthy and then saw it degraded by another
        thread ran a resync it had not claimed, beside the claimed one, which found the
        journal taken, declared the store healthy, and was overwritten by the older writes
        the unclaimed one replayed."""
        with self._mode:
            if self._degraded_at is None:
                return "store"
            if self._resyncing or self.clock.now() < self._next_probe:
                return "local"
            self._resyncing = True
            return "resync"

    def _failed_resync(self, rest: builtins.list[Work], error: BaseException) -> bool:
        """The replay stopped at ``rest[0]``: keep it and what follows, in order, for the
        next probe. A failure other than the store being unreachable (a store's own bug,
        or the caller's cancellation, which is raised on) loses nothing either."""
        self.local.give_back(rest)
        with self._mode:
            self._resyncing = False
            self._next_probe = self.clock.now() + self.retry_interval
        if isinstance(error, StoreUnavailableError):
            _log.debug("otel_recovery: store %s still unreachable: %s", self.url, error)
        elif isinstance(error, Exception):
            _log.warning(
                "otel_recovery: replaying local changes to store %s failed (%s: %s); they "
                "are kept and replayed at the next attempt",
                self.url, type(error).__name__, redact(str(error)),
            )  # fmt: skip
        return False

    def _settled(self) -> bool:
        """Declare the store healthy again if nothing is left to replay.

        Finding the journal empty and clearing ``_degraded_at`` are one step under
        ``local.lock``, the lock a degraded write journals under (:meth:`_keep_locally`): a
        write cannot land in the journal between the two and be left there, unreplayed, by a
        store that counts as healthy (then replayed over newer versions by the next resync).
        """
        with self.local.lock:
            replayed = self.local.settle()
            if replayed is None:
                return False  # more was queued while replaying: go round again
            with self._mode:
                started, self._degraded_at = self._degraded_at, None
                self._resyncing = False
            # this resync's conflicts, not every one since the start
            conflicts = self.local.conflict_count - self._conflicts_reported
            self._conflicts_reported = self.local.conflict_count
        outage = 0.0 if started is None else max(0.0, self.clock.now() - started)
        _log.info(
            "otel_recovery: store %s is reachable again after %.1fs; replayed %d local "
            "change(s), %d conflict(s)",
            self.url, outage, replayed, conflicts,
        )  # fmt: skip
        trace.get_current_span().add_event(
            names.EVENT_STORE_RESYNCED,
            {
                names.STORE_URL: self.url,
                names.STORE_REPLAYED: replayed,
                names.STORE_CONFLICTS: conflicts,
                names.STORE_OUTAGE: outage,
            },
        )
        return True

    def _resync(self) -> bool:
        while True:
            work = self.local.take()
            for index, item in enumerate(work):
                try:
                    result = self._replay(item)
                except StoreUnavailableError as error:
                    self.local.sent_unanswered(item)
                    return self._failed_resync(work[index:], error)
                except BaseException as error:  # a store's bug, or cancelled: keep the rest
                    self.local.sent_unanswered(item)
                    self._failed_resync(work[index:], error)
                    if not isinstance(error, Exception):
                        raise
                    return False
                self.local.replayed_one(item, result)
            if self._settled():
                return True

    async def _aresync(self) -> bool:
        while True:
            work = self.local.take()
            for index, item in enumerate(work):
                try:
                    result = await self._areplay(item)
                except StoreUnavailableError as error:
                    self.local.sent_unanswered(item)
                    return self._failed_resync(work[index:], error)
                except BaseException as error:  # a store's bug, or cancelled: keep the rest
                    self.local.sent_unanswered(item)
                    self._failed_resync(work[index:], error)
                    if not isinstance(error, Exception):
                        raise
                    return False
                self.local.replayed_one(item, result)
            if self._settled():
                return True

    # -- replaying one journal entry: nothing applied twice -------------------------------------
    #
    # A write whose reply was lost may have been applied. A counter batch carries its id and
    # the store applies it once. A put looks first (a plain one at the latest versions,
    # written around its send, a compare-and-set one at the versions after the one it
    # expected) and does not write
    # again what the store already holds. A delete is replayed only if nobody wrote the key
    # after it was made: the key's latest version is the one this process knew, or was
    # created before the delete (another process's clock; the check and the delete are two
    # steps, so a write landing between them can still be deleted).

    def _replay(self, item: Work) -> Any:
        """Send one journal entry; what :meth:`LocalState.replayed_one` books."""
        try:
            if isinstance(item, JournalDelete):
                latest = self._send(("get", (item.key,), {}))
                refused = self._delete_refused(item, latest)
                return 0 if refused else self._send(("delete", (item.key,), {}))
            call = self.local.call_for(item)
            if call is None:
                return None
            if isinstance(item, JournalPut) and item.maybe_applied and item.expected is None:
                latest = self._send(("get", (item.key,), {}))
                if _holds(latest, item):
                    return latest
                for version in _versions_below(latest):  # others may have written since
                    record = self._send(("get", (item.key, version), {}))
                    if _holds(record, item) and _sent_then(record, item):
                        return record
            try:
                return self._send(call)
            except VersionConflictError as conflict:
                if not isinstance(item, JournalPut):
                    raise
                for version in _own_write_versions(item, call, conflict):
                    record = self._send(("get", (item.key, version), {}))
                    if _holds(record, item):
                        return record
                raise
        except VersionConflictError as conflict:
            return conflict

    async def _areplay(self, item: Work) -> Any:
        try:
            if isinstance(item, JournalDelete):
                latest = await self._asend(("get", (item.key,), {}))
                refused = self._delete_refused(item, latest)
                return 0 if refused else await self._asend(("delete", (item.key,), {}))
            call = self.local.call_for(item)
            if call is None:
                return None
            if isinstance(item, JournalPut) and item.maybe_applied and item.expected is None:
                latest = await self._asend(("get", (item.key,), {}))
                if _holds(latest, item):
                    return latest
                for version in _versions_below(latest):
                    record = await self._asend(("get", (item.key, version), {}))
                    if _holds(record, item) and _sent_then(record, item):
                        return record
            try:
                return await self._asend(call)
            except VersionConflictError as conflict:
                if not isinstance(item, JournalPut):
                    raise
                for version in _own_write_versions(item, call, conflict):
                    record = await self._asend(("get", (item.key, version), {}))
                    if _holds(record, item):
                        return record
                raise
        except VersionConflictError as conflict:
            return conflict

    def _delete_refused(self, item: JournalDelete, latest: Record | None) -> bool:
        """Whether a replayed delete must not run: another writer wrote the key after it."""
        if latest is None:
            return False  # nothing live to delete; deleting keeps the store's head as is
        basis = self.local.delete_basis(item)
        newer = latest.version > basis if basis is not None else latest.created_at > item.made_at
        if newer:
            self.local.delete_refused(item, latest.version, basis)
        return newer

    def _send(self, call: Call) -> Any:
        name, args, options = call
        with suppress_instrumentation():
            return getattr(self.store, name)(*args, **options)

    async def _asend(self, call: Call) -> Any:
        name, args, options = call
        with suppress_instrumentation():
            return await getattr(self.store, "a" + name)(*args, **options)

    def _try(self, remote: Callable[[], _T]) -> tuple[bool, _T | None, bool]:
        """``(True, result, True)`` from the store, or ``(False, None, asked)`` when local state
        must answer; ``asked``: the store was sent the call and failed to answer it, so a
        write may have been applied there."""
        route = self._route()
        if route == "local" or (route == "resync" and not self._resync()):
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
        if route == "local" or (route == "resync" and not await self._aresync()):
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
        under ``local.lock``, which :meth:`_settled` holds while it finds the journal empty
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
            with self._mode:
                healthy = self._degraded_at is None
                if healthy and asked:
                    self._degraded_at = self._next_probe = self.clock.now()
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
        with self._mode:
            self._next_probe = 0.0
        return self._try(lambda: True)[0]

    async def aresync(self) -> bool:
        with self._mode:
            self._next_probe = 0.0

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


_OWN_WRITE_SEARCH = 8
"""How many versions past the expected one a replayed compare-and-set put looks at for its
own write (its reply lost): other writers may have built on it since."""


def _holds(record: Record | None, item: JournalPut) -> bool:
    """The store's record may be this journal entry's write: written after the newest
    version this process knew before sending it, with the same payload and encoding.

    The same payload, not the same bytes: a store may give JSON back in its own rendering
    (PostgreSQL's ``jsonb`` spaces and orders it: ``{"step":2}`` reads back as
    ``{"step": 2}``), so JSON payloads are compared as the values they decode to."""
    if record is None or record.encoding != item.encoding:
        return False
    if item.known_head is not None and record.version <= item.known_head:
        return False  # there before the write was sent
    return record.data == item.data or (
        item.encoding == "json" and _same_json(record.data, item.data)
    )


def _same_json(stored: bytes, sent: bytes) -> bool:
    """Equal as JSON documents: ``true`` is not ``1`` and ``1.0`` is not ``1`` here, though
    Python's ``==`` says they are, so the decoded values are compared re-encoded."""
    try:
        return _canonical(stored) == _canonical(sent)
    except ValueError:  # not JSON after all (UnicodeDecodeError is one): bytes decided
        return False


def _canonical(data: bytes) -> str:
    return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))


_SEND_WINDOW = 60.0
"""How long before the local write a plain put's unanswered send may have landed (its
timeout, and clock skew between the writers)."""


def _versions_below(latest: Record | None) -> range:
    """The versions under the latest where a plain put whose reply was lost may have landed
    before others wrote over it."""
    if latest is None:
        return range(0)
    return range(latest.version - 1, max(0, latest.version - _OWN_WRITE_SEARCH), -1)


def _sent_then(record: Record, item: JournalPut) -> bool:
    """The record was written around the unanswered send, not long before: an old version
    with the same bytes is not this write."""
    return record.created_at >= item.made_at - _SEND_WINDOW


def _own_write_versions(item: JournalPut, call: Call, conflict: VersionConflictError) -> range:
    """The versions where a compare-and-set put whose reply was lost may have landed."""
    if not item.maybe_applied:
        return range(0)
    expected = call[2]["expected_version"]
    return range(expected + 1, min(conflict.actual, expected + _OWN_WRITE_SEARCH) + 1)
