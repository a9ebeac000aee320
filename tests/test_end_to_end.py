"""End to end: ``opentelemetry-instrument python examples/service/app.py`` against real faults.

The example service runs in a subprocess exactly as a user runs it: no recovery code of its
own, auto-instrumented by the ``opentelemetry_instrumentor`` entry points (contrib's and ours),
exporting over OTLP/HTTP to an in-process receiver. The test drives ``/work`` while it injects
real faults, one phase (one request id, one trace) per fault:

- HTTP: the flaky downstream answers 503, 429 with ``Retry-After: 1``, or resets the connection,
  on the first attempt of a chosen id only, and counts the attempts it really received;
- Redis: a TCP proxy in front of a private redis-server stops answering the phase's first
  command (the GET) until the app gives up on that connection, so the first GET times out
  and a retry, on a new connection, succeeds (never touching the shared server);
- PostgreSQL: a TCP proxy in front of the real server resets the next connection, so the
  connection phase fails once and a reconnect succeeds.

It then checks what a user would look for in Jaeger: ``recover ...`` spans with
``otel_recovery.*`` events and attributes, ``http.request.resend_count`` on the resent client
span, one logical Redis span annotated with the retry, and nothing extra on the happy path.
A second run with ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_recovery_redis`` proves the
switch: the Redis fault now surfaces untouched while HTTP and PostgreSQL still recover.

Needs PostgreSQL on 127.0.0.1:5432 and the ``redis-server`` binary; skips with the reason when
either is missing, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from servers import free_port, redis_process_id

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "service" / "app.py"
DOWNSTREAM = ROOT / "examples" / "service" / "downstream.py"
BIN = Path(sys.executable).parent
PG = ("127.0.0.1", 5432)
REDIS_TIMEOUT = 1.0
"""The app's Redis socket timeout: how long the stalled first GET waits before it fails (the
stall lasts until it has, so this costs time only). The app's healthy commands must beat it
on a loaded machine too: 0.6 s left them little margin."""

pytestmark = [pytest.mark.server, pytest.mark.slow]


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true where every server is supposed to be up."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def load_downstream() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_downstream", DOWNSTREAM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# -- fault injectors -----------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a free port: server-wide faults hurt nobody else."""

    def __init__(self, tmp: Path) -> None:
        self.port = 0
        self._tmp = tmp
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateRedis:
        for _ in range(3):  # another process may take the free port before our server binds it
            if self._start(free_port()):
                return self
        raise RuntimeError("could not start a private redis-server")

    def _start(self, port: int) -> bool:
        executable = shutil.which("redis-server")
        assert executable is not None
        self.port = port
        self._process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self._tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        # Ours, not whichever server took the port first (the other xdist worker's): a
        # connect to the port succeeds all the same, the pid the server reports does not.
        while redis_process_id("127.0.0.1", port, timeout=0.2) != self._process.pid:
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.__exit__()
                return False
            time.sleep(0.05)
        return True

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class FlakyTcpProxy:
    """Forwards to a server; injects the faults of a network between the app and it.

    ``fail_next(n)`` resets (RST) the next n connections at once: before PostgreSQL's startup
    handshake that is a connection-phase failure, where the statement cannot have run, so
    the SQL safety rule allows a retry. ``stall_next()`` holds the next data any client sends
    and forwards nothing more on that connection until the client closes it: a server that
    stopped answering mid-call, for exactly as long as the client waits, however late the
    call comes (a timed ``CLIENT PAUSE`` issued before the request could be over before a
    slow app sent its GET). The counters prove how many connections (attempts) the client
    really made.
    """

    def __init__(self, target: tuple[str, int], name: str = "proxy") -> None:
        self.target = target
        self.name = name
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._to_fail = 0
        self._to_stall = False
        self.resets = 0
        self.forwarded = 0
        self.stalled = 0
        self._open: list[socket.socket] = []

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._to_fail = count

    def stall_next(self) -> None:
        with self._lock:
            self._to_stall = True

    def _stalls(self) -> bool:
        """Whether the data just read is the one to hold (once per ``stall_next()``)."""
        with self._lock:
            stall, self._to_stall = self._to_stall, False
            self.stalled += stall
            return stall

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.resets, self.forwarded

    def __enter__(self) -> FlakyTcpProxy:
        threading.Thread(target=self._accept, name=self.name, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                failing = self._to_fail > 0
                if failing:
                    self._to_fail -= 1
                    self.resets += 1
                else:
                    self.forwarded += 1
            if failing:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for src, dst, outbound in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(src, dst, outbound), daemon=True)
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if outbound and self._stalls():
                    while src.recv(65536):  # held, and nothing after it, until the client goes
                        pass
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


# -- the app under opentelemetry-instrument -------------------------------------------------


