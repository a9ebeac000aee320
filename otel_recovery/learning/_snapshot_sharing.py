"""A learner's share of a stored snapshot: what it owes its store, and paying it once.

:class:`~otel_recovery.learning.StrategyLearner` decides and learns; this module keeps the
bookkeeping that lets any number of learners (replicas, a pre-fork server's workers) share
one stored snapshot without an observation reaching it twice or never:

- ``pending``: the evidence learned since the last save, which the next save adds to the
  store's snapshot (:func:`._snapshot_merge.merge_snapshot` takes in what the others saved
  meanwhile);
- ``writer`` and ``seq``: who saves and which of its saves this is, so a later save can tell
  whether a save that *raised* had landed after all (a timeout after the commit): that save's
  evidence waits apart in ``unsure`` and is owed again only if it had not;
- ``foreign``: a forked child's copy of its parent's debt, which the parent pays, not the child.

Saves run every ``save_interval`` from the learner's ``record()`` (skipped while another save
runs, never raising into the caller: a failed save is logged once per kind of error and its
evidence kept for the next one), on ``flush()`` (raising what the store raised), and once at
interpreter exit for every learner that still owes something.
"""

from __future__ import annotations

import atexit
import copy
import logging
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery.learning._snapshot_format import NewerSnapshotError, fit_snapshot
from otel_recovery.learning._snapshot_merge import (
    Foreign,
    Merged,
    Pending,
    copy_state,
    merge_snapshot,
)
from otel_recovery.learning._stats import DecayedMoments, DelaySamples
from otel_recovery.learning.store import LearnerStore

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["SnapshotSharing"]

_log = logging.getLogger("otel_recovery")

_WITH_STORES: weakref.WeakSet[StrategyLearner] = weakref.WeakSet()


@atexit.register
def _save_before_exit() -> None:
    """What a learner learned since its last save (up to ``save_interval`` of it) would die
    with the process: save it on the way out, quietly, as the periodic save does."""
    for learner in list(_WITH_STORES):
        sharing = learner._sharing
        if sharing is not None and sharing.owes:  # nothing owed: no round trip at exit
            sharing.save_quietly(learner, action="save at exit")


