"""What common failures mean: the built-in knowledge behind :mod:`otel_recovery.classify`.

Recognition never imports the libraries concerned (``import otel_recovery`` must stay cheap and
must not pull in redis or httpx): exception classes are matched by the root of their module and
their name anywhere in the MRO, and by duck-typed attributes (``.sqlstate``, ``.status_code``,
``.errno``...). Everything that depends only on the class is computed once per class and cached.

The vocabulary (categories, severities, kinds) lives here, not in ``classify.py``, because the
tables below are written in it; ``classify`` re-exports it as the public names.
"""

from __future__ import annotations

import errno as _errno
import re
import socket
import sys
from dataclasses import dataclass, replace
from enum import Enum

__all__ = ["ErrorCategory", "ErrorKind", "Severity", "Verdict", "TypeProfile"]
__all__ += ["attr", "profile_of", "resolve"]
__all__ += ["safe_str", "status_verdict"]


class ErrorCategory(str, Enum):
    """Broad cause of a failure; decides which recovery strategy family applies."""

    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    RESOURCE_EXHAUSTION = "resource_exhaustion"
    CONFIGURATION = "configuration"
    EXTERNAL_SERVICE = "external_service"
    CASCADING = "cascading"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN = "unknown"


class Severity(str, Enum):
    """How much attention a failure needs. Ordered: ``<`` compares by rank, not alphabetically."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for LOW up to 3 for CRITICAL."""
        return _SEVERITY_ORDER.index(self)

    def raised(self, by: int = 1) -> Severity:
        """The severity ``by`` steps higher (lower if negative), clamped to LOW..CRITICAL."""
        index = max(0, min(len(_SEVERITY_ORDER) - 1, _SEVERITY_ORDER.index(self) + by))
        return _SEVERITY_ORDER[index]

    # Severity is a str, so without these "critical" < "high" would hold.
    def __lt__(self, other: object) -> bool:
        return self.rank < other.rank if isinstance(other, Severity) else NotImplemented

    def __le__(self, other: object) -> bool:
        return self.rank <= other.rank if isinstance(other, Severity) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return self.rank > other.rank if isinstance(other, Severity) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return self.rank >= other.rank if isinstance(other, Severity) else NotImplemented


_SEVERITY_ORDER: tuple[Severity, ...] = tuple(Severity)


class ErrorKind(str, Enum):
    """The precise condition, finer than the category; self-healing actions key on it."""

    CONNECTION = "connection"
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate_limit"
    MEMORY = "memory"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    AUTH = "auth"
    SYNTAX = "syntax"
    SERIALIZATION = "serialization"
    RESOURCE = "resource"
    SHUTDOWN = "shutdown"
    READONLY = "readonly"
    REDIRECT = "redirect"
    CIRCUIT_OPEN = "circuit_open"
    CANCELLED = "cancelled"
    OTHER = "other"


C, K, S = ErrorCategory, ErrorKind, Severity

