"""Which shard of a Redis Cluster a call goes to, so each shard has its own breaker and budget.

resilience4j's rule, one breaker per backend, means one per shard here: a dead primary must
open its own circuit and spend its own budget, never its neighbours'. redis-py routes inside
the call (``RedisCluster.execute_command`` picks the node, follows ``MOVED`` and ``ASK``),
so the shard is worked out beforehand the way redis-py will: the slot of the command's first
key, read from redis-py's own command table and slot map. No round trip and no side effect
(the replica load balancer is not asked); a shard is named after its primary.

A call whose node cannot be told that way (a keyless command, one routed by a node flag or
to ``target_nodes=``, a container command such as ``OBJECT ENCODING``, movable keys, a
pipeline spanning shards, a client that has not learned the slot map yet) counts on the
cluster as a whole: a target of its own (:func:`cluster_wide`), never a shard's, so that
its failures cannot open a healthy shard's circuit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot

from otel_recovery.instrumentors._redis_commands import as_text

__all__ = ["cluster_wide", "shard_primary"]

_SCRIPTS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
"""``EVAL script numkeys key ...``: the first key follows the key count."""
_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})
"""``XREAD ... STREAMS key ... id ...``: the first key follows ``STREAMS``."""
_CHANNELS = frozenset({"PUBLISH", "SPUBLISH"})
"""Routed by the channel's slot, as if it were a key."""

_FIRST = 1
_MEMOS: dict[tuple[int, int], tuple[object, object, dict[str, int | None]]] = {}
"""Per command table and flag map (by identity), where each command name's first key is."""


def shard_primary(client: Any, command: Sequence[Any]) -> Any:
    """The primary of the shard ``command`` (its arguments, name first) goes to; None when
    it is not routed by a key, or redis-py cannot tell yet (a key it cannot encode: redis-py
    will say so itself)."""
    if len(command) < 2 or not isinstance(command[0], (str, bytes)):
        return None
    try:
        key = _first_key(client, command)
        if key is None:
            return None
        nodes = client.nodes_manager.slots_cache.get(key_slot(client.encoder.encode(key)))
    except Exception:  # the cluster-wide target then
        return None
    return nodes[0] if nodes else None


def cluster_wide(client: Any) -> tuple[str, None]:
    """The target of calls that no single shard answers for, named after the cluster's
    entry point (``cluster 10.0.0.5:7000``): a name no shard's primary has."""
    node = client.get_default_node()
    host, port = getattr(node, "host", None), getattr(node, "port", None)
    return (f"cluster {host}:{port}" if host else "cluster"), None


def _first_key(client: Any, command: Sequence[Any]) -> Any:
    upper = as_text(command[0]).upper()
    if upper in _SCRIPTS:
        keys = int(command[2]) if len(command) > 3 else 0
        return command[3] if keys > 0 else None
    if upper in _STREAM_READS:
        for index, word in enumerate(command):
            if isinstance(word, (str, bytes)) and as_text(word).upper() == "STREAMS":
                return command[index + 1] if index + 1 < len(command) else None
        return None
    if upper in _CHANNELS:
        return command[1]
    return command[1] if _position(client, upper) == _FIRST else None


def _position(client: Any, name: str) -> int | None:
    """Where redis-py finds ``name``'s first key: ``_FIRST`` (right after the name), else
    None. Remembered for as long as the client's command table and flags are the same
    objects (clients of one cluster share the answers)."""
    commands, flags_by_name = client.commands_parser.commands, client.command_flags
    key = (id(commands), id(flags_by_name))
    memo = _MEMOS.get(key)
    if memo is None or memo[0] is not commands or memo[1] is not flags_by_name:
        if len(_MEMOS) >= 16:
            _MEMOS.clear()
        memo = _MEMOS[key] = (commands, flags_by_name, {})
    positions = memo[2]
    if name in positions:
        return positions[name]
    position: int | None = None
    if " " not in name and flags_by_name.get(name) is None:  # not routed by a node flag
        spec = commands.get(name.lower())
        flags = spec.get("flags", ()) if spec is not None else ()
        if spec is not None and spec.get("first_key_pos") == 1 and "movablekeys" not in flags:
            position = _FIRST
    if len(positions) < 512:
        positions[name] = position
    return position
