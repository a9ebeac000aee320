"""Instrumentor settings: environment, policy file, and ``instrument(**kwargs)``, in that order.

Under ``opentelemetry-instrument`` no keyword arguments reach ``instrument()``, so every
setting has an ``OTEL_RECOVERY_*`` variable. ``OTEL_RECOVERY_CONFIG`` names a policy file
(TOML, or JSON by extension) with the same keys in lower case, plus per-target and
per-operation sections::

    max_attempts = 3

    [targets."api.example.com"]          # a host, or host:port
    max_attempts = 5

    [targets."api.example.com".operations."GET /v1/prices"]
    fallback_value = []

Keyword arguments to ``instrument()`` win over both. A bad value fails at start-up with a
message naming the setting, where it came from and the accepted values: a typo must not
silently turn into "no recovery" (or "retry everything"). So does an unknown key in the
policy file. An ``OTEL_RECOVERY_*`` variable that nothing reads is logged as a warning, with
the closest name that exists, and ignored: environments are shared by every process a
deployment starts, and a variable meant for a newer otel-recovery must not stop an older one.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from otel_recovery._forksafe import new_lock

__all__ = ["ENV_PREFIX", "RecoverySettings", "SettingsError", "load_settings"]

ENV_PREFIX = "OTEL_RECOVERY_"


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the setting and the fix."""


def _statuses(value: Any) -> frozenset[int]:
    """A comma-separated string or a list of HTTP status codes."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return frozenset(int(str(item).strip()) for item in items if str(item).strip())


def _names(value: Any) -> frozenset[str]:
    """A comma-separated string or a list, upper-cased (HTTP methods, Redis commands)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return frozenset(str(item).strip().upper() for item in items if str(item).strip())