# A single occurrence of a transient failure needs nobody's attention; repeats raise it. What
# will not heal by itself (configuration, exhausted resources) starts high.
_DEFAULT_SEVERITY = dict.fromkeys((C.TRANSIENT, C.RATE_LIMITED), S.LOW)
_DEFAULT_SEVERITY |= dict.fromkeys((C.RESOURCE_EXHAUSTION, C.CONFIGURATION), S.HIGH)
_DEFAULT_SEVERITY |= dict.fromkeys((C.EXTERNAL_SERVICE, C.CASCADING, C.INVALID_REQUEST), S.MEDIUM)
_DEFAULT_SEVERITY |= {C.UNKNOWN: S.MEDIUM}
# Failures of something we depend on; an error caused by one of these is "cascading".
_DEPENDENCY_KINDS = frozenset({K.CONNECTION, K.TIMEOUT, K.RATE_LIMIT, K.SERVER_ERROR, K.SHUTDOWN})
_DEPENDENCY_KINDS |= {K.SERIALIZATION, K.READONLY, K.REDIRECT, K.CIRCUIT_OPEN}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The built-in answer for one exception, before context and repeats are applied.

    ``dependency`` marks failures of something we call (network, database, redis, an open
    breaker): an error *caused by* one of them is classified as CASCADING.
    """

    category: ErrorCategory
    severity: Severity
    retryable: bool
    kind: ErrorKind
    code: str | None = None
    status: int | None = None
    retry_after: float | None = None
    dependency: bool = False


def _v(cat: ErrorCategory, kind: ErrorKind, retry: bool, sev: Severity | None = None) -> Verdict:
    dependency = kind in _DEPENDENCY_KINDS
    return Verdict(cat, sev or _DEFAULT_SEVERITY[cat], retry, kind, dependency=dependency)


CONN = _v(C.TRANSIENT, K.CONNECTION, True)
TIMEOUT = _v(C.TRANSIENT, K.TIMEOUT, True)
AUTH = _v(C.CONFIGURATION, K.AUTH, False)
CONFIG = _v(C.CONFIGURATION, K.OTHER, False)
INVALID = _v(C.INVALID_REQUEST, K.CLIENT_ERROR, False)
UNKNOWN = _v(C.UNKNOWN, K.OTHER, False)
SERVER_RETRY = _v(C.TRANSIENT, K.SERVER_ERROR, True)
_PRESETS: dict[str, Verdict] = {
    "CONN": CONN,
    "TIMEOUT": TIMEOUT,
    "AUTH": AUTH,
    "CONFIG": CONFIG,
    "INVALID": INVALID,
    "PROGRAMMING": _v(C.INVALID_REQUEST, K.OTHER, False),
    "CANCELLED": _v(C.UNKNOWN, K.CANCELLED, False, S.LOW),
    "MEMORY": _v(C.RESOURCE_EXHAUSTION, K.MEMORY, False),
    "POOL": replace(_v(C.RESOURCE_EXHAUSTION, K.RESOURCE, True), dependency=True),
    "REDIRECT_LOOP": replace(_v(C.CONFIGURATION, K.REDIRECT, False), dependency=False),
    "CERT": replace(_v(C.CONFIGURATION, K.CONNECTION, False), dependency=False),
    "CIRCUIT": _v(C.CASCADING, K.CIRCUIT_OPEN, False),
    "SERVER_RETRY": SERVER_RETRY,
    "MOVED": _v(C.TRANSIENT, K.REDIRECT, True),
    "READONLY": _v(C.TRANSIENT, K.READONLY, True),
    "SERIALIZATION": _v(C.TRANSIENT, K.SERIALIZATION, True),
}

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
httpx PROGRAMMING LocalProtocolError
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
aiohttp CONFIG InvalidURL
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
            table[root, name] = replace(_PRESETS[preset], code=code or None)
    return table


_TABLE = _parse_table(_TABLE_SPEC)
_ROOT_ALIASES = {"valkey": "redis"}  # valkey-py is a redis-py fork with the same classes
# Exceptions that only wrap the real failure: classify what they carry instead.
_WRAPPERS = {("urllib", "URLError"): "reason", ("urllib3", "MaxRetryError"): "reason"}
_WRAPPERS |= {("sqlalchemy", "DBAPIError"): "orig"}
_PG_ROOTS = frozenset({"psycopg", "psycopg2", "psycopg_pool", "asyncpg"})
_ATTRS: tuple[str, ...] = ("status_code", "status", "code", "response", "headers", "sqlstate")
_ATTRS += ("pgcode", "errno", "retry_after")


@dataclass(frozen=True, slots=True)
class TypeProfile:
    """Everything about an exception class that does not depend on the instance."""

    error_type: str
    static: Verdict | None
    matched: str
    wrapper: str | None
    redis: bool
    pg: bool
    httpish: bool
    group: bool
    ssl: bool  # OpenSSL error numbers are not POSIX errno values
    class_attrs: frozenset[str]


_PROFILES: dict[type, TypeProfile] = {}


def error_type_of(tp: type) -> str:
    """OTel ``exception.type`` style: bare qualname for builtins, ``module.qualname`` otherwise.

    A class defined in a private module (``asyncpg.exceptions._base.InterfaceError``,
    ``httpx._exceptions.ConnectError``) is named where its library exports it
    (``asyncpg.exceptions.InterfaceError``, ``httpx.ConnectError``): the name users know and
    contrib's spans use, and one that survives the library moving its internals."""
    module = getattr(tp, "__module__", None)
    qualname = str(getattr(tp, "__qualname__", None) or getattr(tp, "__name__", "?"))
    if module in (None, "builtins"):
        return qualname
    return f"{_public_module(str(module), qualname, tp)}.{qualname}"


