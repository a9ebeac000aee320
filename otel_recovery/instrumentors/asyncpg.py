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
the wait it asked for. What follows taking a holder (its connect) is the server's, retried and
counted as before (``PoolConnectionHolder.acquire`` tells the two apart).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg  # type: ignore[import-untyped]
import asyncpg.connection  # type: ignore[import-untyped]
import asyncpg.pool  # type: ignore[import-untyped]
import asyncpg.prepared_stmt  # type: ignore[import-untyped]

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._db import (
    Plan,
    PlanCache,
    PostgresInstrumentor,
    Route,
    Site,
    SpanMode,
    async_layer,
    compiles,
    instrumentation_enabled,
    pg_default_target,
    retire_table,
    run_async,
)
from otel_recovery.instrumentors._guarded import clients_own
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
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


class _Acquiring:
    """One attempt of ``Pool._acquire``: whether it has taken a connection holder from the
    pool yet (``PoolConnectionHolder.acquire``, which connects if need be). Before that it
    only waits for the application's own pool: a failure then (its ``acquire(timeout=)``
    running out on an exhausted pool, the pool closing) is the client's own, never the
    server's (:func:`clients_own`)."""

    __slots__ = ("holding",)

    def __init__(self) -> None:
        self.holding = False


_ACQUIRING: contextvars.ContextVar[_Acquiring | None] = contextvars.ContextVar(
    "otel_recovery_asyncpg_acquiring", default=None
)
"""The attempt of ``Pool._acquire`` in progress: a connect nested in it passes straight
through (the acquire is the one retried), and taking a holder is noted on it. asyncpg's
``wait_for`` runs the acquire in a task of its own, with a copy of this context: the object
is shared, so what it notes there is seen here."""
_RESETTING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "otel_recovery_asyncpg_resetting", default=None
)
"""The connection whose ``Connection.reset`` is running (a pool resets every connection it
takes back): its statements pass an open circuit (:meth:`AsyncPGRecoveryInstrumentor.\
_passes_refused`)."""
_STATEMENTS = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_PREPARED = ("fetch", "fetchval", "fetchrow", "executemany", "fetchmany")
_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT ", "RELEASE SAVEPOINT ")
"""How the statements asyncpg's ``Transaction`` sends begin; it always spells them so, as one
statement ending in ``;`` (a script such as ``"BEGIN; ...; COMMIT"`` is gated as usual)."""


