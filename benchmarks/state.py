"""Checkpoint write and read latency for a 10 KB state on every store, in one run.

What a user pays per ``create_checkpoint`` / ``restore_checkpoint``: JSON encoding, the size
check, the store round trip (through :class:`~otel_recovery.stores.ResilientStore`, as
checkpoints are used in production) and decoding. Per store the script saves and restores the
same 10 KB state ``--ops`` times, interleaving the stores round by round so a burst of noise on
this shared machine hits each of them alike (DESIGN.md section 9), and reports p50 and p99 in
microseconds plus the ratio to the in-memory store.

Servers: Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (user postgres, database
test), as in the test suite; a store whose server is unreachable is reported as skipped. Every
run uses its own Redis key prefix and PostgreSQL tables and removes them afterwards.

Run from the repository root::

    python benchmarks/state.py            # 2,000 writes and reads per store, ~20 s
    python benchmarks/state.py --quick    # smoke run

It reports and never asserts.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

try:
    import otel_recovery  # noqa: F401
except ImportError:  # running from a checkout without an install: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_recovery.checkpoint import Checkpoints
from otel_recovery.stores import Store, open_store

REDIS = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def ten_kb_state() -> dict[str, object]:
    """A realistic job state: a cursor, counters, and a list of pending records (~10 KB)."""
    pending = [{"id": n, "sku": f"SKU-{n:06d}", "qty": n % 7, "note": "x" * 40} for n in range(110)]
    return {"cursor": "batch-0042", "processed": 12_345, "rates": [0.5, 0.25], "pending": pending}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reachable(url: str) -> str | None:
    try:
        store = open_store(url)
        store.get("probe")
        store.close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}"


def cleanup(store: Store, kind: str, name: str) -> None:
    if kind == "redis":
        client = store.client  # type: ignore[attr-defined]
        keys = list(client.scan_iter(match=f"bench-{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    elif kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            for part in ("meta", "records", "heads", "counters", "batches"):
                conn.execute(f'DROP TABLE IF EXISTS "{name}_{part}"')
    store.close()


def shared_breaker_costs(url: str, *, quick: bool) -> None:
    """Per-call cost of a fleet-wide breaker (and budget) decision against a local one.

    Happy path: ``can_execute()`` + ``record_success()`` on a closed breaker, which the shared
    breaker answers from its local view (the link thread syncs every 0.1 s meanwhile, so its
    cost is in the numbers). Failure path: ``record_failure()``, one Lua script per failure on
    the shared breaker. Budget: ``try_spend()``, one script per retry. Interleaved rounds,
    best round per row (the machine is shared and noisy).
    """
    import timeit

    from otel_recovery import CircuitBreaker, RetryBudget

    local, shared = CircuitBreaker(name="bench"), CircuitBreaker(name="bench", store=url)
    never = {"failure_threshold": 10**9, "name": "bench-failures"}
    local_f, shared_f = CircuitBreaker(**never), CircuitBreaker(**never, store=url)
    local_b = RetryBudget(ratio=1.0, min_per_second=1e9, name="bench")
    shared_b = RetryBudget(ratio=1.0, min_per_second=1e9, name="bench", store=url)
    happy = "b.can_execute(); b.record_success()"
    rows = {
        "closed, happy path (can_execute + record_success)": (happy, local, shared, 200_000),
        "failure (record_failure)": ("b.record_failure()", local_f, shared_f, 500),
        "retry budget withdrawal (try_spend)": ("b.try_spend()", local_b, shared_b, 500),
    }
    rounds = 3 if quick else 7
    best: dict[str, list[float]] = {row: [math.inf, math.inf] for row in rows}
    for _ in range(rounds):
        for row, (stmt, *pair, number) in rows.items():
            n = number // 10 if quick else number
            for side, component in enumerate(pair):
                took = timeit.timeit(stmt, globals={"b": component}, number=n) / n
                best[row][side] = min(best[row][side], took)
    print("Shared (Redis, loopback) vs local decision, per call, best of interleaved rounds")
    print()
    print("| decision | local | shared | shared / local |")
    print("|---|---:|---:|---:|")
    for row, (loc, sha) in best.items():
        print(f"| {row} | {_duration(loc)} | {_duration(sha)} | {sha / loc:.1f}x |")
    shared_f.reset()
    del shared, shared_f, shared_b  # no sync may recreate keys after the clean-up
    time.sleep(0.3)


def _duration(seconds: float) -> str:
    return f"{seconds * 1e9:.0f} ns" if seconds < 1e-6 else f"{seconds * 1e6:.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="writes and reads per store")
    parser.add_argument("--quick", action="store_true", help="200 operations per store")
    args = parser.parse_args()
    ops = 200 if args.quick else args.ops
    name = f"bench_{uuid.uuid4().hex[:8]}"
    tmp = tempfile.TemporaryDirectory()
    candidates = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp.name}/state.db",
        "redis": f"{REDIS}?prefix=bench-{name}:",
        "postgres": f"{POSTGRES}?table={name}",
    }
    state = ten_kb_state()
    stores: dict[str, Checkpoints] = {}
    skipped: dict[str, str] = {}
    for kind, url in candidates.items():
        problem = reachable(url)
        if problem is None:
            stores[kind] = Checkpoints(url)
        else:
            skipped[kind] = problem
    size = len(next(iter(stores.values())).serializer.dumps(state))
    writes: dict[str, list[float]] = {k: [] for k in stores}
    reads: dict[str, list[float]] = {k: [] for k in stores}

    def timed(call: Callable[[], object], into: list[float]) -> None:
        started = time.perf_counter()
        call()
        into.append((time.perf_counter() - started) * 1e6)

    for checkpoints in stores.values():  # warm up: connections, schema, scripts
        for _ in range(20):
            checkpoints.save("job", state)
            checkpoints.load("job")
    rounds = 20
    for round_number in range(rounds):
        order = (
            list(stores)[round_number % len(stores) :] + list(stores)[: round_number % len(stores)]
        )
        for kind in order:
            checkpoints = stores[kind]
            for _ in range(ops // rounds):
                timed(lambda c=checkpoints: c.save("job", state), writes[kind])
                timed(lambda c=checkpoints: c.load("job"), reads[kind])

    base_w = statistics.median(writes["memory"]) if "memory" in writes else None
    base_r = statistics.median(reads["memory"]) if "memory" in reads else None
    print(
        f"Checkpoint of a {size / 1024:.1f} KB JSON state, {ops} writes and {ops} reads per store"
    )
    print()
    print(
        "| store | write p50 µs | write p99 µs | read p50 µs | read p99 µs | write/read p50 vs memory |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in stores:
        w50, w99 = percentile(writes[kind], 0.5), percentile(writes[kind], 0.99)
        r50, r99 = percentile(reads[kind], 0.5), percentile(reads[kind], 0.99)
        ratio = f"{w50 / base_w:.1f}x / {r50 / base_r:.1f}x" if base_w and base_r else "-"
        print(f"| {kind} | {w50:.0f} | {w99:.0f} | {r50:.0f} | {r99:.0f} | {ratio} |")
    for kind, why in skipped.items():
        print(f"| {kind} | skipped: server unreachable ({why}) | | | | |")
    print()
    if "redis" in stores:
        shared_breaker_costs(candidates["redis"], quick=args.quick)
    else:
        print("Shared breaker decision: skipped, Redis unreachable")
    print()
    for kind, checkpoints in stores.items():
        store = getattr(checkpoints.store, "store", checkpoints.store)  # under ResilientStore
        cleanup(store, kind, name)
    tmp.cleanup()


if __name__ == "__main__":
    main()
