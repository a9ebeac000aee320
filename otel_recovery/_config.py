"""Process-wide switches: recovery on/off and testing mode (stamina's ``set_testing`` idea).

Drivers read :data:`SWITCHES` once per call; it is a plain slotted object so that read is a
couple of attribute loads on the happy path. Changes go through the functions here, which
return context managers that restore the previous state, so a test can never leak a switch
into the next one.

``OTEL_RECOVERY_ENABLED`` is read here, once, at import. A value that is not a boolean
(``flase``) does not stop the program: the environment reaches every process a deployment
starts, and importing otel_recovery must never be what fails. It is logged once as an error
on logger ``otel_recovery`` naming the accepted values, and taken as false: the user was
reaching for the switch, and off is the state in which otel-recovery changes nothing.
"""

from __future__ import annotations

import logging
import os

from otel_recovery._first_times import FirstTimes
from otel_recovery._forksafe import new_lock

__all__ = [
    "ENABLED_VARIABLE",
    "SWITCHES",
    "Switches",
    "env_flag",
    "flag_value",
    "is_active",
    "is_testing",
    "set_active",
    "set_testing",
    "switch_value",
]

ENABLED_VARIABLE = "OTEL_RECOVERY_ENABLED"


class Switches:
    """The global switches. ``max_attempts`` is only meaningful while ``testing`` is on."""

    __slots__ = ("active", "max_attempts", "testing")

    def __init__(self) -> None:
        self.active = switch_value(os.environ.get(ENABLED_VARIABLE))
        self.testing = False
        self.max_attempts = 1


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_log = logging.getLogger("otel_recovery")
_reported = FirstTimes()


def env_flag(name: str, *, default: bool, invalid: bool | None = None) -> bool:
    """Read a boolean environment setting: ``default`` when unset or empty.

    A value that is not a boolean never raises (it would stop the importing program): it is
    logged once as an error naming the accepted values and taken as ``invalid``, which is
    ``default`` unless given.
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return flag_value(name, raw, invalid=default if invalid is None else invalid)


def flag_value(name: str, raw: str, *, invalid: bool) -> bool:
    """``raw`` (the value of variable ``name``) as a boolean; not one: logged, ``invalid``."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    message = (
        f"{name}={raw!r} is not valid: expected one of true, false, 1, 0, yes, no, on, off; "
        f"it is taken as {'true' if invalid else 'false'}"
    )
    if name == ENABLED_VARIABLE and not invalid:
        message += ": otel-recovery is off (it changes nothing) until the value is fixed"
    if _reported.first(message):
        _log.error("%s", message)
    return invalid


def switch_value(raw: str | None) -> bool:
    """The value of ``OTEL_RECOVERY_ENABLED`` (``raw``, None when unset): on when unset or
    empty; not a boolean: logged once and taken as false (see the module docstring)."""
    if raw is None or raw.strip() == "":
        return True
    return flag_value(ENABLED_VARIABLE, raw, invalid=False)


SWITCHES = Switches()
_lock = new_lock()


def is_active() -> bool:
    """Whether recovery runs at all; when off, wrapped callables are called exactly once."""
    return SWITCHES.active


def is_testing() -> bool:
    """Whether testing mode is on (see :func:`set_testing`)."""
    return SWITCHES.testing


def set_active(active: bool) -> _RestoringContext:
    """Turn recovery on or off for the whole process.

    Usable as a plain call or as ``with set_active(False): ...``, which restores the
    previous value on exit.
    """
    if not isinstance(active, bool):
        raise TypeError(f"set_active() takes True or False, got {active!r}")
    with _lock:
        previous = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
        SWITCHES.active = active
    return _RestoringContext(previous)


def set_testing(testing: bool, *, attempts: int = 1) -> _RestoringContext:
    """Testing mode: no backoff sleeps, and at most ``attempts`` attempts per call.

    Tests of code that uses ``@recover`` then run instantly and deterministically while
    still exercising the retry path (``attempts=2`` proves a retry happens).
    """
    if not isinstance(testing, bool):
        raise TypeError(f"set_testing() takes True or False, got {testing!r}")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
    with _lock:
        previous = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
        SWITCHES.testing = testing
        SWITCHES.max_attempts = attempts
    return _RestoringContext(previous)


class _RestoringContext:
    """Returned by the setters: ignorable, or a ``with`` block that restores the old state."""

    __slots__ = ("_previous",)

    def __init__(self, previous: tuple[bool, bool, int]) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        with _lock:
            SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts = self._previous
