"""``PsycopgRecoveryInstrumentor``: psycopg 3 connections recover inline; statements never
run twice.

A SQL statement that failed may still have run: the server may have committed an
``INSERT`` and then lost the connection before the reply arrived. Repeating it could insert
twice, so statements are *never* retried here. They are still classified, counted on the
server's circuit breaker (an open breaker fails fast, before a statement is sent) and
annotated on the span, and the error is re-raised unchanged. Opening a connection is
different: nothing has run yet, so ``Connection.connect``/``AsyncConnection.connect`` are
retried on transient failures (refused, reset, ``57P03`` starting up, too many clients) when
``sql_retry = "connect"`` (the default; ``"never"`` turns that off too). A server refusing
the session for good (wrong role, password or database: a ``FATAL`` without a SQLSTATE in
psycopg) is not retried. To retry a whole transaction safely, use ``run_transaction``.

Patch points (research/otel-conventions.md section 2.3): ``psycopg.connect`` and the two
``connect`` classmethods, which contrib also wraps (ours is spliced beneath; contrib makes
no span for connecting, so a connection that needed recovery gets a
``recover psycopg <host>:<port>`` span); and the base classes' ``Cursor.execute``/
``executemany`` and ``AsyncCursor.*``, which sit beneath contrib's traced cursor subclass by
construction (it calls ``super().execute``), so our events land on contrib's span. Named
(server-side) cursors override ``execute`` without calling it, so ``ServerCursor.execute``
and ``AsyncServerCursor.execute`` (the ``DECLARE``) are patched too; contrib does not trace
them, so a failure there gets our own ``recover`` span. Their later ``FETCH`` es are not
patched: they read from a cursor already declared.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._db import (
    Route,
    async_layer,
    compiles,
    retire_table,
    run_async,
    run_sync,
    sync_layer,
)
from otel_recovery.instrumentors._db_plans import Plan, PlanCache
from otel_recovery.instrumentors._pg_instrumentor import PostgresInstrumentor
from otel_recovery.instrumentors._pg_targets import pg_ambiguous_url, pg_service_file, pg_target
from otel_recovery.instrumentors._psycopg_closed import PsycopgPolicy
from otel_recovery.instrumentors._span_mode import SpanMode
from otel_recovery.instrumentors._suppression import instrumentation_enabled
from otel_recovery.instrumentors._target_policy import TargetPolicy
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, Wrapper, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["PsycopgAttemptTimeoutError", "PsycopgCircuitOpenError", "PsycopgRecoveryInstrumentor"]


class PsycopgCircuitOpenError(CircuitOpenError, psycopg.OperationalError):
    """The server's circuit is open, so the connect or statement was not sent.

    Also a ``psycopg.OperationalError``, what psycopg raises when it cannot reach the server:
    ``except psycopg.OperationalError`` catches it, pools (psycopg_pool) treat it as a failed
    connect, and SQLAlchemy wraps it as its ``OperationalError`` (not a disconnect: the
    pooled connection is kept).
    """


class PsycopgAttemptTimeoutError(TimeoutError, psycopg.OperationalError):
    """An awaited connect or statement cancelled by ``OTEL_RECOVERY_ATTEMPT_TIMEOUT``.

    Also a ``psycopg.OperationalError`` (what psycopg raises for its own connect timeout),
    so ``except psycopg.Error`` catches it and SQLAlchemy wraps it as a DBAPI error; still a
    ``TimeoutError`` for code that expects the built-in one (the library's ``Timeout``).
    """


_CONNECT_OPTIONS = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)
"""``connect()`` keyword arguments that are not libpq connection parameters."""
_CONTRIB_PREFIX = "opentelemetry.instrumentation."
_PLANS = "_otel_recovery_plans"
"""Where a connection keeps ``(planner, {cursor class: plan})``."""


_SERVER_PARAMETERS = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT"}
"""The parameters that say which server a connect reaches, and their environment
variables."""
_DEFAULT_HOST: list[str] = []
"""libpq's compiled default host, once asked (:func:`_default_host`)."""


def _connect_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, int | None] | None:
    """The target of a connect, read as libpq reads its connection string: parameters, then
    the service file's section (``service=`` or ``PGSERVICE``), then ``PGHOST``/``PGHOSTADDR``/
    ``PGPORT``, then libpq's defaults (no host: its default socket directory, where
    ``conn.info.host`` will say it connected). Several hosts: the whole list
    (:func:`pg_target`). A service whose section is not found in the files libpq reads
    that we can name (``servicefile=``, ``PGSERVICEFILE``, ``~/.pg_service.conf``,
    ``PGSYSCONFDIR``) is the target ``service <name>``.

    None: nothing to derive a name from (a connection string that is not a ``str``, lists
    that do not match, a port that is not a number, a URL whose password may have been
    read as its host or port): psycopg reports what it cannot read in its own words.
    Raises psycopg's ``ProgrammingError`` for a string it cannot parse at all.
    """
    conninfo = args[0] if args else kwargs.get("conninfo", "")
    if not isinstance(conninfo, str):  # psycopg refuses it in its own words
        return None
    params = {k: v for k, v in kwargs.items() if k not in _CONNECT_OPTIONS and k != "conninfo"}
    parsed = conninfo_to_dict(conninfo, **params)
    if pg_ambiguous_url(conninfo, "/"):
        return None
    given = {k: str(parsed[k]) for k in _SERVER_PARAMETERS if parsed.get(k) is not None}
    service = parsed.get("service") or os.environ.get("PGSERVICE")
    if service:
        section = _service_section(str(service), parsed.get("servicefile"))
        if section is not None:
            given = {**section, **given}
        elif "host" not in given and "hostaddr" not in given:
            return f"service {service}", None
    for key, variable in _SERVER_PARAMETERS.items():
        if key not in given and (value := os.environ.get(variable)) is not None:
            given[key] = value
    hosts, addresses, ports = (_split(given.get(key)) for key in _SERVER_PARAMETERS)
    count = max(len(hosts), len(addresses), 1)
    if (hosts and len(hosts) != count) or (addresses and len(addresses) != count):
        return None
    ports = ports * count if len(ports) == 1 else ports or [""] * count
    if len(ports) != count:
        return None
    members = []
    for index in range(count):
        # conn.info.host: the host name given, else the address, else libpq's default
        host = (hosts[index] if hosts else "") or (addresses[index] if addresses else "")
        if "@" in host[1:]:  # no host name holds one: the tail of a password
            return None
        try:
            port = int(ports[index].strip() or "5432")
        except ValueError:
            return None
        members.append((host or _default_host(), port))
    return pg_target(members)


