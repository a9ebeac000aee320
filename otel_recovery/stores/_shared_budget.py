"""Fleet-wide retry budget: one allowance per budget name, shared by every process via Redis.

``RetryBudget(..., store="redis://...")`` builds a :class:`SharedRetryBudget` (see
:mod:`._sharing` for when a store shares). The rule is the local budget's, over the whole
fleet::

    retries in the last ttl s (all processes) <= ratio * calls in that window (all processes)
                                                 + min_per_second * ttl

so the floor is the *fleet's* floor, not each process's: size ``min_per_second`` for the
fleet. Redis keeps the same ring of ``ttl / 10`` buckets as the local budget, keyed by
wall-clock bucket so every process agrees on the boundaries.

- **Deposits are batched.** ``record_call()`` is exactly the local lock-free count; the link
  thread adds the calls counted since the last contact every ``sync_interval`` (default 0.1 s;
  every 10 intervals while no call came in). Each withdrawal carries this process's unsent
  deposits too, so a process always sees its own calls; other processes' calls reach the
  allowance at most one interval late, which errs on the side of fewer retries.
- **Withdrawals are atomic.** ``try_spend()`` runs one script that expires old buckets, computes
  the allowance and takes one retry only if at least one is left, so concurrent processes can
  never overdraw: retries granted fleet-wide never exceed the bound. A withdrawal is one round
  trip (~0.1-0.2 ms on loopback), paid only after a failure, before a backoff sleep.
- Granted retries are also booked in the local ring, so the local budget that takes over
  during an outage starts from this process's own recent history.

**Degradation and resync** (outage handling in :mod:`._shared_outage`): while Redis is
unreachable the budget is the local budget (ratio times this process's calls plus the full
floor: during an outage each process has a floor of its own). Resync pushes this process's
unsent calls and the retries it granted locally, each capped at what its local window still
holds (older ones have expired anyway), then uses the shared allowance again. A push that
got no reply (Redis slow, not down) may have been applied: the resync first sends it again
under its number (:mod:`._pushes`), a withdrawal in it replaced by what the local budget
decided (the retry forced in, or none), and leaves out of the rest what it carried.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any

from otel_recovery._clock import SYSTEM_CLOCK, Duration, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery.policies._counting import peek
from otel_recovery.policies.budget import BudgetSnapshot, RetryBudget
from otel_recovery.stores import _shared_lua as lua
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._pushes import REMEMBERED_MS, Doubt, Pushes, UnansweredPushError
from otel_recovery.stores._shared_link import KEEP_MS, RECONNECT_INTERVAL, Link, link_for
from otel_recovery.stores._sharing import shared_store

__all__ = ["SharedRetryBudget"]

_log = logging.getLogger("otel_recovery")

_QUIET = 10


class _OtherTtlError(Exception):
    """The budget's name is counted in Redis with another bucket width (another ``ttl``)."""

    def __init__(self, width: float) -> None:
        super().__init__(width)
        self.width = width