def _public_module(module: str, qualname: str, tp: type) -> str:
    """The nearest enclosing public module that exports ``tp`` under its own name; the
    module itself if it is public, or if no public one does."""
    parts = module.split(".")
    if not any(part.startswith("_") for part in parts) or "." in qualname:
        return module
    for end in range(len(parts) - 1, 0, -1):
        candidate = parts[:end]
        if any(part.startswith("_") for part in candidate):
            continue
        name = ".".join(candidate)
        if getattr(sys.modules.get(name), qualname, None) is tp:
            return name
    return module


def profile_of(tp: type) -> TypeProfile:
    """Cached per class; cleared when full so dynamic class factories cannot grow it forever."""
    profile = _PROFILES.get(tp)
    if profile is None:
        if len(_PROFILES) >= 4096:
            _PROFILES.clear()
        profile = _PROFILES[tp] = _build_profile(tp)
    return profile


def _build_profile(tp: type) -> TypeProfile:
    static: Verdict | None = None
    matched, wrapper = "", None
    redis = pg = httpish = group = ssl = False
    for cls in getattr(tp, "__mro__", (tp,)):
        module = getattr(cls, "__module__", None)
        name = getattr(cls, "__name__", "")
        root = module.partition(".")[0] if isinstance(module, str) else ""
        root = _ROOT_ALIASES.get(root, root)
        redis, pg, ssl = redis or root == "redis", pg or root in _PG_ROOTS, ssl or root == "ssl"
        httpish = httpish or "http" in name.lower()
        group = group or name in ("BaseExceptionGroup", "ExceptionGroup")
        if static is None and wrapper is None:
            wrapper = _WRAPPERS.get((root, name))
            static = _TABLE.get((root, name))
            matched = name if (static or wrapper) else ""
    attrs = frozenset(a for a in _ATTRS if hasattr(tp, a))
    return TypeProfile(
        error_type_of(tp), static, matched, wrapper, redis, pg, httpish, group, ssl, attrs
    )


def attr(exc: BaseException, profile: TypeProfile, name: str) -> object:
    """``getattr`` that is cheap when absent and never raises (properties can raise)."""
    if name not in profile.class_attrs and name not in getattr(exc, "__dict__", ()):
        return None
    try:
        return getattr(exc, name, None)
    except Exception:
        return None


