"""Instrumentor settings: environment, policy file, and ``instrument(**kwargs)``, in that order.

Under ``opentelemetry-instrument`` no keyword arguments reach ``instrument()``, so every
setting has an ``OTEL_RECOVERY_*`` variable. ``OTEL_RECOVERY_CONFIG`` names a policy file
(TOML, or JSON when its name ends in ``.json``) with the same keys in lower case, plus
per-target and per-operation sections::

    max_attempts = 3

    [targets."api.example.com"]          # a host, or host:port
    max_attempts = 5

    [targets."api.example.com".operations."GET /v1/prices"]
    fallback_value = []

Precedence, lowest first: the defaults, the environment, the file's top level, its
``[targets."host"]`` section and that section's operation section, its
``[targets."host:port"]`` section and that one's operation section, and last the keyword
arguments to ``instrument()``, which win over every level of the file: a target section's
``max_attempts = 5`` does not undo ``instrument(max_attempts=1)``, while it does beat
``OTEL_RECOVERY_MAX_ATTEMPTS``, which is service-wide.

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
unknown key, an ``operations`` table at the top level or inside an operation, and a section
that is not a table.

What a bad value does depends on whose it is. In the keyword arguments to ``instrument()``,
the program's own call, it raises :class:`SettingsError` (``from_arguments`` set). From the
environment or the policy file, :func:`load_settings` raises it too, but the instrumentor
catches it (:func:`report_off`): one ERROR line on logger ``otel_recovery.instrumentors``
names the setting, where it came from and the accepted values, and otel-recovery stays off,
patching nothing, never stopping the application or another instrumentation. A typo must
not silently turn into "no recovery" or "retry everything", nor take the service down.
``OTEL_RECOVERY_ENABLED`` that is not a boolean is logged and taken as false
(:mod:`otel_recovery._config`). Every number is finite and bounded (seconds up to a day,
breaker windows up to 100000 calls), every time accepts float seconds or a ``timedelta``,
``backoff_initial`` may not exceed ``backoff_max``. HTTP methods must be RFC 9110 tokens and
Redis command names words (two for a container's subcommand, ``CONFIG GET``); a well-formed
name that is not a standard one is kept, with a warning naming the closest standard name.
An ``OTEL_RECOVERY_*`` variable that nothing reads is logged as a warning, with the closest
name that exists, and ignored: environments are shared by every process a deployment starts,
and a variable meant for a newer otel-recovery must not stop an older one.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from otel_recovery._config import switch_value
from otel_recovery._forksafe import new_lock

__all__ = ["ENV_PREFIX", "RecoverySettings", "SettingsError", "load_settings", "report_off"]

ENV_PREFIX = "OTEL_RECOVERY_"


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the setting, where it came from
    and the fix. ``from_arguments``: the keyword arguments to ``instrument()`` alone are at
    fault (they raise; a bad value from the environment or the file leaves us off)."""

    def __init__(self, message: str, *, from_arguments: bool = False) -> None:
        super().__init__(message)
        self.from_arguments = from_arguments


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
        for key in (host, f"{host}:{port}" if port is not None else None):
            section = self.targets.get(key) if key else None
            if not section:
                continue
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
        if not operation:
            return False
        for key in (host, f"{host}:{port}" if port is not None else None):
            section = self.targets.get(key) if key else None
            operations = section.get("operations", {}) if section else {}
            if "fallback_value" in operations.get(operation, {}):
                return True
        return False


class _BadItemError(ValueError):
    """A value that cannot be converted, with what is wrong with it (a list's item)."""


def _items(value: Any) -> list[str]:
    """A comma-separated string or a list, as stripped non-empty strings."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _statuses(value: Any) -> frozenset[int]:
    """HTTP status codes."""
    return frozenset(int(item) for item in _items(value))


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP method is a token (RFC 9110, section 9.1 and 5.6.2: ``1*tchar``)."""
_STANDARD_METHODS = _words(
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH "  # RFC 9110, RFC 5789
    "PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK"  # WebDAV, RFC 4918
)


