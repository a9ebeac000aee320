"""Self-healing: remediation actions that run before a retry, keyed by the kind of failure.

Retrying a broken connection through the same broken connection rarely helps; reconnecting
first does. A :class:`HealingRegistry` maps each :class:`~otel_recovery.classify.ErrorKind` to
actions, and :class:`~otel_recovery.interaction.ErrorRecoveryInteraction` runs them (strategy
``SELF_HEAL``) and then retries through the ordinary engine. Healing never bypasses the engine;
it only changes the world (or the call's context) before the engine's next attempt.

Built-in actions, for the seed's four cases:

=============  =================  ===========================================================
kind           action             what it does
=============  =================  ===========================================================
CONNECTION     ``reconnect``      runs the callback from ``context["reconnect"]``, else the one
                                  registered with :meth:`register_reconnect` for the service;
                                  none -> outcome ``skipped`` ("no reconnect callback"), and
                                  the retry still happens
MEMORY         ``clear_caches``   runs every :meth:`register_cache_clearer` callback, then
                                  ``gc.collect()``
TIMEOUT        ``raise_timeout``  ``context["timeout"]`` becomes ``min(timeout * 2,
                                  max_timeout)``; the caller passes it to ``retry_func`` when
                                  that accepts a ``timeout`` keyword
RATE_LIMIT     (none)             backing off as told is the retry policy's job: ``Retry``
                                  waits for the error's ``retry_after``
=============  =================  ===========================================================

Every action's outcome (``success``, ``skipped`` or ``failed``) becomes a span event
``otel_recovery.self_heal`` on the current span. A failing action is logged and recorded but
never raised: the error being recovered from is the one that matters to the caller.
Concurrent heals of the same action for the same service share one run, across threads and
event loops (a threaded server's ``asyncio.run`` per request included), so a hundred requests
failing on one dead connection cause one reconnect, not a hundred. The run happens in the
loop of the heal that started it; the others wait in their own loops without blocking them
(see :mod:`otel_recovery._single_flight`).
"""

from __future__ import annotations

import gc
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import trace

from otel_recovery._clock import Duration, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery._single_flight import SingleFlight
from otel_recovery.classify import ErrorInfo, ErrorKind
from otel_recovery.telemetry.attributes import (
    EVENT_SELF_HEAL,
    HEAL_ACTION,
    HEAL_DETAIL,
    HEAL_OUTCOME,
    SERVICE_ID,
)

__all__ = [
    "EVENT_SELF_HEAL",
    "HealOutcome",
    "HealResult",
    "HealingAction",
    "HealingContext",
    "HealingRegistry",
    "HealingReport",
]

_log = logging.getLogger("otel_recovery")

_MAX_DETAIL = 256

HealOutcome = Literal["success", "skipped", "failed"]


@dataclass(frozen=True, slots=True)
class HealResult:
    """What one healing action did."""

    action: str
    outcome: HealOutcome
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"action": self.action, "outcome": self.outcome, "detail": self.detail}


@dataclass(slots=True)
class HealingContext:
    """Handed to every action. ``context`` is a private copy that actions may adjust."""

    service_id: str
    error: BaseException
    info: ErrorInfo
    context: dict[str, Any]
    registry: HealingRegistry


@dataclass(slots=True)
class HealingReport:
    """Every action's result, and the context as the actions left it."""

    results: list[HealResult] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.outcome != "failed" for r in self.results)


HealingAction = Callable[[HealingContext], "HealResult | Awaitable[HealResult | None] | None"]
"""An action: sync or async; returning None means success, a :class:`HealResult` says more."""

Callback = Callable[[], Any]


