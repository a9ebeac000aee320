"""Circuit breaker: stop calling a dependency that keeps failing, then probe it carefully.

State machine::

                trip: failure_threshold consecutive failures, or the failure /
                slow-call rate over the window reached its threshold
      +--------+ ----------------------------------------------> +------+
      | CLOSED |                                                  | OPEN |
      +--------+ <---------+                                      +------+
                           |                      timeout elapsed, |   ^  a probe failed (or was
          success_threshold|                 seen by can_execute() |   |  slow): open time grows
          probes succeeded |                 (or ended early by    |   |  by timeout_multiplier,
                           |                        probe_now())   v   |  up to max_timeout
                           |                                  +-----------+
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

This module is the state machine. The rest of :class:`CircuitBreaker` is mixed in from one
module per concern, none with slots of its own: the settings and their checks
(``_breaker_settings``), reading it without moving it (``_breaker_view``), the listeners
(``_breaker_listeners``), the manual modes (``_breaker_manual``), the half-open probe permits
(``_breaker_probes``) and the lock-free success counting (``_breaker_tally``); the states are
in ``_breaker_states``.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any, Literal

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery._mixins import plain_self
from otel_recovery._public_home import public_home
from otel_recovery.policies._breaker_listeners import (
    BreakerListeners,
    Listener,
    ListenerEntry,
    StateTransition,
    listener_entries,
)
from otel_recovery.policies._breaker_manual import BreakerManual
from otel_recovery.policies._breaker_probes import BreakerProbes
from otel_recovery.policies._breaker_settings import (
    BreakerSettings,
    check_name,
    check_sync_interval,
    checked_multiplier,
    max_open_time,
    positive_int,
    ratio,
    slow_call_after,
)
from otel_recovery.policies._breaker_states import PERMIT_ALL, CircuitState
from otel_recovery.policies._breaker_tally import BreakerTally
from otel_recovery.policies._breaker_view import BreakerSnapshot, BreakerView
from otel_recovery.policies._counting import new_counter
from otel_recovery.policies._probe_permits import grant, new_period
from otel_recovery.policies._windows import CountWindow, OutcomeWindow

if TYPE_CHECKING:
    from otel_recovery.stores._base import Store

__all__ = [
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "StateTransition",
]

public_home(__name__, BreakerSnapshot, CircuitState, StateTransition)

_ENV_STORE_URL = "OTEL_RECOVERY_STORE_URL"  # stores.ENV_STORE_URL, not imported: import cycle

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED
_METRICS_ONLY = CircuitState.METRICS_ONLY


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


class CircuitBreaker(
    BreakerSettings, BreakerView, BreakerListeners, BreakerManual, BreakerProbes, BreakerTally
):
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
        check_sync_interval(sync_interval)
        self.name = check_name(name)
        self._failure_threshold = positive_int(failure_threshold, "failure_threshold")
        self._base_timeout = to_seconds(timeout, "timeout")

        self._window: OutcomeWindow | None = None
        self._rate_threshold = math.inf
        self._minimum_calls = positive_int(minimum_calls, "minimum_calls")
        window_checked = self._make_window(window, window_size)  # checked in either mode
        if failure_rate_threshold is not None:
            self._rate_threshold = ratio(failure_rate_threshold, "failure_rate_threshold")
            self._window = window_checked
        self._slow_rate_threshold = ratio(slow_call_rate_threshold, "slow_call_rate_threshold")
        self._slow_after = slow_call_after(slow_call_duration, rate_mode=self._window is not None)

        self._half_open_max = positive_int(half_open_max_calls, "half_open_max_calls")
        self._success_threshold = positive_int(success_threshold, "success_threshold")
        self._timeout_multiplier = checked_multiplier(timeout_multiplier)
        self._max_timeout = max_open_time(max_timeout, self._base_timeout)

        self._clock = clock_or_default(clock)

        self._listeners: tuple[ListenerEntry, ...] = listener_entries(listeners)

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

    # -- the call protocol ------------------------------------------------------------------

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

    def _acquire(self) -> bool:
        state = self._state
        if state in PERMIT_ALL:  # changed while we waited for the lock
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

    # -- transitions ------------------------------------------------------------------------

    def _enter(self, to_state: CircuitState) -> None:
        self._fold()  # deferred successes belong to the state being left
        self._state = to_state
        self._lazy = (
            to_state is _CLOSED
            and isinstance(self._window, CountWindow)
            and self._slow_after == math.inf
        )
        self._permit_all = to_state in PERMIT_ALL
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

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value})"


plain_self(CircuitBreaker)
