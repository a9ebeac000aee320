"""The PostgreSQL instrumentor tests' shared harness (psycopg and asyncpg differ only in names).

A counting wrapt layer sits at the bottom of each patched attribute, then contrib and ours in
the order a test chooses; spans go to an in-memory exporter. Subclasses name the library,
the instrumentors and the patched sites, and say how to put the originals back on close.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers import PgFront, pg_admin, quiet, require_postgres, unique_table

from otel_recovery.testing import FakeClock


class PgHarness:
    """Counting layer at the bottom, then contrib and ours in the chosen order."""

    library = ""
    sites: tuple[tuple[Any, str], ...] = ()

    def __init__(self, ours: Any, contrib_class: Any) -> None:
        require_postgres()
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.calls: Counter[str] = Counter()
        self.before_connect: Callable[[int], None] | None = None
        self.contrib = False
        self.ours = ours
        self.contrib_class = contrib_class
        self.fronts: list[PgFront] = []
        self.tables: list[str] = []
        for owner, attribute in self.sites:
            setattr(owner, attribute, wrapt.FunctionWrapper(vars(owner)[attribute], self._count))

    def _count(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if is_instrumentation_enabled():  # test plumbing runs quiet(): not counted
            name = wrapped.__name__
            self.calls[name] += 1
            if name == "connect" and self.before_connect is not None:
                self.before_connect(self.calls[name])
        return wrapped(*args, **kwargs)

    def instrument(self, order: str = "contrib_first", **settings: Any) -> Any:
        settings.setdefault("clock", FakeClock())
        if order == "contrib_first":
            self.contrib_class().instrument(tracer_provider=self.provider)
        self.ours.instrument(tracer_provider=self.provider, **settings)
        if order == "ours_first":
            self.contrib_class().instrument(tracer_provider=self.provider)
        self.contrib = order != "ours_only"
        return self

    def restore_sites(self) -> None:
        """Put the original methods back (and check nothing of ours is left)."""
        raise NotImplementedError

    def close(self) -> None:
        """Every step runs even if one fails (a half-done teardown would leave patched
        methods behind for every later test); the first failure is raised at the end."""
        with contextlib.ExitStack() as steps:
            steps.callback(self.provider.shutdown)
            steps.callback(self._drop_tables)
            for front in self.fronts:
                steps.callback(front.close)
            steps.callback(self.restore_sites)
            steps.callback(self._contrib_off)
            steps.callback(self.ours.uninstrument)

    def _contrib_off(self) -> None:
        if self.contrib_class().is_instrumented_by_opentelemetry:
            self.contrib_class().uninstrument()

    def _drop_tables(self) -> None:
        if self.tables:
            with quiet(), pg_admin() as admin:
                for table in self.tables:
                    admin.execute(f"DROP TABLE IF EXISTS {table}")

    def table(self) -> str:
        name = unique_table(self.library)
        self.tables.append(name)
        with quiet(), pg_admin() as admin:
            admin.execute(f"CREATE TABLE {name} (v int)")
        return name

    def rows(self, table: str) -> int:
        with quiet(), pg_admin() as admin:
            count: int = admin.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            return count

    def listen_on_second_attempt(self, port: int) -> None:
        """Nothing listens on ``port`` for attempt 1; a front to PostgreSQL does from 2 on."""

        def before(attempt: int) -> None:
            if attempt == 2:
                self.fronts.append(PgFront(port))

        self.before_connect = before

    def reset(self) -> None:
        self.calls.clear()
        self.exporter.clear()

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def statement_span(self, keyword: str) -> ReadableSpan:
        """Contrib's span of the statement, or ours (only on failure) without contrib."""
        name = keyword if self.contrib else f"recover {self.library} 127.0.0.1:5432"
        (span,) = self.spans(name)
        assert span.kind is (SpanKind.CLIENT if self.contrib else SpanKind.INTERNAL)
        return span
