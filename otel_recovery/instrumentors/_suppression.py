"""Whether our layers are switched off for this call, asked as cheaply as a hot path can.

``suppress_instrumentation()`` (under which the SDK's exporters run) sets a key in the
current context (:mod:`otel_recovery.telemetry._suppressed`), and a call made there must run
as if uninstrumented. :func:`suppress_recovery` sets a key of ours, which switches off only
our layers: a failure detector's probe (redis-py's MultiDB health checks, a readiness
endpoint) must see the server as it is, while contrib still traces it. Every instrumented
call asks, so the per-call layers read the context straight from the default runtime
context's ContextVar (:data:`CONTEXT_VAR`, which the compiled layers read too) and test the
three keys inline (:data:`OFF_KEYS`), and call :func:`instrumentation_enabled` only when one
of them is there.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import context as otel_context

from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

__all__ = [
    "CONTEXT_VAR",
    "OFF_KEYS",
    "RECOVERY_OFF_KEY",
    "instrumentation_enabled",
    "read_context",
    "suppress_recovery",
]

_F = TypeVar("_F", bound=Callable[..., Any])

RECOVERY_OFF_KEY: str = otel_context.create_key("otel_recovery.suppress_recovery")
"""Set (true) by :func:`suppress_recovery`: our layers step aside, other instrumentation
does not."""
OFF_KEYS = (SUPPRESS_KEY, LEGACY_SUPPRESS_KEY, RECOVERY_OFF_KEY)
"""The context keys that may switch our layers off (the compiled layers' ``suppress_keys``)."""

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
    """Whether our layers run for this call: ``is_instrumentation_enabled()``, and not
    inside :func:`suppress_recovery`, with one context read instead of three calls.

    A per-call hot path inlines the common case: when no key of :data:`OFF_KEYS` is ``in
    read_context()`` (slot lookups, no method call), instrumentation is enabled; otherwise
    it asks this function.
    """
    context = read_context()
    return not (
        context.get(SUPPRESS_KEY)
        or context.get(LEGACY_SUPPRESS_KEY)
        or context.get(RECOVERY_OFF_KEY)
    )


class suppress_recovery:  # noqa: N801 - used like a function, as suppress_instrumentation()
    """Run a block (or a function) with otel-recovery's instrumentors stepped aside: each
    client call in it goes to the library untouched, as if we were not installed. Not
    retried, not refused by an open circuit, not counted on a breaker or a retry budget, no
    recovery span or attribute; contrib's instrumentation still traces it, and ``@recover``
    and the library's policies still apply.

    Why: a failure detector's probe must see the server as it is. A readiness check retried
    by us would answer "ready" for a server that fails two calls in three; one refused by
    our open circuit would keep a recovered server out of rotation until the circuit's
    timeout. redis-py's MultiDB health checks run this way (:mod:`._redis_multidb`)::

        with suppress_recovery():
            client.ping()

        @suppress_recovery()          # a sync or an async function: each call runs inside
        async def ready() -> bool: ...

    It is a context variable, so it reaches what runs in this context: asyncio tasks created
    inside the block (for as long as they live: a pool or client whose background tasks
    start in a probe keeps the block for good, so make them outside it), and
    ``asyncio.to_thread``. Not plain threads and executors, which start from an empty
    context: a sync pool's worker thread that reconnects for the probe is not inside it.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: list[object] = []

    def __enter__(self) -> None:
        self._tokens.append(otel_context.attach(otel_context.set_value(RECOVERY_OFF_KEY, True)))

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self._tokens.pop())  # type: ignore[arg-type]

    def __call__(self, function: _F) -> _F:
        """Decorate ``function`` so that each call runs inside the block; a coroutine
        function's whole run (where a ``with`` around its creation would end at once)."""
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def awaited(*args: Any, **kwargs: Any) -> Any:
                with suppress_recovery():
                    return await function(*args, **kwargs)

            return awaited  # type: ignore[return-value]

        @functools.wraps(function)
        def called(*args: Any, **kwargs: Any) -> Any:
            with suppress_recovery():
                return function(*args, **kwargs)

        return called  # type: ignore[return-value]
