"""redis-py's MultiDB health checks run under :func:`suppress_recovery`: its failure detector
sees each server as it is.

redis-py's ``MultiDBClient`` (``redis.multidb.client`` and ``redis.asyncio.multidb.client``)
fails over between databases by itself: its own circuit per database, a failure detector
counting the commands that fail, and periodic health checks (``PingHealthCheck`` by default)
that open or close those circuits. The checks PING through a Redis client of their own,
which our command layer would treat like any other client:

- a PING that fails is retried by us, so a flapping database passes its checks and a dead
  one is found dead only after all our attempts;
- while our circuit for the server is open the PING is refused with our
  ``RedisCircuitOpenError``, so MultiDB keeps a database that has recovered out of rotation
  until our circuit's open time ends.

So every run of the health checks is wrapped in :func:`suppress_recovery`: its PINGs go to
redis-py untouched (not retried, not refused, counted on no breaker or budget; contrib still
traces them). The application's commands through ``MultiDBClient`` still go through our
layer: we retry beneath MultiDB, and our refusal is a ``redis.ConnectionError``, which
MultiDB's failure detector counts as a failure of the active database: MultiDB fails over.
When MultiDB sends them to a database again, our open circuit for it lets the next one
through as its probe instead of refusing it (:mod:`._redis_multidb_routing`).

The patch point is ``MultiDBClient._check_db_health`` of both clients. Every run of the
checks goes through it (the initial check, the recurring one, the check of a half-open
database, ``set_active_database``, ``add_database``), whatever the checks and whatever the
policy: patching the policy's ``execute`` would miss a policy that overrides it, patching
``check_health`` the application's own checks. It is a coroutine function: the suppression
is entered inside the coroutine, so it holds in whichever task and thread runs it (the sync
client runs its checks on an event loop of its own, in a background thread), and asyncio
copies it into the tasks the policy starts for its checks and probes. Where it is a plain
function (the sync client of earlier releases, which ran each database's checks in a thread
pool) it gets the suppression in the thread that runs it.

The modules are patched when imported (a post-import hook: ``opentelemetry-instrument``
instruments before the application imports them), while the Redis instrumentor is
instrumented; a release without MultiDB (redis-py 4.5 to 6) never fires the hook.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any, NamedTuple

from otel_recovery.instrumentors._import_patches import PatchedOnImport
from otel_recovery.instrumentors._suppression import suppress_recovery
from otel_recovery.instrumentors._wrapping import PatchSet, Wrapper, report_internal_error

__all__ = ["MULTIDB_HEALTH_CHECKS", "MultiDBHealthChecks"]


class _Site(NamedTuple):
    module: str
    """The module defining ``owner``: importing it makes the site patchable."""
    owner: str
    attribute: str
    name: str


_SITES = (
    _Site(
        "redis.multidb.client",
        "MultiDBClient",
        "_check_db_health",
        "redis MultiDBClient._check_db_health",
    ),
    _Site(
        "redis.asyncio.multidb.client",
        "MultiDBClient",
        "_check_db_health",
        "redis.asyncio MultiDBClient._check_db_health",
    ),
)


class MultiDBHealthChecks(PatchedOnImport[_Site]):
    """The MultiDB clients' health checks, run under :func:`suppress_recovery` while the
    Redis instrumentor is instrumented (from :meth:`install` to :meth:`remove`)."""

    def __init__(self, sites: tuple[_Site, ...] = _SITES) -> None:
        super().__init__(sites)

    def install(self, patches: PatchSet) -> None:
        """Patch the sites into ``patches`` (which removes them), each now if its module is
        imported, else when it is. Never raises: instrumenting the Redis commands does not
        depend on it."""
        try:
            with self._lock:
                self._patches = patches
                self._installed = set()
            self._patch_sites()
        except Exception as error:
            report_internal_error("patch redis MultiDBClient health checks", error)

    def remove(self) -> None:
        """Patch nothing more: a module imported from now on stays untouched. (The patches
        made are removed with their ``PatchSet``.)"""
        with self._lock:
            self._patches = None
            self._installed = set()

    def _wrapper(self, site: _Site, owner: Any) -> Wrapper:
        awaits = inspect.iscoroutinefunction(getattr(owner, site.attribute))
        return _step_aside(site.name, awaits=awaits)


def _step_aside(where: str, *, awaits: bool) -> Wrapper:
    """The wrapper running a health check under :func:`suppress_recovery`."""
    if awaits:

        def check_awaited(
            wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
        ) -> Any:
            return _awaited(wrapped, args, kwargs, where)

        return check_awaited

    def check(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        with _Suppressed(where):
            return wrapped(*args, **kwargs)

    return check


async def _awaited(
    wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], where: str
) -> Any:
    # Entered here, inside the coroutine: in the context of the task that runs the check,
    # which the tasks it starts copy. Entered by the caller it would end before the check ran.
    with _Suppressed(where):
        return await wrapped(*args, **kwargs)


class _Suppressed:
    """:func:`suppress_recovery` for one health check, failing safe: should entering or
    leaving it fail, that is reported and the check runs (or ends) as it would without us,
    its own result or exception untouched."""

    __slots__ = ("_scope", "_where")

    def __init__(self, where: str) -> None:
        self._where = where
        self._scope: Any = None

    def __enter__(self) -> None:
        try:
            scope = suppress_recovery()
            scope.__enter__()
            self._scope = scope
        except Exception as error:
            report_internal_error(self._where, error)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            return
        try:
            scope.__exit__(None, None, None)
        except Exception as failure:
            report_internal_error(self._where, failure)


MULTIDB_HEALTH_CHECKS = MultiDBHealthChecks()
"""The process's patched MultiDB health checks; the Redis instrumentor installs them."""
