"""Real servers for the instrumentor tests, and real ways to break them.

- Availability: :func:`require_redis` / :func:`require_postgres` skip a test with the reason
  when the shared server on this machine is unreachable, and fail it when ``CI=true`` (the CI
  machine starts both servers, so unreachable there is a bug, not an environment quirk).
- :class:`PrivateRedis` (fixtures ``private_redis``, ``private_redis_cluster``): a
  redis-server of our own on a free port, optionally a one-node cluster.
  Disruptive faults (CLIENT PAUSE, SIGSTOP) only ever hit it, never the shared 6379 that
  other test sessions use.
- PostgreSQL: :data:`PG_DSN`, :func:`pg_admin`, :func:`unique_table`, and
  :func:`terminate_when_running`, which kills *our own* backend (by pid) mid-statement.
- :class:`TcpFront`: a TCP front that forwards to a server that can change, as a DNS name
  does; :class:`PgFront`, one for PostgreSQL on a free port that answers the first
  connections like a server that is starting up (``FATAL 57P03``), then forwards to the
  real server, counting every connection it accepted; :class:`MovingRedis` (fixture
  ``moving_redis``), a Redis primary and replica behind one address that a failover moves.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DSN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test"
PG_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
_RESTART_HINT = "see DESIGN.md section 8 for the restart commands"


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (``CI=true``) a test whose server is missing."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: servers must be up; {_RESTART_HINT})")
    pytest.skip(f"{reason}; {_RESTART_HINT}")


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` already gave: the kernel may offer a port again once its probe is
closed, before the server it was meant for has bound it (a private cluster's six nodes once
got the same port twice)."""


def free_port(below: int = 65536, *, also_free: int | None = None) -> int:
    """A free TCP port under ``below``, never one this process was given before; with
    ``also_free``, port + ``also_free`` is free too (a cluster node's bus port, +10000)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port >= below or port in _HANDED_OUT:
            continue
        if also_free is not None and not _bindable(port + also_free):
            continue  # taken by another process (a test run beside this one, a client)
        _HANDED_OUT.add(port)
        return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_process_id(host: str, port: int, timeout: float = 1.0) -> int | None:
    """The pid the Redis server on ``port`` reports (``INFO server``), None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while not (found := re.search(rb"process_id:(\d+)\r\n", reply)):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return int(found.group(1))


def answers_as_itself(process: subprocess.Popen[bytes], port: int, within: float) -> bool:
    """Whether the redis-server ``process`` answers on ``port`` as itself (its own pid)
    within ``within`` seconds. False at once when it exited: whatever answers on its port
    then is another process's (the other xdist worker may take a free port first), and a
    connect or a PING would succeed all the same."""
    deadline = time.monotonic() + within
    while process.poll() is None:
        if redis_process_id("127.0.0.1", port, timeout=0.2) == process.pid:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return False


def require_redis() -> None:
    if not _redis_answers(REDIS_HOST, REDIS_PORT):
        unavailable(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}")


