"""Harness for the Redis queue and coordination tests: a stack, its clients, and traps.

A :class:`Stack` is redis-py alone (``baseline``) or redis-py with our instrumentor (alone,
or with contrib's in either load order). It reuses ``instrumentors.test_redis.Harness``:
``attempts`` counts calls into redis-py beneath every layer, ``sent`` counts commands written
to a socket (pipelines included: every command of a packed buffer is counted by name).

A :class:`Trap` fires a real fault on the connection that is about to send the next buffer
naming a chosen command, at exactly that moment:

- ``kill``: ``CLIENT KILL ADDR`` of that very connection before the bytes leave; the server
  never runs the command and the client reads a closed connection.
- ``stop``: SIGSTOP the server for ``STOP_SECONDS`` (longer than the client's socket timeout):
  the client gives up with a timeout, then the server wakes, *runs the command* it finds in
  its socket buffer and only then sees the connection closed: applied, reply lost.
- ``pause``: ``CLIENT PAUSE WRITE`` for ``STOP_SECONDS``: the command is held, the client
  times out, and the server drops the held command with the closed connection.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
import redis.asyncio
from instrumentors.test_redis import TIMEOUT, Harness
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import PrivateRedis

from otel_recovery.policies.circuit_breaker import CircuitBreaker

STACKS = ["baseline", "ours_only", "contrib_first", "ours_first"]
STOP_SECONDS = 0.6  # > TIMEOUT (0.4): one attempt times out, the next one finds it healed
_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")

Fault = Literal["kill", "stop", "pause"]


def _names(data: bytes) -> list[str]:
    return [name.decode().upper() for name in _COMMAND.findall(data)]


class Trap:
    """One fault, fired once on the next buffer that names ``command`` (see module doc)."""

    def __init__(self, server: PrivateRedis, command: str, fault: Fault, *, skip: int = 0):
        self.server, self.command, self.fault, self.skip = server, command.upper(), fault, skip
        self.fired = 0

    def check(self, data: bytes, sockname: tuple[str, int] | None) -> None:
        if self.fired or self.command not in _names(data):
            return
        if self.skip:
            self.skip -= 1
            return
        self.fired += 1
        admin = self.server.admin()
        try:
            with suppress_instrumentation():
                if self.fault == "kill":
                    assert sockname is not None
                    admin.execute_command("CLIENT", "KILL", "ADDR", f"{sockname[0]}:{sockname[1]}")
                elif self.fault == "pause":
                    ms = str(int(STOP_SECONDS * 1000))
                    admin.execute_command("CLIENT", "PAUSE", ms, "WRITE")
                else:
                    self.server.stop_answering()
                    self.server.after(STOP_SECONDS, self.server.resume)
        finally:
            admin.close()


def _buffer(command: Any) -> bytes:
    if isinstance(command, (bytes, bytearray, memoryview)):
        return bytes(command)
    if isinstance(command, str):
        return command.encode()
    return b"".join(bytes(part) for part in command)


class Stack(Harness):
    """redis-py alone or instrumented (``order``), with trap-aware, counting clients."""

    def __init__(self, server: PrivateRedis, order: str, **settings: Any) -> None:
        super().__init__(server)
        self.order = order
        self.traps: list[Trap] = []
        self.instrumented = order != "baseline"
        if self.instrumented:
            self.instrument(order, **settings)

    def trap(self, command: str, fault: Fault, *, skip: int = 0) -> Trap:
        trap = Trap(self.server, command, fault, skip=skip)
        self.traps.append(trap)
        return trap

    def _spring(self, traps: list[Trap], data: bytes, sockname: Any) -> None:
        for name in _names(data):
            self.sent[name] += 1
        for trap in traps:
            trap.check(data, sockname)

    def _trapping_class(self, base: type, traps: list[Trap]) -> type:
        spring = self._spring
        if issubclass(base, redis.asyncio.Connection):

            class AsyncTrapping(base):  # type: ignore[misc, valid-type]
                async def send_packed_command(self, command: Any, check_health: bool = True):
                    if not self.is_connected:
                        await self.connect()
                    writer = getattr(self, "_writer", None)
                    name = writer.get_extra_info("sockname") if writer else None
                    spring(traps, _buffer(command), name)
                    return await super().send_packed_command(command, check_health)

            return AsyncTrapping

        class Trapping(base):  # type: ignore[misc, valid-type]
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                if self._sock is None:
                    self.connect()
                sock = self._sock
                spring(traps, _buffer(command), sock.getsockname() if sock else None)
                return super().send_packed_command(command, check_health)

        return Trapping

    def connect(self, *, timeout: float | None = TIMEOUT, name: str | None = None) -> redis.Redis:
        """A client on its own pool; only this stack's traps fire on it. redis-py's own
        ``Retry`` is off, so what is repeated is ours alone (see README)."""
        pool = redis.ConnectionPool(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=name,
            connection_class=self._trapping_class(redis.Connection, self.traps),
        )
        self._owners.add(id(pool))
        return redis.Redis(connection_pool=pool)

    def aconnect(self, *, timeout: float | None = TIMEOUT) -> redis.asyncio.Redis:
        pool = redis.asyncio.ConnectionPool(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=timeout,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            connection_class=self._trapping_class(redis.asyncio.Connection, self.traps),
        )
        self._owners.add(id(pool))
        return redis.asyncio.Redis(connection_pool=pool)

    def breaker(self) -> CircuitBreaker | None:
        """The breaker of the stack's clients, 127.0.0.1:<port> (None for the baseline). The
        plumbing's ``admin()`` clients say ``localhost`` and have their own."""
        if not self.instrumented:
            return None
        assert self.ours.targets is not None
        mine = f"127.0.0.1:{self.server.port}"
        found = [b for b in self.ours.targets.breakers() if b.name.endswith(mine)]
        assert len(found) <= 1, [b.name for b in found]
        return found[0] if found else None

    def failed_calls(self) -> int:
        breaker = self.breaker()
        return 0 if breaker is None else int(breaker.snapshot().failed_calls)

    def span_attributes(self, name: str) -> dict[str, Any]:
        """Attributes of the call's span: contrib's ``name`` span, or our ``recover`` span
        without contrib (which exists only when recovery had something to say)."""
        if self.order == "baseline":
            return {}
        if self.contrib:
            spans = self.spans_named(name)
        else:
            spans = self.spans_named(f"recover redis 127.0.0.1:{self.server.port}")
        assert len(spans) == 1, [s.name for s in self.exporter.get_finished_spans()]
        return dict(spans[0].attributes or {})


def client_id_of(
    admin: Any, predicate: Callable[[dict[str, str]], bool], timeout: float = 5
) -> int:
    """The id of the one client in CLIENT LIST that matches, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        with suppress_instrumentation():
            listing = admin.execute_command("CLIENT", "LIST")
        if isinstance(listing, bytes):
            listing = listing.decode()
        rows = [
            dict(f.split("=", 1) for f in line.split() if "=" in f) for line in listing.splitlines()
        ]
        found = [row for row in rows if predicate(row)]
        if found:
            return int(found[0]["id"])
        assert time.monotonic() < deadline, "no such client"
        time.sleep(0.005)


def kill_when_blocked(server: PrivateRedis, command: str, then: Callable[[], object] | None = None):
    """Kill the client blocked in ``command`` (BLPOP, XREAD...) once it is blocked, then run
    ``then`` (say, push the element it was waiting for)."""

    def run() -> None:
        admin = server.admin()
        try:
            blocked = client_id_of(
                admin, lambda r: "b" in r.get("flags", "") and r.get("cmd") == command.lower()
            )
            with suppress_instrumentation():
                admin.execute_command("CLIENT", "KILL", "ID", blocked)
                if then is not None:
                    then()
        finally:
            admin.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
