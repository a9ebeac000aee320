"""What the Redis and PostgreSQL instrumentors share.

The database conventions want *one* span per logical operation, covering its retries. So
these instrumentors patch beneath contrib's wrappers and annotate contrib's span ("current"
span mode). Without contrib there is no such span, and annotating whatever span happens to be
current (an HTTP server span, say) would pin a Redis ``error.type`` on the request; so each
patch site checks, per call, whether a contrib wrapper sits above it (:class:`Site`) and
otherwise lets a failing call open its own ``recover ...`` span.

Every statement and command pays for what runs on its path, so that path is a plain-function
layer (:func:`sync_layer`/:func:`async_layer`, or the Redis command layer, which inlines even
its lookups): an inline suppression check (two ``in`` tests on the current context), the
plan found by one or two dictionary lookups (:class:`PlanCache`, plans remembered on the
connection or pool), an identity check of the patched attribute (:class:`Site`), and the
plan's compiled runner (``RecoveryPolicy.runner()``). Failures are the slow path and may do
more, such as explaining on the span why a call was not retried (:func:`explain_no_retry`).
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_recovery._clock import Clock
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._forksafe import new_lock
from otel_recovery._policy_core import AsyncRunner, Runner
from otel_recovery.classify import (
    Classifier,
    ErrorCategory,
    ErrorInfo,
    ErrorKind,
    Severity,
    classify_on,
    get_default_classifier,
)
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._guarded import (
    AsyncAttempts,
    Attempts,
    GuardedPolicy,
    outcome_or_refusal,
)
from otel_recovery.instrumentors._health_checks import HEALTH_CHECKS
from otel_recovery.instrumentors._targets import NeverRan, TargetPolicies, TargetPolicy
from otel_recovery.instrumentors._wrapping import PatchSet, _wrapper_module, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY
from otel_recovery.telemetry.attributes import REDIS_CLIENT_RETRIES, RETRY_DISALLOWED

__all__ = [
    "CONTEXT_VAR",
    "Route",
    "compiled_layer",
    "compiles",
    "retire_table",
    "LEGACY_SUPPRESS_KEY",
    "SUPPRESS_KEY",
    "read_context",
    "Plan",
    "PlanCache",
    "PostgresClassifier",
    "PostgresInstrumentor",
    "Site",
    "SpanMode",
    "explain_no_retry",
    "instrumentation_enabled",
    "pg_ambiguous_url",
    "pg_host",
    "pg_service_file",
    "pg_socket_target",
    "pg_target",
    "async_layer",
    "run_async",
    "run_sync",
    "sync_layer",
]

SpanMode = Literal["own", "current"]
T = TypeVar("T")

_CONTRIB_PREFIX = "opentelemetry.instrumentation."

# The default runtime context keeps the current Context in one ContextVar; reading it
# directly saves two Python calls per instrumented call. Any other runtime context
# (a custom OTEL_PYTHON_CONTEXT) goes through the public API.
# opentelemetry-api before 1.25 loads its runtime context on first use: use it once here.
otel_context.get_current()
_context_var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
CONTEXT_VAR: contextvars.ContextVar[Any] | None = (
    _context_var if isinstance(_context_var, contextvars.ContextVar) else None
)
"""The ContextVar holding the current Context, when the default runtime context is in use;
a compiled layer (``otel_recovery._speedups.Layer``) reads it directly."""
if _context_var is not None and hasattr(_context_var, "get"):
    read_context: Callable[[], Any] = _context_var.get
else:  # pragma: no cover - another runtime context implementation
    read_context = otel_context.get_current


def instrumentation_enabled() -> bool:
    """``is_instrumentation_enabled()`` with one context read instead of three calls.

    A per-call hot path inlines the common case: when neither ``SUPPRESS_KEY`` nor
    ``LEGACY_SUPPRESS_KEY`` is ``in read_context()`` (two slot lookups, no method call),
    instrumentation is enabled; otherwise it asks this function.
    """
    context = read_context()
    return not (context.get(SUPPRESS_KEY) or context.get(LEGACY_SUPPRESS_KEY))


class Site:
    """One patched attribute: knows whether a contrib wrapper currently sits above ours.

    The answer is cached against the identity of the attribute's outermost value, so it
    follows contrib instrumenting or uninstrumenting later at the cost of one identity check.
    A hot path reads it inline: ``seen = site.seen``, and if ``site.namespace[attribute] is
    not seen[0]``, ``seen = site.refresh()``; ``seen[1]`` is the span mode.
    """

    __slots__ = ("attribute", "namespace", "owner", "proxy", "seen")

    def __init__(self, owner: Any, attribute: str) -> None:
        self.owner = owner
        self.attribute = attribute
        self.proxy: Any = None  # our layer, once installed
        self.namespace: Mapping[str, Any] = vars(owner)  # a live view of the namespace
        # (outermost value, answer) swapped as one reference, so threads never mix the two
        self.seen: tuple[Any, SpanMode] = (None, "own")

    def span_mode(self) -> SpanMode:
        """``current`` when contrib's wrapper (and so contrib's span) is above ours."""
        return self.current()[1]

    def current(self) -> tuple[Any, SpanMode]:
        """``seen``, brought up to date: one snapshot for a span mode and what a plan
        table made under it is valid for."""
        seen = self.seen
        if self.namespace.get(self.attribute) is not seen[0]:
            seen = self.refresh()
        return seen

    def refresh(self) -> tuple[Any, SpanMode]:
        """Walk the wrapper chain above our layer again; returns the new ``seen``."""
        top = self.namespace.get(self.attribute)
        mode: SpanMode = "own"
        node = top
        for _ in range(32):  # wrapper chains are short; never loop forever on a cycle
            if node is None or node is self.proxy:
                break
            if _wrapper_module(node).startswith(_CONTRIB_PREFIX):
                mode = "current"
                break
            node = getattr(node, "__wrapped__", None)
        self.seen = (top, mode)
        return self.seen


class Plan(NamedTuple):
    """How to run one call: the policy, and what to say on the span if it fails unretried."""

    policy: RecoveryPolicy
    span: SpanMode
    run: Runner
    """``policy.runner()``: the policy's compiled happy path, for sync calls."""
    arun: AsyncRunner
    """``policy.arunner()``, for coroutine functions."""
    disallowed: str | None = None
    """Why retrying is not allowed for this call (None: retrying is allowed)."""
    client_retried: tuple[type[BaseException], ...] = ()
    client_retries: int = 0


