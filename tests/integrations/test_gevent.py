"""otel-recovery in a gevent worker (``gunicorn -k gevent`` under ``opentelemetry-instrument``).

There our package is imported before gevent monkey-patches the standard library, so any
blocking primitive of ours bound at import would block the whole worker, every greenlet of
it, for as long as it waits: a retry's backoff would stop every other request the worker
serves. Each scenario of ``gevent_scenarios.py`` runs in its own interpreter (patching
pytest's own would change every other test) and reports the longest time the hub ran
nothing else while one greenlet recovered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from instrumentors import http_faults as hf
from servers import require_redis

from integrations.test_fork import delete_keys

pytest.importorskip("gevent")

HERE = Path(__file__).resolve().parent
STALL = 0.5
"""The longest stall allowed. The ticker ticks every 10 ms; a backoff that blocked the hub
would stall it for the whole backoff, and the scenarios' backoffs last 1 s: half of that
separates the two with a wide margin for a loaded CI machine."""


def run(*args: str, **settings: str) -> dict[str, Any]:
    """One scenario in a fresh interpreter; ``settings`` are extra environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    completed = subprocess.run(
        [sys.executable, str(HERE / "gevent_scenarios.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
        env={**env, **settings},
    )
    # a deadlocked hub: the scenario's watchdog dumped every stack into stderr
    assert completed.returncode == 0, completed.stderr[-6000:]
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


def test_a_decorated_calls_backoff_lets_the_other_greenlets_run() -> None:
    report = run("decorator")
    assert report["result"] == "ok" and report["calls"] == 3
    assert report["seconds"] >= 2.0  # two backoffs of 1 s: the waits did happen
    assert report["longest_stall"] < STALL, report


server = pytest.fixture(scope="module")(hf.serve)


@pytest.fixture
def then_ok(server: hf.FaultServer, request: pytest.FixtureRequest) -> tuple[str, Any]:
    """A path of the fault server answering 503 with ``Retry-After: 1`` once, then 200; and
    how many requests it has seen."""
    path = f"/{request.node.name}"
    return server.script(path, hf.retry_after(503, 1)), lambda: server.count(path)


def test_a_requests_retry_after_wait_lets_the_other_greenlets_run(
    then_ok: tuple[str, Any],
) -> None:
    url, seen = then_ok
    report = run("http", url)
    assert report["result"] == 200 and seen() == 2
    assert report["seconds"] >= 1.0  # Retry-After honoured
    assert report["longest_stall"] < STALL, report


@pytest.mark.server
def test_the_first_calls_with_fleet_wide_breakers_do_not_deadlock_the_worker(
    then_ok: tuple[str, Any],
) -> None:
    """With ``OTEL_RECOVERY_STORE_URL=redis://...`` the first call to a target makes its
    fleet-wide breaker, which starts the sync thread; under gevent that start switches
    greenlets. It used to happen under the instrumentor's lock, a real lock made before
    the patch: the next greenlet blocked the hub on it for good (gunicorn killed the worker
    for silence, and its successor hung the same way)."""
    require_redis()
    url, seen = then_ok
    prefix = f"otelrec-gevent-{uuid.uuid4().hex[:10]}:"
    try:
        report = run(
            "shared_first_calls",
            url,
            OTEL_RECOVERY_STORE_URL=f"redis://127.0.0.1:6379/0?prefix={prefix}",
        )
    finally:
        delete_keys(prefix)
    assert report == {"statuses": [200], "done": 20}  # the first answer is a 503, retried
    assert seen() == 21


def test_the_anomaly_processors_worker_yields_between_series() -> None:
    """Built once gevent has patched, the processor's worker is a greenlet on the hub's
    thread. Scoring a bucket refits a model per series (tens of ms each): all 20 series in
    one turn stopped every other greenlet of the worker, 2 s for 40 series in a helper's
    run. Now the hub's other greenlets run between any two series."""
    report = run("anomaly")
    assert report["scored"] >= 100  # 20 series over some 20 buckets
    assert report["most_in_one_turn"] == 1, report


def test_an_anomaly_processor_made_before_the_patch_never_yields_holding_its_real_lock() -> None:
    """Made before the patch (a sitecustomize, ``gunicorn --preload``), the processor's locks
    are real ones: a greenlet flushing it that yielded while holding one would leave the
    next flushing greenlet blocking the hub for good (a review found the first version of
    the yield above doing so)."""
    assert run("flush_before_patch") == {"flushed": [True] * 6}
