"""A checkpoint writer that the SIGKILL test forks and kills, many times, cheaply.

Run as ``python _writer.py URL KEY MARKER_DIR``. It imports everything once, prints
``ready``, then for each ``go N`` line on stdin forks a child and prints the child's pid. The
child opens its own store, continues the sequence from the latest checkpoint and saves forever,
appending ``b <seq>`` to ``MARKER_DIR/N`` just before each save and ``e <seq>`` once the save
returned, so the test knows whether its SIGKILL landed inside a save. Forking from a warm
process keeps 200 kills per back end within seconds instead of minutes of interpreter starts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

from otel_recovery.checkpoint import CheckpointNotFoundError, Checkpoints
from otel_recovery.stores import open_store

PAYLOAD_BYTES = 48 * 1024


def make_state(seq: int) -> dict[str, object]:
    """A state whose parts can be checked against each other: a torn one would not match."""
    block = hashlib.sha256(str(seq).encode()).hexdigest()
    payload = (block * (PAYLOAD_BYTES // len(block) + 1))[:PAYLOAD_BYTES]
    digest = hashlib.sha256(f"{seq}:{payload}".encode()).hexdigest()
    return {"seq": seq, "payload": payload, "items": list(range(seq % 50)), "digest": digest}


def is_complete(state: object) -> bool:
    if not isinstance(state, dict):
        return False
    try:
        expected = make_state(int(state["seq"]))
    except (KeyError, TypeError, ValueError):
        return False
    return state == expected


def child(url: str, key: str, marker: str) -> None:
    checkpoints = Checkpoints(open_store(url), resilient=False)
    try:
        seq = checkpoints.load(key).state["seq"] + 1
    except CheckpointNotFoundError:
        seq = 1
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        state = make_state(seq)
        os.write(fd, f"b {seq}\n".encode())
        checkpoints.save(key, state)
        os.write(fd, f"e {seq}\n".encode())
        seq += 1


def main() -> None:
    url, key, marker_dir = sys.argv[1:4]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    open_store(url)  # imports the back end's client library once, before forking (no connection)
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, number = line.strip().partition(" ")
        if command != "go":
            break
        pid = os.fork()
        if pid == 0:
            try:
                child(url, key, os.path.join(marker_dir, number))
            finally:
                os._exit(1)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
