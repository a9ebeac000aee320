"""Harness for the Redis Cluster tests: a real 3-primary, 3-replica private cluster.

:class:`PrivateCluster` starts six ``redis-server`` processes of our own (free ports, temp
dirs), joins them with ``CLUSTER MEET``, splits the slots with ``CLUSTER ADDSLOTSRANGE`` and
pairs each replica with its primary by ``CLUSTER REPLICATE``, then waits until every node
says ``cluster_state:ok``, every node reports the same slot map and every replica's link is
up. Faults are real: SIGKILL of a primary, SIGSTOP (a primary that stops answering), a
replica promoted by ``CLUSTER FAILOVER TAKEOVER``, and a slot migrated with
``SETSLOT MIGRATING/IMPORTING`` and ``MIGRATE`` (ASK and MOVED redirections).
:meth:`PrivateCluster.heal` puts the original topology back between tests (restarts what was
killed, resumes what was stopped, moves migrated slots home, fails over to the original
primaries) and flushes every primary.

:class:`ClusterStack` is redis-py alone (``baseline``) or with our instrumentor (alone, or
with contrib in either load order). It reuses ``instrumentors.test_redis.Harness``:
``attempts`` counts calls into redis-py beneath every layer; ``sent`` counts commands written
to a socket per ``(port, name)`` (a pipeline's packed buffer counts each command by name).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from instrumentors.test_redis import Harness
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import free_port, unavailable

from integrations.redis_process import RedisProcess, is_plumbing
from integrations.redis_queues import as_bytes, command_names
from otel_recovery.policies.circuit_breaker import CircuitBreaker

REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:3] if part.isdigit())
NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout``: short, so a dead primary is flagged FAIL within a second or two."""
TIMEOUT = 0.4
"""The clients' socket timeout: a SIGSTOPped primary makes a command fail after this long."""
SETTLE = 20.0
"""Bound for the cluster to converge (start, failover, heal) on a loaded 2-core machine."""
REFRESH_AT_ONCE: dict[str, Any] = {"topology_refresh_min_interval": 0} if REDIS_PY >= (8, 2) else {}
"""What makes redis-py 8.2 and later run the slot-map refresh an error asks for as the next
attempt starts, however soon. 8.2 runs such refreshes at most once per
``topology_refresh_min_interval`` (1 s by default; earlier releases had no such limit, and
refreshed as the error happened: :data:`STALE_ONCE`): the failover tests are about our
retries reaching the promoted replica, so their clients take no interval;
``test_redis_cluster.py`` tests the interval on its own."""
STALE_ONCE = REDIS_PY < (8, 2)
"""Whether redis-py's first call after a failover still goes to the old primary. Before 8.2
the refresh an error asks for runs as the error happens: a refresh before the promotion
keeps the dead node in the slot map, and the next call fails on it once more. 8.2 runs the
refresh as the next call starts, so that call already finds the promoted replica."""
_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(text: Any) -> dict[str, str]:
    """INFO / CLUSTER INFO as text fields (redis-py parses some of them already)."""
    if isinstance(text, dict):
        return {_text(k): _text(v) for k, v in text.items()}
    return dict(
        line.split(":", 1) for line in _text(text).splitlines() if ":" in line and line[0] != "#"
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = SETTLE) -> None:
    """Poll ``condition`` (the cluster's own convergence) until it holds; fail with ``what``.
    Errors while polling (a node still starting) count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the private cluster: {what} (not within {timeout} s)")
        time.sleep(0.02)


class Node(RedisProcess):
    """One ``redis-server --cluster-enabled yes`` of our own; its dir (and ``nodes.conf``)
    outlives a SIGKILL, so :meth:`start` brings the same node back."""

    def __init__(self, binary: str, root: str) -> None:
        super().__init__(binary, root, lambda: free_port(below=55536, also_free=10000))  # +bus
        self.id = ""

    def command_line(self) -> list[str]:
        return (
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
            + ["--dir", self.dir, "--cluster-enabled", "yes"]
            + ["--cluster-config-file", "nodes.conf"]
            + ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
            + ["--cluster-replica-validity-factor", "0"]
            # no automatic failover: a test promotes a replica itself (TAKEOVER), so a loaded
            # machine cannot have one happen before the test looked at the dead shard
            + ["--cluster-replica-no-failover", "yes"]
            + ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
            # CLUSTER SLOTS lists a replica only once its offset is past 0: a primary with
            # nothing written moves it by its PINGs to replicas (every 10 s by default)
            + ["--repl-ping-replica-period", "1"]
        )

    def start(self) -> None:
        self.spawn()

    def role(self) -> str:
        return _info(self.call("INFO", "replication"))["role"]


class PrivateCluster:
    """Three primaries (slots 0-5460, 5461-10922, 10923-16383), each with one replica."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed, so no private cluster can be started")
        self._steps = contextlib.ExitStack()
        try:
            self._root = self._steps.enter_context(
                tempfile.TemporaryDirectory(prefix="otelrec-cluster-")
            )
            self.nodes: list[Node] = []
            for _ in range(6):
                node = Node(str(binary), self._root)
                self._steps.callback(node.close)
                self.nodes.append(node)
                node.launch(node.start)
            self.primaries = self.nodes[:3]  # the original ones, in slot order
            self.replicas = self.nodes[3:]  # replicas[i] replicates primaries[i]
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for node in self.nodes:
            wait_for(node.answers, f"{node.name} did not start")
            node.id = _text(node.call("CLUSTER", "MYID"))
        # Distinct config epochs from the start, as ``redis-cli --cluster create`` gives
        # them. Left at 0, the primaries settle theirs by collisions after the cluster is
        # already healthy; a replica promoted meanwhile could claim its dead primary's slots
        # with that primary's own (freshly bumped) epoch, which no node accepts as newer,
        # and the takeover then never spreads (seen once in a full run).
        for epoch, node in enumerate(self.nodes, start=1):
            node.call("CLUSTER", "SET-CONFIG-EPOCH", str(epoch))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            first.call("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        for node, (start, end) in zip(self.primaries, _RANGES):
            node.call("CLUSTER", "ADDSLOTSRANGE", str(start), str(end))
        wait_for(self._everyone_knows_everyone, "the nodes did not meet")
        for replica, primary in zip(self.replicas, self.primaries):
            replica.call("CLUSTER", "REPLICATE", primary.id)
        for replica in self.replicas:
            wait_for(lambda node=replica: node.role() == "slave", f"{replica.name} no replica")
        self._flush()  # a write moves the replicas' offsets (see --repl-ping-replica-period)
        self.wait_healthy()

    # -- what the cluster says -------------------------------------------------------------

    def _everyone_knows_everyone(self) -> bool:
        for node in self.nodes:
            lines = _text(node.call("CLUSTER", "NODES")).splitlines()
            if len(lines) != len(self.nodes):
                return False
            if any("handshake" in line or "noaddr" in line for line in lines):
                return False
        return True

    def slot_map(self, node: Node) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """``CLUSTER SLOTS`` as (start, end, primary port, replica ports)."""
        rows = []
        for row in node.call("CLUSTER", "SLOTS"):
            start, end, primary, *replicas = row
            rows.append(
                (int(start), int(end), int(primary[1]), tuple(sorted(r[1] for r in replicas)))
            )
        return sorted(rows)

    def owner(self, slot: int) -> Node:
        """The primary serving ``slot`` now, as the first original primary alive sees it."""
        for start, end, port, _ in self.slot_map(self._a_live_node()):
            if start <= slot <= end:
                return self.node(port)
        raise AssertionError(f"slot {slot} is not covered")

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def _a_live_node(self) -> Node:
        return next(n for n in self.nodes if n.answers())

    def _healthy(self) -> bool:
        maps = set()
        for node in self.nodes:
            if not node.answers():
                return False
            info = _info(node.call("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != "6":
                return False
            nodes = _text(node.call("CLUSTER", "NODES")).replace("nofailover", "")
            if "fail" in nodes or "[" in nodes:  # fail?, fail, or a slot mid-migration
                return False
            maps.add(tuple(self.slot_map(node)))
            if node.role() == "slave":
                if _info(node.call("INFO", "replication")).get("master_link_status") != "up":
                    return False
        if len(maps) != 1:
            return False
        (agreed,) = maps
        return len(agreed) == 3 and all(len(replicas) == 1 for *_, replicas in agreed)

    def wait_healthy(self, timeout: float = SETTLE) -> None:
        wait_for(self._healthy, "did not become healthy (state ok, slots agreed)", timeout)

    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    # -- faults --------------------------------------------------------------------------------

    def promote(self, replica: Node, old_primary: Node) -> None:
        """``CLUSTER FAILOVER TAKEOVER`` on ``replica`` (no vote, no wait for the dead
        primary's node-timeout), then wait until every live node routes the old primary's
        slots to it."""
        replica.call("CLUSTER", "FAILOVER", "TAKEOVER")
        live = [n for n in self.nodes if n is not old_primary]

        def routed() -> bool:
            return all(
                any(port == replica.port for _, _, port, _ in self.slot_map(n)) for n in live
            )

        wait_for(routed, f"{replica.name} did not take over from {old_primary.name}")

    def migrate_slot(self, slot: int, source: Node, target: Node, *, finish: bool = True) -> None:
        """The resharding procedure: IMPORTING on the target, MIGRATING on the source, each
        key moved by ``MIGRATE``; with ``finish``, ``SETSLOT NODE`` on every primary."""
        target.call("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.id)
        source.call("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.id)
        self.move_keys(slot, source, target)
        if finish:
            self.finish_migration(slot, source, target)

    def move_keys(self, slot: int, source: Node, target: Node, count: int = 1000) -> None:
        while keys := source.call("CLUSTER", "GETKEYSINSLOT", str(slot), str(count)):
            source.call("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)

    def finish_migration(self, slot: int, source: Node, target: Node) -> None:
        for node in (target, source, *self.live_primaries()):
            node.call("CLUSTER", "SETSLOT", str(slot), "NODE", target.id)

        def agreed() -> bool:
            return all(
                any(s <= slot <= e and port == target.port for s, e, port, _ in self.slot_map(n))
                for n in self.nodes
                if n.answers()
            )

        wait_for(agreed, f"slot {slot} did not settle on {target.name}")

    def wait_replicated(self) -> None:
        """Every replica has what its primary has (replication is asynchronous: a primary
        killed right after a write may take it with it)."""

        wanted = {
            p.port: int(p.call("INFO", "replication")["master_repl_offset"])
            for p in self.live_primaries()
        }

        def caught_up() -> bool:
            for primary in self.live_primaries():
                replica = primary.call("INFO", "replication").get("slave0")
                if not isinstance(replica, dict) or int(replica["offset"]) < wanted.get(
                    primary.port, 0
                ):
                    return False
            return True

        wait_for(caught_up, "the replicas did not catch up")

    def live_primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.answers() and n.role() == "master"]

    def serve_partially(self) -> None:
        """Healthy shards go on serving while one is down (``cluster-require-full-coverage
        no``, as deployments that shard independent data set it): a test of what happens
        on the healthy shards must not race the cluster declaring itself down as a whole
        after node-timeout. :meth:`heal` sets full coverage back."""
        for node in self.nodes:
            if node.answers():
                node.call("CONFIG", "SET", "cluster-require-full-coverage", "no")

    def _full_coverage(self) -> None:
        for node in self.nodes:
            node.call("CONFIG", "SET", "cluster-require-full-coverage", "yes")

    # -- between tests -------------------------------------------------------------------

    def heal(self) -> None:
        """Original topology back, and no data: every step runs even if one fails."""
        with contextlib.ExitStack() as steps:
            steps.callback(self.wait_healthy)
            steps.callback(self._full_coverage)
            steps.callback(self._flush)
            steps.callback(self._original_primaries)
            steps.callback(self._slots_home)
            steps.callback(self._revive)
        self.wait_healthy()

    def _revive(self) -> None:
        for node in self.nodes:
            node.resume()
            if not node.alive:
                node.start()
        for node in self.nodes:
            wait_for(node.answers, f"{node.name} did not come back")

    def _flush(self) -> None:
        for node in self.live_primaries():
            node.call("FLUSHALL")

    def _slots_home(self) -> None:
        """Slots left mid-migration or moved by a test go back to their original primary's
        shard (flushed first: no keys to carry)."""
        self._flush()
        for node in self.nodes:  # mid-migration states are per node: clear them
            for line in _text(node.call("CLUSTER", "NODES")).splitlines():
                if "myself" not in line:
                    continue
                for marker in re.findall(r"\[(\d+)-[<>]-", line):
                    node.call("CLUSTER", "SETSLOT", marker, "STABLE")
        for home, (start, end) in zip(self.primaries, _RANGES):
            shard = {home.port, self.replicas[self.primaries.index(home)].port}
            for s, e, port, _ in self.slot_map(self._a_live_node()):
                if port in shard:
                    continue
                owner = self.node(port)
                # the shard's current primary imports it back by the standard procedure
                back = (
                    home if home.role() == "master" else self.replicas[self.primaries.index(home)]
                )
                for slot in range(max(s, start), min(e, end) + 1):
                    self.migrate_slot(slot, owner, back)

    def _original_primaries(self) -> None:
        """A primary that was replaced came back as its replica's replica: make it primary
        again. ``TAKEOVER`` (no election): a graceful failover right after the takeover
        that replaced it waits out the voters' per-shard cooldown (2 x node-timeout), and
        what data it has does not matter (the shards are flushed next)."""
        for primary in self.primaries:
            if primary.role() == "master":
                continue
            wait_for(
                lambda node=primary: (
                    _info(node.call("CLUSTER", "INFO")).get("cluster_state") == "ok"
                ),
                f"{primary.name} did not rejoin",
            )
            primary.call("CLUSTER", "FAILOVER", "TAKEOVER")
            wait_for(
                lambda node=primary: node.role() == "master",  # type: ignore[misc]
                f"{primary.name} did not become primary again",
            )

    def close(self) -> None:
        """Every process is killed and every dir removed, whatever fails on the way."""
        self._steps.close()


def key_on(node_index: int, prefix: str = "k") -> str:
    """A key whose slot is in the ``node_index``-th original primary's range: a hash tag
    picked so the slot is in the range (``{n}`` with a small n)."""
    from redis.crc import key_slot

    start, end = _RANGES[node_index]
    for n in range(100_000):
        key = f"{prefix}{{{n}}}"
        if start <= key_slot(key.encode()) <= end:
            return key
    raise AssertionError("no key found")


# -- the stacks ------------------------------------------------------------------------------


class ClusterStack(Harness):
    """redis-py's cluster clients alone (``baseline``) or instrumented (``order``), with
    counting connections on every node."""

    def __init__(self, cluster: PrivateCluster, order: str, **settings: Any) -> None:
        super().__init__(cluster)  # type: ignore[arg-type]
        self.cluster = cluster
        self.order = order
        self.per_node: Counter[tuple[int, str]] = Counter()
        self.instrumented = order != "baseline"
        self._clients: list[Any] = []
        self._restores: list[tuple[type, Any]] = []
        self._count_sends()
        if self.instrumented:
            self.instrument(order, **settings)

    def reset_counts(self) -> None:
        super().reset_counts()
        self.per_node.clear()

    def _count_buffer(self, port: int, command: Any) -> None:
        for name in command_names(as_bytes(command)):
            self.sent[name] += 1
            self.per_node[port, name] += 1

    def _count_sends(self) -> None:
        """Count every buffer a connection to one of the cluster's nodes writes, by patching
        the connection classes (a sync cluster client takes no ``connection_class``);
        the plumbing's own calls (:func:`plumbing`) are not counted."""
        ports = {n.port for n in self.cluster.nodes}
        count = self._count_buffer
        for base in (redis.Connection, redis.asyncio.Connection):
            owner = next(k for k in base.__mro__ if "send_packed_command" in k.__dict__)
            original = owner.__dict__["send_packed_command"]
            self._restores.append((owner, original))
            if inspect.iscoroutinefunction(original):

                async def asend(
                    conn: Any, command: Any, *args: Any, _o: Any = original, **kwargs: Any
                ) -> Any:
                    if not is_plumbing() and getattr(conn, "port", None) in ports:
                        count(int(conn.port), command)
                    return await _o(conn, command, *args, **kwargs)

                owner.send_packed_command = asend  # type: ignore[method-assign]
            else:

                def send(
                    conn: Any, command: Any, *args: Any, _o: Any = original, **kwargs: Any
                ) -> Any:
                    if not is_plumbing() and getattr(conn, "port", None) in ports:
                        count(int(conn.port), command)
                    return _o(conn, command, *args, **kwargs)

                owner.send_packed_command = send  # type: ignore[method-assign]

    def cluster_client(self, retries: int = 0, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A sync cluster client that knows every node. ``retries=0`` (the README's advice
        for one retry layer) turns redis-py's cluster-level retry off; its slot map is
        refreshed as soon as an error asks (:data:`REFRESH_AT_ONCE`) unless ``kwargs`` say
        otherwise."""
        kwargs = {**REFRESH_AT_ONCE, **kwargs}
        client = redis.cluster.RedisCluster(
            startup_nodes=[
                redis.cluster.ClusterNode(h, p) for h, p in self.cluster.startup_nodes()
            ],
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), retries),
            **kwargs,
        )
        self._owners.add(id(client.nodes_manager))
        self._clients.append(client)
        return client

    def acluster_client(
        self, retries: int = 0, **kwargs: Any
    ) -> redis.asyncio.cluster.RedisCluster:
        """The asyncio twin of :meth:`cluster_client`."""
        kwargs = {**REFRESH_AT_ONCE, **kwargs}
        client = redis.asyncio.cluster.RedisCluster(
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(h, p) for h, p in self.cluster.startup_nodes()
            ],
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=redis.asyncio.retry.Retry(NoBackoff(), retries),
            **kwargs,
        )
        self._owners.add(id(client.nodes_manager))
        return client

    def close(self) -> None:
        with contextlib.ExitStack() as steps:
            steps.callback(super().close)
            for owner, original in self._restores:
                steps.callback(setattr, owner, "send_packed_command", original)
            for client in self._clients:
                steps.callback(client.close)

    # -- what our layer keeps --------------------------------------------------------------

    def breaker(self, node: Node) -> CircuitBreaker | None:
        """Our breaker for ``node`` (None for the baseline, or before any call to it)."""
        if not self.instrumented:
            return None
        assert self.ours.targets is not None
        return self.ours.targets.known_breaker("127.0.0.1", node.port)

    def breakers(self) -> dict[str, str]:
        """Every breaker we keep, by name, with its state."""
        if not self.instrumented or self.ours.targets is None:
            return {}
        return {b.name: b.snapshot().state for b in self.ours.targets.breakers()}

    def value(self, key: str) -> Any:
        """A key's value as its shard's primary holds it now (no client of the test)."""
        from redis.crc import key_slot

        return self.cluster.owner(key_slot(key.encode())).call("GET", key)


@contextlib.contextmanager
def module_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        yield cluster
    finally:
        cluster.close()
