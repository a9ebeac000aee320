"""Instrumentor settings: environment, policy file, and ``instrument(**kwargs)``, in that order.

Under ``opentelemetry-instrument`` no keyword arguments reach ``instrument()``, so every
setting has an ``OTEL_RECOVERY_*`` variable. ``OTEL_RECOVERY_CONFIG`` names a policy file
(TOML, or JSON when its name ends in ``.json``) with the same keys in lower case, plus
per-target and per-operation sections::

    max_attempts = 3

    [targets."api.example.com"]          # a host, or host:port ([::1]:5432 for IPv6)
    max_attempts = 5

    [targets."api.example.com".operations."GET /v1/prices"]
    fallback_value = []

Precedence, lowest first: the defaults, the environment, the file's top level, its
``[targets."host"]`` section and that section's operation section, its
``[targets."host:port"]`` section and that one's operation section, and last the keyword
arguments to ``instrument()``, which win over every level of the file: a target section's
``max_attempts = 5`` does not undo ``instrument(max_attempts=1)``, while it does beat
``OTEL_RECOVERY_MAX_ATTEMPTS``, which is service-wide.

This module layers those sources into :class:`RecoverySettings` for the instrumentors.
Converting and checking one value is :mod:`._setting_values` (the accepted types, bounds
and lists); checking where each key may be set (the whole service, a target, an operation)
is :mod:`._setting_levels`; reading the policy file is :mod:`._policy_file`, the targets
each of its sections stands for :mod:`._target_keys`, and the settings that may not exceed
another :mod:`._ordered_settings`. A key where it would have no effect is an error that
names where it belongs.

What a bad value does depends on whose it is. In the keyword arguments to ``instrument()``,
the program's own call, it raises :class:`SettingsError` (``from_arguments`` set). From the
environment or the policy file, :func:`load_settings` raises it too, but the instrumentor
catches it (:func:`report_off`): one ERROR line on logger ``otel_recovery.instrumentors``
names the setting, where it came from and the accepted values, and otel-recovery stays off,
patching nothing, never stopping the application or another instrumentation. A typo must
not silently turn into "no recovery" or "retry everything", nor take the service down.
``OTEL_RECOVERY_ENABLED`` that is not a boolean is logged and taken as false
(:mod:`otel_recovery._config`). An ``OTEL_RECOVERY_*`` variable that nothing reads is logged
as a warning, with the closest name that exists, and ignored: environments are shared by
every process a deployment starts, and a variable meant for a newer otel-recovery must not
stop an older one.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from otel_recovery._config import switch_value
from otel_recovery.instrumentors._ordered_settings import Layers, check_orders
from otel_recovery.instrumentors._policy_file import read_policy
from otel_recovery.instrumentors._setting_levels import checked_values
from otel_recovery.instrumentors._setting_values import (
    ARGUMENTS,
    ENV_PREFIX,
    SettingsError,
    _warn_once,
    convert,
    log_once,
)
from otel_recovery.instrumentors._target_keys import sentinel_service

__all__ = [
    "ENV_PREFIX",
    "RecoverySettings",
    "SettingsError",
    "load_settings",
    "report_off",
    "section_keys",
]


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
    """The policy file's target sections, values converted; each may hold ``operations``."""
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """The keyword arguments to ``instrument()``, converted: :meth:`for_target` applies them
    after the file's sections, so they win over every level of the file."""

    def for_target(self, host: str, port: int | None, operation: str | None) -> RecoverySettings:
        """The settings for one target (``host:port`` beats ``host``) and operation."""
        changes: dict[str, Any] = {}
        for section in self._sections(host, port):
            changes.update((name, value) for name, value in section.items() if name in _FIELDS)
            if operation:
                changes.update(section.get("operations", {}).get(operation, {}))
        if not changes:
            return self
        changes.update(self.arguments)
        if "fallback_value" in changes:
            changes["has_fallback"] = True
        return replace(self, **changes)

    def names_fallback(self, host: str, port: int | None, operation: str | None) -> bool:
        """Whether the policy file gives ``operation`` at this target a fallback of its own:
        only such a fallback answers for a call that may not be repeated (a POST, an INCR),
        whose failure may have changed the server's data. A fallback set for a whole target
        or service is for reads, so it does not hide a failed write."""
        return bool(operation) and any(
            "fallback_value" in section.get("operations", {}).get(operation, {})
            for section in self._sections(host, port)
        )

    def _sections(self, host: str, port: int | None) -> list[Mapping[str, Any]]:
        """The policy file's sections for a target, least specific first (:func:`section_keys`)."""
        return [section for key in section_keys(host, port) if (section := self.targets.get(key))]


