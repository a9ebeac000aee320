"""The ``otel-recovery`` command: version, and the demo end to end in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from otel_recovery.__about__ import VERSION
from otel_recovery._demo.server import plan_faults
from otel_recovery.cli import main

ROOT = Path(__file__).resolve().parent.parent

FAULT_ROWS = (
    "none (no failure)",
    "external_service / server_error",
    "rate_limited / rate_limit",
    "transient / connection",
    "transient / timeout",
    "invalid_request / client_error",
    "cascading / circuit_open",
)
OUTCOMES = ("ok first try", "recovered by retry", "answered by fallback", "failed")
SUMMED = (*OUTCOMES, "calls", "rejected by breaker", "extra attempts")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otel_recovery", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def parse_table(stdout: str) -> dict[str, dict[str, str]]:
    """The report's Markdown table as {row label: {column: cell}}."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    return subprocess.run(
        [sys.executable, "-m", "otel_recovery", "demo", "--calls", "40", "--seed", "1", "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_version_subcommand_prints_the_version():
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"otel-recovery {VERSION}"


def test_version_flag_and_no_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert VERSION in capsys.readouterr().out
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("3", "must be at least 10, got 3"),
        ("abc", "a whole number of at least 10, got 'abc'"),
        ("1000000", "must be at most 10,000 (the calls are real, paced HTTP requests)"),
    ],
)
def test_demo_rejects_too_few_or_too_many_calls(capsys, given, said):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--calls", given])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "_positive_int" not in err


def test_demo_exits_zero_and_shows_every_fault_row(demo):
    assert demo.returncode == 0, demo.stderr
    rows = parse_table(demo.stdout)
    for label in FAULT_ROWS:
        assert label in rows, f"missing row {label!r} in\n{demo.stdout}"
    assert "**total**" in rows


def test_demo_totals_add_up(demo):
    rows = parse_table(demo.stdout)
    total = rows.pop("**total**")
    assert int(total["calls"]) == 40
    for label, row in rows.items():
        outcomes = sum(int(row[column]) for column in OUTCOMES)
        assert int(row["calls"]) == outcomes, label
        rejected = int(row["rejected by breaker"])
        assert rejected <= int(row["answered by fallback"]) + int(row["failed"]), label
    for column in SUMMED:
        assert int(total[column]) == sum(int(row[column]) for row in rows.values()), column
    waiting = sum(float(row["waiting (s)"]) for row in rows.values())
    assert float(total["waiting (s)"]) == pytest.approx(waiting, abs=0.011 * len(rows))


def test_demo_rows_tell_the_recovery_story(demo):
    rows = parse_table(demo.stdout)
    clean = rows["none (no failure)"]
    assert int(clean["calls"]) == int(clean["ok first try"]) > 0
    bad_request = rows["invalid_request / client_error"]  # never retried, never masked
    assert bad_request["retryable"] == "no"
    assert int(bad_request["failed"]) == int(bad_request["calls"])
    assert int(bad_request["extra attempts"]) == 0
    open_circuit = rows["cascading / circuit_open"]  # the outage: fallback answers
    assert int(open_circuit["rejected by breaker"]) == int(open_circuit["calls"])
    assert int(open_circuit["answered by fallback"]) == int(open_circuit["calls"])
    assert float(rows["rate_limited / rate_limit"]["waiting (s)"]) >= 1.0  # Retry-After: 1
    assert int(rows["**total**"]["recovered by retry"]) > 0
    assert "closed -> open" in demo.stdout


def test_demo_progress_goes_to_stderr_as_lines_when_not_a_tty(demo):
    progress = [line for line in demo.stderr.splitlines() if line.startswith("[")]
    assert progress and progress[-1].startswith("[####################] 40/40")
    assert "\r" not in demo.stderr


def test_demo_summarises_in_memory_spans(demo):
    pytest.importorskip("opentelemetry.sdk")
    assert "recovery spans" in demo.stdout
    assert "under 'GET /resource'" in demo.stdout
    assert "otel_recovery.attempt.failed" in demo.stdout


def test_fault_plan_is_deterministic_and_complete():
    first = plan_faults(200, 7, 2.0, 50)
    assert first == plan_faults(200, 7, 2.0, 50)
    assert first != plan_faults(200, 8, 2.0, 50)
    assert first.faults[0].kind == "ok"
    assert {"503", "429", "reset", "slow", "400"} <= set(first.counts())
    with pytest.raises(ValueError, match="at least 10"):
        plan_faults(5, 1, 1.0, 1)


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        type(self).bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    _Receiver.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.bodies
    finally:
        server.shutdown()
        server.server_close()


def test_demo_exports_spans_over_otlp_http(otlp_receiver):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    endpoint, bodies = otlp_receiver
    result = run_cli(
        "demo",
        "--calls",
        "20",
        "--short",
        "--no-progress",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "OTLP http/protobuf" in result.stdout
    names, services = set(), set()
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.update(span.name for span in scope_spans.spans)
    assert services == {"otel-recovery-demo"}
    assert {"GET /resource", "recover demo-dependency"} <= names


def test_demo_says_so_when_recovery_is_switched_off():
    """With ``OTEL_RECOVERY_ENABLED=false`` the report showed every fault as a failure and
    never said why; it says recovery was off, on both streams, and no call was retried."""
    result = run_cli(
        "demo", "--calls", "12", "--short", "--no-progress", env={"OTEL_RECOVERY_ENABLED": "false"}
    )
    assert result.returncode == 0, result.stderr
    said = "otel-recovery is switched off (OTEL_RECOVERY_ENABLED='false'; unset it to see"
    assert said in result.stderr
    assert said in result.stdout
    total = parse_table(result.stdout)["**total**"]
    assert total["extra attempts"] == "0"
    assert total["recovered by retry"] == "0"


def test_the_demo_names_the_variable_only_when_it_switched_recovery_off(monkeypatch):
    from otel_recovery import set_active
    from otel_recovery._demo.run import _switched_off

    monkeypatch.delenv("OTEL_RECOVERY_ENABLED", raising=False)
    assert _switched_off() == ""
    with set_active(False):
        said = _switched_off()
    assert "set_active(False)" in said and "OTEL_RECOVERY_ENABLED" not in said
