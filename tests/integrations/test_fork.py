"""otel-recovery in pre-fork servers and fork-based worker pools.

Production Python services often run forked: ``gunicorn --preload`` imports the app (and
``opentelemetry-instrument`` sets the SDK up) in the master, then forks the workers;
``multiprocessing`` with the fork start method and celery's prefork pool do the same. A
forked child has only the thread that called ``fork()``; every lock another thread held at
that moment stays held in the child forever, and every background thread is gone.

The fork itself never happens in pytest: each scenario runs ``fork_scenarios.py`` in a fresh
interpreter, which forks there and reports JSON; a child that deadlocks is ended by a
``faulthandler`` watchdog that dumps its stacks (shown in the failure message). The
``gunicorn`` test runs the real thing: ``opentelemetry-instrument gunicorn --preload`` with two
sync workers, a Redis fault and a PostgreSQL fault, exporting over OTLP to an in-process
receiver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from servers import PgFront, PrivateRedis, require_postgres, require_redis

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "fork_scenarios.py"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.server]


def run_scenario(name: str) -> dict[str, Any]:
    """Run one scenario of ``fork_scenarios.py`` in its own interpreter; its JSON report."""
    require_redis()
    prefix = f"otelrec-fork-{uuid.uuid4().hex[:10]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_RECOVERY_STORE_URL"] = "memory://"  # scenarios that share state set their own
    env["FORK_SCENARIO_PREFIX"] = prefix
    try:
        completed = subprocess.run(
            [sys.executable, str(SCENARIOS), name],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=HERE,
        )
    finally:  # once every process of the scenario is gone: none can write them again
        delete_keys(prefix)
    assert completed.returncode == 0, f"scenario {name} failed:\n{completed.stderr}"
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


def delete_keys(prefix: str) -> None:
    """Remove what a scenario left in the shared Redis (fleet-wide state, test keys)."""
    import redis

    admin = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(admin.scan_iter(match=f"{prefix}*"))
    if keys:
        admin.delete(*keys)
    admin.close()


def finished(child: dict[str, Any]) -> dict[str, Any]:
    """The child's report, after checking it neither deadlocked nor died."""
    assert not child["hung"], f"the forked child deadlocked; its threads:\n{child['stacks']}"
    assert child["done"] and child["exit_code"] == 0, child
    assert "raised" not in child, child["raised"]
    return child


# -- locks held by another thread at fork time --------------------------------------------


def test_a_fork_during_a_shared_breaker_sync_leaves_the_child_able_to_fail_a_call() -> None:
    """With ``OTEL_RECOVERY_STORE_URL=redis://...`` every target's breaker is fleet-wide and
    one thread syncs it with Redis every 0.1 s, holding the breaker's ``_talk`` lock for the
    whole round trip (about 1 % of the time in an idle process on loopback, up to the 0.25 s
    timeout when Redis is slow). A worker forked in that window must still be able to record
    a failure, which pushes it to Redis under the same lock."""
    report = run_scenario("shared_breaker_mid_sync")
    assert report["breaker"] == "SharedCircuitBreaker"
    child = finished(report["child"])
    assert child["error"] == "ConnectionError"  # both attempts refused, error surfaced as is


def test_a_fork_during_a_shared_budget_sync_leaves_the_child_able_to_retry() -> None:
    """The same window for the fleet-wide retry budget: the child's first retry withdraws
    from the shared budget under the budget's ``_talk`` lock."""
    child = finished(run_scenario("shared_budget_mid_sync")["child"])
    assert child["error"] == "ConnectionError"


def test_a_forked_child_keeps_following_the_fleet() -> None:
    """Control for the next test: forked while the shared-state thread is idle, the child's
    own thread (restarted by the link's at-fork handler) adopts a fleet-wide change, here a
    ``force_open()`` made by another process after the fork."""
    child = finished(run_scenario("shared_breaker_follows_fleet")["child"])
    assert child["state"] == "forced_open"


def test_a_child_forked_mid_sync_keeps_following_the_fleet() -> None:
    """Forked while that thread was inside an exchange, the child's restarted thread blocks
    on the inherited lock for good: the child never learns the fleet's state again (and no
    other breaker or budget of that store syncs in the child either)."""
    child = finished(run_scenario("shared_breaker_follows_fleet_mid_sync")["child"])
    assert child["state"] == "forced_open"


HELD_WINDOWS = {
    "breaker_lock": "a failure or an OPEN-state admission in another thread, or the metric "
    "reader's snapshot(): microseconds per call, held nearly all the time while threads call "
    "a target whose circuit is open",
    "budget_lock": "another thread's retry or a bucket rotation: microseconds",
    "classifier_lock": "every failed attempt of any target records a repeat: microseconds",
    "metrics_lock": "the metric reader listing the breakers, every export interval: microseconds",
    "telemetry_lock": "another thread meeting a new target: microseconds",
    "targets_lock": "another thread meeting a new target: microseconds",
    "plan_cache_lock": "another thread's first call of a new command shape: microseconds",
}


