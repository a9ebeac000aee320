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
connection is retried (:func:`raised_connecting`): the pool's ``init`` and ``setup``
callbacks, which run after it, are the application's statements. One that failed may have
written (an audit row per checkout), and a retried acquire would run the callback again: it
is counted and raised as asyncpg raised it (``otel_recovery.retry.disallowed=
statement_may_have_run``). So is the application's own ``acquire(timeout=)`` running out
while the connection is being made: the wait it asked for, not each attempt's.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import contextvars
import os
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlparse
from urllib.parse import unquote as url_unquote

import asyncpg  # type: ignore[import-untyped]
import asyncpg.connection  # type: ignore[import-untyped]
import asyncpg.pool  # type: ignore[import-untyped]
import asyncpg.prepared_stmt  # type: ignore[import-untyped]

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._asyncpg_acquire import ACQUIRING, Acquiring
from otel_recovery.instrumentors._asyncpg_closed import AsyncpgPolicy
from otel_recovery.instrumentors._attempt_site import AttemptSite, limit_seconds
from otel_recovery.instrumentors._db import Route, async_layer, compiles, retire_table, run_async
from otel_recovery.instrumentors._db_plans import Plan, PlanCache
from otel_recovery.instrumentors._guarded import clients_own, told_beneath
from otel_recovery.instrumentors._pg_instrumentor import PostgresInstrumentor
from otel_recovery.instrumentors._pg_targets import (
    pg_ambiguous_url,
    pg_service_file,
    pg_socket_target,
    pg_target,
)
from otel_recovery.instrumentors._span_mode import Site, SpanMode
from otel_recovery.instrumentors._suppression import instrumentation_enabled
from otel_recovery.instrumentors._target_policy import TargetPolicy
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


_RESETTING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "otel_recovery_asyncpg_resetting", default=None
)
"""The connection whose ``Connection.reset`` is running (a pool resets every connection it
takes back): its statements pass an open circuit (:meth:`AsyncPGRecoveryInstrumentor.\
_passes_refused`)."""
_STATEMENTS = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_PREPARED = ("fetch", "fetchval", "fetchrow", "executemany", "fetchmany")
_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT ", "RELEASE SAVEPOINT ")
"""How the statements asyncpg's ``Transaction`` sends begin; it spells them so, as one
statement ending in ``;`` (``Connection._reset``, run by a pool taking a connection back,
sends ``ROLLBACK`` without one); a script such as ``"BEGIN; ...; COMMIT"`` is gated as
usual."""


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
                # one statement, not a script: `ROLLBACK;` as Transaction spells it, or
                # `ROLLBACK` as Connection._reset does
                and args[1].find(";") in (-1, len(args[1]) - 1)
            ):
                return original(*args)
            return layer(*args, **kwargs)

        return execute

    return build_passing


def dsn_target(
    dsn: Any, host: Any, port: Any, service: Any = None, servicefile: Any = None
) -> tuple[str, int | None] | None:
    """The target a ``connect(dsn, host=, port=, service=, servicefile=)`` call reaches,
    found as asyncpg finds it: keywords, then the DSN's host list, its ``?port=`` and
    ``?host=``, its service's section, ``PGHOST``/``PGPORT``, then asyncpg's defaults (the
    first of its socket directories holding the server's socket, else ``localhost``).
    Several hosts: the whole list (:func:`pg_target`).

    None when the DSN cannot be read, or its password may have been read as its host or
    port (:func:`pg_ambiguous_url`): no name is ever derived from such a DSN, and nothing
    of it is reported (asyncpg raises its own error). The password is never read.
    """
    try:
        members = _members(dsn, host, port, service, servicefile)
    except Exception:  # its message may quote the DSN: asyncpg will say what it cannot read
        return None
    return None if members is None else pg_target(members)


