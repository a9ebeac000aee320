"""What the sync SQL stack tests share: the psycopg harness, plus faults on idle backends.

The harness is the one ``tests/instrumentors/test_psycopg.py`` uses (a counting layer under
every patched psycopg site, contrib and ours above it in the order a test picks, spans in
memory); ``order="none"`` leaves psycopg uninstrumented, the baseline a test compares with.
"""

from __future__ import annotations

from typing import Any

from instrumentors.test_psycopg import Harness, events
from opentelemetry.sdk.trace import ReadableSpan

ORDERS = ["ours_only", "contrib_first", "ours_first"]
"""Our instrumentor alone, and under / over contrib's PsycopgInstrumentor."""


class SyncHarness(Harness):
    """The psycopg harness, able to stay uninstrumented (``order="none"``)."""

    def instrument(self, order: str = "contrib_first", **settings: Any) -> Any:
        if order == "none":
            return self
        return super().instrument(order, **settings)

    def span(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span

    def breaker_failures(self, port: int) -> int:
        """Failed logical calls our breaker for ``127.0.0.1:port`` counted."""
        assert self.ours.targets is not None
        (breaker,) = [b for b in self.ours.targets.breakers() if b.name.endswith(f":{port}")]
        return breaker.snapshot().failed_calls


def assert_not_retried(span: ReadableSpan, *, contrib: bool) -> dict[str, Any]:
    """A failed statement: one attempt, no retry event, a failure outcome; on contrib's span
    also why it was not retried. Returns the attempt.failed event's attributes."""
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "failure"
    assert attrs["otel_recovery.retry.attempts"] == 1
    assert not events(span, "otel_recovery.retry")
    if contrib:
        assert attrs["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    (failed,) = events(span, "otel_recovery.attempt.failed")
    return failed
