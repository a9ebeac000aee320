"""Settings that may not exceed another, checked at every level a call can meet.

``backoff_initial`` may not exceed ``backoff_max``, nor ``breaker_minimum_calls``
``breaker_window``. Each source may be right on its own and the pair still contradict each
other where they meet: ``backoff_max`` in the environment, ``backoff_initial`` in one
operation section. So the pair is checked for every scope a call can meet (the whole
service, each target section and each of its operation sections, with the wider sections
:meth:`._settings.RecoverySettings.for_target` applies before them), in the order the
sources are layered, and the error names where each of the two values came from. This
module does not import :mod:`._settings`: the layers, the file's target sections and the
settings' defaults come in as parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from otel_recovery.instrumentors._policy_file import where_target
from otel_recovery.instrumentors._setting_values import ARGUMENTS, ENV_PREFIX, SettingsError
from otel_recovery.instrumentors._target_keys import sentinel_service

__all__ = ["Layers", "check_orders"]

Layers = list[tuple[str, Mapping[str, Any]]]
"""Sources of settings, lowest precedence first: (where the values came from, the values)."""


def _scopes(targets: Mapping[str, Any], path: str) -> Iterator[tuple[str, Layers]]:
    """Each section and operation section a call can meet, as (its name, the file's levels
    :meth:`._settings.RecoverySettings.for_target` applies for it, in order)."""
    for key in targets:  # every spelling of each key: a call may meet any of them
        service = sentinel_service(key)
        found = None if service else re.fullmatch(r"(.+):(\d+)", key)
        wider = service or (found.group(1) if found else "")
        chain = [k for k in (wider, key) if k in targets] if wider else [key]
        operations = sorted({op for k in chain for op in targets[k].get("operations", {})})
        for operation in (None, *operations):
            layers: Layers = []
            for k in chain:
                layers.append((where_target(path, k), targets[k]))
                if operation in targets[k].get("operations", {}):
                    where = where_target(path, k, operation)
                    layers.append((where, targets[k]["operations"][operation]))
            yield where_target(path, key, operation).split(" in policy file ")[0], layers


def check_orders(
    base: Layers,
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
    base: Layers,
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
