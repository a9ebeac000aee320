"""The link between fleet-wide breakers/budgets and Redis: calls, sync thread, degradation.

Which components share, and through which store, is decided in :mod:`._sharing`.

**One link per Redis store per process.** It owns a connection pool of its own, built from
the store's URL and options but with :data:`DECISION_TIMEOUT` socket timeouts: a breaker
decision may wait for Redis on a failure or probe, and must never wait the store's 5 s for a
server that stopped answering. Scripts run with OpenTelemetry instrumentation suppressed, so
the sync traffic neither makes spans nor passes through our own Redis instrumentor.

**One background thread per link** syncs every member: each pushes what it counted locally
since its last contact and adopts the shared state (see the members' module docs for the
cadence). Callers wait for it only as for any exchange ahead of theirs (below), and it never
runs user code except breaker listeners for transitions it observed.

**The decision bound.** Each member talks to Redis one exchange at a time (its ``_talk``
lock, taken through :meth:`Link.turn`: pushes and replies stay in order), yet a server that
stops answering must not cost each caller queued on a member the timeout in turn. So an
exchange that meets an error degrades the link *before* it lets go of the lock (whoever gets
the lock next finds the member local and decides locally at once), and nobody waits for the
lock longer than :data:`DECISION_TIMEOUT` (a turn not had by then counts as a timeout: the
exchange ahead is stuck). When Redis stops answering, every decision, the first included,
thus waits at most that long, however many callers there are. The worst case is twice that:
the exchange ahead got its reply just within the bound, then this caller's got none.

**Degradation.** Any member call that meets an unreachable or failing Redis (refused, timed
out, or an error reply such as OOM or READONLY) degrades the whole link:
every member switches to its plain local logic at once, one warning is logged and one
``otel_recovery.store.degraded`` event is added (to the current span, or to a short
``otel_recovery.store`` span when the thread noticed it). While degraded nobody calls Redis
except the link thread, which PINGs every :data:`RECONNECT_INTERVAL` seconds with the bounded
timeout. When Redis answers, each member *resyncs* (pushes what it did locally, then adopts the
shared state; defined in each member's module), and one info line plus one
``otel_recovery.store.resynced`` event close the outage. Store errors never reach callers.

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

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_recovery._clock import SYSTEM_CLOCK
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry._suppressed import SUPPRESS_KEY

if TYPE_CHECKING:
    import redis

    from otel_recovery.stores.redis import RedisStore

__all__ = [
    "DECISION_TIMEOUT",
    "RECONNECT_INTERVAL",
    "Link",
    "Member",
    "link_for",
]

_log = logging.getLogger("otel_recovery")

DECISION_TIMEOUT = 0.25
"""Connect and read timeout (s) of every shared-state call, and the longest a caller waits for
its turn to make one (see "The decision bound" in the module doc)."""
RECONNECT_INTERVAL = 1.0
"""Seconds between reconnection attempts while degraded."""
KEEP_MS = 7 * 86400 * 1000
"""Shared state of a breaker or budget that nobody touched for 7 days expires."""
_IDLE_EXIT = 30.0
_POLL = 1.0
"""Longest wait of the thread between looks at its link (a store collected meanwhile)."""


class Member(Protocol):
    """What a fleet-wide component offers its link (all called from the link thread but
    ``go_local``, which may run in any thread, and ``after_fork``, which runs in a forked
    child before any other code of the child)."""

    @property
    def description(self) -> str: ...

    @property
    def sync_interval(self) -> float: ...

    @property
    def shared(self) -> bool: ...

    @property
    def degraded(self) -> bool:
        """Local because the link is degraded: its exchanges stop until the resync."""
        ...

    def sync_due(self, now: float) -> bool: ...

    def sync_now(self) -> None: ...

    def go_local(self) -> None: ...

    def resync(self) -> None: ...

    def after_fork(self) -> None: ...


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


def _bounded_client(store: RedisStore) -> redis.Redis:
    """A client on the store's server with :data:`DECISION_TIMEOUT` timeouts and no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = {
        **getattr(store, "_options", {}),
        "socket_timeout": DECISION_TIMEOUT,
        "socket_connect_timeout": DECISION_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    target = getattr(store, "_target", None)
    if target is None:  # pragma: no cover - a RedisStore without its URL: share its client
        return store.client
    return redis.Redis.from_url(target, **options)


