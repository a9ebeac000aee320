"""Scenarios for ``test_gevent.py``, each run in a fresh interpreter.

The order is the one of ``opentelemetry-instrument gunicorn -k gevent``: otel-recovery is
imported and instrumented first (the sitecustomize, in the master), gevent's
``monkey.patch_all()`` comes after (in each worker). A ticker greenlet then measures the
longest stretch in which the hub ran nothing else while one greenlet recovered: a blocking
primitive of ours bound before the patch would stop the whole worker for its wait.

A deadlocked hub never prints: a ``faulthandler`` watchdog then dumps every stack and ends
the process, which the test reports.

Usage: ``python gevent_scenarios.py <scenario> [url]``; prints one JSON line. With
``OTEL_RECOVERY_STORE_URL`` set (``shared_first_calls``) the breakers and budgets made at
the first calls are fleet-wide, and the first one starts the sync thread.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from collections.abc import Callable
from typing import Any

import requests  # imported before the patch, as in a gunicorn master

import otel_recovery
from otel_recovery import FixedBackoff, Retry
from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor

RequestsRecoveryInstrumentor().instrument()

if sys.argv[1:2] == ["flush_before_patch"]:  # made where a sitecustomize would make it
    from opentelemetry.sdk.trace import TracerProvider

    from otel_recovery.learning.anomaly import AnomalySpanProcessor

    MADE_BEFORE_PATCH = AnomalySpanProcessor(bucket=0.05, grace=0.0, flush_interval=10.0)
    PROVIDER_BEFORE_PATCH = TracerProvider()
    PROVIDER_BEFORE_PATCH.add_span_processor(MADE_BEFORE_PATCH)

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

    @otel_recovery.recover(retry=Retry(3, backoff=FixedBackoff(1.0)))
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


def shared_first_calls(url: str) -> dict[str, Any]:
    """Twenty greenlets make the first calls to one target at once."""
    calls = [gevent.spawn(lambda: requests.get(url, timeout=5).status_code) for _ in range(20)]
    gevent.joinall(calls, raise_error=True)
    return {"statuses": sorted({call.value for call in calls}), "done": len(calls)}


def anomaly() -> dict[str, Any]:
    """An anomaly processor built after the patch (its worker is then a greenlet) scores
    20 series per 50 ms bucket, while a ticker greenlet counts its turns on the hub: how
    many series were scored in one turn of the worker at most."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from otel_recovery.learning._anomaly_verdicts import Verdicts
    from otel_recovery.learning.anomaly import AnomalySpanProcessor

    processor = AnomalySpanProcessor(bucket=0.05, grace=0.0, flush_interval=0.02)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("gevent-scenario")
    turns = [0]
    in_one_turn: list[int] = []
    scored = Verdicts.judge  # patched on the class: this scenario is a process of its own

    def counted(self: Verdicts, *args: Any) -> None:
        if in_one_turn and in_one_turn[-1] and turns[0] == last_turn[0]:
            in_one_turn[-1] += 1
        else:
            in_one_turn.append(1)
        last_turn[0] = turns[0]
        scored(self, *args)

    last_turn = [-1]
    Verdicts.judge = counted  # type: ignore[method-assign]
    until = time.monotonic() + 1.0
    running = True

    def ticker() -> None:
        while running:
            turns[0] += 1
            gevent.sleep(0)

    def load(series: int) -> None:
        while time.monotonic() < until:
            attributes = {"server.address": f"dep{series}", "http.request.method": "GET"}
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes=attributes):
                pass
            gevent.sleep(0.005)

    watcher = gevent.spawn(ticker)
    gevent.joinall([gevent.spawn(load, n) for n in range(20)])
    gevent.sleep(0.2)  # the last buckets close
    running = False
    watcher.join()
    processor.shutdown()
    return {"scored": sum(in_one_turn), "most_in_one_turn": max(in_one_turn, default=0)}


def flush_before_patch() -> dict[str, Any]:
    """A processor made before the patch has real locks and a real worker thread: two
    greenlets flushing it at once must both finish (neither may switch while holding its
    lock), three times over."""
    from opentelemetry.trace import SpanKind

    tracer = PROVIDER_BEFORE_PATCH.get_tracer("gevent-scenario")
    flushed = []
    for _ in range(3):
        until = time.monotonic() + 0.12
        while time.monotonic() < until:
            for series in range(10):
                attributes = {"server.address": f"dep{series}", "http.request.method": "GET"}
                with tracer.start_as_current_span(
                    "GET", kind=SpanKind.CLIENT, attributes=attributes
                ):
                    pass
            gevent.sleep(0.005)
        gevent.sleep(0.06)  # the buckets are due
        flushes = [gevent.spawn(MADE_BEFORE_PATCH.force_flush) for _ in range(2)]
        gevent.joinall(flushes, raise_error=True)
        flushed += [flush.value for flush in flushes]
    MADE_BEFORE_PATCH.shutdown()
    return {"flushed": flushed}


if __name__ == "__main__":
    faulthandler.dump_traceback_later(30, exit=True)
    name = sys.argv[1]
    if name == "decorator":
        report = decorator()
    elif name == "anomaly":
        report = anomaly()
    elif name == "flush_before_patch":
        report = flush_before_patch()
    elif name == "shared_first_calls":
        report = shared_first_calls(sys.argv[2])
    else:
        report = http(sys.argv[2])
    print(json.dumps(report))
