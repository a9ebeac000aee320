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

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning._stats import DecayedMoments, DelaySamples

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["describe_context", "remember_decision", "restore_snapshot", "take_snapshot"]

FORMAT = "otel_recovery.strategy_learner"
VERSION = 1

Level = tuple[str, str]


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
    contexts = [
        {
            "scope": scope,
            "key": dimension,
            "arms": {arm: e.to_list(now - e.updated) for arm, e in arms.items()},
        }
        for (scope, dimension), arms in learner._contexts.items()
    ]
    delays = {service: list(s.samples) for service, s in learner._delays.items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": wall,
        "contexts": contexts,
        "delays": delays,
    }


def restore_snapshot(
    snapshot: Mapping[str, Any], now: float, wall: float, delay_size: int
) -> tuple[OrderedDict[Level, dict[str, DecayedMoments]], OrderedDict[str, DelaySamples]]:
    """Parse and check a snapshot; raises ValueError naming what is wrong."""
    if not isinstance(snapshot, Mapping) or snapshot.get("format") != FORMAT:
        raise ValueError(f"not a strategy learner snapshot (format must be {FORMAT!r})")
    if snapshot.get("version") != VERSION:
        raise ValueError(f"unsupported snapshot version {snapshot.get('version')!r}")
    saved_at = snapshot.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)):
        raise ValueError(f"snapshot saved_at must be epoch seconds, got {saved_at!r}")
    shelf = max(0.0, wall - float(saved_at))
    contexts: OrderedDict[Level, dict[str, DecayedMoments]] = OrderedDict()
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
    delays: OrderedDict[str, DelaySamples] = OrderedDict()
    raw_delays = snapshot.get("delays", {})
    if not isinstance(raw_delays, Mapping):
        raise ValueError("snapshot delays must be an object")
    for service, values in raw_delays.items():
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise ValueError(f"snapshot delays of {service!r} must be a list of seconds >= 0")
        delays[str(service)] = DelaySamples(delay_size, [float(v) for v in values])
    return contexts, delays