@pytest.mark.parametrize("lock", sorted(HELD_WINDOWS))
def test_a_per_call_lock_held_by_another_thread_at_fork_does_not_deadlock_the_child(
    lock: str,
) -> None:
    """Locks the per-call path takes (only on failures, retries and first calls: the happy
    path is lock-free). A thread holds one (directly: it stands for the window named in
    ``HELD_WINDOWS``) while the main thread forks; the child then makes the ordinary call
    that needs it: a failing GET for the breaker, budget and classifier locks, a GET to a
    new target or a new command for the others. Under ``opentelemetry-instrument`` (global
    providers), as in production."""
    child = finished(run_scenario(f"held:{lock}")["child"])
    assert child["error"] == "ConnectionError"


def test_a_transition_being_delivered_at_fork_does_not_silence_the_childs_listeners() -> None:
    """Breaker listeners (ours, which count transitions and mark spans, and the user's) run
    under a non-blocking ``_dispatch_lock``. A fork while another thread is inside one leaves
    that lock held in the child, where every later transition is queued and never
    delivered."""
    child = finished(run_scenario("dispatch_mid_delivery")["child"])
    assert child["state"] == "open"
    assert child["heard"] == ["closed", "open"]


def test_the_anomaly_processor_keeps_counting_in_a_forked_child() -> None:
    """``AnomalySpanProcessor`` aggregates spans on its own worker thread, which a forked
    child does not have (the SDK's batch processor restarts its thread at fork): the child's
    spans pile up unprocessed (up to ``max_pending``, 100,000 spans) and no anomaly is ever
    detected in a gunicorn worker."""
    report = run_scenario("anomaly_worker_after_fork")
    assert report["parent_counted"] == 3
    child = finished(report["child"])
    assert child["counted"] == 3 + 5
    assert child["pending"] == 0


def test_a_child_forked_while_the_anomaly_worker_runs_exits_cleanly() -> None:
    """The worker holds ``_process_lock`` for a whole ``process()`` (detector updates and
    refits, the user's ``include``). A child forked meanwhile hangs at exit, in the SDK's
    atexit shutdown, which calls the processor's ``shutdown()``: a gunicorn worker that
    never exits and is SIGKILLed after the graceful timeout."""
    finished(run_scenario("anomaly_mid_process")["child"])


# -- what the child inherits --------------------------------------------------------------


def test_a_forked_child_recovers_and_exports_through_its_own_batch_processor() -> None:
    """Instrumented in the parent (contrib above ours, SDK batch processor), the child's
    call fails once (its new connection is reset) and is retried; the child's batch thread,
    restarted by the SDK at fork, exports the one GET span with our annotations."""
    report = run_scenario("child_recovers_and_exports")
    child = finished(report["child"])
    assert child["value"] == "v"
    (span,) = child["spans"]
    assert span["name"] == "GET"
    assert span["attributes"]["otel_recovery.outcome"] == "success"
    assert span["attributes"]["otel_recovery.retry.attempts"] == 2
    assert span["events"] == ["otel_recovery.attempt.failed", "otel_recovery.retry"]
    assert report["parent_spans"] == [], "the child's span is the child's alone"


def test_a_child_gets_its_own_redis_connection_and_no_spurious_recovery() -> None:
    """redis-py gives a forked child fresh connections (it checks the pid); our layer must
    not turn that hand-over into a failure or a retry, in the child or in the parent."""
    report = run_scenario("inherited_redis_pool")
    child = finished(report["child"])
    assert child["value"] == "parent"
    assert child["same_connection"] is False
    assert child["recover_spans"] == [] and child["failed_calls"] == 0
    assert report["parent_value_after"] == "parent"
    assert report["parent_same_connection_after"] is True
    assert report["parent_recover_spans"] == []


def test_an_inherited_psycopg_connection_closed_by_the_child_is_not_retried_in_the_parent():
    """psycopg connections are not fork-safe: a child that closes the one it inherited
    ends the parent's session. That is psycopg's problem; ours must not make it worse: the
    parent's next statement reaches psycopg exactly once, fails with psycopg's own error,
    is marked ``statement_may_have_run``, and a new connection works."""
    require_postgres()
    report = run_scenario("inherited_psycopg_connection")
    assert finished(report["child"])["row"] == [2]
    assert report["parent_error"] == "OperationalError"
    assert report["executed"] == ["SELECT 3", "SELECT 4"]
    (span,) = report["parent_spans"]
    attributes = span["attributes"]
    assert attributes["otel_recovery.retry.attempts"] == 1
    assert attributes["otel_recovery.retry.disallowed"] == "statement_may_have_run"
    assert report["fresh_row"] == [4]


