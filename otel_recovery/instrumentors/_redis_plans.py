"""The plans chosen for redis-py calls, remembered so that a command's next call skips choosing.

A plan fixes how a call runs: its target's policy, its span mode, its retry rule (retried if
it may be sent twice, :mod:`._redis_commands`; else not, or only after a failure that proves
it never ran). :class:`Planner` chooses it for a command, for an immediate command (one
sent at once by a pipeline, while WATCHing) and for a pipeline, under the settings of the
target's host. A command's plan is remembered on its target, per span mode and command
spelling, unless the answer depends on the arguments (``SET ... NX``).

:func:`share_plans` leaves those remembered plans on the connection pool, where the
compiled layer (``_speedups.Layer``) reads them: a remembered command then runs no Python
of ours.
"""

from __future__ import annotations

import contextlib
from typing import Any

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._db import retire_table
from otel_recovery.instrumentors._db_plans import Plan, PlanCache
from otel_recovery.instrumentors._redis_commands import BLOCKING, READS, CommandRules, runs_code
from otel_recovery.instrumentors._redis_errors import never_connected
from otel_recovery.instrumentors._redis_pipelines import Queued, is_transaction, queued_commands
from otel_recovery.instrumentors._redis_sentinel import SENTINEL_POOLS
from otel_recovery.instrumentors._redis_targets import Target
from otel_recovery.instrumentors._settings import RecoverySettings
from otel_recovery.instrumentors._span_mode import SpanMode
from otel_recovery.instrumentors._targets import TargetPolicies

__all__ = ["COMPILED_PLANS", "Planner", "share_plans"]


COMPILED_PLANS = "_otel_recovery_compiled_plans"
"""Where a connection pool keeps the ``PlanTable`` the compiled command layer reads."""


def share_plans(pool: Any, planner: Planner, target: Target, seen: tuple[Any, Any]) -> None:
    """Leave the pool's remembered command plans where the compiled layer reads them.

    The table holds the very dict the planner fills, so one table serves every command; it
    is valid while the site's ``seen`` is the one it was made under (same wrapper chain,
    same instrumentation) and the pool's ``retry`` is the one the target was read from. A
    replaced table is retired: the compiled layer remembers the last table it read and
    serves from it until then.
    """
    if target.owner is not planner or isinstance(pool, SENTINEL_POOLS):
        return  # a Sentinel pool's server changes: its calls are planned afresh each time
    plans = target.current if seen[1] == "current" else target.own
    table = getattr(pool, COMPILED_PLANS, None)
    if (
        table is not None
        and table.token is seen
        and table.plans is plans
        and table.guard_map is target.kwargs
        and table.guard_value is target.retry
    ):
        return
    replaced = table
    table = SPEEDUPS.PlanTable(seen, plans, target.kwargs, "retry", target.retry)  # type: ignore[union-attr]
    with contextlib.suppress(Exception):  # a pool with __slots__: the Python layer serves
        setattr(pool, COMPILED_PLANS, table)
    retire_table(replaced)


class Planner:
    """Chooses the plan (policy, span mode, retry rule) for each call."""

    def __init__(self, targets: TargetPolicies) -> None:
        self.settings: RecoverySettings = targets.settings
        self.plans = PlanCache(targets)
        self.rules = CommandRules(self.settings)
        self._per_target: dict[tuple[str, int | None], CommandRules] = {}

    def rules_for(self, host: str, port: int | None) -> CommandRules:
        if not self.settings.targets:
            return self.rules
        rules = self._per_target.get((host, port))
        if rules is None:
            rules = CommandRules(self.settings.for_target(host, port, None))
            if len(self._per_target) < 1024:
                self._per_target[host, port] = rules
        return rules

    def command(self, mode: SpanMode, target: Target, args: tuple[Any, ...]) -> Plan:
        """The plan for one command; remembered per client, command spelling and span mode
        unless the answer depends on the arguments (``SET ... NX``, ``CONFIG GET``)."""
        if target.owner is not self:  # filled by an earlier instrumentation: start over
            target.own, target.current, target.owner = {}, {}, self
        plans = target.current if mode == "current" else target.own
        plan = plans.get(args[0])
        if plan is not None:
            return plan
        host, port = target.host, target.port
        rules = self.rules_for(host, port)
        name = rules.name(args)
        timed = name not in BLOCKING
        if rules.allows(name, args):
            plan = self.plans.plan(
                host, port, name, mode, None, target.retried, target.retries, timed,
                target.rejection, reads=name in READS,
            )  # fmt: skip
        else:
            proof = target.never_ran if rules.refused and name not in rules.never else None
            if proof is not None and runs_code(name):
                proof = never_connected  # its code may have written, then answered READONLY
            plan = self.plans.plan(
                host, port, name, mode, "non_idempotent_command", timed=timed,
                rejection=target.rejection, never_ran=proof,
            )  # fmt: skip
        if rules.depends_on_arguments(args, name) or len(plans) >= 512:
            return plan
        plans[args[0]] = plan
        return plan

    def immediate(self, mode: SpanMode, target: Target, args: tuple[Any, ...]) -> Plan:
        host, port = target.host, target.port
        name = self.rules_for(host, port).name(args)
        return self.plans.plan(
            host, port, name, mode, "transaction", timed=name not in BLOCKING,
            rejection=target.rejection,
        )  # fmt: skip

    def pipeline(self, mode: SpanMode, target: Target, pipe: Any) -> tuple[Plan, Queued | None]:
        host, port, retried = target.host, target.port, target.pipeline_retried
        retries = target.retries if retried else 0
        if is_transaction(pipe):
            plan = self.plans.plan(
                host, port, "MULTI", mode, "transaction", rejection=target.rejection
            )
            return plan, None
        queued = queued_commands(pipe)
        rules = self.rules_for(host, port)
        # a blocking command waits inside the pipeline's round trip (not inside MULTI/EXEC,
        # where the server never blocks): the attempt limit would cut it
        timed = queued is None or not any(rules.name(a) in BLOCKING for a, _ in queued)
        if queued is None or not all(rules.allows(rules.name(a), a) for a, _ in queued):
            plan = self.plans.plan(
                host, port, "PIPELINE", mode, "non_idempotent_command", timed=timed,
                rejection=target.rejection,
            )  # fmt: skip
            return plan, None
        plan = self.plans.plan(
            host, port, "PIPELINE", mode, None, retried, retries, timed, target.rejection
        )
        return plan, queued
