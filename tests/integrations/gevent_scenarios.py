"""Scenarios for ``test_gevent.py``, each run in a fresh interpreter.

The order is the one of ``opentelemetry-instrument gunicorn -k gevent``: otel-recovery is
imported and instrumented first (the sitecustomize, in the master), gevent's
``monkey.patch_all()`` comes after (in each worker). A ticker greenlet then measures the
longest stretch in which the hub ran nothing else while one greenlet recovered: a blocking
primitive of ours bound before the patch would stop the whole worker for its wait.

Usage: ``python gevent_scenarios.py <scenario> [url]``; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import requests  # imported before the patch, as in a gunicorn master

import otel_recovery
from otel_recovery import FixedBackoff, Retry
from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor

RequestsRecoveryInstrumentor().instrument()

from gevent import monkey  # noqa: E402  (the point: patched after our import)

monkey.patch_all()

import time  # noqa: E402

import gevent  # noqa: E402


def longest_stall(work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work`` in a greenlet beside a ticker (every 10 ms); the longest gap between
    ticks while it ran, and what it returned."""
    ticks: list[float] = []
    done = False

    def ticker() -> None:
        while not done:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    watcher = gevent.spawn(ticker)
    gevent.sleep(0.05)
    began = time.monotonic()
    result = gevent.spawn(work).get()
    ended = time.monotonic()
    done = True
    watcher.join()
    inside = [began] + [t for t in ticks if began < t < ended] + [ended]
    gap = max(b - a for a, b in zip(inside, inside[1:]))
    return {"result": result, "seconds": round(ended - began, 3), "longest_stall": round(gap, 3)}


def decorator() -> dict[str, Any]:
    calls: list[float] = []

    @otel_recovery.recover(retry=Retry(3, backoff=FixedBackoff(0.3)))
    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    report = longest_stall(flaky)
    report["calls"] = len(calls)
    return report


def http(url: str) -> dict[str, Any]:
    return longest_stall(lambda: requests.get(url, timeout=5).status_code)


if __name__ == "__main__":
    name = sys.argv[1]
    report = decorator() if name == "decorator" else http(sys.argv[2])
    print(json.dumps(report))
