"""The words failures are classified in: categories, severities, kinds, and the verdict.

:class:`ErrorCategory` (the broad cause), :class:`Severity` (ordered by rank) and
:class:`ErrorKind` (the precise condition) are public through :mod:`otel_recovery.classify`;
:class:`Verdict` is the built-in answer for one exception in those words, before rules,
context and repeats are applied. The stock verdicts (:data:`CONN`, :data:`TIMEOUT`...,
:data:`PRESETS`) and :func:`verdict`, which gives a category its default severity and a kind
its dependency mark, are what the answer tables (:mod:`._error_classes`,
:mod:`._error_codes`) are written with.

Kept apart from the tables so that they, the type profiles and the classifier share one
vocabulary without importing one another. The public enums keep ``otel_recovery._known_errors``
as their ``__module__`` (where they were defined first); that module sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

__all__ = ["ErrorCategory", "ErrorKind", "Severity", "Verdict", "verdict"]
__all__ += ["AUTH", "CONFIG", "CONN", "INVALID", "PRESETS", "SERVER_RETRY", "TIMEOUT", "UNKNOWN"]


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


def verdict(
    cat: ErrorCategory, kind: ErrorKind, retry: bool, sev: Severity | None = None
) -> Verdict:
    """A verdict with the category's default severity (unless ``sev``) and the kind's
    dependency mark."""
    dependency = kind in _DEPENDENCY_KINDS
    return Verdict(cat, sev or _DEFAULT_SEVERITY[cat], retry, kind, dependency=dependency)


# The stock verdicts; PRESETS names them for the class table (:mod:`._error_classes`).
CONN = verdict(C.TRANSIENT, K.CONNECTION, True)
TIMEOUT = verdict(C.TRANSIENT, K.TIMEOUT, True)
AUTH = verdict(C.CONFIGURATION, K.AUTH, False)
CONFIG = verdict(C.CONFIGURATION, K.OTHER, False)
INVALID = verdict(C.INVALID_REQUEST, K.CLIENT_ERROR, False)
UNKNOWN = verdict(C.UNKNOWN, K.OTHER, False)
SERVER_RETRY = verdict(C.TRANSIENT, K.SERVER_ERROR, True)
PRESETS: dict[str, Verdict] = {
    "CONN": CONN,
    "TIMEOUT": TIMEOUT,
    "AUTH": AUTH,
    "CONFIG": CONFIG,
    "INVALID": INVALID,
    "PROGRAMMING": verdict(C.INVALID_REQUEST, K.OTHER, False),
    "CANCELLED": verdict(C.UNKNOWN, K.CANCELLED, False, S.LOW),
    "MEMORY": verdict(C.RESOURCE_EXHAUSTION, K.MEMORY, False),
    "POOL": replace(verdict(C.RESOURCE_EXHAUSTION, K.RESOURCE, True), dependency=True),
    "REDIRECT_LOOP": replace(verdict(C.CONFIGURATION, K.REDIRECT, False), dependency=False),
    "CERT": replace(verdict(C.CONFIGURATION, K.CONNECTION, False), dependency=False),
    "CIRCUIT": verdict(C.CASCADING, K.CIRCUIT_OPEN, False),
    "SERVER_RETRY": SERVER_RETRY,
    "MOVED": verdict(C.TRANSIENT, K.REDIRECT, True),
    "READONLY": verdict(C.TRANSIENT, K.READONLY, True),
    "SERIALIZATION": verdict(C.TRANSIENT, K.SERIALIZATION, True),
}
