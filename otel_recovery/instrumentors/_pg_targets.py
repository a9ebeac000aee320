"""The target a PostgreSQL connect or statement counts on, spelled one way for both drivers.

A connect and the statements on its connection must count on one breaker, though a server
is named in more than one way: a unix-socket directory through a link or by its real path,
with or without a trailing ``/``, or by a socket's file (what asyncpg keeps as a
connection's address). :func:`pg_host` and :func:`pg_socket_target` give the one spelling,
:func:`pg_target` the target of a connect to several hosts. The drivers' connection
parameters are read as they read them: the service file first (:func:`pg_service_file`),
and a URL whose password may have been read as its host names no target at all
(:func:`pg_ambiguous_url`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "pg_ambiguous_url",
    "pg_host",
    "pg_service_file",
    "pg_socket_target",
    "pg_target",
]


def pg_host(host: str) -> str:
    """A PostgreSQL host in the one spelling connects and statements share: a unix-socket
    directory by its real path (``/var/run/postgresql`` is ``/run/postgresql`` where
    ``/var/run`` links to ``/run``, as on Debian, and asyncpg looks in ``/run/postgresql``
    first), without a trailing ``/``; anything else as given."""
    if host[:1] == "/":
        return _socket_directory(host)
    return host


@functools.lru_cache(maxsize=64)
def _socket_directory(directory: str) -> str:
    """The real path of a socket directory (cached: asked at connects and a connection's
    first statement, never per call); as given, less a trailing ``/``, if it cannot be
    resolved."""
    try:
        return os.path.realpath(directory)
    except (OSError, ValueError):
        return directory.rstrip("/") or "/"


def pg_socket_target(path: str) -> tuple[str, int | None]:
    """``(directory, port)`` of a unix socket's path (``/run/postgresql/.s.PGSQL.5432``, what
    asyncpg keeps as a connection's address): the target a connect to that directory and
    port counts on."""
    directory, _, name = path.rpartition("/")
    if name.startswith(".s.PGSQL.") and name[9:].isdigit():
        return pg_host(directory or "/"), int(name[9:])
    return pg_host(path), None


def pg_target(members: Iterable[tuple[str, int | None]]) -> tuple[str, int | None]:
    """The target of a connect that reaches the first of ``members`` that answers.

    One server: its ``(host, port)``. Several (a multi-host connection string, a host list):
    the whole list is the target, ``("a:5432,b:5433", None)``, named ``<library>
    a:5432,b:5433``: a circuit that one dead member opened never refuses the connects that
    would fail over to the others. Statements count on the server actually reached.
    """
    unique = list(dict.fromkeys((pg_host(host), port) for host, port in members))
    if len(unique) == 1:
        return unique[0]
    return ",".join(_member(host, port) for host, port in unique), None


def _member(host: str, port: int | None) -> str:
    """One member of a multi-host target: an IPv6 address in brackets, so the list reads
    back (``[::1]:5432,[::2]:5432``)."""
    if ":" in host and not host.startswith("/"):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def pg_service_file(servicefile: Any) -> str:
    """The service file both drivers read first: the ``servicefile`` parameter, else
    ``PGSERVICEFILE``, else ``~/.pg_service.conf``."""
    path = servicefile if servicefile is not None else os.environ.get("PGSERVICEFILE")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".pg_service.conf")
    return str(path)


def pg_ambiguous_url(text: str, ends: str) -> bool:
    """Whether a connection URL's password may have been read as its host or port.

    A password holding an unescaped character that ends the authority (``/`` for libpq;
    ``/``, ``?`` or ``#`` for asyncpg's ``urlparse``) cuts it short: in
    ``postgresql://user:4242/pw@db/x`` the driver sees host ``user``, port ``4242``, and an
    ``@`` after the authority. An ``@`` in the password (two ``@`` in the authority, or
    one there and another after it) puts the password's tail in the host. No target is
    derived from such a URL, so no breaker, metric or span is named after it. (A URL whose
    authority holds a ``:`` or an ``@`` and whose path or query holds a raw ``@``, such as
    ``?user=a@b``, is taken for one too: its connect runs uninstrumented.)
    """
    _, sep, rest = text.partition("://")
    if not sep:
        return False
    end = min((i for i in map(rest.find, ends) if i >= 0), default=len(rest))
    authority = rest[:end]
    if authority.count("@") > 1:
        return True
    # an @ after the authority, which holds a : or an @: the password was cut short there
    # (``user:4242/pw@db``, ``user:Sup3r@S3cret/x@db``, whose tail became the host)
    return "@" in rest[end:] and (":" in authority or "@" in authority)