class Link:
    """Calls, sync thread and outage bookkeeping for the fleet-wide members of one store."""

    def __init__(self, store: RedisStore) -> None:
        import redis

        from otel_recovery._redis_replica import ReplicaReconnect

        # Weakly: the registry must keep no store alive (members hold theirs); the callback
        # drops the entry before the store's id can be reused.
        self._id = id(store)
        self._registry = _links  # the callback may run at exit, module globals gone
        self.store: weakref.ref[RedisStore] = weakref.ref(store, self._store_gone)
        self.url = redact(store.url)
        self.client = _bounded_client(store)
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

    # -- calls ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def turn(self, talk: threading.Lock, member: Member | None = None) -> Iterator[None]:
        """Hold a member's ``talk`` lock for one exchange (see "The decision bound").

        Raises :class:`StoreUnavailableError` when the lock is not had within
        :data:`DECISION_TIMEOUT`, or when ``member`` (None for a resync, which runs while the
        member is local) is no longer shared once it is: the exchange it waited for degraded
        the link. An error inside degrades the link before the lock is let go.
        """
        if not talk.acquire(timeout=DECISION_TIMEOUT):
            raise StoreUnavailableError(
                f"Redis store {self.url} is unavailable: no turn to ask it"
            ) from TimeoutError(f"waited {DECISION_TIMEOUT}s for the reply to an exchange ahead")
        outage: tuple[StoreUnavailableError, list[Member]] | None = None
        try:
            if member is not None and member.degraded:
                raise StoreUnavailableError(f"Redis store {self.url} is unavailable")
            yield
        except StoreUnavailableError as error:
            outage = self._go_local(error)
            raise
        finally:
            talk.release()
            if outage is not None:  # reported outside the lock: logging runs user handlers
                self._report(*outage)

    def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script; an unreachable server raises :class:`StoreUnavailableError`."""
        if self._closed:  # pragma: no cover - members hold the store: none is left to call
            raise StoreUnavailableError(f"Redis store {self.url} is gone")
        token = otel_context.attach(otel_context.set_value(SUPPRESS_KEY, True))
        try:
            script = self._scripts.get(source)
            if script is None:
                script = self._scripts[source] = self.client.register_script(source)
            try:
                return script(keys=list(keys), args=list(args))
            except self._errors as exc:
                # READONLY: the connection reached a demoted primary (a failover moved the
                # address) and the script did not run: once more, on a new connection
                if not self._replica.close_stale(exc, self.client):
                    raise
            return script(keys=list(keys), args=list(args))
        except self._errors as exc:
            detail = redact(str(exc)) or type(exc).__name__
            raise StoreUnavailableError(f"Redis store {self.url} is unavailable: {detail}") from exc
        finally:
            otel_context.detach(token)
            if self._closed:  # pragma: no cover - gone while we talked: close what we reopened
                self._disconnect()

    def _ping(self) -> bool:
        token = otel_context.attach(otel_context.set_value(SUPPRESS_KEY, True))
        try:
            return bool(self.client.ping())
        except Exception:  # any failure means: not back yet
            return False
        finally:
            otel_context.detach(token)

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

    # -- outage -------------------------------------------------------------------------------

    def degrade(self, error: StoreUnavailableError) -> None:
        """Switch every member to local state; announce the outage once."""
        outage = self._go_local(error)
        if outage is not None:
            self._report(*outage)

    def _go_local(
        self, error: StoreUnavailableError
    ) -> tuple[StoreUnavailableError, list[Member]] | None:
        """Switch every member to local state; what to report if this began the outage."""
        with self._lock:
            # the store is gone: no member is left to tell (nothing to report)
            first = self._degraded_at is None and not self._closed
            now = SYSTEM_CLOCK.now()
            if first:
                self._degraded_at = now
            if first or self._next_probe <= now:  # callers queued behind it: no postponing
                self._next_probe = now + RECONNECT_INTERVAL
            members = list(self._members)
        for member in members:
            member.go_local()
        return (error, members) if first else None

    def _report(self, error: StoreUnavailableError, members: list[Member]) -> None:
        _log.warning(
            "otel_recovery: store %s is unreachable (%s); circuit breakers and retry budgets "
            "sharing state through it use local state until it is back, then resync",
            self.url,
            redact(str(error.__cause__ or error)),
        )
        attrs: dict[str, Any] = {
            names.STORE_URL: self.url,
            names.ERROR_TYPE: type(error.__cause__ or error).__name__,
            names.STORE_COMPONENTS: sorted(m.description for m in members),
        }
        _announce(names.EVENT_STORE_DEGRADED, attrs)

    def _recover(self, members: list[Member]) -> None:
        if not self._ping():
            with self._lock:
                self._next_probe = SYSTEM_CLOCK.now() + RECONNECT_INTERVAL
            return
        try:
            for member in members:
                member.resync()
        except StoreUnavailableError as error:
            self.degrade(error)  # members that did resync go local again; no second warning
            return
        with self._lock:
            started, self._degraded_at = self._degraded_at, None
        outage = 0.0 if started is None else max(0.0, SYSTEM_CLOCK.now() - started)
        _log.info(
            "otel_recovery: store %s is reachable again after %.1fs; %d circuit breaker(s) and "
            "retry budget(s) pushed their local outcomes and use shared state again",
            self.url,
            outage,
            len(members),
        )
        _announce(
            names.EVENT_STORE_RESYNCED,
            {
                names.STORE_URL: self.url,
                names.STORE_OUTAGE: outage,
                names.STORE_COMPONENTS: sorted(m.description for m in members),
            },
        )

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


def _announce(event: str, attrs: dict[str, Any]) -> None:
    """Add ``event`` to the current span, or to a short span of its own when there is none."""
    try:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(event, attrs)
            return
        from otel_recovery.telemetry import get_telemetry

        with get_telemetry().tracer.start_as_current_span(names.STORE_SPAN) as own:
            own.add_event(event, attrs)
    except Exception:  # telemetry must never turn an outage report into a failure
        _log.debug("otel_recovery: could not record %s", event, exc_info=True)


def _after_fork_in_child() -> None:
    # The sync threads do not survive fork(); pools reconnect by themselves (redis-py checks
    # the pid). Pre-forking servers (gunicorn --preload) thus keep sharing in every worker.
    for link in list(_links.values()):
        link._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
