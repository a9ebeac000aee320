"""Converting and checking one setting's value, wherever it was written.

An ``OTEL_RECOVERY_*`` variable, a policy file key and a keyword argument to
``instrument()`` all end in :func:`convert`, so one value means the same from every source
and is refused with the same message: the rules for a value live here, apart from
:mod:`._settings` (which layers the sources), :mod:`._policy_file` (which reads the file)
and :mod:`._setting_levels` (which checks where each key may go). This module is the bottom
of that chain: it imports none of them, and holds what they all share
(:class:`SettingsError`, :data:`ENV_PREFIX`, the once-per-process log memory).

Every number is finite and bounded (seconds up to a day, breaker windows up to 100000
calls), every time accepts float seconds or a ``timedelta``. HTTP methods must be RFC 9110
tokens and Redis command names words (two for a container's subcommand, ``CONFIG GET``); a
well-formed name that is not a standard one is kept, with a warning naming the closest
standard name.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from otel_recovery._first_times import FirstTimes

__all__ = [
    "ARGUMENTS",
    "ENV_PREFIX",
    "STANDARD_METHODS",
    "TOKEN",
    "BadItemError",
    "SettingsError",
    "check_http_fallback",
    "closest",
    "convert",
    "log_once",
    "redis_command",
    "redis_names",
]

ENV_PREFIX = "OTEL_RECOVERY_"
"""Every variable's prefix; :mod:`._settings` re-exports it."""
ARGUMENTS = "instrument() keyword arguments"
"""The source of a keyword argument: a bad one raises (``from_arguments``)."""


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the setting, where it came from
    and the fix. ``from_arguments``: the keyword arguments to ``instrument()`` alone are at
    fault (they raise; a bad value from the environment or the file leaves us off)."""

    def __init__(self, message: str, *, from_arguments: bool = False) -> None:
        super().__init__(message)
        self.from_arguments = from_arguments


class BadItemError(ValueError):
    """A value that cannot be converted, with what is wrong with it (a list's item)."""


def _items(value: Any) -> list[str]:
    """A comma-separated string or a list, as stripped non-empty strings.

    A string that names nothing (``""``, ``","``) is refused: from the file or
    ``instrument()`` it switched the feature off without a word, where an empty variable
    keeps the default; ``[]`` is how to say "none". Bytes are refused too: iterated, they
    were numbers."""
    if isinstance(value, (bytes, bytearray)):
        raise BadItemError("give a list as text or a list of strings, not bytes")
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise BadItemError(
                "the text names nothing; leave the setting out for the default list, or "
                "give an empty list ([]) for none"
            )
        return items
    return [str(item).strip() for item in list(value) if str(item).strip()]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _statuses(value: Any) -> frozenset[int]:
    """HTTP status codes."""
    return frozenset(int(item) for item in _items(value))


TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP method is a token (RFC 9110, section 9.1 and 5.6.2: ``1*tchar``)."""
STANDARD_METHODS = _words(
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH "  # RFC 9110, RFC 5789
    "PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK"  # WebDAV, RFC 4918
)


def _methods(value: Any) -> frozenset[str]:
    """HTTP methods, upper-cased; one that is not a token cannot be a method."""
    for item in _items(value):
        if not TOKEN.fullmatch(item):
            raise BadItemError(
                f"{item!r} is not an HTTP method (one token of letters, digits and "
                "!#$%&'*+-.^_`|~, RFC 9110); separate methods with commas, as in GET,HEAD"
            )
    return frozenset(item.upper() for item in _items(value))


_REDIS_WORD = re.compile(r"[A-Z][A-Z0-9_.-]*")  # CLIENT NO-EVICT, RESTORE-ASKING
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
def redis_names() -> tuple[frozenset[str], frozenset[str]]:
    """(commands we know, commands that take a subcommand). Imported when first needed:
    ``_redis_commands`` imports :mod:`._settings`, which imports this module."""
    from otel_recovery.instrumentors import _redis_commands as rules

    known = rules.READS | rules.IDEMPOTENT_WRITES | rules.COUNTING_WRITES | rules.BLOCKING
    known |= rules.RUNS_CODE  # TFCALL and TFCALLASYNC are no misspelt FCALL
    return known | _COMMON_WRITES, rules._CONTAINERS | _SPACED_CONTAINERS


def _commands(value: Any) -> frozenset[str]:
    """Redis command names, upper-cased: one word, or a container and its subcommand
    (``CONFIG GET``, also written ``CONFIG|GET`` as ACLs do)."""
    return frozenset(redis_command(item) for item in _items(value))


def redis_command(item: str) -> str:
    """One Redis command name as calls are named (:func:`._redis_commands.command_name`):
    upper-cased, ``|`` read as a space; :class:`BadItemError` for what cannot be one."""
    words = item.upper().replace("|", " ").split()
    if not words or not all(_REDIS_WORD.fullmatch(word) for word in words):
        raise BadItemError(
            f"{item!r} is not a Redis command name (letters, digits, '_', '.' and '-', as "
            "in GET, JSON.GET or CLIENT NO-EVICT); separate commands with commas, as in "
            "GET,HGETALL"
        )
    if len(words) > 2 or (len(words) == 2 and words[0] not in redis_names()[1]):
        raise BadItemError(
            f"{item!r} is not a Redis command name: only a container command and its "
            "subcommand are two words (CONFIG GET, CLIENT ID); separate commands with "
            "commas, as in GET,HGETALL"
        )
    return " ".join(words)


def _note_unknown_names(name: str, values: frozenset[str], source: str) -> None:
    """Warn once about each well-formed name that is not a standard one (a typo, or a
    custom method or module command: kept either way), with the closest standard name."""
    containers: frozenset[str] = frozenset()
    if name == "http_retry_methods":
        known, what, kept = STANDARD_METHODS, "a standard HTTP method", "as a custom method"
    else:
        (known, containers), what, kept = redis_names(), "a Redis command we know", "as written"
    for value in sorted(values - known):
        close = closest(value, known)
        if value in containers:
            note = "takes a subcommand, and calls are matched by both words: name it (CONFIG GET)"
        elif name != "http_retry_methods" and ("." in value or (" " in value and not close)):
            continue  # a module's command, or a container's subcommand we do not list
        else:
            hint = f" (did you mean {close[0]}?)" if close else ""
            note = f"is not {what}{hint}; it is kept, {kept}"
            if name == "http_retry_methods" and close and close[0] not in values:
                # the list replaces the default: a typo quietly stops the method it meant
                note += f"; {close[0]} is not in the list, so {close[0]} requests are not retried"
        _warn_once(f"{_label(name, source)}: {value} {note}")


def closest(value: str, known: frozenset[str]) -> list[str]:
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
    "budget_min_per_second": (lambda v: 0 <= v <= 10_000, "retries per second from 0 to 10000"),
    "breaker_failure_rate": (lambda v: 0 < v <= 1, "a ratio in (0, 1]"),
    "breaker_window": (lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000 (calls)"),
    "breaker_minimum_calls": (lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "breaker_open_seconds": (lambda v: 0 < v <= _DAY, "seconds > 0, at most 86400 (a day)"),
    "breaker_half_open_calls": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "sql_retry": (lambda v: v in ("connect", "never"), "'connect' or 'never'"),
    "learning": (lambda v: v in ("off", "shadow", "on"), "'off', 'shadow' or 'on'"),
    "http_retry_statuses": (
        lambda v: all(400 <= status <= 599 for status in v),
        "a comma-separated list of HTTP error status codes (400-599; a 1xx, 2xx or 3xx "
        "answer is not a failure, and retrying it would repeat a request that worked)",
    ),
}
_LISTS = {
    "http_retry_methods": "a comma-separated list of HTTP methods, as in GET,HEAD",
    "redis_retry_commands": "a comma-separated list of Redis commands, as in GET,CONFIG GET",
    "redis_no_retry_commands": "a comma-separated list of Redis commands, as in GET,CONFIG GET",
}

_log = logging.getLogger("otel_recovery.instrumentors")
_warned = FirstTimes()
"""The messages logged so far (warnings here and :func:`._settings.report_off`'s errors)."""


def convert(name: str, raw: Any, source: str, default: Any) -> Any:
    """Turn a raw value (env string, file value, kwarg) into the field's type, or explain;
    ``default`` is the field's default in :class:`._settings.RecoverySettings`, whose type
    the value takes."""
    ours = source == ARGUMENTS
    try:
        value = _coerce(name, raw, default, source)
    except BadItemError as error:
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
        if isinstance(raw, str) and source == "env":
            return _json(raw)
        # from instrument(), any value: a Redis or SQL read may answer with a set, a row,
        # bytes; the HTTP instrumentors check theirs (check_http_fallback)
        return raw if source == ARGUMENTS else _answerable(raw)
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


def _answerable(value: Any) -> Any:
    """A fallback an HTTP client can answer with: bytes, text or JSON. Checked where the
    setting is read: a TOML date, ``nan`` or an object found by ``json.dumps`` at the first
    failure would replace the failure with a ``TypeError``."""
    if not isinstance(value, (str, bytes, bytearray)):
        json.dumps(value, allow_nan=False)  # TypeError or ValueError: reported as not valid
    return value


def check_http_fallback(arguments: Mapping[str, Any]) -> None:
    """An HTTP instrumentor's ``instrument(fallback_value=...)``: one it can answer with."""
    if "fallback_value" not in arguments:
        return
    value = arguments["fallback_value"]
    try:
        _answerable(value)
    except (TypeError, ValueError) as error:
        raise SettingsError(
            f"{_label('fallback_value', ARGUMENTS)}={value!r} is not valid: an HTTP client "
            'answers with bytes, text or a JSON value (null, true, 0, "text", [...] or {...})',
            from_arguments=True,
        ) from error


def _json(raw: str) -> Any:
    def finite_only(constant: str) -> Any:
        raise ValueError(constant)

    def finite_float(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):  # 1e999: no JSON body could carry it
            raise ValueError(text)
        return number

    return json.loads(raw, parse_constant=finite_only, parse_float=finite_float)


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
        return (
            'expected a JSON value (null, true, 0, "text", [...] or {...}) or bytes; '
            "a TOML date or time is not JSON: quote it as a string"
        )
    if name in _SECONDS:
        return "expected seconds (a number, or a timedelta)"
    if isinstance(default, bool):
        return "expected true or false (or 1/0, yes/no, on/off)"
    return f"expected a {type(default).__name__}"


def _label(name: str, source: str) -> str:
    if source == "env":
        return ENV_PREFIX + name.upper()
    return f"{name} (from {source})"


def _warn_once(message: str) -> None:
    log_once(logging.WARNING, message)


def log_once(level: int, message: str) -> None:
    """Log ``message`` once per process: every instrumentor loads the settings."""
    if _warned.first(message):
        _log.log(level, "%s", message)
