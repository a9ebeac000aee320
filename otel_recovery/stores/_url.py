"""Store URLs: which back end, where, and with which options; plus the SQLite default file.

Parsing is separate from connecting so that a bad ``OTEL_RECOVERY_STORE_URL`` fails at
start-up with a message naming the setting and the accepted schemes, while the connection
itself is made lazily (a store that is down at start-up must not stop the service booting).
Everything the client would only check on its first connection is checked here too: the port,
Redis's database path, and each query option with its value, per scheme. Every message quotes
the URL through :func:`~otel_recovery._redact.redact`, and a piece of the URL is quoted only
where the redacted URL shows it.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreConfigError

__all__ = [
    "ACCEPTED",
    "ENV_STORE_URL",
    "StoreURL",
    "default_sqlite_path",
    "default_store_url",
    "parse_store_url",
]

ENV_STORE_URL = "OTEL_RECOVERY_STORE_URL"
ACCEPTED = (
    "memory://, sqlite:///relative/path.db or sqlite:////absolute/path.db (sqlite:// alone "
    "is the default file), redis://, rediss://, unix:// (Redis), postgresql:// or postgres://"
)
_KINDS = {
    "memory": "memory",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "postgresql": "postgres",
    "postgres": "postgres",
}

# -- what each back end accepts in the query string ----------------------------------------------
#
# A rule is (is this value acceptable, what is accepted). Options are checked here, at start-up,
# because the client libraries only look at them on the first connection: redis-py passes an
# unknown one to its connection class (a TypeError on first use), libpq refuses it then.


_Rule = tuple[Callable[[str], bool], str]
_DIGITS = re.compile(r"[0-9]+")


def _integer(minimum: int) -> _Rule:
    return (
        lambda value: bool(_DIGITS.fullmatch(value)) and int(value) >= minimum,
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
    return all(not part or _valid_port(part) for part in value.split(","))


def _valid_port(text: str) -> bool:
    return bool(_DIGITS.fullmatch(text)) and 1 <= int(text) <= 65535


_TEXT: _Rule = (lambda value: True, "any text")
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,40}")

# Options otel-recovery reads itself; they are removed before the URL reaches the client.
_OURS: dict[str, dict[str, _Rule]] = {
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
_EXAMPLE = {
    "redis": "redis://127.0.0.1:6379/0",
    "rediss": "rediss://cache.example:6380/0",
    "postgres": "postgresql://user@127.0.0.1:5432/dbname",
}


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL. ``target`` is what the client library is given (options removed)."""

    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)
    safe: str = ""
    """The URL with any password replaced by ``***``."""

    def int_option(self, name: str, default: int, *, minimum: int = 1) -> int:
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise StoreConfigError(
                f"store URL {self.safe}: option {name}={raw!r} must be an integer >= {minimum}"
            )
        return value


def default_sqlite_path() -> Path:
    """``$XDG_STATE_HOME/otel-recovery/state.db``, else ``~/.local/state/otel-recovery/state.db``.

    State (not cache, not config) is what the XDG base-directory spec's ``XDG_STATE_HOME`` is
    for: data that should survive a restart but is not worth backing up. On Windows the
    equivalent is ``%LOCALAPPDATA%\\otel-recovery\\state.db``.
    """
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "otel-recovery" / "state.db"
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "otel-recovery" / "state.db"


def default_store_url() -> str:
    """``OTEL_RECOVERY_STORE_URL`` when set, else ``sqlite://`` (the default file)."""
    return os.environ.get(ENV_STORE_URL, "").strip() or "sqlite://"