def _methods(value: Any) -> frozenset[str]:
    """HTTP methods, upper-cased; one that is not a token cannot be a method."""
    for item in _items(value):
        if not _TOKEN.fullmatch(item):
            raise _BadItemError(
                f"{item!r} is not an HTTP method (one token of letters, digits and "
                "!#$%&'*+-.^_`|~, RFC 9110); separate methods with commas, as in GET,HEAD"
            )
    return frozenset(item.upper() for item in _items(value))


_REDIS_WORD = re.compile(r"[A-Z][A-Z0-9_.]*")
_SPACED_CONTAINERS = _words("DEBUG HOTKEYS LATENCY LOLWUT MODULE SENTINEL SLOWLOG XGROUP")
"""Commands redis-py sends with their subcommand in one argument (``"XGROUP CREATE"``),
besides the containers the Redis instrumentor splits itself."""
_COMMON_WRITES = _words(
    """
    INCR INCRBY INCRBYFLOAT DECR DECRBY APPEND GETSET GETDEL GETEX SETNX MSETNX LPUSH RPUSH
    LPUSHX RPUSHX LPOP RPOP LSET LINSERT LREM LTRIM LMOVE RPOPLPUSH LMPOP SPOP SMOVE
    SINTERSTORE SUNIONSTORE SDIFFSTORE ZINCRBY ZPOPMIN ZPOPMAX ZMPOP ZREMRANGEBYSCORE
    ZREMRANGEBYRANK ZREMRANGEBYLEX ZRANGESTORE ZINTERSTORE ZUNIONSTORE ZDIFFSTORE HINCRBY
    HINCRBYFLOAT HSETNX HGETDEL HGETEX HSETEX HEXPIRE HPEXPIRE HPERSIST XADD XDEL XTRIM XACK
    XCLAIM XAUTOCLAIM XSETID EVAL EVALSHA FCALL PUBLISH SPUBLISH RENAME RENAMENX COPY MOVE
    RESTORE FLUSHDB FLUSHALL SELECT SWAPDB MULTI EXEC DISCARD WATCH UNWATCH BITOP BITFIELD
    PFMERGE GEOSEARCHSTORE GEORADIUS GEORADIUSBYMEMBER SORT
    """
)


@functools.cache
def _redis_names() -> tuple[frozenset[str], frozenset[str]]:
    """(commands we know, commands that take a subcommand). Imported when first needed:
    ``_redis_commands`` imports this module."""
    from otel_recovery.instrumentors import _redis_commands as rules

    known = rules.READS | rules.IDEMPOTENT_WRITES | rules.COUNTING_WRITES | rules.BLOCKING
    return known | _COMMON_WRITES, rules._CONTAINERS | _SPACED_CONTAINERS


def _commands(value: Any) -> frozenset[str]:
    """Redis command names, upper-cased: one word, or a container and its subcommand
    (``CONFIG GET``, also written ``CONFIG|GET`` as ACLs do)."""
    containers = _redis_names()[1]
    names = []
    for item in _items(value):
        words = item.upper().replace("|", " ").split()
        if not words or not all(_REDIS_WORD.fullmatch(word) for word in words):
            raise _BadItemError(
                f"{item!r} is not a Redis command name (letters, digits, '_' and '.', as in "
                "GET or JSON.GET); separate commands with commas, as in GET,HGETALL"
            )
        if len(words) > 2 or (len(words) == 2 and words[0] not in containers):
            raise _BadItemError(
                f"{item!r} is not a Redis command name: only a container command and its "
                "subcommand are two words (CONFIG GET, CLIENT ID); separate commands with "
                "commas, as in GET,HGETALL"
            )
        names.append(" ".join(words))
    return frozenset(names)


