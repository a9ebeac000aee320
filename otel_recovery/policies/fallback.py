"""``Fallback``: what to return when recovery has given up.

Three sources, in the order users reach for them: a fixed value, a function of the error
(sync or async), or the last known good result of the same policy. A fallback applies only
to the failures it handles (``on=``: exception types or a predicate; default every
``Exception``), so a programming error can still surface; ``CancelledError`` and
``KeyboardInterrupt`` are never swallowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otel_recovery._clock import Duration, to_seconds

__all__ = ["Fallback"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


class Fallback:
    """Exactly one of ``value``, ``func`` or ``last_known_good=True``.

    ``func`` receives the exception that ended recovery (a :class:`CircuitOpenError` when the
    breaker rejected the call) and may be a coroutine function when used with ``acall``.
    ``max_age`` bounds how stale a last-known-good result may be, in seconds.
    """

    __slots__ = ("func", "last_known_good", "max_age", "on", "value")

    def __init__(
        self,
        value: Any = _MISSING,
        *,
        func: Callable[[BaseException], Any] | None = None,
        last_known_good: bool = False,
        max_age: Duration | None = None,
        on: type[BaseException]
        | tuple[type[BaseException], ...]
        | Callable[[BaseException], bool] = Exception,
    ) -> None:
        given = sum((value is not _MISSING, func is not None, bool(last_known_good)))
        if given != 1:
            raise ValueError(
                "Fallback needs exactly one of: a value (Fallback(42)), "
                "func= (Fallback(func=handler)) or last_known_good=True"
            )
        if func is not None and not callable(func):
            raise TypeError(f"Fallback func must be callable, got {func!r}")
        if max_age is not None and not last_known_good:
            raise ValueError("max_age only applies with last_known_good=True")
        self.value = value
        self.func = func
        self.last_known_good = bool(last_known_good)
        self.max_age = None if max_age is None else to_seconds(max_age, "max_age")
        if not (isinstance(on, (type, tuple)) or callable(on)):
            raise TypeError(f"Fallback on= must be exception types or a predicate, got {on!r}")
        self.on = on

    def handles(self, error: BaseException) -> bool:
        """Whether this fallback may answer for ``error`` (never for cancellation)."""
        if not isinstance(error, Exception):
            return False
        on = self.on
        if isinstance(on, (type, tuple)):
            return isinstance(error, on)
        return bool(on(error))

    @property
    def has_value(self) -> bool:
        return self.value is not _MISSING

    def __repr__(self) -> str:
        if self.func is not None:
            return f"Fallback(func={self.func!r})"
        if self.last_known_good:
            return f"Fallback(last_known_good=True, max_age={self.max_age})"
        return f"Fallback({self.value!r})"
