"""Harness for the Redis Sentinel tests: a real master, two replicas and three sentinels.

:class:`PrivateSentinel` starts three ``redis-server`` data nodes (one master, two
``--replicaof`` it) and three ``redis-server <conf> --sentinel`` processes of our own (free
ports, temp dirs, each sentinel with its own config file, which it rewrites), monitoring the
service :data:`SERVICE` with quorum 2, a short ``down-after-milliseconds`` and
``failover-timeout``. It waits until every sentinel names the same master, sees both
replicas up and knows the two other sentinels.

Faults are real: ``SENTINEL FAILOVER`` (a planned failover), SIGKILL or SIGSTOP of the master
(the sentinels' automatic failover), SIGKILL or SIGSTOP of a replica, ``CLIENT KILL`` of a
connection; :meth:`SentinelStack.when_sent` fires one at the moment a client is about to
send a chosen command, so it meets that command in flight. Sentinel turns a former master
that comes back into a replica of the new one only some ten seconds later
(``SENTINEL_PUBLISH_PERIOD * 4`` plus an ``INFO`` period); :meth:`PrivateSentinel.demote`
does at once what it then sends (``REPLICAOF`` and ``CLIENT KILL TYPE normal``), or only the
``REPLICAOF``, which leaves clients connected to a replica that answers writes with
``READONLY``. :meth:`PrivateSentinel.heal` restores a healthy topology between tests
(whichever node is master: a failover back would cost seconds): what was stopped resumes,
what was killed starts again as a replica of the current master, a second master is
demoted (polled: a failover may still be under way), every replica's link is up, every
sentinel agrees, and the data is flushed.

:class:`SentinelStack` is redis-py alone (``baseline``) or with our instrumentor (alone, or
with contrib in either load order): :class:`integrations.redis_cluster.ClusterStack`'s
counting (``attempts`` per call into redis-py beneath every layer, ``sent`` and
``per_node[(port, name)]`` per command written to a socket of a data node or a sentinel),
with Sentinel-managed clients.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import aclose, free_port, unavailable

from integrations.redis_cluster import SETTLE, ClusterStack, _text, wait_for
from integrations.redis_process import RedisProcess, plumbing
from integrations.redis_queues import as_bytes, command_names

SERVICE = "svc"
DOWN_AFTER_MS = 1500
"""``down-after-milliseconds``: a dead master is subjectively down after this long. Above the
sentinels' 1 s PING period: at 800 ms a just-promoted master was now and then flagged down
before its first PING reply, and the sentinels failed over a second time."""
FAILOVER_TIMEOUT_MS = 2000
"""``failover-timeout``: also how long a sentinel waits before voting again for the same
master (twice this), so the tests' failovers can follow each other."""
TIMEOUT = 0.4
"""The clients' socket timeout: a SIGSTOPped master makes a command fail after this long."""


class Server(RedisProcess):
    """One ``redis-server`` data node of our own; :meth:`start` brings it back after a kill
    (empty: persistence is off), as a replica of ``replicaof`` if given."""

    def __init__(self, binary: str, root: str) -> None:
        super().__init__(binary, root, free_port)

    def command_line(self) -> list[str]:
        return (
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
            + ["--dir", self.dir, "--repl-diskless-sync", "yes"]
            + ["--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"]
        )

    def start(self, replicaof: Server | None = None) -> None:
        extra = [] if replicaof is None else ["--replicaof", "127.0.0.1", str(replicaof.port)]
        self.spawn(*extra)

    def replication(self) -> dict[str, Any]:
        return dict(self.call("INFO", "replication"))

    def role(self) -> str:
        return str(self.replication()["role"])


