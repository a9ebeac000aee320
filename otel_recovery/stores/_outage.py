"""A ResilientStore's view of its store's outage: since when, the next probe, the resync.

Before each call the wrapper asks where it goes (:meth:`Outage.route`): to the store while
it counts as healthy; to local state while it is degraded, except for one call every
``retry_interval``, which probes, first replaying the journal (:meth:`Outage.resync`, one
entry at a time by :mod:`._replay`). Only a resync that finds nothing left to replay
declares the store healthy again.

Every change of that answer (a call failing, a resync claimed, failed or finished) is made
here, each in one step under one lock: where one was two steps, another thread's call
between them let an older write be replayed over a newer one. So only one resync runs at a
time, and a write never lands in the journal of a store that counts as healthy (either the
resync that is finishing replays it, or it goes to the store:
``ResilientStore._keep_locally``).
"""

from __future__ import annotations

import builtins
import logging
from typing import TYPE_CHECKING

from opentelemetry import trace

from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._local_state import Work
from otel_recovery.stores._replay import areplay, replay
from otel_recovery.telemetry import attributes as names

if TYPE_CHECKING:
    from otel_recovery.stores.resilient import ResilientStore

__all__ = ["Outage"]

_log = logging.getLogger("otel_recovery")


class Outage:
    """Whether a ResilientStore's store is degraded, and the resync that ends it. A method
    that needs the wrapper's store, local state, clock, URL or ``retry_interval`` is given
    the wrapper (``owner``) and reads them there, at the call."""

    def __init__(self) -> None:
        self.lock = new_lock()
        self.since: float | None = None  # when the store was found unreachable
        self.next_probe = 0.0
        self.resyncing = False
        self.conflicts_reported = 0  # local.conflict_count at the last resynced event

    def degrade(self, owner: ResilientStore, error: StoreUnavailableError) -> None:
        """Switch to local state. A resync under way keeps its claim: only the resync ends
        it (:meth:`_settled`, :meth:`_failed`). A call sent while the store was healthy
        that fails late used to clear it, and a second resync then ran beside the first
        (finding the journal already taken, it declared the store healthy while the first
        still had older writes to replay over newer ones)."""
        with self.lock:
            now = owner.clock.now()
            self.next_probe = now + owner.retry_interval
            if self.since is not None:
                return
            self.since = now
        _log.warning(
            "otel_recovery: store %s is unreachable (%s); using local state until it is back, "
            "then replaying local changes to it",
            owner.url,
            redact(str(error)),
        )
        cause = type(error.__cause__ or error).__name__
        trace.get_current_span().add_event(
            names.EVENT_STORE_DEGRADED, {names.STORE_URL: owner.url, names.ERROR_TYPE: cause}
        )

    def route(self, owner: ResilientStore) -> str:
        """Where this call goes: ``"store"`` (healthy), ``"resync"`` (degraded, and this call
        has claimed the resync that is due), or ``"local"``. Decided in one step under
        ``lock``: a call that found the store healthy and then saw it degraded by another
        thread ran a resync it had not claimed, beside the claimed one, which found the
        journal taken, declared the store healthy, and was overwritten by the older writes
        the unclaimed one replayed."""
        with self.lock:
            if self.since is None:
                return "store"
            if self.resyncing or owner.clock.now() < self.next_probe:
                return "local"
            self.resyncing = True
            return "resync"

    def probe_now(self) -> None:
        """Let the next call probe the store, ignoring ``retry_interval``."""
        with self.lock:
            self.next_probe = 0.0

    def was_healthy(self, owner: ResilientStore, asked: bool) -> bool:
        """Whether the store counts as healthy, asked for a write that chose local state
        (the caller holds ``local.lock``: see ``ResilientStore._keep_locally``). If it does
        and the store was sent the write (``asked``), the store is degraded again with a
        probe due at once, so the next call replays the write it journals."""
        with self.lock:
            healthy = self.since is None
            if healthy and asked:
                self.since = self.next_probe = owner.clock.now()
        return healthy

    def resync(self, owner: ResilientStore) -> bool:
        """Replay the journal (the caller has claimed the resync: :meth:`route`); True
        when nothing is left and the store is healthy again."""
        while True:
            work = owner.local.take()
            for index, item in enumerate(work):
                try:
                    result = replay(owner.store, owner.local, item)
                except StoreUnavailableError as error:
                    owner.local.sent_unanswered(item)
                    return self._failed(owner, work[index:], error)
                except BaseException as error:  # a store's bug, or cancelled: keep the rest
                    owner.local.sent_unanswered(item)
                    self._failed(owner, work[index:], error)
                    if not isinstance(error, Exception):
                        raise
                    return False
                owner.local.replayed_one(item, result)
            if self._settled(owner):
                return True

    async def aresync(self, owner: ResilientStore) -> bool:
        while True:
            work = owner.local.take()
            for index, item in enumerate(work):
                try:
                    result = await areplay(owner.store, owner.local, item)
                except StoreUnavailableError as error:
                    owner.local.sent_unanswered(item)
                    return self._failed(owner, work[index:], error)
                except BaseException as error:  # a store's bug, or cancelled: keep the rest
                    owner.local.sent_unanswered(item)
                    self._failed(owner, work[index:], error)
                    if not isinstance(error, Exception):
                        raise
                    return False
                owner.local.replayed_one(item, result)
            if self._settled(owner):
                return True

    def _failed(
        self, owner: ResilientStore, rest: builtins.list[Work], error: BaseException
    ) -> bool:
        """The replay stopped at ``rest[0]``: keep it and what follows, in order, for the
        next probe. A failure other than the store being unreachable (a store's own bug,
        or the caller's cancellation, which is raised on) loses nothing either."""
        owner.local.give_back(rest)
        with self.lock:
            self.resyncing = False
            self.next_probe = owner.clock.now() + owner.retry_interval
        if isinstance(error, StoreUnavailableError):
            _log.debug("otel_recovery: store %s still unreachable: %s", owner.url, error)
        elif isinstance(error, Exception):
            _log.warning(
                "otel_recovery: replaying local changes to store %s failed (%s: %s); they "
                "are kept and replayed at the next attempt",
                owner.url, type(error).__name__, redact(str(error)),
            )  # fmt: skip
        return False

    def _settled(self, owner: ResilientStore) -> bool:
        """Declare the store healthy again if nothing is left to replay.

        Finding the journal empty and clearing ``since`` are one step under ``local.lock``,
        the lock a degraded write journals under (``ResilientStore._keep_locally``): a write
        cannot land in the journal between the two and be left there, unreplayed, by a store
        that counts as healthy (then replayed over newer versions by the next resync).
        """
        local = owner.local
        with local.lock:
            replayed = local.settle()
            if replayed is None:
                return False  # more was queued while replaying: go round again
            with self.lock:
                started, self.since = self.since, None
                self.resyncing = False
            # this resync's conflicts, not every one since the start
            conflicts = local.conflict_count - self.conflicts_reported
            self.conflicts_reported = local.conflict_count
        outage = 0.0 if started is None else max(0.0, owner.clock.now() - started)
        _log.info(
            "otel_recovery: store %s is reachable again after %.1fs; replayed %d local "
            "change(s), %d conflict(s)",
            owner.url, outage, replayed, conflicts,
        )  # fmt: skip
        trace.get_current_span().add_event(
            names.EVENT_STORE_RESYNCED,
            {
                names.STORE_URL: owner.url,
                names.STORE_REPLAYED: replayed,
                names.STORE_CONFLICTS: conflicts,
                names.STORE_OUTAGE: outage,
            },
        )
        return True
