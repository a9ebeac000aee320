"""``instrumentors.py --instructions``: callgrind counts of the same calls (the method is in
``instrumentors.py``'s docstring, section "Instruction counts")."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from _callgrind import Counted, count_many, valgrind_version
from _instrumentor_worker import SCRIPT, TARGET_LABELS, child_environment, http_server

INSTRUCTION_MODES = ("contrib", "recovery", "idle", "wrapt")
"""``--instructions`` modes (see the module docstring); ``idle`` is the idle layer, ``wrapt``
the wrapt idle layer."""
COUNT_CALLS = (100, 1100)
"""Measured calls of the two runs per mode; the per-call figure is their difference / 1000."""
COUNT_WARMUP = 300
COUNT_JOBS = 2
"""Callgrind children at a time: one per core of the 2-core machine this was made on."""


@dataclass
class Counts:
    """The two callgrind runs of one (target, mode): instructions and spans per call count."""

    instructions: dict[int, int] = field(default_factory=dict)
    spans: dict[int, int] = field(default_factory=dict)

    def _per_call(self, totals: dict[int, int]) -> float:
        small, large = COUNT_CALLS
        return (totals[large] - totals[small]) / (large - small)

    def per_call(self) -> float:
        """Instructions per measured call: start-up and warm-up are in both totals."""
        return self._per_call(self.instructions)

    def spans_per_call(self) -> float:
        return self._per_call(self.spans)


def measure_instructions(
    targets: Sequence[str],
) -> tuple[dict[tuple[str, str], Counts], list[str], set[str]]:
    """Run every (target, mode, call count) child under callgrind, ``COUNT_JOBS`` at a time."""
    runs = [
        (target, mode, calls)
        for target in targets
        for mode in INSTRUCTION_MODES
        for calls in COUNT_CALLS
    ]
    counts = {(target, mode): Counts() for target in targets for mode in INSTRUCTION_MODES}
    notes: list[str] = []
    missing: set[str] = set()
    env = {**child_environment(), "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    done = 0

    def progress(index: int, counted: Counted) -> None:
        nonlocal done
        done += 1
        target, mode, calls = runs[index]
        print(
            f"callgrind {done}/{len(runs)}: {target} {mode} {calls} calls: "
            f"{counted.instructions:,} instructions ({counted.seconds:.0f} s, "
            f"{time.monotonic() - started:.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )

    with http_server() as http_port:
        commands = [
            [
                sys.executable,
                str(SCRIPT),
                *("--count-mode", mode, "--targets", target, "--http-port", str(http_port)),
                *("--calls", str(calls), "--warmup", str(COUNT_WARMUP)),
            ]
            for target, mode, calls in runs
        ]
        results = count_many(commands, env, jobs=COUNT_JOBS, progress=progress)
    for (target, mode, calls), counted in zip(runs, results, strict=True):
        message = json.loads(counted.stdout.strip().splitlines()[-1])
        counts[(target, mode)].instructions[calls] = counted.instructions
        counts[(target, mode)].spans[calls] = message["spans"]
        notes.extend(note for note in message["notes"] if note not in notes)
        missing.update(message["missing"])
    return counts, notes, missing


def report_instructions(
    counts: dict[tuple[str, str], Counts],
    targets: Sequence[str],
    notes: list[str],
    missing: set[str],
    command: str,
    valgrind: str,
) -> None:
    print(f"# command: {command}")
    small, large = COUNT_CALLS
    print(
        f"# python {platform.python_version()}, {platform.machine()}, {valgrind} (callgrind); "
        f"per call = (total at {large:,} calls - total at {small:,}) / {large - small:,}, "
        f"after {COUNT_WARMUP} warm-up calls; PYTHONHASHSEED=0, gc off, no thread but the main one"
    )
    print()
    print(
        "| target | contrib instr/call | otel-recovery added | idle layer (floor) "
        "| recovery logic (added - floor) | wrapt idle layer |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for target in targets:
        per_call = {mode: counts[(target, mode)].per_call() for mode in INSTRUCTION_MODES}
        contrib = per_call["contrib"]
        wrapt_added = f"{per_call['wrapt'] - contrib:+,.0f}"
        if target in missing:
            cells = "n/a | n/a | n/a"
        else:
            added = per_call["recovery"] - contrib
            floor = per_call["idle"] - contrib
            cells = f"{added:+,.0f} | {floor:+,.0f} | {added - floor:+,.0f}"
        print(f"| {TARGET_LABELS[target]} | {contrib:,.0f} | {cells} | {wrapt_added} |")
    print()
    print(
        "Instructions per call counted by callgrind (interpreter included); the columns after "
        "the first are added over contrib only."
    )
    print(
        "In time: this mode measures no CPU time, so it has no ns-per-instruction ratio to "
        "convert with; the figures are instructions (the default mode gives CPU us/call)."
    )
    changed = [
        TARGET_LABELS[target]
        for target in targets
        if target not in missing
        and counts[(target, "recovery")].spans_per_call()
        != counts[(target, "contrib")].spans_per_call()
    ]
    print(
        "Spans on the happy path: otel-recovery adds none"
        if not changed
        else f"Spans on the happy path: otel-recovery changed the span count for {changed}"
    )
    for note in notes:
        print(f"Note: {note}; its otel-recovery columns are n/a")


def run_instructions(targets: Sequence[str], command: str) -> int:
    """``--instructions``: count, report; a note and exit status 0 without valgrind."""
    valgrind = valgrind_version()
    if valgrind is None:
        print("Note: valgrind is not installed; --instructions needs it. Nothing measured.")
        return 0
    counts, notes, missing = measure_instructions(targets)
    report_instructions(counts, targets, notes, missing, command, valgrind)
    return 0
