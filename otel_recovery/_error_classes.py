"""Which exception classes of which libraries mean what, recognised by name, never imported.

``import otel_recovery`` must stay cheap and must not pull in redis or httpx, so a class is
known by the root of its module (``httpx`` for ``httpx._exceptions.ConnectError``) and its
name: :data:`CLASS_VERDICTS` holds the stock verdict of each known (root, name), written as a
compact table below. Alongside: the libraries that are another's fork under a new name
(:data:`ROOT_ALIASES`), the exceptions that only wrap the real failure (:data:`WRAPPERS`),
and the roots of the PostgreSQL drivers (:data:`PG_ROOTS`). :mod:`._type_profiles` reads
these once per class.
"""

from __future__ import annotations

from dataclasses import replace

from otel_recovery._error_vocabulary import PRESETS, Verdict

__all__ = ["CLASS_VERDICTS", "PG_ROOTS", "ROOT_ALIASES", "WRAPPERS"]

# "root PRESET Name Name=CODE ...": root is the first component of the class's __module__.
# The closest class in the MRO that appears here decides.
_TABLE_SPEC = """
builtins CONN ConnectionError ConnectionRefusedError ConnectionResetError ConnectionAbortedError
builtins CONN BrokenPipeError
builtins TIMEOUT TimeoutError
builtins MEMORY MemoryError
builtins CANCELLED KeyboardInterrupt SystemExit GeneratorExit
builtins PROGRAMMING ValueError TypeError KeyError AttributeError IndexError LookupError
builtins PROGRAMMING NotImplementedError ArithmeticError NameError AssertionError
builtins CONFIG FileNotFoundError
builtins AUTH PermissionError
asyncio TIMEOUT TimeoutError
asyncio CONN IncompleteReadError
asyncio CANCELLED CancelledError
concurrent TIMEOUT TimeoutError
concurrent CANCELLED CancelledError
trio CANCELLED Cancelled
ssl CERT SSLError SSLCertVerificationError
ssl CONN SSLEOFError SSLZeroReturnError
http CONN IncompleteRead BadStatusLine RemoteDisconnected
otel_recovery CIRCUIT CircuitOpenError
redis CONN ConnectionError MasterNotFoundError SlaveNotFoundError
redis CONN RedisClusterUnreachableError
redis TIMEOUT TimeoutError
redis AUTH AuthenticationError AuthenticationWrongNumberOfArgsError AuthorizationError
redis AUTH NoPermissionError=NOPERM
redis SERVER_RETRY BusyLoadingError=LOADING ClusterDownError=CLUSTERDOWN TryAgainError=TRYAGAIN
redis SERVER_RETRY MasterDownError=MASTERDOWN SlotNotCoveredError
redis READONLY ReadOnlyError=READONLY
redis MEMORY OutOfMemoryError=OOM
redis MOVED MovedError=MOVED AskError=ASK
redis SERIALIZATION WatchError
redis POOL MaxConnectionsError
redis INVALID ResponseError DataError ClusterCrossSlotError=CROSSSLOT
redis INVALID CrossSlotTransactionError InvalidPipelineStack
httpx CONN ConnectError ReadError WriteError CloseError NetworkError RemoteProtocolError ProxyError
httpx TIMEOUT TimeoutException ConnectTimeout ReadTimeout WriteTimeout
httpx POOL PoolTimeout
httpx CONFIG InvalidURL UnsupportedProtocol
httpx PROGRAMMING LocalProtocolError StreamError
httpx REDIRECT_LOOP TooManyRedirects
requests CONN ConnectionError ChunkedEncodingError ProxyError
requests TIMEOUT Timeout ConnectTimeout ReadTimeout
requests CONFIG InvalidURL MissingSchema InvalidSchema InvalidHeader
requests REDIRECT_LOOP TooManyRedirects
urllib3 CONN NewConnectionError ProtocolError ProxyError
urllib3 TIMEOUT TimeoutError ConnectTimeoutError ReadTimeoutError
urllib3 POOL EmptyPoolError
aiohttp CONN ClientConnectionError ClientConnectorError ClientOSError ServerDisconnectedError
aiohttp CONN ServerConnectionError ClientPayloadError ClientConnectionResetError
aiohttp TIMEOUT ServerTimeoutError ConnectionTimeoutError SocketTimeoutError
aiohttp CERT ClientConnectorCertificateError
aiohttp CONFIG InvalidURL NonHttpUrlClientError
aiohttp REDIRECT_LOOP TooManyRedirects
psycopg CONN OperationalError
psycopg INVALID PipelineAborted
psycopg TIMEOUT ConnectionTimeout
psycopg PROGRAMMING InterfaceError ProgrammingError
psycopg2 CONN OperationalError
psycopg2 PROGRAMMING InterfaceError ProgrammingError
psycopg_pool POOL PoolTimeout TooManyRequests
psycopg_pool CONFIG PoolClosed
asyncpg CONN ConnectionDoesNotExistError
asyncpg PROGRAMMING InterfaceError InterfaceWarning
"""


def _parse_table(spec: str) -> dict[tuple[str, str], Verdict]:
    table: dict[tuple[str, str], Verdict] = {}
    for line in spec.strip().splitlines():
        root, preset, *names = line.split()
        for entry in names:
            name, _, code = entry.partition("=")
            table[root, name] = replace(PRESETS[preset], code=code or None)
    return table


CLASS_VERDICTS = _parse_table(_TABLE_SPEC)
ROOT_ALIASES = {"valkey": "redis"}  # valkey-py is a redis-py fork with the same classes
# Exceptions that only wrap the real failure: classify what they carry instead.
WRAPPERS = {("urllib", "URLError"): "reason", ("urllib3", "MaxRetryError"): "reason"}
WRAPPERS |= {("sqlalchemy", "DBAPIError"): "orig"}
PG_ROOTS = frozenset({"psycopg", "psycopg2", "psycopg_pool", "asyncpg"})