@dataclass(frozen=True)
class RecoverySettings:
    """Everything an instrumentor needs to build its per-target policies.

    Defaults are safe for a service that never read our docs: at most 3 attempts, retries
    capped at 10 % of calls (plus one per second), only idempotent operations retried.
    """

    enabled: bool = True
    max_attempts: int = 3
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    deadline: float | None = None
    attempt_timeout: float | None = None
    retry_after_cap: float = 30.0
    budget_ratio: float = 0.1
    budget_min_per_second: float = 1.0
    breaker_failure_rate: float = 0.5
    breaker_window: int = 50
    breaker_minimum_calls: int = 20
    breaker_open_seconds: float = 30.0
    breaker_half_open_calls: int = 1
    http_retry_methods: frozenset[str] = frozenset(
        {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
    )
    http_retry_idempotency_key: bool = True
    http_retry_unsent: bool = True
    """Send a request that may not be repeated (a POST) again when its connection could not
    be made (refused, unreachable, DNS, connect timeout): it never left the client. Only
    replayable bodies, as for every retry; ``False`` keeps to the method rules alone."""
    http_retry_statuses: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
    """Responses with these statuses are failures: retried when the request may be repeated
    (the final one is still returned to the application), counted by the breaker."""
    redis_retry_commands: frozenset[str] = frozenset()
    """Added to the built-in list of read and idempotent commands."""
    redis_no_retry_commands: frozenset[str] = frozenset()
    """Removed from it."""
    redis_retry_refused: bool = True
    """Send a single command again, whatever it is, when the failure proves it never ran
    and answered its only send: the server refused it (``READONLY``, ``LOADING``,
    ``MASTERDOWN``) or its connection could not be made; ``False`` keeps to the command
    lists alone."""
    learning: str = "off"
    """``off``; ``shadow``: a StrategyLearner learns from every retry decision but the rules
    decide; ``on``: it also advises, per failure, whether one more retry is worth it."""
    sql_retry: str = "connect"
    """``connect``: retry only failures before the statement could have run; ``never``."""
    fallback_value: Any = None
    has_fallback: bool = False
    targets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_target(self, host: str, port: int | None, operation: str | None) -> RecoverySettings:
        """The settings for one target (``host:port`` beats ``host``) and operation."""
        result = self
        for key in (host, f"{host}:{port}" if port is not None else None):
            section = self.targets.get(key) if key else None
            if section:
                result = _merge(result, section, f"targets.{key}")
                operations = section.get("operations", {})
                if operation and operation in operations:
                    result = _merge(
                        result, operations[operation], f"targets.{key}.operations.{operation}"
                    )
        return result

    def names_fallback(self, host: str, port: int | None, operation: str | None) -> bool:
        """Whether the policy file gives ``operation`` at this target a fallback of its own:
        only such a fallback answers for a call that may not be repeated (a POST, an INCR),
        whose failure may have changed the server's data. A fallback set for a whole target
        or service is for reads, so it does not hide a failed write."""
        if not operation:
            return False
        for key in (host, f"{host}:{port}" if port is not None else None):
            section = self.targets.get(key) if key else None
            operations = section.get("operations", {}) if section else {}
            if "fallback_value" in operations.get(operation, {}):
                return True
        return False


_COERCE: dict[str, Callable[[Any], Any]] = {
    "http_retry_methods": _names,
    "http_retry_statuses": _statuses,
    "redis_retry_commands": _names,
    "redis_no_retry_commands": _names,
}
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_attempts": (lambda v: isinstance(v, int) and 1 <= v <= 20, "an integer from 1 to 20"),
    "backoff_initial": (lambda v: 0 <= v <= 60, "seconds from 0 to 60"),
    "backoff_max": (lambda v: 0 <= v <= 600, "seconds from 0 to 600"),
    "deadline": (lambda v: v is None or v > 0, "seconds > 0"),
    "attempt_timeout": (lambda v: v is None or v > 0, "seconds > 0"),
    "retry_after_cap": (lambda v: v >= 0, "seconds >= 0"),
    "budget_ratio": (lambda v: 0 <= v <= 1, "a ratio from 0 to 1 (0.1 = 10 %)"),
    "budget_min_per_second": (lambda v: v >= 0, "a number >= 0"),
    "breaker_failure_rate": (lambda v: 0 < v <= 1, "a ratio in (0, 1]"),
    "breaker_window": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "breaker_minimum_calls": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "breaker_open_seconds": (lambda v: v > 0, "seconds > 0"),
    "breaker_half_open_calls": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "sql_retry": (lambda v: v in ("connect", "never"), "'connect' or 'never'"),
    "learning": (lambda v: v in ("off", "shadow", "on"), "'off', 'shadow' or 'on'"),
    "http_retry_statuses": (
        lambda v: all(100 <= status <= 599 for status in v),
        "a comma-separated list of HTTP status codes (100-599)",
    ),
}
_FIELDS = {f.name: f for f in fields(RecoverySettings)}
_NOT_SETTABLE = {"has_fallback", "targets"}
_OTHER_VARIABLES = frozenset(
    {"CONFIG", "NO_EXTENSIONS", "STORE_URL", "CHECKPOINT_MAX_BYTES", "BENCH_PG"}
)
"""``OTEL_RECOVERY_*`` variables read elsewhere: the policy file (here), the switch for the
compiled extension (``_compiled``), the state store (``stores``), the checkpoint size limit
(``checkpoint``), the database of ``benchmarks/layer_cost.py``."""
_log = logging.getLogger("otel_recovery.instrumentors")
_warned: set[str] = set()
_warned_lock = new_lock()


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value (env string, file value, kwarg) into the field's type, or explain."""
    current = getattr(RecoverySettings(), name)
    try:
        if name in _COERCE:
            value = _COERCE[name](raw)
        elif name == "fallback_value":
            value = json.loads(raw) if isinstance(raw, str) and source.startswith("env") else raw
        elif isinstance(current, bool):
            value = _boolean(raw)
        elif isinstance(current, int):
            value = int(raw)
            if isinstance(raw, float) and raw != value:
                raise ValueError(raw)
        elif isinstance(current, float) or current is None:
            if current is None and (raw is None or str(raw).strip().lower() in ("", "none")):
                value = None
            else:
                value = float(raw)
        else:
            value = str(raw).strip().lower()
    except (TypeError, ValueError) as error:
        raise SettingsError(
            f"{_label(name, source)}={raw!r} is not valid: {_expected(name, current)}"
        ) from error
    check = _CHECKS.get(name)
    if check is not None and not check[0](value):
        raise SettingsError(f"{_label(name, source)}={raw!r} is not valid: expected {check[1]}")
    return value


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _expected(name: str, current: Any) -> str:
    if name in _CHECKS:
        return f"expected {_CHECKS[name][1]}"
    if isinstance(current, bool):
        return "expected true or false"
    if isinstance(current, frozenset):
        return "expected a comma-separated list"
    return f"expected a {type(current).__name__}"


