"""Which PostgreSQL server an asyncpg call reaches, named as its breaker and budget are keyed.

A connect is named before anything is sent, so the name comes from its arguments, read
exactly as asyncpg reads them (:func:`dsn_target`): keywords, then the DSN's host list and
query, its service's section, ``PGHOST``/``PGPORT``, then asyncpg's defaults. A pool's
connects are named from the pool's own connect arguments. A name read any other way would
count one server's failures on another server's breaker. A statement is named from its open
connection's address (:func:`connection_target`), in the same form, so that it counts where
its connect did. How hosts, socket directories and host lists are named is psycopg's too
(:mod:`._pg_targets`); what is here is asyncpg's way of finding them. The password is never
read.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
from typing import Any
from urllib.parse import parse_qs, urlparse
from urllib.parse import unquote as url_unquote

from otel_recovery.instrumentors._pg_targets import (
    pg_ambiguous_url,
    pg_service_file,
    pg_socket_target,
    pg_target,
)

__all__ = ["call_target", "connection_target", "dsn_target"]


def dsn_target(
    dsn: Any, host: Any, port: Any, service: Any = None, servicefile: Any = None
) -> tuple[str, int | None] | None:
    """The target a ``connect(dsn, host=, port=, service=, servicefile=)`` call reaches,
    found as asyncpg finds it: keywords, then the DSN's host list, its ``?port=`` and
    ``?host=``, its service's section, ``PGHOST``/``PGPORT``, then asyncpg's defaults (the
    first of its socket directories holding the server's socket, else ``localhost``).
    Several hosts: the whole list (:func:`pg_target`).

    None when the DSN cannot be read, or its password may have been read as its host or
    port (:func:`pg_ambiguous_url`): no name is ever derived from such a DSN, and nothing
    of it is reported (asyncpg raises its own error). The password is never read.
    """
    try:
        members = _members(dsn, host, port, service, servicefile)
    except Exception:  # its message may quote the DSN: asyncpg will say what it cannot read
        return None
    return None if members is None else pg_target(members)


def _members(
    dsn: Any, host: Any, port: Any, service: Any, servicefile: Any
) -> list[tuple[str, int | None]] | None:
    """``[(host, port), ...]`` as asyncpg's ``_parse_connect_dsn_and_args`` picks them."""
    if dsn:
        if not isinstance(dsn, str) or pg_ambiguous_url(dsn, "/?#"):
            return None
        parts = urlparse(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            return None
        query = {
            key: values[-1]
            for key, values in parse_qs(parts.query, strict_parsing=True).items()
        } if parts.query else {}  # fmt: skip
        service = service or query.get("service") or None
        hostspec = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
        if not host and hostspec:
            host, port = _host_list(hostspec, port, unquote=True)
        if not port and query.get("port"):
            port = [int(p) for p in query["port"].split(",")]
        if not host and query.get("host"):
            host, port = _host_list(query["host"], port)
        if service is not None:
            host, port = _from_service(str(service), servicefile, host, port)
    if not host and os.environ.get("PGHOST"):
        host, port = _host_list(os.environ["PGHOST"], port)
    if not port:
        port = _environment_port()
    elif isinstance(port, (list, tuple)):
        port = [int(p) for p in port]
    else:
        port = int(port)
    if not host:
        candidates = ["localhost"] if os.name == "nt" else [*_SOCKET_DIRECTORIES, "localhost"]
        ports = _port_list(candidates, port)
        return [_default_server(candidates, ports)]
    hosts = list(host) if isinstance(host, (list, tuple)) else [host]
    return [(str(h), p) for h, p in zip(hosts, _port_list(hosts, port), strict=True)]


_SOCKET_DIRECTORIES = ("/run/postgresql", "/var/run/postgresql", "/tmp", "/private/tmp")
"""Where asyncpg looks for the server when no host is given, in its order, before
``localhost``."""


def _default_server(candidates: list[str], ports: list[int]) -> tuple[str, int | None]:
    """The first of asyncpg's default hosts it would reach: a socket directory holding the
    server's socket (a directory without one fails at once, and asyncpg tries the next),
    else ``localhost``."""
    for directory, number in zip(candidates[:-1], ports[:-1], strict=True):
        if os.path.exists(f"{directory}/.s.PGSQL.{number}"):
            return directory, number
    return candidates[-1], ports[-1]


def _host_list(spec: str, port: Any, *, unquote: bool = False) -> tuple[list[str], Any]:
    """asyncpg's ``_parse_hostlist``: hosts of ``a:1,[::1]:2,/dir``, and their ports unless
    ``port`` is given."""
    specs = spec.split(",")
    hosts: list[str] = []
    ports: list[int] = []
    if not port:
        defaults = _port_list(specs, _environment_port())
    for index, item in enumerate(specs):
        if item[0] == "/":
            address, item_port = item, ""
        elif item[0] == "[":
            match = re.match(r"(?:\[([^\]]+)\])(?::([0-9]+))?", item)
            if match is None:
                raise ValueError("invalid IPv6 address")
            address, item_port = match.group(1), match.group(2) or ""
        else:
            address, _, item_port = item.partition(":")
        hosts.append(url_unquote(address) if unquote else address)
        if not port:
            text = url_unquote(item_port) if unquote else item_port
            ports.append(int(text) if text else defaults[index])
    return hosts, port or ports


def _environment_port() -> Any:
    """``PGPORT`` (a number, or a list of them), else 5432."""
    spec = os.environ.get("PGPORT")
    if not spec:
        return 5432
    return [int(p) for p in spec.split(",")] if "," in spec else int(spec)


def _port_list(hosts: list[Any], port: Any) -> list[int]:
    """asyncpg's ``_validate_port_spec``: one port per host."""
    if isinstance(port, list) and len(port) > 1:
        if len(port) != len(hosts):
            raise ValueError("port numbers do not match the hosts")
        return port
    if isinstance(port, list):
        return [port[0]] * len(hosts)
    return [port] * len(hosts)


def _from_service(service: str, servicefile: Any, host: Any, port: Any) -> tuple[Any, Any]:
    """Host and port from the service file, where the call gave none (asyncpg reads
    ``servicefile``, else ``PGSERVICEFILE``, else ``~/.pg_service.conf``, with
    ``configparser``)."""
    parser = configparser.ConfigParser()
    parser.read(pg_service_file(servicefile or None))
    if not parser.has_section(service):
        return host, port
    section = parser[service]
    if not port and section.get("port"):
        port = [int(p) for p in section["port"].split(",")]
    if not host and section.get("host"):
        host, port = _host_list(section["host"], port)
    return host, port


_ADDRESSES: dict[Any, tuple[str, int | None]] = {}
"""Targets by connection address (``_addr``): a statement planned in Python finds its
target with one lookup."""


def connection_target(connection: Any) -> tuple[str, int | None]:
    """Host and port of an open connection: ``(host, port)``, or for a unix socket
    (``/dir/.s.PGSQL.5432``) its directory and port, as a connect to it is keyed."""
    address = getattr(connection, "_addr", None)
    try:
        return _ADDRESSES[address]
    except (KeyError, TypeError):
        pass
    if isinstance(address, tuple) and len(address) >= 2:
        target = pg_target([(str(address[0]), int(address[1]))])
    elif isinstance(address, str) and address:
        target = pg_socket_target(address)
    else:
        target = (str(address) if address else "localhost"), None
    with contextlib.suppress(TypeError):  # an address that is not hashable: not kept
        if len(_ADDRESSES) >= 1024:
            _ADDRESSES.clear()
        _ADDRESSES[address] = target
    return target


def call_target(dsn: Any, kwargs: Any) -> tuple[str, int | None] | None:
    """The target of a connect given ``dsn`` and its keyword arguments (a pool's own
    connect arguments for its connects): :func:`dsn_target`."""
    get = kwargs.get
    return dsn_target(dsn, get("host"), get("port"), get("service"), get("servicefile"))
