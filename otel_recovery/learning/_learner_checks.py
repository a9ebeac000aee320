"""What a strategy learner accepts: its constructor's options and each call's arguments, checked.

A learner is configured once, at start-up, and called on every failure; both are places where
a wrong value must fail at once, naming the argument and what it accepts, rather than
surface later as a decision nobody can explain or a snapshot that cannot be saved. These are
the checks behind :class:`~otel_recovery.learning.StrategyLearner`'s errors, kept apart so
the learner module reads as the algorithm. The learner calls them in the order it always
checked its arguments, so a call with several bad ones reports the same one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.learning._decisions import DecisionKey, HardCaps, RewardWeights
from otel_recovery.learning.store import LearnerStore

__all__ = [
    "check_options",
    "check_outcome",
    "check_settings",
    "checked_choice",
    "checked_delay_bounds",
    "checked_half_life",
    "validated_arms",
]


def check_settings(
    caps: HardCaps | None, reward: RewardWeights | None, store: LearnerStore | None
) -> None:
    """Refuse a ``caps``, ``reward`` or ``store`` of the wrong kind, saying what to pass."""
    for setting, value, kind, example in (
        ("caps", caps, HardCaps, "HardCaps(max_retries=2)"),
        ("reward", reward, RewardWeights, "RewardWeights()"),
    ):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{setting} must be a {kind.__name__} such as {example}, got {value!r}")
    if store is not None and not isinstance(store, LearnerStore):
        how = (
            f"CheckpointLearnerStore({store!r})" if isinstance(store, str)
            else "CheckpointLearnerStore(url) or MemoryLearnerStore()"
        )  # fmt: skip
        raise TypeError(
            f"store must be a LearnerStore (load() and save()), such as {how}; got {store!r}"
        )


def checked_half_life(half_life: Duration) -> float:
    """``half_life`` in seconds (``inf``: evidence never fades), checked to be > 0."""
    seconds = to_seconds(half_life, "half_life", allow_inf=True)
    if seconds <= 0:
        raise ValueError(f"half_life must be > 0 seconds, got {half_life!r}")
    return seconds


def check_options(
    *, max_weight: float, prior_strength: float, delay_quantile: float, counts: dict[str, int]
) -> None:
    """Validate the learner's numeric options (a configuration error fails at start-up)."""
    for name, value, low, finite in (
        ("max_weight", max_weight, 2.0, False),  # inf: no cap on the weight
        ("prior_strength", prior_strength, 0.01, True),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value >= low
            or (finite and math.isinf(value))
        ):
            bound = f"a finite number >= {low}" if finite else f"a number >= {low}"
            raise ValueError(f"{name} must be {bound}, got {value!r}")
    if (
        isinstance(delay_quantile, bool)
        or not isinstance(delay_quantile, (int, float))
        or not 0.0 <= delay_quantile <= 1.0
    ):
        raise ValueError(f"delay_quantile must be in [0, 1], got {delay_quantile!r}")
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an int >= 1, got {count!r}")


def checked_delay_bounds(delay_bounds: tuple[Duration, Duration]) -> tuple[float, float]:
    """``delay_bounds`` as a ``(low, high)`` pair of seconds with ``low <= high``."""
    if not isinstance(delay_bounds, (tuple, list)) or len(delay_bounds) != 2:
        raise ValueError(
            f"delay_bounds must be a (low, high) pair of seconds, got {delay_bounds!r}"
        )
    low_delay = to_seconds(delay_bounds[0], "delay_bounds[0]")
    high_delay = to_seconds(delay_bounds[1], "delay_bounds[1]")
    if high_delay < low_delay:
        raise ValueError(f"delay_bounds must be (low, high) with low <= high, got {delay_bounds}")
    return low_delay, high_delay


def validated_arms(allowed: Mapping[str, int]) -> dict[str, int]:
    """``allowed`` as plain ``{arm name: retries}``, checked; giving up must be among them."""
    if not isinstance(allowed, Mapping) or not allowed:
        raise ValueError("allowed must be a non-empty mapping of arm name -> retries it may spend")
    arms: dict[str, int] = {}
    for arm, retries in allowed.items():
        if not isinstance(arm, str):
            raise TypeError(f"arm names must be str, got {arm!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries for arm {arm!r} must be an int >= 0, got {retries!r}")
        # A str-valued Enum (RecoveryAction) is stored by its value: snapshots are plain JSON.
        arms[arm.value if isinstance(arm, Enum) else arm] = retries
    if all(n > 0 for n in arms.values()):
        raise ValueError(
            "allowed must include an arm that spends no retry (fail fast or fall back): "
            "the hard caps need something to fall back to"
        )
    return arms


def checked_choice(
    key: DecisionKey,
    allowed: Mapping[str, int],
    default: str | None,
    calls: int | None,
    *,
    shadow: bool,
) -> tuple[dict[str, int], str | None]:
    """``choose()``'s arguments checked: the arms (:func:`validated_arms`) and ``default``
    as an arm name (a str-valued Enum by its value), which a shadow-mode learner needs."""
    if not isinstance(key, DecisionKey):
        raise TypeError(f"key must be a DecisionKey, got {key!r}")
    if calls is not None and (isinstance(calls, bool) or not isinstance(calls, int) or calls < 0):
        raise ValueError(f"calls must be an int >= 0 or None, got {calls!r}")
    arms = validated_arms(allowed)
    if isinstance(default, Enum):
        default = default.value
    if default is not None and default not in arms:
        raise ValueError(f"default {default!r} is not among the allowed arms {sorted(arms)}")
    if shadow and default is None:
        raise ValueError("a shadow-mode learner needs default=: the action that will be taken")
    return arms, default


def check_outcome(*, success: bool, fallback: bool, retries: int, recovery_time: float) -> None:
    """An outcome as ``record()`` and ``observe()`` take it: flags, retries spent, seconds."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    for name, flag in (("success", success), ("fallback", fallback)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if (
        isinstance(recovery_time, bool)
        or not isinstance(recovery_time, (int, float))
        or not recovery_time >= 0
    ):
        raise ValueError(f"recovery_time must be a number of seconds >= 0, got {recovery_time!r}")
