"""The classes put together from mixins read as one class in ``help()``."""

from __future__ import annotations

import pydoc

import pytest

from otel_recovery import CircuitBreaker
from otel_recovery.learning import StrategyLearner
from otel_recovery.learning.anomaly import AnomalySpanProcessor


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (CircuitBreaker, "snapshot(self)"),
        (StrategyLearner, "record_call(self, service: 'str', calls: 'int' = 1)"),
        (AnomalySpanProcessor, "force_flush(self, timeout_millis: 'int' = 30000)"),
    ],
)
def test_help_shows_methods_without_the_mixins_self_types(cls: type, method: str) -> None:
    """Each mixin types ``self`` with a Protocol of what it uses, for mypy; ``help()``
    showed it (``snapshot(self: '_Viewed')``)."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert method in text
    assert "self: " not in text
