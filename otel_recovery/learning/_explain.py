"""The learner's account of itself: ``explain()`` and the JSON snapshot format.

Both read the learner's internals under its lock (the callers in
:mod:`otel_recovery.learning.strategy` hold it); kept here so the learner module is the
algorithm only.

Snapshot format (version 1)::

    {"format": "otel_recovery.strategy_learner", "version": 1, "saved_at": <epoch s>,
     "contexts": [{"scope": <service or "*">, "key": "fingerprint:..." | "category:...",
                   "arms": {<arm>: [weight, reward_sum, reward_sum_squares, pulls, age_seconds]}}],
     "delays": {<service>: [recovery seconds, oldest first]}}

Ages rather than timestamps, because the learner's clock is monotonic and means nothing in
another process; on load, the wall-clock time since ``saved_at`` is added to every age, so
evidence keeps decaying while the snapshot sits in a store.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning._stats import DecayedMoments, DelaySamples

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = [
    "Foreign",
    "Merged",
    "NewerSnapshotError",
    "Pending",
    "copy_state",
    "describe_context",
    "fit_snapshot",
    "merge_snapshot",
    "remember_decision",
    "restore_snapshot",
    "take_snapshot",
]

FORMAT = "otel_recovery.strategy_learner"
VERSION = 1

Level = tuple[str, str]
Contexts = OrderedDict[Level, dict[str, DecayedMoments]]
Delays = OrderedDict[str, DelaySamples]


def _arm_view(entry: DecayedMoments, now: float, half_life: float) -> dict[str, Any]:
    weight, total, _ = entry.at(now, half_life)
    return {
        "weight": round(weight, 3),
        "mean_reward": round(total / weight, 4) if weight > 0 else None,
        "pulls": entry.pulls,
    }


def remember_decision(
    last: OrderedDict[DecisionKey, dict[str, Any]], rec: Recommendation, now: float, limit: int
) -> None:
    """Keep the latest decision per key (bounded, least recently decided evicted)."""
    last[rec.key] = {
        "at": now,
        "action": rec.action,
        "learned": rec.learned,
        "samples": {a: round(v, 4) for a, v in rec.samples.items()},
        "capped": list(rec.capped),
    }
    last.move_to_end(rec.key)
    if len(last) > limit:
        last.popitem(last=False)


def describe_context(
    learner: StrategyLearner, key: DecisionKey | None, now: float
) -> dict[str, Any]:
    half_life = learner.half_life
    mode = "shadow" if learner.shadow else "active"
    if key is None:
        contexts = []
        for (scope, dimension), arms in learner._contexts.items():
            views = {arm: _arm_view(e, now, half_life) for arm, e in arms.items()}
            known = {a: v["mean_reward"] for a, v in views.items() if v["mean_reward"] is not None}
            best = max(known, key=known.__getitem__) if known else None
            contexts.append({"scope": scope, "key": dimension, "best": best, "arms": views})
        delays = {s: learner._learned_delay(s) for s in learner._delays}
        return {"mode": mode, "contexts": contexts, "learned_delays": delays}
    levels = []
    arm_names: set[str] = set()
    for scope, dimension in key.levels():
        arms = learner._contexts.get((scope, dimension), {})
        arm_names.update(arms)
        levels.append(
            {
                "scope": scope,
                "key": dimension,
                "arms": {arm: _arm_view(e, now, half_life) for arm, e in arms.items()},
            }
        )
    last = learner._last.get(key)
    if last is not None:
        arm_names.update(last["samples"])
    posterior = {}
    for arm in sorted(arm_names):
        mean, spread, variance = learner._posterior(key, arm, now)
        posterior[arm] = {
            "mean_reward": round(mean, 4),
            "sd": round(spread, 4),
            "reward_variance": round(variance, 5),
        }
    explanation: dict[str, Any] = {
        "mode": mode,
        "key": {"service": key.service, "fingerprint": key.fingerprint, "category": key.category},
        "levels": levels,
        "posterior": posterior,
        "last_decision": dict(last) if last is not None else None,
        "learned_delay": learner._learned_delay(key.service),
        "caps": {
            "max_retries": learner.caps.max_retries,
            "retry_ratio": learner.caps.retry_ratio,
            "retry_ratio_used": round(_ratio_used(learner, key.service, now), 4),
            "retry_ratio_applies": _ratio_applies(learner, key.service),
        },
        "summary": _summary(key, posterior, last, learner, now),
    }
    if learner.shadow:
        decisions = learner._shadow_decisions
        explanation["shadow_agreement"] = learner._shadow_agreed / decisions if decisions else None
    return explanation


def _ratio_used(learner: StrategyLearner, service: str, now: float) -> float:
    ratio = learner._ratios.get(service)
    return ratio.used(now, learner._tau) if ratio is not None else 0.0


def _ratio_applies(learner: StrategyLearner, service: str) -> bool:
    """Whether the service's calls are counted, so that the retry-ratio cap applies."""
    ratio = learner._ratios.get(service)
    return ratio is not None and ratio.counted


def _summary(
    key: DecisionKey,
    posterior: Mapping[str, Mapping[str, float]],
    last: Mapping[str, Any] | None,
    learner: StrategyLearner,
    now: float,
) -> str:
    if not posterior:
        return f"nothing learned yet for {key.service} / {key.category}"
    fine = learner._contexts.get(key.levels()[0], {})
    ranked = sorted(posterior, key=lambda a: -posterior[a]["mean_reward"])
    parts = []
    for arm in ranked:
        evidence = fine[arm].at(now, learner.half_life)[0] if arm in fine else 0.0
        parts.append(
            f"{arm} {posterior[arm]['mean_reward']:.2f} ({evidence:.1f} obs for this fingerprint)"
        )
    text = f"{key.service} / {key.category}: expected reward " + ", ".join(parts)
    if last is not None:
        text += f"; last decision: {last['action']}"
        if last["learned"] != last["action"]:
            text += f" (learner preferred {last['learned']})"
        if last["capped"]:
            text += f"; hard caps removed {', '.join(last['capped'])}"
    return text


