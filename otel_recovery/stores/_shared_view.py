"""The local view of a fleet-wide breaker: how it follows Redis, and survives without it.

:class:`SharedBreakerView` holds everything a :class:`~._shared_breaker.SharedCircuitBreaker`
knows about the shared state and the one way it talks to Redis: an exchange that pushes what
this process counted since its last contact and adopts the state in the reply (a new
generation number means a transition happened; the local breaker then transitions too, which
fires its listeners). The decisions built on it live in :mod:`._shared_breaker`.

**Ordering.** Successes are pushed in batches; a batch clears the consecutive failures the
process had seen at its last contact, not failures that reached Redis since. Within one sync
interval, a success here and a failure elsewhere may thus count in either order (a rate
window is exact up to that lag as well; a count window holding fewer calls than a few sync
intervals of fleet traffic is approximate: a batch straddling its edge is trimmed
proportionally). Listeners fire in each process when it *observes* a new state, with the reason
recorded in Redis; intermediate states it never saw (open, half-open, open again between two
syncs) fire nothing. Every process must configure a given name identically: thresholds travel
with each call, so tuning (:meth:`tune`) stays per process.

**Time.** Open-until and permit leases are wall-clock times written by the callers
(``clock.wall()``), which lets a FakeClock drive the shared state in tests. Hosts must agree
to well within the open time (NTP gives milliseconds); a skew of *s* seconds moves a host's
first probe by *s*, and probes stay limited fleet-wide regardless.

**Degradation and resync** (outage handling in :mod:`._shared_outage`): while Redis is
unreachable the breaker is the local breaker, starting from the last shared view (held
permits become local probes; a rate window starts empty). Resync pushes what happened locally
before adopting the shared state again: the failures counted since the outage (the trailing
consecutive run, or the local window), and, if this process opened its breaker meanwhile and
it is still open, the open state itself with its remaining time (reason ``local_trip``) unless
the shared breaker is already open; a manual mode set meanwhile is applied fleet-wide, and so
is a ``probe_now()`` signal (the shared breaker's open time ends) unless this process's
breaker is open again by then. A push that got no reply (Redis slow, not down) may have been
applied: the resync first sends it again under its number (:mod:`._pushes`), and leaves out
of the rest what it carried.
"""

from __future__ import annotations

import itertools
import math
import uuid
from typing import Any

from otel_recovery._clock import SYSTEM_CLOCK, Duration, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery.policies._counting import peek
from otel_recovery.policies._probe_permits import grant, take
from otel_recovery.policies._windows import OutcomeWindow, TimeWindow
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitState
from otel_recovery.stores import _shared_lua as lua
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._pushes import REMEMBERED_MS, Doubt, Pushes, UnansweredPushError
from otel_recovery.stores._shared_link import KEEP_MS, Link, link_for
from otel_recovery.stores._sharing import shared_store

