"""Circuit breaker: stop calling a dependency that keeps failing, then probe it carefully.

State machine::

                trip: failure_threshold consecutive failures, or the failure /
                slow-call rate over the window reached its threshold
      +--------+ ----------------------------------------------> +------+
      | CLOSED |                                                  | OPEN |
      +--------+ <---------+                                      +------+
                           |                      timeout elapsed, |   ^  a probe failed (or was
          success_threshold|                 seen by can_execute() |   |  slow): open time grows
          probes succeeded |                                       v   |  by timeout_multiplier,
                           |                                  +-----------+  up to max_timeout
                           +----------------------------------| HALF_OPEN |
                                                              +-----------+

    Manual modes, entered and left only by force_open() / disable() / metrics_only() / reset():
      FORCED_OPEN   rejects everything.
      DISABLED      permits everything and counts nothing.
      METRICS_ONLY  permits everything, counts everything, never trips (rates show in snapshot()).

Counting is per *logical* call. The drivers (``@recover``, ``RecoveryPolicy``) consult the
breaker outside the retry loop: one ``can_execute()`` before the whole retried operation and
one ``record_*`` with its final outcome. Counting every attempt would let a single retried
request trip a breaker sized for requests, and would make ``failure_threshold`` mean something
different depending on the retry policy.

Choices worth knowing:

- ``state`` is a plain read: an OPEN breaker whose timeout has elapsed still reports OPEN until
  someone calls ``can_execute()``, which performs the OPEN -> HALF_OPEN transition and takes
  the first probe permit. Reading state never emits a transition or takes a permit, so
  dashboards and health checks cannot steal probes.
- In HALF_OPEN, ``can_execute()`` takes one of ``half_open_max_calls`` permits; ``record_*``
  and ``release()`` give it back. Any outcome recorded in HALF_OPEN counts as a probe outcome.
- Slow calls are evaluated only in rate mode (``failure_rate_threshold`` set); setting
  ``slow_call_duration`` without it is a configuration error. In HALF_OPEN a slow probe counts
  as a failed probe: one slow probe is a 100% slow-call rate.
- Outcomes recorded while OPEN or FORCED_OPEN (calls permitted before the trip) only update the
  cumulative counters; the window that tripped the breaker is kept for ``snapshot()`` until
  the next HALF_OPEN/CLOSED. DISABLED counts nothing at all.

All state sits under one ``threading.Lock`` that is never held across an ``await``, so the
same breaker is exact under threads and asyncio alike. Listeners run after the lock is
released, one at a time and in transition order, even when several threads trip transitions
(a thread that finds another already delivering leaves its transition to that thread).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import Context, copy_context
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery.policies._counting import new_counter, peek
from otel_recovery.policies._probe_permits import grant, new_period, take
from otel_recovery.policies._windows import CountWindow, OutcomeWindow, TimeWindow

if TYPE_CHECKING:
    from otel_recovery.stores._base import Store

__all__ = [
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "StateTransition",
]

_log = logging.getLogger("otel_recovery")
_ENV_STORE_URL = "OTEL_RECOVERY_STORE_URL"  # stores.ENV_STORE_URL, not imported: import cycle


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"
    METRICS_ONLY = "metrics_only"


_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED
_METRICS_ONLY = CircuitState.METRICS_ONLY
_PERMIT_ALL = frozenset({_CLOSED, _DISABLED, _METRICS_ONLY})


@dataclass(frozen=True, slots=True)
class StateTransition:
    """One state change, as delivered to listeners.

    ``reason`` is one of ``failure_threshold``, ``failure_rate``, ``slow_call_rate``,
    ``timeout_elapsed``, ``probe_failed``, ``probe_slow``, ``probes_succeeded``, ``force_open``,
    ``disable``, ``metrics_only``, ``reset``, and for a fleet-wide breaker ``local_trip`` (a
    process opened its breaker while the store was unreachable and pushed that on resync).
    ``at`` is the breaker clock's ``now()``; a fleet-wide breaker reports when this process
    observed the transition.
    """

    name: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A consistent view of the breaker, taken under its lock, for telemetry and tests.

    ``failure_rate``/``slow_call_rate`` are None in consecutive mode and while the window holds
    fewer than ``minimum_calls`` calls (the rate is not evaluated then, so reporting it would
    suggest a decision that is not being made). The ``*_calls`` counters are cumulative since
    creation and survive ``reset()``.
    """

    state: CircuitState
    failure_rate: float | None
    slow_call_rate: float | None
    buffered_calls: int
    consecutive_failures: int
    successful_calls: int
    failed_calls: int
    not_permitted_calls: int
    open_until: float | None
    current_timeout: float


