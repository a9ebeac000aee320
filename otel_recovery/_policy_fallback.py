"""What answers a call that gave up: the fallback's function or value, or a remembered success.

A :class:`~otel_recovery.policies.fallback.Fallback` answers with a function of the error,
a fixed value, or, with ``last_known_good``, the last result the same function returned for
the same arguments, within ``max_age``. The last of these needs memory kept on the happy
path: :meth:`PolicyFallback._remember` keeps each success (the compiled happy paths call it
through ``HappyPath.remember``), bounded by ``max_entries``, under a lock, and
:meth:`PolicyFallback._fallback_plan` reads it back when the call gives up. The drivers run
the chosen answer (a function is sync or awaited) and end the trace with
:meth:`PolicyFallback._fallback_done`.

:class:`PolicyFallback` is a mixin of ``PolicyCore``: it has no slots of its own and works
on the policy's (``_Remembering`` lists those it uses).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from otel_recovery._clock import Clock
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.fallback import Fallback
from otel_recovery.telemetry import CallTrace

__all__ = ["PolicyFallback"]


def _good_key(fn: Callable[..., Any], arguments: Hashable | None) -> Hashable | None:
    """The last-known-good key of a call of ``fn``: the function and its arguments' key.
    Functions hash by identity, bound methods by their object and function; a function
    made anew for every call (a lambda written at the call) or bound to an unhashable
    object is never remembered, rather than risk answering one caller with another's
    data."""
    if arguments is None:
        return None
    try:
        hash(fn)
    except TypeError:
        return None
    return (fn, arguments)


class _Remembering(Protocol):
    """The slots of ``PolicyCore`` that :class:`PolicyFallback` uses."""

    _good_lock: threading.Lock
    _last_good: OrderedDict[Hashable, tuple[Any, float]]
    clock: Clock
    fallback: Fallback | None


class PolicyFallback:
    """The fallback answers of ``PolicyCore`` and their memory (see the module doc)."""

    __slots__ = ()

    def _remember(
        self: _Remembering,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        now: float,
    ) -> None:
        """Keep a success for last-known-good, per function and call arguments (never
        across them: one policy often serves several functions, and ``get_email(42)``
        must never be answered with what ``get_password_hash(42)`` returned)."""
        fallback = self.fallback
        if fallback is None or not fallback.last_known_good:
            return
        key = _good_key(fn, fallback.key_for(args, kwargs))
        if key is None:
            return
        with self._good_lock:
            self._last_good[key] = (result, now)
            self._last_good.move_to_end(key)
            while len(self._last_good) > fallback.max_entries:
                self._last_good.popitem(last=False)

    def _fallback_plan(
        self: _Remembering,
        error: BaseException,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, Any]:
        """Which fallback answers: a function, a value, the last known good result, or none."""
        fallback = self.fallback
        assert fallback is not None
        if fallback.func is not None:
            return "function", fallback.func
        if fallback.last_known_good:
            key = _good_key(fn, fallback.key_for(args, kwargs))
            with self._good_lock:
                remembered = self._last_good.get(key) if key is not None else None
            if remembered is None:
                return "none", None
            value, at = remembered
            if fallback.max_age is not None and self.clock.now() - at > fallback.max_age:
                return "none", None
            return "last_known_good", value
        return "value", fallback.value

    @staticmethod
    def _fallback_done(
        trace: CallTrace | None,
        kind: str,
        error: BaseException,
        info: ErrorInfo | None,
        attempts: int,
        value: Any,
    ) -> Any:
        if trace is not None:
            trace.fallback(kind, error, info)
            trace.end("fallback", attempts, info)
        return value
