"""Recovery strategies and the rule that picks one for an error.

Public through :mod:`otel_recovery.interaction`, whose docstring has the selection table; the
rule lives here, as a pure function over the classification and a few facts about the call, so
that it can be tested without running a recovery. With a strategy learner, :func:`learned`
lets it choose wherever the rule made an automatic retrying choice; the rule still decides
every forced case (explicit strategy, checkpoint, open circuit, non-retryable errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.classify import ErrorCategory, ErrorInfo, ErrorKind
from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning.strategy import StrategyLearner
from otel_recovery.policies.backoff import Backoff, ExponentialBackoff, refuse_backoff_class

__all__ = [
    "RecoveryAction",
    "RecoveryStrategy",
    "Selection",
    "feed_back",
    "learned",
    "select_action",
]


class RecoveryAction(str, Enum):
    """What to do about a failure. Values are the strings reported in results and spans."""

    RETRY = "retry"
    EXPONENTIAL_BACKOFF = "exponential_backoff"
    CIRCUIT_BREAK = "circuit_break"
    FALLBACK = "fallback"
    CHECKPOINT_RESTORE = "checkpoint_restore"
    TRANSACTION_ROLLBACK = "transaction_rollback"
    SELF_HEAL = "self_heal"
    FAIL_FAST = "fail_fast"
    """Not in the seed: give up at once (answering with the fallback if there is one)."""


@dataclass(frozen=True)
class RecoveryStrategy:
    """An explicit choice of action, overriding automatic selection.

    - ``max_attempts``: calls of ``retry_func`` (the original failure is not counted).
    - ``backoff``: delays between them; RETRY defaults to a fixed 0.1 s, the other retrying
      actions to the interaction's backoff (full-jitter exponential unless configured).
    - ``timeout``: seconds (or a timedelta) allowed for each call of ``retry_func``.
    - ``fallback``: used instead of ``context["fallback_func"]``.
    - ``params``: extra context for the action, overriding same-named context keys
      (``checkpoint_id``, ``checkpoint_version``, ``compensations``, ``retry_on``...).
    """

    action: RecoveryAction
    max_attempts: int = 3
    backoff: Backoff | None = None
    timeout: Duration | None = None
    fallback: Callable[..., Any] | None = None
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        action = self.action
        if not isinstance(action, RecoveryAction):
            try:
                action = RecoveryAction(str(action).lower())
            except ValueError:
                accepted = ", ".join(a.name for a in RecoveryAction)
                raise ValueError(
                    f"action must be a RecoveryAction ({accepted}), got {self.action!r}"
                ) from None
            object.__setattr__(self, "action", action)
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {attempts!r}")
        refuse_backoff_class(self.backoff)
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise TypeError(
                f"backoff must be a Backoff such as ExponentialBackoff(), got {self.backoff!r}"
            )
        if self.timeout is not None:
            seconds = to_seconds(self.timeout, "timeout")
            if seconds <= 0:
                raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
            object.__setattr__(self, "timeout", seconds)
        if self.fallback is not None and not callable(self.fallback):
            raise TypeError(f"fallback must be callable, got {self.fallback!r}")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"params must be a mapping, got {type(self.params).__name__}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __repr__(self) -> str:
        parts = [f"action=RecoveryAction.{self.action.name}", f"max_attempts={self.max_attempts}"]
        for name in ("backoff", "timeout", "fallback"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.params:
            parts.append(f"params={dict(self.params)!r}")
        return f"RecoveryStrategy({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Selection:
    """The chosen action and a short, stable reason (recorded on the span)."""

    action: RecoveryAction
    reason: str


_FAIL_FAST_CATEGORIES = frozenset({ErrorCategory.CONFIGURATION, ErrorCategory.INVALID_REQUEST})
_EXPLICIT_REASONS = frozenset({"explicit", "checkpoint_id"})
_HEAL_EVEN_IF_NOT_RETRYABLE = frozenset({ErrorKind.MEMORY})


def select_action(
    info: ErrorInfo,
    *,
    explicit: RecoveryStrategy | None,
    has_checkpoint: bool,
    circuit_open: bool,
    has_fallback: bool,
    heals: Callable[[ErrorKind], bool],
    retry_on: bool | None = None,
    idempotent: bool = True,
) -> Selection:
    """Pick the action for one failure (the table in :mod:`otel_recovery.interaction`).

    ``retry_on`` is the verdict of the context's ``retry_on`` on the error, which overrides
    the classifier's category and retryability; None when the context has none. A call that
    is not ``idempotent`` (``context["idempotent"] is False``) is never chosen to be made
    again, unless a strategy or a checkpoint was given explicitly."""
    selection = _select(
        info, explicit=explicit, has_checkpoint=has_checkpoint, circuit_open=circuit_open,
        has_fallback=has_fallback, heals=heals, retry_on=retry_on,
    )  # fmt: skip
    if (
        not idempotent
        and selection.action in _REPEATING
        and selection.reason not in _EXPLICIT_REASONS
    ):
        give_up = RecoveryAction.FALLBACK if has_fallback else RecoveryAction.FAIL_FAST
        return Selection(give_up, "not_idempotent")
    return selection


_REPEATING = frozenset(
    {RecoveryAction.RETRY, RecoveryAction.EXPONENTIAL_BACKOFF, RecoveryAction.SELF_HEAL}
)


def _select(
    info: ErrorInfo,
    *,
    explicit: RecoveryStrategy | None,
    has_checkpoint: bool,
    circuit_open: bool,
    has_fallback: bool,
    heals: Callable[[ErrorKind], bool],
    retry_on: bool | None,
) -> Selection:
    give_up = RecoveryAction.FALLBACK if has_fallback else RecoveryAction.FAIL_FAST
    if explicit is not None:
        return Selection(explicit.action, "explicit")
    if has_checkpoint:
        return Selection(RecoveryAction.CHECKPOINT_RESTORE, "checkpoint_id")
    if circuit_open:
        action = RecoveryAction.FALLBACK if has_fallback else RecoveryAction.CIRCUIT_BREAK
        return Selection(action, "circuit_open")
    if retry_on is not None:
        if not retry_on:
            return Selection(give_up, "retry_on")
        if heals(info.kind):
            return Selection(RecoveryAction.SELF_HEAL, f"kind_{info.kind.value}")
        return Selection(RecoveryAction.EXPONENTIAL_BACKOFF, "retry_on")
    if info.category in _FAIL_FAST_CATEGORIES:
        return Selection(give_up, info.category.value)
    if heals(info.kind) and (info.retryable or info.kind in _HEAL_EVEN_IF_NOT_RETRYABLE):
        return Selection(RecoveryAction.SELF_HEAL, f"kind_{info.kind.value}")
    if not info.retryable:
        return Selection(give_up, "not_retryable")
    if info.category is ErrorCategory.RATE_LIMITED:
        return Selection(RecoveryAction.EXPONENTIAL_BACKOFF, "rate_limited")
    return Selection(RecoveryAction.EXPONENTIAL_BACKOFF, "retryable")


_LEARNABLE = frozenset({RecoveryAction.EXPONENTIAL_BACKOFF, RecoveryAction.SELF_HEAL})


def learned(
    learner: StrategyLearner | None,
    static: Selection,
    info: ErrorInfo,
    *,
    service_id: str,
    has_fallback: bool,
    has_retry_func: bool,
    idempotent: bool,
    max_attempts: int,
    backoff: Backoff,
) -> tuple[Selection, Recommendation | None, RecoveryStrategy | None]:
    """Let the learner choose where the rule made an automatic retrying choice.

    Arms are giving up (FALLBACK or FAIL_FAST), RETRY and EXPONENTIAL_BACKOFF (only for a
    retryable error of an idempotent call: ``context["idempotent"] is False`` removes them)
    and SELF_HEAL when the rule picked it. Returns the selection, the recommendation to
    report back with the outcome, and a strategy carrying the learner's retry cap and learned
    backoff (None in shadow mode, where the rule's choice runs unchanged).
    """
    if (
        learner is None
        or not has_retry_func
        or static.reason == "explicit"
        or static.action not in _LEARNABLE
    ):
        return static, None, None
    give_up = RecoveryAction.FALLBACK if has_fallback else RecoveryAction.FAIL_FAST
    arms = {give_up.value: 0}
    if info.retryable and idempotent:
        arms[RecoveryAction.EXPONENTIAL_BACKOFF.value] = max_attempts
        arms[RecoveryAction.RETRY.value] = max_attempts
    if static.action is RecoveryAction.SELF_HEAL and idempotent:
        arms[RecoveryAction.SELF_HEAL.value] = max_attempts
    if len(arms) == 1:
        return Selection(give_up, "not_idempotent"), None, None
    default = static.action.value if static.action.value in arms else give_up.value
    # Each recover_from_error is one call of the dependency, so each decision counts one
    # call for the learner's retry-ratio cap (calls=1): here the cap is relative to the
    # recoveries the learner sees, and a retrying arm reserves its whole allowance.
    rec = learner.choose(DecisionKey.of(service_id, info), arms, default=default, calls=1)
    action = RecoveryAction(rec.action)
    if rec.shadow:
        return static, rec, None
    if action is give_up:
        return Selection(action, "learned"), rec, None
    strategy = RecoveryStrategy(
        action=action,
        max_attempts=max(1, rec.max_retries),
        backoff=(
            learner.backoff(service_id, backoff)
            if action is not RecoveryAction.RETRY and isinstance(backoff, ExponentialBackoff)
            else None
        ),
    )
    return Selection(action, "learned"), rec, strategy


def feed_back(
    learner: StrategyLearner, rec: Recommendation, status: str, calls: int, elapsed: float
) -> dict[str, str]:
    """Report a learned recovery's outcome; a successful retrying one also times the
    dependency (its learned backoff). Returns the keys added to the result dict."""
    learner.record(
        rec,
        success=status == "success",
        retries=calls,
        recovery_time=elapsed,
        fallback=status == "fallback",
    )
    if status == "success" and calls:
        learner.observe_recovery(rec.key.service, elapsed)
    return {"learned_action": rec.learned, "learner_mode": "shadow" if rec.shadow else "active"}
