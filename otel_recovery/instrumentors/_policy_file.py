"""Reading the policy file ``OTEL_RECOVERY_CONFIG`` names, and checking where each key may go.

The file is the one source with structure (a top level, ``[targets."host"]`` sections and
their ``operations`` sections), so it has its own failures: a file that cannot be read or
parsed, a section that is not a table, a key at a level where nothing reads it. They live
here, apart from :mod:`._settings` (which layers the sources) and :mod:`._setting_values`
(which converts each value). This module does not import :mod:`._settings`: the settings'
defaults come in as a parameter (``defaults``: each setting's default by name,
:data:`._settings._DEFAULTS`).

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
that is not a table. ``backoff_initial`` may not exceed ``backoff_max`` at any level a call
can meet.

A target section's key is found under every spelling of the target it names
(:func:`target_spellings`): as written, and with its host the way the instrumentors name it,
lowercased (the HTTP instrumentors lowercase hosts), without the brackets around an IPv6
address (``[::1]:5432`` is the target ``::1:5432``), and an internationalised host both as
Unicode and IDNA-encoded (``bücher.example`` and ``xn--bcher-kva.example``: httpx and aiohttp
name it in Unicode, requests as the URL spelled it). A socket path or a name with a space in
it (``mymaster replicas@...``) is kept as written. A key that cannot be a target's (an
unclosed bracket, a port that is not a number, a host IDNA cannot encode) is an error naming
the key and the fix, as are two sections for one target.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from otel_recovery.instrumentors._operation_names import operation_name
from otel_recovery.instrumentors._setting_values import (
    ARGUMENTS,
    ENV_PREFIX,
    SettingsError,
    convert,
)

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


def _values(
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: ``json`` keeps the last of two silently
    (a whole target section lost), where TOML refuses them."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"the key {key!r} is given twice in one object")
        table[key] = value
    return table


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


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    accepted = "a policy file is TOML, or JSON with a .json extension"
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} names a YAML file, which is not read: {accepted}"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no error
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SettingsError(
            f"OTEL_RECOVERY_CONFIG={path!r} cannot be read ({reason}); "
            "point it at a TOML or JSON policy file, or unset it"
        ) from error
    try:
        data = (
            json.loads(text, object_pairs_hook=_unique_keys)
            if suffix == ".json"
            else _toml_loads(text)
        )
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
    section = f'targets."{key}"' + (f'.operations."{operation}"' if operation is not None else "")
    return f"[{section}] in policy file {path}"


def _read_policy(
    path: str, defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The file's top-level settings and its target sections, converted and checked."""
    data = _read_file(path)
    targets = data.pop("targets", {})
    top = _values(data, f"policy file {path}", "service", defaults=defaults)
    if not isinstance(targets, dict):
        raise SettingsError(
            f"'targets' in {path} must be a table of host sections, such as "
            '[targets."api.example.com"]'
        )
    converted: dict[str, dict[str, Any]] = {}
    spelled: dict[str, str] = {}  # each spelling: the key written for it
    for key, section in targets.items():
        where = _where_target(path, key)
        if not isinstance(section, dict):
            raise SettingsError(f"{where} must be a table of settings, not {section!r}")
        operations = section.get("operations", {})
        values = {name: raw for name, raw in section.items() if name != "operations"}
        converted[key] = _values(values, where, "target", key, defaults=defaults)
        if not isinstance(operations, dict):
            raise SettingsError(
                f"operations in {where} must be a table of operation sections, such as "
                f'[targets."{key}".operations."GET /v1/prices"], not {operations!r}'
            )
        ops: dict[str, Any] = {}
        written: dict[str, str] = {}  # each operation as calls name it: the name written
        for operation, settings in operations.items():
            there = _where_target(path, key, operation)
            if not isinstance(settings, dict):
                raise SettingsError(
                    f"{there} must be a table of settings, such as fallback_value = [], "
                    f"not {settings!r}"
                )
            name = operation_name(operation, there)
            first = written.setdefault(name, operation)
            if first != operation:
                raise SettingsError(
                    f"{there} and the section for {first!r} both name the operation "
                    f"{name!r} (methods and commands are case-insensitive): merge them"
                )
            ops[name] = _values(settings, there, "operation", key, defaults=defaults)
        if "operations" in section:
            converted[key]["operations"] = ops
        for spelling in target_spellings(key, where):
            first = spelled.setdefault(spelling, key)
            if first != key:
                raise SettingsError(
                    f"{where} and {_where_target(path, first).split(' in policy file ')[0]} "
                    f"both name the target {spelling!r} (host names are case-insensitive, an "
                    "IPv6 address is the same with or without brackets): merge them into one "
                    "section"
                )
            converted[spelling] = converted[key]
    return top, converted


