"""What common failures mean: the built-in knowledge behind :mod:`otel_recovery.classify`.

:func:`resolve` gives the built-in verdict for one exception: what its class is known to
mean (its profile, :mod:`._type_profiles`, from the table of :mod:`._error_classes`), unless
what the instance carries says more. It asks in a fixed order: an HTTP status, a SQLSTATE,
the exception it wraps, a Redis error prefix or a PostgreSQL driver message, an errno (the
meanings in :mod:`._error_codes`). Recognition never imports the libraries concerned:
``import otel_recovery`` must stay cheap and must not pull in redis or httpx.

The vocabulary the answers are written in lives in :mod:`._error_vocabulary`; its public
enums keep this module as their ``__module__`` (where they were defined before), so they are
re-exported here.
"""

from __future__ import annotations

import errno as _errno
import socket

from otel_recovery._error_codes import (
    DNS_FAILED,
    ERRNO,
    GAI_CODES,
    PG_MESSAGES,
    REDIS_CLUSTER_UNREACHABLE,
    REDIS_CODE,
    REDIS_PREFIX,
    sqlstate_verdict,
    status_verdict,
)
from otel_recovery._error_vocabulary import (
    CONN,
    UNKNOWN,
    ErrorCategory,
    ErrorKind,
    Severity,
    Verdict,
)
from otel_recovery._public_home import public_home
from otel_recovery._type_profiles import TypeProfile, attr, http_status, profile_of

__all__ = ["ErrorCategory", "ErrorKind", "Severity", "resolve", "safe_str"]

public_home(__name__, ErrorCategory, ErrorKind, Severity)  # their name before the split


def resolve(exc: BaseException, message: str, depth: int = 0) -> tuple[TypeProfile, Verdict]:
    """Built-in verdict for ``exc`` alone (no rules, chain, Retry-After or repeats)."""
    profile = profile_of(type(exc))
    static = profile.static
    if static is not None and static.kind in (ErrorKind.CANCELLED, ErrorKind.CIRCUIT_OPEN):
        return profile, static
    status = http_status(exc, profile)
    if status is not None and status >= 300:
        return profile, status_verdict(status)
    sqlstate = attr(exc, profile, "sqlstate") or attr(exc, profile, "pgcode")
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return profile, sqlstate_verdict(sqlstate.upper())
    if profile.wrapper is not None and depth < 4:
        inner = attr(exc, profile, profile.wrapper)
        if isinstance(inner, BaseException) and inner is not exc:
            return profile, resolve(inner, safe_str(inner), depth + 1)[1]
    code: str | None = None
    if profile.redis and profile.matched == "ResponseError":
        found = REDIS_CODE.match(message)
        if found:
            code = found.group(1)
            static = REDIS_PREFIX.get(code, static)
        elif "-READONLY " in message:  # a write refused inside a script, before Redis 7.0
            code, static = "READONLY", REDIS_PREFIX["READONLY"]
    elif profile.redis and not profile.matched and message.startswith(REDIS_CLUSTER_UNREACHABLE):
        # redis-py before 8.2: no cluster node answered, said by the base class; why is in
        # the error it was raised from (refused, timed out, refused our password). Still a
        # Redis error whatever that is (a ValueError of the client's settings): its
        # verdict keeps the family's dependency mark below, as the class's own did
        cause = exc.__cause__
        static = CONN
        if cause is not None and depth < 4:
            static = resolve(cause, safe_str(cause), depth + 1)[1]
    elif profile.pg:
        static = next((v for p, v in PG_MESSAGES if p.search(message)), static)
    errno = attr(exc, profile, "errno") if isinstance(exc, OSError) and not profile.ssl else None
    if isinstance(errno, int):
        if errno in GAI_CODES and isinstance(exc, socket.gaierror):
            code = GAI_CODES[errno]
            static = CONN if code == "EAI_AGAIN" else DNS_FAILED
        else:
            code = _errno.errorcode.get(errno)
            static = static or ERRNO.get(errno)
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
