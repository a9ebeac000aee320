"""What the async SQL stack tests share: the asyncpg and psycopg harnesses, counting what
reaches the driver beneath our layer, and faults on idle backends.

The harnesses are the ones ``tests/instrumentors/test_asyncpg.py`` and ``test_psycopg.py``
use (a counting layer under every patched site, contrib and ours above it in the order a
test picks, spans in memory), extended to remember the text of every statement that
reached the driver (``sent``) and every error the driver raised (``raised``), so a test can
say "sent once" and "the very error the driver raised" rather than "some error". The
asyncpg one also counts ``PreparedStatement.fetch`` and ``Connection.fetchrow``: SQLAlchemy's
asyncpg dialect runs every statement through ``connection.prepare()`` and then
``PreparedStatement.fetch`` (BEGIN/COMMIT/ROLLBACK go through ``Connection.execute``, its
ping through ``Connection.fetchrow``). ``order="none"`` leaves the driver uninstrumented,
the baseline a test compares with. Our settings default to a real clock with tiny backoffs:
production's clock, without long sleeps.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.prepared_stmt
import wrapt
from instrumentors.test_asyncpg import ORIGINALS as ASYNCPG_ORIGINALS
from instrumentors.test_asyncpg import SITES as ASYNCPG_SITES
from instrumentors.test_asyncpg import Harness as AsyncpgHarness
from instrumentors.test_psycopg import Harness as PsycopgHarness
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.trace import ReadableSpan
from servers import pg_admin, quiet

from otel_recovery.instrumentors._wrapping import _wrapper_module
from otel_recovery.policies.circuit_breaker import CircuitBreaker

ORDERS = ["ours_only", "contrib_first", "ours_first"]
"""Our instrumentor alone, and under / over contrib's instrumentation."""

FAST = {"backoff_initial": 0.001, "backoff_max": 0.005, "clock": None}
"""Real clock, tiny backoffs."""


class _Recording:
    """Mixin over a :class:`PgHarness`: remember statements sent and errors raised."""

    sent: list[str]
    raised: list[BaseException]

    def _count(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        counted = is_instrumentation_enabled()
        result = super()._count(wrapped, instance, args, kwargs)  # type: ignore[misc]
        if not counted:
            return result
        if wrapped.__name__ != "connect":
            self.sent.append(statement_text(instance, args))
        return self._watch(result) if inspect.isawaitable(result) else result

    async def _watch(self, pending: Awaitable[Any]) -> Any:
        try:
            return await pending
        except BaseException as error:
            self.raised.append(error)
            raise

    def sent_with(self, marker: str) -> int:
        """How many statements containing ``marker`` reached the driver."""
        return sum(marker in text for text in self.sent)

    def instrument(self, order: str = "ours_only", **settings: Any) -> Any:
        if order == "none":
            return self
        return super().instrument(order, **(FAST | settings))  # type: ignore[misc]

    def breaker(self, port: int = 5432) -> CircuitBreaker:
        targets = self.ours.targets  # type: ignore[attr-defined]
        assert targets is not None
        (breaker,) = [b for b in targets.breakers() if b.name.endswith(f":{port}")]
        return breaker

    def failures(self, port: int = 5432) -> int:
        """Failed logical calls our breaker for ``127.0.0.1:port`` counted."""
        return self.breaker(port).snapshot().failed_calls

    def span(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)  # type: ignore[attr-defined]
        return span

    def ours_spans(self) -> list[ReadableSpan]:
        """Spans that our instrumentor opened (``recover ...``)."""
        return [s for s in self.spans_all() if s.name.startswith("recover ")]

    def spans_all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())  # type: ignore[attr-defined]


def statement_text(instance: Any, args: tuple[Any, ...]) -> str:
    """The SQL of a statement call: a prepared statement's query, else the first argument."""
    if isinstance(instance, asyncpg.prepared_stmt.PreparedStatement):
        return str(instance.get_query())
    return str(args[0]) if args else ""


_EXTRA_ASYNCPG_SITES = [
    (asyncpg.prepared_stmt.PreparedStatement, "fetch"),
    (asyncpg.connection.Connection, "fetchrow"),
]


class AsyncpgStack(_Recording, AsyncpgHarness):
    """The asyncpg harness, counting SQLAlchemy's prepared statements and pings too."""

    url_scheme = "postgresql+asyncpg"

    def __init__(self) -> None:
        self.sent = []
        self.raised = []
        super().__init__()
        for owner, attribute in _EXTRA_ASYNCPG_SITES:
            setattr(owner, attribute, wrapt.FunctionWrapper(vars(owner)[attribute], self._count))

    def restore_sites(self) -> None:
        for owner, attribute in [*ASYNCPG_SITES, *_EXTRA_ASYNCPG_SITES]:
            top = vars(owner)[attribute]
            assert _wrapper_module(top) == __name__, (owner, attribute)  # our counter
            setattr(owner, attribute, top.__wrapped__)
        for (owner, attribute), original in ASYNCPG_ORIGINALS.items():
            assert vars(owner)[attribute] is original, (owner, attribute)

    def driver_error(self, error: BaseException) -> BaseException | None:
        """The asyncpg exception behind SQLAlchemy's: its dialect wraps it in an adapted
        DBAPI error (``orig``) raised ``from`` the asyncpg one."""
        return getattr(getattr(error, "orig", None), "__cause__", None)


class PsycopgStack(_Recording, PsycopgHarness):
    """The psycopg harness (psycopg is already a DBAPI driver: ``orig`` is its error)."""

    url_scheme = "postgresql+psycopg"

    def __init__(self) -> None:
        self.sent = []
        self.raised = []
        super().__init__()

    def driver_error(self, error: BaseException) -> BaseException | None:
        return getattr(error, "orig", None)


Stack = AsyncpgStack | PsycopgStack


def running(marker: str) -> int:
    """Backends currently running a statement containing ``marker``."""
    with quiet(), pg_admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        ).fetchone()
        return int(row[0])
