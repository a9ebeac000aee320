"""The query options each back end accepts in a store URL, and the check of a URL's options.

A rule is (is this value acceptable, what is accepted). Options are checked at start-up,
when the URL is parsed (:func:`._url.parse_store_url`), because the client libraries only
look at them on the first connection: redis-py passes an unknown one to its connection class
(a TypeError on first use), libpq refuses it then. So every option must be known to its back
end (ours, the store's, the client library's for that scheme), given once, and hold a value
the rule accepts; the options the store cannot work with are refused with the reason, and a
PostgreSQL option is also checked against the libpq psycopg actually uses. A value is quoted
in a message only where the redacted URL shows it (:func:`shown`), so a piece of a hidden
password never reappears.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable

from otel_recovery.stores._base import StoreConfigError

__all__ = ["DIGITS", "OURS", "check_options", "shown", "valid_port"]

_Rule = tuple[Callable[[str], bool], str]
DIGITS = re.compile(r"[0-9]+")
"""Decimal digits only: no sign, no spaces (what ``int`` would also take)."""


def _integer(minimum: int) -> _Rule:
    return (
        lambda value: bool(DIGITS.fullmatch(value)) and int(value) >= minimum,
        f"an integer >= {minimum}",
    )


def _seconds() -> _Rule:
    def ok(value: str) -> bool:
        try:
            number = float(value)
        except ValueError:
            return False
        return math.isfinite(number) and number > 0

    return ok, "a number of seconds > 0"


def _choice(*values: str, case_sensitive: bool = True) -> _Rule:
    if case_sensitive:
        return (lambda value: value in values), "one of " + ", ".join(values)
    folded = {v.lower() for v in values}
    return (lambda value: value.lower() in folded), "one of " + ", ".join(values)


def _ports(value: str) -> bool:
    """libpq's ``port``: one port, or a comma-separated list (one per host); empty = default."""
    return all(not part or valid_port(part) for part in value.split(","))


def valid_port(text: str) -> bool:
    """Whether ``text`` is a TCP port: a number from 1 to 65535."""
    return bool(DIGITS.fullmatch(text)) and 1 <= int(text) <= 65535


_TEXT: _Rule = (lambda value: True, "any text")
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,40}")

# Options otel-recovery reads itself; they are removed before the URL reaches the client.
OURS: dict[str, dict[str, _Rule]] = {
    "memory": {"max_versions": _integer(1)},
    "sqlite": {
        "max_versions": _integer(1),
        "synchronous": _choice("normal", "full", "extra", case_sensitive=False),
        "busy_timeout": _integer(0),
    },
    "redis": {"max_versions": _integer(1), "prefix": _TEXT},
    "postgres": {
        "max_versions": _integer(1),
        "table": (
            lambda value: bool(_TABLE.fullmatch(value)),
            "a lower-case SQL identifier of at most 41 characters",
        ),
    },
}

# Options a store reads from the URL it is given: checked here, left in the client target.
_STORE_READS: dict[str, dict[str, _Rule]] = {
    "postgres": {"operation_timeout": _seconds()},  # PostgresStore: bound on each operation
}

# redis-py connection options that make sense for the store, by scheme (they reach
# redis.Redis.from_url, sync and asyncio). Booleans as redis-py reads them.
_BOOL = _choice("true", "false", "yes", "no", "1", "0", case_sensitive=False)
_REDIS_COMMON: dict[str, _Rule] = {
    "db": _integer(0),
    "username": _TEXT,
    "password": _TEXT,
    "client_name": _TEXT,
    "socket_timeout": _seconds(),
    "socket_connect_timeout": _seconds(),
    "health_check_interval": _integer(0),
    "max_connections": _integer(1),
}
_REDIS_TCP: dict[str, _Rule] = {**_REDIS_COMMON, "socket_keepalive": _BOOL}
_REDIS_CLIENT: dict[str, dict[str, _Rule]] = {
    "redis": _REDIS_TCP,
    "unix": _REDIS_COMMON,
    "rediss": {
        **_REDIS_TCP,
        "ssl_cert_reqs": _choice("none", "optional", "required"),
        "ssl_check_hostname": _BOOL,
        "ssl_ca_certs": _TEXT,
        "ssl_ca_path": _TEXT,
        "ssl_certfile": _TEXT,
        "ssl_keyfile": _TEXT,
        "ssl_password": _TEXT,
        "ssl_ciphers": _TEXT,
    },
}
_REDIS_REFUSED = {
    **dict.fromkeys(
        ("decode_responses", "encoding", "encoding_errors"),
        "the store reads and writes raw bytes",
    ),
    **dict.fromkeys(
        ("retry_on_timeout", "retry_on_error"),
        "the store switches redis-py's retries off: a write whose reply was lost may have "
        "run, and retrying it blindly could apply it twice",
    ),
    "protocol": "the store speaks redis-py's default protocol (RESP2)",
}

