"""``AsyncPGRecoveryInstrumentor``: asyncpg connections and pool acquisition recover inline;
statements never run twice.

The rule is psycopg's (see :mod:`.psycopg`): a statement that failed may have run, so it is
classified, counted on the server's breaker, annotated and re-raised unchanged, never
retried; use ``run_transaction`` to retry a whole transaction. What is retried, when
``sql_retry = "connect"`` (the default), is getting a connection, where nothing can have run:
``asyncpg.connect`` and ``Pool.acquire`` (refused, reset, ``57P03``, too many clients).

Patch points: ``asyncpg.connect`` and ``asyncpg.connection.connect`` (the name pools call);
``Pool._acquire``, the coroutine behind every form of ``pool.acquire()`` (``await``,
``async with``, ``pool.fetch``...), so a pool created before instrumenting is covered too;
and the statement methods contrib wraps (``Connection.execute/executemany/fetch/fetchval/
fetchrow`` and ``PreparedStatement.*``), with our wrapper spliced beneath contrib's so our
events land on its span. A pool opening a connection inside an acquire is retried once, at
the acquire: the nested connect then passes straight through, so attempts do not multiply
and the breaker counts one outcome per acquire.

asyncpg's own transaction control (``BEGIN``, ``COMMIT``, ``ROLLBACK``, savepoints, sent by
``Transaction`` through ``Connection.execute``) passes straight through, even with the
circuit open. ``Transaction`` updates its bookkeeping before it sends them: a refused
``BEGIN`` would leave the connection believing it is in a transaction it never started (each
later ``BEGIN`` becomes a ``SAVEPOINT`` the server rejects, for the life of a pooled
connection), and a refused ``COMMIT`` or ``ROLLBACK`` would leave the server holding a
transaction, and its locks, that the client has forgotten. Refusing the statements inside
the transaction is what fails fast. What a pool sends when it takes a connection back
(``Connection.reset``) passes an open circuit too, sent as without us: refused, it raised out
of ``pool.release()``, after the application's work had committed. While the circuit is
closed it runs and counts like any statement.

Waiting for the application's own pool is not the server's failure: an ``acquire(timeout=)``
that runs out before a connection holder is free (or a pool closing under it) is neither
retried nor counted on the breaker, and reaches the application as asyncpg raised it, after
the wait it asked for. What follows taking a holder is the server's, and counted as before
(``PoolConnectionHolder.acquire`` tells the two apart). Of that, only a failure of making the
connection is retried (:func:`~._asyncpg_plans.raised_connecting`): the pool's ``init``
and ``setup`` callbacks, which run after it, are the application's statements. One that
failed may have written (an audit row per checkout), and a retried acquire would run the
callback again: it is counted and raised as asyncpg raised it
(``otel_recovery.retry.disallowed=statement_may_have_run``). So is the application's own
``acquire(timeout=)`` running out while the connection is being made: the wait it asked for,
not each attempt's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import asyncpg  # type: ignore[import-untyped]
import asyncpg.connection  # type: ignore[import-untyped]
import asyncpg.pool  # type: ignore[import-untyped]
import asyncpg.prepared_stmt  # type: ignore[import-untyped]

from otel_recovery.instrumentors._asyncpg_closed import AsyncpgPolicy
from otel_recovery.instrumentors._asyncpg_connects import Kind, connect_wrapper, holding
from otel_recovery.instrumentors._asyncpg_passing import (
    RESETTING,
    passing_transaction_control,
    resetting,
)
from otel_recovery.instrumentors._asyncpg_plans import Planner
from otel_recovery.instrumentors._asyncpg_targets import connection_target
from otel_recovery.instrumentors._db import async_layer
from otel_recovery.instrumentors._pg_instrumentor import PostgresInstrumentor
from otel_recovery.instrumentors._span_mode import Site
from otel_recovery.instrumentors._target_policy import TargetPolicy
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["AsyncPGCircuitOpenError", "AsyncPGRecoveryInstrumentor"]


class AsyncPGCircuitOpenError(CircuitOpenError, asyncpg.exceptions.InterfaceError):  # type: ignore[misc]
    """The server's circuit is open, so the connect or statement was not sent.

    Also an ``asyncpg.InterfaceError``, asyncpg's error for a call the client would not make
    (a closed connection, a released one): ``except asyncpg.InterfaceError`` catches it, and
    SQLAlchemy's asyncpg dialect wraps it as its ``InterfaceError``, a DBAPI error, not a
    disconnect.
    """

    def with_msg(self, msg: str) -> AsyncPGCircuitOpenError:
        """asyncpg's ``InterfaceError`` contract: the same error with another message
        (asyncpg builds the annotated copy with ``type(self)(msg, detail=..., hint=...)``,
        which our constructor does not take)."""
        error = type(self)(self.name, self.retry_after)
        error.args = (msg,)
        return error.with_traceback(self.__traceback__)


_STATEMENTS = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_PREPARED = ("fetch", "fetchval", "fetchrow", "executemany", "fetchmany")


def _sites() -> list[tuple[Any, str, Kind]]:
    sites: list[tuple[Any, str, Kind]] = [
        (asyncpg, "connect", "connect"),
        (asyncpg.connection, "connect", "connect"),
        (asyncpg.pool.Pool, "_acquire", "acquire"),
        (asyncpg.pool.PoolConnectionHolder, "acquire", "holder"),
        (asyncpg.connection.Connection, "reset", "reset"),
        (asyncpg.pool.PoolConnectionHolder, "release", "reset"),
    ]
    connection_class = asyncpg.connection.Connection
    sites += [
        (connection_class, m, "statement") for m in _STATEMENTS if m in vars(connection_class)
    ]
    prepared = asyncpg.prepared_stmt.PreparedStatement
    sites += [(prepared, m, "prepared") for m in _PREPARED if m in vars(prepared)]
    return sites


class AsyncPGRecoveryInstrumentor(PostgresInstrumentor):
    """Inline recovery for asyncpg connections and pools; see the module docstring."""

    library: ClassVar[str] = "asyncpg"
    rejection: ClassVar[type[CircuitOpenError]] = AsyncPGCircuitOpenError
    policy_class: ClassVar[type[TargetPolicy]] = AsyncpgPolicy
    instruments: ClassVar[tuple[str, ...]] = ("asyncpg >= 0.27",)

    def _server_of(self, connection: Any) -> tuple[str, int | None] | None:
        if not isinstance(connection, asyncpg.Connection) or connection.is_closed():
            return None
        return connection_target(connection)

    _originals: dict[str, Callable[..., Any]]

    def _passes_refused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[..., Any] | None:
        """What a pool's reset of a connection it takes back sends passes an open circuit:
        ``Connection.reset``'s ``execute(reset_query)`` (and, where asyncpg sends it as a
        statement of its own, the ``ROLLBACK`` of a transaction left open), on the
        connection being reset. Refused, it raised
        out of ``pool.release()``, at the exit of ``async with pool.acquire()``: after the
        application's work had committed, so an application retrying what it took for
        failed work applied it twice. Sent, it does what it does without us (a server that
        is really down fails it, and asyncpg closes that connection). Asked on the
        rejection path only."""
        resetting = RESETTING.get()
        if (
            resetting is None
            or len(args) != 2
            or args[0] is not resetting
            or type(args[1]) is not str
            or not kwargs.keys() <= {"timeout"}
        ):
            return None
        return getattr(self, "_originals", {}).get("execute")

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        planner = Planner(targets)
        self._originals = {}
        for owner, attribute, kind in _sites():
            site = Site(owner, attribute)
            if kind in ("connect", "acquire"):
                wrapper = connect_wrapper(planner, kind, site)
                site.proxy = patches.wrap(owner, attribute, wrapper, beneath_contrib=True)
            elif kind == "holder":
                site.proxy = patches.wrap(owner, attribute, holding)
            elif kind == "reset":
                site.proxy = patches.wrap(owner, attribute, resetting)
            else:  # per statement: a plain-function layer beneath contrib's span
                where = f"asyncpg {owner.__name__}.{attribute}"
                locate = planner.statement_locator(site, kind == "prepared", patches)
                route = planner.route(site) if kind == "statement" else None
                build = async_layer(patches, where, locate, route)
                if owner is asyncpg.connection.Connection and attribute == "execute":
                    build = passing_transaction_control(build, self._originals)
                site.proxy = patches.layer(owner, attribute, build, beneath_contrib=True)
