"""Fault simulation: does adaptive + learned recovery beat static policies? (issue 5)

A virtual-time discrete-event simulation (research/adaptive.md section 3; the model is in
``_fault_sim_core.py``, the clients in ``_fault_sim_policies.py``). A FIFO server with 8
workers (mean service 20 ms, about 400 calls/s) that keeps serving requests whose client gave
up; open-loop Poisson clients with a 500 ms attempt timeout and a 5 s deadline; six profiles of
60 virtual seconds:

- ``blip_p0.1`` / ``blip_p0.3``: every attempt fails with 503 with probability p (200 calls/s);
- ``outage``: connection refused for t in [20, 30) (300 calls/s);
- ``metastable``: service 2.5x slower for t in [20, 25), capacity 160/s under 300 calls/s:
  retries can keep the queue full after the trigger ends;
- ``ratelimit429``: 150 calls admitted per 1-s window for t in [20, 40), the rest get 429 with
  ``Retry-After`` = the rest of the window;
- ``config_4xx``: 10 % of calls always get 400 (not retryable);
- ``poison_5xx`` (added after tuning, never tuned on): 503 blips with p = 0.1 as above, and
  5 % of calls always get 500, which the classifier calls retryable but no retry heals (a
  bad shard, a poisoned request): the case for learning per error fingerprint.

Every client decision is made by the library's real classes (``Retry``, ``ExponentialBackoff``,
``RetryBudget``, ``CircuitBreaker``, ``Classifier``, ``_engine.after_failure``,
``StrategyLearner``, ``AdaptiveThresholds``) on a virtual clock. Clients: ``none``; ``naive3``
(tenacity-style: 3 attempts, exponential 0.1 s without jitter, retries every exception, ignores
Retry-After); ``jitter3`` / ``jitter5`` (full jitter, classifier decides, Retry-After honoured);
``breaker5s`` / ``breaker60s`` (pybreaker-style breaker, 5 consecutive failures, + naive3);
``budget10`` (jitter3 + a 10 % retry budget); and ``ours``. "best static" is, per profile,
the static client with the best mean reward in hindsight (the static oracle).

Reward per call = success - 0.1 * retries per call (research/adaptive.md 2.1, 3.6): a retry
must buy more than 10 points of success. "Within 0.2 points of the best static policy" is
read on this reward, where it is achievable at the same time as the outage-load target (raw
success favours jitter5, which buys 1.4 points in the outage with 5x the load).

Honest evaluation (research/adaptive.md 2.3): ours was tuned on seeds 0-9 (``--tune``
reruns that search); the report uses held-out seeds (default 100-102). Runs are paired by
seed (common random numbers); the gap to the best static policy is reported with a 95 %
t-interval over seeds. Deterministic for given seeds; about 30-50 s with 2 processes.

    python benchmarks/fault_sim.py                 # report on held-out seeds 100-102
    python benchmarks/fault_sim.py --seeds 100-104 --jobs 2
    python benchmarks/fault_sim.py --tune          # the tuning search, seeds 0-9 (minutes)

It reports and never asserts (exit status 0 either way).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import otel_recovery  # noqa: F401
except ImportError:  # running from a checkout without an install: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _fault_sim_core import ClientPolicy, Metrics, Profile, Simulation
from _fault_sim_policies import STATIC, Ours, OursConfig

PROFILES = {
    p.name: p
    for p in (
        Profile("blip_p0.1", 200.0, (0.0, 60.0), blip_p=0.1),
        Profile("blip_p0.3", 200.0, (0.0, 60.0), blip_p=0.3),
        Profile("outage", 300.0, (20.0, 30.0), outage=True),
        Profile("metastable", 300.0, (20.0, 25.0), slowdown=2.5),
        Profile("ratelimit429", 300.0, (20.0, 40.0), quota=150),
        Profile("config_4xx", 300.0, (0.0, 60.0), bad_calls=0.1),
        Profile("poison_5xx", 200.0, (0.0, 60.0), blip_p=0.1, poisoned=0.05),
    )
}
POLICIES = (*STATIC, "ours")
ABLATIONS = {
    "ours-no-learner": OursConfig(learn=False),
    "ours-no-adaptive": OursConfig(adapt=False),
}
RETRY_COST = 0.1
TUNE_SEEDS = tuple(range(10))
EVAL_SEEDS = (100, 101, 102)


def run_one(task: tuple[str, str, int, OursConfig]) -> dict[str, Any]:
    profile_name, policy, seed, config = task
    profile = PROFILES[profile_name]
    if policy in ABLATIONS:
        config = replace(ABLATIONS[policy], **_tuned(config))
    factory: Callable[[Simulation], ClientPolicy] = (
        STATIC[policy] if policy in STATIC else (lambda sim: Ours(sim, config))
    )
    metrics = Simulation(profile, factory, seed).run()
    return {"profile": profile_name, "policy": policy, "seed": seed, **summarize(profile, metrics)}


def _tuned(config: OursConfig) -> dict[str, Any]:
    """The tuned knobs of ``config``, without the ablation switches."""
    return {k: v for k, v in vars(config).items() if k not in ("learn", "adapt")}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def summarize(profile: Profile, m: Metrics) -> dict[str, Any]:
    success = m.successes / m.calls
    retries = m.retries / m.calls
    result: dict[str, Any] = {
        "success": success,
        "attempts": m.attempts / m.calls,
        "window_attempts": m.window_attempts / max(1, m.window_calls),
        "retries": retries,
        "reward": success - RETRY_COST * retries,
        "p99_all": _quantile(m.all_latencies or [], 0.99),
        "early_retries": m.early_retries,
        "unretryable_retries": m.unretryable_retries,
        "bad_attempts": m.bad_call_attempts / m.bad_calls if m.bad_calls else None,
        "shed": m.shed / m.calls,
        "ttr": None,
    }
    start, end = profile.window
    if end < 60.0:
        buckets = m.buckets or []
        before = buckets[int(start) - 10 : int(start)]
        baseline = sum(b[1] for b in before) / max(1, sum(b[0] for b in before))
        ok = [b[1] >= 0.9 * baseline * b[0] for b in buckets[:60]]
        ttr: float = math.inf
        for second in range(int(end), 60):
            if all(ok[second:60]):
                ttr = second - end
                break
        result["ttr"] = ttr
    return result


def run_all(
    profiles: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    config: OursConfig,
    jobs: int,
) -> list[dict[str, Any]]:
    tasks = [(p, policy, s, config) for p in profiles for policy in policies for s in seeds]
    if jobs <= 1:
        return [run_one(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(run_one, tasks, chunksize=1)


def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return math.nan
    return math.inf if any(v == math.inf for v in values) else statistics.fmean(values)


def ci95(diffs: list[float]) -> float:
    if len(diffs) < 2:
        return math.nan
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    return t.get(len(diffs), 2.0) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def analyse(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per profile: the mean row of each policy, the best static one, and ours' paired gap."""
    out: dict[str, dict[str, Any]] = {}
    for profile in dict.fromkeys(r["profile"] for r in results):
        rows = [r for r in results if r["profile"] == profile]
        by_policy = {
            policy: [r for r in rows if r["policy"] == policy]
            for policy in dict.fromkeys(r["policy"] for r in rows)
        }
        keys = [k for k in rows[0] if k not in ("profile", "policy", "seed")]
        means = {p: {k: mean_of(rs, k) for k in keys} for p, rs in by_policy.items()}
        static = [p for p in means if p in STATIC]
        best = max(static, key=lambda p: means[p]["reward"]) if static else None
        entry: dict[str, Any] = {"means": means, "best": best}
        if best is not None and "ours" in by_policy:
            ours = {r["seed"]: r["reward"] for r in by_policy["ours"]}
            diffs = [ours[r["seed"]] - r["reward"] for r in by_policy[best] if r["seed"] in ours]
            entry["gap"] = statistics.fmean(diffs)
            entry["gap_ci"] = ci95(diffs)
        out[profile] = entry
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == math.inf:
        return "never"
    return f"{value:.{digits}f}"


