"""Merging the shared snapshot with one learner's state, so each observation counts once.

Learners sharing one stored snapshot (replicas, a pre-fork server's workers) each add, at
every save, what they learned since their last one to what the store holds; the bookkeeping
of who owes what, and the saves themselves, are :mod:`._snapshot_sharing`'s. This module is
the arithmetic of one save: :class:`Pending`, the evidence a learner has not saved yet;
:func:`copy_state`, the learner's state copied so the merge runs outside its lock;
:func:`merge_snapshot`, which combines the store's snapshot, that state and the pending
evidence into a :class:`Merged` (the state to learn on and the snapshot to save); and
``Foreign``, the entries a forked child leaves to its parent to save.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_recovery.learning._snapshot_format import (
    Contexts,
    Delays,
    Level,
    NewerSnapshotError,
    restore_snapshot,
    snapshot_of,
)
from otel_recovery.learning._stats import DecayedMoments, DelaySamples

__all__ = ["Foreign", "Merged", "Pending", "copy_state", "merge_snapshot"]


@dataclass
class Pending:
    """Evidence a learner gathered since its last successful save (its own, uncapped)."""

    contexts: Contexts = field(default_factory=OrderedDict)
    delays: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)

    def __bool__(self) -> bool:
        return bool(self.contexts or self.delays)

    def add(
        self, level: Level, arm: str, reward: float, now: float, half_life: float, limit: int
    ) -> None:
        stats = self.contexts.get(level)
        if stats is None:
            stats = self.contexts[level] = {}
            _bound(self.contexts, limit)
        entry = stats.get(arm)
        if entry is None:
            entry = stats[arm] = DecayedMoments(updated=now)
        entry.add(reward, now, half_life, math.inf)

    def add_delay(self, service: str, seconds: float, size: int, limit: int) -> None:
        samples = self.delays.get(service)
        if samples is None:
            samples = self.delays[service] = []
            _bound(self.delays, limit)
        samples.append(seconds)
        if len(samples) > size:
            del samples[: len(samples) - size]

    def absorb(self, other: Pending, now: float, half_life: float, size: int, limit: int) -> None:
        """Add ``other``, the evidence gathered while this (older) evidence failed to save:
        all of it is still owed to the store. Delays keep their order, oldest first, so the
        trim to ``size`` drops the oldest, as :class:`DelaySamples` does."""
        for level, arms in other.contexts.items():
            stats = self.contexts.setdefault(level, {})
            for arm, entry in arms.items():
                mine = stats.get(arm)
                if mine is None:
                    stats[arm] = entry
                else:
                    mine.absorb(entry, now, half_life, math.inf)
        for service, samples in other.delays.items():
            merged = self.delays.get(service, []) + samples
            self.delays[service] = merged[-size:]
        _bound(self.contexts, limit)
        _bound(self.delays, limit)


def _bound(table: OrderedDict[Any, Any], limit: int) -> None:
    while len(table) > limit:
        table.popitem(last=False)


@dataclass(frozen=True)
class Merged:
    """The outcome of one merge: the state to learn on, and the snapshot to save."""

    contexts: Contexts
    delays: Delays
    snapshot: dict[str, Any]
    replaced: bool
    """True when the store held other replicas' evidence: the learner adopts ``contexts``."""


def copy_state(contexts: Contexts, delays: Delays, size: int) -> tuple[Contexts, Delays]:
    """A private copy, for merging outside the learner's lock."""
    return (
        OrderedDict(
            (level, {a: e.copy() for a, e in arms.items()}) for level, arms in contexts.items()
        ),
        OrderedDict((s, DelaySamples(size, list(d.samples))) for s, d in delays.items()),
    )


