"""A local HTTP dependency that fails on a deterministic, seeded schedule.

The schedule is decided per *logical call* (the client sends ``?call=<index>``), and the server
counts the attempts of each call itself, so "the first two attempts of call 17 get a 503" holds
however the client's timing varies. Only the hard outage is timed: it starts when the request
of its first call arrives and lasts ``outage_seconds`` of real time, because a circuit breaker's
open period is real time too and the demo should show the breaker riding the outage out.

Faults, as a real dependency produces them:

- ``503``: a burst of consecutive calls whose first 1-3 attempts answer 503;
- ``429``: the first attempt answers 429 with ``Retry-After: 1``;
- ``reset``: the connection is reset (RST) without any response;
- ``slow``: the response is stalled well beyond the client's attempt timeout;
- ``400``: every attempt answers 400 (the caller's fault: never retried);
- the outage: every request answers 503 while it lasts.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "FaultPlan", "FaultServer", "plan_faults"]

ALWAYS = 1_000_000
"""``failing`` value for a fault that never heals (the 400s)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What the server does to a call: ``kind`` for its first ``failing`` attempts."""

    kind: str
    failing: int = 0


OK = Fault("ok")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The whole schedule: one fault per call index, and the call that starts the outage."""

    faults: tuple[Fault, ...]
    outage_start: int
    outage_seconds: float

    def counts(self) -> Counter[str]:
        return Counter(fault.kind for fault in self.faults)


def plan_faults(calls: int, seed: int, outage_seconds: float, outage_calls: int) -> FaultPlan:
    """Place the faults for ``calls`` calls; the same ``seed`` always gives the same plan.

    Call 0 always succeeds, so the last-known-good fallback has something to offer. The
    ``outage_calls`` calls from the outage's start are left fault-free: the outage overrides
    them anyway, and a 429 hidden in there would never be seen.
    """
    if calls < 10:
        raise ValueError(f"the demo needs at least 10 calls to show every fault, got {calls}")
    rng = random.Random(seed)
    faults = [OK] * calls
    outage_start = int(calls * rng.uniform(0.35, 0.5))
    blocked = set(range(outage_start, min(calls, outage_start + outage_calls)))
    blocked.add(0)
    free = [i for i in range(calls) if i not in blocked]  # in order: the seed's plan
    is_free = [i not in blocked for i in range(calls)]  # O(1) lookups: plans stay linear

    def take(fault_for: Any, count: int, run: int = 1) -> None:
        for _ in range(count):
            starts = [i for i in free if i + run <= calls and all(is_free[i : i + run])]
            if not starts:
                return
            start = rng.choice(starts)
            for index in range(start, start + run):
                faults[index] = fault_for()
                free.remove(index)
                is_free[index] = False

    for _ in range(max(1, calls // 40)):
        take(lambda: Fault("503", rng.choice((1, 1, 1, 2, 2, 3))), 1, run=rng.randint(2, 4))
    take(lambda: Fault("429", 1), max(1, calls // 70))
    take(lambda: Fault("reset", rng.choice((1, 1, 2))), max(1, calls // 25))
    take(lambda: Fault("slow", 1), max(1, calls // 40))
    take(lambda: Fault("400", ALWAYS), max(1, calls // 50))
    return FaultPlan(tuple(faults), outage_start, outage_seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stalled handlers must not hold up shutdown
    fault_server: FaultServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up on a stalled response are part of the act, not an error."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log: the demo has its own report."""

    def do_GET(self) -> None:
        fault_server = self.server.fault_server
        query = parse_qs(urlsplit(self.path).query)
        try:
            call = int(query["call"][0])
        except (KeyError, ValueError, IndexError):
            self._answer(404, {"error": "GET /resource?call=<index>"})
            return
        attempt, action = fault_server.decide(call)
        if action == "reset":
            # SO_LINGER 0 makes close() send RST instead of FIN: a real "connection reset".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if action == "slow":
            time.sleep(fault_server.stall_seconds)
            status = 200
        else:
            status = {"ok": 200, "503": 503, "outage": 503, "429": 429, "400": 400}[action]
        headers = {"Retry-After": "1"} if status == 429 else {}
        body = {"call": call, "attempt": attempt, "status": status}
        try:
            self._answer(status, body, headers)
        except OSError:  # the client gave up waiting
            self.close_connection = True

    def _answer(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True


class FaultServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 with an ephemeral port, run in a daemon thread."""

    def __init__(self, plan: FaultPlan, stall_seconds: float) -> None:
        self.plan = plan
        self.stall_seconds = stall_seconds
        self.requests: Counter[str] = Counter()
        self._attempts: Counter[int] = Counter()
        self._outage_began: float | None = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fault_server = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="otel-recovery-demo-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/resource"

    def decide(self, call: int) -> tuple[int, str]:
        """The attempt number of this request and what to do with it."""
        with self._lock:
            self._attempts[call] += 1
            attempt = self._attempts[call]
            now = time.monotonic()
            if call >= self.plan.outage_start and self._outage_began is None:
                self._outage_began = now
            began = self._outage_began
            if began is not None and now - began < self.plan.outage_seconds:
                action = "outage"
            elif 0 <= call < len(self.plan.faults):
                fault = self.plan.faults[call]
                action = fault.kind if attempt <= fault.failing else "ok"
            else:
                action = "ok"
            self.requests[action] += 1
        return attempt, action

    def in_outage(self) -> bool:
        with self._lock:
            began = self._outage_began
            return began is not None and time.monotonic() - began < self.plan.outage_seconds

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
