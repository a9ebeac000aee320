"""Fleet-wide circuit breaker: one state per breaker name, shared by every process via Redis.

``CircuitBreaker(..., store="redis://...")`` builds a :class:`SharedCircuitBreaker` (see
:mod:`._sharing` for when a store shares). It *is* a ``CircuitBreaker``: its local state is a
view of the shared one, so everything that reads a breaker (drivers, telemetry, ``state``,
``retry_after()``) works unchanged, and when Redis is unreachable that same local state simply
carries on as the plain in-process breaker.

Who decides what, and how often Redis is consulted:

- **Closed, happy path: never.** ``can_execute()`` is the same single attribute read as the
  local breaker's, and ``record_success()`` the same lock-free count. The link thread pushes the
  counted successes every ``sync_interval`` (default 0.1 s) in one script call that also
  returns the shared state, which the process adopts. Measured by ``benchmarks/state.py``: no
  per-call cost over the local breaker; the round trip per interval costs the link thread
  ~0.1-0.2 ms (1-2 % of a core for 10 breakers at the default interval), and Redis one short
  script per breaker, process and interval, whether or not calls were made.
- **Failures: every one, synchronously.** Counting (consecutive or rate window) and tripping run
  atomically in one script, carrying this process's successes since its last contact, so the
  breaker opens exactly at the configured total across the fleet, and the process whose
  failure tripped it sees OPEN before its next call.
- **Half-open: every probe.** When the open time has passed, ``can_execute()`` asks Redis for a
  permit; at most ``half_open_max_calls`` are granted fleet-wide. A permit is a lease (the
  current open time, at least 1 s): a prober that crashed holds it no longer. A refused process
  asks again only after ``sync_interval``. Probe outcomes are recorded synchronously.
- **Manual modes** (``force_open()``, ``disable()``, ``metrics_only()``, ``reset()``) are
  fleet-wide too, and so is ``probe_now()``: the fleet's breaker goes half-open, and its
  probe permits go to whichever processes ask first (one made while Redis is unreachable
  reaches the fleet at the resync).

The asyncio drivers call the same methods, so on a failure or a probe the event loop waits
for that one round trip (~0.1-0.2 ms on loopback, never more than
:data:`~._shared_exchange.DECISION_TIMEOUT` when Redis stops answering, however many callers
wait: see "The decision bound" in :mod:`._shared_exchange`); the happy path never waits.

**Staleness bound.** A process acts on shared state at most ``sync_interval`` plus one round
trip old (plus the link thread's scheduling delay on a busy host), idle or not. Its own
failures are never stale: each one's reply carries the current state, so after the fleet
opened the breaker a process sends at most one more failing call per concurrent caller before
it rejects too. "Opened together" therefore means: every process rejects within
``sync_interval`` (+ one round trip) of the trip; the 4-process test measures it (typically
35-95 ms at the default 0.1 s).

How the local view follows Redis, the ordering of outcomes across processes, times, and
what happens during an outage: :mod:`._shared_view`.
"""

from __future__ import annotations

import dataclasses

from otel_recovery.policies._probe_permits import grant, new_period, take
from otel_recovery.policies.circuit_breaker import BreakerSnapshot, CircuitState
from otel_recovery.stores import _shared_lua as lua
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._pushes import UnansweredPushError
from otel_recovery.stores._shared_view import SharedBreakerView

__all__ = ["SharedCircuitBreaker"]

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED
_METRICS_ONLY = CircuitState.METRICS_ONLY
_MAX_OPEN = 1e12  # Lua cannot take "inf"


