"""Pieces shared by the seed API (:mod:`otel_recovery.interaction`) and the orchestrator.

Kept apart so both modules stay readable: one recovery's state (:class:`Run`) and how it
becomes the result dict and the finished span; span plumbing that honours the ``telemetry=``
switch; how a context dict becomes bounded, redacted span attributes; how user callables of
unknown shape (sync, async, lambdas returning awaitables) are called; compensations for
TRANSACTION_ROLLBACK; and the backoff shift that makes the original failure attempt zero.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from otel_recovery._clock import Clock
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import MASK, name_text, names_a_secret, redact, redact_bounded
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.classify import ErrorInfo
from otel_recovery.compensation import CompensationInProgressError, Compensations
from otel_recovery.policies import Backoff, CircuitBreaker, CircuitState, Retry
from otel_recovery.telemetry import Telemetry, get_telemetry
from otel_recovery.telemetry import attributes as _names
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry.attributes import (
    EVENT_COMPENSATION,
    RECOVERY_REASON,
)

__all__ = [
    "EVENT_COMPENSATION",
    "Outcome",
    "Run",
    "Shifted",
    "accepts_keyword",
    "accepts_one_positional",
    "activated",
    "as_strategy",
    "circuit_is_open",
    "classification_context",
    "context_attributes",
    "describe",
    "fallback_hook",
    "finish",
    "give_up",
    "optional_callable",
    "reason_for",
    "retry_on_verdict",
    "resolve",
    "rollback",
    "start_span",
    "tracer_of",
    "type_name",
]


MAX_VALUE = 256
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
_OPEN = (CircuitState.OPEN, CircuitState.FORCED_OPEN)


def tracer_of(telemetry: Telemetry | bool) -> Tracer | None:
    """The tracer to use, or None when telemetry is off (or cannot be set up)."""
    if telemetry is False:
        return None
    try:
        return (telemetry if isinstance(telemetry, Telemetry) else get_telemetry()).tracer
    except Exception:  # telemetry must never break recovery
        return None


def start_span(
    tracer: Tracer | None, name: str, attributes: Mapping[str, Any], clock: Clock
) -> Span:
    """An INTERNAL span timed by ``clock`` (like the engine's), or a no-op span."""
    if tracer is None:
        return trace.INVALID_SPAN
    return tracer.start_span(
        name,
        kind=SpanKind.INTERNAL,
        attributes=dict(attributes),
        start_time=int(clock.wall() * 1e9),
    )


@contextlib.contextmanager
def activated(span: Span, tracer: Tracer | None) -> Iterator[None]:
    """Make ``span`` current; with telemetry off, leave the caller's span current instead."""
    if tracer is None:
        yield
        return
    with trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    ):
        yield


def classification_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    return {key: ctx[key] for key in _CLASSIFIER_KEYS if ctx.get(key) is not None}


def bounded(value: object) -> str:
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return redact_bounded(text, MAX_VALUE)


_SPAN_OUTCOMES = {"failed": "failure", "circuit_open": "rejected"}
"""The seed API's ``recovery_status`` values that the recovery spans name otherwise."""


def span_outcome(status: str) -> str:
    """A result's status in the words every recovery span uses (``failure``, not the seed
    API's ``failed``), so one search for ``otel_recovery.outcome=failure`` finds them all."""
    return _SPAN_OUTCOMES.get(status, status)


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


def type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def describe(error: BaseException) -> str:
    """``"Type: message"``, redacted and bounded, for results and span statuses."""
    text = bounded(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def circuit_is_open(breaker: CircuitBreaker) -> bool:
    """Open and still within its open time (an elapsed OPEN breaker would allow a probe)."""
    state = breaker.state
    if state is CircuitState.FORCED_OPEN:
        return True
    return state in _OPEN and (breaker.retry_after() or 0.0) > 0.0


def callable_name(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func))


_LISTS_ROLLING: dict[int, tuple[Compensations, int]] = {}
"""The stack each list of undos being rolled back is run as, and how many rollbacks hold
it: recoveries given the same list at once share one stack, so its undos run once."""
_lists_lock = new_lock()
if hasattr(os, "register_at_fork"):  # a forked child rolls back nothing of its parent's
    os.register_at_fork(after_in_child=_LISTS_ROLLING.clear)


def _stack_of(undos: list[Any]) -> Compensations:
    with _lists_lock:
        held = _LISTS_ROLLING.get(id(undos))
        if held is None:
            saga = Compensations()
            saga.owed_hint = "Pass the same list to TRANSACTION_ROLLBACK again to run them"
            for undo in undos:
                saga.add(undo, name=callable_name(undo))
        else:
            saga = held[0]
        _LISTS_ROLLING[id(undos)] = (saga, 1 if held is None else held[1] + 1)
        return saga


def _list_done(undos: list[Any], saga: Compensations, *, update: bool) -> None:
    """The list keeps what is still owed (told by the rollback that ran the stack); the last
    rollback holding the stack lets it go."""
    with _lists_lock:
        _, holders = _LISTS_ROLLING[id(undos)]
        if holders == 1:
            del _LISTS_ROLLING[id(undos)]
        else:
            _LISTS_ROLLING[id(undos)] = (saga, holders - 1)
        if update:
            undos[:] = [undo for _, undo in saga.pending]


