"""Happy-path overhead of otel-recovery next to tenacity, stamina, backoff, pybreaker, circuitbreaker.

Every candidate wraps a function that returns immediately and never fails, so what is measured
is the toll a decorator takes on every successful call: the cost users pay all day long, not
the cost of recovering (which is dominated by sleeps anyway).

Method (DESIGN.md section 9: the machine is shared and noisy, so compare within one run):

- each candidate is a loop of N calls; N is calibrated per candidate so one repeat takes about
  ``--target`` seconds (0.2 s by default), like ``timeit.Timer.autorange``;
- ``--repeats`` rounds (at least 7 by default) run the candidates round-robin, starting each
  round at a different candidate, so a burst of noise hits every candidate alike;
- garbage collection is off while a loop runs (as in ``timeit``);
- per candidate the best and the median ns/call are kept; the *added* cost is the candidate's
  best minus the best of the bare call of the same kind (sync or async), since the minimum is
  the estimate least disturbed by other processes. Ratios compare added costs.

otel-recovery runs as a user would deploy it: an SDK ``TracerProvider`` with a
``BatchSpanProcessor`` and an SDK ``MeterProvider`` installed as the global providers. The
script checks afterwards that the happy path produced no span at all.

Run from the repository root with the ``bench`` extra installed::

    python benchmarks/overhead.py            # full run, about a minute
    python benchmarks/overhead.py --quick    # smoke run, a few seconds

It reports and never asserts: the exit status is 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import otel_recovery  # noqa: F401
except ImportError:  # running from a checkout without an install: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SYNC_NS = 500.0
TARGET_ASYNC_NS = 1000.0
TARGET_TENACITY_RATIO = 15.0

OURS_SYNC = "otel-recovery"
OURS_ASYNC = "otel-recovery async"
BARE_SYNC = "bare call"
BARE_ASYNC = "bare async call"

Runner = Callable[[int], float]
"""Runs the candidate ``n`` times and returns the elapsed seconds."""


@dataclass
class Candidate:
    name: str
    kind: str  # "sync" or "async"
    runner: Runner
    note: str = ""
    number: int = 0
    samples: list[float] = field(default_factory=list)  # seconds per call, one per repeat

    @property
    def best_ns(self) -> float:
        return min(self.samples) * 1e9

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples) * 1e9


# -- loops -----------------------------------------------------------------------------------


def sync_runner(fn: Callable[[], Any]) -> Runner:
    """A tight loop around ``fn``; the loop's own cost cancels out against the bare call."""

    def run(n: int) -> float:
        repeat = itertools.repeat(None, n)
        clock = time.perf_counter
        start = clock()
        for _ in repeat:
            fn()
        return clock() - start

    return run


def async_runner(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], Coroutine[Any, Any, Any]]
) -> Runner:
    """The loop runs inside one task and is timed inside it, so loop start-up is not counted."""

    async def body(n: int) -> float:
        repeat = itertools.repeat(None, n)
        clock = time.perf_counter
        start = clock()
        for _ in repeat:
            await fn()
        return clock() - start

    def run(n: int) -> float:
        return loop.run_until_complete(body(n))

    return run