class PlanCache:
    """Plans by call shape, so the per-call cost is one dictionary lookup.

    ``TargetPolicies.policy_for`` merges per-target settings on every call; its answer for a
    given (target, operation, retry rule, span mode) never changes, so it is asked once.
    The cache is bounded: past ``limit`` shapes it starts over.
    """

    __slots__ = ("_cache", "_limit", "_lock", "targets")

    def __init__(self, targets: TargetPolicies, limit: int = 4096) -> None:
        self.targets = targets
        self._cache: dict[tuple[Any, ...], Plan] = {}
        self._limit = limit
        self._lock = new_lock()
        targets.on_forget(self.forget)

    def forget(self) -> None:
        """Drop every plan: the target table forgot a target (see ``on_forget``)."""
        with self._lock:
            self._cache.clear()

    def plan(
        self,
        host: str,
        port: int | None,
        operation: str | None,
        span: SpanMode,
        disallowed: str | None = None,
        client_retried: tuple[type[BaseException], ...] = (),
        client_retries: int = 0,
        timed: bool = True,
        rejection: type[CircuitOpenError] | None = None,
        never_ran: NeverRan | None = None,
        reads: bool = False,
    ) -> Plan:
        """The plan for a call; ``disallowed`` (a reason) forbids retrying it, except after
        the failures ``never_ran`` says prove it never ran; ``timed=False`` exempts it
        from the attempt time limit, ``rejection`` replaces the instrumentor's error for an
        open circuit, ``reads`` lets a fallback set for the target answer it (see
        ``TargetPolicies.policy_for``)."""
        key = (
            host, port, operation, span, disallowed, client_retried, client_retries, timed,
            rejection, never_ran, reads,
        )  # fmt: skip
        plan = self._cache.get(key)
        if plan is None:
            policy = self.targets.policy_for(
                host,
                port,
                operation,
                retry_allowed=disallowed is None,
                span=span,
                not_retried=client_retried if disallowed is None else (),
                repeats=client_retries if disallowed is None else 0,
                disallowed=disallowed,
                timed=timed,
                rejection=rejection,
                never_ran=never_ran,
                reads=reads,
            )
            plan = Plan(
                policy,
                span,
                policy.runner(),
                policy.arunner(),
                disallowed,
                client_retried,
                client_retries,
            )
            with self._lock:
                if len(self._cache) >= self._limit:
                    self._cache.clear()
                self._cache[key] = plan
        return plan