class CircuitOpenError(Exception):
    """Raised by drivers when the breaker rejects a call.

    ``retry_after`` is the number of seconds until a probe may be tried, or None when no time
    is known (forced open, or half-open with every probe permit taken).
    """

    def __init__(self, name: str, retry_after: float | None) -> None:
        self.name = name
        self.retry_after = retry_after
        if retry_after is None:
            message = f"circuit {name!r} is open"
        else:
            message = f"circuit {name!r} is open; retry after {retry_after:.1f}s"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float | None]]:
        # Exceptions pickle via self.args (the message); rebuild from the real fields instead,
        # so the error survives process pools and task queues.
        return (type(self), (self.name, self.retry_after))


Listener = Callable[[StateTransition], None]


class _ListenerEntry:
    """A listener plus whether its failure was already logged (log once, not per call)."""

    __slots__ = ("callback", "failed")

    def __init__(self, callback: Listener) -> None:
        self.callback = callback
        self.failed = False


def _ratio(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a ratio in (0, 1], got {type(value).__name__}")
    if not 0 < value <= 1:
        hint = f"; did you mean {value / 100:g}?" if 1 < value <= 100 else ""
        raise ValueError(f"{name} must be in (0, 1], got {value!r}{hint}")
    return float(value)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


_PROBE_LEASE_FLOOR = 30.0
"""Seconds a half-open probe permit may be out, at least, before it is presumed lost."""


class CircuitBreaker:
    """Consecutive-count or sliding-window circuit breaker with probe control.

    ``CircuitBreaker(failure_threshold=5, timeout=60.0)`` is the seed behaviour: open after 5
    consecutive failures, stay open 60 s, then let one probe through. Setting
    ``failure_rate_threshold`` switches to rate mode (resilience4j style): trip when the
    failure rate, or the slow-call rate, over a count or time window reaches its threshold,
    once the window holds ``minimum_calls`` calls (capped at ``window_size`` for a count
    window, which could never hold more).

    ``store`` shares the state with every process using the same ``name``: a ``redis://`` URL
    or a Redis store builds a fleet-wide breaker, synced every ``sync_interval`` seconds
    (:mod:`otel_recovery.stores._shared_breaker` says what that costs and how stale it can
    be); ``memory://`` keeps it local. Without ``store``, a *named* breaker is shared when
    ``OTEL_RECOVERY_STORE_URL`` is a Redis URL, and local otherwise, so nothing is shared
    unless someone asked for it. A local breaker never touches a store.
    """

    def __new__(cls, *args: Any, store: Store | str | None = None, **kwargs: Any) -> CircuitBreaker:
        # The fleet-wide breaker is a subclass, chosen here, so that the local breaker's hot
        # paths stay exactly as they are: no flag is tested on them.
        if cls is CircuitBreaker and (store is not None or _ENV_STORE_URL in os.environ):
            from otel_recovery.stores._sharing import breaker_class

            return super().__new__(breaker_class(store, kwargs.get("name", "default")))
        return super().__new__(cls)

    __slots__ = (
        "__weakref__",
        "_base_timeout",
        "_clock",
        "_configured_rate",
        "_configured_threshold",
        "_consecutive_failures",
        "_current_timeout",
        "_dispatch_lock",
        "_failed_calls",
        "_failure_threshold",
        "_fast_record",
        "_fast_successes",
        "_half_open_max",
        "_in_flight",
        "_lazy",
        "_lazy_folded",
        "_lazy_successes",
        "_listeners",
        "_lock",
        "_max_timeout",
        "_minimum_calls",
        "_not_permitted",
        "_open_until",
        "_pending",
        "_period",
        "_permit_all",
        "_probe_granted_at",
        "_probe_successes",
        "_rate_threshold",
        "_serial",
        "_slow_after",
        "_slow_rate_threshold",
        "_state",
        "_success_threshold",
        "_successful_calls",
        "_tally",
        "_timeout_multiplier",
        "_window",
        "name",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        timeout: Duration = 60.0,
        *,
        name: str = "default",
        failure_rate_threshold: float | None = None,
        window: Literal["count", "time"] = "count",
        window_size: int | Duration = 100,
        minimum_calls: int = 10,
        slow_call_duration: Duration | None = None,
        slow_call_rate_threshold: float = 1.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        timeout_multiplier: float = 1.0,
        max_timeout: Duration | None = None,
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        store: Store | str | None = None,
        sync_interval: Duration = 0.1,
    ) -> None:
        if to_seconds(sync_interval, "sync_interval") <= 0:
            raise ValueError(f"sync_interval must be > 0 seconds, got {sync_interval!r}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("name must be a non-empty str, got ''")
        self.name = name
        self._failure_threshold = _positive_int(failure_threshold, "failure_threshold")
        self._base_timeout = to_seconds(timeout, "timeout")

        self._window: OutcomeWindow | None = None
        self._rate_threshold = math.inf
        self._minimum_calls = _positive_int(minimum_calls, "minimum_calls")
        window_checked = self._make_window(window, window_size)  # checked in either mode
        if failure_rate_threshold is not None:
            self._rate_threshold = _ratio(failure_rate_threshold, "failure_rate_threshold")
            self._window = window_checked
        self._slow_rate_threshold = _ratio(slow_call_rate_threshold, "slow_call_rate_threshold")
        self._slow_after = math.inf
        if slow_call_duration is not None:
            self._slow_after = to_seconds(slow_call_duration, "slow_call_duration")
            if self._slow_after <= 0:
                raise ValueError(
                    f"slow_call_duration must be > 0 seconds, got {slow_call_duration!r}"
                )
            if self._window is None:
                raise ValueError(
                    "slow_call_duration is only evaluated in rate mode; set "
                    "failure_rate_threshold too (e.g. failure_rate_threshold=0.5)"
                )

        self._half_open_max = _positive_int(half_open_max_calls, "half_open_max_calls")
        self._success_threshold = _positive_int(success_threshold, "success_threshold")
        if isinstance(timeout_multiplier, bool) or not isinstance(timeout_multiplier, (int, float)):
            raise TypeError(
                f"timeout_multiplier must be a number >= 1, got {type(timeout_multiplier).__name__}"
            )
        if not 1 <= timeout_multiplier < math.inf:
            raise ValueError(
                f"timeout_multiplier must be a finite number >= 1, got {timeout_multiplier!r}"
            )
        self._timeout_multiplier = float(timeout_multiplier)
        self._max_timeout = math.inf
        if max_timeout is not None:
            self._max_timeout = to_seconds(max_timeout, "max_timeout", allow_inf=True)
            if self._max_timeout < self._base_timeout:
                raise ValueError(
                    f"max_timeout must be >= timeout ({self._base_timeout:g}s), got {max_timeout!r}"
                )

        self._clock = clock_or_default(clock)

        if isinstance(listeners, (str, bytes)) or not isinstance(listeners, Iterable):
            raise TypeError(
                f"listeners must be an iterable of callables (e.g. [on_transition]), "
                f"got {listeners!r}"
            )
        entries = []
        for listener in listeners:
            if not callable(listener):
                raise TypeError(f"listeners must be callables, got {listener!r}")
            entries.append(_ListenerEntry(listener))
        self._listeners: tuple[_ListenerEntry, ...] = tuple(entries)

        self._lock = new_lock()
        self._dispatch_lock = new_lock()
        # each transition with the context of the call that caused it (see _dispatch)
        self._pending: deque[tuple[StateTransition, Context]] = deque()
        self._state = _CLOSED
        self._permit_all = True  # CLOSED, DISABLED, METRICS_ONLY: can_execute() without the lock
        self._fast_record = self._window is None  # CLOSED in consecutive mode
        self._consecutive_failures = 0
        self._successful_calls = 0
        # Successes on the closed consecutive-mode fast path are counted without the lock:
        # next() on a lock-free counter (_counting.py) is a single atomic step under the GIL.
        self._fast_successes = new_counter()
        # In rate mode with a count window and no slow-call judging, a closed breaker defers
        # successes the same way and folds them into the window (under the lock) before the
        # next failure is recorded or the window is read. Only successes that cannot trip the
        # breaker are deferred (see record_success), so deciding later loses nothing, and a
        # single thread's order is preserved exactly.
        self._lazy = isinstance(self._window, CountWindow) and self._slow_after == math.inf
        self._lazy_successes = new_counter()
        self._lazy_folded = 0
        self._failed_calls = 0
        self._not_permitted = 0
        self._in_flight = 0
        self._serial = new_period()  # unique: names this breaker's permits (_probe_permits)
        self._period = 0  # the current half-open period's number
        self._probe_granted_at = 0.0
        reset_in_child(self)
        self._probe_successes = 0
        self._current_timeout = self._base_timeout
        self._open_until = math.inf
        self._configured_threshold = self._failure_threshold
        self._configured_rate = self._rate_threshold
        self._tally: Iterator[int] | None = None
        self._refresh_tally()

    def _refresh_tally(self) -> None:
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

    def _make_window(self, window: str, window_size: int | Duration) -> OutcomeWindow:
        if window == "count":
            if isinstance(window_size, bool) or not isinstance(window_size, int):
                raise TypeError(
                    "window_size must be an int number of calls when window='count', "
                    f"got {type(window_size).__name__} {window_size!r}"
                )
            if window_size < 1:
                raise ValueError(f"window_size must be >= 1 call, got {window_size!r}")
            # A count window never holds more than window_size calls.
            self._minimum_calls = min(self._minimum_calls, window_size)
            return CountWindow(window_size)
        if window == "time":
            seconds = to_seconds(window_size, "window_size")
            if seconds < 1 or seconds != int(seconds):
                raise ValueError(
                    "window_size must be a whole number of seconds >= 1 when window='time' "
                    f"(one bucket per second), got {window_size!r}"
                )
            return TimeWindow(int(seconds))
        raise ValueError(f"window must be 'count' or 'time', got {window!r}")

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; OPEN stays OPEN until ``can_execute()`` moves it to HALF_OPEN."""
        return self._state

    @property
    def failure_threshold(self) -> int:
        return self._failure_threshold

    @property
    def failure_rate_threshold(self) -> float | None:
        """The failure rate that trips a rate-mode breaker; None in consecutive mode."""
        return None if self._window is None else self._rate_threshold

    @property
    def tuned(self) -> bool:
        """Whether :meth:`tune` changed a threshold that :meth:`restore` has not put back."""
        return (
            self._failure_threshold != self._configured_threshold
            or self._rate_threshold != self._configured_rate
        )

    @property
    def timeout(self) -> float:
        """The base open time in seconds (before any growth)."""
        return self._base_timeout

    @property
    def slow_call_duration(self) -> float | None:
        """Seconds from which a call counts as slow, or None when slow calls are not judged.

        Drivers read it to decide whether a call's duration must be measured at all.
        """
        return None if self._slow_after == math.inf else self._slow_after

    @property
    def failure_count(self) -> int:
        """Consecutive failures (consecutive mode) or failures in the window (rate mode)."""
        with self._lock:
            self._fold()
            window = self._window
            if window is None:
                return self._consecutive_failures
            if window.needs_clock:
                window.expire(self._clock.now())
            return window.failures

    def retry_after(self) -> float | None:
        """Seconds until an OPEN breaker lets a probe through; None in every other state."""
        with self._lock:
            if self._state is not _OPEN:
                return None
            return max(0.0, self._open_until - self._clock.now())

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's state and window counts at this moment, consistent with each
        other (read under its lock): for dashboards, health endpoints and tests."""
        with self._lock:
            self._fold()
            failure_rate = slow_rate = None
            buffered = 0
            window = self._window
            if window is not None:
                if window.needs_clock:
                    window.expire(self._clock.now())
                buffered = window.calls
                if buffered >= self._minimum_calls:
                    failure_rate = window.failures / buffered
                    slow_rate = window.slows / buffered
            return BreakerSnapshot(
                state=self._state,
                failure_rate=failure_rate,
                slow_call_rate=slow_rate,
                buffered_calls=buffered,
                consecutive_failures=self._consecutive_failures,
                successful_calls=self._successful_calls + peek(self._fast_successes),
                failed_calls=self._failed_calls,
                not_permitted_calls=self._not_permitted,
                open_until=self._open_until if self._state is _OPEN else None,
                current_timeout=self._current_timeout,
            )

    # -- the call protocol ------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the threads that held half-open probe permits: give
        them back, or the child's breaker would refuse every call for good. A probe of the
        forking thread itself then ends on a breaker with no permit out (``record_*`` and
        ``release`` never take the count below zero)."""
        self._in_flight = 0

    def can_execute(self) -> bool:
        """Whether a call may proceed now; in HALF_OPEN a True takes a probe permit.

        The closed path is one attribute read: a thread that sees True just before another
        thread trips the breaker behaves exactly as if it had asked a moment earlier.
        """
        if self._permit_all:
            return True
        with self._lock:
            permitted = self._acquire()
        if self._pending:
            self._dispatch()
        return permitted

    def would_refuse(self) -> bool:
        """Whether :meth:`can_execute` would refuse a call now, asked without taking a probe
        permit or moving OPEN to HALF_OPEN: for callers that must not spend a probe on the
        question (a pool's health check, see ``instrumentors/_health_checks.py``)."""
        if self._permit_all:
            return False
        with self._lock:
            state = self._state
            if state in _PERMIT_ALL:
                return False
            if state is _OPEN:
                return self._clock.now() < self._open_until
            if state is _HALF_OPEN:
                return self._in_flight >= self._half_open_max and not self._probes_lost()
            return True  # forced open

    def _acquire(self) -> bool:
        state = self._state
        if state in _PERMIT_ALL:  # changed while we waited for the lock
            return True
        if state is _OPEN:
            now = self._clock.now()
            if now < self._open_until:
                self._not_permitted += 1
                return False
            self._transition(_HALF_OPEN, "timeout_elapsed", now)
            state = _HALF_OPEN
        if state is _HALF_OPEN:
            if self._in_flight >= self._half_open_max and self._probes_lost():
                # the lost permits' holders, should they report after all, are no probes
                # (another probe may be out by then): a new period voids their tickets
                self._in_flight = 0
                self._period = new_period()
            if self._in_flight < self._half_open_max:
                self._in_flight += 1
                self._probe_granted_at = self._clock.now()
                grant(self._serial, self._period)  # held by this context (_probe_permits)
                return True
        self._not_permitted += 1
        return False

    def _take_probe(self) -> int | None:
        """The calling context gives back a probe permit of this half-open period, if it
        holds one (:mod:`otel_recovery.policies._probe_permits`)."""
        period = self._period
        return take(self._serial, lambda ticket: ticket == period)

    def _probes_lost(self) -> bool:
        """Whether the permits out have been held for longer than a probe may take: the
        open time, and at least 30 s, since the latest was granted. Their holders are
        presumed gone (a call abandoned where its permit cannot be given back), so the
        breaker cannot stay half-open for good; a late report then counts as a straggler's
        (totals only), not as a probe. Long, because a
        probe to a stalled dependency is slow by nature and must not be joined by another."""
        lease = max(self._current_timeout, _PROBE_LEASE_FLOOR)
        return self._clock.now() - self._probe_granted_at >= lease

    def record_success(self, duration: float | None = None) -> None:
        """Record a successful call; ``duration`` (seconds) feeds the slow-call rate."""
        if self._fast_record:
            # Closed, consecutive mode: no lock unless failures must be reset. The count is
            # atomic (see __init__); a failure recorded concurrently is ordered after this
            # success -- concurrent calls have no order to preserve.
            next(self._fast_successes)
            if self._consecutive_failures:
                with self._lock:
                    if self._fast_record:
                        self._consecutive_failures = 0
                        self._refresh_tally()
            return
        if self._lazy:
            window = self._window
            # Deferring is only exact when this success cannot trip the breaker: below
            # minimum_calls, the success that completes the count can (4 failures + 1 success).
            if window is not None and (not window.failures or window.calls >= self._minimum_calls):
                next(self._lazy_successes)  # folded into the window later (see __init__)
                return
        # acquire/release rather than ``with``: this is a hot path, and the context-manager
        # protocol costs about as much again as the lock itself on CPython 3.11.
        lock = self._lock
        lock.acquire()
        try:
            self._record(False, duration)
            self._refresh_tally()
        finally:
            lock.release()
        if self._pending:
            self._dispatch()

    def record_failure(self, duration: float | None = None) -> None:
        """Record a failed call (one the caller's classifier counts against the dependency)."""
        lock = self._lock
        lock.acquire()
        try:
            self._record(True, duration)
            self._refresh_tally()
        finally:
            lock.release()
        if self._pending:
            self._dispatch()

    def release(self) -> None:
        """Give back a half-open permit for a call that neither succeeded nor failed (if the
        calling context holds one: a call admitted while closed holds none)."""
        if self._permit_all:
            return  # no permits are held outside HALF_OPEN
        with self._lock:
            if self._state is _HALF_OPEN and self._take_probe() is not None and self._in_flight:
                self._in_flight -= 1

    def _fold(self) -> None:
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

    def _record(self, failed: bool, duration: float | None) -> None:
        self._fold()
        state = self._state
        if state is _DISABLED:
            return
        if failed:
            self._failed_calls += 1
        else:
            self._successful_calls += 1
        window = self._window
        if state is _CLOSED or state is _METRICS_ONLY:
            self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
            if window is None:
                if (
                    failed
                    and state is _CLOSED
                    and self._consecutive_failures >= self._failure_threshold
                ):
                    self._trip("failure_threshold", self._clock.now())
                return
            slow = duration is not None and duration >= self._slow_after
            now = self._clock.now() if window.needs_clock else 0.0
            window.record(failed, slow, now)
            calls = window.calls
            if state is _METRICS_ONLY or calls < self._minimum_calls:
                return
            if window.failures / calls >= self._rate_threshold:
                reason = "failure_rate"
            elif window.slows / calls >= self._slow_rate_threshold:
                reason = "slow_call_rate"
            else:
                return
            self._trip(reason, now if window.needs_clock else self._clock.now())
        elif state is _HALF_OPEN:
            if self._take_probe() is None:
                return  # admitted before this half-open period: cumulative counters only
            if self._in_flight:
                self._in_flight -= 1
            if failed:
                self._reopen("probe_failed")
            elif duration is not None and duration >= self._slow_after:
                self._reopen("probe_slow")
            else:
                self._probe_successes += 1
                if self._probe_successes >= self._success_threshold:
                    self._transition(_CLOSED, "probes_succeeded", self._clock.now())
        # OPEN and FORCED_OPEN: a call permitted before the trip; cumulative counters only.
        # HALF_OPEN: only the holder of a probe permit of this period is a probe.

    def _trip(self, reason: str, now: float) -> None:
        self._open_until = now + self._current_timeout
        self._transition(_OPEN, reason, now)

    def _reopen(self, reason: str) -> None:
        now = self._clock.now()
        self._current_timeout = min(
            self._current_timeout * self._timeout_multiplier, self._max_timeout
        )
        self._trip(reason, now)

    # -- run-time tuning (adaptive thresholds) -----------------------------------------------

    def tune(
        self,
        *,
        failure_threshold: int | None = None,
        failure_rate_threshold: float | None = None,
    ) -> None:
        """Change the trip thresholds while the breaker runs; :meth:`restore` undoes it.

        Anomaly detection tightens the breaker of a dependency that behaves abnormally and
        relaxes it afterwards (:class:`otel_recovery.learning.AdaptiveThresholds`); tuning in
        place keeps the state, windows, counters and listeners that replacing the breaker
        would lose. The new values apply from the next recorded outcome: tuning never trips
        or closes the breaker by itself, and the closed-state fast paths are untouched.
        ``failure_rate_threshold`` exists only in rate mode.
        """
        threshold = (
            None
            if failure_threshold is None
            else _positive_int(failure_threshold, "failure_threshold")
        )
        rate = None
        if failure_rate_threshold is not None:
            if self._window is None:
                raise ValueError(
                    "failure_rate_threshold can only be tuned in rate mode; this breaker counts "
                    "consecutive failures (tune failure_threshold instead)"
                )
            rate = _ratio(failure_rate_threshold, "failure_rate_threshold")
        with self._lock:
            if threshold is not None:
                self._failure_threshold = threshold
            if rate is not None:
                self._rate_threshold = rate

    def restore(self) -> None:
        """Put back the thresholds given at construction (the end of an anomaly)."""
        with self._lock:
            self._failure_threshold = self._configured_threshold
            self._rate_threshold = self._configured_rate

    # -- manual control ---------------------------------------------------------------------

    def force_open(self) -> None:
        """Reject every call until ``reset()`` (maintenance, known outage)."""
        self._manual(_FORCED_OPEN, "force_open")

    def disable(self) -> None:
        """Permit every call and count nothing until ``reset()`` or another manual mode."""
        self._manual(_DISABLED, "disable")

    def metrics_only(self) -> None:
        """Permit every call but keep counting, to watch what a breaker would do (dry run)."""
        self._manual(_METRICS_ONLY, "metrics_only")

    def reset(self) -> None:
        """Back to CLOSED with empty windows and the base open time; counters are kept."""
        with self._lock:
            now = self._clock.now()
            if self._state is _CLOSED:
                self._enter(_CLOSED)
            else:
                self._transition(_CLOSED, "reset", now)
        if self._pending:
            self._dispatch()

    def _manual(self, to_state: CircuitState, reason: str) -> None:
        with self._lock:
            if self._state is not to_state:
                self._transition(to_state, reason, self._clock.now())
        if self._pending:
            self._dispatch()

    # -- transitions and listeners ----------------------------------------------------------

    def _enter(self, to_state: CircuitState) -> None:
        self._fold()  # deferred successes belong to the state being left
        self._state = to_state
        self._lazy = (
            to_state is _CLOSED
            and isinstance(self._window, CountWindow)
            and self._slow_after == math.inf
        )
        self._permit_all = to_state in _PERMIT_ALL
        self._fast_record = to_state is _CLOSED and self._window is None
        self._in_flight = 0
        self._probe_successes = 0
        if to_state is _HALF_OPEN:
            self._period = new_period()  # permits of earlier periods no longer count
        if to_state is not _OPEN and to_state is not _FORCED_OPEN:
            # Keep the window that tripped the breaker visible while open; start afresh
            # wherever counting resumes, so stale outcomes cannot re-trip a recovered service.
            self._consecutive_failures = 0
            if self._window is not None:
                self._window.clear()
        if to_state is _CLOSED:
            self._current_timeout = self._base_timeout
        self._refresh_tally()

    def _transition(self, to_state: CircuitState, reason: str, now: float) -> None:
        from_state = self._state
        self._enter(to_state)
        if self._listeners:
            transition = StateTransition(self.name, from_state, to_state, reason, now)
            self._pending.append((transition, copy_context()))

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Subscribe to transitions; returns a function that unsubscribes (idempotent).

        A listener runs in the context (the thread's or task's context variables, hence
        the current span) of the call that caused the transition, whichever thread delivers
        it; it must not block for long, as the next transitions wait for it."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        entry = _ListenerEntry(listener)
        with self._lock:
            self._listeners = (*self._listeners, entry)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(e for e in self._listeners if e is not entry)

        return unsubscribe

    def _dispatch(self) -> None:
        """Deliver queued transitions to the listeners, in order, each in the context of the
        call that caused it.

        Whoever holds the dispatch lock delivers everything queued; other threads (and
        listeners that trigger transitions re-entrantly) just queue and leave. The outer
        loop closes the race where a transition is queued just before the lock is released.
        Delivered in the deliverer's own context, another thread's transition landed on the
        deliverer's span (telemetry marks the current span), so each runs in a copy of the
        context it was queued in (transitions are rare; the copy is O(1)).
        """
        pending = self._pending
        while pending:
            if not self._dispatch_lock.acquire(blocking=False):
                return
            try:
                while pending:
                    transition, context = pending.popleft()
                    for entry in self._listeners:
                        try:
                            context.run(entry.callback, transition)
                        except Exception:
                            if not entry.failed:
                                entry.failed = True
                                _log.exception(
                                    "circuit breaker %r: listener %r raised; it stays "
                                    "subscribed and its further errors are not logged",
                                    self.name,
                                    entry.callback,
                                )
            finally:
                self._dispatch_lock.release()

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value})"