def section_keys(host: str, port: int | None) -> tuple[str, ...]:
    """The keys of the policy file's sections for a target, least specific first: ``host``,
    then ``host:port``. A Redis Sentinel service's name carries its deployment
    (``mymaster replicas@<sentinels>``): a section for the service's name alone
    (``mymaster replicas``) comes before it, for every deployment's. The file's keys are
    found under each spelling of their target (:func:`._target_keys.target_spellings`), so
    a call's own ``host`` is looked up as it is."""
    keys = (host, f"{host}:{port}") if port is not None else (host,)
    if "@" in host and (service := sentinel_service(host)):
        return (service, *keys)
    return keys


_FIELDS = {f.name: f for f in fields(RecoverySettings)}
_NOT_SETTABLE = {"has_fallback", "targets", "arguments"}
_SETTABLE = sorted(set(_FIELDS) - _NOT_SETTABLE)
_DEFAULTS = {name: getattr(RecoverySettings(), name) for name in _SETTABLE}
_OTHER_VARIABLES = frozenset(
    {"CONFIG", "NO_EXTENSIONS", "STORE_URL", "CHECKPOINT_MAX_BYTES", "BENCH_PG"}
)
"""``OTEL_RECOVERY_*`` variables read elsewhere: the policy file (here), the switch for the
compiled extension (``_compiled``), the state store (``stores``), the checkpoint size limit
(``checkpoint``), the database of ``benchmarks/layer_cost.py``."""


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _SETTABLE:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or not raw.strip():
            # the OpenTelemetry rule: an empty variable means the same as an unset one
            continue
        if name == "enabled":
            # not a boolean: logged and taken as false, as at import (otel_recovery._config)
            values[name] = switch_value(raw)
        else:
            values[name] = convert(name, raw, "env", _DEFAULTS[name])
    return values


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``OTEL_RECOVERY_*`` variables in ``environ`` that nothing reads, each with the
    closest name that exists (None when none is close), sorted. Names are compared without
    the shared prefix, which would make every name look close to every other."""
    known = {name.upper() for name in _SETTABLE} | _OTHER_VARIABLES
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
        hint = f"; did you mean {close}?" if close else ""
        _warn_once(f"{name} is not an otel-recovery setting and is ignored{hint}")


def report_off(error: SettingsError) -> None:
    """Log a bad setting from the environment or the policy file, once per process (every
    instrumentor meets it): the instrumentors stay off, and nothing else is affected."""
    message = (
        f"{error}. otel-recovery stays off (it patches nothing) until this is fixed; the "
        "application and the other instrumentations run as usual"
    )
    log_once(logging.ERROR, message)


def load_settings(
    kwargs: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> RecoverySettings:
    """Settings from the environment, then the policy file, then keyword arguments (see the
    module docstring). Raises :class:`SettingsError`; ``from_arguments`` tells whose."""
    env = os.environ if environ is None else environ
    # the caller's own mistakes first
    arguments = checked_values(kwargs or {}, ARGUMENTS, "arguments", defaults=_DEFAULTS)
    _warn_unknown(env)
    layers: Layers = [("env", _from_env(env))]
    targets: dict[str, dict[str, Any]] = {}
    path = env.get(ENV_PREFIX + "CONFIG")
    if path is not None and not path.strip():
        path = None  # empty: unset, as for every variable
    if path:
        top, targets = read_policy(path, _DEFAULTS)
        layers.append((f"policy file {path}", top))
    check_orders(layers, arguments, targets, path or "", _DEFAULTS)
    values: dict[str, Any] = {}
    for _, level in [*layers, (ARGUMENTS, arguments)]:
        values.update(level)
    if "fallback_value" in values:
        values["has_fallback"] = True
    return RecoverySettings(**values, targets=targets, arguments=arguments)