class SentinelProcess(Server):
    """``redis-server sentinel.conf --sentinel``, monitoring ``master`` as :data:`SERVICE`."""

    def configure(self, master: Server) -> None:
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as out:
            out.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                "daemonize no\nloglevel notice\nlogfile sentinel.log\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 2\n"
            )
        self.conf = conf

    def command_line(self) -> list[str]:
        return [self.binary, self.conf, "--sentinel"]

    def start_monitoring(self, master: Server) -> None:
        """Write the configuration (it names this sentinel's port and dir) and start."""
        self.configure(master)
        self.start()

    def master_state(self) -> dict[str, Any]:
        return dict(self.ask("sentinel_master", SERVICE))

    def replicas(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.ask("sentinel_slaves", SERVICE)]


def _flags(state: dict[str, Any]) -> set[str]:
    return set(_text(state.get("flags", "")).split(","))


class PrivateSentinel:
    """One master, two replicas, three sentinels; :meth:`master` is whichever node the
    sentinels name now."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed, so no private sentinel can be started")
        self._steps = contextlib.ExitStack()
        try:
            root = self._steps.enter_context(tempfile.TemporaryDirectory(prefix="otelrec-snt-"))
            self.data = [Server(str(binary), root) for _ in range(3)]
            self.sentinels = [SentinelProcess(str(binary), root) for _ in range(3)]
            for node in self.data + self.sentinels:
                self._steps.callback(node.close)
            first = self.data[0]
            first.launch(first.start)
            for node in self.data[1:]:
                node.launch(lambda node=node: node.start(replicaof=first))
            for node in self.data:
                wait_for(node.answers, f"{node.name} did not start")
            # a sentinel learns the replicas from the master's INFO, at once and then every
            # ten seconds: start the sentinels once the master lists both
            wait_for(lambda: self._replicas_linked(first), "the replicas did not sync")
            for sentinel in self.sentinels:
                sentinel.launch(partial(sentinel.start_monitoring, first))
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def nodes(self) -> list[Server]:
        """Every process a client of the test may talk to (counted by the stacks)."""
        return [*self.data, *self.sentinels]

    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels, as ``Sentinel([...])`` takes them."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def node(self, port: int) -> Server:
        return next(n for n in self.data if n.port == port)

    # -- what the sentinels say ------------------------------------------------------------

    def named_master(self) -> int | None:
        """The master's port, if every live sentinel names the same one in ``SENTINEL
        MASTERS`` (what redis-py reads) with no failover in progress. (``GET-MASTER-ADDR-BY-
        NAME`` names the promoted replica earlier, while the sentinel that leads the failover
        still lists the old master, ``failover_in_progress``, and redis-py takes that.)"""
        states = [s.master_state() for s in self.sentinels if s.answers()]
        ports = {int(state["port"]) for state in states}
        if len(ports) != 1 or any("failover_in_progress" in _flags(s) for s in states):
            return None
        return ports.pop()

    def master(self) -> Server:
        port = self.named_master()
        assert port is not None, "the sentinels do not agree on a master"
        return self.node(port)

    def replicas(self) -> list[Server]:
        master = self.master()
        return [n for n in self.data if n is not master]

    def _replicas_linked(self, master: Server) -> bool:
        """``master`` lists the two other nodes as replicas, each with its link up."""
        if int(master.replication()["connected_slaves"]) != 2:
            return False
        for node in self.data:
            if node is not master:
                info = node.replication()
                if info["role"] != "slave" or int(info["master_port"]) != master.port:
                    return False
                if info["master_link_status"] != "up":
                    return False
        return True

    def _healthy(self) -> bool:
        if not all(n.answers() for n in self.data + self.sentinels):
            return False
        port = self.named_master()
        if port is None:
            return False
        master = self.node(port)
        if master.role() != "master" or not self._replicas_linked(master):
            return False
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if _flags(state) != {"master"} or int(state["num-other-sentinels"]) != 2:
                return False
            seen = {
                int(r["port"]): _flags(r) for r in sentinel.replicas() if _flags(r) == {"slave"}
            }
            if set(seen) != {n.port for n in self.data if n is not master}:
                return False
            if int(state["num-slaves"]) != 2:
                return False
        return True

    def wait_healthy(self, timeout: float = SETTLE) -> None:
        wait_for(self._healthy, "did not become healthy (one master, two replicas up)", timeout)

    def wait_master_other_than(self, old: Server, timeout: float = SETTLE) -> Server:
        """Wait until every live sentinel names a master other than ``old``, and that node
        says it is one (the end of a failover, as clients see it)."""

        def switched() -> bool:
            port = self.named_master()
            return port is not None and port != old.port and self.node(port).role() == "master"

        wait_for(switched, f"no failover away from {old.name}", timeout)
        return self.master()

    def wait_replicated(self) -> None:
        """Every live replica has processed what the master has (replication is
        asynchronous), read off each replica's own offset (the master learns it from the
        replicas' once-a-second ``REPLCONF ACK`` only)."""
        master = self.master()
        wanted = int(master.replication()["master_repl_offset"])
        replicas = [n for n in self.data if n is not master and n.answers()]

        def caught_up() -> bool:
            for node in replicas:
                info = node.replication()
                if info["role"] != "slave" or int(info["master_port"]) != master.port:
                    return False
                if int(info["master_repl_offset"]) < wanted:
                    return False
            return True

        wait_for(caught_up, "the replicas did not catch up")

    # -- faults ----------------------------------------------------------------------------

    def failover(self) -> tuple[Server, Server]:
        """``SENTINEL FAILOVER``: a planned failover, no agreement needed; returns the old
        and the new master once every sentinel names the new one."""
        old = self.master()
        self.sentinels[0].call("SENTINEL", "FAILOVER", SERVICE)
        return old, self.wait_master_other_than(old)

    def demote(self, old: Server, new: Server, *, kill_clients: bool = True) -> None:
        """What a sentinel sends a former master that still says it is one (its
        ``+convert-to-slave``, some ten seconds after the failover): ``REPLICAOF`` and
        ``CLIENT KILL TYPE normal`` in one transaction. Without ``kill_clients``, only the
        ``REPLICAOF`` (an operator's, or a ``FAILOVER`` command's): clients stay connected
        to a replica."""
        client = old.admin()
        try:
            with suppress_instrumentation(), plumbing():
                pipe = client.pipeline(transaction=True)
                pipe.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
                if kill_clients:
                    pipe.execute_command("CLIENT", "KILL", "TYPE", "normal")
                pipe.execute()
        except redis.exceptions.ConnectionError:
            if not kill_clients:
                raise  # killed with the others: the transaction ran
        finally:
            client.close()

    # -- between tests -------------------------------------------------------------------

    def heal(self) -> None:
        """A healthy topology back (one master, two replicas up, the sentinels agreeing), and
        no data: the flush runs even if converging fails."""
        with contextlib.ExitStack() as steps:
            steps.callback(self._flush)
            wait_for(self._converge, "did not heal (one master, two replicas up)")

    def _converge(self) -> bool:
        """One step towards health, then whether it is reached: resume what was stopped,
        restart a dead sentinel, and once the sentinels name a live master, start the dead
        data nodes as its replicas and demote any other node that says it is a master (one
        that came back, or a former master the sentinels have not converted yet). Polled:
        a failover may still name another master while this runs."""
        for node in self.data + self.sentinels:
            node.resume()
        for sentinel in self.sentinels:
            if not sentinel.alive:
                sentinel.start()
        port = self.named_master()
        if port is None or not self.node(port).answers():
            return False  # a failover has yet to happen, or to end
        master = self.node(port)
        for node in self.data:
            if not node.alive:
                node.start(replicaof=master)
            elif node is not master and node.answers() and node.role() == "master":
                self.demote(node, master)
        return self._healthy()

    def _flush(self) -> None:
        self.master().call("FLUSHALL")
        self.wait_replicated()

    def close(self) -> None:
        """Every process is killed and every dir removed, whatever fails on the way."""
        self._steps.close()