def _note_unknown_names(name: str, values: frozenset[str], source: str) -> None:
    """Warn once about each well-formed name that is not a standard one (a typo, or a
    custom method or module command: kept either way), with the closest standard name."""
    containers: frozenset[str] = frozenset()
    if name == "http_retry_methods":
        known, what, kept = _STANDARD_METHODS, "a standard HTTP method", "as a custom method"
    else:
        (known, containers), what, kept = _redis_names(), "a Redis command we know", "as written"
    for value in sorted(values - known):
        close = _closest(value, known)
        if value in containers:
            note = "takes a subcommand, and calls are matched by both words: name it (CONFIG GET)"
        elif name != "http_retry_methods" and ("." in value or (" " in value and not close)):
            continue  # a module's command, or a container's subcommand we do not list
        else:
            hint = f" (did you mean {close[0]}?)" if close else ""
            note = f"is not {what}{hint}; it is kept, {kept}"
        _warn_once(f"{_label(name, source)}: {value} {note}")


def _closest(value: str, known: frozenset[str]) -> list[str]:
    """The closest known name; a container's subcommand is compared with the same
    container's (``CONFIG GTE``: ``CONFIG GET``; ``CLIENT KILL`` is like no ``CLIENT ID``)."""
    container, _, subcommand = value.rpartition(" ")
    if not container:
        return difflib.get_close_matches(value, known, n=1)
    siblings = [name.split(" ")[1] for name in known if name.startswith(container + " ")]
    return [f"{container} {name}" for name in difflib.get_close_matches(subcommand, siblings, 1)]


