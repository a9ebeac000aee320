"""What the demo prints: a progress bar on stderr and the closing tables on stdout.

The progress bar redraws one line with ``\\r`` on a terminal; when stderr is a pipe or a file
(CI logs) it prints a plain line every tenth of the run instead, because a log full of
carriage returns is unreadable.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import TextIO

from otel_recovery.policies import CircuitBreaker

from .scenario import CallRecord, Outcome, RunResult

__all__ = ["Progress", "render_report"]

COLUMNS = (
    "calls",
    Outcome.OK,
    Outcome.RECOVERED,
    Outcome.FALLBACK,
    Outcome.FAILED,
    "rejected by breaker",
    "extra attempts",
    "waiting (s)",
)


class Progress:
    """Counts outcomes as calls finish and shows them on ``stream``."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        self.done = 0
        self.outcomes: Counter[str] = Counter()
        self._last_line = 0.0
        self._next_report = max(1, total // 10)

    def update(self, record: CallRecord, breaker: CircuitBreaker) -> None:
        self.done += 1
        self.outcomes[record.outcome] += 1
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._last_line >= 0.05 or self.done == self.total:
                self._last_line = now
                self.stream.write("\r" + self._line(breaker, width=30) + "\x1b[K")
                self.stream.flush()
        elif self.done % self._next_report == 0 or self.done == self.total:
            self.stream.write(self._line(breaker, width=20) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, breaker: CircuitBreaker, width: int) -> str:
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        counts = self.outcomes
        return (
            f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total}  "
            f"ok {counts[Outcome.OK]}  retried {counts[Outcome.RECOVERED]}  "
            f"fallback {counts[Outcome.FALLBACK]}  failed {counts[Outcome.FAILED]}  "
            f"breaker {breaker.state.value}"
        )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _row(records: Iterable[CallRecord]) -> list[float]:
    values = [0.0] * len(COLUMNS)
    for record in records:
        values[0] += 1
        values[
            1
            + (Outcome.OK, Outcome.RECOVERED, Outcome.FALLBACK, Outcome.FAILED).index(
                record.outcome
            )
        ] += 1
        values[5] += record.rejected
        values[6] += max(0, record.attempts - 1)
        values[7] += record.waited
    return values


def _cells(values: list[float]) -> list[str]:
    return [f"{v:.2f}" if i == len(values) - 1 else f"{int(v)}" for i, v in enumerate(values)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def render_report(result: RunResult, tracing: str) -> list[str]:
    """The closing report: per-fault table with totals, breaker transitions, load on the server."""
    groups: dict[str, list[CallRecord]] = {}
    for record in result.records:
        groups.setdefault(record.group, []).append(record)
    order = sorted(groups, key=lambda g: (g != "none", -len(groups[g]), g))
    rows = []
    for group in order:
        members = groups[group]
        first = members[0]
        info = next((r.info for r in members if r.info is not None), None)
        example = next((r.example for r in members if r.example), "-")
        retryable = "-" if info is None else ("yes" if info.retryable else "no")
        label = "none (no failure)" if first.info is None else group
        rows.append([label, example, retryable, *_cells(_row(members))])
    rows.append(["**total**", "", "", *_cells(_row(result.records))])
    header = ["first failure (category / kind)", "e.g.", "retryable", *COLUMNS]
    lines = [
        f"Recovery report: {len(result.records)} calls in {result.elapsed:.1f} s",
        "",
        *_table(header, rows),
        "",
        f"Each call counts once in '{Outcome.OK}', '{Outcome.RECOVERED}', "
        f"'{Outcome.FALLBACK}' or '{Outcome.FAILED}'; 'rejected by breaker' counts the calls "
        "among those that the open circuit stopped before any attempt.",
        "",
    ]
    lines.append("Circuit breaker transitions:")
    if not result.transitions:
        lines.append("  (none: the breaker stayed closed)")
    for at, transition in result.transitions:
        lines.append(
            f"  +{at:6.2f} s  {transition.from_state.value} -> {transition.to_state.value}"
            f"  ({transition.reason})"
        )
    served = sum(result.server_requests.values())
    reached = sum(1 for r in result.records if not r.rejected)
    amplification = served / reached if reached else 0.0
    by_answer = ", ".join(f"{k} {v}" for k, v in sorted(result.server_requests.items()))
    lines.extend(
        [
            "",
            f"Dependency load: {served} requests for {reached} calls that reached it "
            f"({amplification:.2f}x); answers: {by_answer}.",
            f"Retry budget refusals: {result.budget_refused}.",
            f"Tracing: {tracing}.",
        ]
    )
    return lines
