"""The per-request layer of the HTTP instrumentors: the function that replaces a patched
method, finds the request's plan and runs its attempts under the plan's runner.

The happy path (a request that succeeds first time) is what every service pays on every
call, so it is kept to four Python frames and no object of ours: the layer (a plain
function, see :meth:`PatchSet.layer`), the library's planner (one dictionary lookup of the
plan by the request's shape, see :class:`~._http_plans.HttpPlans`), the policy's compiled
runner, and one attempt (:meth:`~._http_site.HttpSite.attempt`). The request's whole state
is one list (:data:`~._http_site.Outcomes`). Everything else (retries, fallbacks,
rejections, internal errors) is decided after the runner returns or raises, off the happy
path, by the site (:mod:`._http_site`). Which requests may be repeated, and why a retryable
status becomes an exception, is in :mod:`._http`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._db import compiles
from otel_recovery.instrumentors._http_plans import HttpPlan
from otel_recovery.instrumentors._http_site import HttpSite, Outcomes
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
    "CompiledShapes",
    "PlanOf",
    "async_layer",
    "sync_layer",
]

PlanOf = Callable[[tuple[Any, ...], dict[str, Any]], HttpPlan | None]
"""A library's planner: ``plan_of(args, kwargs)`` for the patched method's arguments (the
client first); None to call the original untouched."""


_NO_KWARGS: dict[str, Any] = {}
"""The runner's keyword arguments for an attempt (it has none); never mutated."""


Build = Callable[[Callable[..., Any]], Callable[..., Any]]
"""What :meth:`PatchSet.layer` takes: the original method in, our layer out."""


class CompiledShapes(NamedTuple):
    """How a compiled layer finds the plan of a ``(self, method, url, **options)`` or
    ``(self, method=..., url=..., **options)`` request: in ``by_url`` under the URL, then
    the method, as :meth:`~._http_plans.HttpPlans.recall` does (None for one not given),
    unless an option in ``body_names`` is set. The library's planner must remember plans by
    the same rule."""

    by_url: dict[Any, tuple[Any, ...]]
    body_names: tuple[str, ...]


def sync_layer(
    patches: PatchSet,
    library: type[HttpSite[Any]],
    plan_of: PlanOf,
    compiled: CompiledShapes | None = None,
) -> Build:
    """The layer of a synchronous method that sends one request (``Session.request``,
    ``Client.send``): finds the request's plan with ``plan_of`` and runs it.

    With ``compiled`` and the extension built, a request whose plan is remembered makes its
    first attempt compiled (``_speedups.HttpLayer``); if that attempt fails, ``resume``
    below goes on exactly as this layer would have after it.
    """
    planning = f"{library.site}: planning"

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        site = library(original)
        attempt, after_error, after_result, deliver = (
            site.attempt,
            site.after_error,
            site.after_result,
            site.deliver,
        )

        def layer(*args: Any, **kwargs: Any) -> Any:
            # The per-request hot path, inlined (see the module docstring): the suppression
            # test reads the context directly, the site's methods are bound once, and a
            # successful first attempt returns straight from the runner's result.
            if not patches.enabled:
                return original(*args, **kwargs)
            context = read_context()  # suppressed (the exporter's own traffic)?
            if (
                SUPPRESS_KEY in context
                or LEGACY_SUPPRESS_KEY in context
                or RECOVERY_OFF_KEY in context
            ) and not instrumentation_enabled():
                return original(*args, **kwargs)
            try:
                plan = plan_of(args, kwargs)
            except Exception as error:
                report_internal_error(planning, error)
                plan = None
            if plan is None:
                return original(*args, **kwargs)
            outcomes: Outcomes = []
            try:
                result = plan.run(attempt, (outcomes, plan.statuses, args, kwargs), _NO_KWARGS)
            except BaseException as error:
                outcome = after_error(outcomes, error, args, kwargs)
            else:
                if outcomes and outcomes[-1] is result:
                    return result
                outcome = after_result(outcomes, result, args, kwargs)
            try:
                return deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome  # see Outcomes

        if compiled is None or not compiles():
            return layer
        note_failure = site.note_failure

        def resume(
            plan: HttpPlan,
            outcomes: Outcomes,
            error: BaseException,
            started: float,
            took: float,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            """What the runner does after a first attempt that ended in ``error`` (the
            original's exception, or the signal for a response to retry on); the compiled
            layer calls it with ``error`` being handled, as the runner's ``except`` does."""
            note_failure(error, args, kwargs)
            try:
                return plan.recover(
                    attempt,
                    (outcomes, plan.statuses, args, kwargs),
                    _NO_KWARGS,
                    error,
                    started,
                    took,
                )
            finally:
                del error  # see Outcomes

        def settle(
            outcomes: Outcomes,
            raised: bool,
            value: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            """The rest of ``layer`` once the runner returned ``value`` or raised it; the
            compiled layer calls it outside any handler of its own, as ``layer`` runs it."""
            if raised:
                outcome = after_error(outcomes, value, args, kwargs)
            else:
                if outcomes and outcomes[-1] is value:
                    return value
                outcome = after_result(outcomes, value, args, kwargs)
            try:
                return deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome, value  # see Outcomes

        fast: Callable[..., Any] = SPEEDUPS.HttpLayer(  # type: ignore[union-attr]
            slow=layer,
            original=original,
            patches=patches,
            context_var=CONTEXT_VAR,
            suppress_keys=OFF_KEYS,
            by_url=compiled.by_url,
            plan_type=HttpPlan,
            body_names=compiled.body_names,
            status_attribute=library.status_attribute,
            signal=site._signal,
            unreadable=site._unreadable,
            resume=resume,
            settle=settle,
        )
        return fast

    return build


def async_layer(patches: PatchSet, library: type[HttpSite[Any]], plan_of: PlanOf) -> Build:
    """The asyncio twin of :func:`sync_layer` (``AsyncClient.send``, aiohttp's
    ``ClientSession._request``)."""
    planning = f"{library.site}: planning"

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        site = library(original)
        attempt, after_error, after_result, deliver = (
            site.aattempt,
            site.after_error,
            site.after_result,
            site.adeliver,
        )

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
            try:
                plan = plan_of(args, kwargs)
            except Exception as error:
                report_internal_error(planning, error)
                plan = None
            if plan is None:
                return await original(*args, **kwargs)
            outcomes: Outcomes = []
            try:
                result = await plan.arun(
                    attempt, (outcomes, plan.statuses, args, kwargs), _NO_KWARGS
                )
            except BaseException as error:  # includes cancellation during a backoff sleep
                outcome = after_error(outcomes, error, args, kwargs)
            else:
                if outcomes and outcomes[-1] is result:
                    return result
                outcome = after_result(outcomes, result, args, kwargs)
            try:
                return await deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome  # see Outcomes

        return layer

    return build