@contextlib.contextmanager
def module_sentinel() -> Iterator[PrivateSentinel]:
    setup = PrivateSentinel()
    try:
        yield setup
    finally:
        setup.close()


# -- the stacks ------------------------------------------------------------------------------


class SentinelStack(ClusterStack):
    """redis-py's Sentinel clients alone (``baseline``) or instrumented (``order``)."""

    def __init__(self, setup: PrivateSentinel, order: str, **settings: Any) -> None:
        self.setup = setup
        self._sentinels: list[Any] = []
        self._async: list[Any] = []
        self._traps: list[tuple[int, str, Callable[[], object]]] = []
        super().__init__(setup, order, **settings)  # type: ignore[arg-type]

    def when_sent(self, node: Server, command: str, fault: Callable[[], object]) -> None:
        """Run ``fault`` once, synchronously, when a client of the test is about to write
        the next buffer naming ``command`` to ``node``: before its bytes leave, so the fault
        (a demotion that kills the connection, a SIGKILL) meets the command in flight."""
        self._traps.append((node.port, command.upper(), fault))

    def _count_buffer(self, port: int, command: Any) -> None:
        names = command_names(as_bytes(command))
        for index, (where, name, fault) in enumerate(self._traps):
            if where == port and name in names:
                del self._traps[index]
                fault()
                break
        super()._count_buffer(port, command)

    def sentinel(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        """A ``Sentinel`` of the three; its own clients of the sentinels keep redis-py's
        default retry (as an application's would), their sockets time out like the data
        clients'."""
        made = redis.sentinel.Sentinel(
            self.setup.addresses(), sentinel_kwargs={"socket_timeout": TIMEOUT}, **kwargs
        )
        self._sentinels.append(made)
        return made

    def _counted(self, client: Any) -> Any:
        self._owners.add(id(client.connection_pool))
        self._clients.append(client)
        return client

    def master(self, retries: int = 0, **kwargs: Any) -> redis.Redis:
        """``master_for(SERVICE)``; ``retries=0`` (the README's advice for one retry layer)
        turns redis-py's own connection retry off."""
        return self._counted(
            self.sentinel().master_for(
                SERVICE,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry=Retry(NoBackoff(), retries),
                **kwargs,
            )
        )

    def replica(self, retries: int = 0, **kwargs: Any) -> redis.Redis:
        return self._counted(
            self.sentinel().slave_for(
                SERVICE,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry=Retry(NoBackoff(), retries),
                **kwargs,
            )
        )

    def amaster(self, retries: int = 0) -> redis.asyncio.Redis:
        """``redis.asyncio.sentinel.Sentinel(...).master_for(SERVICE)``; close it (and its
        sentinel clients) with :meth:`aclose_async`."""
        sentinel = redis.asyncio.sentinel.Sentinel(
            self.setup.addresses(), sentinel_kwargs={"socket_timeout": TIMEOUT}
        )
        client = sentinel.master_for(
            SERVICE,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=redis.asyncio.retry.Retry(NoBackoff(), retries),
        )
        self._owners.add(id(client.connection_pool))
        self._async.extend([client, *sentinel.sentinels])
        return client

    async def aclose_async(self) -> None:
        """Close every asyncio client (the test's and its sentinels'), whatever fails."""
        errors = []
        while self._async:
            try:
                await aclose(self._async.pop())
            except Exception as error:  # close the rest first
                errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        with contextlib.ExitStack() as steps:
            steps.callback(super().close)
            for sentinel in self._sentinels:
                steps.callback(sentinel.close)

    def value(self, key: str) -> Any:
        """A key's value as the master the sentinels name holds it now."""
        return self.setup.master().call("GET", key)

    def connected_to(self, client: Any) -> set[int]:
        """The data-node ports of ``client``'s pooled connections."""
        pool = client.connection_pool
        return {
            int(c.port)
            for c in [*pool._available_connections, *pool._in_use_connections]
            if c.port and getattr(c, "_sock", None) is not None
        }