def timed(runner: Runner, n: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return runner(n)
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(runner: Runner, target: float) -> int:
    """The number of calls that takes about ``target`` seconds (timeit.autorange, then scaled)."""
    n = 1
    while True:
        for factor in (1, 2, 5):
            number = n * factor
            elapsed = timed(runner, number)
            if elapsed >= target / 10:
                return max(1, int(number * target / elapsed))
        n *= 10


# -- candidates ------------------------------------------------------------------------------


def set_up_telemetry() -> tuple[Any, Any, Any]:
    """SDK providers as a production service has them; returns (tracer provider, exporter, meter)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    metrics.set_meter_provider(meter_provider)

    from otel_recovery.telemetry import set_telemetry

    set_telemetry(None)  # rebuild from the globals just installed
    return tracer_provider, exporter, meter_provider


def build_candidates(loop: asyncio.AbstractEventLoop) -> tuple[list[Candidate], list[str]]:
    """Every candidate that can be built here, and notes on those that could not."""
    missing: list[str] = []
    candidates: list[Candidate] = []

    def plain() -> int:
        return 1

    async def aplain() -> int:
        return 1

    candidates.append(Candidate(BARE_SYNC, "sync", sync_runner(plain)))
    candidates.append(Candidate(BARE_ASYNC, "async", async_runner(loop, aplain)))

    from otel_recovery.policies import CircuitBreaker, Fallback, Retry, RetryBudget, Timeout
    from otel_recovery.recover import recover

    ours = recover(retry=Retry(3), breaker=CircuitBreaker(name="bench-sync"))(plain)
    ours_retry_only = recover(retry=Retry(3))(plain)
    aours = recover(retry=Retry(3), breaker=CircuitBreaker(name="bench-async"))(aplain)
    candidates.append(
        Candidate(OURS_SYNC, "sync", sync_runner(ours), "Retry(3) + CircuitBreaker()")
    )
    candidates.append(
        Candidate("otel-recovery retry only", "sync", sync_runner(ours_retry_only), "Retry(3)")
    )
    full = recover(
        retry=Retry(3),
        breaker=CircuitBreaker(name="bench-full"),
        budget=RetryBudget(),
        timeout=Timeout(1.0),
        fallback=Fallback(last_known_good=True),
    )(plain)
    candidates.append(
        Candidate(
            "otel-recovery full stack",
            "sync",
            sync_runner(full),
            "+ RetryBudget + Timeout(1) + Fallback(last_known_good)",
        )
    )
    candidates.append(
        Candidate(OURS_ASYNC, "async", async_runner(loop, aours), "Retry(3) + CircuitBreaker()")
    )

    try:
        import tenacity
    except ImportError:
        missing.append("tenacity")
    else:
        decorate = tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )
        candidates.append(Candidate("tenacity", "sync", sync_runner(decorate(plain)), "retry"))
        adecorate = tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )
        candidates.append(
            Candidate(
                "tenacity async", "async", async_runner(loop, adecorate(aplain)), "AsyncRetrying"
            )
        )

    try:
        import stamina
    except ImportError:
        missing.append("stamina")
    else:
        stamina.instrumentation.set_on_retry_hooks([])
        candidates.append(
            Candidate(
                "stamina",
                "sync",
                sync_runner(stamina.retry(on=ValueError, attempts=3)(plain)),
                "retry, hooks off",
            )
        )
        candidates.append(
            Candidate(
                "stamina async",
                "async",
                async_runner(loop, stamina.retry(on=ValueError, attempts=3)(aplain)),
                "retry, hooks off",
            )
        )

    try:
        import backoff
    except ImportError:
        missing.append("backoff")
    else:
        candidates.append(
            Candidate(
                "backoff",
                "sync",
                sync_runner(backoff.on_exception(backoff.expo, ValueError, max_tries=3)(plain)),
                "retry",
            )
        )
        candidates.append(
            Candidate(
                "backoff async",
                "async",
                async_runner(
                    loop, backoff.on_exception(backoff.expo, ValueError, max_tries=3)(aplain)
                ),
                "retry",
            )
        )

    try:
        import pybreaker
    except ImportError:
        missing.append("pybreaker")
    else:
        candidates.append(
            Candidate(
                "pybreaker", "sync", sync_runner(pybreaker.CircuitBreaker()(plain)), "breaker"
            )
        )

    try:
        import circuitbreaker
    except ImportError:
        missing.append("circuitbreaker")
    else:
        candidates.append(
            Candidate(
                "circuitbreaker", "sync", sync_runner(circuitbreaker.circuit(plain)), "breaker"
            )
        )
        candidates.append(
            Candidate(
                "circuitbreaker async",
                "async",
                async_runner(loop, circuitbreaker.circuit(aplain)),
                "breaker",
            )
        )
    return candidates, missing


# -- measuring and reporting -----------------------------------------------------------------


def measure(candidates: Sequence[Candidate], repeats: int, target: float) -> None:
    for candidate in candidates:
        timed(candidate.runner, 1000)  # warm caches and lazy set-up (e.g. get_telemetry)
        candidate.number = calibrate(candidate.runner, target)
    count = len(candidates)
    for round_number in range(repeats):
        gc.collect()
        for offset in range(count):
            candidate = candidates[(round_number + offset) % count]
            elapsed = timed(candidate.runner, candidate.number)
            candidate.samples.append(elapsed / candidate.number)


def added_ns(candidate: Candidate, bare: dict[str, Candidate]) -> float:
    return candidate.best_ns - bare[candidate.kind].best_ns


def ratio(theirs: float, ours: float) -> str:
    if ours <= 0:
        return "n/a"
    return f"{theirs / ours:.1f}x"


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "checkout"


def render(candidates: Sequence[Candidate], repeats: int, target: float) -> list[str]:
    by_name = {c.name: c for c in candidates}
    bare = {"sync": by_name[BARE_SYNC], "async": by_name[BARE_ASYNC]}
    lines = [
        "| candidate | kind | what | ns/call best | ns/call median | ns added | "
        "added vs otel-recovery |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for candidate in candidates:
        added = added_ns(candidate, bare)
        if candidate.name in (BARE_SYNC, BARE_ASYNC):
            added_cell, versus = "-", "-"
        else:
            ours = by_name[OURS_SYNC if candidate.kind == "sync" else OURS_ASYNC]
            added_cell = f"{added:.0f}"
            versus = "1.0x" if candidate is ours else ratio(added, added_ns(ours, bare))
        lines.append(
            f"| {candidate.name} | {candidate.kind} | {candidate.note or '-'} | "
            f"{candidate.best_ns:.0f} | {candidate.median_ns:.0f} | {added_cell} | {versus} |"
        )
    lines.append("")
    lines.append(
        f"N per repeat auto-scaled to ~{target:g} s; {repeats} round-robin repeats; "
        "'ns added' = best minus best bare call of the same kind; "
        "'added vs otel-recovery' = their added / ours (higher is better for us)."
    )
    return lines


def verdict(candidates: Sequence[Candidate]) -> str:
    by_name = {c.name: c for c in candidates}
    bare = {"sync": by_name[BARE_SYNC], "async": by_name[BARE_ASYNC]}
    sync_added = added_ns(by_name[OURS_SYNC], bare)
    async_added = added_ns(by_name[OURS_ASYNC], bare)
    checks = [
        (
            f"sync added {sync_added:.0f} ns (target <= {TARGET_SYNC_NS:.0f})",
            sync_added <= TARGET_SYNC_NS,
        ),
        (
            f"async added {async_added:.0f} ns (target <= {TARGET_ASYNC_NS:.0f})",
            async_added <= TARGET_ASYNC_NS,
        ),
    ]
    for peer, ours_added in (("tenacity", sync_added), ("tenacity async", async_added)):
        if peer not in by_name:
            checks.append((f"{peer} not installed: ratio not measured", False))
            continue
        theirs = added_ns(by_name[peer], bare)
        value = theirs / ours_added if ours_added > 0 else float("inf")
        checks.append(
            (
                f"{peer} added / ours = {value:.1f}x (target >= {TARGET_TENACITY_RATIO:.0f}x)",
                value >= TARGET_TENACITY_RATIO,
            )
        )
    met = all(ok for _, ok in checks)
    parts = "; ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in checks)
    return f"Verdict: {'all targets met' if met else 'targets missed'}: {parts}."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 short repeats")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 9, quick 3)")
    parser.add_argument(
        "--target", type=float, default=None, help="seconds per repeat (default 0.2, quick 0.01)"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    if args.target is None:
        args.target = 0.01 if args.quick else 0.2
    if args.repeats < 1 or args.target <= 0:
        parser.error("--repeats must be >= 1 and --target > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tracer_provider, exporter, meter_provider = set_up_telemetry()
    loop = asyncio.new_event_loop()
    try:
        candidates, missing = build_candidates(loop)
        peers = ", ".join(
            f"{name} {version_of(name)}"
            for name in (
                "otel-recovery",
                "tenacity",
                "stamina",
                "backoff",
                "pybreaker",
                "circuitbreaker",
            )
            if name not in missing
        )
        print(
            f"# Happy-path overhead per call: Python {platform.python_version()} "
            f"({platform.machine()}), {peers}"
        )
        if missing:
            print(
                f"# not installed, skipped: {', '.join(missing)} (pip install 'otel-recovery[bench]')"
            )
        print(f"# command: python benchmarks/overhead.py{' --quick' if args.quick else ''}")
        print()
        measure(candidates, args.repeats, args.target)
    finally:
        loop.close()
    tracer_provider.force_flush()
    spans = len(exporter.get_finished_spans())
    for line in render(candidates, args.repeats, args.target):
        print(line)
    print(f"Spans exported by the happy path: {spans} (expected 0).")
    print(verdict(candidates))
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
