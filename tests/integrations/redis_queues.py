"""Harness for the Redis queue and coordination tests: a stack, its clients, and traps.

A :class:`Stack` is redis-py alone (``baseline``) or redis-py with our instrumentor (alone,
or with contrib's in either load order). It reuses ``instrumentors.test_redis.Harness``:
``attempts`` counts calls into redis-py beneath every layer, ``sent`` counts commands written
to a socket (pipelines included: every command of a packed buffer is counted by name).

A :class:`Trap` fires a real fault on the connection that is about to send the next buffer
naming a chosen command, at exactly that moment:

- ``kill``: ``CLIENT KILL ADDR`` of that very connection before the bytes leave; the server
  never runs the command and the client reads a closed connection.
- ``stop``: SIGSTOP the server until the client gives up (its socket timeout): redis-py
  closes the connection (``disconnect()``), the trap resumes the server (SIGCONT) right
  there, and the server *runs the command* it finds in its socket buffer and only then sees
  the connection closed: applied, reply lost.
- ``pause``: ``CLIENT PAUSE WRITE``: the command is held, the client times out and closes
  the connection; ``UNPAUSE_DELAY`` later (the server has seen the close by then) the trap
  unpauses, and the server has dropped the held command with the closed connection.

A client that never gives up (RQ raises its socket timeout) is healed by a fallback timer
(``heal_after``). :meth:`Trap.settle` waits for the heal and for the server to have acted on
it, so a test reads the server's state only after the fault's outcome is decided; healing
is event-driven, no test depends on how a sleep compares with the socket timeout.
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
STOP_SECONDS = TIMEOUT + 0.5
"""How long a fault lasts for a client that does not give up (``heal_after`` for RQ's
worker, whose socket timeout is long): longer than the plain clients' ``TIMEOUT``, so a
client that did give up would be seen (its disconnect heals at once, and it failed)."""
FALLBACK_SECONDS = 5.0
"""By default a fault lasts until the trapped connection is closed; this is the bound."""
UNPAUSE_DELAY = 0.2
"""From the trapped connection's close to ``CLIENT UNPAUSE``: the server sees the close."""
_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")

Fault = Literal["kill", "stop", "pause"]


def command_names(data: bytes) -> list[str]:
    """The names of the commands in ``data``, as redis-py writes them to the socket."""
    return [name.decode().upper() for name in _COMMAND.findall(data)]


class Trap:
    """One fault, fired once on the next buffer that names ``command`` (see module doc)."""

    def __init__(
        self,
        server: PrivateRedis,
        command: str,
        fault: Fault,
        *,
        skip: int = 0,
        heal_after: float = FALLBACK_SECONDS,
    ) -> None:
        self.server, self.command, self.fault, self.skip = server, command.upper(), fault, skip
        self.heal_after = heal_after
        self.fired = 0
        self.healed = threading.Event()
        self._victim: Any = None
        self._lock = threading.Lock()

    def check(self, data: bytes, sockname: tuple[str, int] | None, connection: Any) -> None:
        if self.fired or self.command not in command_names(data):
            return
        if self.skip:
            self.skip -= 1
            return
        self.fired += 1
        self._victim = connection
        admin = self.server.admin()
        try:
            with suppress_instrumentation():
                if self.fault == "kill":
                    assert sockname is not None
                    admin.execute_command("CLIENT", "KILL", "ADDR", f"{sockname[0]}:{sockname[1]}")
                    self.healed.set()
                    return
                if self.fault == "pause":
                    ms = str(int(self.heal_after * 1000) + 5000)  # the timer unpauses first
                    admin.execute_command("CLIENT", "PAUSE", ms, "WRITE")
                else:
                    self.server.stop_answering()
                    until_stopped(self.server.pid)
                self.server.after(self.heal_after, self._heal)
        finally:
            admin.close()

    def disconnected(self, connection: Any) -> None:
        """redis-py closes ``connection``: right after a timeout, so the client gave up."""
        if connection is not self._victim or self.healed.is_set():
            return
        if self.fault == "stop":
            self._heal()
        elif self.fault == "pause":
            self.server.after(UNPAUSE_DELAY, self._heal)

    def _heal(self) -> None:
        with self._lock:
            if self.healed.is_set():
                return
            if self.fault == "stop":
                self.server.resume()
            else:
                admin = self.server.admin()
                try:
                    with suppress_instrumentation():
                        admin.execute_command("CLIENT", "UNPAUSE")
                finally:
                    admin.close()
            self.healed.set()

    def settle(self, timeout: float = FALLBACK_SECONDS + 5) -> None:
        """Wait until the fault is healed and the server has acted on it: a stopped server
        ran what was in its socket buffers, an unpaused one released what it held, before
        it answers a new client's PING."""
        if not self.fired:
            return
        assert self.healed.wait(timeout), f"{self.fault} on {self.command} never healed"
        admin = self.server.admin()
        try:
            with suppress_instrumentation():
                assert admin.ping()
        finally:
            admin.close()


def until_stopped(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP takes effect asynchronously: wait until the kernel reports the server stopped,
    so it cannot still answer the command about to be sent."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        assert time.monotonic() < deadline, f"redis-server {pid} did not stop ({state})"
        time.sleep(0.001)


def as_bytes(command: Any) -> bytes:
    """What redis-py's ``send_packed_command`` was given, as one buffer."""
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

    def trap(
        self, command: str, fault: Fault, *, skip: int = 0, heal_after: float = FALLBACK_SECONDS
    ) -> Trap:
        trap = Trap(self.server, command, fault, skip=skip, heal_after=heal_after)
        self.traps.append(trap)
        return trap

    def settle(self) -> None:
        """Wait out every fired SIGSTOP/PAUSE fault (see :meth:`Trap.settle`)."""
        for trap in self.traps:
            trap.settle()

    def _spring(self, traps: list[Trap], data: bytes, sockname: Any, connection: Any) -> None:
        for name in command_names(data):
            self.sent[name] += 1
        for trap in traps:
            trap.check(data, sockname, connection)

    @staticmethod
    def _closed(traps: list[Trap], connection: Any) -> None:
        for trap in traps:
            trap.disconnected(connection)

    def _trapping_class(self, base: type, traps: list[Trap]) -> type:
        spring, closed = self._spring, self._closed
        if issubclass(base, redis.asyncio.Connection):

            class AsyncTrapping(base):  # type: ignore[misc, valid-type]
                async def send_packed_command(self, command: Any, check_health: bool = True):
                    if not self.is_connected:
                        await self.connect()
                    writer = getattr(self, "_writer", None)
                    name = writer.get_extra_info("sockname") if writer else None
                    spring(traps, as_bytes(command), name, self)
                    return await super().send_packed_command(command, check_health)

                async def disconnect(self, *args: Any, **kwargs: Any) -> None:
                    try:
                        await super().disconnect(*args, **kwargs)
                    finally:
                        closed(traps, self)

            return AsyncTrapping

        class Trapping(base):  # type: ignore[misc, valid-type]
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                if self._sock is None:
                    self.connect()
                sock = self._sock
                spring(traps, as_bytes(command), sock.getsockname() if sock else None, self)
                return super().send_packed_command(command, check_health)

            def disconnect(self, *args: Any, **kwargs: Any) -> None:
                try:
                    super().disconnect(*args, **kwargs)
                finally:
                    closed(traps, self)

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

    def aconnect(
        self, *, timeout: float | None = TIMEOUT, name: str | None = None
    ) -> redis.asyncio.Redis:
        pool = redis.asyncio.ConnectionPool(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=timeout,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            client_name=name,
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