# libpq's connection parameters, as documented for PostgreSQL 18 ("Parameter Key Words",
# https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS), with the
# values libpq accepts where they are a fixed set or a number. ``ssl=true`` is libpq's
# JDBC-compatible spelling of sslmode=require, accepted in URIs only.
_ON_OFF = _choice("0", "1")
_TLS = _choice("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", case_sensitive=False)
_PROTOCOL = _choice("3.0", "3.2", "latest")
_LIBPQ: dict[str, _Rule] = {
    "host": _TEXT,
    "hostaddr": _TEXT,
    "port": (_ports, "a port from 1 to 65535, or a comma-separated list of them"),
    "dbname": _TEXT,
    "user": _TEXT,
    "password": _TEXT,
    "passfile": _TEXT,
    "require_auth": _TEXT,
    "channel_binding": _choice("disable", "prefer", "require"),
    "connect_timeout": _integer(0),
    "client_encoding": _TEXT,
    "options": _TEXT,
    "application_name": _TEXT,
    "fallback_application_name": _TEXT,
    "keepalives": _ON_OFF,
    "keepalives_idle": _integer(0),
    "keepalives_interval": _integer(0),
    "keepalives_count": _integer(0),
    "tcp_user_timeout": _integer(0),
    "gssencmode": _choice("disable", "prefer", "require"),
    "sslmode": _choice("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": _choice("postgres", "direct"),
    "sslcompression": _ON_OFF,
    "sslcert": _TEXT,
    "sslkey": _TEXT,
    "sslkeylogfile": _TEXT,
    "sslpassword": _TEXT,
    "sslcertmode": _choice("disable", "allow", "require"),
    "sslrootcert": _TEXT,
    "sslcrl": _TEXT,
    "sslcrldir": _TEXT,
    "sslsni": _ON_OFF,
    "requirepeer": _TEXT,
    "ssl_min_protocol_version": _TLS,
    "ssl_max_protocol_version": _TLS,
    "min_protocol_version": _PROTOCOL,
    "max_protocol_version": _PROTOCOL,
    "krbsrvname": _TEXT,
    "gsslib": _TEXT,
    "gssdelegation": _ON_OFF,
    "service": _TEXT,
    "target_session_attrs": _choice(
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
    ),
    "load_balance_hosts": _choice("disable", "random"),
    "oauth_issuer": _TEXT,
    "oauth_client_id": _TEXT,
    "oauth_client_secret": _TEXT,
    "oauth_scope": _TEXT,
    "ssl": _choice("true"),
}
_LIBPQ_REFUSED = {
    "replication": "a replication connection cannot run the store's queries",
}
_LIBPQ_DOCS = "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS"
_LABEL = {"memory": "memory://", "sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}


def shown(value: str, context: str, safe: str) -> str:
    """``value`` quoted, if the redacted URL shows ``context`` (the text it came from) as is:
    a value cut out of a password that ``redact`` hid must not reappear in the message."""
    return repr(value) if context and context in safe else "(not shown: next to a password)"


def check_options(
    kind: str, scheme: str, query: list[tuple[str, str]], setting: str, safe: str
) -> None:
    """Every query option known to the back end, given once, with a value it accepts."""
    seen: dict[str, int] = {}
    for name, _ in query:
        seen[name] = seen.get(name, 0) + 1
    twice = sorted(name for name, count in seen.items() if count > 1)
    if twice:
        raise StoreConfigError(
            f"{setting}={safe!r}: option(s) {', '.join(twice)} given more than once; give each once"
        )
    rules = {**OURS[kind], **_STORE_READS.get(kind, {})}
    refused: dict[str, str] = {}
    if kind == "redis":
        rules.update(_REDIS_CLIENT[scheme])
        refused = _REDIS_REFUSED
    elif kind == "postgres":
        rules.update(_libpq_rules(setting, safe, [name for name, _ in query]))
        refused = _LIBPQ_REFUSED
    for name, _ in query:
        if name in refused:
            raise StoreConfigError(
                f"{setting}={safe!r}: option {name} is not supported: {refused[name]}; remove it"
            )
    unknown = [name for name, _ in query if name not in rules]
    if kind == "redis":
        for name in unknown:
            schemes = [f"{other}://" for other, known in _REDIS_CLIENT.items() if name in known]
            if schemes:
                raise StoreConfigError(
                    f"{setting}={safe!r}: option {name} applies only to "
                    f"{' and '.join(schemes)} URLs, not {scheme}://; remove it"
                )
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
            for name in unknown
            for close in [difflib.get_close_matches(name, rules, n=1)]
        ]
        accepted = ", ".join(sorted(rules))
        if kind == "postgres":
            accepted += f" (libpq's connection parameters: {_LIBPQ_DOCS})"
        raise StoreConfigError(
            f"{setting}={safe!r}: unknown {_LABEL[kind]} option(s) {', '.join(hints)}; "
            f"accepted: {accepted}"
        )
    for name, value in query:
        ok, accepted = rules[name]
        if not ok(value):
            given = shown(value, f"{name}={value}", safe)
            raise StoreConfigError(
                f"{setting}={safe!r}: option {name}={given} is not valid; {name} must be {accepted}"
            )


def _libpq_rules(setting: str, safe: str, names: list[str]) -> dict[str, _Rule]:
    """The documented libpq parameters, checked against the libpq psycopg actually uses
    (when psycopg is installed): one it does not know would fail on the first connection."""
    known = _installed_libpq()
    if known is None:
        return _LIBPQ
    version, keywords = known
    missing = sorted(n for n in names if n in _LIBPQ and n != "ssl" and n not in keywords)
    if missing:
        raise StoreConfigError(
            f"{setting}={safe!r}: libpq {version}, which psycopg uses here, does not know "
            f"option(s) {', '.join(missing)} (they come with a newer libpq); remove them or "
            "install a psycopg built with a newer libpq (psycopg[binary])"
        )
    newer = {name: _TEXT for name, debug in keywords.items() if not debug}
    return {**newer, **_LIBPQ}


@functools.cache
def _installed_libpq() -> tuple[str, dict[str, bool]] | None:
    """``(version, {keyword: is a debug option})`` of psycopg's libpq, or None without it."""
    try:
        from psycopg import pq
    except ImportError:
        return None
    try:
        number = pq.version()
        keywords = {
            option.keyword.decode(): b"D" in option.dispchar
            for option in pq.Conninfo.get_defaults()
        }
    except Exception:  # pragma: no cover - a libpq that cannot describe itself: skip the check
        return None
    return f"{number // 10000}.{number % 10000}", keywords