def _label(name: str, source: str) -> str:
    if source == "env":
        return ENV_PREFIX + name.upper()
    return f"{name} (from {source})"


def _merge(base: RecoverySettings, values: Mapping[str, Any], source: str) -> RecoverySettings:
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key == "operations" and source.startswith(("targets.", "config")):
            continue
        if key not in _FIELDS or key in _NOT_SETTABLE:
            known = ", ".join(sorted(set(_FIELDS) - _NOT_SETTABLE))
            raise SettingsError(f"unknown setting {key!r} in {source}; known settings: {known}")
        changes[key] = _convert(key, raw, source)
        if key == "fallback_value":
            changes["has_fallback"] = True
    return replace(base, **changes)


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} cannot be read ({error.strerror}); "
            "point it at a TOML or JSON policy file, or unset it"
        ) from error
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else _toml_loads(text)
    except Exception as error:
        raise SettingsError(f"OTEL_RECOVERY_CONFIG={path!r} is not valid: {error}") from error
    if not isinstance(data, dict):
        raise SettingsError(f"OTEL_RECOVERY_CONFIG={path!r} must hold a table of settings")
    return data


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomli backport is a declared dependency there
        import tomli as tomllib
    loaded: dict[str, Any] = tomllib.loads(text)
    return loaded


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``OTEL_RECOVERY_*`` variables in ``environ`` that nothing reads, each with the
    closest name that exists (None when none is close), sorted. Names are compared without
    the shared prefix, which would make every name look close to every other."""
    known = {name.upper() for name in _FIELDS if name not in _NOT_SETTABLE} | _OTHER_VARIABLES
    unknown = []
    for name in sorted(environ):
        suffix = name[len(ENV_PREFIX) :]
        if name.startswith(ENV_PREFIX) and suffix not in known:
            close = difflib.get_close_matches(suffix, known, n=1)
            unknown.append((name, ENV_PREFIX + close[0] if close else None))
    return unknown


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """Log each unknown variable once per process (every instrumentor loads the settings)."""
    for name, close in unknown_variables(environ):
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        hint = f"; did you mean {close}?" if close else ""
        _log.warning("%s is not an otel-recovery setting and is ignored%s", name, hint)


def load_settings(
    kwargs: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> RecoverySettings:
    """Settings from the environment, then the policy file, then keyword arguments."""
    env = os.environ if environ is None else environ
    _warn_unknown(env)
    settings = RecoverySettings()
    from_env = {
        name: env[ENV_PREFIX + name.upper()]
        for name in _FIELDS
        if name not in _NOT_SETTABLE and ENV_PREFIX + name.upper() in env
    }
    settings = _merge(settings, from_env, "env")
    path = env.get(ENV_PREFIX + "CONFIG")
    if path:
        data = _read_file(path)
        targets = data.pop("targets", {})
        if not isinstance(targets, dict):
            raise SettingsError(f"'targets' in {path} must be a table of host sections")
        settings = _merge(settings, data, f"config {path}")
        for key, section in targets.items():
            if not isinstance(section, dict):
                raise SettingsError(f"targets.{key} in {path} must be a table")
            _merge(settings, section, f"targets.{key}")  # validate now, apply per call
            for operation, values in section.get("operations", {}).items():
                _merge(settings, values, f"targets.{key}.operations.{operation}")
        settings = replace(settings, targets=targets)
    if kwargs:
        settings = _merge(settings, kwargs, "instrument() keyword arguments")
    return settings