class HealingRegistry:
    """ErrorKind -> remediation actions. Thread-safe; actions run in registration order."""

    def __init__(self, *, max_timeout: Duration = 30.0, builtins: bool = True) -> None:
        self.max_timeout = to_seconds(max_timeout, "max_timeout", allow_inf=True)
        if self.max_timeout <= 0:
            raise ValueError(f"max_timeout must be > 0 seconds, got {max_timeout!r}")
        self._lock = new_lock()
        self._actions: dict[ErrorKind, tuple[HealingAction, ...]] = {}
        self._reconnects: dict[str, Callback] = {}
        self._cache_clearers: tuple[Callback, ...] = ()
        self._flights: SingleFlight[HealResult] = SingleFlight()
        self._unshared: set[int] = set()
        if builtins:
            self.register(ErrorKind.CONNECTION, reconnect)
            # The server ended the session (PostgreSQL 57P01/57P02 on a restart, a failover,
            # pg_terminate_backend): the connection is as gone as after a reset.
            self.register(ErrorKind.SHUTDOWN, reconnect)
            self.register(ErrorKind.MEMORY, clear_caches)
            self.register(ErrorKind.TIMEOUT, raise_timeout, shared=False)

    # -- registration -----------------------------------------------------------------------

    def register(
        self, kind: ErrorKind, action: HealingAction, *, replace: bool = False, shared: bool = True
    ) -> Callable[[], None]:
        """Add ``action`` for ``kind`` (after existing ones, or instead of them with
        ``replace=True``); returns a function that removes it again.

        ``shared=True``: concurrent heals for one service share a single run of the action.
        Pass ``shared=False`` for actions that edit ``HealingContext.context``, whose effect
        belongs to one call only."""
        if not isinstance(kind, ErrorKind):
            raise TypeError(f"kind must be an ErrorKind such as ErrorKind.CONNECTION, got {kind!r}")
        if not callable(action):
            raise TypeError(f"a healing action must be callable, got {action!r}")
        with self._lock:
            current = () if replace else self._actions.get(kind, ())
            self._actions[kind] = (*current, action)
            if not shared:
                self._unshared.add(id(action))

        def unregister() -> None:
            with self._lock:
                left = tuple(a for a in self._actions.get(kind, ()) if a is not action)
                if left:
                    self._actions[kind] = left
                else:
                    self._actions.pop(kind, None)
                if not any(action in actions for actions in self._actions.values()):
                    self._unshared.discard(id(action))

        return unregister

    def register_reconnect(self, service_id: str, callback: Callback) -> None:
        """The reconnect callback (sync or async, no arguments) for one service."""
        if not callable(callback):
            raise TypeError(f"reconnect callback must be callable, got {callback!r}")
        with self._lock:
            self._reconnects[service_id] = callback

    def register_cache_clearer(self, callback: Callback) -> None:
        """A callback (sync or async, no arguments) run when memory runs out."""
        if not callable(callback):
            raise TypeError(f"cache clearer must be callable, got {callback!r}")
        with self._lock:
            self._cache_clearers = (*self._cache_clearers, callback)

    def actions_for(self, kind: ErrorKind) -> tuple[HealingAction, ...]:
        return self._actions.get(kind, ())

    def heals(self, kind: ErrorKind) -> bool:
        """Whether any action is registered for ``kind``."""
        return bool(self._actions.get(kind))

    def reconnect_callback(self, service_id: str) -> Callback | None:
        return self._reconnects.get(service_id)

    @property
    def cache_clearers(self) -> tuple[Callback, ...]:
        return self._cache_clearers

    # -- running ------------------------------------------------------------------------------

    async def heal(
        self,
        error: BaseException,
        info: ErrorInfo,
        *,
        service_id: str = "default",
        context: Mapping[str, Any] | None = None,
    ) -> HealingReport:
        """Run every action for ``info.kind``; never raises for an action's failure."""
        report = HealingReport(context=dict(context or {}))
        healing = HealingContext(service_id, error, info, report.context, self)
        for action in self.actions_for(info.kind):
            result = await self._run_shared(action, healing)
            report.results.append(result)
            _record(result, service_id)
        return report

    async def _run_shared(self, action: HealingAction, healing: HealingContext) -> HealResult:
        # Single flight per (action, service) across threads and loops: concurrent failures
        # of the same dependency share one remediation. Joiners get the owner's result; if
        # the owner is cancelled, joiners in its loop see "failed" rather than a cancellation
        # that was never theirs, and a joiner in another loop runs the action itself, as it
        # does when the owner's loop is stopped or held by other code, or after max_timeout.
        if id(action) in self._unshared:
            return await _run_one(action, healing)
        key: tuple[Hashable, ...] = (id(action), healing.service_id)
        own = healing.context.get("reconnect") if action is reconnect else None
        if own is not None:
            # The caller's own reconnect (``context["reconnect"]=conn.reconnect``): shared
            # only with callers passing the same one. Sharing by service alone ran the first
            # caller's and told the others their connection was reconnected.
            try:
                hash(own)
            except TypeError:  # not hashable: nothing to share it by
                return await _run_one(action, healing)
            key = (*key, own)
        return await self._flights.run(
            key,
            lambda: _run_one(action, healing),
            HealResult(_name(action), "failed", "cancelled before it finished"),
            patience=self.max_timeout,
        )

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(k.value for k in self._actions))
        return f"HealingRegistry(kinds=[{kinds}], max_timeout={self.max_timeout})"