def print_report(analysis: dict[str, dict[str, Any]], seeds: Sequence[int]) -> None:
    print(f"Fault simulation, seeds {', '.join(map(str, seeds))} (means over seeds)\n")
    print(
        "| profile | policy | success | attempts/call | in fault window | retries/call | reward "
        "| p99 all (s) | TTR (s) | before Retry-After | 4xx retried | shed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for profile, entry in analysis.items():
        for policy, m in entry["means"].items():
            mark = " (best static)" if policy == entry["best"] else ""
            print(
                f"| {profile} | {policy}{mark} | {_fmt(m['success'], 4)} | {_fmt(m['attempts'], 2)}"
                f" | {_fmt(m['window_attempts'], 2)} | {_fmt(m['retries'], 3)}"
                f" | {_fmt(m['reward'], 4)} | {_fmt(m['p99_all'], 2)} | {_fmt(m['ttr'], 1)}"
                f" | {_fmt(m['early_retries'], 0)} | {_fmt(m['unretryable_retries'], 0)}"
                f" | {_fmt(m['shed'], 3)} |"
            )
    print("\n| profile | best static | its reward | ours | ours - best (95 % CI) |")
    print("|---|---|---|---|---|")
    for profile, entry in analysis.items():
        if "gap" in entry:
            best = entry["best"]
            print(
                f"| {profile} | {best} | {_fmt(entry['means'][best]['reward'], 4)}"
                f" | {_fmt(entry['means']['ours']['reward'], 4)}"
                f" | {entry['gap']:+.4f} ± {_fmt(entry['gap_ci'], 4)} |"
            )


def verdicts(analysis: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    """The issue-5 targets for ours, each as (met, line)."""
    lines: list[tuple[bool, str]] = []

    def ours(profile: str) -> dict[str, Any] | None:
        entry = analysis.get(profile)
        return None if entry is None else entry["means"].get("ours")

    def check(profile: str, key: str, ok: Any, text: str, digits: int = 3) -> None:
        m = ours(profile)
        if m is not None:
            value = m[key]
            lines.append((bool(ok(value)), f"{text}: {_fmt(value, digits)}"))

    check("outage", "window_attempts", lambda v: v <= 1.1, "outage attempts/call <= 1.1", 2)
    check("blip_p0.1", "success", lambda v: v >= 0.999, "blip p=0.1 success >= 0.999", 4)
    check("blip_p0.3", "success", lambda v: v >= 0.99, "blip p=0.3 success >= 0.99", 4)
    check("metastable", "success", lambda v: v >= 0.90, "metastable success >= 0.90", 4)
    check("metastable", "ttr", lambda v: v <= 2.0, "metastable recovered within 2 s", 1)
    check("config_4xx", "bad_attempts", lambda v: v == 1.0, "non-retryable attempts/call = 1.00", 2)
    for profile in analysis:
        check(profile, "early_retries", lambda v: v == 0, f"{profile}: retries before RA = 0", 0)
    for profile, entry in analysis.items():
        if "gap" in entry:
            met = entry["gap"] >= -0.002
            lines.append((met, f"{profile}: within 0.2 points of best static: {entry['gap']:+.4f}"))
    return lines


def tune(jobs: int) -> None:
    """The search that froze OursConfig: a small grid on the tuning seeds only."""
    frozen = OursConfig()
    grid = [
        frozen,
        replace(frozen, tighten_rate=0.625, arms=(0, 1, 2, 4)),  # the first try
        replace(frozen, tighten_rate=0.625),  # breaker trips in the 429 storm
        replace(frozen, arms=(0, 1, 2, 4)),
        replace(frozen, arms=(0, 1, 4)),
        replace(frozen, arms=(0, 4)),
        replace(frozen, breaker_open=0.5),
        replace(frozen, breaker_open=2.0),
        replace(frozen, breaker_minimum_calls=10),
        replace(frozen, half_life=300.0),
        # 429s left out of the error rate: no anomaly in the quota storm, ratelimit429 -0.018
        replace(frozen, alarm=replace(frozen.alarm, count_rate_limited=False)),
    ]
    static = run_all(list(PROFILES), list(STATIC), TUNE_SEEDS, OursConfig(), jobs)
    for config in grid:
        rows = static + run_all(list(PROFILES), ["ours"], TUNE_SEEDS, config, jobs)
        analysis = analyse(rows)
        met = sum(ok for ok, _ in verdicts(analysis))
        worst = min(e["gap"] for e in analysis.values())
        print(f"{config}: targets met {met}/{len(verdicts(analysis))}, worst gap {worst:+.4f}")


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return tuple(seeds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, default=EVAL_SEEDS, help="e.g. 100-104")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--ablations", action="store_true", help="add ours without learner / without adaptive"
    )
    parser.add_argument("--tune", action="store_true", help="rerun the tuning search")
    args = parser.parse_args(argv)
    if args.tune:
        tune(args.jobs)
        return 0
    if set(args.seeds) & set(TUNE_SEEDS):
        print("note: reporting on tuning seeds 0-9; held-out results use seeds >= 100\n")
    started = time.perf_counter()
    policies = args.policies.split(",") + (list(ABLATIONS) if args.ablations else [])
    results = run_all(args.profiles.split(","), policies, args.seeds, OursConfig(), args.jobs)
    analysis = analyse(results)
    print_report(analysis, args.seeds)
    print()
    lines = verdicts(analysis)
    for met, line in lines:
        print(f"Verdict: {'PASS' if met else 'FAIL'} {line}")
    total = sum(ok for ok, _ in lines)
    print(f"\n{total}/{len(lines)} targets met in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PROFILES", "analyse", "main", "run_all", "verdicts"]
