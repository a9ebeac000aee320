"""Whether instrumentation is switched off for this call, asked as cheaply as a hot path can.

``suppress_instrumentation()`` (under which the SDK's exporters run) sets a key in the
current context (:mod:`otel_recovery.telemetry._suppressed`), and a call made there must run
as if uninstrumented. Every instrumented call asks, so the per-call layers read the context
straight from the default runtime context's ContextVar (:data:`CONTEXT_VAR`, which the
compiled layers read too) and test the two keys inline, and call
:func:`instrumentation_enabled` only when one of them is there.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context

from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

__all__ = ["CONTEXT_VAR", "instrumentation_enabled", "read_context"]

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
