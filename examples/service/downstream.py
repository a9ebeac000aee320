"""A flaky HTTP dependency for the example service: 503s, 429 with Retry-After, resets.

Real dependencies fail in a handful of ways, and each one asks the client for something
different: a 503 is worth retrying after a backoff, a 429 names its own wait in
``Retry-After``, and a reset connection (RST, no response at all) is a network error the client
must recognise before it can retry. This server produces all three on a schedule, so the
example service's recoveries show up in Jaeger without any fault-injection tooling.

The schedule is decided per *request id* (``GET /quote?id=...``), not per HTTP request: the
n-th new id gets the n-th fault of the schedule (cycling), and that fault hits only the first
``times`` attempts of the id. A retry therefore heals, exactly as a transient failure does,
however the client's timing varies, and the server's per-id attempt count proves how many
times the client really sent the request (nothing lost, nothing doubled).

Run it on its own (stdlib only)::

    python examples/service/downstream.py --port 8081 --schedule "ok,503,ok,429,ok,reset,503*2"

or import :class:`FlakyDownstream` (the end-to-end test does) and :meth:`~FlakyDownstream.force`
a fault for an id.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlsplit

__all__ = ["DEFAULT_SCHEDULE", "Fault", "FlakyDownstream", "parse_schedule"]

KINDS = ("ok", "503", "429", "reset")
DEFAULT_SCHEDULE = "ok,503,ok,429,ok,reset,ok,503*2,ok,ok"
"""Mostly healthy; one id in ten sees two 503s in a row (still recoverable with 3 attempts)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What the server does to an id: ``kind`` for its first ``times`` attempts, then 200."""

    kind: str = "ok"
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.times < 0:
            raise ValueError(f"fault {self.kind!r}: times must be >= 0, got {self.times}")


def parse_schedule(text: str) -> list[Fault]:
    """``"ok,503,429*2,reset"`` -> faults; ``kind*n`` fails the first n attempts of an id."""
    faults = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        kind, _, times = item.partition("*")
        faults.append(Fault(kind.strip(), int(times) if times else 1))
    if not faults:
        raise ValueError("the schedule is empty; give at least one fault, e.g. 'ok'")
    return faults


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: FlakyDownstream


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: clients reuse connections, as they do against a real service, so a
    # reset hits a pooled connection and the client must notice and reconnect.
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._reply(200, {"status": "ok"})
            return
        if url.path != "/quote":
            self._reply(404, {"error": f"no route {url.path}"})
            return
        request_id = parse_qs(url.query).get("id", [""])[0]
        owner = self.server.owner
        fault, attempt = owner.register(request_id)
        action = fault.kind if attempt <= fault.times else "ok"
        if action == "reset":
            # SO_LINGER 0 makes close() send RST instead of FIN: a real "connection reset".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if action == "503":
            self._reply(503, {"error": "temporarily unavailable", "attempt": attempt})
        elif action == "429":
            headers = {"Retry-After": str(owner.retry_after)}
            self._reply(429, {"error": "slow down", "attempt": attempt}, headers)
        else:
            price = 100 + sum(map(ord, request_id)) % 900
            self._reply(200, {"id": request_id, "price": price, "attempt": attempt})

    def _reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class FlakyDownstream:
    """The flaky dependency; a context manager serving on a background thread."""

    def __init__(
        self,
        schedule: Iterable[Fault] | str = DEFAULT_SCHEDULE,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        retry_after: int = 1,
        verbose: bool = False,
    ) -> None:
        faults = parse_schedule(schedule) if isinstance(schedule, str) else list(schedule)
        self._cycle: Iterator[Fault] = itertools.cycle(faults)
        self.retry_after = retry_after
        self.verbose = verbose
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._attempts: Counter[str] = Counter()
        self._anonymous = itertools.count(1)
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host!s}:{self.port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def force(self, request_id: str, fault: Fault) -> None:
        """Give ``request_id`` this fault instead of the schedule's next one."""
        with self._lock:
            self._faults[request_id] = fault

    def attempts(self, request_id: str) -> int:
        """How many requests carrying ``request_id`` arrived (resets included)."""
        with self._lock:
            return self._attempts[request_id]

    def register(self, request_id: str) -> tuple[Fault, int]:
        """Count an arriving request; its id's fault and this request's 1-based attempt."""
        with self._lock:
            if not request_id:  # no id: every request is a new id, and never heals by retry
                request_id = f"anonymous-{next(self._anonymous)}"
            fault = self._faults.get(request_id)
            if fault is None:
                fault = self._faults[request_id] = next(self._cycle)
            self._attempts[request_id] += 1
            return fault, self._attempts[request_id]

    def start(self) -> FlakyDownstream:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="flaky-downstream", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyDownstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (compose.yaml's ``downstream`` service passes one; the tests read it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="e.g. 'ok,503,429*2,reset'")
    parser.add_argument("--retry-after", type=int, default=1, help="seconds, on 429 responses")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = FlakyDownstream(
        args.schedule,
        host=args.host,
        port=args.port,
        retry_after=args.retry_after,
        verbose=args.verbose,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(f"flaky downstream listening on {server.url} (schedule {args.schedule})", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
