"""The learner's account of itself: ``explain()``, and the latest decision per key it shows.

:meth:`~otel_recovery.learning.StrategyLearner.explain` answers what the learner believes
and why: the evidence at each level of a key, the posterior per arm, the caps, a one-line
summary (:func:`describe_context`), and the last decision taken for that key, which
:func:`remember_decision` keeps (bounded) as each one is made. Both read or write the
learner's internals under its lock (the callers in :mod:`otel_recovery.learning.strategy`
hold it); kept here so the learner module is the algorithm only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning._stats import DecayedMoments

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["describe_context", "remember_decision"]


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
