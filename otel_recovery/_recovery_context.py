"""Reading the context dict of ``recover_from_error``: checked keys, classifier input, attributes.

The seed API takes one free-form mapping. Some keys it consumes and checks before anything
runs (``strategy``, ``retry_func``, ``idempotent``, ``retry_on``...), so that a wrong value is
a ``TypeError`` at the call rather than a recovery that quietly does the wrong thing; a few
feed the classifier; everything else becomes span attributes, stringified, bounded and
redacted, with the values under secret-named keys masked whole (headers included), because
a context is where a caller puts a password without thinking about traces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from otel_recovery._recovery_spans import bounded
from otel_recovery._redact import MASK, name_text, names_a_secret
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies import Retry
from otel_recovery.telemetry import attributes as _names

__all__ = [
    "as_strategy",
    "classification_context",
    "context_attributes",
    "idempotent",
    "optional_callable",
    "retry_on_verdict",
]


_MAX_EXTRA_ATTRIBUTES = 32
_NAMED = {
    "endpoint": _names.ENDPOINT,
    "operation": _names.OPERATION,
    "criticality": _names.CRITICALITY,
    "checkpoint_id": _names.CHECKPOINT_ID,
}
_CONSUMED = frozenset(
    {"service_id", "retry_func", "fallback_func", "strategy", "reconnect", "compensations"}
    | {"retry_on"}
)
_CLASSIFIER_KEYS = ("criticality", "service_id", "endpoint", "operation")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_.-]")


def classification_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    return {key: ctx[key] for key in _CLASSIFIER_KEYS if ctx.get(key) is not None}


_MAX_NESTED_DEPTH = 4
_MAX_NESTED_ITEMS = 64


def masked(value: object, depth: int = 0) -> object:
    """``value`` with what is stored under a secret-named key replaced by ``***``: in mappings
    (``{"Cookie": ..., "Authorization": ...}``, ``httpx.Headers``), in (name, value) pairs and
    in lists and tuples of them (``[("X-Api-Key", "k")]``), down to 4 levels and 64 items a
    level (what lies beyond is left out of mappings and sequences, and deeper values are only
    text-redacted). Other values are returned as they are; their text is redacted later."""
    if depth >= _MAX_NESTED_DEPTH:
        return value
    try:
        if isinstance(value, Mapping):
            shown: dict[object, object] = {}
            for index, (key, item) in enumerate(value.items()):
                if index >= _MAX_NESTED_ITEMS:
                    break
                shown[key] = MASK if names_a_secret(key) else masked(item, depth + 1)
            return shown
        # not namedtuples (or other subclasses): their repr names their fields
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
            if len(value) == 2 and isinstance(value[0], (str, bytes)) and names_a_secret(value[0]):
                pair = [value[0], MASK]
                return tuple(pair) if type(value) is tuple else pair
            inner = [masked(item, depth + 1) for item in value[:_MAX_NESTED_ITEMS]]
            return tuple(inner) if type(value) is tuple else inner
    except Exception:  # a hostile mapping: show nothing of it rather than fail or leak
        return f"<unprintable {type(value).__name__}>"
    return value


def context_attributes(ctx: Mapping[str, Any]) -> dict[str, str]:
    """Context keys as span attributes: stringified, redacted, at most 256 chars, 32 extras;
    the value of a key that names a secret (``password``, ``api_key``, ``b"password"``,
    ``("db", "password")``) is masked whole, and so are the values under such keys inside
    mappings and (name, value) pair lists (headers)."""
    attributes: dict[str, str] = {}
    extras = 0
    for key, value in ctx.items():
        if key in _NAMED:
            if value is not None:
                attributes[_NAMED[key]] = bounded(masked(value))
        elif key in _CONSUMED or callable(value) or value is None:
            continue
        elif extras < _MAX_EXTRA_ATTRIBUTES:
            safe = _UNSAFE_KEY.sub("_", name_text(key))[:64]
            shown = MASK if names_a_secret(key) else bounded(masked(value))
            attributes[_names.CONTEXT_PREFIX + safe] = shown
            extras += 1
    return attributes


def as_strategy(value: object) -> RecoveryStrategy | None:
    if value is None or isinstance(value, RecoveryStrategy):
        return value
    if isinstance(value, (RecoveryAction, str)):
        return RecoveryStrategy(action=value)  # type: ignore[arg-type]
    raise TypeError(
        f"context['strategy'] must be a RecoveryStrategy or RecoveryAction, got {value!r}"
    )


def idempotent(ctx: Mapping[str, Any]) -> bool:
    """``context["idempotent"]``: may the call be repeated (default yes)? Only ``True`` or
    ``False``: a ``"no"`` or ``0`` read as "not False" would let a payment be retried."""
    value = ctx.get("idempotent")
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    raise TypeError(
        "context['idempotent'] must be True or False (False: the call may not be repeated, "
        f"so it is never retried), got {value!r}"
    )


def optional_callable(ctx: Mapping[str, Any], key: str) -> Callable[..., Any] | None:
    value = ctx.get(key)
    if value is None or callable(value):
        return value
    raise TypeError(f"context[{key!r}] must be callable (sync, async or a lambda), got {value!r}")


def retry_on_verdict(ctx: Mapping[str, Any], error: BaseException, info: ErrorInfo) -> bool | None:
    """Whether ``context["retry_on"]`` retries ``error``; None when the context has none."""
    retry_on = ctx.get("retry_on")
    if retry_on is None:
        return None
    try:
        retry = Retry(on=retry_on)
    except TypeError:
        raise TypeError(
            "context['retry_on'] must be exception types (a class or a tuple of classes) or "
            f"a predicate taking the exception, got {retry_on!r}"
        ) from None
    return retry.is_retryable(error, info)
