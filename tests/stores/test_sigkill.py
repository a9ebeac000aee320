"""A writer killed with SIGKILL mid-write never leaves a torn checkpoint (200 kills per store).

Each round forks a fresh writer from a warm process (see ``_writer.py``), lets it save 48 KB
states in a loop, kills it at a random moment, and restores the checkpoint. The restored state
must be complete (all its parts agree), no older than the last save that returned (durability)
and no newer than the last save that began. The test also checks that a good share of the kills
really landed inside a save, so it proves something.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_recovery.checkpoint import CheckpointNotFoundError, Checkpoints
from otel_recovery.stores import open_store

from ._writer import is_complete

KILLS = 200
WRITER = Path(__file__).with_name("_writer.py")


def _markers(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [(line[0], int(line[2:])) for line in lines if len(line) > 2]


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the writer")
        time.sleep(0.0005)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_torn_checkpoint(durable, tmp_path):
    key = "killed-writer"
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(
        [sys.executable, str(WRITER), durable.url, key, str(markers)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert server.stdout is not None and server.stdin is not None
    reader = Checkpoints(open_store(durable.url), resilient=False)
    rng = random.Random(20240601)
    mid_write = 0
    last_seq = 0
    try:
        assert server.stdout.readline().strip() == "ready"
        for round_number in range(KILLS):
            server.stdin.write(f"go {round_number}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            marker = markers / str(round_number)
            _wait_for(lambda: any(kind == "b" for kind, _ in _markers(marker)))
            time.sleep(rng.uniform(0, 0.012))
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: _gone(pid))

            seen = _markers(marker)
            began = max(seq for kind, seq in seen if kind == "b")
            ended = max((seq for kind, seq in seen if kind == "e"), default=last_seq)
            mid_write += seen[-1][0] == "b"
            if ended == 0:  # not one save has returned yet: "no checkpoint" is the earlier state
                try:
                    found = reader.load(key)
                except CheckpointNotFoundError:
                    continue
            else:
                found = reader.load(key)
            assert is_complete(found.state), f"round {round_number}: torn state {found!r:.200}"
            seq = found.state["seq"]
            assert ended <= seq <= began, (round_number, ended, seq, began)
            assert seq >= last_seq  # never goes back to an older version
            last_seq = seq
    finally:
        server.stdin.close()
        server.wait(timeout=10)
        reader.close()
    print(f"{durable.kind}: {mid_write} of {KILLS} kills landed inside a save")
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills landed inside a save"