def parse_store_url(url: str, *, setting: str = ENV_STORE_URL) -> StoreURL:
    """Validate ``url`` and split it into back end, client target and our options."""
    if not isinstance(url, str) or not url.strip():
        raise StoreConfigError(
            f"{setting} must be a store URL, got {url!r}; accepted schemes: {ACCEPTED}"
        )
    url = url.strip()
    safe = redact(url)
    scheme, sep, _ = url.partition("://")
    kind = _KINDS.get(scheme.lower()) if sep else None
    if kind is None:
        raise StoreConfigError(
            f"{setting}={safe!r} is not a store URL this version understands; "
            f"accepted schemes: {ACCEPTED}"
        )
    try:
        parts = urlsplit(url)
    except ValueError:  # a [bracketed] host that is no IPv6 address; its text may hold secrets
        raise StoreConfigError(
            f"{setting}={safe!r} is not a valid URL: a host in [brackets] must be an IPv6 "
            f"address, e.g. {_EXAMPLE.get(kind, 'redis://[::1]:6379/0')}"
        ) from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    _check_options(kind, scheme.lower(), query, setting, safe)
    ours = {k: v for k, v in query if k in _OURS[kind]}
    rest = [(k, v) for k, v in query if k not in _OURS[kind]]
    if kind == "memory":
        if parts.netloc or parts.path.strip("/"):
            raise StoreConfigError(
                f"{setting}={safe!r}: memory:// takes no host, path or options other than "
                "max_versions"
            )
        return StoreURL(kind, "", ours, safe)
    if kind == "sqlite":
        return StoreURL(kind, _sqlite_path(parts.netloc, parts.path, setting, safe), ours, safe)
    if not parts.netloc and kind == "postgres" and not rest:
        raise StoreConfigError(
            f"{setting}={safe!r}: a PostgreSQL URL needs a host, e.g. "
            "postgresql://user@127.0.0.1:5432/dbname"
        )
    _check_location(kind, scheme.lower(), parts.netloc, parts.path, setting, safe)
    # Built by hand: urlunsplit drops the "//" of unix:///path and postgresql:///db, and
    # urlencode's default writes spaces as "+", which libpq does not decode.
    target = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if rest:
        target += "?" + urlencode(rest, quote_via=quote)
    return StoreURL(kind, target, ours, safe)


def _shown(value: str, context: str, safe: str) -> str:
    """``value`` quoted, if the redacted URL shows ``context`` (the text it came from) as is:
    a value cut out of a password that ``redact`` hid must not reappear in the message."""
    return repr(value) if context and context in safe else "(not shown: next to a password)"


def _check_location(
    kind: str, scheme: str, netloc: str, path: str, setting: str, safe: str
) -> None:
    """Ports (libpq's multi-host form included) and, for Redis, the database number."""
    if scheme == "unix":
        if not unquote(path).strip("/"):
            raise StoreConfigError(
                f"{setting}={safe!r}: unix:// needs the Redis socket's path, e.g. "
                "unix:///run/redis/redis.sock?db=0"
            )
        return
    hosts = netloc.rpartition("@")[2]
    example = _EXAMPLE["postgres" if kind == "postgres" else scheme]
    if kind == "redis" and "," in hosts:
        raise StoreConfigError(
            f"{setting}={safe!r}: a Redis URL names one host, got {_shown(hosts, hosts, safe)}; "
            f"e.g. {example}"
        )
    for host in hosts.split(","):
        port = _port_of(host)
        if port and not _valid_port(port):
            raise StoreConfigError(
                f"{setting}={safe!r}: port {_shown(port, hosts, safe)} is not a number from 1 "
                f"to 65535; write host:port, e.g. {example}"
            )
    if kind == "redis":
        db = unquote(path).strip("/")
        if db and not _DIGITS.fullmatch(db):
            raise StoreConfigError(
                f"{setting}={safe!r}: the path of a Redis URL is the database number (an "
                f"integer >= 0), got {_shown(db, path, safe)}; e.g. {example}"
            )


def _port_of(host: str) -> str:
    """The port written after ``host`` (``h:5432``, ``[::1]:5432``), or '' if none."""
    if host.startswith("["):
        return host.partition("]")[2].removeprefix(":")
    return host.rpartition(":")[2] if ":" in host else ""


def _check_options(
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
    rules = {**_OURS[kind], **_STORE_READS.get(kind, {})}
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
            shown = _shown(value, f"{name}={value}", safe)
            raise StoreConfigError(
                f"{setting}={safe!r}: option {name}={shown} is not valid; {name} must be {accepted}"
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


def _sqlite_path(netloc: str, path: str, setting: str, safe: str) -> str:
    if netloc:
        raise StoreConfigError(
            f"{setting}={safe!r}: SQLite URLs have no host; use sqlite:///relative.db or "
            "sqlite:////absolute/path.db (note the slashes)"
        )
    # SQLAlchemy's convention, which users already know: sqlite:///rel.db is relative,
    # sqlite:////abs.db is absolute; sqlite:// alone means the default file.
    relative = path[1:] if path.startswith("/") else path
    if not relative:
        return str(default_sqlite_path())
    if relative == ":memory:":
        raise StoreConfigError(
            f"{setting}={safe!r}: an in-memory SQLite database is private to one connection; "
            "use memory:// instead"
        )
    return os.path.expanduser(relative)