def _passing_transaction_control(
    build: Callable[[Callable[..., Any]], Callable[..., Any]],
    originals: dict[str, Callable[..., Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``build`` for ``Connection.execute``, sending transaction control straight to the
    original (see the module docstring). ``Transaction`` calls ``execute(query)`` and
    nothing else; the layer stays a plain function returning the awaitable of the one it
    wraps, so every other statement still takes the compiled path. The original is kept in
    ``originals["execute"]`` (what a refused reset is sent through)."""

    def build_passing(original: Callable[..., Any]) -> Callable[..., Any]:
        originals["execute"] = original
        layer = build(original)

        def execute(*args: Any, **kwargs: Any) -> Any:
            if (
                len(args) == 2
                and not kwargs
                and type(args[1]) is str
                and args[1].startswith(_TRANSACTION_CONTROL)
                and args[1].find(";") == len(args[1]) - 1  # one statement, not a script
            ):
                return original(*args)
            return layer(*args, **kwargs)

        return execute

    return build_passing


def dsn_target(dsn: Any, host: Any, port: Any) -> tuple[str, int | None]:
    """The server a ``connect(dsn, host=, port=)`` call reaches; keywords win over the DSN.

    Only host and port are read: the DSN's password never leaves this function.
    """
    if isinstance(dsn, str) and "://" in dsn and (host is None or port is None):
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        first = parts.netloc.rpartition("@")[2].split(",")[0]  # several hosts: the first
        try:
            probe = urlsplit(f"//{first}")
            dsn_host, dsn_port = probe.hostname, probe.port
        except ValueError:
            dsn_host, dsn_port = first, None
        host = host or query.get("host", [""])[0] or dsn_host
        port = port or query.get("port", [""])[0] or dsn_port
    if isinstance(host, (list, tuple)):
        host = host[0] if host else None
    if isinstance(port, (list, tuple)):
        port = port[0] if port else None
    return pg_default_target(host, port)


def _connection_target(connection: Any) -> tuple[str, int | None]:
    address = getattr(connection, "_addr", None)
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return (str(address) if address else "localhost"), None


class _Planner:
    def __init__(self, targets: TargetPolicies) -> None:
        self.plans = PlanCache(targets)
        never = targets.settings.sql_retry == "never"
        self.connect_rule: str | None = "sql_retry_never" if never else None
        self._pools: dict[int, tuple[Any, tuple[str, int | None]]] = {}

    def connect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        dsn = args[0] if args else kwargs.get("dsn")
        host, port = dsn_target(dsn, kwargs.get("host"), kwargs.get("port"))
        return self.plans.plan(host, port, "connect", "own", self.connect_rule)

    def acquire(self, pool: Any) -> Plan:
        # Pool has __slots__ without __weakref__: remember it by id, checked by identity.
        known = self._pools.get(id(pool))
        settings = pool._connect_kwargs
        if known is None or known[0] is not settings:
            args = pool._connect_args
            target = dsn_target(
                args[0] if args else None, settings.get("host"), settings.get("port")
            )
            if len(self._pools) > 1024:
                self._pools.clear()
            known = self._pools[id(pool)] = (settings, target)
        host, port = known[1]
        return self.plans.plan(host, port, "acquire", "own", self.connect_rule)

    def statement(self, site: Site, connection: Any, mode: SpanMode | None = None) -> Plan:
        host, port = _connection_target(connection)
        mode = site.span_mode() if mode is None else mode
        return self.plans.plan(host, port, None, mode, "statement_may_have_run")

    def statement_locator(
        self, site: Site, prepared: bool, patches: PatchSet
    ) -> Callable[[tuple[Any, ...]], Plan]:
        """``locate(args)`` for a statement layer: ``args[0]`` is the connection, or a
        prepared statement bound to one. A connection's plan is also left where the compiled
        layer reads it (:meth:`route`)."""
        shares = not prepared and compiles()
        table_attr = _plans_attribute(site)
        where = f"asyncpg {site.owner.__name__}.{site.attribute} plans"

        def locate(args: tuple[Any, ...]) -> Plan:
            if not shares:
                return self.statement(site, args[0]._connection if prepared else args[0])
            seen = site.current()  # one snapshot: the plan's span mode and the table's token
            plan = self.statement(site, args[0], seen[1])
            try:
                _share(patches, seen, table_attr, args[0], plan)
            except Exception as error:  # a cache write: the call goes on, planned in Python
                report_internal_error(where, error)
            return plan

        return locate

    @staticmethod
    def route(site: Site) -> Route:
        """Where a compiled statement layer finds the plans :meth:`statement_locator` leaves:
        on the connection's class (a ``Connection`` has ``__slots__``, no ``__dict__``), one
        table per method and wrapper chain, keyed by the connection's ``_addr``."""
        return Route(
            holder_attr="__class__",
            table_attr=_plans_attribute(site),
            key_index=0,
            token=None,
            site=site,
            key_attr="_addr",
        )


def _plans_attribute(site: Site) -> str:
    return f"_otel_recovery_plans_{site.attribute}"


def _share(
    patches: PatchSet, seen: tuple[Any, Any], table_attr: str, connection: Any, plan: Plan
) -> None:
    """Leave ``plan`` (made under ``seen``) in the connection class's table for its site,
    keyed by the connection's address; a table made under another wrapper chain is replaced
    (and retired), and uninstrumenting deletes it (:meth:`PatchSet.mark`)."""
    owner = type(connection)
    table = getattr(owner, table_attr, None)
    if table is None or table.token is not seen or table.retired:
        replaced = table
        table = SPEEDUPS.PlanTable(seen, {})  # type: ignore[union-attr]
        patches.mark(owner, table_attr, table)
        retire_table(replaced)
    plans = table.plans
    if len(plans) < 64:
        with contextlib.suppress(TypeError, AttributeError):  # no hashable address: Python
            plans[connection._addr] = plan


Kind = Literal["connect", "acquire", "holder", "reset", "statement", "prepared"]


def _wrapper(planner: _Planner, kind: Kind, site: Site) -> Callable[..., Any]:
    """Connecting and pool acquisition: a wrapt wrapper (the sites are not all methods)."""
    where = f"asyncpg {getattr(site.owner, '__name__', site.owner)}.{site.attribute}"

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not instrumentation_enabled() or (kind == "connect" and _ACQUIRING.get() is not None):
            return await wrapped(*args, **kwargs)
        try:
            plan = planner.connect(args, kwargs) if kind == "connect" else planner.acquire(instance)
        except Exception as error:
            report_internal_error(where, error)
            return await wrapped(*args, **kwargs)
        if kind != "acquire":
            return await run_async(plan, wrapped, args, kwargs)
        return await run_async(plan, _acquiring(wrapped), args, kwargs)

    return wrapper


def _acquiring(acquire: Callable[..., Any]) -> Callable[..., Any]:
    """``Pool._acquire``, each attempt under an :class:`_Acquiring` of its own: a failure
    before a holder was taken is the pool's own wait (or its closing), marked as the
    client's (:func:`clients_own`): not retried, not counted on the server's breaker, and
    raised as asyncpg raised it, after the wait the application asked for. One after (a
    connect refused, a server starting up) is the server's, retried as before."""

    async def attempt(*args: Any, **kwargs: Any) -> Any:
        state = _Acquiring()
        token = _ACQUIRING.set(state)
        try:
            return await acquire(*args, **kwargs)
        except Exception as error:
            if not state.holding:
                clients_own(error)
            raise
        finally:
            _ACQUIRING.reset(token)

    return attempt


def _holding(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``PoolConnectionHolder.acquire``: the acquire in progress has a holder now."""
    state = _ACQUIRING.get()
    if state is not None:
        state.holding = True
    return wrapped(*args, **kwargs)


async def _resetting(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``Connection.reset``, what a pool runs on every connection it takes back: its
    statements pass an open circuit (see :meth:`AsyncPGRecoveryInstrumentor._passes_refused`)."""
    token = _RESETTING.set(instance)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        _RESETTING.reset(token)


def _sites() -> list[tuple[Any, str, Kind]]:
    sites: list[tuple[Any, str, Kind]] = [
        (asyncpg, "connect", "connect"),
        (asyncpg.connection, "connect", "connect"),
        (asyncpg.pool.Pool, "_acquire", "acquire"),
        (asyncpg.pool.PoolConnectionHolder, "acquire", "holder"),
        (asyncpg.connection.Connection, "reset", "reset"),
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
    instruments: ClassVar[tuple[str, ...]] = ("asyncpg >= 0.27",)

    def _server_of(self, connection: Any) -> tuple[str, int | None] | None:
        if not isinstance(connection, asyncpg.Connection) or connection.is_closed():
            return None
        return _connection_target(connection)

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
        resetting = _RESETTING.get()
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
        planner = _Planner(targets)
        self._originals = {}
        for owner, attribute, kind in _sites():
            site = Site(owner, attribute)
            if kind in ("connect", "acquire"):
                wrapper = _wrapper(planner, kind, site)
                site.proxy = patches.wrap(owner, attribute, wrapper, beneath_contrib=True)
            elif kind == "holder":
                site.proxy = patches.wrap(owner, attribute, _holding)
            elif kind == "reset":
                site.proxy = patches.wrap(owner, attribute, _resetting)
            else:  # per statement: a plain-function layer beneath contrib's span
                where = f"asyncpg {owner.__name__}.{attribute}"
                locate = planner.statement_locator(site, kind == "prepared", patches)
                route = planner.route(site) if kind == "statement" else None
                build = async_layer(patches, where, locate, route)
                if owner is asyncpg.connection.Connection and attribute == "execute":
                    build = _passing_transaction_control(build, self._originals)
                site.proxy = patches.layer(owner, attribute, build, beneath_contrib=True)