def _split(value: str | None) -> list[str]:
    return value.split(",") if value else []


def _service_section(service: str, servicefile: Any) -> dict[str, str] | None:
    """``host``, ``hostaddr`` and ``port`` of ``service``'s section, found where libpq looks
    (the ``servicefile`` parameter, else ``PGSERVICEFILE``, else ``~/.pg_service.conf``;
    then ``PGSYSCONFDIR/pg_service.conf``); None where it is not found in those (libpq may
    still find it in the system directory it was built with, which we cannot name)."""
    paths = [pg_service_file(servicefile)]
    if (sysconf := os.environ.get("PGSYSCONFDIR")) is not None:
        paths.append(os.path.join(sysconf, "pg_service.conf"))
    for path in paths:
        section = _read_service_file(path, service)
        if section is not None:
            return section
    return None


def _read_service_file(path: str, service: str) -> dict[str, str] | None:
    """libpq's reading of one service file: ``[name]`` opens a section, ``key=value`` lines
    (no spaces around ``=``) fill it, ``#`` starts a comment line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    section: dict[str, str] | None = None
    for line in map(str.strip, lines):
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            if section is not None:
                break
            if line[1 : len(service) + 2] == f"{service}]":
                section = {}
        elif section is not None:
            key, sep, value = line.partition("=")
            if sep and key in _SERVER_PARAMETERS:
                section[key] = value
    return section


def _default_host() -> str:
    """Where libpq connects when no host is given: its compiled default socket directory
    (``/var/run/postgresql`` for psycopg's binary wheels and Debian's libpq, ``/tmp`` for
    others), or ``localhost`` where it has none, as ``conn.info.host`` reports it. libpq is
    asked once, by a connection it refuses to start (an invalid ``sslmode``): nothing is
    sent, no password file read."""
    if _DEFAULT_HOST:
        return _DEFAULT_HOST[0]
    host = ""
    with contextlib.suppress(Exception):
        probe = psycopg.pq.PGconn.connect_start(
            b"host='' hostaddr='' password=x sslmode=otel-recovery-probe"
        )
        try:
            if probe.status == psycopg.pq.ConnStatus.BAD:
                host = probe.host.decode()
        finally:
            probe.finish()
    if host:
        _DEFAULT_HOST.append(host)
        return host
    # libpq could not be asked (PGSERVICE names a section it cannot find): its usual answers
    if os.name == "nt":
        return "localhost"
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _connection_target(connection: Any) -> tuple[str, int | None]:
    """Host and port of an open connection, remembered on it (libpq is asked once)."""
    target: tuple[str, int | None] | None = getattr(connection, "_otel_recovery_target", None)
    if target is None:
        info = connection.info
        target = pg_target([(info.host or _default_host(), info.port)])
        with contextlib.suppress(AttributeError):  # __slots__: ask again next time
            connection._otel_recovery_target = target
    return target


def _connection_slot() -> str:
    """The attribute a compiled layer reads a cursor's connection from.

    ``Cursor.connection`` is a property returning the ``_conn`` slot; reading the slot
    directly saves a Python call on every statement. Where a psycopg version has no such
    slot, the public property is read instead.
    """
    slot = next((vars(c)["_conn"] for c in psycopg.Cursor.__mro__ if "_conn" in vars(c)), None)
    return "_conn" if isinstance(slot, types.MemberDescriptorType) else "connection"


_CONNECTION_SLOT = _connection_slot()


class _Remembered(Protocol):
    """A connection's statement plans: ``plans`` by cursor class, made by planner ``token``."""

    @property
    def token(self) -> object: ...
    @property
    def plans(self) -> dict[Any, Plan]: ...


