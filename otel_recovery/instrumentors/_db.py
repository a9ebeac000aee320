"""The per-call layer at each Redis and PostgreSQL patch site, in Python or compiled.

Every statement and command pays for what runs on its path, so that path is a plain-function
layer (:func:`sync_layer`/:func:`async_layer`, or the Redis command layer, which inlines even
its lookups): an inline suppression check (:mod:`._suppression`), the plan found by one or
two dictionary lookups (:class:`~._db_plans.PlanCache`, plans remembered on the connection or
pool), an identity check of the patched attribute (:class:`~._span_mode.Site`), and the
plan's compiled runner (``RecoveryPolicy.runner()``). Where the extension is built
(:func:`compiles`), a layer given a :class:`Route` runs its remembered happy path compiled
(:func:`compiled_layer`) and leaves the rest to the Python layer. Failures are the slow path
and may do more, such as explaining on the span why a call was not retried
(:func:`~._db_plans.explain_no_retry`). Rare calls (connecting) run under
:func:`run_sync`/:func:`run_async`, which record every attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._db_plans import Plan, explain_no_retry
from otel_recovery.instrumentors._guarded import AsyncAttempts, Attempts, outcome_or_refusal
from otel_recovery.instrumentors._span_mode import Site
from otel_recovery.instrumentors._suppression import (
    CONTEXT_VAR,
    OFF_KEYS,
    RECOVERY_OFF_KEY,
    instrumentation_enabled,
    read_context,
)
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

__all__ = [
    "Route",
    "async_layer",
    "compiled_layer",
    "compiles",
    "retire_table",
    "run_async",
    "run_sync",
    "sync_layer",
]

T = TypeVar("T")


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
        suppress_keys=OFF_KEYS,
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
    locate: Callable[[tuple[Any, ...]], Plan | None],
    route: Route | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A ``build`` for :meth:`PatchSet.layer`: a sync method that runs under the plan
    ``locate(args)`` picks (``args[0]`` is the instance).

    The per-call path is the layer, ``locate`` and the plan's compiled runner: suppression
    is checked inline (see :func:`instrumentation_enabled`), a failure to plan (or no plan:
    ``locate`` returning None for a call that is not ours to run) calls the original
    untouched, and a failure of the call is explained on the span and re-raised.
    With a ``route`` and the extension built, the remembered happy path runs compiled and
    this layer serves the rest (:func:`compiled_layer`).
    """

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        def layer(*args: Any, **kwargs: Any) -> Any:
            if not patches.enabled:
                return original(*args, **kwargs)
            context = read_context()
            if (
                SUPPRESS_KEY in context
                or LEGACY_SUPPRESS_KEY in context
                or RECOVERY_OFF_KEY in context
            ) and not instrumentation_enabled():
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
    locate: Callable[[tuple[Any, ...]], Plan | None],
    route: Route | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The asyncio twin of :func:`sync_layer`, for coroutine methods; compiled with a
    ``route``, its remembered call returns the awaitable of the plan's async runner."""

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        async def layer(*args: Any, **kwargs: Any) -> Any:
            if not patches.enabled:
                return await original(*args, **kwargs)
            context = read_context()
            if (
                SUPPRESS_KEY in context
                or LEGACY_SUPPRESS_KEY in context
                or RECOVERY_OFF_KEY in context
            ) and not instrumentation_enabled():
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