def _members(
    dsn: Any, host: Any, port: Any, service: Any, servicefile: Any
) -> list[tuple[str, int | None]] | None:
    """``[(host, port), ...]`` as asyncpg's ``_parse_connect_dsn_and_args`` picks them."""
    if dsn:
        if not isinstance(dsn, str) or pg_ambiguous_url(dsn, "/?#"):
            return None
        parts = urlparse(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            return None
        query = {
            key: values[-1]
            for key, values in parse_qs(parts.query, strict_parsing=True).items()
        } if parts.query else {}  # fmt: skip
        service = service or query.get("service") or None
        hostspec = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
        if not host and hostspec:
            host, port = _host_list(hostspec, port, unquote=True)
        if not port and query.get("port"):
            port = [int(p) for p in query["port"].split(",")]
        if not host and query.get("host"):
            host, port = _host_list(query["host"], port)
        if service is not None:
            host, port = _from_service(str(service), servicefile, host, port)
    if not host and os.environ.get("PGHOST"):
        host, port = _host_list(os.environ["PGHOST"], port)
    if not port:
        port = _environment_port()
    elif isinstance(port, (list, tuple)):
        port = [int(p) for p in port]
    else:
        port = int(port)
    if not host:
        candidates = ["localhost"] if os.name == "nt" else [*_SOCKET_DIRECTORIES, "localhost"]
        ports = _port_list(candidates, port)
        return [_default_server(candidates, ports)]
    hosts = list(host) if isinstance(host, (list, tuple)) else [host]
    return [(str(h), p) for h, p in zip(hosts, _port_list(hosts, port), strict=True)]


_SOCKET_DIRECTORIES = ("/run/postgresql", "/var/run/postgresql", "/tmp", "/private/tmp")
"""Where asyncpg looks for the server when no host is given, in its order, before
``localhost``."""


def _default_server(candidates: list[str], ports: list[int]) -> tuple[str, int | None]:
    """The first of asyncpg's default hosts it would reach: a socket directory holding the
    server's socket (a directory without one fails at once, and asyncpg tries the next),
    else ``localhost``."""
    for directory, number in zip(candidates[:-1], ports[:-1], strict=True):
        if os.path.exists(f"{directory}/.s.PGSQL.{number}"):
            return directory, number
    return candidates[-1], ports[-1]


def _host_list(spec: str, port: Any, *, unquote: bool = False) -> tuple[list[str], Any]:
    """asyncpg's ``_parse_hostlist``: hosts of ``a:1,[::1]:2,/dir``, and their ports unless
    ``port`` is given."""
    specs = spec.split(",")
    hosts: list[str] = []
    ports: list[int] = []
    if not port:
        defaults = _port_list(specs, _environment_port())
    for index, item in enumerate(specs):
        if item[0] == "/":
            address, item_port = item, ""
        elif item[0] == "[":
            match = re.match(r"(?:\[([^\]]+)\])(?::([0-9]+))?", item)
            if match is None:
                raise ValueError("invalid IPv6 address")
            address, item_port = match.group(1), match.group(2) or ""
        else:
            address, _, item_port = item.partition(":")
        hosts.append(url_unquote(address) if unquote else address)
        if not port:
            text = url_unquote(item_port) if unquote else item_port
            ports.append(int(text) if text else defaults[index])
    return hosts, port or ports


def _environment_port() -> Any:
    """``PGPORT`` (a number, or a list of them), else 5432."""
    spec = os.environ.get("PGPORT")
    if not spec:
        return 5432
    return [int(p) for p in spec.split(",")] if "," in spec else int(spec)


def _port_list(hosts: list[Any], port: Any) -> list[int]:
    """asyncpg's ``_validate_port_spec``: one port per host."""
    if isinstance(port, list) and len(port) > 1:
        if len(port) != len(hosts):
            raise ValueError("port numbers do not match the hosts")
        return port
    if isinstance(port, list):
        return [port[0]] * len(hosts)
    return [port] * len(hosts)


def _from_service(service: str, servicefile: Any, host: Any, port: Any) -> tuple[Any, Any]:
    """Host and port from the service file, where the call gave none (asyncpg reads
    ``servicefile``, else ``PGSERVICEFILE``, else ``~/.pg_service.conf``, with
    ``configparser``)."""
    parser = configparser.ConfigParser()
    parser.read(pg_service_file(servicefile or None))
    if not parser.has_section(service):
        return host, port
    section = parser[service]
    if not port and section.get("port"):
        port = [int(p) for p in section["port"].split(",")]
    if not host and section.get("host"):
        host, port = _host_list(section["host"], port)
    return host, port


_ADDRESSES: dict[Any, tuple[str, int | None]] = {}
"""Targets by connection address (``_addr``): a statement planned in Python finds its
target with one lookup."""


def _connection_target(connection: Any) -> tuple[str, int | None]:
    """Host and port of an open connection: ``(host, port)``, or for a unix socket
    (``/dir/.s.PGSQL.5432``) its directory and port, as a connect to it is keyed."""
    address = getattr(connection, "_addr", None)
    try:
        return _ADDRESSES[address]
    except (KeyError, TypeError):
        pass
    if isinstance(address, tuple) and len(address) >= 2:
        target = pg_target([(str(address[0]), int(address[1]))])
    elif isinstance(address, str) and address:
        target = pg_socket_target(address)
    else:
        target = (str(address) if address else "localhost"), None
    with contextlib.suppress(TypeError):  # an address that is not hashable: not kept
        if len(_ADDRESSES) >= 1024:
            _ADDRESSES.clear()
        _ADDRESSES[address] = target
    return target


def _call_target(dsn: Any, kwargs: Any) -> tuple[str, int | None] | None:
    get = kwargs.get
    return dsn_target(dsn, get("host"), get("port"), get("service"), get("servicefile"))


class _Planner:
    def __init__(self, targets: TargetPolicies) -> None:
        self.plans = PlanCache(targets)
        never = targets.settings.sql_retry == "never"
        self.connect_rule: str | None = "sql_retry_never" if never else None
        self._pools: dict[int, tuple[Any, tuple[str, int | None] | None]] = {}

    def connect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan | None:
        """The plan for a connect; None where the call names no target we may derive a
        name from (see :func:`dsn_target`): it runs as without us."""
        target = _call_target(args[0] if args else kwargs.get("dsn"), kwargs)
        if target is None:
            return None
        return self.plans.plan(*target, "connect", "own", self.connect_rule)

    def acquire(self, pool: Any) -> Plan | None:
        # Pool has __slots__ without __weakref__: remember it by id, checked by identity.
        known = self._pools.get(id(pool))
        settings = pool._connect_kwargs
        if known is None or known[0] is not settings:
            args = pool._connect_args
            target = _call_target(args[0] if args else None, settings)
            if len(self._pools) > 1024:
                self._pools.clear()
            known = self._pools[id(pool)] = (settings, target)
        if known[1] is None:
            return None
        # Not timed: most of an acquire is the wait for the application's own pool, which
        # OTEL_RECOVERY_ATTEMPT_TIMEOUT must not cut (nor count, as if the server were
        # slow); the connects a pool makes keep asyncpg's own connect timeout.
        if self.connect_rule is not None:
            return self.plans.plan(*known[1], "acquire", "own", self.connect_rule, timed=False)
        return self.plans.plan(
            *known[1], "acquire", "own", "statement_may_have_run", timed=False,
            never_ran=raised_connecting,
        )  # fmt: skip

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
        if not instrumentation_enabled() or (kind == "connect" and ACQUIRING.get() is not None):
            return await wrapped(*args, **kwargs)
        plan = None
        try:
            plan = planner.connect(args, kwargs) if kind == "connect" else planner.acquire(instance)
        except Exception as error:
            report_internal_error(where, error)
        if plan is None:  # nothing we may name it after, or a bug of ours: as without us
            # (called outside the handler: asyncpg's errors carry no context of ours)
            return await wrapped(*args, **kwargs)
        if kind == "acquire":
            attempt, limit = _acquiring(wrapped), args[0] if args else kwargs.get("timeout")
        else:
            attempt, limit = wrapped, kwargs.get("timeout", _CONNECT_TIMEOUT)
        seconds = limit_seconds(limit)
        if seconds is not None:
            attempt = _WithinTimeout(attempt, seconds).attempt
        return await run_async(plan, attempt, args, kwargs)

    return wrapper


_CONNECT_TIMEOUT = 60.0
"""``asyncpg.connect``'s own default ``timeout``."""


class _WithinTimeout(AttemptSite):
    """A connect or a pool acquire whose ``timeout=`` bounds the whole call, retries
    included: asyncpg documents it as the time the call may take, and callers rely on it
    ("this acquire gives up within a second"). Each attempt would start it afresh, so three
    attempts took three times as long; with it as the call's limit
    (:mod:`._attempt_site`), a retry starts only while there is time left, and the
    recovery as a whole ends at it with asyncpg's own ``TimeoutError``."""

    __slots__ = ("_call", "_limit")

    def __init__(self, call: Callable[..., Any], limit: float) -> None:
        self._call, self._limit = call, limit

    async def attempt(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(*args, **kwargs)

    def time_limit(self, args: tuple[Any, ...]) -> float | None:
        return self._limit

    def time_limit_error(self, message: str) -> BaseException:
        return asyncio.TimeoutError(message)  # what asyncpg raises when its timeout passes


def _acquiring(acquire: Callable[..., Any]) -> Callable[..., Any]:
    """``Pool._acquire``, each attempt under an :class:`~._asyncpg_acquire.Acquiring` of
    its own: a failure before a holder was taken is the pool's own wait (or its closing),
    marked as the client's (:func:`clients_own`): not retried, not counted on the server's
    breaker, and raised as asyncpg raised it, after the wait the application asked for. One
    after (a connect refused, a server starting up) is the server's, retried as before; one
    a pool callback's statement already counted is not counted again
    (:func:`told_beneath`)."""

    async def attempt(*args: Any, **kwargs: Any) -> Any:
        state = Acquiring()
        token = ACQUIRING.set(state)
        try:
            return await acquire(*args, **kwargs)
        except Exception as error:
            if not state.holding:
                clients_own(error)
            elif state.counted is error:  # a pool callback's statement counted it already
                told_beneath(error)
            raise
        finally:
            ACQUIRING.reset(token)

    return attempt


def raised_connecting(error: BaseException) -> bool:
    """Whether ``error`` came out of asyncpg making a connection (``asyncpg.connect_utils``:
    a refused or reset socket, a server starting up, a connect timing out), where no
    statement of the application can have run. A failure of a pool's ``init`` or ``setup``
    callback comes from the application's own statements, and the application's
    ``acquire(timeout=)`` from the pool's wait around the whole acquire: neither passes
    there, and neither is retried (see the module docstring)."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__") == "asyncpg.connect_utils":
            return True
        frame = frame.tb_next
    return False


def _holding(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``PoolConnectionHolder.acquire``: the acquire in progress has a holder now."""
    state = ACQUIRING.get()
    if state is not None:
        state.holding = True
    return wrapped(*args, **kwargs)


async def _resetting(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``Connection.reset``, and ``PoolConnectionHolder.release`` (``instance._con``), what a
    pool runs on every connection it takes back: its statements pass an open circuit (see
    :meth:`AsyncPGRecoveryInstrumentor._passes_refused`). The release, not only ``reset``:
    a pool made with ``reset=`` runs ``Connection._reset`` and the application's callback
    instead of ``reset``."""
    connection = instance if isinstance(instance, asyncpg.Connection) else instance._con
    token = _RESETTING.set(connection)
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