def _int_status(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return int(value)
    return None


def http_status(exc: BaseException, profile: TypeProfile) -> int | None:
    """The HTTP status an exception carries: requests, httpx, aiohttp, urllib and look-alikes.

    ``.code`` is only trusted on classes named like HTTP errors: elsewhere it is often a
    gRPC, websocket or application code.
    """
    for name in ("status_code", "status", "code") if profile.httpish else ("status_code", "status"):
        status = _int_status(attr(exc, profile, name))
        if status is not None:
            return status
    response = attr(exc, profile, "response")
    for name in ("status_code", "status") if response is not None else ():
        try:
            status = _int_status(getattr(response, name, None))
        except Exception:
            status = None
        if status is not None:
            return status
    return None


_STATUS: dict[int, Verdict] = {408: TIMEOUT, 429: _v(C.RATE_LIMITED, K.RATE_LIMIT, True)}
_STATUS |= {425: replace(_v(C.TRANSIENT, K.OTHER, True), dependency=True)}
_STATUS |= dict.fromkeys((500, 502, 503), _v(C.EXTERNAL_SERVICE, K.SERVER_ERROR, True))
_STATUS |= {504: _v(C.EXTERNAL_SERVICE, K.TIMEOUT, True)}
_STATUS |= dict.fromkeys((401, 403, 407), AUTH)


def status_verdict(status: int) -> Verdict:
    """Meaning of an HTTP status; a 1xx/2xx (a result, not a failure) is a LOW, final UNKNOWN."""
    base = _STATUS.get(status)
    if base is None:
        if status >= 500:
            base = _v(C.EXTERNAL_SERVICE, K.SERVER_ERROR, False)
        elif status >= 400:
            base = INVALID
        else:
            base = (
                _PRESETS["REDIRECT_LOOP"] if status >= 300 else _v(C.UNKNOWN, K.OTHER, False, S.LOW)
            )
    return replace(base, code=str(status), status=status)


_SQLSTATE: dict[str, Verdict] = {
    "40001": _PRESETS["SERIALIZATION"],  # serialization failure: retry the whole transaction
    "40P01": _PRESETS["SERIALIZATION"],  # deadlock: same
    "40002": INVALID,  # a constraint checked at COMMIT: an answer, as class 23 is
    "57P01": _v(C.TRANSIENT, K.SHUTDOWN, True),  # admin shutdown
    "57P02": _v(C.TRANSIENT, K.SHUTDOWN, True, S.MEDIUM),  # crash shutdown
    "57P03": _v(C.TRANSIENT, K.SHUTDOWN, True),  # cannot connect now (starting up)
    "57P04": CONFIG,  # database dropped
    "57P05": CONN,  # idle session timeout
    "57014": TIMEOUT,  # query_canceled, e.g. statement_timeout
    "25006": _PRESETS["READONLY"],  # read-only transaction: we reached a replica
    # idle_in_transaction_session_timeout: the application held a transaction open, idle,
    # past the server's limit. A healthy server's answer (not counted against its breaker),
    # and not to be repeated: the transaction it was part of is gone.
    "25P03": INVALID,
    "55P03": _v(C.TRANSIENT, K.RESOURCE, True),  # lock_not_available
    "42501": AUTH,  # insufficient_privilege
}
_SQLSTATE |= dict.fromkeys(("3D000", "3F000"), CONFIG)  # invalid catalog / schema name
_SQLSTATE_CLASS: dict[str, Verdict] = {"08": CONN, "28": AUTH, "0A": CONFIG}
_SQLSTATE_CLASS |= {"53": _v(C.RESOURCE_EXHAUSTION, K.RESOURCE, True)}
_SQLSTATE_CLASS |= {"42": _v(C.CONFIGURATION, K.SYNTAX, False)}
_SQLSTATE_CLASS |= dict.fromkeys(("22", "23", "54"), INVALID)
# The classes a healthy server answers with about the statement or the transaction it was
# given: a breaker that counted them would let one endpoint's bad statement (a PL/pgSQL
# RAISE, a subquery returning two rows, a statement in a transaction that already failed)
# open the circuit for every call to the server. Not 40 (its codes are listed above: a race
# to retry, or 40003, where the outcome is unknown), 57 (the operator), 58 and XX (the
# server failed), 53 (resources), F0 (its configuration files), HV (a remote server behind a
# foreign table) or 72 (snapshot too old): those stay counted.
_SQLSTATE_ANSWER_CLASSES = (
    "03",  # SQL statement not yet complete
    "09",  # triggered action exception
    "0B",  # invalid transaction initiation
    "0F",  # locator exception
    "0L",  # invalid grantor
    "0P",  # invalid role specification
    "0Z",  # diagnostics exception
    "20",  # case not found
    "21",  # cardinality violation
    "24",  # invalid cursor state
    "25",  # invalid transaction state (25006 and 25P03 are listed above)
    "26",  # invalid SQL statement name
    "27",  # triggered data change violation
    "2B",  # dependent privilege descriptors still exist
    "2D",  # invalid transaction termination
    "2F",  # SQL routine exception
    "34",  # invalid cursor name
    "38",  # external routine exception
    "39",  # external routine invocation exception
    "3B",  # savepoint exception
    "44",  # WITH CHECK OPTION violation
    "55",  # object not in prerequisite state (55P03, a lock not available, is listed above)
    "P0",  # PL/pgSQL: RAISE, ASSERT, no data found, too many rows
)
_SQLSTATE_CLASS |= dict.fromkeys(_SQLSTATE_ANSWER_CLASSES, INVALID)
_SQLSTATE_CLASS |= dict.fromkeys(
    ("XX", "58"), _v(C.EXTERNAL_SERVICE, K.SERVER_ERROR, False, S.HIGH)
)


def _sqlstate_verdict(sqlstate: str) -> Verdict:
    base = _SQLSTATE.get(sqlstate) or _SQLSTATE_CLASS.get(sqlstate[:2], UNKNOWN)
    return replace(base, code=sqlstate, dependency=True)


_ERRNO_SPEC = (
    (CONN, "ECONNREFUSED ECONNRESET ECONNABORTED EPIPE EHOSTUNREACH ENETUNREACH EHOSTDOWN"),
    (CONN, "ENETDOWN ENETRESET ENOTCONN ESHUTDOWN EAGAIN EWOULDBLOCK"),
    (TIMEOUT, "ETIMEDOUT"),
    (_v(C.RESOURCE_EXHAUSTION, K.RESOURCE, False), "EMFILE ENFILE ENOSPC EDQUOT"),
    (_PRESETS["MEMORY"], "ENOMEM"),
    (CONFIG, "ENOENT"),
    (AUTH, "EACCES EPERM"),
)
_ERRNO = {getattr(_errno, n): v for v, ns in _ERRNO_SPEC for n in ns.split() if hasattr(_errno, n)}
_GAI_NAMES = ("EAI_AGAIN", "EAI_NONAME", "EAI_FAIL", "EAI_NODATA", "EAI_SERVICE")
_GAI_CODES = {getattr(socket, n): n for n in _GAI_NAMES if hasattr(socket, n)}
_DNS_FAILED = replace(_v(C.CONFIGURATION, K.CONNECTION, False), dependency=True)

# Error prefixes of a redis ResponseError that redis-py does not map to its own class.
_REDIS_PREFIX = dict.fromkeys(
    ("CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "LOADING", "BUSY"), SERVER_RETRY
)
_REDIS_PREFIX |= dict.fromkeys(("MOVED", "ASK"), _PRESETS["MOVED"])
_REDIS_PREFIX |= dict.fromkeys(("NOAUTH", "WRONGPASS", "NOPERM"), AUTH)
_REDIS_PREFIX |= {"READONLY": _PRESETS["READONLY"], "OOM": _PRESETS["MEMORY"]}
_REDIS_CODE = re.compile(r"\s*([A-Z][A-Z_-]+)\b")

# Driver errors raised before any SQLSTATE exists (connection phase, lost sockets).
_PG_AUTH = re.compile(
    r"(?i)password authentication failed|authentication failed|no pg_hba\.conf entry"
    r"|role \S+ does not exist|permission denied"
)
_PG_CONFIG = re.compile(r"(?i)database \S+ does not exist|invalid dsn|invalid connection option")
_PG_CONN = re.compile(
    r"(?i)connection refused|server closed the connection|could not connect|connection is closed"
    r"|connection already closed|terminating connection|connection timed out|timeout expired"
    r"|ssl syscall error|connection (?:was )?lost|no connection to the server|could not receive"
    r"|could not send|connection reset|broken pipe|database system is (?:starting|shutting)"
    r"|could not translate host name|connection was closed"
)
_PG_MESSAGES = ((_PG_AUTH, AUTH), (_PG_CONFIG, CONFIG), (_PG_CONN, CONN))


def resolve(exc: BaseException, message: str, depth: int = 0) -> tuple[TypeProfile, Verdict]:
    """Built-in verdict for ``exc`` alone (no rules, chain, Retry-After or repeats)."""
    profile = profile_of(type(exc))
    static = profile.static
    if static is not None and static.kind in (K.CANCELLED, K.CIRCUIT_OPEN):
        return profile, static
    status = http_status(exc, profile)
    if status is not None and status >= 300:
        return profile, status_verdict(status)
    sqlstate = attr(exc, profile, "sqlstate") or attr(exc, profile, "pgcode")
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return profile, _sqlstate_verdict(sqlstate.upper())
    if profile.wrapper is not None and depth < 4:
        inner = attr(exc, profile, profile.wrapper)
        if isinstance(inner, BaseException) and inner is not exc:
            return profile, resolve(inner, safe_str(inner), depth + 1)[1]
    code: str | None = None
    if profile.redis and profile.matched == "ResponseError":
        found = _REDIS_CODE.match(message)
        if found:
            code = found.group(1)
            static = _REDIS_PREFIX.get(code, static)
        elif "-READONLY " in message:  # a write refused inside a script, before Redis 7.0
            code, static = "READONLY", _REDIS_PREFIX["READONLY"]
    elif profile.pg:
        static = next((v for p, v in _PG_MESSAGES if p.search(message)), static)
    errno = attr(exc, profile, "errno") if isinstance(exc, OSError) and not profile.ssl else None
    if isinstance(errno, int):
        if errno in _GAI_CODES and isinstance(exc, socket.gaierror):
            code = _GAI_CODES[errno]
            static = CONN if code == "EAI_AGAIN" else _DNS_FAILED
        else:
            code = _errno.errorcode.get(errno)
            static = static or _ERRNO.get(errno)
    verdict = static or UNKNOWN
    family = profile.redis or profile.pg
    if (code and not verdict.code) or (family and not verdict.dependency):
        # built directly: dataclasses.replace() costs more than the rest of resolve()
        v = verdict
        c, dep = v.code or code, v.dependency or family
        verdict = Verdict(v.category, v.severity, v.retryable, v.kind, c, v.status, None, dep)
    return profile, verdict


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, which user ``__str__`` methods can make raise."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"
