"""The learner's JSON snapshot: writing it, reading it back, and trimming it to fit a store.

Snapshot format (version 1)::

    {"format": "otel_recovery.strategy_learner", "version": 1, "saved_at": <epoch s>,
     "contexts": [{"scope": <service or "*">, "key": "fingerprint:..." | "category:...",
                   "arms": {<arm>: [weight, reward_sum, reward_sum_squares, pulls, age_seconds]}}],
     "delays": {<service>: [recovery seconds, oldest first]}}

Ages rather than timestamps, because the learner's clock is monotonic and means nothing in
another process; on load, the wall-clock time since ``saved_at`` is added to every age, so
evidence keeps decaying while the snapshot sits in a store.

Reading (:func:`restore_snapshot`) checks every field and names what is wrong; a version
this library cannot read is a :class:`NewerSnapshotError`, so that a save never overwrites
what a newer replica wrote. A store may limit the size: :func:`fit_snapshot` then drops
what matters least. ``take_snapshot`` reads the learner under its lock (the caller in
:mod:`otel_recovery.learning.strategy` holds it).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from otel_recovery.learning._stats import DecayedMoments, DelaySamples

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = [
    "Contexts",
    "Delays",
    "Level",
    "NewerSnapshotError",
    "fit_snapshot",
    "restore_snapshot",
    "snapshot_of",
    "take_snapshot",
]

FORMAT = "otel_recovery.strategy_learner"
VERSION = 1

Level = tuple[str, str]
Contexts = OrderedDict[Level, dict[str, DecayedMoments]]
Delays = OrderedDict[str, DelaySamples]


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