def merge_snapshot(
    shared: Mapping[str, Any] | None,
    local: tuple[Contexts, Delays],
    pending: Pending,
    *,
    writer: str,
    seq: int,
    now: float,
    wall: float,
    half_life: float,
    max_weight: float,
    delay_size: int,
    limit: int,
    foreign: Foreign | None = None,
) -> Merged:
    """What to save, given the store's snapshot ``shared``, this learner's state ``local``
    and the evidence it gathered since its last save ``pending``.

    Each observation must reach the shared snapshot exactly once. Per (context, arm):

    - the store's entry plus ``pending``, when the store has it: the store already holds
      everything this learner saved before, and ``pending`` is exactly what it has not;
    - this learner's own entry, when the store lacks it (never saved, or dropped to fit the
      size limit): the local view counts each observation once, being the last merged
      state plus what came since.

    When the store holds just what this learner saved last (its ``writer`` and ``seq``),
    nobody else wrote and the local state is the answer as it is. A snapshot from a newer
    library version raises :class:`NewerSnapshotError` (never overwrite what a newer
    replica wrote); any other unreadable one is replaced.
    """
    contexts, delays = local
    if foreign is not None:  # see Foreign: those entries are not this learner's to write
        contexts, delays = _without(contexts, delays, foreign)
    theirs: tuple[Contexts, Delays] | None = None
    if isinstance(shared, Mapping) and not (
        shared.get("writer") == writer and shared.get("seq") == seq
    ):
        try:
            theirs = restore_snapshot(shared, now, wall, delay_size, math.inf)
        except NewerSnapshotError:
            raise
        except ValueError:
            theirs = None  # unreadable: replaced by this learner's state
    if theirs is None and foreign is not None:
        theirs = (OrderedDict(), OrderedDict())  # this learner's own evidence only, adopted
    if theirs is not None:
        contexts = _merge_contexts(theirs[0], contexts, pending, now, half_life, max_weight)
        delays = _merge_delays(theirs[1], delays, pending, delay_size)
        _bound(contexts, limit)
        _bound(delays, limit)
    snapshot = snapshot_of(contexts, delays, now, wall)
    snapshot["writer"] = writer
    snapshot["seq"] = seq + 1
    return Merged(contexts, delays, snapshot, theirs is not None)


Foreign = tuple[frozenset[tuple[Level, str]], frozenset[str]]
"""The (context, arm) pairs and delay services whose local entries hold evidence another
writer owes the store: a forked child's copy of what its parent learned and had not saved
yet (the parent saves it). Written by the child too, it was counted twice."""


def _without(contexts: Contexts, delays: Delays, foreign: Foreign) -> tuple[Contexts, Delays]:
    arms, services = foreign
    kept: Contexts = OrderedDict()
    for level, stats in contexts.items():
        mine = {arm: entry for arm, entry in stats.items() if (level, arm) not in arms}
        if mine:
            kept[level] = mine
    return kept, OrderedDict((k, v) for k, v in delays.items() if k not in services)


def _merge_contexts(
    shared: Contexts,
    local: Contexts,
    pending: Pending,
    now: float,
    half_life: float,
    max_weight: float,
) -> Contexts:
    merged: dict[Level, dict[str, DecayedMoments]] = {}
    for level, arms in shared.items():
        owed = pending.contexts.get(level, {})
        stats = merged[level] = {}
        for arm, entry in arms.items():
            if arm in owed:
                entry.absorb(owed[arm], now, half_life, max_weight)
            stats[arm] = entry
    for level, arms in local.items():
        stats = merged.setdefault(level, {})
        for arm, entry in arms.items():
            if arm not in stats:
                stats[arm] = entry.copy()
    for level, arms in pending.contexts.items():  # evicted locally meanwhile: rare
        stats = merged.setdefault(level, {})
        for arm, entry in arms.items():
            if arm not in stats:
                stats[arm] = DecayedMoments(updated=now)
                stats[arm].absorb(entry, now, half_life, max_weight)
    # Most recently learned last, the order the learner evicts and saves by.
    ordered = sorted(
        merged.items(), key=lambda item: max((e.updated for e in item[1].values()), default=0.0)
    )
    return OrderedDict(ordered)


def _merge_delays(shared: Delays, local: Delays, pending: Pending, size: int) -> Delays:
    merged: Delays = OrderedDict()
    for service, samples in shared.items():
        merged[service] = DelaySamples(
            size, list(samples.samples) + pending.delays.get(service, [])
        )
    for service, samples in local.items():
        if service not in merged:
            merged[service] = DelaySamples(size, list(samples.samples))
    for service, values in pending.delays.items():
        if service not in merged:
            merged[service] = DelaySamples(size, values)
    return merged