def explain_no_retry(plan: Plan, error: BaseException) -> None:
    """On contrib's span, say that redis-py's own retry already repeated a failed call.

    Only on the slow path, and only in ``current`` mode: our own span has already ended.
    A rejection by an open breaker never ran, so there is nothing to explain. A call that
    may not be retried at all says so through its policy's trace (``TargetPolicy``).
    """
    try:
        if plan.span != "current" or isinstance(error, CircuitOpenError):
            return
        policy = plan.policy
        if isinstance(policy, GuardedPolicy) and policy._is_clients_own(error):
            return  # never the client library's retry either: nothing reached the server
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if (
            plan.disallowed is None
            and plan.client_retried
            and isinstance(error, plan.client_retried)
        ):
            span.set_attribute(RETRY_DISALLOWED, "client_retried")
            span.set_attribute(REDIS_CLIENT_RETRIES, plan.client_retries)
    except Exception:  # telemetry must never replace the caller's error
        return


def compiles() -> bool:
    """Whether per-call layers can run compiled here: the extension is built and enabled
    and the current Context lives in the default runtime context's ContextVar."""
    return SPEEDUPS is not None and CONTEXT_VAR is not None


def retire_table(replaced: object) -> None:
    """Code that gives a holder a new ``PlanTable`` retires the one it replaced: a compiled
    layer remembers the last table it read from a holder and serves from it until then."""
    retire = getattr(replaced, "retire", None)  # a PlanTable; the Python layers' tuples have none
    if retire is not None:
        retire()


def compiled_layer(
    slow: Callable[..., Any],
    original: Callable[..., Any],
    patches: PatchSet,
    *,
    site: Site | None,
    token: object,
    holder_attr: str,
    table_attr: str,
    key_index: int,
    key_attr: str | None = None,
    awaits: bool = False,
) -> Callable[..., Any]:
    """``slow`` (a sync layer, or with ``awaits`` an async one) with its remembered happy
    path compiled (``_speedups.Layer``).

    The compiled layer finds the plan at ``getattr(getattr(args[0], holder_attr),
    table_attr).plans[key]`` (key: ``args[0].<key_attr>`` if given, else ``args[key_index]``,
    or the instance's type for 0), a
    ``PlanTable`` that ``slow`` leaves there, valid while its token is ``site.seen`` (or
    ``token`` without a site) and its guard holds. Every other case, and every call while
    the extension is missing, runs ``slow``. Only where :func:`compiles`.
    """
    assert SPEEDUPS is not None and CONTEXT_VAR is not None
    layer: Callable[..., Any] = SPEEDUPS.Layer(
        slow=slow,
        original=original,
        patches=patches,
        context_var=CONTEXT_VAR,
        suppress_keys=(SUPPRESS_KEY, LEGACY_SUPPRESS_KEY),
        site=site,
        owner=None if site is None else site.owner,
        attribute="" if site is None else site.attribute,
        token=token,
        holder_attr=holder_attr,
        table_attr=table_attr,
        key_index=key_index,
        explain=explain_no_retry,
        awaits=awaits,
        key_attr=key_attr,
    )
    return layer