class _PlansOf(NamedTuple):
    token: object
    plans: dict[Any, Plan]


def _remembered(planner: _Planner, plans: dict[Any, Plan]) -> _Remembered:
    """A compiled layer reads a ``PlanTable``; without the extension a tuple does."""
    return SPEEDUPS.PlanTable(planner, plans) if compiles() else _PlansOf(planner, plans)  # type: ignore[union-attr]


class _Planner:
    def __init__(self, targets: TargetPolicies) -> None:
        self.plans = PlanCache(targets)
        never = targets.settings.sql_retry == "never"
        self.connect_rule: str | None = "sql_retry_never" if never else None

    def connect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan | None:
        """The plan for a connect; None for a connection string psycopg cannot read, or
        one we derive no target from (see :func:`_connect_target`): the application's
        mistake, which psycopg reports in its own words (an internal-error report of ours
        would also echo the string, password and all, to the log); the connect runs as
        without us."""
        try:
            target = _connect_target(args, kwargs)
        except psycopg.ProgrammingError:
            return None
        if target is None:
            return None
        host, port = target
        return self.plans.plan(host, port, "connect", "own", self.connect_rule)

    def statement(self, args: tuple[Any, ...]) -> Plan | None:
        """The plan for ``cursor.execute*(...)`` (``args[0]`` is the cursor): remembered on
        its connection per cursor class, so the per-call cost is two lookups (none in
        Python where the layer runs compiled: it reads the same table, see :meth:`route`).
        None on a closed connection not planned before: psycopg refuses the statement
        without sending it, the client's own failure (see :mod:`._psycopg_closed`), and
        libpq could not name its server anyway."""
        cursor = args[0]
        connection = cursor.connection
        remembered: _Remembered | None = getattr(connection, _PLANS, None)
        if remembered is not None and remembered.token is self:
            plan = remembered.plans.get(type(cursor))
            if plan is not None:
                return plan
        if connection.closed:
            return None
        return self._statement(connection, type(cursor))

    def route(self) -> Route:
        """Where a compiled statement layer finds the plans :meth:`statement` remembers."""
        return Route(holder_attr=_CONNECTION_SLOT, table_attr=_PLANS, key_index=0, token=self)

    def _statement(self, connection: Any, cursor_class: type) -> Plan:
        host, port = _connection_target(connection)
        # contrib's TracedCursor subclasses the cursor class it wraps: its span is ours
        contrib = cursor_class.__module__.startswith(_CONTRIB_PREFIX)
        mode: SpanMode = "current" if contrib else "own"
        plan = self.plans.plan(host, port, None, mode, "statement_may_have_run")
        remembered: _Remembered | None = getattr(connection, _PLANS, None)
        if remembered is None or remembered.token is not self:
            replaced, remembered = remembered, _remembered(self, {})
            with contextlib.suppress(AttributeError):  # __slots__: plan again next time
                setattr(connection, _PLANS, remembered)
            retire_table(replaced)
        if len(remembered.plans) < 16:
            remembered.plans[cursor_class] = plan
        return plan


