"""The link between fleet-wide breakers/budgets and Redis: one per store, its sync thread.

Which components share, and through which store, is decided in :mod:`._sharing`; what a
component offers its link is :class:`~._shared_member.Member`.

**One link per Redis store per process.** It owns a connection pool of its own, with
:data:`DECISION_TIMEOUT` socket timeouts; its members' exchanges with Redis, each in its
turn and within that bound, are :mod:`._shared_exchange` ("The decision bound").

**One background thread per link** syncs every member: each pushes what it counted locally
since its last contact and adopts the shared state (see the members' module docs for the
cadence). Callers wait for it only as for any exchange ahead of theirs, and it never runs
user code except breaker listeners for transitions it observed.

**Degradation.** Any member call that meets a failing Redis switches every member of the
link to local state at once; while degraded the thread PINGs every
:data:`RECONNECT_INTERVAL` seconds, and resyncs the members once Redis answers
(:mod:`._shared_outage`). Store errors never reach callers.

**Lifetime.** A link lives while its store object is alive. Members hold their store (a
breaker made with ``store=RedisStore(...)`` inline keeps it); the link holds it weakly, so
the registry (keyed by ``id(store)``, checked against the store itself) never keeps a store
alive. Closing the store (``close()`` / ``aclose()``, which async code calls at the end of
each ``asyncio.run``, and ``ResilientStore.close()`` on its inner store) closes only the
link's *idle* connections: an exchange in flight keeps its connection and ends normally (no
error, no outage), the members stay fleet-wide, and the next exchange reconnects (the store
itself opens again on use too). With no member left, the thread then exits at once instead
of after :data:`_IDLE_EXIT` seconds; the next member starts it again. A store collected with
no member left takes its link along: the thread notices within a second and closes the
connections. While the store is alive but no member is left, the thread exits after
:data:`_IDLE_EXIT` seconds and closes the connections too; the next member starts both again.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from otel_recovery._clock import SYSTEM_CLOCK
from otel_recovery._forksafe import new_lock
from otel_recovery._mixins import plain_self
from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._shared_exchange import DECISION_TIMEOUT, LinkExchanges, bounded_client
from otel_recovery.stores._shared_member import Member
from otel_recovery.stores._shared_outage import RECONNECT_INTERVAL, LinkOutage

if TYPE_CHECKING:
    from otel_recovery.stores.redis import RedisStore

__all__ = [
    "DECISION_TIMEOUT",
    "RECONNECT_INTERVAL",
    "Link",
    "Member",
    "link_for",
]

_log = logging.getLogger("otel_recovery")

KEEP_MS = 7 * 86400 * 1000
"""Shared state of a breaker or budget that nobody touched for 7 days expires."""
_IDLE_EXIT = 30.0
_POLL = 1.0
"""Longest wait of the thread between looks at its link (a store collected meanwhile)."""


# -- the link -------------------------------------------------------------------------------

_links: dict[int, Link] = {}
_links_lock = new_lock()


def link_for(store: RedisStore) -> Link:
    """The link of ``store``, made on first use (and for a new store at a collected one's id)."""
    with _links_lock:
        found = _links.get(id(store))
        if found is None or found.closed or found.store() is not store:
            found = _links[id(store)] = Link(store)
        return found


def store_closed(store: RedisStore) -> None:
    """``store`` was closed: its link closes its idle connections (called by
    ``RedisStore.close()``); its members stay fleet-wide (see "Lifetime" in the module doc)."""
    with _links_lock:
        found = _links.get(id(store))
        if found is None or found.store() is not store:
            return
    found.close_idle()


class Link(LinkExchanges, LinkOutage):
    """Calls (:class:`LinkExchanges`), sync thread and outage bookkeeping (:class:`LinkOutage`)
    for the fleet-wide members of one store."""

    def __init__(self, store: RedisStore) -> None:
        import redis

        from otel_recovery._redis_replica import ReplicaReconnect

        # Weakly: the registry must keep no store alive (members hold theirs); the callback
        # drops the entry before the store's id can be reused.
        self._id = id(store)
        self._registry = _links  # the callback may run at exit, module globals gone
        self.store: weakref.ref[RedisStore] = weakref.ref(store, self._store_gone)
        self.url = redact(store.url)
        self.client = bounded_client(store)
        self._own_client = self.client is not getattr(store, "_client", None)
        self._closed = False  # the store was collected
        self._store_closed = False  # close() since the last member joined: no idle wait
        # Any Redis error, not only connection errors: an OOM or READONLY reply (or a bug in a
        # script) must degrade the component, never reach the application.
        self._errors = (redis.exceptions.RedisError, OSError)
        # READONLY: a failover moved the address; closed, the next probe reaches the new primary
        self._replica = ReplicaReconnect(SYSTEM_CLOCK)
        self._scripts: dict[str, Any] = {}
        self._lock = new_lock()
        self._members: weakref.WeakSet[Member] = weakref.WeakSet()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._degraded_at: float | None = None
        self._next_probe = 0.0
        self._broken: set[str] = set()

    @property
    def degraded(self) -> bool:
        return self._degraded_at is not None

    @property
    def closed(self) -> bool:
        """True once the store was collected (no member is left: members hold their store)."""
        return self._closed

    # -- lifetime -----------------------------------------------------------------------------

    def close_idle(self) -> None:
        """The store was closed: close the connections nobody is using now. Members stay
        fleet-wide; an exchange in flight keeps its connection (never broken, so never a
        spurious outage) and the next one reconnects. With no member left, the thread exits
        now rather than after :data:`_IDLE_EXIT` seconds."""
        with self._lock:
            if self._closed:
                return
            self._store_closed = True
        self._disconnect()
        self._wake.set()

    def _store_gone(self, _ref: object) -> None:
        # Runs wherever the collector runs (any thread, any lock held there): no lock here.
        # No member is left (members hold the store), and the store's id is not reused
        # before this returns. The thread closes the connections within _POLL seconds (it
        # is not woken: Event.set takes a lock, which this thread may hold).
        self._closed = True
        if self._registry.get(self._id) is self:
            self._registry.pop(self._id, None)

    def _disconnect(self) -> None:
        """Close the idle connections of our own pool (a later call opens new ones); one in
        use by an exchange in flight is left to it, and goes back to the pool after."""
        if not self._own_client:  # pragma: no cover - the store's client: the store closes it
            return
        try:
            self.client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # closing is best effort: a socket already gone, say
            _log.debug("otel_recovery: closing the connections of %s failed", self.url)

    # -- members and the sync thread ---------------------------------------------------------

    def join(self, member: Member) -> None:
        """Register a member; it is synced at once (its first view of the shared state)."""
        with self._lock:
            self._members.add(member)
            self._store_closed = False  # the store is in use again: the usual idle wait
            degraded = self._degraded_at is not None or self._closed
        if degraded:
            member.go_local()
        self.wake()

    def wake(self) -> None:
        """Make the thread run now (a new member, or one that wants a prompt sync)."""
        with self._lock:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="otel-recovery-shared-state", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        idle_since: float | None = None
        while True:
            if self._closed:
                with self._lock:
                    self._thread = None
                self._disconnect()
                return
            members = list(self._members)
            now = SYSTEM_CLOCK.now()
            if not members:
                idle_since = idle_since if idle_since is not None else now
                if self._store_closed or now - idle_since > _IDLE_EXIT:
                    with self._lock:
                        if not self._members:
                            self._thread = None
                            self._store_closed = False
                            # Nobody uses the pool (a member joins under this lock): the
                            # connections go with the thread, the next member reconnects.
                            self._disconnect()
                            return
                self._wake.wait(min(_POLL, _IDLE_EXIT))
                self._wake.clear()
                continue
            idle_since = None
            wait = self._round(members, now)
            del members  # hold no member while waiting: a dropped component must go away
            self._wake.wait(min(wait, _POLL))
            self._wake.clear()

    def _round(self, members: list[Member], now: float) -> float:
        """One pass: reconnect or sync whoever is due; returns how long to wait."""
        if self._degraded_at is not None:
            if now >= self._next_probe:
                self._recover(members)
            return max(0.01, min(self._next_probe - SYSTEM_CLOCK.now(), RECONNECT_INTERVAL))
        for member in members:
            if self._degraded_at is not None:
                break
            self._tick(member, now)
        return min(member.sync_interval for member in members)

    def _tick(self, member: Member, now: float) -> None:
        try:
            if member.sync_due(now):
                member.sync_now()
        except StoreUnavailableError as error:
            self.degrade(error)
        except Exception:  # a bug of ours: say so once per member kind, keep the others going
            if member.description not in self._broken:
                self._broken.add(member.description)
                _log.exception("otel_recovery: syncing %s failed", member.description)

    def _after_fork(self) -> None:
        self._wake = threading.Event()
        self._thread = None
        members = list(self._members)
        # Before the thread restarts: what a member's state owes to the parent's threads
        # (its locks are already free: ``_forksafe``'s handler, registered first, ran).
        for member in members:
            member.after_fork()
        if members:
            self.wake()


def _after_fork_in_child() -> None:
    # The sync threads do not survive fork(); pools reconnect by themselves (redis-py checks
    # the pid). Pre-forking servers (gunicorn --preload) thus keep sharing in every worker.
    for link in list(_links.values()):
        link._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


plain_self(Link)