class Route(NamedTuple):
    """Where a compiled layer finds a call's plan without calling Python: the ``PlanTable``
    at ``getattr(getattr(args[0], holder_attr), table_attr)``, valid while its token is
    ``token``, keyed by ``args[key_index]`` (0: the instance's type). ``locate`` leaves the
    table there."""

    holder_attr: str
    table_attr: str
    key_index: int
    token: object
    site: Site | None = None
    """With a site, the token is its ``seen`` (the wrapper chain above the layer)."""
    key_attr: str | None = None
    """Key the plans by this attribute of ``args[0]`` instead."""


def sync_layer(
    patches: PatchSet,
    where: str,
    locate: Callable[[tuple[Any, ...]], Plan],
    route: Route | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A ``build`` for :meth:`PatchSet.layer`: a sync method that runs under the plan
    ``locate(args)`` picks (``args[0]`` is the instance).

    The per-call path is the layer, ``locate`` and the plan's compiled runner: suppression
    is checked inline (see :func:`instrumentation_enabled`), a failure to plan calls the
    original untouched, and a failure of the call is explained on the span and re-raised.
    With a ``route`` and the extension built, the remembered happy path runs compiled and
    this layer serves the rest (:func:`compiled_layer`).
    """

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        def layer(*args: Any, **kwargs: Any) -> Any:
            if not patches.enabled:
                return original(*args, **kwargs)
            context = read_context()
            if (SUPPRESS_KEY in context or LEGACY_SUPPRESS_KEY in context) and not (
                instrumentation_enabled()
            ):
                return original(*args, **kwargs)
            plan: Plan | None = None
            try:
                plan = locate(args)
            except Exception as error:
                report_internal_error(where, error)
            if plan is None:  # outside the handler: the driver's errors carry no context of ours
                return original(*args, **kwargs)
            try:
                return plan.run(original, args, kwargs)
            except Exception as error:
                explain_no_retry(plan, error)
                raise

        if route is None or not compiles():
            return layer
        return compiled_layer(layer, original, patches, **route._asdict())

    return build


def async_layer(
    patches: PatchSet,
    where: str,
    locate: Callable[[tuple[Any, ...]], Plan],
    route: Route | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The asyncio twin of :func:`sync_layer`, for coroutine methods; compiled with a
    ``route``, its remembered call returns the awaitable of the plan's async runner."""

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        async def layer(*args: Any, **kwargs: Any) -> Any:
            if not patches.enabled:
                return await original(*args, **kwargs)
            context = read_context()
            if (SUPPRESS_KEY in context or LEGACY_SUPPRESS_KEY in context) and not (
                instrumentation_enabled()
            ):
                return await original(*args, **kwargs)
            plan: Plan | None = None
            try:
                plan = locate(args)
            except Exception as error:
                report_internal_error(where, error)
            if plan is None:  # see sync_layer
                return await original(*args, **kwargs)
            try:
                return await plan.arun(original, args, kwargs)
            except Exception as error:
                explain_no_retry(plan, error)
                raise

        if route is None or not compiles():
            return layer
        return compiled_layer(layer, original, patches, **route._asdict(), awaits=True)

    return build


def run_sync(plan: Plan, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
    """Run ``fn`` under the plan's policy (connecting: rare calls, so every attempt is
    recorded); a failure is explained and re-raised unchanged.

    Whatever our machinery raises instead, before, between or after the attempts, is
    logged once and the application gets what ``fn`` did on its latest attempt; if it
    was not called at all, it is called now, once, as if uninstrumented."""
    attempts = Attempts(fn)
    try:
        try:
            result: T = plan.policy.call(attempts, *args, **kwargs)
            return result
        except Exception as error:
            explain_no_retry(plan, error)
            if outcome_or_refusal(attempts, error):
                raise
            report_internal_error(f"{plan.policy.name}: recovery", error)
        if not attempts.made:
            return fn(*args, **kwargs)
        delivered: T = attempts.deliver()  # outside the handler: the outcome stays its own
        return delivered
    finally:
        attempts.forget()


async def run_async(plan: Plan, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
    """The asyncio twin of :func:`run_sync`; every attempt awaits a fresh coroutine."""
    attempts = AsyncAttempts(fn)
    try:
        try:
            result: T = await plan.policy.acall(attempts, *args, **kwargs)
            return result
        except Exception as error:
            explain_no_retry(plan, error)
            if outcome_or_refusal(attempts, error):
                raise
            report_internal_error(f"{plan.policy.name}: recovery", error)
        if not attempts.made:
            return await fn(*args, **kwargs)
        delivered: T = attempts.deliver()
        return delivered
    finally:
        attempts.forget()


def pg_host(host: str) -> str:
    """A PostgreSQL host in the one spelling connects and statements share: a unix-socket
    directory by its real path (``/var/run/postgresql`` is ``/run/postgresql`` where
    ``/var/run`` links to ``/run``, as on Debian, and asyncpg looks in ``/run/postgresql``
    first), without a trailing ``/``; anything else as given."""
    if host[:1] == "/":
        return _socket_directory(host)
    return host


@functools.lru_cache(maxsize=64)
def _socket_directory(directory: str) -> str:
    """The real path of a socket directory (cached: asked at connects and a connection's
    first statement, never per call); as given, less a trailing ``/``, if it cannot be
    resolved."""
    try:
        return os.path.realpath(directory)
    except (OSError, ValueError):
        return directory.rstrip("/") or "/"


def pg_socket_target(path: str) -> tuple[str, int | None]:
    """``(directory, port)`` of a unix socket's path (``/run/postgresql/.s.PGSQL.5432``, what
    asyncpg keeps as a connection's address): the target a connect to that directory and
    port counts on."""
    directory, _, name = path.rpartition("/")
    if name.startswith(".s.PGSQL.") and name[9:].isdigit():
        return pg_host(directory or "/"), int(name[9:])
    return pg_host(path), None


def pg_target(members: Iterable[tuple[str, int | None]]) -> tuple[str, int | None]:
    """The target of a connect that reaches the first of ``members`` that answers.

    One server: its ``(host, port)``. Several (a multi-host connection string, a host list):
    the whole list is the target, ``("a:5432,b:5433", None)``, named ``<library>
    a:5432,b:5433``: a circuit that one dead member opened never refuses the connects that
    would fail over to the others. Statements count on the server actually reached.
    """
    unique = list(dict.fromkeys((pg_host(host), port) for host, port in members))
    if len(unique) == 1:
        return unique[0]
    return ",".join(_member(host, port) for host, port in unique), None


def _member(host: str, port: int | None) -> str:
    """One member of a multi-host target: an IPv6 address in brackets, so the list reads
    back (``[::1]:5432,[::2]:5432``)."""
    if ":" in host and not host.startswith("/"):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def pg_service_file(servicefile: Any) -> str:
    """The service file both drivers read first: the ``servicefile`` parameter, else
    ``PGSERVICEFILE``, else ``~/.pg_service.conf``."""
    path = servicefile if servicefile is not None else os.environ.get("PGSERVICEFILE")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".pg_service.conf")
    return str(path)


def pg_ambiguous_url(text: str, ends: str) -> bool:
    """Whether a connection URL's password may have been read as its host or port.

    A password holding an unescaped character that ends the authority (``/`` for libpq;
    ``/``, ``?`` or ``#`` for asyncpg's ``urlparse``) cuts it short: in
    ``postgresql://user:4242/pw@db/x`` the driver sees host ``user``, port ``4242``, and an
    ``@`` after the authority. An ``@`` in the password (two ``@`` in the authority, or
    one there and another after it) puts the password's tail in the host. No target is
    derived from such a URL, so no breaker, metric or span is named after it. (A URL whose
    authority holds a ``:`` or an ``@`` and whose path or query holds a raw ``@``, such as
    ``?user=a@b``, is taken for one too: its connect runs uninstrumented.)
    """
    _, sep, rest = text.partition("://")
    if not sep:
        return False
    end = min((i for i in map(rest.find, ends) if i >= 0), default=len(rest))
    authority = rest[:end]
    if authority.count("@") > 1:
        return True
    # an @ after the authority, which holds a : or an @: the password was cut short there
    # (``user:4242/pw@db``, ``user:Sup3r@S3cret/x@db``, whose tail became the host)
    return "@" in rest[end:] and (":" in authority or "@" in authority)


# libpq reports a server's refusal to open a session as an OperationalError without a
# SQLSTATE, in a "FATAL:" message. Only these refusals are transient; a wrong role,
# password or database name will not heal by retrying.
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
    "terminating connection due to administrator command",
)
# Refusals that will not heal by an immediate retry but are the server's shortage, not the
# caller's configuration: they count against the server's breaker.
_SHORTAGE_FATAL = (
    "too many connections for",  # a role's or a database's connection limit
    "out of memory",
    "canceling authentication due to timeout",
)


class PostgresClassifier(Classifier):
    """The process-wide classifier, plus two facts about PostgreSQL drivers it cannot know.

    - psycopg's connection failures carry no SQLSTATE; a ``FATAL:`` refusal other than the
      transient ones above is not retried: a shortage of the server's (a connection limit)
      counts against its breaker, anything else is configuration, not a network blip.
    - asyncpg raises ``InterfaceError("connection is closed")`` for a statement on a
      connection the server terminated: a dependency failure for the breaker, not a caller's
      programming error.

    Delegates to :func:`get_default_classifier` at each call, so user rules still apply.
    """

    def classify(
        self,
        exc: BaseException,
        context: Mapping[str, Any] | None = None,
        *,
        clock: Clock | None = None,
    ) -> ErrorInfo:
        info = classify_on(get_default_classifier(), exc, context, clock)
        try:
            module = type(exc).__module__ or ""
            message = str(exc)
            refused = "FATAL:" in message and not any(p in message for p in _TRANSIENT_FATAL)
            if module.startswith("psycopg") and refused and info.retryable:
                if any(p in message for p in _SHORTAGE_FATAL):
                    category, kind = ErrorCategory.RESOURCE_EXHAUSTION, ErrorKind.RESOURCE
                else:
                    category = ErrorCategory.CONFIGURATION
                    kind = ErrorKind.AUTH if "auth" in message.lower() else ErrorKind.OTHER
                return replace(
                    info, category=category, severity=Severity.HIGH, retryable=False, kind=kind
                )
            if module.startswith("asyncpg") and message == "connection is closed":
                return replace(
                    info,
                    category=ErrorCategory.TRANSIENT,
                    severity=Severity.MEDIUM,
                    retryable=True,
                    kind=ErrorKind.CONNECTION,
                )
        except Exception:  # a refinement must never lose the base answer
            return info
        return info


class PostgresInstrumentor(RecoveryInstrumentor):
    """What the psycopg and asyncpg instrumentors have in common: contrib's span is the
    statement's span, failures are classified by :class:`PostgresClassifier`, and no
    fallback value ever stands in for SQL."""

    span_mode: ClassVar[Literal["own", "current"]] = "current"
    fallback_on: ClassVar[tuple[type[BaseException], ...]] = ()
    """Never: no stand-in value can replace a connection or a statement's cursor."""
    policy_class: ClassVar[type[TargetPolicy]] = GuardedPolicy

    _unguard: Callable[[], None] | None = None

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return PostgresClassifier(clock=clock)

    def _instrument(self, **kwargs: Any) -> None:
        super()._instrument(**kwargs)
        if self._patches is not None:  # installed (not switched off, library present)
            self._unguard = HEALTH_CHECKS.register(self._guard)

    def _uninstrument(self, **kwargs: Any) -> None:
        unguard, self._unguard = self._unguard, None
        if unguard is not None:
            unguard()
        super()._uninstrument(**kwargs)

    def _guard(self, connection: Any) -> CircuitBreaker | None:
        """Our breaker for ``connection``'s server, where it is this driver's connection
        (pools' and ORMs' health checks, see :mod:`._health_checks`)."""
        targets = self.targets
        target = self._server_of(connection)
        if targets is None or target is None:
            return None
        return targets.known_breaker(*target)

    def _server_of(self, connection: Any) -> tuple[str, int | None] | None:
        """Host and port of ``connection`` if it is this driver's; None otherwise."""
        raise NotImplementedError
