"""Which Redis commands may be sent twice: the idempotency rules of the Redis instrumentor.

A retry after an ambiguous failure (a timeout, a connection reset mid-reply) may repeat a
command the server already executed. That is harmless for reads and for writes whose second
application leaves the same state *and gives the same reply* (``SET k v``, ``MSET``,
``EXPIRE``), and wrong for everything else: ``INCR``, ``LPUSH``, ``LPOP``, ``XADD``, ``EVAL``
would count, push, pop or run twice. So only commands on the built-in list below are
retried, and a few of them only without the options that make their effect or reply depend
on the state they find (``SET ... NX|XX|GET``, ``EXPIRE ... NX|XX|GT|LT``).

``EXPIRE``'s reply is 1 while the key exists, so a resend answers as the first send did only
if the key outlived it: a time to live of zero or less deletes the key (the resend answers
0, and ``if r.expire(lock, 0): released()`` takes the wrong branch), and a short one may run
out before the resend arrives. ``EXPIRE`` and ``PEXPIRE`` are retried only with a time to
live of at least a minute (:data:`EXPIRE_FLOOR`), far longer than the backoff between two
attempts (2 s by default); an attempt that itself hangs longer than that, with no
``socket_timeout`` or ``OTEL_RECOVERY_ATTEMPT_TIMEOUT``, is not bounded by it.
``EXPIREAT`` and ``PEXPIREAT`` are never retried: whether their time has passed is the
server's clock to say.

Writes that are idempotent in state but whose reply counts what they changed (``DEL``,
``SADD``, ``HSET``, ``ZADD``, ``SETBIT``: :data:`COUNTING_WRITES`) are not on the list: the
first application, whose reply was lost, counted 1, and the repeat answers 0. Code that
reads that reply (``if r.sadd("seen", id): handle(id)``, ``if r.delete(claim):``) would
take the repeat's answer and drop the message or the claim, where without us it gets an
error and tries again. They are retried after a failure that proves they never ran, as
every command is, and the user may list them in ``redis_retry_commands`` where the reply
is not read.

``redis_retry_commands`` adds commands (taken as the user's word, options unchecked; a
built-in command listed again keeps its option checks, ``SET ... NX`` stays unretried) and
``redis_no_retry_commands`` removes them; both accept names such as ``"GET"`` or
``"CONFIG GET"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otel_recovery.instrumentors._settings import RecoverySettings

__all__ = [
    "BLOCKING",
    "COUNTING_WRITES",
    "EXPIRE_FLOOR",
    "IDEMPOTENT_WRITES",
    "READS",
    "RUNS_CODE",
    "CommandRules",
    "as_text",
    "command_name",
    "runs_code",
]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


READS = _words(
    """
    GET MGET GETRANGE SUBSTR STRLEN LCS EXISTS TYPE TTL PTTL EXPIRETIME PEXPIRETIME KEYS SCAN
    RANDOMKEY DBSIZE DUMP TOUCH PING ECHO TIME LASTSAVE ROLE INFO
    HGET HMGET HGETALL HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD HTTL HPTTL
    HEXPIRETIME HPEXPIRETIME
    LINDEX LLEN LRANGE LPOS
    SCARD SISMEMBER SMISMEMBER SMEMBERS SRANDMEMBER SSCAN SINTER SUNION SDIFF SINTERCARD
    ZCARD ZCOUNT ZLEXCOUNT ZRANGE ZRANGEBYSCORE ZRANGEBYLEX ZREVRANGE ZREVRANGEBYSCORE
    ZREVRANGEBYLEX ZRANK ZREVRANK ZSCORE ZMSCORE ZSCAN ZRANDMEMBER ZINTER ZUNION ZDIFF
    ZINTERCARD
    XRANGE XREVRANGE XLEN XREAD XPENDING
    BITCOUNT BITPOS GETBIT BITFIELD_RO PFCOUNT
    GEODIST GEOHASH GEOPOS GEOSEARCH GEORADIUS_RO GEORADIUSBYMEMBER_RO
    SORT_RO EVAL_RO EVALSHA_RO FCALL_RO
    """
) | frozenset(
    {
        "CONFIG GET",
        "OBJECT ENCODING",
        "OBJECT FREQ",
        "OBJECT IDLETIME",
        "OBJECT REFCOUNT",
        "MEMORY USAGE",
        "SCRIPT EXISTS",
        "XINFO STREAM",
        "XINFO GROUPS",
        "XINFO CONSUMERS",
        "CLUSTER INFO",
        "CLUSTER NODES",
        "CLUSTER SLOTS",
        "CLUSTER SHARDS",
        "CLUSTER KEYSLOT",
        "CLIENT ID",
        "CLIENT GETNAME",
        "COMMAND COUNT",
        "COMMAND INFO",
        "PUBSUB CHANNELS",
        "PUBSUB NUMSUB",
        "PUBSUB NUMPAT",
    }
)
"""Commands that change nothing."""

BLOCKING = _words(
    """
    BLPOP BRPOP BLMOVE BRPOPLPUSH BLMPOP BZPOPMIN BZPOPMAX BZMPOP WAIT WAITAOF XREAD XREADGROUP
    """
)
"""Commands that may wait on the server on purpose (a timeout or ``BLOCK`` argument of their
own): ``OTEL_RECOVERY_ATTEMPT_TIMEOUT`` does not apply to them, or it would cut the wait the
caller asked for (a worker's ``BLPOP queue 5``) and, for a pop, could lose the element the
server popped for the connection it cancelled. ``XREAD`` without ``BLOCK`` answers at once
anyway."""

IDEMPOTENT_WRITES = _words(
    """
    SET SETEX PSETEX MSET SETRANGE HMSET EXPIRE PEXPIRE
    """
)
"""Writes whose second application leaves the state the first one left and answers as it
did (``OK``, the string's length, 1 for a key that exists: ``EXPIRE`` and ``PEXPIRE`` only
with a time to live of at least :data:`EXPIRE_FLOOR`)."""

EXPIRE_FLOOR = {"EXPIRE": 60, "PEXPIRE": 60_000}
"""The shortest time to live (seconds, milliseconds) with which ``EXPIRE`` / ``PEXPIRE`` is
retried: a key that expires before the resend arrives, or at once, answers 0 to it."""

COUNTING_WRITES = _words(
    """
    DEL UNLINK PERSIST SETBIT HSET HDEL SADD SREM ZADD ZREM PFADD GEOADD
    """
)
"""Writes idempotent in state whose reply tells what the first application changed (a
count, the bit before): not retried after a failure that may have run them, unless named in
``redis_retry_commands``. Listed for the README and the tests; nothing else reads it."""

RUNS_CODE = _words("EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO TFCALL TFCALLASYNC")
"""Commands that run code of the application's (a Lua script, a Redis Function, a
JavaScript function of RedisGears 2's triggers and functions, which redis-py 5 calls
with ``tfcall`` and ``tfcall_async``). Such code may write and then reply with any
error, ``READONLY ...`` included, so a refusal proves nothing about them: see
:func:`runs_code`. Loading or deleting the code (``FUNCTION LOAD``, ``TFUNCTION DELETE``)
is an administrator's write, refused like any other."""


