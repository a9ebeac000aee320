"""The names an operation section of the policy file may have, written the way calls meet them.

A call finds its operation section by an exact name: an HTTP call by ``"<METHOD> <path>"``
(the method upper-cased, the path without its query), a Redis command by its upper-cased
name (``GET``, ``CONFIG GET``, ``JSON.GET``; ``PIPELINE`` for a pipeline, ``MULTI`` for a
transaction), a PostgreSQL connection by ``connect`` (asyncpg's pool also ``acquire``). A
section spelled any other way loaded without a word and never applied: ``"get /x"``,
``"get"``, ``"GET /x?page=1"``. So each name is read here once, at start-up, and either
becomes the spelling calls use (methods and commands in any case, ``CONFIG|GET``, ``Connect``)
or is refused with the forms it may take.

A statement has no operation name (its text is not a name: ids and literals in it would make
every call its own section), so ``"SELECT"`` is read as the Redis command of that name; the
README says so. A well-formed Redis word that is no command we know (``GTE``) is kept, with a
warning naming the closest one, as the command lists do: modules add commands.
"""

from __future__ import annotations

import re

from otel_recovery.instrumentors._setting_values import (
    STANDARD_METHODS,
    TOKEN,
    BadItemError,
    SettingsError,
    _warn_once,
    closest,
    redis_command,
    redis_names,
)

_HTTP = re.compile(r"(\S+) +(\S*)")
_SQL = ("connect", "acquire")
_REDIS_PSEUDO = frozenset({"PIPELINE", "MULTI"})
"""Names the Redis instrumentor gives a whole pipeline and a MULTI/EXEC transaction."""
_FORMS = (
    'an HTTP method and a path ("GET /v1/prices"), a Redis command ("GET", "CONFIG GET", '
    '"PIPELINE"), or "connect" / "acquire" for PostgreSQL'
)


def operation_name(name: str, where: str) -> str:
    """``name`` as calls spell it, or :class:`SettingsError` naming ``where`` (the
    section) and the forms a name may take."""
    if name != name.strip() or not name:
        raise SettingsError(f"{where}: the operation name {name!r} {_blank(name)}; {_FORMS}")
    if name.lower() in _SQL:
        return name.lower()
    http = _HTTP.fullmatch(name)
    if http is not None and (
        "/" in http.group(2) or http.group(1).upper() in STANDARD_METHODS
    ):  # a path, or a standard method before a path without its "/" ("GET x")
        return _http_name(http.group(1), http.group(2), name, where)
    return _redis_name(name, where)


def _blank(name: str) -> str:
    return "is empty" if not name.strip() else "has spaces around it: remove them"


def _http_name(method: str, path: str, name: str, where: str) -> str:
    if not TOKEN.fullmatch(method):
        raise SettingsError(
            f"{where}: {method!r} in the operation name {name!r} is not an HTTP method (one "
            "token, RFC 9110); write it as GET /v1/prices"
        )
    if not path.startswith("/"):  # a URL, or a path without its first slash
        after_host = path.split("://", 1)[1].partition("/")[2] if "://" in path else path
        raise SettingsError(
            f"{where}: the operation name {name!r} must hold a path that starts with '/', "
            f"as calls name it (the host is the target's): write {method.upper()} "
            f"/{after_host.lstrip('/')}"
        )
    if "?" in path or "#" in path:
        bare = re.split(r"[?#]", path, maxsplit=1)[0]
        raise SettingsError(
            f"{where}: the operation name {name!r} holds a query or fragment, which calls "
            f"are not told apart by: write {method.upper()} {bare}"
        )
    upper = method.upper()
    if upper not in STANDARD_METHODS:
        close = closest(upper, STANDARD_METHODS)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _warn_once(f"{where}: {method} is not a standard HTTP method{hint}; it is kept")
    return f"{upper} {path}"


def _redis_name(name: str, where: str) -> str:
    try:
        command = redis_command(name)
    except BadItemError:
        raise SettingsError(f"{where}: {name!r} is not an operation name: use {_FORMS}") from None
    known, containers = redis_names()
    if command in known or command in _REDIS_PSEUDO or "." in command:
        return command
    if command in containers:
        _warn_once(
            f"{where}: {command} takes a subcommand, and calls are matched by both words: "
            f"name it ({command} GET); the section is kept as written"
        )
        return command
    close = closest(command, known | _REDIS_PSEUDO)
    if close or " " not in command:  # a container's subcommand we do not list: kept quietly
        hint = f" (did you mean {close[0]}?)" if close else ""
        _warn_once(f"{where}: {command} is not a Redis command we know{hint}; it is kept")
    return command