def take_snapshot(learner: StrategyLearner, now: float, wall: float) -> dict[str, Any]:
    return snapshot_of(learner._contexts, learner._delays, now, wall)


def snapshot_of(
    contexts: Mapping[Level, Mapping[str, DecayedMoments]],
    delays: Mapping[str, DelaySamples],
    now: float,
    wall: float,
) -> dict[str, Any]:
    """The JSON form of ``contexts`` and ``delays`` as of ``now`` (``wall`` on the wall clock)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": wall,
        "contexts": [
            {
                "scope": scope,
                "key": dimension,
                "arms": {arm: e.to_list(now - e.updated) for arm, e in arms.items()},
            }
            for (scope, dimension), arms in contexts.items()
        ],
        "delays": {service: [round(v, 4) for v in s.samples] for service, s in delays.items()},
    }


class NewerSnapshotError(ValueError):
    """A snapshot written by a newer version of the library (a format this one cannot read)."""


def restore_snapshot(
    snapshot: Mapping[str, Any], now: float, wall: float, delay_size: int, limit: float
) -> tuple[Contexts, Delays]:
    """Parse and check a snapshot; raises ValueError naming what is wrong.

    Keeps the ``limit`` most recent contexts and delay series (the learner's bound).
    """
    if not isinstance(snapshot, Mapping) or snapshot.get("format") != FORMAT:
        raise ValueError(f"not a strategy learner snapshot (format must be {FORMAT!r})")
    version = snapshot.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise NewerSnapshotError(
            f"snapshot version {version} was written by a newer otel-recovery "
            f"(this one reads version {VERSION})"
        )
    if version != VERSION:
        raise ValueError(f"unsupported snapshot version {version!r}")
    saved_at = snapshot.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)):
        raise ValueError(f"snapshot saved_at must be epoch seconds, got {saved_at!r}")
    shelf = max(0.0, wall - float(saved_at))
    contexts: Contexts = OrderedDict()
    raw_contexts = snapshot.get("contexts")
    if not isinstance(raw_contexts, list):
        raise ValueError("snapshot contexts must be a list")
    for item in raw_contexts:
        if not isinstance(item, Mapping):
            raise ValueError(f"snapshot context must be an object, got {item!r}")
        scope, dimension, arms = item.get("scope"), item.get("key"), item.get("arms")
        if not isinstance(scope, str) or not isinstance(dimension, str):
            raise ValueError(f"snapshot context needs str scope and key, got {item!r}")
        if not isinstance(arms, Mapping):
            raise ValueError(f"snapshot arms must be an object, got {arms!r}")
        contexts[(scope, dimension)] = {
            str(arm): DecayedMoments.from_list(raw, now - shelf) for arm, raw in arms.items()
        }
        contexts.move_to_end((scope, dimension))
    delays: Delays = OrderedDict()
    raw_delays = snapshot.get("delays", {})
    if not isinstance(raw_delays, Mapping):
        raise ValueError("snapshot delays must be an object")
    for service, values in raw_delays.items():
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise ValueError(f"snapshot delays of {service!r} must be a list of seconds >= 0")
        delays[str(service)] = DelaySamples(delay_size, [float(v) for v in values])
    while len(contexts) > limit:
        contexts.popitem(last=False)
    while len(delays) > limit:
        delays.popitem(last=False)
    return contexts, delays


# -- sharing one snapshot between replicas ----------------------------------------------------


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


def fit_snapshot(snapshot: dict[str, Any], max_bytes: int | None) -> dict[str, Any]:
    """``snapshot`` trimmed to at most ``max_bytes`` of compact UTF-8 JSON.

    What goes first when it does not fit is what matters least: fingerprint contexts before
    category contexts (every fingerprint of a category borrows from those), least recently
    learned first; learned delays get at most a quarter of the room.
    """
    if max_bytes is None:
        return snapshot
    contexts: list[dict[str, Any]] = snapshot["contexts"]
    delays: dict[str, list[float]] = snapshot["delays"]
    # Each item's size plus its comma: their sum plus the envelope bounds the whole document.
    sizes = [_size(c) + 1 for c in contexts]
    delay_sizes = {s: _size({s: v}) - 1 for s, v in delays.items()}
    room = max_bytes - _size({**snapshot, "contexts": [], "delays": {}})
    if sum(sizes) + sum(delay_sizes.values()) <= room:
        return snapshot
    keep: set[int] = set()
    fine = [c["key"].startswith("fingerprint:") for c in contexts]
    for i in reversed(range(len(contexts))):
        if not fine[i] and sizes[i] <= room:
            keep.add(i)
            room -= sizes[i]
    share = room // 4
    kept_delays: set[str] = set()
    for service in reversed(list(delays)):
        size = delay_sizes[service]
        if size <= share:
            kept_delays.add(service)
            share -= size
            room -= size
    for i in reversed(range(len(contexts))):
        if fine[i] and sizes[i] <= room:
            keep.add(i)
            room -= sizes[i]
    return {
        **snapshot,
        "contexts": [c for i, c in enumerate(contexts) if i in keep],
        "delays": {s: v for s, v in delays.items() if s in kept_delays},
    }


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _size(value: object) -> int:
    return len(_ENCODER.encode(value).encode("utf-8"))
