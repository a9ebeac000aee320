"""What a PostgreSQL driver's failure means, where the process-wide classifier cannot tell.

psycopg reports a server's refusal to open a session without a SQLSTATE, in a ``FATAL:``
message, and asyncpg a statement on a connection the server terminated as an
``InterfaceError``, which reads as the caller's mistake. :class:`PostgresClassifier` corrects
both: only the refusals that heal are retried, a shortage of the server's counts against its
breaker, and a terminated connection is the dependency's failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from otel_recovery._clock import Clock
from otel_recovery.classify import (
    Classifier,
    ErrorCategory,
    ErrorInfo,
    ErrorKind,
    Severity,
    classify_on,
    get_default_classifier,
)

__all__ = ["PostgresClassifier"]


# libpq reports a server's refusal to open a session as an OperationalError without a
# SQLSTATE, in a "FATAL:" message. Only these refusals are transient; a wrong role,
# password or database name will not heal by retrying.
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
    "terminating connection due to administrator command",
)
# Refusals that will not heal by an immediate retry but are the server's shortage, not the
# caller's configuration: they count against the server's breaker.
_SHORTAGE_FATAL = (
    "too many connections for",  # a role's or a database's connection limit
    "out of memory",
    "canceling authentication due to timeout",
)


class PostgresClassifier(Classifier):
    """The process-wide classifier, plus two facts about PostgreSQL drivers it cannot know.

    - psycopg's connection failures carry no SQLSTATE; a ``FATAL:`` refusal other than the
      transient ones above is not retried: a shortage of the server's (a connection limit)
      counts against its breaker, anything else is configuration, not a network blip.
    - asyncpg raises ``InterfaceError("connection is closed")`` for a statement on a
      connection the server terminated: a dependency failure for the breaker, not a caller's
      programming error.

    Delegates to :func:`get_default_classifier` at each call, so user rules still apply.
    """

    def classify(
        self,
        exc: BaseException,
        context: Mapping[str, Any] | None = None,
        *,
        clock: Clock | None = None,
    ) -> ErrorInfo:
        info = classify_on(get_default_classifier(), exc, context, clock)
        try:
            module = type(exc).__module__ or ""
            message = str(exc)
            refused = "FATAL:" in message and not any(p in message for p in _TRANSIENT_FATAL)
            if module.startswith("psycopg") and refused and info.retryable:
                if any(p in message for p in _SHORTAGE_FATAL):
                    category, kind = ErrorCategory.RESOURCE_EXHAUSTION, ErrorKind.RESOURCE
                else:
                    category = ErrorCategory.CONFIGURATION
                    kind = ErrorKind.AUTH if "auth" in message.lower() else ErrorKind.OTHER
                return replace(
                    info, category=category, severity=Severity.HIGH, retryable=False, kind=kind
                )
            if module.startswith("asyncpg") and message == "connection is closed":
                return replace(
                    info,
                    category=ErrorCategory.TRANSIENT,
                    severity=Severity.MEDIUM,
                    retryable=True,
                    kind=ErrorKind.CONNECTION,
                )
        except Exception:  # a refinement must never lose the base answer
            return info
        return info
