"""Fixtures for the store suite: one fresh store per back end, private Redis servers.

Every test gets its own namespace on the shared servers (a unique Redis key prefix, unique
PostgreSQL tables) and removes it afterwards, because other people run tests against the same
servers at the same time. Destructive faults (stopping Redis) only ever touch a private
``redis-server`` started here on a free port. A server that cannot be reached skips its tests
with the reason, except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from servers import answers_as_itself, free_port

from otel_recovery.stores import Store, open_store
from otel_recovery.testing import FakeClock

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ["memory", "sqlite", "redis", "postgres"]
DURABLE = ["sqlite", "redis", "postgres"]

_reachable: dict[str, str | None] = {}


def _probe(kind: str) -> str | None:
    """None if the server answers, else why not."""
    if kind not in _reachable:
        try:
            if kind == "redis":
                import redis

                redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
            else:
                import psycopg

                psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
            _reachable[kind] = None
        except Exception as exc:  # any failure means: not usable here
            _reachable[kind] = f"{type(exc).__name__}: {exc}"
    return _reachable[kind]


def require(kind: str) -> None:
    """Skip (or under CI=true fail) when the server behind ``kind`` is unreachable."""
    if kind not in ("redis", "postgres"):
        return
    problem = _probe(kind)
    if problem is None:
        return
    where = REDIS_URL if kind == "redis" else POSTGRES_URL
    message = f"{kind} server at {where} is unreachable ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true requires it")
    pytest.skip(message)


def unique(tag: str = "t") -> str:
    return f"{tag}{uuid.uuid4().hex[:10]}"


def store_url(kind: str, tmp_path: Path, name: str, options: str = "") -> str:
    """A fresh, private URL of back end ``kind``; ``options`` is an extra query string."""
    sep = "&" if options else ""
    if kind == "memory":
        return "memory://" + (f"?{options}" if options else "")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / (name + '.db')}" + (f"?{options}" if options else "")
    if kind == "redis":
        return f"{REDIS_URL}?prefix=otr-test:{name}:{sep}{options}"
    return f"{POSTGRES_URL}?table={name}{sep}{options}"


def cleanup(kind: str, name: str) -> None:
    """Remove what a test left on the shared servers."""
    if kind == "redis" and _probe("redis") is None:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"otr-test:{name}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    elif kind == "postgres" and _probe("postgres") is None:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            for part in ("meta", "records", "heads", "counters", "batches"):
                conn.execute(f'DROP TABLE IF EXISTS "{name}_{part}"')


@dataclass
class Backend:
    """One back end under test: its URL, a store on a FakeClock, and how to let time pass."""

    kind: str
    url: str
    name: str
    clock: FakeClock
    tmp_path: Path
    opened: list[Store] = field(default_factory=list)

    def open(self, options: str = "", clock: FakeClock | None = None) -> Store:
        url = store_url(self.kind, self.tmp_path, self.name, options) if options else self.url
        store = open_store(url, clock=clock or self.clock)
        self.opened.append(store)
        return store

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: virtual time, plus real time for Redis (native expiry)."""
        self.clock.advance(seconds)
        if self.kind == "redis":
            time.sleep(seconds)


def backend_of(kind: str, tmp_path: Path) -> Iterator[Backend]:
    """A fixture's body: a private namespace of ``kind``, its stores closed and its data
    removed afterwards."""
    require(kind)
    name = unique("otr_")
    found = Backend(kind, store_url(kind, tmp_path, name), name, FakeClock(), tmp_path)
    yield found
    for store in found.opened:
        store.close()
    cleanup(kind, name)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Iterator[Backend]:
    yield from backend_of(request.param, tmp_path)


@pytest.fixture(params=DURABLE)
def durable(request, tmp_path) -> Iterator[Backend]:
    yield from backend_of(request.param, tmp_path)


class PrivateRedis:
    """A redis-server of our own on a free port, which tests may stop and restart at will."""

    def __init__(self, directory: Path, persistent: bool) -> None:
        self.port = free_port()
        self.dir = directory
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed; CI=true requires it")
            pytest.skip("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]  # fmt: skip
        for _ in range(3):  # another process (the other xdist worker) may take the port first
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--dir", str(self.dir), *persistence],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if answers_as_itself(self.process, self.port, within=10):
                self._wait_loaded(within=10)
                return
            if self.process.poll() is None:
                break  # running but silent: not a port taken
            self.port = free_port()  # it exited: the port was taken, so another one
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def _wait_loaded(self, within: float) -> None:
        """Until the server has loaded its append-only file: it answers INFO (what
        ``answers_as_itself`` asks) while loading, and refuses data commands with LOADING."""
        import redis

        admin = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + within
        try:
            while admin.info("persistence").get("loading") and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            admin.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: with AOF always, everything is on disk
            self.process.wait(timeout=10)
        self.process = None


def _serving(tmp_path: Path, persistent: bool) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path, persistent=persistent)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    yield from _serving(tmp_path, persistent=True)


@pytest.fixture
def volatile_redis(tmp_path) -> Iterator[PrivateRedis]:
    """A private Redis that keeps nothing on disk: restarted, it comes back empty."""
    yield from _serving(tmp_path, persistent=False)


def budget_counts(url: str, key: str) -> tuple[int, int, str | None]:
    """Calls and retries in a fleet-wide budget's buckets in Redis, and the bucket width it
    records ("w")."""
    import redis

    admin = redis.Redis.from_url(url, decode_responses=True)
    try:
        fields = admin.hgetall(key)
    finally:
        admin.close()
    calls = sum(int(v) for k, v in fields.items() if k.startswith("c"))
    retries = sum(int(v) for k, v in fields.items() if k.startswith("r"))
    return calls, retries, fields.get("w")


def until(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Whether ``condition`` holds within ``within`` real seconds (polled every 20 ms)."""
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def callers_asking(link: Any) -> list[str]:
    """What callers ask of a fleet-wide component's ``link`` (``component._link``) from now
    on, one entry per ask: ``"turn"`` (waiting for the member's turn to talk to Redis, at most
    ``DECISION_TIMEOUT``) or ``"run"`` (a script sent to Redis). Counted on the instance, and
    not for the link's own sync thread: how often a decision waited for Redis, counted
    instead of timed, so a loaded machine cannot change the answer."""
    asked: list[str] = []

    def counting(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not link._thread:
                asked.append(kind)
            return method(*args, **kwargs)

        return counted

    link.turn = counting("turn", link.turn)
    link.run = counting("run", link.run)
    return asked