class SharedRetryBudget(RetryBudget):
    """A :class:`RetryBudget` whose allowance is shared through Redis; see the module doc."""

    __slots__ = (
        "__weakref__",
        "_correction",
        "_decided",
        "_handed_retries",
        "_key",
        "_last_sync",
        "_link",
        "_next_sync",
        "_outage_retries",
        "_pushes",
        "_rejoin_at",
        "_remote",
        "_sent_calls",
        "_store",
        "_sync_every",
        "_talk",
        "_view",
        "_warned_widths",
    )

    def __init__(
        self, *args: Any, store: Any = None, sync_interval: Duration = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(*args, store=store, sync_interval=sync_interval, **kwargs)
        found = shared_store(store, self.name)
        if found is None:  # pragma: no cover - RetryBudget.__new__ checked this already
            raise TypeError("SharedRetryBudget needs a Redis store")
        self._store = found  # held here: the link holds it weakly (see _shared_link)
        self._link: Link = link_for(found)
        self._key = found.key("rb", self.name)
        self._sync_every = to_seconds(sync_interval, "sync_interval")
        self._talk = new_lock()
        self._remote = True
        self._sent_calls = 0
        self._outage_retries = itertools.count()
        self._handed_retries = 0  # of those, carried by a push in doubt
        self._pushes = Pushes(found, "rbq", self.name)
        self._decided: bool | None = None  # the local decision on a withdrawal in doubt
        self._correction = 0  # retries to force (or give back) after a first copy's decision
        self._rejoin_at: float | None = None  # apart from a fleet with another ttl until then
        self._warned_widths: set[float] = set()
        self._view = (self.min_per_second * self.ttl, 0, 0)  # available, calls, retries
        self._next_sync = 0.0
        self._last_sync = -math.inf
        self._link.join(self)

    # -- what the link sees ---------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"retry_budget {self.name}"

    @property
    def sync_interval(self) -> float:
        return self._sync_every

    @property
    def shared(self) -> bool:
        """True while the shared allowance is used; False while degraded to local state, or
        apart from a fleet that counts this name with another ttl."""
        return self._remote

    @property
    def degraded(self) -> bool:
        return not self._remote and self._rejoin_at is None

    def sync_due(self, now: float) -> bool:
        if self._rejoin_at is not None:
            return now >= self._rejoin_at
        if now < self._next_sync:
            return False
        return self.total_calls != self._sent_calls or now >= (
            self._last_sync + _QUIET * self._sync_every
        )

    def sync_now(self) -> None:
        if self._rejoin_at is not None:
            self._rejoin_at = None
            self.resync()  # parts ways again if the other ttl's buckets still live
            return
        self._exchange(spend=False, due_only=True)

    def sync(self) -> bool:
        """Push unsent deposits and read the shared allowance now; False if degraded, or
        apart from a fleet with another ttl."""
        if not self._remote:
            return False
        try:
            self._exchange(spend=False)
        except StoreUnavailableError as error:
            self._link.degrade(error)
            return False
        return self._remote

    def _exchange(
        self, *, spend: bool, cap: int | None = None, forced: int = 0, due_only: bool = False,
        resync: bool = False,
    ) -> bool:  # fmt: skip
        """One atomic deposit (+ withdrawal) against the shared allowance.

        ``due_only``: the link thread's periodic flush, skipped if a withdrawal carried the
        deposits while the thread waited for the lock. ``resync``: the push that ends an
        outage, made while the budget is still local.
        """
        with self._link.turn(self._talk, None if resync else self):
            if due_only and SYSTEM_CLOCK.now() < self._next_sync:
                return False
            if self._rejoin_at is not None and not resync:
                return False  # parted ways while this one waited for its turn: local now
            total = self.total_calls
            deposits = total - self._sent_calls
            if cap is not None:
                deposits = min(deposits, cap)
            self._sent_calls = total  # this push's now, whether answered or in doubt
            sent = (max(0, deposits), 1 if spend else 0, forced)
            try:
                granted, _ = self._push(self._pushes.number(), sent)
            except _OtherTtlError as error:
                self._sent_calls -= sent[0]  # not counted: owed when this budget rejoins
                other = error
            else:
                now = SYSTEM_CLOCK.now()
                self._last_sync, self._next_sync = now, now + self._sync_every
                return granted
        self._part_ways(other.width)  # outside the turn: it logs, which runs user handlers
        return False

    def _push(self, number: int, sent: tuple[int, ...]) -> tuple[bool, bool | None]:
        """One numbered push of ``sent`` (deposits, 1 to withdraw, retries to force; turn
        held), the reply read into the view: whether it withdrew a retry, and for a push
        Redis had applied before (a resend, which only reads), whether that first copy's
        withdrawal was granted (None for a push applied now). No reply makes it the push in
        doubt, raised as :class:`~._pushes.UnansweredPushError` (the forced retries are its
        own counts)."""
        deposits, spend, forced = sent
        args = [
            repr(self.clock.wall()),
            repr(self._width),
            repr(self.ratio),
            repr(self.min_per_second * self.ttl),
            deposits,
            spend,
            forced,
            KEEP_MS,
            number,
            REMEMBERED_MS,
        ]
        try:
            reply = self._link.run(lua.BUDGET, [self._key, self._pushes.key], args)
        except StoreUnavailableError as error:
            doubt = self._pushes.in_doubt(error, number, sent, (forced,))
            raise doubt from (error.__cause__ or error)
        try:
            if _text(reply[4]):
                raise _OtherTtlError(float(_text(reply[4])))
            first = int(reply[5])
            granted = int(reply[0]) == 1
            calls, retries = int(reply[1]), int(reply[2])
            allowance = float(_text(reply[3]))
        except (ValueError, TypeError, IndexError, AttributeError) as bad:
            raise StoreUnavailableError(
                f"Redis store {self._link.url}: shared state of retry budget {self.name!r} "
                f"is unreadable ({bad})"
            ) from bad
        self._view = (max(0.0, allowance), calls, retries)
        return granted, None if first < 0 else first == 1

    def _part_ways(self, width: float) -> None:
        """Redis counts this name with another ttl, and those counts are live: mixing the
        two rings would corrupt both, so this process keeps a budget of its own (as in an
        outage) and asks again every bucket width (at least every second); the name is
        this ttl's once the other one's buckets have all expired."""
        with self._lock:
            if self._remote:
                self._remote = False
                self._outage_retries = itertools.count()
                self._handed_retries = 0
            self._rejoin_at = SYSTEM_CLOCK.now() + max(RECONNECT_INTERVAL, self._width)
            first = width not in self._warned_widths
            self._warned_widths.add(width)
        if first:
            _log.warning(
                "otel_recovery: retry budget %r is shared through %s by processes whose ttl is "
                "%g s, and its ttl here is %g s: this process keeps a budget of its own until "
                "their counts expire. Give every process the same ttl for one budget name, or "
                "give this budget another name.",
                self.name,
                self._link.url,
                width * 10,
                self.ttl,
            )

    # -- the budget protocol ----------------------------------------------------------------

    def try_spend(self, now: float | None = None) -> bool:
        if now is None:
            now = self.clock.now()
        doubt: Doubt | None = None
        if self._remote:
            try:
                granted = self._exchange(spend=True)
            except UnansweredPushError as error:
                self._link.degrade(error)
                doubt = error.doubt
            except StoreUnavailableError as error:
                self._link.degrade(error)
            else:
                if self._remote:  # else apart from a fleet with another ttl: decided below
                    with self._lock:
                        index = self._rotate(now)
                        if granted:
                            self._retries[index] += 1
                            self._sum_retries += 1
                            self.total_retries += 1
                        else:
                            self.total_refused += 1
                    return granted
        granted = super().try_spend(now)
        if doubt is not None and self._decided_in(doubt, granted):
            return granted
        if granted:
            next(self._outage_retries)
        return granted

    def _decided_in(self, doubt: Doubt, granted: bool) -> bool:
        """A withdrawal whose push is in doubt, decided locally: the resync sends that push
        again with this decision in it (the retry forced, or no withdrawal), so Redis
        counts the retry once, whichever copy it applies. False if the resync took the
        push as it was (it came first)."""
        with self._lock:
            if doubt.hand_over() is None:
                return False
            deposits, _, forced = doubt.sent
            doubt.sent = (deposits, 0, forced + int(granted))
            self._decided = granted
            return True

    def snapshot(self, now: float | None = None) -> BudgetSnapshot:
        """As the local budget's, with the fleet's window as of the last contact while shared.

        The ``total_*`` counters stay this process's own.
        """
        snap = super().snapshot(now)
        if not self._remote:
            return snap
        available, calls, retries = self._view
        return dataclasses.replace(
            snap, available=available, calls_in_window=calls, retries_in_window=retries
        )

    # -- fork ----------------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child (its locks are already free: ``_forksafe``): deposits not yet
        pushed are the parent's, which pushes them, and so are the retries granted locally
        during an outage in progress (each child pushed them again at the resync)."""
        self._sent_calls = self.total_calls
        self._outage_retries = itertools.count()
        self._handed_retries = 0
        self._pushes.restart()
        self._decided = None
        self._correction = 0

    # -- outage --------------------------------------------------------------------------------

    def go_local(self) -> None:
        with self._lock:
            if self._remote:
                self._remote = False
                self._outage_retries = itertools.count()
                self._handed_retries = 0

    def resync(self) -> None:
        """Push the outage's calls and locally granted retries (within ttl), then share again."""
        with self._lock:
            if self._remote or self._rejoin_at is not None:  # apart: sync_now asks again
                return
            self._rotate(self.clock.now())
            cap = self._calls_in_window()
            owed = peek(self._outage_retries) - self._handed_retries
            owed = max(0, min(owed, self._sum_retries))
            doubt = self._pushes.doubt
            if doubt is not None:
                doubt.hand_over()  # as it stands, if its withdrawal has not been decided yet
                # a resend that was never applied counts only what the window still holds,
                # after the newer calls and retries the resync's own push carries
                deposits, spend, forced = doubt.sent
                newer = min(self.total_calls - self._sent_calls, cap)
                resend = (
                    max(0, min(deposits, cap - newer)),
                    spend,
                    max(0, min(forced, self._sum_retries - owed)),
                )
        if doubt is not None:  # first the push that may have been applied: at most once
            try:
                with self._link.turn(self._talk):
                    _, first = self._push(doubt.number, resend)
            except _OtherTtlError as other:  # refused whole: sent again when this one rejoins
                self._part_ways(other.width)
                return
            self._pushes.doubt = None
            decided, self._decided = self._decided, None
            if first is not None and decided and not first:
                # Redis applied the first copy and refused its withdrawal, but the retry
                # went out here: forced in (within the local ring). One Redis granted that
                # never went out stays counted: its bucket may be gone by now, and a give-back
                # in the current bucket would lift the fleet's bound until it expires.
                self._correction = 1
        forced = min(owed + self._correction, max(owed, self._sum_retries))
        try:
            self._exchange(spend=False, cap=cap, forced=forced, resync=True)
        except UnansweredPushError as error:
            with self._lock:
                if error.doubt.hand_over() is not None:
                    self._handed_retries += owed
                    self._correction = 0  # carried by the push in doubt
            raise
        if self._rejoin_at is None:  # else: parted ways, the correction is still owed
            self._correction = 0
        with self._lock:
            if self._rejoin_at is None:  # else: still apart (another ttl's counts live)
                self._remote = True

    def __repr__(self) -> str:
        if self._remote:
            mode = "shared"
        elif self._rejoin_at is not None:
            mode = "local (the fleet counts this name with another ttl)"
        else:
            mode = "local (store unreachable)"
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"ttl={self.ttl}, name={self.name!r}, store={self._link.url!r}, {mode})"
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