async def rollback(
    compensations: object, span: Span
) -> tuple[str, str | None, Exception | None, int]:
    """TRANSACTION_ROLLBACK: ``(status, reason, last undo error, steps that ran cleanly)``.

    A list is consumed like a :class:`Compensations` stack: the undos that succeeded leave it
    (in place), the failed or interrupted ones stay, so passing the same list or stack again
    runs only what is still owed, never an undo twice. An empty one has nothing to undo.
    """
    if compensations is None:
        reason = "TRANSACTION_ROLLBACK needs context['compensations']: the undo callables, in "
        return "failed", reason + "the order their steps ran", None, 0
    if isinstance(compensations, Compensations):
        saga = compensations
    elif not isinstance(compensations, list):
        reason = (
            "context['compensations'] must be a Compensations stack or a list of callables, "
            f"not {type(compensations).__name__}: a list is consumed as its undos succeed, so "
            "passing it again runs only what is owed (a tuple or a deque cannot be; pass "
            "list(...) and keep that list)"
        )
        return "failed", reason, None, 0
    else:
        for undo in compensations:
            if not callable(undo):
                return "failed", f"compensation {undo!r} is not callable", None, 0
        saga = _stack_of(compensations)
    total = len(saga)
    ran_here = True
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            failures = await saga.acompensate()
    except CompensationInProgressError:
        ran_here = False
        reason = "another recovery is rolling these compensations back now; none ran twice"
        return "failed", reason, None, 0
    finally:
        if isinstance(compensations, list):
            _list_done(compensations, saga, update=ran_here)
    ran = total - len(failures)
    if not failures:
        return "success", None, None, ran
    listed = "; ".join(f"{name}: {describe(exc)}" for name, exc in failures)
    reason = f"{len(failures)} of {total} compensations failed: {listed}"
    last = failures[-1][1]
    return "failed", reason, last if isinstance(last, Exception) else None, ran


class Shifted:
    """The engine numbers its retries from 1, but its first attempt is already our retry 1:
    the original failure was attempt zero, so every delay moves one step along."""

    __slots__ = ("inner",)

    def __init__(self, inner: Backoff) -> None:
        self.inner = inner

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        return self.inner.delay(retry_number + 1, previous_delay, rng)

    def __repr__(self) -> str:
        return f"Shifted({self.inner!r})"


# -- one recovery's state and result (used by interaction.py) ---------------------------


@dataclass(slots=True)
class Run:
    """Everything one recovery knows; mutated only by the task running it."""

    service_id: str
    error: BaseException
    info: ErrorInfo
    context: dict[str, Any]
    strategy: RecoveryStrategy | None
    retry_func: Callable[..., Any] | None
    fallback: Callable[..., Any] | None
    breaker: CircuitBreaker
    span: Span
    calls: int = 0
    fallback_used: bool = False
    fallback_error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    status: str
    result: Any = None
    reason: str | None = None
    error: BaseException | None = None


def finish(
    run: Run, action: RecoveryAction, outcome: Outcome, elapsed: float, clock: Clock
) -> dict[str, Any]:
    """The result dict of the seed API; also completes and ends the recovery span."""
    info, span = run.info, run.span
    context = span.get_span_context()
    result: dict[str, Any] = {
        "recovery_status": outcome.status,
        "strategy": action.value,
        "attempts": run.calls,
        "result": outcome.result,
        "recovery_time": elapsed,
        "error_type": info.error_type,
        "category": info.category.value,
        "severity": info.severity.value,
        "fingerprint": info.fingerprint,
        "retryable": info.retryable,
        "service_id": run.service_id,
        "trace_id": format(context.trace_id, "032x") if context.is_valid else None,
    }
    result.update(run.extra)
    # The span speaks the library's outcome words (``failure``, ``rejected``), as every other
    # recovery span does, so one search finds them all; the result keeps the seed's.
    span.set_attribute(names.OUTCOME, span_outcome(outcome.status))
    span.set_attribute(names.ATTEMPTS, run.calls)
    if outcome.status != "success":
        result["reason"] = outcome.reason or outcome.status
        span.set_attribute(RECOVERY_REASON, redact(result["reason"])[:MAX_VALUE])
    if outcome.status == "circuit_open":
        result["retry_after"] = run.breaker.retry_after()
    if outcome.status in ("failed", "circuit_open"):
        final = outcome.error or run.error
        result["error"] = describe(final)
        span.set_attribute(names.ERROR_TYPE, type_name(final))
        span.set_status(Status(StatusCode.ERROR, result["error"]))
    span.end(end_time=int(clock.wall() * 1e9))
    return result


def fallback_hook(run: Run) -> Callable[[BaseException], Any]:
    """``fallback_func`` adapted to the engine: takes the error only if it accepts one
    argument, and records that it ran (or how it failed) on the run."""
    func = run.fallback
    assert func is not None
    takes_error = accepts_one_positional(func)

    async def hook(error: BaseException) -> Any:
        run.fallback_used = True
        try:
            return await resolve(func(error) if takes_error else func())
        except Exception as exc:
            run.fallback_error = exc
            raise

    return hook


async def give_up(run: Run, reason: str) -> Outcome:
    """No (more) calls: answer with the fallback if there is one, else fail."""
    if run.fallback is None:
        return Outcome("failed", reason=reason, error=run.error)
    try:
        value = await fallback_hook(run)(run.error)
    except Exception as exc:
        return Outcome("failed", reason=f"{reason}; fallback_func failed", error=exc)
    event = {names.FALLBACK_KIND: "function", names.ERROR_TYPE: run.info.error_type}
    run.span.add_event(names.EVENT_FALLBACK, event)
    return Outcome("fallback", value, reason=reason)


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


def reason_for(why: str, run: Run) -> str:
    """A readable reason from the selection's short one."""
    if why == "circuit_open":
        return f"circuit breaker for service {run.service_id!r} is open"
    if why == "not_retryable":
        return f"{run.info.error_type} is not retryable"
    if why == "explicit":
        return "fallback requested"
    if why == "not_idempotent":
        return "context['idempotent'] is False: the call is not made again"
    if why == "retry_on":
        return f"{run.info.error_type} is not matched by context['retry_on']"
    return f"{why} errors are not retried"
