"""How a closed circuit breaker counts successes without its lock, and folds them in later.

Most calls succeed while a breaker is closed, so recording a success is the breaker's
hottest path. Two closed configurations count it as one ``next()`` on a lock-free counter
(:mod:`._counting`, atomic under the GIL) instead of taking the lock:

- consecutive mode, while no failure is counted: a success changes nothing but the total
  (``_fast_successes``);
- rate mode with a count window and no slow-call judging, while the success cannot trip the
  breaker: the success is deferred (``_lazy_successes``) and :meth:`BreakerTally._fold`
  applies the deferred ones to the counters and the window, under the lock, before the next
  failure is recorded, the state changes or anything reads the window.

``_tally`` names the counter that may take the next success that way, or is None when the
success must go through ``record_success()``; :meth:`BreakerTally._refresh_tally` keeps it
current. The compiled happy paths read ``_tally`` (and ``_permit_all``) from the breaker's
slots by name (``_speedups_src/runner.c``; ``PolicyCore._happy_path`` says when they may).

:class:`BreakerTally` is a mixin of ``CircuitBreaker``: it has no slots of its own and works
on the breaker's (``_Tallied`` lists those it uses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from otel_recovery.policies._counting import peek
from otel_recovery.policies._windows import CountWindow, OutcomeWindow

__all__ = ["BreakerTally"]


class _Tallied(Protocol):
    """The slots of ``CircuitBreaker`` that :class:`BreakerTally` uses."""

    _consecutive_failures: int
    _fast_record: bool
    _fast_successes: Iterator[int]
    _lazy: bool
    _lazy_folded: int
    _lazy_successes: Iterator[int]
    _minimum_calls: int
    _successful_calls: int
    _tally: Iterator[int] | None
    _window: OutcomeWindow | None


class BreakerTally:
    """The lock-free success counting of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    def _refresh_tally(self: _Tallied) -> None:
        """(Lock held, or not yet shared.) Decide whether a success may be recorded right
        now by a single ``next(self._tally)``, the lock-free cases of :meth:`record_success`:
        closed in consecutive mode with no failure to reset, or closed with a deferring count
        window (see ``__init__``). Compiled happy paths read ``_tally`` instead of calling
        ``record_success`` (``PolicyCore._happy_path``); None sends them to the method.

        A success counted through a ``_tally`` read just before another thread recorded a
        failure is ordered after that failure, as :meth:`record_success`'s own lock-free
        paths already allow: concurrent calls have no order to preserve.
        """
        tally: Iterator[int] | None = None
        if self._fast_record:
            if not self._consecutive_failures:
                tally = self._fast_successes
        elif self._lazy:
            window = self._window
            if window is not None and (not window.failures or window.calls >= self._minimum_calls):
                tally = self._lazy_successes
        self._tally = tally

    def _fold(self: _Tallied) -> None:
        """Apply deferred successes (lock held): to the counters and the count window."""
        count = peek(self._lazy_successes) - self._lazy_folded
        if count <= 0:
            return
        self._lazy_folded += count
        self._successful_calls += count
        self._consecutive_failures = 0
        window = self._window
        if isinstance(window, CountWindow):
            window.record_successes(count)
