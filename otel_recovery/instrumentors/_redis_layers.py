"""The layer patched into each redis-py call site: find the call's plan, run the call under it.

One :class:`SiteLayers` per patch site (``Redis.execute_command``, ``Pipeline.execute``...)
builds its sync or asyncio layer. The layer steps aside while instrumentation is
suppressed, plans the call (a retried pipeline is refilled between attempts,
:class:`~._redis_pipelines.Replay`) and runs it; when an open circuit refused a Sentinel
master that has since moved, it runs the call once more under the new master's breaker. A
failure to plan is reported as an internal error of ours, and the call goes to redis-py
unchanged (a malformed call is redis-py's to refuse: :func:`_malformed`).

A standalone client's command, the call that matters most, finds its remembered plan inline
and, where the extension is built, in the compiled layer (``_speedups.Layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from otel_recovery.instrumentors._db import compiled_layer, compiles
from otel_recovery.instrumentors._db_plans import Plan, explain_no_retry
from otel_recovery.instrumentors._redis_pipelines import Replay
from otel_recovery.instrumentors._redis_plans import COMPILED_PLANS, Planner, share_plans
from otel_recovery.instrumentors._redis_sentinel import amaster_moved, master_moved
from otel_recovery.instrumentors._redis_targets import (
    TARGET_ATTRIBUTE,
    Resolve,
    Target,
    cluster_routing,
    standalone_target,
)
from otel_recovery.instrumentors._span_mode import Site
from otel_recovery.instrumentors._suppression import (
    RECOVERY_OFF_KEY,
    instrumentation_enabled,
    read_context,
)
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

__all__ = ["Kind", "SiteLayers"]


def _malformed(args: tuple[Any, ...]) -> bool:
    """A call with no command, or one whose name is not a hashable value (a list): the
    application's mistake, which redis-py refuses in its own words. Planning fails on it
    too, but that is no internal error of ours to report."""
    if len(args) < 2:
        return True
    try:
        hash(args[1])
    except TypeError:
        return True
    return False


Kind = Literal["command", "immediate", "pipeline"]


class SiteLayers:
    """Builds the layer of one patch site. The sync and async layers share the general way
    to find a call's plan (:meth:`plan`); a standalone client's command, the call that
    matters most, finds it inline in the sync layer."""

    def __init__(
        self,
        planner: Planner,
        kind: Kind,
        site: Site,
        resolve: Resolve,
        patches: PatchSet,
        where: str,
    ) -> None:
        self.planner, self.kind, self.site, self.resolve = planner, kind, site, resolve
        self.patches, self.where = patches, where

    def plan(
        self, args: tuple[Any, ...], options: dict[str, Any]
    ) -> tuple[Plan, Callable[..., Any] | None]:
        """The plan for a call (``args[0]`` is the client or pipeline) and, for a retried
        pipeline, what wraps ``execute`` to refill it."""
        planner, instance = self.planner, args[0]
        target = self.resolve(instance, cluster_routing(options, args[1:]))
        mode = self.site.span_mode()
        if self.kind == "pipeline":
            plan, saved = planner.pipeline(mode, target, instance)
            return plan, (None if saved is None else Replay.wrapping(instance, saved))
        if self.kind == "immediate":
            return planner.immediate(mode, target, args[1:]), None
        return planner.command(mode, target, args[1:]), None

    def command_planner(self) -> Callable[[tuple[Any, ...]], tuple[Plan, Target, Any]]:
        """For a standalone client's command (``kind == "command"``): ``command_plan(args)``,
        its plan, remembered per pool, span mode and command spelling, with the target and
        the site's ``seen`` it was chosen under (what :func:`~._redis_plans.share_plans`
        needs). The checks of ``Site.span_mode``, ``standalone_target`` and
        ``Planner.command``, written out over locals because this runs on every command
        (the sync layer has its own copy inline, see there)."""
        site, planner, resolve = self.site, self.planner, self.resolve
        namespace, attribute = site.namespace, site.attribute

        def command_plan(args: tuple[Any, ...]) -> tuple[Plan, Target, Any]:
            seen = site.seen
            if namespace[attribute] is not seen[0]:
                seen = site.refresh()
            target = getattr(args[0].connection_pool, TARGET_ATTRIBUTE, None)
            if target is None or target.kwargs.get("retry") is not target.retry:
                target = resolve(args[0], ())
            plan = None
            if target.owner is planner:
                plans = target.current if seen[1] == "current" else target.own
                plan = plans.get(args[1])
            if plan is None:
                plan = planner.command(seen[1], target, args[1:])
            return plan, target, seen

        return command_plan

    def sync_layer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        patches, planner, site, where = self.patches, self.planner, self.site, self.where
        namespace, attribute = site.namespace, site.attribute
        enabled, resolve, plan_slowly = instrumentation_enabled, self.resolve, self.plan
        inline = self.kind == "command" and self.resolve is standalone_target
        compiled = inline and compiles()

        def layer(*args: Any, **options: Any) -> Any:
            # Every Python call costs here (the budget is 1 us per command), so
            # command_planner's lookup is written out once more, inline: calling it would
            # add some 850 instructions per command (benchmarks/layer_cost.py, Python column)
            # where no C compiler built the extension (python:*-slim images, say).
            if not patches.enabled:
                return original(*args, **options)
            context = read_context()  # instrumentation_enabled(), inline
            if (
                SUPPRESS_KEY in context
                or LEGACY_SUPPRESS_KEY in context
                or RECOVERY_OFF_KEY in context
            ) and not enabled():
                return original(*args, **options)
            fn = original
            plan: Plan | None = None
            try:
                if inline:
                    seen = site.seen
                    if namespace[attribute] is not seen[0]:
                        seen = site.refresh()
                    target = getattr(args[0].connection_pool, TARGET_ATTRIBUTE, None)
                    if target is None or target.kwargs.get("retry") is not target.retry:
                        target = resolve(args[0], ())
                    plan = None
                    if target.owner is planner:
                        plans = target.current if seen[1] == "current" else target.own
                        plan = plans.get(args[1])
                    if plan is None:
                        plan = planner.command(seen[1], target, args[1:])
                    if compiled:
                        share_plans(args[0].connection_pool, planner, target, seen)
                else:
                    plan, replay = plan_slowly(args, options)
                    if replay is not None:
                        fn = replay(original)
            except Exception as error:
                plan = None
                if not _malformed(args):
                    report_internal_error(where, error)
            if plan is None:  # called outside the handler: its errors carry no context of ours
                return original(*args, **options)
            try:
                return plan.run(fn, args, options)
            except Exception as error:
                explain_no_retry(plan, error)
                if not (isinstance(error, CircuitOpenError) and master_moved(args[0])):
                    raise
            # The sentinels named a new master while the old one's circuit refused: once
            # more, under the new master's breaker.
            plan, replay = plan_slowly(args, options)
            return plan.run(original if replay is None else replay(original), args, options)

        return self._compiled(layer, original) if compiled else layer

    def async_layer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        patches, planner, where, plan_slowly = self.patches, self.planner, self.where, self.plan
        inline = self.kind == "command" and self.resolve is standalone_target
        command_plan = self.command_planner() if inline else None
        compiled = inline and compiles()

        async def layer(*args: Any, **options: Any) -> Any:
            if not patches.enabled or not instrumentation_enabled():
                return await original(*args, **options)
            fn = original
            plan: Plan | None = None
            try:
                if command_plan is not None:
                    plan, target, seen = command_plan(args)
                    if compiled:
                        share_plans(args[0].connection_pool, planner, target, seen)
                else:
                    plan, replay = plan_slowly(args, options)
                    if replay is not None:
                        fn = replay(original)
            except Exception as error:
                plan = None
                if not _malformed(args):
                    report_internal_error(where, error)
            if plan is None:  # see sync_layer
                return await original(*args, **options)
            try:
                return await plan.arun(fn, args, options)
            except Exception as error:
                explain_no_retry(plan, error)
                if not (isinstance(error, CircuitOpenError) and await amaster_moved(args[0])):
                    raise
            plan, replay = plan_slowly(args, options)  # see sync_layer
            return await plan.arun(original if replay is None else replay(original), args, options)

        return self._compiled(layer, original, awaits=True) if compiled else layer

    def _compiled(
        self, layer: Callable[..., Any], original: Callable[..., Any], *, awaits: bool = False
    ) -> Callable[..., Any]:
        """A standalone command's remembered happy path, compiled: the C layer reads the
        plans :func:`~._redis_plans.share_plans` left on the pool and calls ``layer`` for
        everything else (otel_recovery/_speedups_src/). For an async site (``awaits``) it
        returns the awaitable the plan's async runner makes (``async_run.c``)."""
        return compiled_layer(
            layer,
            original,
            self.patches,
            site=self.site,
            token=None,
            holder_attr="connection_pool",
            table_attr=COMPILED_PLANS,
            key_index=1,
            awaits=awaits,
        )
