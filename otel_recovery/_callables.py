"""Calling user callables of unknown shape: sync, async, or a lambda returning an awaitable.

The seed API and the orchestrator take ``retry_func``, ``fallback_func``, ``recover`` and
health checks from users who wrote them any way they liked. Before calling one they ask
what it accepts (a restored state? the error? a ``timeout=``?), from its signature and
never by trying, and they await whatever it returned only if that is awaitable. A caller
that cannot await (a sync saga or transaction) closes what it got instead
(:func:`close_unawaited`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "accepts_keyword",
    "accepts_one_positional",
    "callable_name",
    "close_unawaited",
    "resolve",
]


def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def accepts_one_positional(func: Callable[..., Any]) -> bool:
    """Whether ``func`` needs one positional argument: ``func(x)`` binds and ``func()`` does
    not (``lambda state: ...`` yes; ``lambda: ...`` no; nor ``resume(timeout=5.0)`` or
    ``functools.partial(cache.get, key)``, whose optional parameter would otherwise receive
    the state or the error: ``cache.get(key, error)`` answers the error on a miss)."""
    signature = _signature(func)
    if signature is None:
        return False
    try:
        signature.bind(None)
    except TypeError:
        return False
    try:
        signature.bind()
    except TypeError:
        return True  # a parameter that must be given: the one argument
    return False


def accepts_keyword(func: Callable[..., Any], name: str) -> bool:
    """Whether ``func`` names a ``name`` parameter (``**kwargs`` alone does not count)."""
    signature = _signature(func)
    if signature is None:
        return False
    parameter = signature.parameters.get(name)
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


async def resolve(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def close_unawaited(value: object) -> None:
    """Close ``value``, an awaitable a sync caller got and will never await: a coroutine
    then never runs (nor warns that it was never awaited); a task or future, which has no
    ``close()``, is not ours to stop and is left alone."""
    close = getattr(value, "close", None)
    if callable(close):
        close()


def callable_name(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func))