_DAY = 86400.0
_SECONDS = frozenset(
    {"backoff_initial", "backoff_max", "deadline", "attempt_timeout", "retry_after_cap"}
    | {"breaker_open_seconds"}
)
"""Settings in seconds: each also accepts a ``timedelta`` (DESIGN.md section 2)."""
_COERCE: dict[str, Callable[[Any], Any]] = {
    "http_retry_methods": _methods,
    "http_retry_statuses": _statuses,
    "redis_retry_commands": _commands,
    "redis_no_retry_commands": _commands,
}
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_attempts": (lambda v: 1 <= v <= 20, "an integer from 1 to 20"),
    "backoff_initial": (lambda v: 0 <= v <= 60, "seconds from 0 to 60"),
    "backoff_max": (lambda v: 0 <= v <= 600, "seconds from 0 to 600"),
    "deadline": (lambda v: v is None or 0 < v <= _DAY, "seconds > 0, at most 86400 (a day)"),
    "attempt_timeout": (
        lambda v: v is None or 0 < v <= _DAY,
        "seconds > 0, at most 86400 (a day)",
    ),
    "retry_after_cap": (lambda v: 0 <= v <= _DAY, "seconds from 0 to 86400 (a day)"),
    "budget_ratio": (lambda v: 0 <= v <= 1, "a ratio from 0 to 1 (0.1 = 10 %)"),
    "budget_min_per_second": (lambda v: v >= 0, "a finite number >= 0"),
    "breaker_failure_rate": (lambda v: 0 < v <= 1, "a ratio in (0, 1]"),
    "breaker_window": (lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000 (calls)"),
    "breaker_minimum_calls": (lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "breaker_open_seconds": (lambda v: 0 < v <= _DAY, "seconds > 0, at most 86400 (a day)"),
    "breaker_half_open_calls": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "sql_retry": (lambda v: v in ("connect", "never"), "'connect' or 'never'"),
    "learning": (lambda v: v in ("off", "shadow", "on"), "'off', 'shadow' or 'on'"),
    "http_retry_statuses": (
        lambda v: all(100 <= status <= 599 for status in v),
        "a comma-separated list of HTTP status codes (100-599)",
    ),
}
_LISTS = {
    "http_retry_methods": "a comma-separated list of HTTP methods, as in GET,HEAD",
    "redis_retry_commands": "a comma-separated list of Redis commands, as in GET,CONFIG GET",
    "redis_no_retry_commands": "a comma-separated list of Redis commands, as in GET,CONFIG GET",
}
_FIELDS = {f.name: f for f in fields(RecoverySettings)}
_NOT_SETTABLE = {"has_fallback", "targets", "arguments"}
_SETTABLE = sorted(set(_FIELDS) - _NOT_SETTABLE)
_DEFAULTS = {name: getattr(RecoverySettings(), name) for name in _SETTABLE}
_SERVICE_ONLY = {
    "enabled": "one switch per instrumentor",
    "learning": "one learner per instrumentor",
    "sql_retry": "one rule for every PostgreSQL connection",
}
_PER_TARGET = frozenset(
    {name for name in _SETTABLE if name.startswith(("breaker_", "budget_"))}
    | {"redis_retry_commands", "redis_no_retry_commands", "redis_retry_refused"}
)
_OTHER_VARIABLES = frozenset(
    {"CONFIG", "NO_EXTENSIONS", "STORE_URL", "CHECKPOINT_MAX_BYTES", "BENCH_PG"}
)
"""``OTEL_RECOVERY_*`` variables read elsewhere: the policy file (here), the switch for the
compiled extension (``_compiled``), the state store (``stores``), the checkpoint size limit
(``checkpoint``), the database of ``benchmarks/layer_cost.py``."""
_ARGUMENTS = "instrument() keyword arguments"
_log = logging.getLogger("otel_recovery.instrumentors")
_warned: set[str] = set()
_warned_lock = new_lock()


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value (env string, file value, kwarg) into the field's type, or explain."""
    default = _DEFAULTS[name]
    ours = source == _ARGUMENTS
    try:
        value = _coerce(name, raw, default, source)
    except _BadItemError as error:
        raise SettingsError(
            f"{_label(name, source)}={raw!r} is not valid: {error}", from_arguments=ours
        ) from error
    except (TypeError, ValueError, OverflowError) as error:
        raise SettingsError(
            f"{_label(name, source)}={raw!r} is not valid: {_expected(name, default)}",
            from_arguments=ours,
        ) from error
    check = _CHECKS.get(name)
    if check is not None and not check[0](value):
        raise SettingsError(
            f"{_label(name, source)}={raw!r} is not valid: expected {check[1]}",
            from_arguments=ours,
        )
    if name in _LISTS:
        _note_unknown_names(name, value, source)
    return value


def _coerce(name: str, raw: Any, default: Any, source: str) -> Any:
    if name in _COERCE:
        return _COERCE[name](raw)
    if name == "fallback_value":
        return _json(raw) if isinstance(raw, str) and source == "env" else raw
    if isinstance(default, bool):
        return _boolean(raw)
    if isinstance(raw, bool):  # True is an int to Python, not a number to a reader
        raise TypeError(raw)
    if isinstance(default, int):
        whole = int(raw)
        if isinstance(raw, float) and raw != whole:
            raise ValueError(raw)
        return whole
    if isinstance(default, float) or default is None:
        if default is None and (raw is None or str(raw).strip().lower() in ("", "none")):
            return None
        if isinstance(raw, timedelta) and name in _SECONDS:
            raw = raw.total_seconds()
        number = float(raw)
        if not math.isfinite(number):
            raise ValueError(raw)
        return number
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw.strip().lower()


def _json(raw: str) -> Any:
    def finite_only(constant: str) -> Any:
        raise ValueError(constant)

    return json.loads(raw, parse_constant=finite_only)


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _expected(name: str, default: Any) -> str:
    if name in _CHECKS:
        return f"expected {_CHECKS[name][1]}"
    if name in _LISTS:
        return f"expected {_LISTS[name]}"
    if name == "fallback_value":
        return 'expected a JSON value (null, true, 0, "text", [...] or {...})'
    if name in _SECONDS:
        return "expected seconds (a number, or a timedelta)"
    if isinstance(default, bool):
        return "expected true or false (or 1/0, yes/no, on/off)"
    return f"expected a {type(default).__name__}"


def _label(name: str, source: str) -> str:
    if source == "env":
        return ENV_PREFIX + name.upper()
    return f"{name} (from {source})"


def _values(values: Mapping[str, Any], where: str, level: str, target: str = "") -> dict[str, Any]:
    """``values`` converted, each checked to be a setting that has an effect at ``level``:
    ``arguments``, ``service`` (the file's top level), ``target`` or ``operation``."""
    converted: dict[str, Any] = {}
    for key, raw in values.items():
        _check_place(key, where, level, target)
        converted[key] = _convert(key, raw, where)
    return converted


def _check_place(key: str, where: str, level: str, target: str) -> None:
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
    elif key not in _DEFAULTS:
        extra = {"service": ["targets"], "target": ["operations"]}.get(level, [])
        close = difflib.get_close_matches(str(key), [*_SETTABLE, *extra], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if ours and key in ("targets", "operations"):
            hint = " (target and operation sections come from the policy file only)"
        problem = (
            f"unknown setting {key!r} in {where}{hint}; known settings: {', '.join(_SETTABLE)}"
        )
    elif key in _SERVICE_ONLY and level in ("target", "operation"):
        problem = (
            f"{key} in {where}: {key} applies to the whole service ({_SERVICE_ONLY[key]}): "
            f"set it at the top level of the policy file, or in {ENV_PREFIX}{key.upper()}"
        )
    elif key in _PER_TARGET and level == "operation":
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


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _SETTABLE:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        # not a boolean: logged and taken as false, as at import (otel_recovery._config)
        values[name] = switch_value(raw) if name == "enabled" else _convert(name, raw, "env")
    return values


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    accepted = "a policy file is TOML, or JSON with a .json extension"
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} names a YAML file, which is not read: {accepted}"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} cannot be read ({reason}); "
            "point it at a TOML or JSON policy file, or unset it"
        ) from error
    try:
        data = json.loads(text) if suffix == ".json" else _toml_loads(text)
    except Exception as error:
        kind = "JSON" if suffix == ".json" else "TOML"
        if kind == "TOML" and _is_json(text):
            raise SettingsError(
                f"OTEL_RECOVERY_CONFIG={path!r} holds JSON, which is read only from a file "
                f"whose name ends in .json: rename it, or write it in TOML ({accepted})"
            ) from error
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} is not valid {kind}: {error} ({accepted})"
        ) from error
    if not isinstance(data, dict):
        raise SettingsError(f"OTEL_RECOVERY_CONFIG={path!r} must hold a table of settings")
    return data


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return text.lstrip()[:1] in ("{", "[")


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomli backport is a declared dependency there
        import tomli as tomllib
    loaded: dict[str, Any] = tomllib.loads(text)
    return loaded