def test_a_postgres_store_used_in_a_forked_child_leaves_the_parents_session_alone() -> None:
    """``OTEL_RECOVERY_STORE_URL=postgresql://...`` keeps checkpoints and, with learning on,
    the learners' statistics, which each instrumentor's learner loads when it is built: in
    a gunicorn master. The SQLite store gives a forked child its own connection (it checks
    the pid); the PostgreSQL store must too, or the workers share the master's session (one
    socket, interleaved replies) and a child that closes it ends it for everyone."""
    require_postgres()
    report = run_scenario("postgres_store_after_fork")
    child = finished(report["child"])
    assert child["same_session"] is False
    assert report["parent_get"] == '"c"'


def test_a_child_starts_from_the_parents_breaker_state_then_goes_its_own_way() -> None:
    """Breakers are process memory: a worker forked while a target's circuit is open
    rejects calls to it without an attempt, as the parent does; resetting it in the child
    leaves the parent's open."""
    report = run_scenario("inherited_open_breaker")
    assert report["parent_before"] == "open"
    child = finished(report["child"])
    assert child["outcome"] == "rejected" and child["after_reset"] == "closed"
    assert report["parent_after"] == "open"


def test_state_owned_by_the_parents_threads_is_given_back_in_the_child() -> None:
    """A half-open probe permit and a bulkhead slot (with a thread waiting for it) held by
    threads of the parent at fork: in the child, where those threads do not exist, the
    breaker must take a probe again and the bulkhead must have its slot, not refuse every
    call for good. Found by review."""
    report = run_scenario("thread_owned_state")
    child = finished(report["child"])
    assert child["probe"] == "probed" and child["state"] == "closed"
    assert child["slots"] == ["slot", "slot"] and child["in_use"] == 0
    assert report["parent_in_use"] == 0  # the parent's holders and waiter all finished


def test_sibling_workers_do_not_share_half_open_permits() -> None:
    """A fleet-wide breaker leases HALF_OPEN probe permits in Redis under ids made of a
    per-breaker random prefix and a counter. Workers forked from one master inherit both,
    so their n-th permits have the same id, and Redis counts one lease for all of them:
    with ``half_open_max_calls=2``, three workers all get to probe."""
    report = run_scenario("permit_ids_after_fork")
    granted = [finished(child)["granted"] for child in report["children"]]
    assert granted == [True, True, False]


# -- gunicorn --preload under opentelemetry-instrument ------------------------------------


REDIS_TIMEOUT = 1.0
"""The app's Redis socket timeout, which its healthy commands must beat on a loaded machine
too (0.6 s left them little margin)."""
REDIS_PAUSE_MS = 1800
"""A pause of 1.8x the app's socket timeout, issued before the requests: a worker's GET that
reaches the server within 0.8 s of it times out once (1.5x of 0.6 s allowed 0.3 s), and its
retry, sent as that timeout fires, is answered when the pause ends, within its own."""


