"""Memory held by ``ErrorRecoveryInteraction``'s breakers when service ids are made per request.

Some callers put a request's or a user's id into ``service_id`` (``"user-4711"``): one
circuit breaker each. This script asks for a breaker for ``--ids`` distinct ids, with the
default bound (``max_breakers=1024``) and with none (the behaviour before the bound), and
prints the breakers kept and the memory ``tracemalloc`` traces for them, side by side.

Run from the repository root::

    python benchmarks/breaker_registry.py            # 20,000 ids, a few seconds
    python benchmarks/breaker_registry.py --ids 2000

It reports and never asserts.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.stores import MemoryStore


def held(ids: int, max_breakers: int) -> tuple[int, float]:
    """Breakers kept and megabytes traced after ``ids`` distinct ids asked for a breaker."""
    gc.collect()
    tracemalloc.start()
    recovery = ErrorRecoveryInteraction(
        store=MemoryStore(), telemetry=False, max_breakers=max_breakers
    )
    base = tracemalloc.get_traced_memory()[0]
    for n in range(ids):
        recovery.get_circuit_breaker(f"user-{n}")
    gc.collect()
    megabytes = (tracemalloc.get_traced_memory()[0] - base) / 1e6
    tracemalloc.stop()
    return len(recovery.circuit_breakers), megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=20_000, help="distinct service ids")
    ids = parser.parse_args().ids
    print(f"{ids:,} distinct service ids, one get_circuit_breaker() each")
    print("| registry | breakers kept | MB traced |")
    print("|---|---:|---:|")
    for label, bound in (("max_breakers=1024 (default)", 1024), ("unbounded (before)", 10**9)):
        kept, megabytes = held(ids, bound)
        print(f"| {label} | {kept:,} | {megabytes:.2f} |")


if __name__ == "__main__":
    main()
