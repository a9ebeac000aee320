"""How each asyncpg call runs: its plan, chosen by the call's target and kind, and kept.

Getting a connection is the only call that may be retried, since no statement can have run
in it: a connect, under the target's policy (none with ``sql_retry = "never"``), and a pool
acquire, only after a failure of making the connection (:func:`raised_connecting`); the
pool's ``init`` and ``setup`` callbacks that run after that are the application's own
statements. A statement's plan never retries it. A connection's statement plans are also
left on the connection's class, keyed by its address, where the compiled layer
(``_speedups``) finds them without a Python call (:meth:`Planner.route`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._asyncpg_targets import call_target, connection_target
from otel_recovery.instrumentors._db import Route, compiles, retire_table
from otel_recovery.instrumentors._db_plans import Plan, PlanCache
from otel_recovery.instrumentors._span_mode import Site, SpanMode
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error

__all__ = ["Planner", "raised_connecting"]


class Planner:
    """The plans of one installation's asyncpg calls, and the target of each pool seen."""

    def __init__(self, targets: TargetPolicies) -> None:
        self.plans = PlanCache(targets)
        never = targets.settings.sql_retry == "never"
        self.connect_rule: str | None = "sql_retry_never" if never else None
        self._pools: dict[int, tuple[Any, tuple[str, int | None] | None]] = {}

    def connect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan | None:
        """The plan for a connect; None where the call names no target we may derive a
        name from (see :func:`~._asyncpg_targets.dsn_target`): it runs as without us."""
        target = call_target(args[0] if args else kwargs.get("dsn"), kwargs)
        if target is None:
            return None
        return self.plans.plan(*target, "connect", "own", self.connect_rule)

    def acquire(self, pool: Any) -> Plan | None:
        # Pool has __slots__ without __weakref__: remember it by id, checked by identity.
        known = self._pools.get(id(pool))
        settings = pool._connect_kwargs
        if known is None or known[0] is not settings:
            args = pool._connect_args
            target = call_target(args[0] if args else None, settings)
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
        host, port = connection_target(connection)
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


def raised_connecting(error: BaseException) -> bool:
    """Whether ``error`` came out of asyncpg making a connection (``asyncpg.connect_utils``:
    a refused or reset socket, a server starting up, a connect timing out), where no
    statement of the application can have run. A failure of a pool's ``init`` or ``setup``
    callback comes from the application's own statements, and the application's
    ``acquire(timeout=)`` from the pool's wait around the whole acquire: neither passes
    there, and neither is retried (see :mod:`.asyncpg`)."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__") == "asyncpg.connect_utils":
            return True
        frame = frame.tb_next
    return False