@dataclass
class Gunicorn:
    """``opentelemetry-instrument gunicorn --preload -w 2 fork_app:app``, its log, its URL."""

    environ: dict[str, str]
    url: str = ""
    log: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None

    def start(self) -> Gunicorn:
        command = [str(BIN / "opentelemetry-instrument"), str(BIN / "gunicorn"), "--preload"]
        command += ["--workers", "2", "--bind", "127.0.0.1:0", "--graceful-timeout", "5"]
        command += ["--no-control-socket", "--chdir", str(HERE), "fork_app:app"]
        self.process = subprocess.Popen(
            command, env=self.environ, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        stderr = self.process.stderr
        assert stderr is not None
        threading.Thread(target=lambda: self.log.extend(stderr), daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            booted = sum("Booting worker" in line for line in self.log)
            found = [re.search(r"Listening at: (http://\S+)", line) for line in self.log]
            urls = [match.group(1) for match in found if match]
            if urls and booted == 2:
                self.url = urls[0]
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError("gunicorn did not start:\n" + "".join(self.log))

    def get(self, query: str = "") -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/?{query}", timeout=20) as response:
            return dict(json.loads(response.read()))

    def concurrently(self, count: int, query: str = "") -> list[dict[str, Any]]:
        """``count`` requests at once: with every sync worker busy on one, each worker
        gets one."""
        answers: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=lambda: answers.append(self.get(query))) for _ in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(answers) == count, "".join(self.log)
        return answers

    def stop(self) -> int | None:
        """SIGTERM, as a deployment stops it; the exit code (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


@pytest.fixture
def gunicorn_env() -> Iterator[tuple[OtlpReceiver, PrivateRedis, PgFront]]:
    if not (BIN / "gunicorn").exists() or not (BIN / "opentelemetry-instrument").exists():
        pytest.skip("gunicorn and opentelemetry-instrument are needed in the venv")
    if shutil.which("redis-server") is None:
        pytest.skip("the redis-server binary is needed for a private Redis")
    require_postgres()
    with OtlpReceiver() as receiver:
        redis = PrivateRedis()
        front = PgFront()
        try:
            yield receiver, redis, front
        finally:
            front.close()
            redis.close()


def worker_of(spans: list[ReceivedSpan], span: ReceivedSpan) -> int:
    """The pid of the worker whose request ``span`` belongs to (its server span says)."""
    (server,) = [s for s in spans if s.trace_id == span.trace_id and s.kind == "SERVER"]
    return int(server.attributes["app.worker.pid"])


@pytest.mark.slow
def test_gunicorn_preload_workers_recover_export_and_shut_down_cleanly(
    gunicorn_env: tuple[OtlpReceiver, PrivateRedis, PgFront],
) -> None:
    """The app is imported, and makes its first Redis and PostgreSQL calls, in the master;
    the SDK (batch span processor, periodic metric reader calling our breaker gauges every
    0.2 s) runs there before the fork. Both workers must then serve, recover their own
    faults (a Redis pause each: a retried GET; a PostgreSQL server starting up: a retried
    connect), and, on SIGTERM, exit in time with their spans flushed: the batch delay is a
    minute, so the spans arrive only through each worker's atexit shutdown."""
    receiver, redis, front = gunicorn_env
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(
        OTEL_SERVICE_NAME="otel-recovery-fork",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_RECOVERY_BACKOFF_INITIAL="0.01",
        OTEL_RECOVERY_BACKOFF_MAX="0.05",
        APP_KEY=f"otelrec-fork-{uuid.uuid4().hex[:8]}",
        REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        REDIS_TIMEOUT=str(REDIS_TIMEOUT),
        PG_DSN=f"host=127.0.0.1 port={front.port} user=postgres dbname=test"
        " sslmode=disable gssencmode=disable",  # one TCP connection per attempt
        PYTHONUNBUFFERED="1",
    )
    server = Gunicorn(environ).start()
    try:
        warm = server.concurrently(2, "sleep=0.3")
        workers = {answer["pid"] for answer in warm}
        assert len(workers) == 2, warm
        assert all(a["cache"] == "cached" and a["row"] == 42 for a in warm)

        assert redis.admin().execute_command("CLIENT", "PAUSE", REDIS_PAUSE_MS, "ALL")
        paused = server.concurrently(2)
        assert {answer["pid"] for answer in paused} == workers, paused
        assert all(a["cache"] == "cached" and a["row"] == 42 for a in paused)
        time.sleep(REDIS_PAUSE_MS / 1000)

        front.starting_up = front.accepted + 1  # the next connection: FATAL 57P03
        connected = server.get()
        assert connected["row"] == 42
    finally:
        code = server.stop()
    log = "".join(server.log)
    assert code == 0, log
    assert "Traceback" not in log and "otel_recovery internal error" not in log, log
    assert "WORKER TIMEOUT" not in log and "SIGKILL" not in log, log
    assert log.count("Worker exiting") == 2, log

    def exported(spans: list[ReceivedSpan]) -> bool:
        return sum(s.kind == "SERVER" for s in spans) >= 5

    spans = [s for s in receiver.wait_for(exported, 10) if s.service_name == "otel-recovery-fork"]
    assert receiver.errors == []
    served = sorted(int(s.attributes["app.worker.pid"]) for s in spans if s.kind == "SERVER")
    assert set(served) == workers and len(served) == 5

    recovered_gets = [
        s
        for s in spans
        if s.name == "GET"
        and s.kind == "CLIENT"
        and s.attributes.get("otel_recovery.outcome") == "success"
    ]
    assert {worker_of(spans, s) for s in recovered_gets} == workers
    for span in recovered_gets:
        assert span.attributes["otel_recovery.retry.attempts"] == 2
        assert span.attributes["otel_recovery.policy.name"] == f"redis 127.0.0.1:{redis.port}"
        assert span.event_names().count("otel_recovery.attempt.failed") == 1

    (connect,) = [s for s in spans if s.name == f"recover psycopg 127.0.0.1:{front.port}"]
    assert connect.attributes["otel_recovery.outcome"] == "success"
    assert connect.attributes["otel_recovery.retry.attempts"] == 2
    assert worker_of(spans, connect) == connected["pid"]