class SnapshotSharing:
    """One learner's debt to its store; every method that reads or changes ``pending``
    runs under the learner's lock, and every save under :attr:`lock` (one at a time)."""

    __slots__ = (
        "__weakref__",
        "foreign",
        "interval",
        "lock",
        "pending",
        "reported",
        "saved_at",
        "seq",
        "store",
        "unsure",
        "writer",
    )

    def __init__(self, learner: StrategyLearner, store: LearnerStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.saved_at = learner.clock.now()
        self.pending = Pending()
        self.writer = uuid.uuid4().hex
        self.seq = 0
        self.lock = new_lock()
        self.unsure: tuple[int, Pending] | None = None  # a save that raised: did it land?
        self.foreign: Foreign | None = None  # a forked child's copy of its parent's debt
        self.reported: set[str] = set()
        _WITH_STORES.add(learner)
        reset_in_child(self)

    @property
    def owes(self) -> bool:
        """Whether a save would carry anything (new evidence, or a save that raised)."""
        return bool(self.pending) or self.unsure is not None

    def due(self, now: float) -> bool:
        """Whether the periodic save is due at ``now`` (under the learner's lock); if so,
        the next one is due ``interval`` from now."""
        if now - self.saved_at < self.interval:
            return False
        self.saved_at = now
        return True

    def _after_fork_in_child(self) -> None:
        """A forked child is a new writer: it owes the store nothing of what its parent
        learned (the parent does), and sharing the parent's writer id and save number would
        make one's save look like the other's own."""
        parents = self.pending
        self.foreign = (
            frozenset((level, arm) for level, arms in parents.contexts.items() for arm in arms),
            frozenset(parents.delays),
        ) if parents else None  # fmt: skip
        self.pending = Pending()
        self.unsure = None
        self.writer = uuid.uuid4().hex
        self.seq = 0

    def flush(self, learner: StrategyLearner) -> None:
        """Save now, raising what the store raised (see ``StrategyLearner.flush``)."""
        with self.lock:
            self._sync(learner)

    def save_quietly(self, learner: StrategyLearner, action: str = "save") -> None:
        """The periodic save: skipped while another runs, never raising into the caller."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            self._sync(learner)
        except Exception as problem:
            self.report(action, problem)
        finally:
            self.lock.release()

    def _sync(self, learner: StrategyLearner) -> None:
        store = self.store
        with learner._lock:
            now, wall = learner.clock.now(), learner.clock.wall()
            fresh, self.pending = self.pending, Pending()
            local = copy_state(learner._contexts, learner._delays, learner._delay_size)
            seq = self.seq
            foreign = self.foreign
        unsure = self.unsure  # guarded by self.lock, which every caller holds
        sent: list[tuple[Merged, int, Pending]] = []  # the last merge: what, after, owing
        max_bytes = getattr(store, "max_bytes", None)
        half_life, size, limit = learner.half_life, learner._delay_size, learner._max_contexts

        def owed(shared: Mapping[str, Any] | None) -> tuple[int, Pending]:
            """What this save owes the store, and after which of our saves it comes."""
            if unsure is None:
                return seq, fresh
            if isinstance(shared, Mapping) and (
                shared.get("writer") == self.writer and shared.get("seq") == unsure[0]
            ):
                return unsure[0], fresh  # the save that raised had landed after all
            combined = copy.deepcopy(unsure[1])
            combined.absorb(copy.deepcopy(fresh), now, half_life, size, limit)
            return seq, combined

        def merge(shared: Mapping[str, Any] | None) -> dict[str, Any]:
            base, evidence = owed(shared)
            merged = merge_snapshot(
                shared,
                local,
                evidence,
                writer=self.writer,
                seq=base,
                now=now,
                wall=wall,
                half_life=half_life,
                max_weight=learner.max_weight,
                delay_size=size,
                limit=limit,
                foreign=foreign,
            )
            sent[:] = [(merged, base, evidence)]
            return fit_snapshot(merged.snapshot, max_bytes)

        try:
            update = getattr(store, "update", None)
            if callable(update):
                update(merge)
            else:  # a store with load and save only: not atomic between replicas
                store.save(merge(store.load()))
        except BaseException:
            with learner._lock:
                if sent:
                    # The store raised after it was handed the snapshot: it may have saved it
                    # (a timeout after the commit). Keep that evidence apart, under the number
                    # that save wrote: the next save finds it there if it landed, and owes it
                    # again only if not. Folded back into the new evidence, it was counted
                    # twice whenever the save had landed.
                    _, base, evidence = sent[-1]
                    self.seq = base
                    self.unsure = (base + 1, evidence)
                else:  # the store was never reached: what was owed still is
                    fresh.absorb(self.pending, now, half_life, size, limit)
                    self.pending = fresh
            raise
        merged, base, _ = sent[-1]
        with learner._lock:
            self.seq = base + 1
            self.unsure = None
            if merged.replaced:
                self._adopt(learner, merged)
            if foreign is not None and merged.replaced:
                self.foreign = None  # the local state is the store's now

    def _adopt(self, learner: StrategyLearner, merged: Merged) -> None:
        """Learn on the merged state, plus what was learned while it was being saved."""
        now = learner.clock.now()
        half_life, size, limit = learner.half_life, learner._delay_size, learner._max_contexts
        contexts, delays = merged.contexts, merged.delays
        later = self.pending
        for level, arms in later.contexts.items():
            stats = contexts.get(level)
            if stats is None:
                stats = contexts[level] = {}
            contexts.move_to_end(level)
            for arm, entry in arms.items():
                mine = stats.get(arm)
                if mine is None:
                    mine = stats[arm] = DecayedMoments(updated=now)
                mine.absorb(entry, now, half_life, learner.max_weight)
        for service, values in later.delays.items():
            samples = delays.get(service)
            if samples is None:
                samples = delays[service] = DelaySamples(size)
            for value in values:
                samples.add(value)
        while len(contexts) > limit:
            contexts.popitem(last=False)
        while len(delays) > limit:
            delays.popitem(last=False)
        learner._contexts = contexts
        learner._delays = delays

    def report(self, action: str, problem: BaseException) -> None:
        """Log a store problem once per kind of error (a traceback per retry helps nobody)."""
        kind = f"{action}:{type(problem).__name__}"
        if kind in self.reported:
            return
        self.reported.add(kind)
        if action == "load":
            what = "could not use the stored snapshot; it starts from its priors"
        elif isinstance(problem, NewerSnapshotError):
            what = "does not save over a snapshot written by a newer version"
        elif action == "save at exit":
            what = "could not save what it learned since its last save before the process exit"
        else:
            what = "could not save its snapshot; it keeps learning and retries later"
        _log.warning(
            "strategy learner %s (%s: %s); further %s errors of this kind are not logged",
            what,
            type(problem).__name__,
            problem,
            type(problem).__name__,
        )
