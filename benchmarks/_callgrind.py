"""Counting the instructions a child process executes, with valgrind's callgrind.

Why instructions: on a shared, noisy machine wall-clock and CPU-time figures wander by more
than the per-call costs a benchmark must resolve, while the number of instructions a
deterministic program executes is the same from run to run. Callgrind counts every
instruction of the process it runs (the interpreter included), so a caller that wants a
per-call figure runs the same program at two call counts and divides the difference: start-up,
imports and warm-up are in both totals and cancel out.

The call-graph file is not needed, only the total that callgrind prints on exit
(``==PID== Collected : N``), so it is written to ``/dev/null``. Runs are independent
processes: several can go at once (one per core) without changing each other's counts.

What this cannot fix is a child that is not deterministic itself: another thread whose
scheduling depends on timing, a random choice, a time-based branch. The caller has to remove
those (``benchmarks/instrumentors.py`` says how it did).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

__all__ = ["Counted", "count_instructions", "count_many", "valgrind_version"]

_COLLECTED = re.compile(r"^==\d+== Collected : ([\d ]+?)\s*$", re.MULTILINE)
_EVENTS = re.compile(r"^==\d+== Events    : ([\w ]+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Counted:
    """One run under callgrind: its instruction total, the child's stdout, the wall time,
    and every event callgrind counted (``Ir`` alone, or the cache and branch simulation's
    too when the run asked for them)."""

    instructions: int
    stdout: str
    seconds: float
    events: dict[str, int] = field(default_factory=dict)


def valgrind_version() -> str | None:
    """``valgrind --version`` (e.g. ``valgrind-3.19.0``), or None when valgrind is missing."""
    executable = shutil.which("valgrind")
    if executable is None:
        return None
    try:
        result = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def count_instructions(
    command: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 900.0,
    callgrind_args: Sequence[str] = (),
) -> Counted:
    """Run ``command`` under callgrind and return how many instructions it executed.

    ``callgrind_args`` go to callgrind (``--cache-sim=yes``, ``--toggle-collect=...``).

    Raises ``RuntimeError`` when the child fails or callgrind reports no total: a figure from
    a run that did not complete would be silently wrong.
    """
    started = time.monotonic()
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *callgrind_args]
    result = subprocess.run(
        [*valgrind, *command],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout,
    )
    seconds = time.monotonic() - started
    match = _COLLECTED.search(result.stderr)
    if result.returncode != 0 or match is None:
        tail = result.stderr[-3000:]
        raise RuntimeError(
            f"callgrind run failed (exit {result.returncode}): {' '.join(command)}\n{tail}"
        )
    totals = [int(total) for total in match.group(1).split()]
    names_match = _EVENTS.search(result.stderr)
    names = names_match.group(1).split() if names_match else ["Ir"]
    totals += [0] * (len(names) - len(totals))  # callgrind prints one 0 when nothing counted
    events = dict(zip(names, totals, strict=False))
    return Counted(events["Ir"], result.stdout, seconds, events)


def count_many(
    commands: Sequence[Sequence[str]],
    env: Mapping[str, str],
    jobs: int = 2,
    progress: Callable[[int, Counted], None] | None = None,
    callgrind_args: Sequence[str] = (),
) -> list[Counted]:
    """:func:`count_instructions` for every command, ``jobs`` at a time, in input order.

    Why threads: each one only waits on its valgrind process. ``progress`` is called with the
    index of each command as it completes. On the first failure the commands not yet started
    are cancelled and the error is raised.
    """
    results: list[Counted | None] = [None] * len(commands)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(count_instructions, command, env, callgrind_args=callgrind_args): index
            for index, command in enumerate(commands)
        }
        try:
            for future in as_completed(futures):
                index = futures[future]
                counted = future.result()
                results[index] = counted
                if progress is not None:
                    progress(index, counted)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    done = [counted for counted in results if counted is not None]
    assert len(done) == len(commands)  # every future either completed or raised
    return done