def require_postgres() -> None:
    import psycopg

    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.Error as error:
        unavailable(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({error})")


# -- Redis -------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own; ``stop_answering()`` freezes it with SIGSTOP. ``options``
    are more redis-server arguments (``["--rename-command", "EVAL", "TFCALL"]``)."""

    def __init__(self, *, cluster: bool = False, options: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed, so no private server can be started")
        self._timers: list[threading.Timer] = []
        deadline = time.monotonic() + 10
        # Another process may take the port (or a cluster's bus port) between our probe and
        # the server's bind: the server then exits at once, and a new port is tried, in a
        # new directory (a cluster node writes its nodes.conf there before it binds).
        for tries_left in (2, 1, 0):
            self._dir = tempfile.TemporaryDirectory(prefix="otelrec-redis-")
            extra = ["--dir", self._dir.name, *options]
            if cluster:  # a one-node cluster: every slot on this server
                extra += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            self.port = free_port(below=55536, also_free=10000) if cluster else free_port()
            self._process = subprocess.Popen(
                [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
                + ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *extra],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.pid = self._process.pid
            if answers_as_itself(self._process, self.port, deadline - time.monotonic()):
                break
            if self._process.poll() is None or not tries_left:  # hung, or out of ports
                self.close()
                unavailable(f"a private redis-server did not start on port {self.port}")
            self._dir.cleanup()
        if cluster:
            admin = self.admin()
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    self.close()
                    unavailable("a private one-node redis cluster did not become ready")
                time.sleep(0.02)
            admin.close()

    def admin(self) -> Any:
        """A plain client for setting up and checking data (no retries of its own)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0), socket_timeout=5)

    def stop_answering(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def crash(self) -> None:
        """Kill the server (SIGKILL): every connection drops; until :meth:`start_again`,
        connecting is refused."""
        with contextlib.suppress(OSError):
            self.resume()
        self._process.kill()
        self._process.wait()

    def start_again(self, timeout: float = 10.0) -> None:
        """Start a crashed server on the same port, as a supervisor would. Persistence is
        off, so it comes back empty."""
        self._process = subprocess.Popen(
            self._process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.pid = self._process.pid
        if not answers_as_itself(self._process, self.port, timeout):
            exited = self._process.poll() is not None
            raise AssertionError(
                f"redis-server did not {'restart' if exited else 'answer'} on {self.port}"
            )

    def restart(self) -> None:
        """Kill and start again on the same port (:meth:`crash`, :meth:`start_again`)."""
        self.crash()
        self.start_again()

    def after(self, seconds: float, action: Callable[[], object]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def heal(self) -> None:
        """Undo every fault: cancel timers, resume, unpause; between tests."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.resume()
        with contextlib.suppress(Exception):
            admin = self.admin()
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.flushall()
            admin.close()

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        with contextlib.suppress(OSError):
            self.resume()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._dir.cleanup()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def private_redis_cluster() -> Iterator[PrivateRedis]:
    server = PrivateRedis(cluster=True)
    try:
        yield server
    finally:
        server.close()


# -- PostgreSQL --------------------------------------------------------------------------


def pg_admin() -> Any:
    """An autocommit connection for set-up, checks and killing our own backends.

    It is made by psycopg's own ``connect``, from under every wrapper (ours and contrib's),
    so no instrumentation sees it: contrib's psycopg instrumentation before 0.50b0 ignores
    :func:`quiet` and would trace the plumbing's statements next to the test's.
    """
    import psycopg

    connect = inspect.unwrap(psycopg.connect)
    with quiet():
        return connect(PG_DSN, autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Suppress OpenTelemetry instrumentation: test plumbing makes no spans, no retries."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


def kill_idle(pid: int, timeout: float = 10.0) -> None:
    """Terminate backend ``pid`` (ours, idle) and wait until it has exited, so the client's
    next use of the connection meets a dead backend rather than racing the signal."""
    with quiet(), pg_admin() as admin:
        (killed,) = admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        assert killed, f"backend {pid} was not there to kill"
        deadline = time.monotonic() + timeout
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} did not exit"
            time.sleep(0.01)


def unique_table(purpose: str) -> str:
    """A table name no other test session uses."""
    return f"otelrec_{purpose}_{uuid.uuid4().hex[:10]}"


def terminate_when_running(pid: int, marker: str, timeout: float = 10.0) -> threading.Thread:
    """Kill backend ``pid`` (ours) once it is sleeping in ``pg_sleep`` inside a statement
    containing ``marker``: executing it, not still parsing or planning it (a kill during
    asyncpg's prepare raised its internal "another operation is in progress" instead of
    the lost connection, seen once under parallel load)."""

    def run() -> None:
        with quiet(), pg_admin() as admin:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                row = admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
                    " AND wait_event = 'PgSleep' AND query LIKE %s",
                    (pid, f"%{marker}%"),
                ).fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    return
                time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _error_response(code: str, message: str) -> bytes:
    fields = b"".join(
        key + value.encode() + b"\0"
        for key, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


class TcpFront:
    """A TCP front on ``port`` (free by default, or one that was refused) that forwards each
    connection byte for byte to ``target`` as it is when the connection is accepted:
    changing ``target`` moves new connections only, as a DNS name that moves does, while
    open ones stay with the old server. ``accepted`` counts connections. While ``frozen``
    is set, bytes are read and dropped: the server seems to stop answering, as in a
    partition where the kernel still acknowledges."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.accepted = 0
        self.frozen = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._sockets.append(client)
            handler = self._handler(self.accepted)
            threading.Thread(target=handler, args=(client, self.target), daemon=True).start()

    def _handler(self, number: int) -> Callable[[socket.socket, tuple[str, int]], None]:
        """What the ``number``-th connection gets (forwarded, here)."""
        return self._forward

    def _forward(self, client: socket.socket, target: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._sockets.append(upstream)

        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := source.recv(65536):
                    if not self.frozen.is_set():
                        sink.sendall(chunk)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


class PgFront(TcpFront):
    """A TCP front for PostgreSQL on ``port`` (free by default, or one that was refused).

    The first ``starting_up`` connections get ``FATAL 57P03 the database system is starting
    up`` after the startup packet, as a real server in recovery answers; the rest are
    forwarded byte for byte to the real server. ``accepted`` counts connections.
    """

    def __init__(self, port: int | None = None, *, starting_up: int = 0) -> None:
        self.starting_up = starting_up
        super().__init__((PG_HOST, PG_PORT), port)

    def _handler(self, number: int) -> Callable[[socket.socket, tuple[str, int]], None]:
        return self._refuse if number <= self.starting_up else self._forward

    def _refuse(self, client: socket.socket, target: tuple[str, int]) -> None:
        with contextlib.suppress(OSError, ConnectionError), client:
            while True:
                length, code = struct.unpack("!II", _read_exact(client, 8))
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    client.sendall(b"N")
                    continue
                _read_exact(client, length - 8)
                client.sendall(_error_response("57P03", "the database system is starting up"))
                return


class MovingRedis:
    """A Redis primary and its replica behind one address (``port``, a :class:`TcpFront`),
    as a managed service's DNS name (ElastiCache's primary endpoint) puts them.

    :meth:`fail_over` promotes the replica and turns the old primary into its replica, then
    moves the address to the new primary, as the service moves the name; with
    ``move_address=False`` the name lags behind. Connections opened before stay with the
    old primary, which now answers writes with ``READONLY``. ``front.accepted`` counts the
    connections clients opened.
    """

    def __init__(self) -> None:
        self.primary, self.replica = PrivateRedis(), PrivateRedis()
        self.front: TcpFront | None = None
        try:
            self._follow(self.replica, self.primary)
            self.front = TcpFront(("127.0.0.1", self.primary.port))
        except BaseException:
            self.close()
            raise
        self.port = self.front.port

    @staticmethod
    def _follow(replica: PrivateRedis, primary: PrivateRedis, timeout: float = 10.0) -> None:
        with quiet():
            admin, source = replica.admin(), primary.admin()
            try:
                # a full sync starts at once, not after the default 5 s wait for more replicas
                source.config_set("repl-diskless-sync-delay", 0)
                admin.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
                deadline = time.monotonic() + timeout
                while admin.info("replication").get("master_link_status") != "up":
                    assert time.monotonic() < deadline, "the replica did not sync"
                    time.sleep(0.02)
            finally:
                admin.close()
                source.close()

    def fail_over(self, *, move_address: bool = True, timeout: float = 10.0) -> None:
        """Once the replica has every write, promote it, point the address at it (by
        default) and turn the old primary into its replica, in that order, as a managed
        service does. (Not ``WAIT``: it counts the writes of the connection that sends it,
        and the clients' writes came on others.)"""
        old, new = self.primary, self.replica
        with quiet():
            source, admin = old.admin(), new.admin()
            try:
                written = int(source.info("replication")["master_repl_offset"])
                deadline = time.monotonic() + timeout
                while int(admin.info("replication").get("slave_repl_offset", -1)) < written:
                    assert time.monotonic() < deadline, "the replica lags"
                    time.sleep(0.01)
                admin.execute_command("REPLICAOF", "NO", "ONE")
            finally:
                source.close()
                admin.close()
        self.primary, self.replica = new, old
        if move_address:
            self.move_address()
        self._follow(old, new)

    def peek(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the primary, directly (not through the address), uninstrumented."""
        with quiet():
            admin = self.primary.admin()
            try:
                return getattr(admin, method)(*args)
            finally:
                admin.close()

    def move_address(self) -> None:
        assert self.front is not None
        self.front.target = ("127.0.0.1", self.primary.port)

    def close(self) -> None:
        with contextlib.ExitStack() as steps:
            for server in (self.primary, self.replica):
                steps.callback(server.close)
            if self.front is not None:
                steps.callback(self.front.close)


@pytest.fixture
def moving_redis() -> Iterator[MovingRedis]:
    made = MovingRedis()
    try:
        yield made
    finally:
        made.close()


async def aclose(client: Any) -> None:
    """Close a redis.asyncio client: ``aclose()`` since redis-py 5.0.1, ``close()`` before.

    A cluster client whose last command failed on a lost connection is marked for
    re-initialising, and its ``aclose()`` then closes nothing (redis-py #3846): its nodes'
    connections are closed here too, or they warn ``unclosed`` when collected later, in
    whichever test runs then."""
    closing = getattr(client, "aclose", None) or client.close
    await closing()
    nodes = getattr(client, "nodes_manager", None)
    close_nodes = getattr(nodes, "aclose", None) or getattr(nodes, "close", None)
    if close_nodes is not None:
        await close_nodes()
        await close_nodes("startup_nodes")


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (for work done by another thread) until it holds or time is up."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
