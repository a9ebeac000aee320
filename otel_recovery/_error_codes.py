"""What the codes an error carries mean: HTTP statuses, SQLSTATEs, errno and DNS failures.

Where the class alone does not say what went wrong, the value an instance carries does: an
HTTP status (:func:`status_verdict`), a PostgreSQL SQLSTATE (:func:`sqlstate_verdict`), an
OS ``errno`` (:data:`ERRNO`) or a ``getaddrinfo`` failure (:data:`GAI_CODES`,
:data:`DNS_FAILED`), the error prefix of a Redis reply (:data:`REDIS_PREFIX`, read by
:data:`REDIS_CODE`), or, for PostgreSQL driver errors raised before any SQLSTATE exists,
the words of the message (:data:`PG_MESSAGES`). :func:`._known_errors.resolve` decides
which of them applies.
"""

from __future__ import annotations

import errno as _errno
import re
import socket
from dataclasses import replace

from otel_recovery._error_vocabulary import (
    AUTH,
    CONFIG,
    CONN,
    INVALID,
    PRESETS,
    SERVER_RETRY,
    TIMEOUT,
    UNKNOWN,
    ErrorCategory,
    ErrorKind,
    Severity,
    Verdict,
    verdict,
)

__all__ = ["DNS_FAILED", "ERRNO", "GAI_CODES", "PG_MESSAGES", "REDIS_CODE", "REDIS_PREFIX"]
__all__ += ["REDIS_CLUSTER_UNREACHABLE"]
__all__ += ["sqlstate_verdict", "status_verdict"]

C, K, S = ErrorCategory, ErrorKind, Severity

_STATUS: dict[int, Verdict] = {408: TIMEOUT, 429: verdict(C.RATE_LIMITED, K.RATE_LIMIT, True)}
_STATUS |= {425: replace(verdict(C.TRANSIENT, K.OTHER, True), dependency=True)}
_STATUS |= dict.fromkeys((500, 502, 503), verdict(C.EXTERNAL_SERVICE, K.SERVER_ERROR, True))
_STATUS |= {504: verdict(C.EXTERNAL_SERVICE, K.TIMEOUT, True)}
_STATUS |= dict.fromkeys((401, 403, 407), AUTH)


def status_verdict(status: int) -> Verdict:
    """Meaning of an HTTP status; a 1xx/2xx (a result, not a failure) is a LOW, final UNKNOWN."""
    base = _STATUS.get(status)
    if base is None:
        if status >= 500:
            base = verdict(C.EXTERNAL_SERVICE, K.SERVER_ERROR, False)
        elif status >= 400:
            base = INVALID
        else:
            base = (
                PRESETS["REDIRECT_LOOP"]
                if status >= 300
                else verdict(C.UNKNOWN, K.OTHER, False, S.LOW)
            )
    return replace(base, code=str(status), status=status)


_SQLSTATE: dict[str, Verdict] = {
    "40001": PRESETS["SERIALIZATION"],  # serialization failure: retry the whole transaction
    "40P01": PRESETS["SERIALIZATION"],  # deadlock: same
    "40002": INVALID,  # a constraint checked at COMMIT: an answer, as class 23 is
    "57P01": verdict(C.TRANSIENT, K.SHUTDOWN, True),  # admin shutdown
    "57P02": verdict(C.TRANSIENT, K.SHUTDOWN, True, S.MEDIUM),  # crash shutdown
    "57P03": verdict(C.TRANSIENT, K.SHUTDOWN, True),  # cannot connect now (starting up)
    "57P04": CONFIG,  # database dropped
    "57P05": CONN,  # idle session timeout
    "57014": TIMEOUT,  # query_canceled, e.g. statement_timeout
    "25006": PRESETS["READONLY"],  # read-only transaction: we reached a replica
    # idle_in_transaction_session_timeout: the application held a transaction open, idle,
    # past the server's limit. A healthy server's answer (not counted against its breaker),
    # and not to be repeated: the transaction it was part of is gone.
    "25P03": INVALID,
    "55P03": verdict(C.TRANSIENT, K.RESOURCE, True),  # lock_not_available
    "42501": AUTH,  # insufficient_privilege
}
_SQLSTATE |= dict.fromkeys(("3D000", "3F000"), CONFIG)  # invalid catalog / schema name
_SQLSTATE_CLASS: dict[str, Verdict] = {"08": CONN, "28": AUTH, "0A": CONFIG}
_SQLSTATE_CLASS |= {"53": verdict(C.RESOURCE_EXHAUSTION, K.RESOURCE, True)}
_SQLSTATE_CLASS |= {"42": verdict(C.CONFIGURATION, K.SYNTAX, False)}
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
    ("XX", "58"), verdict(C.EXTERNAL_SERVICE, K.SERVER_ERROR, False, S.HIGH)
)


def sqlstate_verdict(sqlstate: str) -> Verdict:
    """Meaning of a SQLSTATE: its own entry, else its class's; always the database's failure."""
    base = _SQLSTATE.get(sqlstate) or _SQLSTATE_CLASS.get(sqlstate[:2], UNKNOWN)
    return replace(base, code=sqlstate, dependency=True)


_ERRNO_SPEC = (
    (CONN, "ECONNREFUSED ECONNRESET ECONNABORTED EPIPE EHOSTUNREACH ENETUNREACH EHOSTDOWN"),
    (CONN, "ENETDOWN ENETRESET ENOTCONN ESHUTDOWN EAGAIN EWOULDBLOCK"),
    (TIMEOUT, "ETIMEDOUT"),
    (verdict(C.RESOURCE_EXHAUSTION, K.RESOURCE, False), "EMFILE ENFILE ENOSPC EDQUOT"),
    (PRESETS["MEMORY"], "ENOMEM"),
    (CONFIG, "ENOENT"),
    (AUTH, "EACCES EPERM"),
)
ERRNO = {getattr(_errno, n): v for v, ns in _ERRNO_SPEC for n in ns.split() if hasattr(_errno, n)}
_GAI_NAMES = ("EAI_AGAIN", "EAI_NONAME", "EAI_FAIL", "EAI_NODATA", "EAI_SERVICE")
GAI_CODES = {getattr(socket, n): n for n in _GAI_NAMES if hasattr(socket, n)}
DNS_FAILED = replace(verdict(C.CONFIGURATION, K.CONNECTION, False), dependency=True)

# Error prefixes of a redis ResponseError that redis-py does not map to its own class.
REDIS_PREFIX = dict.fromkeys(
    ("CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "LOADING", "BUSY"), SERVER_RETRY
)
REDIS_PREFIX |= dict.fromkeys(("MOVED", "ASK"), PRESETS["MOVED"])
REDIS_PREFIX |= dict.fromkeys(("NOAUTH", "WRONGPASS", "NOPERM"), AUTH)
REDIS_PREFIX |= {"READONLY": PRESETS["READONLY"], "OOM": PRESETS["MEMORY"]}
REDIS_CODE = re.compile(r"\s*([A-Z][A-Z_-]+)\b")
REDIS_CLUSTER_UNREACHABLE = "Redis Cluster cannot be connected"
"""How redis-py's cluster clients begin the error of a slot-map refresh that reached no node:
a ``RedisClusterUnreachableError`` from 8.2, the bare ``RedisClusterException`` before (raised
``from`` the last node's error, which says why)."""

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
PG_MESSAGES = ((_PG_AUTH, AUTH), (_PG_CONFIG, CONFIG), (_PG_CONN, CONN))
