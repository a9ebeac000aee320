"""What otel-recovery's per-call layer itself costs, in instructions, with nothing else moving.

``benchmarks/instrumentors.py --instructions`` counts real calls against real servers; its
Redis and PostgreSQL rows repeat to about 100 instructions, but an HTTP request's socket reads
vary by thousands, more than the layer costs. This benchmark takes the client library out:
the patched method's original (``Redis.execute_command``, ``Cursor.execute``,
``Session.request``) is replaced by a function that returns a canned answer at once, so what
is counted is the caller, our layer and that function. It runs each target three ways:

- ``bare``: not instrumented;
- ``idle``: instrumented, every layer switched off (the price of being in the call path);
- ``recovery``: instrumented, a plan remembered, the happy path;

with the compiled happy path (``otel_recovery._speedups``) and, for comparison, with
``OTEL_RECOVERY_NO_EXTENSIONS=true`` (the Python layers). ``redis_async``,
``postgres_async`` and ``asyncpg`` are ``redis.asyncio``'s ``execute_command``, psycopg's
``AsyncCursor.execute`` and asyncpg's ``Connection.fetchval``, awaited in one event loop
(compiled, the layer returns an ``AsyncRun`` that the loop awaits instead of a coroutine).
The PostgreSQL clients need a real connection (``OTEL_RECOVERY_BENCH_PG``, default ``host=127.0.0.1 user=postgres dbname=test``);
nothing is sent on it. Counts come from callgrind at two call counts, so start-up cancels
out (``benchmarks/_callgrind.py``).

    python benchmarks/layer_cost.py           # instructions (callgrind)
    python benchmarks/layer_cost.py --time    # the same calls timed in a warm loop
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from _callgrind import count_many, valgrind_version

TARGETS = ("redis", "postgres", "http", "redis_async", "postgres_async", "asyncpg")
MODES = ("bare", "idle", "recovery")
LABELS = {
    "redis": "Redis GET",
    "postgres": "PostgreSQL execute",
    "http": "requests GET",
    "redis_async": "redis.asyncio GET",
    "postgres_async": "psycopg async execute",
    "asyncpg": "asyncpg fetchval",
}
ASYNC_TARGETS = {"redis_async", "postgres_async", "asyncpg"}
"""Coroutine methods: awaited in an event loop."""
CALLS = (2_000, 6_000)


def _redis() -> object:
    import redis.client

    def execute_command(self: object, *args: object, **options: object) -> object:
        return b"value"

    redis.client.Redis.execute_command = execute_command  # type: ignore[method-assign]
    client = redis.Redis()
    return lambda: client.get("key")


def _redis_async() -> object:
    import redis.asyncio.client

    async def execute_command(self: object, *args: object, **options: object) -> object:
        return b"value"

    redis.asyncio.client.Redis.execute_command = execute_command  # type: ignore[method-assign]
    client = redis.asyncio.Redis()
    return lambda: client.get("key")


def _postgres_async() -> object:
    import asyncio

    import psycopg

    async def execute(
        self: object, query: object, params: object = None, **options: object
    ) -> object:
        return self

    psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign,assignment]
    dsn = os.environ.get("OTEL_RECOVERY_BENCH_PG", "host=127.0.0.1 user=postgres dbname=test")
    connection = asyncio.run(psycopg.AsyncConnection.connect(dsn, autocommit=True))
    cursor = connection.cursor()  # nothing is sent on it: execute answers at once
    return lambda: cursor.execute("SELECT 1")


def _asyncpg() -> object:
    import asyncio

    import asyncpg.connection

    async def fetchval(self: object, query: object, *args: object, **options: object) -> object:
        return 1

    asyncpg.connection.Connection.fetchval = fetchval  # type: ignore[method-assign]
    dsn = os.environ.get("OTEL_RECOVERY_BENCH_PG", "host=127.0.0.1 user=postgres dbname=test")
    url = "postgresql://{user}@{host}/{dbname}".format(**dict(p.split("=") for p in dsn.split()))
    connection = asyncio.run(asyncpg.connect(url))  # nothing is sent on it
    return lambda: connection.fetchval("SELECT 1")


def _batches(target: str, call: Any) -> Callable[[int], None]:
    """``run(n)`` makes ``n`` calls: a plain loop, or for a coroutine method one event loop
    that awaits them (no call suspends: the original answers at once)."""
    if target not in ASYNC_TARGETS:

        def run(calls: int) -> None:
            for _ in range(calls):
                call()

        return run
    import asyncio

    loop = asyncio.new_event_loop()

    async def many(calls: int) -> None:
        for _ in range(calls):
            await call()

    return lambda calls: loop.run_until_complete(many(calls))


def _postgres() -> object:
    import psycopg

    def execute(self: object, query: object, params: object = None, **options: object) -> object:
        return self

    psycopg.Cursor.execute = execute  # type: ignore[method-assign,assignment]
    dsn = os.environ.get("OTEL_RECOVERY_BENCH_PG", "host=127.0.0.1 user=postgres dbname=test")
    cursor = psycopg.connect(dsn, autocommit=True).cursor()
    return lambda: cursor.execute("SELECT 1")


def _http() -> object:
    import requests
    import requests.sessions

    canned = requests.Response()
    canned.status_code = 200
    canned._content = b"ok"

    def request(self: object, method: object, url: object, **options: object) -> object:
        return canned

    requests.sessions.Session.request = request  # type: ignore[method-assign,assignment]
    session = requests.Session()
    return lambda: session.get("http://service.local:8080/prices")


def child(target: str, mode: str, calls: int, timed: bool = False) -> None:
    """Run ``calls`` happy-path calls of ``target`` in ``mode`` (under callgrind); ``timed``:
    instead, print the best of 15 timed batches of ``calls`` in ns per call."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    # a fixed resource: resource detection's thread pool would make the counts wander
    trace.set_tracer_provider(TracerProvider(resource=Resource({"service.name": "bench"})))
    factories = {
        "redis": _redis,
        "postgres": _postgres,
        "http": _http,
        "redis_async": _redis_async,
        "postgres_async": _postgres_async,
        "asyncpg": _asyncpg,
    }
    call = factories[target]()
    if mode != "bare":
        from otel_recovery.instrumentors.asyncpg import AsyncPGRecoveryInstrumentor
        from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor
        from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor
        from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor

        kind = {
            "redis": RedisRecoveryInstrumentor,
            "postgres": PsycopgRecoveryInstrumentor,
            "http": RequestsRecoveryInstrumentor,
            "redis_async": RedisRecoveryInstrumentor,
            "postgres_async": PsycopgRecoveryInstrumentor,
            "asyncpg": AsyncPGRecoveryInstrumentor,
        }[target]
        instrumentor = kind()
        instrumentor.instrument()
        patches = instrumentor._patches
        if patches is None:
            raise RuntimeError(f"{kind.__name__} did not instrument")
        if mode == "idle":
            patches.enabled = False
    run = _batches(target, call)
    gc.disable()
    run(200)  # plans remembered, caches warm
    if not timed:
        run(calls)
        return
    best = math.inf
    for _ in range(15):
        started = time.perf_counter()
        run(calls)
        best = min(best, (time.perf_counter() - started) / calls)
    print(f"{best * 1e9:.0f}")


