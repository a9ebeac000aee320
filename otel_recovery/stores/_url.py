"""Store URLs: which back end, where, and with which options; plus the SQLite default file.

Parsing is separate from connecting so that a bad ``OTEL_RECOVERY_STORE_URL`` fails at
start-up with a message naming the setting and the accepted schemes, while the connection
itself is made lazily (a store that is down at start-up must not stop the service booting).
Everything the client would only check on its first connection is checked here too: the port
and Redis's database path here, each query option with its value, per scheme, in
:mod:`._url_options`. Every message quotes the URL through
:func:`~otel_recovery._redact.redact`, and a piece of the URL is quoted only where the
redacted URL shows it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreConfigError
from otel_recovery.stores._url_options import DIGITS, OURS, check_options, shown, valid_port

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
    check_options(kind, scheme.lower(), query, setting, safe)
    ours = {k: v for k, v in query if k in OURS[kind]}
    rest = [(k, v) for k, v in query if k not in OURS[kind]]
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
            f"{setting}={safe!r}: a Redis URL names one host, got {shown(hosts, hosts, safe)}; "
            f"e.g. {example}"
        )
    for host in hosts.split(","):
        port = _port_of(host)
        if port and not valid_port(port):
            raise StoreConfigError(
                f"{setting}={safe!r}: port {shown(port, hosts, safe)} is not a number from 1 "
                f"to 65535; write host:port, e.g. {example}"
            )
    if kind == "redis":
        db = unquote(path).strip("/")
        if db and not DIGITS.fullmatch(db):
            raise StoreConfigError(
                f"{setting}={safe!r}: the path of a Redis URL is the database number (an "
                f"integer >= 0), got {shown(db, path, safe)}; e.g. {example}"
            )


def _port_of(host: str) -> str:
    """The port written after ``host`` (``h:5432``, ``[::1]:5432``), or '' if none."""
    if host.startswith("["):
        return host.partition("]")[2].removeprefix(":")
    return host.rpartition(":")[2] if ":" in host else ""


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
