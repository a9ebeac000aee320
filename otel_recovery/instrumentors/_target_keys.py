"""A target section's key, and the targets calls name that it stands for.

A call finds its ``[targets."..."]`` section by the target it names, spelled the way its
instrumentor spells it; a key written any other way would load without a word and never
apply. So a target section's key is found under every spelling of the target it names
(:func:`target_spellings`): as written, and with its host the way the instrumentors name it,
lowercased (the HTTP instrumentors lowercase hosts), without the brackets around an IPv6
address (``[::1]:5432`` is the target ``::1:5432``), and an internationalised host both as
Unicode and IDNA-encoded (``bücher.example`` and ``xn--bcher-kva.example``: httpx and aiohttp
name it in Unicode, requests as the URL spelled it). A socket path or a name with a space in
it (``mymaster replicas@...``) is kept as written. A key that cannot be a target's (an
unclosed bracket, a port that is not a number, a host IDNA cannot encode) is an error naming
the key and the fix.

A Redis Sentinel service's name carries its deployment (``mymaster replicas@<sentinels>``);
the section for the service's name alone covers every deployment's (:func:`sentinel_service`).
"""

from __future__ import annotations

import ipaddress
import os
import re

from otel_recovery.instrumentors._setting_values import SettingsError

__all__ = ["sentinel_service", "target_spellings"]

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


def sentinel_service(name: str) -> str:
    """``"svc replicas"`` of a Redis Sentinel service's name with its deployment,
    ``"svc replicas@<sentinels>"`` (or ``master``), whose section covers every deployment's;
    ``""`` for any other name."""
    service, at, _ = name.partition("@")
    return service if at and service.endswith((" replicas", " master")) else ""
