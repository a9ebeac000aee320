"""``Fallback``: what to return when recovery has given up.

Three sources, in the order users reach for them: a fixed value, a function of the error
(sync or async), or the last known good result of the same policy. A fallback applies only
to the failures it handles (``on=``: exception types or a predicate; default every
``Exception``), so a programming error can still surface; ``CancelledError`` and
``KeyboardInterrupt`` are never swallowed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from typing import Any

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.policies._error_match import check_error_match, error_matches

__all__ = ["Fallback"]

_log = logging.getLogger("otel_recovery")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


class Fallback:
    """Exactly one of ``value``, ``func`` or ``last_known_good=True``.

    ``last_known_good`` remembers successes per call arguments (``key=`` customises the
    key; at most ``max_entries`` are kept, least recently used first out).
    ``func`` receives the exception that ended recovery (a :class:`CircuitOpenError` when the
    breaker rejected the call) and may be a coroutine function when used with ``acall``.
    ``max_age`` bounds how stale a last-known-good result may be, in seconds.
    """

    __slots__ = ("func", "key", "last_known_good", "max_age", "max_entries", "on", "value")

    def __init__(
        self,
        value: Any = _MISSING,
        *,
        func: Callable[[BaseException], Any] | None = None,
        last_known_good: bool = False,
        max_age: Duration | None = None,
        key: Callable[..., Hashable] | None = None,
        max_entries: int = 1024,
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
        if (max_age is not None or key is not None) and not last_known_good:
            raise ValueError("max_age and key only apply with last_known_good=True")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the call's arguments, got {key!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.value = value
        self.func = func
        self.last_known_good = bool(last_known_good)
        max_age_seconds = (
            None if max_age is None else to_seconds(max_age, "max_age", allow_inf=True)
        )
        self.max_age = None if max_age_seconds == math.inf else max_age_seconds
        self.key = key
        self.max_entries = max_entries
        self.on = check_error_match(on, "Fallback")

    def handles(self, error: BaseException) -> bool:
        """Whether this fallback may answer for ``error`` (never for cancellation).

        A predicate that raises is a bug in it: logged, and the fallback does not apply.
        """
        if not isinstance(error, Exception):
            return False
        on = self.on
        try:
            return error_matches(on, error)
        except Exception:
            _log.exception("Fallback on= predicate %r raised; not falling back", on)
            return False

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
        """The arguments' part of a call's last-known-good key: its arguments (or
        ``key(*args, **kwargs)``). The policy adds the function called, so one caller never
        receives another caller's data, nor one function another's; a call whose arguments
        cannot be hashed is not remembered (None).
        """
        try:
            if self.key is not None:
                key: Hashable = self.key(*args, **kwargs)
            else:
                # typed, and the keywords always in their own slot: f(1) is not f(1.0) nor
                # f(True), and f(x=1) is not f((), (("x", 1),)) (one caller's data is never
                # another's)
                key = (
                    args,
                    tuple(map(type, args)),
                    tuple(sorted((k, v, type(v)) for k, v in kwargs.items())),
                )
            hash(key)
        except Exception:
            return None
        return key

    @property
    def has_value(self) -> bool:
        return self.value is not _MISSING

    def __repr__(self) -> str:
        if self.func is not None:
            return f"Fallback(func={self.func!r})"
        if self.last_known_good:
            return f"Fallback(last_known_good=True, max_age={self.max_age})"
        return f"Fallback({self.value!r})"
