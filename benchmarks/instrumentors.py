"""What the auto-instrumentors cost on the happy path: Redis GET, PostgreSQL SELECT 1, HTTP GET.

Four modes, side by side in one run, against real servers on loopback:

- ``bare``: the client libraries alone;
- ``contrib``: plus the OpenTelemetry SDK (a ``TracerProvider`` with a ``BatchSpanProcessor``
  and an SDK ``MeterProvider``, as a deployment has them) and the contrib instrumentations
  (redis, psycopg, requests);
- ``recovery``: the same plus otel-recovery's instrumentors for the three libraries;
- ``control``: ``contrib`` again, an A/A comparison: its difference from ``contrib`` is pure
  noise, printed next to the real figures so the reader knows the resolution of the run.

The figure that matters is *recovery over contrib*: what a user who already runs contrib
instrumentation pays for otel-recovery on every successful call. Targets (issue 4): at most
2 % added to contrib-only p50 on Redis GET, and at most 1 us of CPU per call.

Method, and why (DESIGN.md section 9: the machine is shared and noisy):

- **Two worker processes**: ``bare`` (no OpenTelemetry at all) and ``instrumented`` (SDK and
  contrib for good). In the instrumented worker otel-recovery is instrumented before each
  ``recovery`` batch and uninstrumented before each ``contrib``/``control`` batch.
  Why not one process per mode: two identical contrib-only processes differ by several
  microseconds of CPU per call (memory layout, hash seeds, which core they land on), more
  than the effect we must resolve (1 us). Toggling in one process removes that bias, and it is
  sound here because otel-recovery's uninstrument removes exactly its own wrapt layer (the
  worker checks after every uninstrument that no otel_recovery wrapper is left on the patched
  attributes and stops if one is) and every batch makes fresh clients after the switch, since
  instrumentation may bind at connect time. Contrib cannot be toggled that way (its
  ``unwrap`` takes whatever is on top, and the tracer provider is set once), hence the
  separate bare process; its figure is context, not the target.
- **Interleaved rounds**: in each round one batch per (target, mode), the mode order rotating
  from round to round, each batch after a short untimed warm-up. Only one batch runs at a time;
  a burst of noise lands on every mode alike.
- **Paired statistics**: latency percentiles pool every call of a (target, mode); the *added*
  figures are medians over rounds of per-round differences (p50 ratio, CPU us per call),
  which cancels slow drifts of the machine.
- CPU per call is ``time.process_time`` over a batch (including the flush of its spans by the
  batch span processor's thread, a cost the instrumentation really causes) divided by its
  calls.
- Known bias, in otel-recovery's favour and tiny: the span processor that stamps
  ``http.request.resend_count`` stays on the tracer provider once added (the SDK cannot remove
  a processor), so ``contrib`` batches after the first toggle pay its ``on_start`` too (one
  context-variable read per span).
- Verdicts against the targets say ``met`` or ``MISSED`` only when the A/A difference of the
  same run, taken as the margin of error, could not flip them; otherwise ``inconclusive``.
- The HTTP server is a minimal asyncio responder in a process of its own, so the client side
  dominates what is measured.

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432)::

    python benchmarks/instrumentors.py            # full run, one to two minutes
    python benchmarks/instrumentors.py --quick    # smoke run, a few seconds

A target whose server is unreachable is left out with a note. It reports and never asserts:
the exit status is 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("bare", "contrib", "control", "recovery")
"""``control`` is a second contrib-only process: contrib vs control is an A/A comparison whose
differences are pure noise, printed next to the real ones so the reader knows the resolution."""
TARGETS = ("redis", "postgres", "http")
TARGET_LABELS = {"redis": "Redis GET", "postgres": "PostgreSQL SELECT 1", "http": "HTTP GET"}
REDIS = ("127.0.0.1", 6379)
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG = ("127.0.0.1", 5432)
TARGET_P50_PERCENT = 2.0
TARGET_CPU_US = 1.0
OURS = {
    "redis": ("otel_recovery.instrumentors.redis", "RedisRecoveryInstrumentor"),
    "postgres": ("otel_recovery.instrumentors.psycopg", "PsycopgRecoveryInstrumentor"),
    "http": ("otel_recovery.instrumentors.requests", "RequestsRecoveryInstrumentor"),
}
BATCH_WARMUP = 20
"""Untimed calls before each batch: the new client's connection, and the mode's code paths."""
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


# -- the local HTTP server (its own process) -------------------------------------------------


class _HttpResponder(asyncio.Protocol):
    """Answers every request on a keep-alive connection with a fixed 200 (GETs have no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(HTTP_RESPONSE)


async def _serve_http() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HttpResponder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    server.close()


# -- the workers ----------------------------------------------------------------------------


class _CountingExporter:
    """A span exporter that only counts: the export path runs, nothing leaves the process."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _our_layers(value: object) -> int:
    """How many otel_recovery wrappers sit in the wrapt chain of a patched attribute."""
    from otel_recovery.instrumentors._wrapping import _wrapper_module

    count, node, seen = 0, value, 0
    while node is not None and seen < 20:
        if _wrapper_module(node).startswith("otel_recovery"):  # a wrapt proxy or a layer
            count += 1
        node, seen = getattr(node, "__wrapped__", None), seen + 1
    return count


class Worker:
    """Runs batches on request (JSON lines on stdin/stdout).

    ``bare`` has no OpenTelemetry at all. ``instrumented`` has the SDK and the contrib
    instrumentations for good, and instruments otel-recovery for ``recovery`` batches only,
    uninstrumenting it for ``contrib`` and ``control`` batches (see the module docstring).
    """

    def __init__(self, kind: str, targets: Sequence[str], http_port: int) -> None:
        self.kind = kind
        self.http_port = http_port
        self.notes: list[str] = []
        self.missing: list[str] = []
        self.exporter: _CountingExporter | None = None
        self.provider: Any = None
        self.ours: dict[str, Any] = {}
        self.ours_on = False
        self.patched: list[tuple[Any, str]] = []
        if kind == "instrumented":
            self._set_up_sdk()
            self._instrument_contrib(targets)
            self._load_ours(targets)

    def _set_up_sdk(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.exporter = _CountingExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))  # type: ignore[arg-type]
        trace.set_tracer_provider(self.provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))

    def _instrument_contrib(self, targets: Sequence[str]) -> None:
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        contrib: dict[str, Any] = {
            "redis": RedisInstrumentor,
            "postgres": PsycopgInstrumentor,
            "http": RequestsInstrumentor,
        }
        for target in targets:
            contrib[target]().instrument()

    def _load_ours(self, targets: Sequence[str]) -> None:
        for target in targets:
            module_name, class_name = OURS[target]
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                self.notes.append(f"{module_name} not importable ({error})")
                self.missing.append(target)
                continue
            self.ours[target] = getattr(module, class_name)()

    def set_recovery(self, on: bool) -> None:
        """Instrument or uninstrument otel-recovery; prove that uninstrument removed it."""
        if on == self.ours_on:
            return
        for instrumentor in self.ours.values():
            if on:
                instrumentor.instrument()
                patches = getattr(instrumentor, "_patches", None)
                for item in getattr(patches, "_installed", ()):
                    if (item.owner, item.attribute) not in self.patched:
                        self.patched.append((item.owner, item.attribute))
            else:
                instrumentor.uninstrument()
        self.ours_on = on
        if not on:
            left = [
                f"{getattr(owner, '__name__', owner)}.{attribute}"
                for owner, attribute in self.patched
                if _our_layers(getattr(owner, attribute, None))
            ]
            if left:
                raise RuntimeError(f"uninstrument left otel_recovery wrappers on {left}")

    def client(self, target: str) -> tuple[Callable[[], object], Callable[[], object]]:
        """A fresh client (made after the mode switch, as instrumentation may bind at
        connect time): the call to time, and how to close the client."""
        if target == "redis":
            import redis

            client = redis.Redis(*REDIS, socket_timeout=5)
            key = f"otel-recovery-bench:{uuid.uuid4().hex}"
            client.set(key, "x" * 64, ex=600)

            def close_redis() -> None:
                client.delete(key)
                client.close()

            return (lambda: client.get(key)), close_redis
        if target == "postgres":
            import psycopg

            connection = psycopg.connect(PG_DSN, autocommit=True)
            return (lambda: connection.execute("SELECT 1").fetchone()), connection.close
        import requests

        session = requests.Session()
        session.trust_env = False  # no proxy lookups from the environment on every call
        url = f"http://127.0.0.1:{self.http_port}/"
        return (lambda: session.get(url).content), session.close

    def batch(self, target: str, mode: str, calls: int, warmup: int) -> dict[str, Any]:
        self.set_recovery(mode == "recovery" and self.kind == "instrumented")
        call, close = self.client(target)
        try:
            for _ in range(warmup):  # connections, caches and code paths of this mode
                call()
            if self.provider is not None:
                self.provider.force_flush()
            latencies = [0] * calls
            clock = time.perf_counter_ns
            spans_before = self.exporter.count if self.exporter else 0
            gc.collect()  # garbage of the previous batch is not this batch's cost
            cpu_start = time.process_time_ns()
            for index in range(calls):
                started = clock()
                call()
                latencies[index] = clock() - started
            if self.provider is not None:
                self.provider.force_flush()  # exporting this batch's spans is part of its cost
            cpu = time.process_time_ns() - cpu_start
            spans = (self.exporter.count if self.exporter else 0) - spans_before
        finally:
            close()
        return {"latencies": latencies, "cpu_ns": cpu, "spans": spans}


def run_worker(kind: str, targets: Sequence[str], http_port: int, warmup: int) -> None:
    worker = Worker(kind, targets, http_port)
    modes = ("bare",) if kind == "bare" else ("contrib", "recovery")
    for mode in modes:  # a first pass through every code path, results discarded
        for target in targets:
            worker.batch(target, mode, warmup, 0)
    _send(sys.stdout, {"ready": True, "notes": worker.notes, "missing": worker.missing})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        result = worker.batch(request["target"], request["mode"], request["calls"], BATCH_WARMUP)
        _send(sys.stdout, result)


def _send(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


# -- the parent: rounds, statistics, the table -----------------------------------------------


@dataclass
class Series:
    """Everything measured for one (target, mode)."""

    latencies_ns: list[int] = field(default_factory=list)
    round_p50_ns: list[float] = field(default_factory=list)
    round_cpu_ns: list[float] = field(default_factory=list)
    calls: int = 0
    spans: int = 0

    def add(self, result: dict[str, Any]) -> None:
        latencies = result["latencies"]
        self.latencies_ns.extend(latencies)
        self.round_p50_ns.append(statistics.median(latencies))
        self.round_cpu_ns.append(result["cpu_ns"] / len(latencies))
        self.calls += len(latencies)
        self.spans += result["spans"]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def child_environment() -> dict[str, str]:
    """The parent's environment without OTEL_* settings that would reconfigure the SDK."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OTEL_") or key.startswith("OTEL_RECOVERY_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-http"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_environment(),
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class WorkerProcess:
    def __init__(self, kind: str, targets: Sequence[str], http_port: int, warmup: int) -> None:
        self.kind = kind
        command = [sys.executable, __file__, "--worker", kind, "--targets", ",".join(targets)]
        command += ["--http-port", str(http_port), "--warmup", str(warmup)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_environment(),
        )
        self.notes: list[str] = []
        self.missing: list[str] = []

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited (code {self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    def ready(self) -> None:
        message = self.receive()
        self.notes, self.missing = message["notes"], message["missing"]

    def batch(self, target: str, mode: str, calls: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        _send(self.process.stdin, {"target": target, "mode": mode, "calls": calls})
        return self.receive()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                _send(self.process.stdin, {"stop": True})
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure(
    targets: Sequence[str], rounds: int, calls: int, warmup: int
) -> tuple[dict[tuple[str, str], Series], list[str], set[str]]:
    series = {(target, mode): Series() for target in targets for mode in MODES}
    with http_server() as http_port:
        workers = {
            kind: WorkerProcess(kind, targets, http_port, warmup)
            for kind in ("bare", "instrumented")
        }
        try:
            for worker in workers.values():
                worker.ready()
            rotation = itertools.cycle(range(len(MODES)))
            for _ in range(rounds):
                for target in targets:
                    start = next(rotation)
                    for mode in MODES[start:] + MODES[:start]:
                        worker = workers["bare" if mode == "bare" else "instrumented"]
                        series[(target, mode)].add(worker.batch(target, mode, calls))
        finally:
            for worker in workers.values():
                worker.stop()
    notes = [note for worker in workers.values() for note in worker.notes]
    missing = {target for worker in workers.values() for target in worker.missing}
    return series, notes, missing


def paired(
    series: dict[tuple[str, str], Series], target: str, base: str, other: str
) -> tuple[float, float]:
    """Median over rounds of (other p50 / base p50 - 1) in %, and of the CPU us added."""
    a, b = series[(target, base)], series[(target, other)]
    ratios = [(y / x - 1.0) * 100.0 for x, y in zip(a.round_p50_ns, b.round_p50_ns, strict=True)]
    cpu = [(y - x) / 1000.0 for x, y in zip(a.round_cpu_ns, b.round_cpu_ns, strict=True)]
    return statistics.median(ratios), statistics.median(cpu)


def judge(added: float, noise: float, target: float, unit: str) -> str:
    """``met`` or ``MISSED`` only when the A/A noise cannot flip the answer."""
    margin = abs(noise)
    if added - margin > target:
        return "MISSED"
    if added + margin <= target:
        return "met"
    return f"inconclusive, A/A noise is {noise:+.2f} {unit}"


def report(
    series: dict[tuple[str, str], Series],
    targets: Sequence[str],
    rounds: int,
    calls: int,
    notes: list[str],
    missing: set[str],
    command: str,
) -> None:
    print(f"# command: {command}")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"# python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load}; "
        f"{rounds} rounds x {calls} calls per target and mode"
    )
    print()
    print("| target | mode | p50 us | p99 us | CPU us/call | spans/call |")
    print("|---|---|---:|---:|---:|---:|")
    for target in targets:
        for mode in MODES:
            s = series[(target, mode)]
            cpu = statistics.median(s.round_cpu_ns) / 1000.0
            print(
                f"| {TARGET_LABELS[target]} | {mode} | {s.percentile(0.5) / 1000:.1f} "
                f"| {s.percentile(0.99) / 1000:.1f} | {cpu:.1f} | {s.spans / s.calls:.2f} |"
            )
    print()
    print(
        "| target | contrib over bare, p50 | otel-recovery over contrib, p50 "
        "| otel-recovery CPU added, us/call | A/A noise, p50 | A/A noise, CPU us/call |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for target in targets:
        contrib_p50, _ = paired(series, target, "bare", "contrib")
        ours_p50, ours_cpu = paired(series, target, "contrib", "recovery")
        noise_p50, noise_cpu = paired(series, target, "contrib", "control")
        noise = f"{noise_p50:+.1f} % | {noise_cpu:+.2f}"
        if target in missing:
            print(f"| {TARGET_LABELS[target]} | {contrib_p50:+.1f} % | n/a | n/a | {noise} |")
            verdicts.append(f"{TARGET_LABELS[target]}: not measured (instrumentor missing)")
            continue
        print(
            f"| {TARGET_LABELS[target]} | {contrib_p50:+.1f} % | {ours_p50:+.1f} % "
            f"| {ours_cpu:+.2f} | {noise} |"
        )
        cpu_ok = judge(ours_cpu, noise_cpu, TARGET_CPU_US, "us")
        verdicts.append(
            f"{TARGET_LABELS[target]}: CPU {ours_cpu:+.2f} us/call "
            f"(target <= {TARGET_CPU_US:g} us: {cpu_ok})"
        )
        if target == "redis":
            p50_ok = judge(ours_p50, noise_p50, TARGET_P50_PERCENT, "%")
            verdicts.append(
                f"Redis GET: p50 {ours_p50:+.1f} % over contrib-only "
                f"(target <= {TARGET_P50_PERCENT:g} %: {p50_ok})"
            )
    print()
    print("Added figures are medians over rounds of paired per-round differences.")
    extra_spans = [
        TARGET_LABELS[t]
        for t in targets
        if series[(t, "recovery")].spans != series[(t, "contrib")].spans
    ]
    print(
        "Spans on the happy path: otel-recovery adds none"
        if not extra_spans
        else f"Spans on the happy path: otel-recovery changed the span count for {extra_spans}"
    )
    for note in notes:
        print(f"Note: {note}; its rows measure contrib only")
    for verdict in verdicts:
        print(f"Verdict: {verdict}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 short rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 40; quick 3)")
    parser.add_argument("--calls", type=int, default=None, help="calls per batch (200; quick 50)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="redis,postgres,http")
    parser.add_argument("--raw", type=Path, help="also write the per-round figures as JSON")
    parser.add_argument("--worker", choices=("bare", "instrumented"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-http", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--http-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=200, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        print(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if args.serve_http:
        asyncio.run(_serve_http())
        return 0
    if args.worker:
        run_worker(args.worker, targets, args.http_port, args.warmup)
        return 0
    rounds = args.rounds or (3 if args.quick else 40)
    calls = args.calls or (50 if args.quick else 200)
    warmup = 50 if args.quick else 300
    servers = {"redis": REDIS, "postgres": PG}
    missing = [t for t in targets if t in servers and not reachable(servers[t])]
    for target in missing:
        host, port = servers[target]
        print(f"Note: {TARGET_LABELS[target]} left out: nothing listens on {host}:{port}")
    targets = [t for t in targets if t not in missing]
    if not targets:
        print("Nothing to measure.")
        return 0
    series, notes, missing_ours = measure(targets, rounds, calls, warmup)
    command = "python benchmarks/instrumentors.py" + (" --quick" if args.quick else "")
    report(series, targets, rounds, calls, notes, missing_ours, command)
    if args.quick:
        print("Quick run: too few rounds for these figures to mean anything; it shows the")
        print("script works. Run without --quick for figures to quote.")
    if args.raw:
        raw = {
            f"{target}/{mode}": {"p50_ns": s.round_p50_ns, "cpu_ns": s.round_cpu_ns}
            for (target, mode), s in series.items()
        }
        args.raw.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