def warm_loop(targets: list[str]) -> None:
    """``--time``: the same calls timed in a warm loop, each mode in its own process. A
    lower bound: against a real server the client's own work evicts the layer's objects
    from the caches between calls (see the README's "What the instrumentors cost")."""
    script = str(Path(__file__).resolve())
    print("| target | bare ns/call | recovery, compiled | recovery, Python |")
    print("|---|---:|---:|---:|")
    for target in targets:
        figures = []
        for mode, extension in (("bare", True), ("recovery", True), ("recovery", False)):
            env = {**os.environ}
            if not extension:
                env["OTEL_RECOVERY_NO_EXTENSIONS"] = "true"
            command = [sys.executable, script, "--child", target, mode, "20000", "--timed"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            figures.append(int(done.stdout.strip()))
        bare, compiled, python = figures
        print(f"| {LABELS[target]} | {bare:,} | {compiled - bare:+,} | {python - bare:+,} |")
    print("\n# command: python benchmarks/layer_cost.py --time (best of 15 batches of 20,000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--time", action="store_true", help="time a warm loop instead")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        target, mode, calls = options.child
        child(target, mode, int(calls), timed=options.timed)
        return
    if options.time:
        warm_loop([t for t in options.targets.split(",") if t])
        return
    if valgrind_version() is None:
        raise SystemExit("valgrind is not installed: this benchmark counts with callgrind")
    targets = [t for t in options.targets.split(",") if t]
    runs = [
        (target, mode, extension, calls)
        for target in targets
        for extension in (True, False)
        for mode in MODES
        if extension or mode == "recovery"
        for calls in CALLS
    ]
    script = str(Path(__file__).resolve())
    commands = [[sys.executable, script, "--child", t, m, str(c)] for t, m, _, c in runs]
    base = {**os.environ, "PYTHONHASHSEED": "0"}
    counted: list[int] = [0] * len(runs)
    for extension in (True, False):
        env = base if extension else {**base, "OTEL_RECOVERY_NO_EXTENSIONS": "true"}
        indexes = [i for i, run in enumerate(runs) if run[2] is extension]

        def progress(position: int, done: object, indexes: list[int] = indexes) -> None:
            target, mode, compiled, calls = runs[indexes[position]]
            kind = "compiled" if compiled else "python"
            print(f"  counted {target} {mode} {kind} x{calls}", flush=True)

        results = count_many([commands[i] for i in indexes], env, jobs=2, progress=progress)
        for index, result in zip(indexes, results, strict=True):
            counted[index] = result.instructions
    per_call: dict[tuple[str, str, bool], float] = {}
    for index in range(0, len(runs), 2):
        target, mode, extension, _ = runs[index]
        low, high = counted[index], counted[index + 1]
        per_call[target, mode, extension] = (high - low) / (CALLS[1] - CALLS[0])
    print(f"\n# command: python benchmarks/layer_cost.py ({valgrind_version()})")
    print("| target | bare instr/call | idle layer | recovery, compiled | recovery, Python |")
    print("|---|---:|---:|---:|---:|")
    for target in targets:
        bare = per_call[target, "bare", True]
        idle = per_call[target, "idle", True] - bare
        compiled = per_call[target, "recovery", True] - bare
        python = per_call[target, "recovery", False] - bare
        print(
            f"| {LABELS[target]} | {bare:,.0f} | {idle:+,.0f} | {compiled:+,.0f} | {python:+,.0f} |"
        )
    print("\nColumns after the first: instructions added per call over bare.")


if __name__ == "__main__":
    main()
