"""Remove secrets from text before it reaches a span, a log line or a store.

Exception messages from database drivers and HTTP clients routinely echo the DSN, the URL or
the request headers they were given, and those carry passwords and bearer tokens. Anything
otel_recovery records (``ErrorInfo.message``, fingerprints, span attributes, checkpoints) goes
through :func:`redact` first, because telemetry backends are read by far more people than the
secrets were meant for.

The patterns over-redact rather than under-redact: hiding a harmless word next to ``token:`` is
a small loss; leaking a password is not. All regexes are compiled once, anchored so that they
stay linear in the length of the text, and the common case (no trigger word at all) returns after
a few substring checks.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "names_a_secret", "redact"]

MASK = "***"
"""What a secret is replaced with; kept short so redacted messages stay readable."""

# Words whose presence means a secret *might* follow. If none occurs (checked on the lowercased
# text) no regex runs at all, which keeps redaction of ordinary messages in the sub-microsecond
# range.
_TRIGGERS = (
    "://", "pass", "pwd", "secret", "token", "key", "auth", "bearer", "eyj", "credential", "sig",
)  # fmt: skip

# ``Authorization: Bearer abc`` / ``'authorization': 'Basic abc'``: keep the scheme name, which is
# useful when debugging (wrong scheme is a common mistake), and hide the credentials.
_AUTH_HEADER = re.compile(
    r"(?i)(?<![\w-])((?:proxy-)?authorization)(['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(bearer|basic|digest|negotiate|token|ntlm|apikey|aws4-hmac-sha256)\s+)?"
    r"([^\s'\",;]+)"
)

# ``scheme://user:password@host``: the password runs to the *last* ``@`` of the URL, because
# unencoded passwords do contain ``@`` and ``/``. When a URL has a port and an ``@`` later in its
# path this also hides the port and part of the path; that over-redaction is accepted.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s:/@]*):([^\s'\"]+)@")

# JSON Web Tokens: three base64url segments, the first always starting with ``eyJ`` ('{"').
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")

# A bare ``Bearer <token>`` outside an Authorization header (for instance in a curl line).
_BEARER = re.compile(r"(?i)\b(bearer)\s+([A-Za-z0-9._~+/=-]+)")

# ``password=...``, ``db_password: ...``, ``"api_key": "..."``, ``?token=...&``, and the
# query parameters of signed URLs the semantic conventions name for ``url.query``
# (``Signature``, ``sig``, ``X-Goog-Signature``, ``AWSAccessKeyId``). The key must start at
# a word start (the look-behind) so a long word is scanned once, not once per letter.
_KEY_VALUE = re.compile(
    r"(?i)(?<![\w.-])([\w.-]*?(?:password|passwd|passphrase|pwd|secret|token|api[_-]?key|apikey"
    r"|private[_-]?key|credentials?|auth|signature|sig|accesskeyid))(['\"]?\s*[:=]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s&;,'\")\]}]+)"
)


# A name whose value is a secret: ``password``, ``db_password``, ``api_key``, ``X-Api-Key``,
# ``access_token``, ``client_secret``, ``Authorization``, ``session_cookie``. The secret
# word ends the name, as in the key-value pattern above.
_SECRET_NAME = re.compile(
    r"(?i)(?:password|passwd|passphrase|pwd|secret|token|api[_-]?key|apikey|private[_-]?key"
    r"|credentials?|auth|authorization|signature|sig|accesskeyid|cookie)$"
)


def names_a_secret(name: str) -> bool:
    """Whether a value stored under ``name`` (a context key, a header) is a secret as a
    whole: its text need not look like one (``{"password": "hunter2"}``)."""
    return bool(_SECRET_NAME.search(name))


def _auth_header(match: re.Match[str]) -> str:
    scheme = match.group(3)
    shown = f"{scheme} {MASK}" if scheme else MASK
    return f"{match.group(1)}{match.group(2)}{shown}"


def _key_value(match: re.Match[str]) -> str:
    value = match.group(3)
    quote = value[0] if value[0] in "'\"" else ""
    return f"{match.group(1)}{match.group(2)}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """Return ``text`` with passwords, tokens and credentials replaced by ``***``.

    Never raises: observability code calls this on arbitrary exception messages and must not
    turn a failure it is reporting into a different one.
    """
    if not isinstance(text, str):
        try:
            text = str(text)
        except Exception:
            return ""
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    text = _AUTH_HEADER.sub(_auth_header, text)
    text = _URL_USERINFO.sub(rf"\1\2:{MASK}@", text)
    text = _JWT.sub(MASK, text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    return _KEY_VALUE.sub(_key_value, text)
