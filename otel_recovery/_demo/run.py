"""Ties the demo together: plan, server, tracing, calls, report."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from otel_recovery._config import ENABLED_VARIABLE, is_active, switch_value

from .report import Progress, render_report
from .scenario import NAME, Settings, run_calls
from .server import FaultServer, plan_faults
from .tracing import set_up

__all__ = ["run_demo"]


def run_demo(
    settings: Settings,
    *,
    progress: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the scenario and print the report; returns the process exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    plan = plan_faults(
        settings.calls, settings.seed, settings.outage_seconds, settings.outage_calls
    )
    tracing = set_up()
    for note in tracing.notes:
        print(note, file=err)
    planned = ", ".join(
        f"{kind} {count}" for kind, count in sorted(plan.counts().items()) if kind != "ok"
    )
    bar = Progress(settings.calls, err, enabled=progress)
    off = _switched_off()
    try:
        with FaultServer(plan, settings.stall_seconds) as server:
            print(
                f"otel-recovery demo: {settings.calls} calls to {server.url} "
                f"(seed {settings.seed}); "
                f"faults planned: {planned}; a {settings.outage_seconds:g} s outage from call "
                f"{plan.outage_start}. Policy {NAME!r}: Retry(3, exponential backoff from "
                f"{settings.backoff_initial:g} s, full jitter) + RetryBudget(20%) + "
                f"CircuitBreaker(5 failures, {settings.breaker_timeout:g} s) + "
                f"Timeout({settings.attempt_timeout:g} s) + Fallback(last known good).",
                file=err,
            )
            if off:
                print(off, file=err)
            try:
                result = run_calls(settings, server, tracing.tracer, bar.update)
            finally:
                bar.close()
    except KeyboardInterrupt:
        print("interrupted", file=err)
        tracing.shutdown()
        return 130
    tracing.shutdown()  # flush first, so the span summary and OTLP export are complete
    for line in render_report(result, tracing.description):
        print(line, file=out)
    if off:
        print(f"\n{off}", file=out)
    summary = tracing.summary()
    if summary:
        print(file=out)
        for line in summary:
            print(line, file=out)
    return 0


def _switched_off() -> str:
    """What to say when recovery is switched off, else "": the report would otherwise show
    every fault as a failure with nothing to say why. The variable is named only when it is
    what switched it off (not ``set_active(False)`` in the process)."""
    if is_active():
        return ""
    how = "switched off in this process (set_active(False))"
    value = os.environ.get(ENABLED_VARIABLE)
    if value is not None and not switch_value(value):
        how = f"switched off ({ENABLED_VARIABLE}={value!r}; unset it to see recovery)"
    return (
        f"otel-recovery is {how}: each call makes one attempt, with no retry, breaker, "
        "timeout or fallback."
    )