def runs_code(name: str) -> bool:
    """Whether a refusal-looking error from ``name`` may come from code that already wrote:
    scripts and functions (:data:`RUNS_CODE`), and module commands (``JSON.SET``,
    ``FT.CREATE``: a module's own code answers them, in its own words)."""
    return name in RUNS_CODE or "." in name


# Options that make a listed command depend on the state it finds, and the argument index
# where options may start. A false match (a member named "INCR") only forbids a retry.
_UNSAFE_OPTIONS: dict[str, tuple[int, frozenset[str]]] = {
    "SET": (3, frozenset({"NX", "XX", "GET", "IFEQ", "IFNE", "IFDEQ", "IFDNE"})),
    **dict.fromkeys(("EXPIRE", "PEXPIRE"), (3, frozenset({"NX", "XX", "GT", "LT"}))),
}
# Commands whose first argument is a subcommand: "CONFIG GET" is a read, "CONFIG SET" is not.
_CONTAINERS = _words(
    "CONFIG OBJECT MEMORY SCRIPT XINFO CLUSTER CLIENT COMMAND PUBSUB FUNCTION TFUNCTION ACL"
)


def as_text(value: Any) -> str:
    """A command word as text, bytes decoded."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def command_name(args: Sequence[Any]) -> str:
    """The upper-case command name; container commands include their subcommand.

    redis-py passes ``"CONFIG GET"`` as one argument, users may pass ``"CONFIG", "GET"``.
    """
    if not args:
        return ""
    name = as_text(args[0]).upper()
    if " " in name:
        return " ".join(name.split()[:2])
    if name in _CONTAINERS and len(args) > 1:
        return f"{name} {as_text(args[1]).upper()}"
    return name


class CommandRules:
    """Decides, per command, whether a failed call may be sent again."""

    __slots__ = ("_explicit", "_names", "never", "refused", "retryable")

    def __init__(self, settings: RecoverySettings) -> None:
        builtin = READS | IDEMPOTENT_WRITES
        added = settings.redis_retry_commands
        self.retryable = (builtin | added) - settings.redis_no_retry_commands
        # named never to repeat: not even after the server refused them before they ran
        # (READONLY), which repeats any other command
        self.never = settings.redis_no_retry_commands
        self.refused = settings.redis_retry_refused  # False: never after a refusal either
        # Listed by the user and not built in: taken at their word, options unchecked. A
        # built-in one listed again (SET, EXPIRE) keeps its option checks and floor: the
        # list widens what is retried, it does not loosen what already is.
        self._explicit = added - builtin - settings.redis_no_retry_commands
        self._names: dict[Any, str] = {}

    def name(self, args: Sequence[Any]) -> str:
        """``command_name`` with a per-spelling cache for the common single-word commands."""
        first = args[0] if args else ""
        cached = self._names.get(first)
        if cached is not None:
            return cached
        name = command_name(args)
        if name and " " not in name and name not in _CONTAINERS and len(self._names) < 1024:
            self._names[first] = name
        return name

    def depends_on_arguments(self, args: Sequence[Any], name: str) -> bool:
        """Whether the verdict for ``name`` can change with the arguments, so it may not be
        remembered by the first argument's spelling alone."""
        first = args[0] if args else ""
        subcommand = " " in name and " " not in as_text(first)
        return subcommand or (name in _UNSAFE_OPTIONS and name not in self._explicit)

    def allows(self, name: str, args: Sequence[Any]) -> bool:
        """Whether ``args`` (a command named ``name``) is safe to repeat."""
        if name not in self.retryable:
            return False
        unsafe = _UNSAFE_OPTIONS.get(name)
        if unsafe is None or name in self._explicit:
            return True
        start, options = unsafe
        if any(_is_option(arg, options) for arg in args[start:]):
            return False
        floor = EXPIRE_FLOOR.get(name)
        if floor is None:
            return True
        ttl = _integer(args[2]) if len(args) > 2 else None
        return ttl is not None and ttl >= floor


def _integer(arg: Any) -> int | None:
    """A command's integer argument as Redis reads it, or None where it is not one."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg
    if isinstance(arg, (str, bytes)) and len(arg) <= 20:  # never decode a large value
        try:
            return int(as_text(arg))
        except ValueError:
            return None
    return None


def _is_option(arg: Any, options: frozenset[str]) -> bool:
    # Options are short words; values and members (possibly large) are never decoded.
    return isinstance(arg, (str, bytes)) and len(arg) <= 5 and as_text(arg).upper() in options