class SharedCircuitBreaker(SharedBreakerView):
    """A :class:`CircuitBreaker` whose state is shared through Redis; see the module doc."""

    __slots__ = ()

    # -- the call protocol -------------------------------------------------------------------

    def can_execute(self) -> bool:
        if self._permit_all:
            return True
        if not self._remote:
            return super().can_execute()
        state, now = self._state, self._clock.now()
        with self._lock:
            # Threads of this process ask Redis side by side, as many as could still be
            # granted a permit (one at a time refused the rest of a burst: 1 probe of 3),
            # and no more, so a stalled Redis keeps at most that many callers waiting.
            if (
                state is _FORCED_OPEN
                or (state is _OPEN and now < self._open_until)
                or (state is _HALF_OPEN and now < self._next_ask)
                or self._asking + self._held(now) >= self._half_open_max
            ):
                self._not_permitted += 1
                return False
            self._asking += 1
        try:
            permit = f"{self._id}{next(self._permit_ids)}"
            lease = self._lease()
            args = [*self._head(), permit, self._half_open_max, repr(lease)]
            with self._link.turn(self._talk, self):
                granted = self._adopt(self._link.run(lua.ACQUIRE, self._keys, args))
                with self._lock:
                    if not granted:
                        self._not_permitted += 1
                        self._next_ask = now + self._sync_every
                    elif self._state is _HALF_OPEN:
                        ticket = new_period()
                        # Redis's lease on it ends at now + lease, whatever comes later
                        self._permits[ticket] = (permit, self._gen, now + lease)
                        grant(self._serial, ticket)  # held by this context (_probe_permits)
        except StoreUnavailableError as error:
            self._link.degrade(error)
            return super().can_execute()
        finally:
            with self._lock:
                self._asking -= 1
        if self._pending:
            self._dispatch()
        return granted

    def _held(self, now: float) -> int:
        """The probe permits this process holds whose lease Redis still keeps (lock held or
        not: a read of a copy). Each counts until its own lease runs out: Redis grants it
        again then, and a holder that never reported must not keep this process from asking
        (its late report still goes to Redis: the permit stays in ``_permits``)."""
        return sum(1 for _, _, ends in list(self._permits.values()) if now < ends)

    def _lease(self) -> float:
        """How long Redis keeps a probe permit whose holder has not reported."""
        return max(1.0, self._current_timeout)

    def would_refuse(self) -> bool:
        """As :meth:`can_execute` would answer before asking Redis: refused while open, and in
        half-open while this member holds every probe permit or Redis just refused it one; a
        member that may still ask Redis is not refused (its check goes through the breaker,
        and a refusal from Redis comes back as our ``CircuitOpenError``)."""
        if self._permit_all:
            return False
        if not self._remote:
            return super().would_refuse()
        state, now = self._state, self._clock.now()
        return (
            state is _FORCED_OPEN
            or (state is _OPEN and now < self._open_until)
            or (
                state is _HALF_OPEN
                and (now < self._next_ask or self._held(now) >= self._half_open_max)
            )
        )

    def record_success(self, duration: float | None = None) -> None:
        if self._fast_record:  # closed, consecutive mode: exactly the local fast path
            next(self._fast_successes)
            if self._consecutive_failures:
                self._consecutive_failures = 0
            return
        if not self._remote:
            super().record_success(duration)
            return
        state = self._state
        slow = duration is not None and duration >= self._slow_after
        if state is _CLOSED or state is _METRICS_ONLY:
            next(self._fast_successes)  # pushed by the link thread with the next contact
            if slow:
                next(self._slow_oks)
        elif state is _HALF_OPEN and self._permits:
            self._probe_done("slow" if slow else "ok", duration)
        elif state is not _DISABLED:
            with self._lock:
                self._successful_calls += 1

    def record_failure(self, duration: float | None = None) -> None:
        if not self._remote:
            super().record_failure(duration)
            return
        state = self._state
        slow = int(duration is not None and duration >= self._slow_after)
        if state is _CLOSED or state is _METRICS_ONLY:
            try:
                self._contact(fail=1, slow=slow)
            except StoreUnavailableError as error:
                self._link.degrade(error)
                super().record_failure(duration)  # the local breaker counts it instead
                if isinstance(error, UnansweredPushError):  # and the resync sends it again, once
                    self._hand_over(error.doubt)
                return
            with self._lock:
                self._failed_calls += 1
        elif state is _HALF_OPEN and self._permits:
            self._probe_done("fail", duration)
        elif state is not _DISABLED:
            with self._lock:
                self._failed_calls += 1

    def release(self) -> None:
        if self._permit_all:
            return
        if not self._remote:
            super().release()
        elif self._state is _HALF_OPEN and self._permits:
            self._probe_done("release", None)

    def _probe_done(self, outcome: str, duration: float | None) -> None:
        """A call ended in half-open: a probe if the calling context holds one of this
        member's permits (reported to Redis), else a call admitted before the half-open
        period, which counts only in the cumulative counters (``_probe_permits``)."""
        with self._lock:
            permits = self._permits
            ticket = take(self._serial, permits.__contains__) if permits else None
            if ticket is None:
                if outcome == "fail":
                    self._failed_calls += 1
                elif outcome != "release":
                    self._successful_calls += 1
                return
            permit, gen, _ = permits.pop(ticket)
        args = [
            *self._head(), permit, gen or "", outcome, self._success_threshold,
            repr(self._timeout_multiplier), repr(min(self._max_timeout, _MAX_OPEN)),
        ]  # fmt: skip
        try:
            with self._link.turn(self._talk, self):
                self._adopt(self._link.run(lua.PROBE, self._keys, args))
        except StoreUnavailableError as error:
            self._link.degrade(error)
            self.carry(ticket)  # Redis did not take the report: the local breaker decides
            if outcome == "release":
                super().release()
            elif outcome == "fail":
                super().record_failure(duration)
            else:
                super().record_success(duration)
            return
        with self._lock:
            if outcome == "fail":
                self._failed_calls += 1
            elif outcome != "release":
                self._successful_calls += 1
        if self._pending:
            self._dispatch()

    # -- manual modes, fleet-wide ---------------------------------------------------------------

    def _manual(self, to_state: CircuitState, reason: str) -> None:
        if not self._shared_manual(to_state, reason):
            super()._manual(to_state, reason)

    def reset(self) -> None:
        if not self._shared_manual(_CLOSED, "reset"):
            super().reset()
        else:
            with self._lock:  # the local view's own counters and windows start afresh too
                if self._window is not None:
                    self._window.clear()

    def probe_now(self, reason: str = "probe_now") -> bool:
        """Fleet-wide: the shared breaker goes half-open if it is open (one script). While
        Redis is unreachable, the local breaker's open time ends instead, and the signal is
        kept for the resync, which applies it to the shared breaker unless the local one is
        open again by then (its probe failed: the resync pushes that instead)."""
        if not self._remote:
            return self._local_probe_now(reason)
        try:
            with self._link.turn(self._talk, self):
                args = [*self._head(), reason]
                moved = self._adopt(self._link.run(lua.PROBE_NOW, self._keys, args))
        except StoreUnavailableError as error:
            self._link.degrade(error)
            return self._local_probe_now(reason)
        if self._pending:
            self._dispatch()
        return moved

    def _local_probe_now(self, reason: str) -> bool:
        with self._lock:
            self._pending_probe = reason  # for the resync (_shared_view)
        return super().probe_now(reason)

    def _shared_manual(self, to_state: CircuitState, reason: str) -> bool:
        """Apply a manual mode fleet-wide; False when degraded (applied locally, pushed later)."""
        if self._remote:
            try:
                with self._link.turn(self._talk, self):
                    args = [*self._head(), to_state.value, reason]
                    self._adopt(self._link.run(lua.MANUAL, self._keys, args))
            except StoreUnavailableError as error:
                self._link.degrade(error)
            else:
                if self._pending:
                    self._dispatch()
                return True
        self._pending_manual = to_state
        return False

    # -- reading -------------------------------------------------------------------------------

    @property
    def failure_count(self) -> int:
        if self._remote and self._window is not None:
            return self._shared_window[1]
        return super().failure_count

    def snapshot(self) -> BreakerSnapshot:
        """As the local breaker's, with the fleet's rate window while state is shared.

        The ``*_calls`` counters stay this process's own: metrics add them up across processes.
        """
        snap = super().snapshot()
        if not self._remote or self._window is None:
            return snap
        calls, failures, slows = self._shared_window
        enough = calls >= self._minimum_calls and calls > 0
        return dataclasses.replace(
            snap,
            buffered_calls=calls,
            failure_rate=failures / calls if enough else None,
            slow_call_rate=slows / calls if enough else None,
        )

    def __repr__(self) -> str:
        mode = "shared" if self._remote else "local (store unreachable)"
        return (
            f"CircuitBreaker(name={self.name!r}, state={self._state.value}, "
            f"store={self._link.url!r}, {mode})"
        )
