"""When redis-py's MultiDB sends the application's commands to a database, our circuit for its
server probes instead of refusing.

MultiDB's circuit per database decides where the commands go; ours per server, beneath it,
refuses them while it is open. The two run on clocks of their own: MultiDB's checks find a
database healthy again (they run under :func:`suppress_recovery`, :mod:`._redis_multidb`)
and MultiDB fails back to it while our circuit, opened by the application's failed commands
during the outage, still has most of its open time to go. Our refusals are
``redis.ConnectionError``\\ s, failures to MultiDB's failure detector, which fails over
again: a healthy database is shunned, back and forth, until our open time ends (and a
MultiDB with nowhere else to go has no database at all).

So when MultiDB starts sending the commands to a database, our open time for its servers
ends (:meth:`CircuitBreaker.probe_now`, reason ``multidb_active``): the next application
command is our circuit's probe, and its answer decides, as any probe's does. That moment is

- MultiDB making a database active: a failover, a fail-back (``auto_fallback_interval``),
  ``set_active_database``, ``add_database``, ``remove_database``. Every such change builds
  an ``ActiveDatabaseChanged`` event (``AsyncActiveDatabaseChanged`` for asyncio), sync
  setter and async coroutine alike, so its constructor is the patch point: it also reaches
  clients built before ``instrument()``, and leaves nothing behind (a listener registered
  with a client's dispatcher would do neither);
- a run of MultiDB's checks closing the circuit of the database that is already active
  (none to fail over to: the only one, or all down), after which MultiDB sends it the
  commands again without making anything active. The patch point is
  ``MultiDBClient._check_db_health``, as for the suppression, comparing its circuit's state
  before and after;
- ``MultiDBClient.initialize()`` choosing the first active database, which builds no event
  (a client made, or made again after it had no database, while our circuit for that
  database is still open). The patch point is ``initialize`` itself, once it returned.

Why not close our circuit there, or let a check's success count on it: a PING is not the
application's traffic (a server may answer it and fail every write), so only the
application's commands judge our circuit; the signal only ends the waiting. Why not let
MultiDB-owned connections pass our circuit: its refusals are what fail the commands to a
dead database fast (no retries, no socket timeouts), so that MultiDB's failure detector
reaches its threshold in milliseconds, and telling the connections apart would cost every
plain client's command. The transition is one per signal, not per command: nothing else
changes on any client's path. A circuit forced open (``force_open()``) stays so: an
operator draining a database out of MultiDB's rotation keeps it drained.

A cluster database's servers are the nodes its client knows (and the cluster as a whole).
A circuit of ours exists only once the application has called the server; none is made
here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from otel_recovery.instrumentors._import_patches import PatchedOnImport
from otel_recovery.instrumentors._redis_targets import servers_of
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, Wrapper, report_internal_error

__all__ = ["MULTIDB_ROUTING", "REASON", "MultiDBRouting"]

REASON = "multidb_active"
"""The reason of the transitions made here (``otel_recovery.circuit_breaker.reason``)."""


class _Site(NamedTuple):
    module: str
    owner: str
    attribute: str
    name: str
    signal: Literal["activated", "checked", "initialized"]
    """``activated``: an event's constructor, naming the new active database;
    ``checked``: a run of the checks of one database; ``initialized``: a client's
    ``initialize()``, which chose its first active database."""


_SITES = (
    _Site(
        "redis.multidb.event",
        "ActiveDatabaseChanged",
        "__init__",
        "redis MultiDB ActiveDatabaseChanged",
        "activated",
    ),
    _Site(
        "redis.asyncio.multidb.event",
        "AsyncActiveDatabaseChanged",
        "__init__",
        "redis.asyncio MultiDB AsyncActiveDatabaseChanged",
        "activated",
    ),
    _Site(
        "redis.multidb.client",
        "MultiDBClient",
        "_check_db_health",
        "redis MultiDBClient._check_db_health (routing)",
        "checked",
    ),
    _Site(
        "redis.asyncio.multidb.client",
        "MultiDBClient",
        "_check_db_health",
        "redis.asyncio MultiDBClient._check_db_health (routing)",
        "checked",
    ),
    _Site(
        "redis.multidb.client",
        "MultiDBClient",
        "initialize",
        "redis MultiDBClient.initialize (routing)",
        "initialized",
    ),
    _Site(
        "redis.asyncio.multidb.client",
        "MultiDBClient",
        "initialize",
        "redis.asyncio MultiDBClient.initialize (routing)",
        "initialized",
    ),
)


class MultiDBRouting(PatchedOnImport[_Site]):
    """Ends our open time for a database's servers when MultiDB sends it the commands,
    while the Redis instrumentor is instrumented (from :meth:`install` to :meth:`remove`)."""

    def __init__(self, sites: tuple[_Site, ...] = _SITES) -> None:
        super().__init__(sites)
        self._targets: TargetPolicies | None = None

    def install(self, patches: PatchSet, targets: TargetPolicies) -> None:
        """Patch the sites into ``patches``, now or when their modules are imported; the
        circuits moved are ``targets``'. Never raises: the commands do not depend on it."""
        try:
            with self._lock:
                self._patches = patches
                self._targets = targets
                self._installed = set()
            self._patch_sites()
        except Exception as error:
            report_internal_error("patch redis MultiDB routing", error)

    def remove(self) -> None:
        """Patch nothing more, and move no circuit (the patches made go with their
        ``PatchSet``)."""
        with self._lock:
            self._patches = None
            self._targets = None
            self._installed = set()

    def _wrapper(self, site: _Site, owner: Any) -> Wrapper:
        if site.signal == "activated":
            return self._on_activation(site.name)
        awaits = inspect.iscoroutinefunction(getattr(owner, site.attribute))
        if site.signal == "initialized":
            return self._on_initialization(site.name, awaits=awaits)
        return self._on_check(site.name, awaits=awaits)

    def _on_activation(self, where: str) -> Wrapper:
        """The wrapper of an ``ActiveDatabaseChanged`` constructor: once the event is
        built, its new database's servers probe."""

        def activated(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            result = wrapped(*args, **kwargs)
            try:
                self._probe(instance.new_database)
            except Exception as error:
                report_internal_error(where, error)
            return result

        return activated

    def _on_initialization(self, where: str, *, awaits: bool) -> Wrapper:
        """The wrapper of ``initialize``: once it returned, the servers of the active
        database it chose probe (it raised: no database was made active)."""

        def first(client: Any) -> None:
            try:
                database = client.command_executor.active_database
                if database is not None:
                    self._probe(database)
            except Exception as error:
                report_internal_error(where, error)

        if awaits:

            async def initialize_awaited(
                wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
            ) -> Any:
                result = await wrapped(*args, **kwargs)
                first(instance)
                return result

            return initialize_awaited

        def initialize(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            result = wrapped(*args, **kwargs)
            first(instance)
            return result

        return initialize

    def _on_check(self, where: str, *, awaits: bool) -> Wrapper:
        """The wrapper of ``_check_db_health``: if the run closed the circuit of the
        client's active database, its servers probe. The check's result or exception is
        its own, untouched."""
        if awaits:

            def check_awaited(
                wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
            ) -> Any:
                return self._awaited(wrapped, instance, args, kwargs, where)

            return check_awaited

        def check(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            before = self._before(args, kwargs, where)
            result = wrapped(*args, **kwargs)
            self._after(instance, before, where)
            return result

        return check

    async def _awaited(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        where: str,
    ) -> Any:
        before = self._before(args, kwargs, where)
        result = await wrapped(*args, **kwargs)
        self._after(instance, before, where)
        return result

    @staticmethod
    def _before(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> _Checked | None:
        """The database a check is about and whether its circuit was closed; None if that
        cannot be read (the check then runs as it would without us)."""
        try:
            database = args[0] if args else kwargs["database"]
            return _Checked(database, _closed(database))
        except Exception as error:
            report_internal_error(where, error)
            return None

    def _after(self, client: Any, before: _Checked | None, where: str) -> None:
        if before is None or before.was_closed:
            return
        try:
            database = before.database
            if _closed(database) and client.command_executor.active_database is database:
                self._probe(database)
        except Exception as error:
            report_internal_error(where, error)

    def _probe(self, database: Any) -> None:
        """End the open time of our circuits for ``database``'s servers (those that have
        one: a server not called yet has none)."""
        targets = self._targets
        if targets is None:
            return
        for host, port in servers_of(database.client):
            breaker = targets.known_breaker(host, port)
            if breaker is not None:
                breaker.probe_now(REASON)


class _Checked(NamedTuple):
    database: Any
    was_closed: bool


def _closed(database: Any) -> bool:
    """Whether MultiDB's circuit for ``database`` is closed (its ``State`` compared by
    value: importing ``redis.multidb.circuit`` would import pybreaker)."""
    return getattr(database.circuit.state, "value", None) == "closed"


MULTIDB_ROUTING = MultiDBRouting()
"""The process's MultiDB routing patches; the Redis instrumentor installs them."""