async def _resolve(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _name(action: object) -> str:
    return str(getattr(action, "__name__", None) or type(action).__name__)


async def _run_one(action: HealingAction, healing: HealingContext) -> HealResult:
    name = _name(action)
    try:
        value = await _resolve(action(healing))
    except Exception as exc:
        detail = _describe(exc)
        _log.warning(
            "otel_recovery: healing action %s for service %r failed: %s",
            name,
            healing.service_id,
            detail,
        )
        return HealResult(name, "failed", detail)
    if isinstance(value, HealResult):
        return value
    return HealResult(name, "success")


def _describe(exc: BaseException) -> str:
    text = redact(str(exc))
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return described[:_MAX_DETAIL]


def _record(result: HealResult, service_id: str) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            EVENT_SELF_HEAL,
            {
                HEAL_ACTION: result.action,
                HEAL_OUTCOME: result.outcome,
                HEAL_DETAIL: redact(result.detail)[:_MAX_DETAIL],
                SERVICE_ID: service_id,
            },
        )


# -- built-in actions ---------------------------------------------------------------------------


async def reconnect(healing: HealingContext) -> HealResult:
    """CONNECTION and SHUTDOWN: run the context's ``reconnect`` callback, else the service's
    registered one."""
    callback = healing.context.get("reconnect") or healing.registry.reconnect_callback(
        healing.service_id
    )
    if callback is None:
        return HealResult("reconnect", "skipped", "no reconnect callback")
    if not callable(callback):
        return HealResult(
            "reconnect", "failed", f"context['reconnect'] is not callable: {callback!r}"
        )
    result = await _run_one(_named("reconnect", callback), healing)
    return result


async def clear_caches(healing: HealingContext) -> HealResult:
    """MEMORY: run every registered cache clearer (each failure recorded), then collect."""
    failures: list[str] = []
    clearers = healing.registry.cache_clearers
    for clearer in clearers:
        result = await _run_one(_named(_name(clearer), clearer), healing)
        if result.outcome == "failed":
            failures.append(f"{result.action}: {result.detail}")
    collected = gc.collect()
    detail = f"ran {len(clearers)} cache clearer(s); gc collected {collected} object(s)"
    if failures:
        return HealResult("clear_caches", "failed", f"{detail}; failed: {'; '.join(failures)}")
    return HealResult("clear_caches", "success", detail)


def raise_timeout(healing: HealingContext) -> HealResult:
    """TIMEOUT: double ``context["timeout"]``, capped at the registry's ``max_timeout``."""
    current = healing.context.get("timeout")
    if current is None:
        return HealResult("raise_timeout", "skipped", "no timeout in context")
    try:
        seconds = to_seconds(current, "context['timeout']")
    except (TypeError, ValueError) as exc:
        return HealResult("raise_timeout", "failed", str(exc))
    raised = min(seconds * 2, healing.registry.max_timeout)
    healing.context["timeout"] = raised
    return HealResult("raise_timeout", "success", f"timeout {seconds:g}s -> {raised:g}s")


def _named(name: str, callback: Callback) -> HealingAction:
    """Adapt a no-argument callback to the action signature, under a readable name."""

    def action(_: HealingContext) -> Any:
        return _ignore_result(callback())

    action.__name__ = name
    return action


async def _ignore_result(value: Any) -> None:
    await _resolve(value)
