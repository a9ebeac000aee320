"""The levels each setting may be set at: the whole service, a target, an operation.

Where a key may be set follows from where the instrumentors read it:

- for the whole service only (environment, top level of the file, keyword arguments):
  ``enabled`` and ``learning`` (read once by each instrumentor: one switch, one learner) and
  ``sql_retry`` (read once by the PostgreSQL instrumentors, for every connection);
- also per target (``[targets."host"]``): ``breaker_*`` and ``budget_*`` (one circuit
  breaker and one retry budget per target) and ``redis_retry_commands``,
  ``redis_no_retry_commands``, ``redis_retry_refused`` (one Redis server's command rules);
- also per operation: the rest (attempts, backoff, deadline, attempt timeout, Retry-After
  cap, fallback value, the ``http_retry_*`` rules).

A key where it would have no effect is an error that names where it belongs, as are an
unknown key, an ``operations`` table at the top level or inside an operation, and a
``targets`` table inside a section. The keyword arguments to ``instrument()`` are checked
here too (the level ``arguments``), so a misplaced or misspelt key is refused with the same
message from every source. Converting each value is :mod:`._setting_values`; the settings'
defaults come in as a parameter (``defaults``: each setting's default by name,
:data:`._settings._DEFAULTS`), so this module does not import :mod:`._settings`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from otel_recovery.instrumentors._setting_values import ENV_PREFIX, SettingsError, convert

__all__ = ["checked_values"]

_SERVICE_ONLY = {
    "enabled": "one switch per instrumentor",
    "learning": "one learner per instrumentor",
    "sql_retry": "one rule for every PostgreSQL connection",
}
_PER_TARGET_PREFIXES = ("breaker_", "budget_")
_PER_TARGET = frozenset({"redis_retry_commands", "redis_no_retry_commands", "redis_retry_refused"})
"""With every setting named ``breaker_*`` or ``budget_*`` (:func:`_per_target`): set for the
service or per target, never in an operation section."""


def _per_target(key: str) -> bool:
    """Whether the known setting ``key`` is per target (never in an operation section)."""
    return key in _PER_TARGET or key.startswith(_PER_TARGET_PREFIXES)


def checked_values(
    values: Mapping[str, Any],
    where: str,
    level: str,
    target: str = "",
    *,
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """``values`` converted, each checked to be a setting that has an effect at ``level``:
    ``arguments``, ``service`` (the file's top level), ``target`` or ``operation``."""
    converted: dict[str, Any] = {}
    for key, raw in values.items():
        _check_place(key, where, level, target, defaults)
        converted[key] = convert(key, raw, where, defaults[key])
    return converted


def _check_place(
    key: str, where: str, level: str, target: str, defaults: Mapping[str, Any]
) -> None:
    """Raise when ``key`` is unknown or has no effect at ``level`` (the module docstring);
    ``defaults`` names every known setting."""
    ours = level == "arguments"
    section = f'[targets."{target}"]'
    if key == "operations" and level == "service":
        problem = (
            f"an operations table at the top level of {where}: operation sections belong to "
            'a target, as in [targets."api.example.com".operations."GET /v1/prices"]'
        )
    elif key == "operations" and level == "operation":
        problem = (
            f"{where} holds an operations table: operation sections do not nest; write one "
            f'{section[:-1]}.operations."<operation>"] section per operation'
        )
    elif key == "targets" and level in ("target", "operation"):
        problem = (
            f"{where} holds a targets table: target sections go at the top level of the "
            'policy file, as [targets."api.example.com"]'
        )
    elif key not in defaults:
        settable = sorted(defaults)
        extra = {"service": ["targets"], "target": ["operations"]}.get(level, [])
        close = difflib.get_close_matches(str(key), [*settable, *extra], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if ours and key in ("targets", "operations"):
            hint = " (target and operation sections come from the policy file only)"
        problem = f"unknown setting {key!r} in {where}{hint}; known settings: {', '.join(settable)}"
    elif key in _SERVICE_ONLY and level in ("target", "operation"):
        problem = (
            f"{key} in {where}: {key} applies to the whole service ({_SERVICE_ONLY[key]}): "
            f"set it at the top level of the policy file, or in {ENV_PREFIX}{key.upper()}"
        )
    elif _per_target(key) and level == "operation":
        what = (
            f"{key} is per target (one Redis server's command rules)"
            if key.startswith("redis_")
            else "breaker_* and budget_* settings are per target (one circuit breaker and "
            "one retry budget per target)"
        )
        problem = f"{key} in {where}: {what}: set it in {section}, not in an operation section"
    else:
        return
    raise SettingsError(problem, from_arguments=ours)