def _where_target(path: str, key: str, operation: str | None = None) -> str:
    section = f'targets."{key}"' + (f'.operations."{operation}"' if operation else "")
    return f"[{section}] in policy file {path}"


def _read_policy(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The file's top-level settings and its target sections, converted and checked."""
    data = _read_file(path)
    targets = data.pop("targets", {})
    top = _values(data, f"policy file {path}", "service")
    if not isinstance(targets, dict):
        raise SettingsError(
            f"'targets' in {path} must be a table of host sections, such as "
            '[targets."api.example.com"]'
        )
    converted: dict[str, dict[str, Any]] = {}
    for key, section in targets.items():
        where = _where_target(path, key)
        if not isinstance(section, dict):
            raise SettingsError(f"{where} must be a table of settings, not {section!r}")
        operations = section.get("operations", {})
        values = {name: raw for name, raw in section.items() if name != "operations"}
        converted[key] = _values(values, where, "target", key)
        if not isinstance(operations, dict):
            raise SettingsError(
                f"operations in {where} must be a table of operation sections, such as "
                f'[targets."{key}".operations."GET /v1/prices"], not {operations!r}'
            )
        ops: dict[str, Any] = {}
        for operation, settings in operations.items():
            there = _where_target(path, key, operation)
            if not isinstance(settings, dict):
                raise SettingsError(
                    f"{there} must be a table of settings, such as fallback_value = [], "
                    f"not {settings!r}"
                )
            ops[operation] = _values(settings, there, "operation", key)
        if "operations" in section:
            converted[key]["operations"] = ops
    return top, converted


_Layers = list[tuple[str, Mapping[str, Any]]]


def _scopes(targets: Mapping[str, Any], path: str) -> Iterator[tuple[str, _Layers]]:
    """Each section and operation section a call can meet, as (its name, the file's levels
    :meth:`RecoverySettings.for_target` applies for it, in order)."""
    for key in targets:
        found = re.fullmatch(r"(.+):(\d+)", key)
        chain = [k for k in (found.group(1), key) if k in targets] if found else [key]
        operations = sorted({op for k in chain for op in targets[k].get("operations", {})})
        for operation in (None, *operations):
            layers: _Layers = []
            for k in chain:
                layers.append((_where_target(path, k), targets[k]))
                if operation in targets[k].get("operations", {}):
                    where = _where_target(path, k, operation)
                    layers.append((where, targets[k]["operations"][operation]))
            yield _where_target(path, key, operation).split(" in policy file ")[0], layers


def _check_backoff(
    base: _Layers, arguments: Mapping[str, Any], targets: Mapping[str, Any], path: str
) -> None:
    """``backoff_initial`` may not exceed ``backoff_max`` at any level a call can meet."""
    for scope, layers in [("", []), *_scopes(targets, path)]:
        found: dict[str, tuple[Any, str]] = {}
        for name in ("backoff_initial", "backoff_max"):
            found[name] = (_DEFAULTS[name], "the default")
            for source, values in [*base, *layers, (_ARGUMENTS, arguments)]:
                if name in values:
                    found[name] = (values[name], _origin(name, source))
        (initial, first), (maximum, longest) = found["backoff_initial"], found["backoff_max"]
        if initial > maximum:
            raise SettingsError(
                f"backoff_initial={initial:g} (from {first}) is larger than backoff_max="
                f"{maximum:g} (from {longest}){' for ' + scope if scope else ''}: the first "
                "retry would wait longer than the longest wait allowed; make backoff_initial "
                "at most backoff_max",
                from_arguments={first, longest} <= {_ARGUMENTS, "the default"},
            )


def _origin(name: str, source: str) -> str:
    return ENV_PREFIX + name.upper() if source == "env" else source


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


def _warn_once(message: str) -> None:
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    _log.warning("%s", message)


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
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    _log.error("%s", message)


def load_settings(
    kwargs: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> RecoverySettings:
    """Settings from the environment, then the policy file, then keyword arguments (see the
    module docstring). Raises :class:`SettingsError`; ``from_arguments`` tells whose."""
    env = os.environ if environ is None else environ
    arguments = _values(kwargs or {}, _ARGUMENTS, "arguments")  # the caller's own mistakes first
    _warn_unknown(env)
    layers: _Layers = [("env", _from_env(env))]
    targets: dict[str, dict[str, Any]] = {}
    path = env.get(ENV_PREFIX + "CONFIG")
    if path:
        top, targets = _read_policy(path)
        layers.append((f"policy file {path}", top))
    _check_backoff(layers, arguments, targets, path or "")
    values: dict[str, Any] = {}
    for _, level in [*layers, (_ARGUMENTS, arguments)]:
        values.update(level)
    if "fallback_value" in values:
        values["has_fallback"] = True
    return RecoverySettings(**values, targets=targets, arguments=arguments)
