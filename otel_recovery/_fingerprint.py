"""Stable fingerprints that group occurrences of "the same" error.

Two requests failing with ``Connection refused to 10.0.0.3:5432 after 312 ms`` and
``... 10.0.0.4:5432 after 298 ms`` are one problem, not two. The fingerprint hashes the error
type, its code and the message with the variable parts (addresses, ids, numbers, quoted values)
replaced by placeholders, so repeat detection, the strategy learner and dashboards can count
them together, while a different type, code or wording still gives a different fingerprint.

Secrets are redacted before anything else so that a fingerprint can never be used to confirm a
guessed password (the hash input holds no secret); for the same reason the values a message
quotes from a row (``Key (email)=(...)``), emails and query-string values are not part of it.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from otel_recovery._redact import redact_bounded

__all__ = ["fingerprint", "normalise_message"]

_MAX_NORMALISED_INPUT = 2048
"""Longer messages are cut first: the tail rarely distinguishes errors and costs time."""

_HEX = "0-9A-Fa-f"
# Applied in order; each placeholder contains no character a later pattern could match.
# Personal data never reaches the hash: ``redact`` has already replaced the row values of
# database errors (``Key (email)=(***)``, ``Failing row contains (***)``), and emails and
# query-string values become placeholders here, so a fingerprint cannot be matched against a
# dictionary of candidate values, and one failure with different values groups together.
_REPLACEMENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"\b[{_HEX}]{{8}}-(?:[{_HEX}]{{4}}-){{3}}[{_HEX}]{{12}}\b"), "<uuid>"),
    # alice@example.com, and alice%40example.com in a URL (the look-behind starts the local
    # part where its run starts, so a long run is scanned once)
    (re.compile(r"(?<![\w.+%-])[\w.+%-]+(?:@|%40)[\w-]+(?:\.[\w-]+)+"), "<email>"),
    # ?q=alice&page=2 and #frag=x: the values, not the names
    (re.compile(r"(?<=[?&#])([\w.\[\]-]+=)[^&#\s'\"]+"), r"\1<val>"),
    (re.compile(r"""(?<!\w)(?:'[^'\n]*'|"[^"\n]*")(?!\w)"""), "<str>"),
    # [2001:db8::1]:8080
    (re.compile(rf"\[[{_HEX}:.]*:[{_HEX}:.%\w]*\](?::\d{{1,5}})?"), "<addr>"),
    # 10.0.0.3 and 10.0.0.3:5432
    (re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])"), "<addr>"),
    # bare IPv6: fe80::1, 2001:db8:0:0:0:0:0:1 (also swallows hh:mm:ss, harmlessly)
    (re.compile(rf"(?<![\w:])[{_HEX}]{{0,4}}(?::[{_HEX}]{{0,4}}){{2,7}}(?![\w:.])"), "<addr>"),
    # db.internal:5432, redis:6379
    (re.compile(r"(?<![\w.-])[A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*:\d{1,5}\b"), "<addr>"),
    # 0x7f3a9c2e, and long hex runs containing at least one letter (pure digit runs are numbers,
    # so that "after 9999999 ms" and "after 10000000 ms" normalise alike)
    (re.compile(rf"\b0[xX][{_HEX}]+\b|\b(?=\d*[A-Fa-f])[{_HEX}]{{8,}}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<num>"),
    (re.compile(r"\s+"), " "),
)


@lru_cache(maxsize=4096)
def normalise_message(message: str) -> str:
    """Redact ``message``, replace its variable parts by placeholders, lowercase it.

    ``"Connection refused to 10.0.0.3:5432 after 312 ms"`` becomes
    ``"connection refused to <addr> after <num> ms"``.
    """
    text = redact_bounded(message, _MAX_NORMALISED_INPUT)
    for pattern, placeholder in _REPLACEMENTS:
        text = pattern.sub(placeholder, text)
    return text.strip().lower()


@lru_cache(maxsize=4096)
def fingerprint(error_type: str, code: str | None, message: str) -> str:
    """16 hex characters identifying the error type, code and normalised message.

    SHA-1 is used as a well-distributed, stable hash, not for security; 64 bits make
    accidental collisions between the few thousand live fingerprints negligible.
    """
    material = f"{error_type}|{code or ''}|{normalise_message(message)}"
    return hashlib.sha1(
        material.encode("utf-8", "surrogatepass"), usedforsecurity=False
    ).hexdigest()[:16]