def _remembering(
    originals: dict[bool, Callable[..., Any]],
    key: bool,
    build: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``build``, keeping the original it layers in ``originals[key]``."""

    def build_remembering(original: Callable[..., Any]) -> Callable[..., Any]:
        originals[key] = original
        return build(original)

    return build_remembering


def _connect_wrapper(planner: _Planner, where: str, is_async: bool) -> Wrapper:
    """Connecting is rare: a wrapt wrapper (the sites are classmethods and a function)."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not instrumentation_enabled():
            return wrapped(*args, **kwargs)
        plan = None
        try:
            plan = planner.connect(args, kwargs)
        except Exception as error:
            report_internal_error(where, error)
        if plan is None:  # outside the handler: psycopg's errors carry no context of ours
            return wrapped(*args, **kwargs)
        return (run_async if is_async else run_sync)(plan, wrapped, args, kwargs)

    return wrapper


Kind = Literal["connect", "statement"]

_SERVER_CURSORS = (psycopg.ServerCursor, psycopg.AsyncServerCursor)
_ENDING = frozenset({"COMMIT", "END", "ROLLBACK", "ABORT", "RELEASE"})
_EXECUTE_KEYWORDS = frozenset({"params", "prepare", "binary"})


def ends_transaction_work(query: object) -> bool:
    """One statement that ends a transaction or a savepoint, or undoes its work (``COMMIT``,
    ``END``, ``ROLLBACK [TO SAVEPOINT]``, ``ABORT``, ``RELEASE [SAVEPOINT]``), sent as a
    plain str; a script of several is not. Statements that start work (``BEGIN``,
    ``SAVEPOINT``) are not: refusing them leaves nothing open."""
    if type(query) is not str:
        return False
    text = query.strip().rstrip(";")
    if ";" in text:
        return False
    words = text.split(None, 1)
    return bool(words) and words[0].upper() in _ENDING


_SITES: tuple[tuple[Any, str, Kind, bool], ...] = (
    (psycopg, "connect", "connect", False),
    (psycopg.Connection, "connect", "connect", False),
    (psycopg.AsyncConnection, "connect", "connect", True),
    (psycopg.Cursor, "execute", "statement", False),
    (psycopg.Cursor, "executemany", "statement", False),
    (psycopg.AsyncCursor, "execute", "statement", True),
    (psycopg.AsyncCursor, "executemany", "statement", True),
    # named (server-side) cursors declare without Cursor.execute: Django's
    # QuerySet.iterator(), SQLAlchemy's stream_results / stream()
    (psycopg.ServerCursor, "execute", "statement", False),
    (psycopg.AsyncServerCursor, "execute", "statement", True),
)


class PsycopgRecoveryInstrumentor(PostgresInstrumentor):
    """Inline recovery for psycopg 3, sync and async; see the module docstring."""

    library: ClassVar[str] = "psycopg"
    rejection: ClassVar[type[CircuitOpenError]] = PsycopgCircuitOpenError
    attempt_timeout_error: ClassVar[type[TimeoutError]] = PsycopgAttemptTimeoutError
    policy_class: ClassVar[type[TargetPolicy]] = PsycopgPolicy
    instruments: ClassVar[tuple[str, ...]] = ("psycopg >= 3.1",)

    def _server_of(self, connection: Any) -> tuple[str, int | None] | None:
        if not isinstance(connection, psycopg.BaseConnection) or connection.closed:
            return None
        return _connection_target(connection)

    def _passes_refused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[..., Any] | None:
        """What ends a transaction or a savepoint passes an open circuit: Django's
        ``atomic`` sends its savepoints through ``Cursor.execute``, and a refused
        ``ROLLBACK TO SAVEPOINT`` or ``RELEASE SAVEPOINT`` dooms the outer transaction,
        which Django then rolls back without an error: work the application saw succeed is
        lost. A refused ``COMMIT`` or ``ROLLBACK`` would leave the server holding the
        transaction and its locks. (asyncpg's ``Transaction`` statements pass for similar
        reasons, see its instrumentor.) Only ``execute(query)`` with no parameters passes;
        an ``executemany`` never does."""
        if len(args) not in (2, 3) or not ends_transaction_work(args[1]):
            return None
        if not kwargs.keys() <= _EXECUTE_KEYWORDS:  # executemany(..., params_seq=...)
            return None
        if (args[2] if len(args) == 3 else kwargs.get("params")) is not None:
            return None
        cursor = args[0]
        if isinstance(cursor, _SERVER_CURSORS):  # DECLARE ... CURSOR FOR: never transaction control
            return None
        return self._execute_originals.get(isinstance(cursor, psycopg.AsyncCursor))

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        planner = _Planner(targets)
        self._execute_originals: dict[bool, Callable[..., Any]] = {}
        for owner, attribute, kind, is_async in _SITES:
            where = f"psycopg {getattr(owner, '__name__', owner)}.{attribute}"
            if kind == "connect":
                wrapper = _connect_wrapper(planner, where, is_async)
                patches.wrap(owner, attribute, wrapper, beneath_contrib=True)
            else:  # the per-statement hot path: a plain-function layer
                layer = async_layer if is_async else sync_layer
                build = layer(patches, where, planner.statement, planner.route())
                if owner in (psycopg.Cursor, psycopg.AsyncCursor) and attribute == "execute":
                    build = _remembering(self._execute_originals, is_async, build)
                patches.layer(owner, attribute, build, beneath_contrib=True)