@dataclass
class Run:
    """What one app run produced: answers per phase, exported spans, the app's stderr."""

    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    http_attempts: dict[str, int] = field(default_factory=dict)
    pg_connections: dict[str, tuple[int, int]] = field(default_factory=dict)
    spans: list[ReceivedSpan] = field(default_factory=list)
    stderr: str = ""
    receiver_errors: list[str] = field(default_factory=list)

    def trace(self, phase: str) -> list[ReceivedSpan]:
        """The spans of the trace the phase's request started (found by its request id)."""
        request_id = self.ids[phase]
        roots = [s for s in self.spans if s.attributes.get("app.request.id") == request_id]
        assert len(roots) == 1, f"{phase}: expected one server span, got {len(roots)}"
        return [s for s in self.spans if s.trace_id == roots[0].trace_id]

    def recovered_by(self, phase: str, port: int) -> list[ReceivedSpan]:
        """Spans of the phase's trace whose recovery policy targets 127.0.0.1:<port>."""
        suffix = f"127.0.0.1:{port}"
        return [
            s
            for s in self.trace(phase)
            if str(s.attributes.get("otel_recovery.policy.name", "")).endswith(suffix)
        ]


@dataclass
class Env:
    receiver: OtlpReceiver
    downstream: Any
    redis: PrivateRedis
    proxy: FlakyTcpProxy
    redis_proxy: FlakyTcpProxy
    key_prefix: str