__all__ = ["SharedBreakerView"]

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED
_METRICS_ONLY = CircuitState.METRICS_ONLY
_MANUAL_REASONS = {
    _CLOSED: "reset",
    _FORCED_OPEN: "force_open",
    _DISABLED: "disable",
    _METRICS_ONLY: "metrics_only",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedBreakerView(CircuitBreaker):
    """The shared state as this process last saw it, and the exchanges that refresh it."""

    __slots__ = (
        "_asking",
        "_carried",
        "_cf_base",
        "_failed_base",
        "_gen",
        "_handed",
        "_id",
        "_keys",
        "_link",
        "_next_ask",
        "_next_sync",
        "_ok_base",
        "_ok_sent",
        "_pending_manual",
        "_pending_probe",
        "_permit_ids",
        "_permits",
        "_pushes",
        "_remote",
        "_seen_fseq",
        "_shared_window",
        "_slow_oks",
        "_slow_sent",
        "_store",
        "_sync_every",
        "_talk",
    )

    def __init__(
        self, *args: Any, store: Any = None, sync_interval: Duration = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(*args, store=store, sync_interval=sync_interval, **kwargs)
        found = shared_store(store, self.name)
        if found is None:  # pragma: no cover - CircuitBreaker.__new__ checked this already
            raise TypeError("SharedCircuitBreaker needs a Redis store")
        self._store = found  # held here: the link holds it weakly (see _shared_link)
        self._link: Link = link_for(found)
        self._keys = tuple(found.key(kind, self.name) for kind in ("cb", "cbw", "cbp"))
        self._sync_every = to_seconds(sync_interval, "sync_interval")
        self._talk = new_lock()  # one exchange with Redis at a time, replies in order
        # permit requests to Redis in flight from this process: with the permits it holds,
        # never more than half_open_max_calls (see SharedCircuitBreaker.can_execute)
        self._asking = 0
        self._remote = True
        self._gen: str | None = None
        self._seen_fseq = 0
        self._ok_sent = 0
        self._slow_oks = itertools.count()
        self._slow_sent = 0
        # ticket -> (permit, generation, when Redis's lease on it ends: self._clock.now() time)
        self._permits: dict[int, tuple[str, str | None, float]] = {}
        self._carried: set[int] = set()  # tickets of Redis's permits, now the local breaker's
        self._permit_ids = itertools.count()
        self._id = uuid.uuid4().hex[:12] + ":"
        self._next_ask = -math.inf
        self._next_sync = 0.0
        self._shared_window = (0, 0, 0)
        self._pending_manual: CircuitState | None = None
        self._pending_probe: str | None = None  # a probe_now() reason, while degraded
        self._cf_base = 0
        self._ok_base = 0
        self._failed_base = 0
        self._pushes = Pushes(found, "cbq", self.name)
        # per push in doubt of this outage: (failures, slow calls, successes, when the
        # window no longer holds them); see _hand_over
        self._handed: list[tuple[int, int, int, float]] = []
        self._link.join(self)

    # -- what the link sees ---------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"circuit_breaker {self.name}"

    @property
    def sync_interval(self) -> float:
        return self._sync_every

    @property
    def shared(self) -> bool:
        """True while decisions use the shared state; False while degraded to local state."""
        return self._remote

    @property
    def degraded(self) -> bool:
        return not self._remote

    def sync_due(self, now: float) -> bool:
        # Idle breakers sync too: listeners and the state metric must follow the fleet even
        # in a process that makes no calls, and it keeps the staleness bound unconditional.
        return now >= self._next_sync

    def sync_now(self) -> None:
        self._contact(due_only=True)

    def sync(self) -> bool:
        """Exchange with Redis now (push counts, adopt the shared state); False if degraded."""
        if not self._remote:
            return False
        try:
            self._contact()
        except StoreUnavailableError as error:
            self._link.degrade(error)
            return False
        return True

    # -- talking to Redis ----------------------------------------------------------------------

    def _head(self) -> list[Any]:
        return [repr(self._clock.wall()), repr(self._base_timeout), KEEP_MS]

    def _record_args(
        self, ok: int, fail: int, slow: int, open_for: float | None, reason: str
    ) -> list[Any]:
        window = self._window
        rate: list[Any]
        if window is None:
            mode, rate = "c", ["", "", "", "", ""]
        else:
            kind = "time" if isinstance(window, TimeWindow) else "count"
            rate = [
                repr(self._rate_threshold),
                repr(self._slow_rate_threshold),
                self._minimum_calls,
                kind,
                window._size,
            ]
            mode = "r"
        pushed = "" if open_for is None else repr(open_for)
        return [
            *self._head(), mode, self._failure_threshold, ok, self._seen_fseq, fail, slow,
            *rate, pushed, reason,
        ]  # fmt: skip

    def _contact(
        self, fail: int = 0, slow: int = 0, ok: int = 0, open_for: float | None = None,
        reason: str = "", due_only: bool = False, resync: bool = False,
    ) -> None:  # fmt: skip
        """Push what was counted since the last contact (plus a failure), adopt the reply.

        ``due_only``: the link thread's periodic sync, skipped if a caller's exchange made
        it unnecessary while the thread waited for the lock. ``resync``: the push that ends an
        outage, made while the view is still local.
        """
        with self._link.turn(self._talk, None if resync else self):
            if due_only and SYSTEM_CLOCK.now() < self._next_sync:
                return
            ok_total, slow_total = peek(self._fast_successes), peek(self._slow_oks)
            sent = (ok + ok_total - self._ok_sent, fail, slow + slow_total - self._slow_sent)
            # the batched successes are this push's now, whether it is answered or in doubt
            self._ok_sent, self._slow_sent = ok_total, slow_total
            self._push(self._pushes.number(), sent, (fail, slow, ok), open_for, reason)
            self._next_sync = SYSTEM_CLOCK.now() + self._sync_every
        if self._pending:
            self._dispatch()

    def _push(
        self, number: int, sent: tuple[int, ...], own: tuple[int, ...],
        open_for: float | None = None, reason: str = "", adopt: bool = True,
    ) -> None:  # fmt: skip
        """One numbered push of ``sent`` (successes, failures, slow calls; turn held), and
        the reply adopted (with ``adopt=False``, the resync's resend of a push in doubt, only
        the failures it has seen: the view stays local until the resync's own push). No
        reply makes it the push in doubt (``own``: the counts of it that are recorded
        locally too), raised as :class:`~._pushes.UnansweredPushError`."""
        ok, fail, slow = sent
        args = [*self._record_args(ok, fail, slow, open_for, reason), number, REMEMBERED_MS]
        try:
            reply = self._link.run(lua.RECORD, (*self._keys, self._pushes.key), args)
        except StoreUnavailableError as error:
            raise self._pushes.in_doubt(error, number, sent, own) from (error.__cause__ or error)
        if adopt:
            self._adopt(reply)
            return
        try:
            seen = int(float(_text(reply[7])))
        except (ValueError, TypeError, IndexError) as bad:
            raise self._unreadable(bad) from bad
        with self._lock:
            self._seen_fseq = seen

    def _unreadable(self, bad: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"Redis store {self._link.url}: shared state of breaker {self.name!r} is "
            f"unreadable ({bad})"
        )

    def _hand_over(self, doubt: Doubt) -> None:
        """What a push in doubt carried of the counts also recorded locally is no longer
        owed by the resync, which sends that push again instead. They are the oldest in the
        local window: they leave it ``size`` outcomes (a count window) or seconds (a time
        window) after the newest of them (taken as the newest the window holds now), or
        when a transition clears it."""
        with self._lock:
            own = doubt.hand_over()
            if own is None:
                return
            # they are the window's oldest, and leave it with the newest outcome it holds
            window, until = self._window, math.inf
            if isinstance(window, TimeWindow):
                newest = window.newest_second()
                until = -math.inf if newest is None else newest + window._size
            elif window is not None:
                until = window.recorded + window._size
            self._handed.append((own[0], own[1], own[2], until))

    def _handed_in(self, window: OutcomeWindow | None) -> tuple[int, int, int]:
        """The handed counts the window still holds (lock held; all of them without a
        window): each push's leave together, with the newest of them."""
        if window is None:
            position = -math.inf
        elif isinstance(window, TimeWindow):
            position = self._clock.now()
        else:
            position = window.recorded
        held = [entry for entry in self._handed if position < entry[3]]
        return (
            sum(entry[0] for entry in held),
            sum(entry[1] for entry in held),
            sum(entry[2] for entry in held),
        )

    def _adopt(self, reply: Any) -> bool:
        """Make the local view the shared state in ``reply``; True if a permit was granted."""
        try:
            granted = int(reply[0]) == 1
            st, until, to, gen, why, cf, fseq, wc, wf, ws = (_text(v) for v in reply[1:11])
            state = CircuitState(st)
            timeout, counts = float(to), (int(float(wc)), int(float(wf)), int(float(ws)))
            open_until = float(until) if until else None
            failures, seen = int(float(cf)), int(float(fseq))
        except (ValueError, TypeError, IndexError) as bad:
            raise self._unreadable(bad) from bad
        with self._lock:
            now = self._clock.now()
            self._seen_fseq = seen
            self._shared_window = counts
            if gen != self._gen:
                self._gen = gen
                self._permits.clear()  # permits belong to a generation
                self._next_ask = -math.inf  # and so do refusals: ask in the new one at once
            # While shared, the local state only ever changes here; after an outage it may
            # differ from Redis under an unchanged generation (or a restarted counter).
            if state is not self._state:
                self._transition(state, why or "sync", now)
            self._current_timeout = timeout
            if state is _OPEN and open_until is not None:
                self._open_until = now + max(0.0, open_until - self._clock.wall())
            if self._window is None and (state is _CLOSED or state is _METRICS_ONLY):
                self._consecutive_failures = failures
        return granted

    # -- fork ----------------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child (its locks, ``_talk`` included, which the sync thread holds for
        a whole Redis round trip, are already free: ``_forksafe``): permit ids must not
        repeat the parent's or a sibling's (Redis would count their leases as one); permits
        held and successes not yet pushed are the parent's, which reports them. So are the
        outcomes of an outage in progress (each child pushed them again at the resync: 3
        failures opened a threshold-5 circuit), and a probe request a parent thread was
        waiting on (no thread here will ever take it back: the child refused every call)."""
        self._id = uuid.uuid4().hex[:12] + ":"
        self._pushes.restart()
        self._permits.clear()
        self._ok_sent = peek(self._fast_successes)
        self._slow_sent = peek(self._slow_oks)
        self._asking = 0
        if not self._remote:  # an outage: what was counted so far is the parent's to push
            self._owe_nothing_yet()

    # -- outage --------------------------------------------------------------------------------

    def go_local(self) -> None:
        with self._lock:
            if not self._remote:
                return
            self._remote = False
            # Probes out on permits from Redis stay probes of the local half-open breaker:
            # their holders' outcomes decide it, and nobody joins them before the lease.
            # Permits Redis had already let go (their holders never reported) are no probes.
            half_open, now = self._state is _HALF_OPEN, self._clock.now()
            self._carried = (
                {ticket for ticket, (_, _, ends) in self._permits.items() if now < ends}
                if half_open
                else set()
            )
            self._in_flight = len(self._carried)
            if self._carried:
                self._probe_granted_at = now
            self._permits.clear()
            self._probe_successes = 0
            self._owe_nothing_yet()

    def _owe_nothing_yet(self) -> None:
        """From here on, count what the next resync pushes (lock held, or a forked child's
        own): an outage's start, or a child's, whose parent pushes what came before."""
        if self._window is not None:
            self._window.clear()
        self._cf_base = self._consecutive_failures
        self._ok_base = peek(self._fast_successes)
        self._failed_base = self._failed_calls
        self._handed = []
        self._pending_manual = None
        self._pending_probe = None

    def _take_probe(self) -> int | None:
        """As the local breaker's, also taking a permit carried over from Redis."""
        carried = self._carried
        if not carried:
            return super()._take_probe()
        period = self._period
        ticket = take(self._serial, lambda held: held == period or held in carried)
        if ticket is not None:
            carried.discard(ticket)
        return ticket

    def carry(self, ticket: int) -> None:
        """A probe whose report Redis did not take: the local breaker decides on it (lock
        held by the caller or not needed: the member is local now)."""
        with self._lock:
            if self._state is _HALF_OPEN and not self._remote:
                self._carried.add(ticket)
                self._in_flight += 1
                grant(self._serial, ticket)

    def _enter(self, to_state: CircuitState) -> None:
        super()._enter(to_state)
        self._carried = set()  # permits of a period that is over
        if self._window is not None and to_state is not _OPEN and to_state is not _FORCED_OPEN:
            self._handed = []  # the window was cleared: it holds none of them

    def resync(self) -> None:
        """Push the outage's local outcomes, then adopt the shared state (see the module doc)."""
        doubt = self._pushes.doubt
        if doubt is not None:  # not yet handed over if its caller is still on its way
            self._hand_over(doubt)
        with self._lock:
            if self._remote:
                return
            state, manual = self._state, self._pending_manual
            # a probe_now() signal of the outage, unless the local breaker is open again
            # (its probe failed since: that open state is what the resync pushes)
            probe = self._pending_probe if manual is None and state is not _OPEN else None
            ok = fail = slow = 0
            window = self._window
            handed_failures, handed_slow, handed_ok = self._handed_in(window)
            if window is not None:
                fail, slow = window.failures - handed_failures, window.slows - handed_slow
                ok = window.calls - window.failures - handed_ok
            elif state is _CLOSED:
                quiet = peek(self._fast_successes) == self._ok_base
                run = self._consecutive_failures - (self._cf_base if quiet else 0)
                # the handed ones are the outage's first failures; the run is its last ones
                fail = min(run, self._failed_calls - self._failed_base - handed_failures)
            open_for = None
            if state is _OPEN and manual is None:
                open_for = max(0.0, self._open_until - self._clock.now())
        if doubt is not None:  # first the push that may have been applied: at most once
            with self._link.turn(self._talk):
                self._push(doubt.number, doubt.sent, doubt.own, adopt=False)
            self._pushes.doubt = None
        try:
            self._contact(
                fail=max(0, fail), slow=max(0, slow), ok=max(0, ok), open_for=open_for,
                reason="local_trip", resync=True,
            )  # fmt: skip
        except UnansweredPushError as error:
            self._hand_over(error.doubt)
            raise
        if manual is not None:
            with self._link.turn(self._talk):
                args = [*self._head(), manual.value, _MANUAL_REASONS[manual]]
                self._adopt(self._link.run(lua.MANUAL, self._keys, args))
        elif probe is not None:
            with self._link.turn(self._talk):
                args = [*self._head(), probe]
                self._adopt(self._link.run(lua.PROBE_NOW, self._keys, args))
        with self._lock:
            self._remote = True
            self._pending_manual = None
            self._pending_probe = None
        if self._pending:
            self._dispatch()
