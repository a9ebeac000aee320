"""Compare-and-set turns a lost update between two concurrent writers into a visible conflict."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from otel_recovery.checkpoint import CheckpointConflictError, Checkpoints

INCREMENTS = 60

_WORKER = textwrap.dedent(
    """
    import sys
    from otel_recovery.checkpoint import CheckpointConflictError, Checkpoints

    url, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    checkpoints = Checkpoints(url, resilient=False)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    conflicts = 0
    for _ in range(count):
        while True:  # read, modify, write back only over what was read
            found = checkpoints.load("counter")
            state = {"total": found.state["total"] + 1,
                     "by": {**found.state["by"], who: found.state["by"].get(who, 0) + 1}}
            try:
                checkpoints.save("counter", state, expected_version=found.version)
                break
            except CheckpointConflictError:
                conflicts += 1
    print(conflicts, flush=True)
    """
)


def test_the_second_of_two_interleaved_writers_gets_a_conflict(backend):
    shared = backend.open()
    alice = Checkpoints(shared, clock=backend.clock)
    # Bob has his own connection, except in memory, where the store is the dict itself.
    bob = Checkpoints(shared if backend.kind == "memory" else backend.open(), clock=backend.clock)
    alice.save("doc", {"tags": []})
    read_by_alice = alice.load("doc")
    read_by_bob = bob.load("doc")
    bob.save("doc", {"tags": ["bob"]}, expected_version=read_by_bob.version)
    with pytest.raises(CheckpointConflictError) as caught:
        alice.save("doc", {"tags": ["alice"]}, expected_version=read_by_alice.version)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert alice.load("doc").state == {"tags": ["bob"]}  # Bob's update was not lost
    # Without compare-and-set the same interleaving silently loses Bob's update:
    alice.save("doc", {"tags": ["alice"]})
    assert "bob" not in alice.load("doc").state["tags"]


def test_two_concurrent_processes_lose_no_update_with_compare_and_set(durable):
    Checkpoints(durable.url, resilient=False).save("counter", {"total": 0, "by": {}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, durable.url, who, str(INCREMENTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for who in ("a", "b")
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    final = Checkpoints(durable.url, resilient=False).load("counter")
    assert final.state == {"total": 2 * INCREMENTS, "by": {"a": INCREMENTS, "b": INCREMENTS}}
    assert final.version == 1 + 2 * INCREMENTS  # one version per successful write, no more
    assert all(out.strip().isdigit() for out in outputs)  # conflicts seen (scheduling decides)
