"""What an exception's class tells, worked out once per class, and reading what it carries.

Classifying runs on every failure, so everything that depends only on the class is computed
once and cached (:func:`profile_of`): its OTel ``exception.type`` name (:func:`error_type_of`),
the stock verdict of the closest known class in its MRO (:mod:`._error_classes`), the
attribute it wraps the real failure in, its family (redis, PostgreSQL, HTTP-like, OpenSSL,
exception group), and which duck-typed attributes (``.sqlstate``, ``.status_code``,
``.errno``...) its class defines. :func:`attr` and :func:`http_status` read those attributes
off an instance cheaply and without ever raising.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from otel_recovery._error_classes import CLASS_VERDICTS, PG_ROOTS, ROOT_ALIASES, WRAPPERS
from otel_recovery._error_vocabulary import Verdict

__all__ = ["TypeProfile", "attr", "error_type_of", "http_status", "profile_of"]

# The instance attributes worth reading; :func:`attr` skips those the class does not define.
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
        root = ROOT_ALIASES.get(root, root)
        redis, pg, ssl = redis or root == "redis", pg or root in PG_ROOTS, ssl or root == "ssl"
        httpish = httpish or "http" in name.lower()
        group = group or name in ("BaseExceptionGroup", "ExceptionGroup")
        if static is None and wrapper is None:
            wrapper = WRAPPERS.get((root, name))
            static = CLASS_VERDICTS.get((root, name))
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