_PORT = re.compile(r"(.*):(\d+)")
_NOT_A_HOST = re.compile(r"[\s/@,]")
"""A key holding one of these names a socket path or a service (``mymaster replicas@...``),
not a host: it is kept as written."""


def target_spellings(key: str, where: str) -> list[str]:
    """Every spelling a call's target may have for the section ``key``: ``key`` first, then
    the normalised ones (the module docstring). Raises :class:`SettingsError` for a key that
    cannot name a target."""
    if not key.strip():
        raise SettingsError(f"{where}: the target is empty: name a host or host:port")
    if key != key.strip():  # no call's target has spaces around it
        raise SettingsError(
            f"{where}: the target {key!r} has spaces around it, so no call would ever match "
            f'the section: write [targets."{key.strip()}"]'
        )
    if key.startswith("/"):  # a unix-socket directory, [:port]: also by its real path
        return _socket_spellings(key)
    if "://" in key:  # kept as written, it would match no call: a section never applied
        rest = key.partition("://")[2]
        host = rest.split("/")[0].rpartition("@")[2] or "api.example.com"
        raise SettingsError(
            f"{where}: {key!r} is a URL; a target is a host or host:port, as in "
            f'[targets."{host}"] (the scheme and path are not part of it)'
        )
    if "," in key or (_NOT_A_HOST.search(key) and not key.startswith("[")):
        return [key]  # a host list (matched as written) or a name with a space or an @
    host, port = _host_and_port(key, where)
    if port is not None and not 0 < int(port) <= 65535:
        raise SettingsError(
            f"{where}: the port in {key!r} is not a TCP port (1-65535), so no call would "
            "ever match the section"
        )
    suffix = f":{int(port)}" if port is not None else ""  # calls name 05432 as 5432
    spellings = [key, *(f"{spelling}{suffix}" for spelling in _host_spellings(host, where))]
    return list(dict.fromkeys(spellings))


def _socket_spellings(key: str) -> list[str]:
    """A socket directory key as written and as the PostgreSQL targets name it: its real
    path (``_pg_targets.pg_host``), the port kept."""
    directory, colon, port = key.rpartition(":")
    if not (colon and port.isdigit()):
        directory, port = key, ""
    try:
        real = os.path.realpath(directory)
    except (OSError, ValueError):
        return [key]
    return list(dict.fromkeys([key, f"{real}:{port}" if port else real]))


