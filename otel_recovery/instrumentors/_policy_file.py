"""Reading the policy file ``OTEL_RECOVERY_CONFIG`` names: its format and its sections.

The file is the one source with structure (a top level, ``[targets."host"]`` sections and
their ``operations`` sections), so it has its own failures: a file that cannot be read or
parsed (a YAML file, JSON in a file whose name does not end in ``.json``, a key given twice
in a JSON object), a section that is not a table, two sections for one target or one
operation. They live here, apart from :mod:`._settings` (which layers the sources),
:mod:`._setting_values` (which converts each value), :mod:`._setting_levels` (where each key
may be set), :mod:`._target_keys` (the targets a section's key stands for) and
:mod:`._ordered_settings` (settings that may not exceed another). This module does not
import :mod:`._settings`: the settings' defaults come in as a parameter (``defaults``: each
setting's default by name, :data:`._settings._DEFAULTS`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_recovery.instrumentors._operation_names import operation_name
from otel_recovery.instrumentors._setting_levels import checked_values
from otel_recovery.instrumentors._setting_values import SettingsError
from otel_recovery.instrumentors._target_keys import target_spellings

__all__ = ["read_policy", "where_target"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: ``json`` keeps the last of two silently
    (a whole target section lost), where TOML refuses them."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"the key {key!r} is given twice in one object")
        table[key] = value
    return table


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


def where_target(path: str, key: str, operation: str | None = None) -> str:
    """How a message names the section for target ``key`` (or its ``operation``) in ``path``."""
    section = f'targets."{key}"' + (f'.operations."{operation}"' if operation is not None else "")
    return f"[{section}] in policy file {path}"


def read_policy(
    path: str, defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The file's top-level settings and its target sections, converted and checked."""
    data = _read_file(path)
    targets = data.pop("targets", {})
    top = checked_values(data, f"policy file {path}", "service", defaults=defaults)
    if not isinstance(targets, dict):
        raise SettingsError(
            f"'targets' in {path} must be a table of host sections, such as "
            '[targets."api.example.com"]'
        )
    converted: dict[str, dict[str, Any]] = {}
    spelled: dict[str, str] = {}  # each spelling: the key written for it
    for key, section in targets.items():
        where = where_target(path, key)
        if not isinstance(section, dict):
            raise SettingsError(f"{where} must be a table of settings, not {section!r}")
        operations = section.get("operations", {})
        values = {name: raw for name, raw in section.items() if name != "operations"}
        converted[key] = checked_values(values, where, "target", key, defaults=defaults)
        if not isinstance(operations, dict):
            raise SettingsError(
                f"operations in {where} must be a table of operation sections, such as "
                f'[targets."{key}".operations."GET /v1/prices"], not {operations!r}'
            )
        ops: dict[str, Any] = {}
        written: dict[str, str] = {}  # each operation as calls name it: the name written
        for operation, settings in operations.items():
            there = where_target(path, key, operation)
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
            ops[name] = checked_values(settings, there, "operation", key, defaults=defaults)
        if "operations" in section:
            converted[key]["operations"] = ops
        for spelling in target_spellings(key, where):
            first = spelled.setdefault(spelling, key)
            if first != key:
                raise SettingsError(
                    f"{where} and {where_target(path, first).split(' in policy file ')[0]} "
                    f"both name the target {spelling!r} (host names are case-insensitive, an "
                    "IPv6 address is the same with or without brackets): merge them into one "
                    "section"
                )
            converted[spelling] = converted[key]
    return top, converted
