"""One process of a fleet sharing a breaker and a budget through Redis, driven over stdin.

Run as ``python _fleet_worker.py URL NAME CONFIG_JSON``; CONFIG_JSON holds the keyword
arguments of ``CircuitBreaker`` (``breaker``) and ``RetryBudget`` (``budget``), and
optionally ``link_poll``, the longest the link thread waits when no sync is due. It prints
``ready`` once both exist and have read the shared state, then answers one JSON line per JSON
command line. The test writes a command to every worker before reading any answer, so the
workers really act at the same time. Transition times are ``time.monotonic()``, which is one
clock for every process of a Linux host, so the test can compare them across processes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from otel_recovery import CircuitBreaker, RetryBudget
from otel_recovery.stores import _shared_link


def main() -> None:
    url, name, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    config = json.loads(raw)
    if "link_poll" in config:  # the link thread's longest wait when no sync is due
        _shared_link._POLL = config["link_poll"]
    seen: list[tuple[str, str, float]] = []
    breaker = CircuitBreaker(
        name=name,
        store=url,
        listeners=[lambda t: seen.append((t.to_state.value, t.reason, time.monotonic()))],
        **config.get("breaker", {}),
    )
    budget = RetryBudget(name=name, store=url, **config.get("budget", {}))
    breaker.sync()
    budget.sync()
    held = 0
    print("ready", flush=True)
    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        op = command["op"]
        reply: dict[str, Any] = {}
        if op == "fail":  # n calls that fail, each asking the breaker first
            permitted = 0
            for _ in range(command["n"]):
                if breaker.can_execute():
                    permitted += 1
                    breaker.record_failure()
            reply["permitted"] = permitted
        elif op == "wait_state":  # poll the local view until it shows the state
            deadline = time.monotonic() + command["within"]
            while breaker.state.value != command["state"] and time.monotonic() < deadline:
                time.sleep(0.002)
        elif op == "probe":  # ask for permits for a while; keep every permit granted
            deadline = time.monotonic() + command["seconds"]
            granted = 0
            while time.monotonic() < deadline:
                if breaker.can_execute():
                    granted += 1
                time.sleep(0.001)
            held += granted
            reply["granted"] = granted
        elif op == "succeed_held":  # the held probes succeed
            for _ in range(held):
                breaker.record_success()
            held = 0
        elif op == "calls":  # deposits, pushed at once so the test knows they arrived
            for _ in range(command["n"]):
                budget.record_call()
            reply["synced"] = budget.sync()
        elif op == "spend":
            reply["granted"] = sum(budget.try_spend() for _ in range(command["n"]))
        elif op == "quit":
            break
        reply.update(
            state=breaker.state.value,
            shared=breaker.shared,  # type: ignore[attr-defined]
            transitions=seen,
            held=held,
        )
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