def app_environment(env: Env, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base.update(
        OTEL_SERVICE_NAME="otel-recovery-e2e",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=env.receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
        APP_HOST="127.0.0.1",
        APP_PORT="0",
        DOWNSTREAM_URL=env.downstream.url,
        REDIS_URL=f"redis://127.0.0.1:{env.redis_proxy.port}/0",
        PG_DSN=(
            f"postgresql://postgres@127.0.0.1:{env.proxy.port}/test"
            "?sslmode=disable&gssencmode=disable"  # one TCP connection per attempt
        ),
        REDIS_TIMEOUT=str(REDIS_TIMEOUT),
        APP_KEY_PREFIX=env.key_prefix,
        PYTHONUNBUFFERED="1",
    )
    base.update(extra)
    return base


class AppProcess:
    """``opentelemetry-instrument python app.py``; waits for its 'listening on' line."""

    def __init__(self, environ: dict[str, str], stderr_path: Path) -> None:
        self._environ = environ
        self._stderr_path = stderr_path
        self.url = ""

    def __enter__(self) -> AppProcess:
        self._stderr = self._stderr_path.open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "opentelemetry-instrument"), sys.executable, str(APP)],
            cwd=ROOT,
            env=self._environ,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if " listening on " in line:
                self.url = line.strip().rsplit(" ", 1)[-1]
                return self
        output = self.stderr()
        self.__exit__()
        raise AssertionError(f"the example app did not start:\n{output}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")

    def work(self, request_id: str) -> dict[str, Any]:
        url = f"{self.url}/work?id={request_id}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:  # 502: a dependency failed; the body says which
            return dict(json.loads(error.read()))
        except OSError as error:  # the app died or hung: show why
            raise AssertionError(f"GET {url} failed ({error}); app stderr:\n{self.stderr()}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def exercise(env: Env, tmp: Path, name: str, phases: list[str], **extra: str) -> Run:
    """Start the app, run each phase with its fault, collect the spans of every phase."""
    fault = env.downstream.Fault
    run = Run()
    environ = app_environment(env, **extra)
    with AppProcess(environ, tmp / f"{name}.stderr") as app:
        for phase in phases:
            request_id = f"{name}-{phase}-{uuid.uuid4().hex[:6]}"
            run.ids[phase] = request_id
            if phase in ("http503", "http429", "reset"):
                kind = {"http503": "503", "http429": "429", "reset": "reset"}[phase]
                env.downstream.server.force(request_id, fault(kind, 1))
            else:
                env.downstream.server.force(request_id, fault("ok"))
            before = env.proxy.counts()
            stalls = env.redis_proxy.stalled
            if phase == "redis":
                env.redis_proxy.stall_next()
            if phase == "pg":
                env.proxy.fail_next(1)
            run.responses[phase] = app.work(request_id)
            after = env.proxy.counts()
            run.pg_connections[phase] = (after[0] - before[0], after[1] - before[1])
            run.http_attempts[phase] = env.downstream.server.attempts(request_id)
            if phase == "redis":
                assert env.redis_proxy.stalled == stalls + 1, "the stall met this phase's GET"

        wanted = set(run.ids.values())

        def all_phases_exported(spans: list[ReceivedSpan]) -> bool:
            return wanted <= {s.attributes.get("app.request.id") for s in spans}

        env.receiver.wait_for(all_phases_exported, timeout=15)
        run.stderr = app.stderr()
    run.spans = [s for s in env.receiver.spans() if s.service_name == "otel-recovery-e2e"]
    run.receiver_errors = list(env.receiver.errors)
    env.receiver.clear()
    return run


@dataclass
class Downstream:
    server: Any
    Fault: Any

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def port(self) -> int:
        return int(self.server.port)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if shutil.which("redis-server") is None:
        unavailable("the redis-server binary is not installed (needed for a private Redis)")
    if not reachable(PG):
        unavailable("PostgreSQL is not reachable on 127.0.0.1:5432")
    if not (BIN / "opentelemetry-instrument").exists():
        unavailable("opentelemetry-instrument is not installed (pip install -e '.[test]')")
    if not importlib.metadata.entry_points(group="opentelemetry_configurator"):
        unavailable(
            "no OpenTelemetry configurator is installed, so opentelemetry-instrument would set "
            "up no SDK and export nothing (pip install opentelemetry-distro)"
        )
    module = load_downstream()
    tmp = tmp_path_factory.mktemp("e2e")
    with (
        OtlpReceiver() as receiver,
        module.FlakyDownstream(["ok"]) as server,
        PrivateRedis(tmp) as redis,
        FlakyTcpProxy(PG, "pg-proxy") as proxy,
        FlakyTcpProxy(("127.0.0.1", redis.port), "redis-proxy") as redis_proxy,
    ):
        yield Env(
            receiver=receiver,
            downstream=Downstream(server, module.Fault),
            redis=redis,
            proxy=proxy,
            redis_proxy=redis_proxy,
            key_prefix=f"otel-recovery-e2e-{uuid.uuid4().hex[:8]}",
        )


@pytest.fixture(scope="module")
def all_on(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Run:
    phases = ["ok", "http503", "http429", "reset", "redis", "pg"]
    return exercise(env, tmp_path_factory.mktemp("all-on"), "all-on", phases)


@pytest.fixture(scope="module")
def redis_off(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return exercise(
        env,
        tmp_path_factory.mktemp("redis-off"),
        "redis-off",
        ["ok", "http503", "redis", "pg"],
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="otel_recovery_redis",
    )


# -- helpers for assertions -----------------------------------------------------------------


def recovery_marks(span: ReceivedSpan) -> list[str]:
    """Every otel_recovery attribute key and event name on a span."""
    keys = [key for key in span.attributes if key.startswith("otel_recovery.")]
    return keys + [name for name in span.event_names() if name.startswith("otel_recovery.")]


def redis_spans(spans: list[ReceivedSpan], command: str) -> list[ReceivedSpan]:
    """contrib's Redis CLIENT spans for ``command`` (an HTTP GET span is also named GET)."""
    return [
        s
        for s in spans
        if s.name == command
        and s.kind == "CLIENT"
        and "redis" in (s.attributes.get("db.system"), s.attributes.get("db.system.name"))
    ]


def http_client_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [
        s
        for s in spans
        if s.kind == "CLIENT"
        and ("http.method" in s.attributes or "http.request.method" in s.attributes)
    ]


def assert_http_recovered(run: Run, phase: str, port: int) -> ReceivedSpan:
    """One retry on the wire, a successful ``recover`` span, resend_count on the resend."""
    response = run.responses[phase]
    assert response["results"]["downstream"] == "ok", response
    assert run.http_attempts[phase] == 2, "the downstream must see exactly two attempts"
    recoveries = run.recovered_by(phase, port)
    assert len(recoveries) == 1, [s.name for s in run.trace(phase)]
    recovery = recoveries[0]
    assert recovery.name.startswith("recover "), recovery.name
    assert recovery.kind == "INTERNAL"
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert recovery.status != "ERROR", "a recovered call is not an error"
    assert "otel_recovery.attempt.failed" in recovery.event_names()
    assert "otel_recovery.retry" in recovery.event_names()
    clients = http_client_spans(run.trace(phase))
    assert len(clients) == 2, "one contrib CLIENT span per attempt"
    resent = [s for s in clients if "http.request.resend_count" in s.attributes]
    assert len(resent) == 1 and resent[0].attributes["http.request.resend_count"] == 1
    assert resent[0].parent_span_id == recovery.span_id, "the resend nests under the recovery"
    return recovery


# -- everything on ---------------------------------------------------------------------------


def test_instrumentation_loads_cleanly(all_on: Run, redis_off: Run):
    for run in (all_on, redis_off):
        assert "Traceback" not in run.stderr, run.stderr
        assert "otel_recovery internal error" not in run.stderr, run.stderr
        assert "Failed to auto initialize" not in run.stderr, run.stderr
        assert run.receiver_errors == [], "every OTLP export must decode"


def test_happy_path_adds_nothing(all_on: Run, env: Env):
    response = all_on.responses["ok"]
    assert set(response["results"].values()) == {"ok"}, response
    assert all_on.http_attempts["ok"] == 1
    assert all_on.pg_connections["ok"] == (0, 1)
    spans = all_on.trace("ok")
    names = {s.name for s in spans}
    assert {"GET /work", "GET", "SET"} <= names, names
    assert len(redis_spans(spans, "GET")) == 1 and len(http_client_spans(spans)) == 1
    assert not any(name.startswith("recover ") for name in names), names
    assert all(recovery_marks(s) == [] for s in spans), [recovery_marks(s) for s in spans]


def test_http_503_is_retried_with_resend_count(all_on: Run, env: Env):
    assert_http_recovered(all_on, "http503", env.downstream.port)


def test_http_429_waits_for_retry_after(all_on: Run, env: Env):
    recovery = assert_http_recovered(all_on, "http429", env.downstream.port)
    retries = recovery.events_named("otel_recovery.retry")
    assert len(retries) == 1
    backoff = retries[0].attributes["otel_recovery.retry.backoff"]
    assert 1.0 <= backoff <= 2.0, f"Retry-After: 1 asks for at least 1 s, slept {backoff}"
    assert all_on.responses["http429"]["seconds"] >= 1.0


def test_http_reset_is_retried(all_on: Run, env: Env):
    recovery = assert_http_recovered(all_on, "reset", env.downstream.port)
    failed = recovery.events_named("otel_recovery.attempt.failed")
    assert failed and failed[0].attributes.get("otel_recovery.error.retryable") is not False


def test_redis_timeout_is_retried_inside_one_logical_span(all_on: Run, env: Env):
    response = all_on.responses["redis"]
    assert response["results"]["redis_get"] == "ok", response
    spans = all_on.trace("redis")
    gets = redis_spans(spans, "GET")
    assert len(gets) == 1, "the DB conventions want one span for the logical operation"
    get = gets[0]
    assert get.attributes["otel_recovery.outcome"] == "success", get.attributes
    assert get.attributes["otel_recovery.retry.attempts"] == 2
    assert str(get.attributes["otel_recovery.policy.name"]).endswith(f":{env.redis_proxy.port}")
    assert "otel_recovery.attempt.failed" in get.event_names()
    assert get.status != "ERROR"
    assert not any(s.name.startswith("recover ") for s in spans), "no extra span for Redis"


def test_postgres_connection_reset_is_retried(all_on: Run, env: Env):
    response = all_on.responses["pg"]
    assert response["results"]["postgres"] == "ok", response
    assert all_on.pg_connections["pg"] == (1, 1), "one reset, then one good connection"
    recoveries = all_on.recovered_by("pg", env.proxy.port)
    assert len(recoveries) == 1, [(s.name, s.attributes) for s in all_on.trace("pg")]
    recovery = recoveries[0]
    # contrib makes no span for connecting, so the recovered connect gets a span of its own
    assert recovery.name.startswith("recover ") and recovery.kind == "INTERNAL", recovery.name
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    failed = recovery.events_named("otel_recovery.attempt.failed")
    assert len(failed) == 1 and failed[0].attributes["otel_recovery.error.kind"] == "connection"
    assert all(s.status != "ERROR" for s in all_on.trace("pg"))
    assert len([s for s in all_on.trace("pg") if s.name == "SELECT"]) == 1, "the query ran once"


# -- otel_recovery_redis disabled ------------------------------------------------------------


def test_disabled_redis_recovery_stays_off(all_on: Run, redis_off: Run, env: Env):
    # The same fault was recovered while otel_recovery_redis was on: the switch made the change.
    assert all_on.responses["redis"]["results"]["redis_get"] == "ok"
    response = redis_off.responses["redis"]
    assert response["results"]["redis_get"].startswith("TimeoutError"), response
    marked = [
        s
        for s in redis_off.spans
        if f":{env.redis_proxy.port}" in str(s.attributes.get("otel_recovery.policy.name", ""))
    ]
    assert marked == [], "no Redis recovery may happen while otel_recovery_redis is disabled"
    gets = redis_spans(redis_off.trace("redis"), "GET")
    assert len(gets) == 1 and gets[0].status == "ERROR", "contrib still traces the failure"
    assert recovery_marks(gets[0]) == []


def test_other_recovery_still_works_with_redis_disabled(redis_off: Run, env: Env):
    assert_http_recovered(redis_off, "http503", env.downstream.port)
    assert redis_off.responses["pg"]["results"]["postgres"] == "ok"
    assert redis_off.pg_connections["pg"] == (1, 1)
    recoveries = redis_off.recovered_by("pg", env.proxy.port)
    assert len(recoveries) == 1 and recoveries[0].attributes["otel_recovery.outcome"] == "success"