def _host_and_port(key: str, where: str) -> tuple[str, str | None]:
    example = '[targets."[::1]:5432"] or [targets."db.internal:5432"]'
    if key.startswith("["):
        inside, closed, rest = key[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not closed or (rest and not (port and port.isdigit())):
            raise SettingsError(
                f"{where}: {key!r} is not a host or host:port (an IPv6 address goes in "
                f"brackets, a port after them: {example})"
            )
        if not _is_ipv6(inside):
            raise SettingsError(
                f"{where}: brackets hold an IPv6 address, and {inside!r} is not one: write "
                f"the host without them, as in {example}"
            )
        return inside, port
    if key.count(":") > 1:  # an IPv6 address without brackets: no port can be told apart
        return key, None
    found = _PORT.fullmatch(key)
    if found:
        return found.group(1), found.group(2)
    if ":" in key:
        raise SettingsError(
            f"{where}: the port in {key!r} is not a number: write host or host:port, as in "
            f"{example}"
        )
    return key, None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _host_spellings(host: str, where: str) -> list[str]:
    """``host`` as the instrumentors may name it: lowercased, and for an internationalised
    name both its Unicode and its IDNA (ASCII) forms; an IPv6 address also compressed."""
    if ":" in host:  # IPv6: its zone (after %) is an interface name, kept as written
        address, percent, zone = host.partition("%")
        spellings = [address.lower() + percent + zone]
        if _is_ipv6(host):
            spellings.append(str(ipaddress.IPv6Address(host)))
        return spellings
    lower = host.lower()
    if lower.isascii() and "xn--" not in lower:
        return [lower]
    try:
        ascii_name, unicode_name = _idna(lower)
    except (UnicodeError, ValueError) as error:
        raise SettingsError(
            f"{where}: the host {host!r} is not a valid internationalised domain name "
            f"({error}): write it as the URLs spell it, in Unicode or in its xn-- form"
        ) from error
    return [lower, unicode_name, ascii_name]


def _idna(host: str) -> tuple[str, str]:
    """``(ASCII, Unicode)`` forms of a host name: IDNA 2008 (the ``idna`` package, what the
    HTTP clients use) where it takes the name, else Python's IDNA 2003 codec."""
    try:
        import idna

        ascii_name = idna.encode(host, uts46=True).decode("ascii")
        return ascii_name, idna.decode(ascii_name)
    except Exception:  # not installed, or its own errors: IDNA 2003 may take the name
        pass
    ascii_name = host.encode("idna").decode("ascii")
    return ascii_name, ascii_name.encode("ascii").decode("idna")


_Layers = list[tuple[str, Mapping[str, Any]]]


def sentinel_service(name: str) -> str:
    """``"svc replicas"`` of a Redis Sentinel service's name with its deployment,
    ``"svc replicas@<sentinels>"`` (or ``master``), whose section covers every deployment's;
    ``""`` for any other name."""
    service, at, _ = name.partition("@")
    return service if at and service.endswith((" replicas", " master")) else ""


def _scopes(targets: Mapping[str, Any], path: str) -> Iterator[tuple[str, _Layers]]:
    """Each section and operation section a call can meet, as (its name, the file's levels
    :meth:`._settings.RecoverySettings.for_target` applies for it, in order)."""
    for key in targets:  # every spelling of each key: a call may meet any of them
        service = sentinel_service(key)
        found = None if service else re.fullmatch(r"(.+):(\d+)", key)
        wider = service or (found.group(1) if found else "")
        chain = [k for k in (wider, key) if k in targets] if wider else [key]
        operations = sorted({op for k in chain for op in targets[k].get("operations", {})})
        for operation in (None, *operations):
            layers: _Layers = []
            for k in chain:
                layers.append((_where_target(path, k), targets[k]))
                if operation in targets[k].get("operations", {}):
                    where = _where_target(path, k, operation)
                    layers.append((where, targets[k]["operations"][operation]))
            yield _where_target(path, key, operation).split(" in policy file ")[0], layers


def _check_orders(
    base: _Layers,
    arguments: Mapping[str, Any],
    targets: Mapping[str, Any],
    path: str,
    defaults: Mapping[str, Any],
) -> None:
    """``backoff_initial`` may not exceed a ``backoff_max`` that was set, at any level a call
    can meet. Above the default ``backoff_max`` it is taken as the longest wait too (a
    service that asked for 5 s waits gets them, as before this check existed); only two
    values that were both set and contradict each other are an error. Likewise
    ``breaker_minimum_calls`` may not exceed ``breaker_window``, the default window
    included: the window cannot hold that many calls, and the breaker would judge after a
    window's worth."""
    for names, why, default_high_gives_way in _ORDERED:
        _check_order(
            base, arguments, targets, path, defaults, names, why,
            default_high_gives_way=default_high_gives_way,
        )  # fmt: skip


_ORDERED: tuple[tuple[tuple[str, str], str, bool], ...] = (
    (
        ("backoff_initial", "backoff_max"),
        "the first retry would wait longer than the longest wait allowed; make "
        "backoff_initial at most backoff_max",
        True,
    ),
    (
        ("breaker_minimum_calls", "breaker_window"),
        "the breaker would judge after a window of calls, not after the minimum; make "
        "breaker_minimum_calls at most breaker_window",
        False,
    ),
)
"""Settings that may not exceed another: the pair, why, and whether the second one left
at its default gives way (a longer first wait is taken as the longest, a window is not)."""


def _check_order(
    base: _Layers,
    arguments: Mapping[str, Any],
    targets: Mapping[str, Any],
    path: str,
    defaults: Mapping[str, Any],
    names: tuple[str, str],
    why: str,
    *,
    default_high_gives_way: bool,
) -> None:
    """``names[0]`` may not exceed ``names[1]`` at any level a call can meet; with
    ``default_high_gives_way``, a ``names[1]`` left at its default is no contradiction."""
    low_name, high_name = names
    for scope, layers in [("", []), *_scopes(targets, path)]:
        found: dict[str, tuple[Any, str]] = {}
        for name in names:
            found[name] = (defaults[name], "the default")
            for source, values in [*base, *layers, (ARGUMENTS, arguments)]:
                if name in values:
                    found[name] = (values[name], _origin(name, source))
        (low, first), (high, second) = found[low_name], found[high_name]
        if first == "the default" or low <= high:
            continue
        if default_high_gives_way and second == "the default":
            continue
        raise SettingsError(
            f"{low_name}={low:g} (from {first}) is larger than {high_name}={high:g} (from "
            f"{second}){' for ' + scope if scope else ''}: {why}",
            from_arguments={first, second} <= {ARGUMENTS, "the default"},
        )


def _origin(name: str, source: str) -> str:
    return ENV_PREFIX + name.upper() if source == "env" else source
