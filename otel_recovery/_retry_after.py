"""Server-directed waits: the ``Retry-After`` header (RFC 9110 section 10.2.3) and friends.

Kept apart from the error tables because it is protocol parsing, not knowledge of libraries:
headers come as dicts, httpx ``Headers``, aiohttp ``CIMultiDict`` or ``email.message.Message``,
and values as delta-seconds or an HTTP-date relative to the wall clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import timedelta, timezone
from email.utils import parsedate_to_datetime

from otel_recovery._type_profiles import TypeProfile, attr

__all__ = ["header", "parse_retry_after", "retry_after_of"]


def header(headers: object, name: str) -> str | None:
    """Case-insensitive lookup in a dict, httpx Headers, CIMultiDict or email Message."""
    if headers is None:
        return None
    try:
        get = getattr(headers, "get", None)
        value = (get(name) or get(name.lower())) if get is not None else None
        if value is None and hasattr(headers, "items"):
            value = next((v for k, v in headers.items() if str(k).lower() == name.lower()), None)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return None if value is None else str(value)
    except Exception:
        return None


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, wall: Callable[[], float]) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or HTTP-date); None if unusable.

    A date in the past means "now" (0), not an error: clocks of client and server differ.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - wall())


def _seconds(value: object) -> float | None:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return None


def retry_after_of(
    exc: BaseException, profile: TypeProfile, wall: Callable[[], float]
) -> float | None:
    """An explicit ``.retry_after`` attribute, else the Retry-After header of the exception or
    of its ``.response``. ``wall`` (epoch seconds) is read only for HTTP-date values."""
    explicit = _seconds(attr(exc, profile, "retry_after"))
    if explicit is not None:
        return explicit
    value = header(attr(exc, profile, "headers"), "Retry-After")
    if value is None:
        try:
            value = header(getattr(attr(exc, profile, "response"), "headers", None), "Retry-After")
        except Exception:
            value = None
    return parse_retry_after(value, wall) if value is not None else None
