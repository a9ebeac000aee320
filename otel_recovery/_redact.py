"""Remove secrets from text before it reaches a span, a log line or a store.

Exception messages from database drivers and HTTP clients routinely echo the DSN, the URL or
the request headers they were given, and those carry passwords and bearer tokens; database
errors also quote the row values they rejected (``Key (email)=(alice@example.com) already
exists.``). Anything otel_recovery records (``ErrorInfo.message``, fingerprints, span
attributes, checkpoints) goes through :func:`redact` first, because telemetry backends are read
by far more people than the secrets were meant for.

The patterns over-redact rather than under-redact: hiding a harmless word next to ``token:`` is
a small loss; leaking a password is not. Every pattern is linear in the length of the text:
the regexes are anchored (a look-behind makes a name or a URL scheme start only where a word
starts, so a long word is scanned once, not once per letter), their alternatives cannot match
the same text two ways, and the scans with a search inside them (a URL's userinfo, a
PostgreSQL ``Key (...)=(...)``) are written as code that moves forward only. The common case
(no trigger word at all) returns after a few substring checks.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "name_text", "names_a_secret", "redact", "redact_bounded"]

MASK = "***"
"""What a secret is replaced with; kept short so redacted messages stay readable."""

# Words whose presence means a secret *might* follow. If none occurs (checked on the lowercased
# text) no regex runs at all, which keeps redaction of ordinary messages in the sub-microsecond
# range.
_TRIGGERS = (
    "://", "pass", "pw", "secret", "token", "key", "auth", "bearer", "eyj", "credential", "sig",
    "session", "sessid", "cookie", "failing row", "duplicate entry",
)  # fmt: skip

# The names whose value is a secret, as the *end* of a longer name (``db_password``,
# ``aws_secret_access_key``, ``X-Api-Key``, ``JSESSIONID``). ``key`` alone (the ``key=`` of
# API-key query strings) is matched separately, as a whole name only: ``primary_key`` and
# ``monkey`` are not secrets.
_NAMES = (
    r"password|passwd|passphrase|passcode|pwd|pw|secret|token|api[_-]?key|apikey"
    r"|(?:private|secret|access|account|signing|encryption|master|client)[_-]?key"
    r"|access[_-]?key[_-]?id|accesskeyid|credentials?|auth|signature|sig"
    r"|session(?:[_-]?(?:id|key))?|sessid|cookie2?"
)

# ``Authorization: Bearer abc`` / ``'authorization': 'Basic abc'``: keep the scheme name, which is
# useful when debugging (wrong scheme is a common mistake), and hide the credentials.
_SCHEMES = r"bearer|basic|digest|negotiate|token|ntlm|apikey|aws4-hmac-sha256"
_AUTH_HEADER = re.compile(
    r"(?i)(?<![\w-])((?:proxy-)?authorization)(['\"]?\s*[:=]\s*['\"]?)"
    rf"(?:({_SCHEMES})\s+)?"
    r"([^\s'\",;]+)"
)

# ``Cookie: a=1; b=2`` / ``Set-Cookie: sid=x; HttpOnly`` as a header line (the name not in
# quotes): every cookie is a potential session, so the whole rest of the line goes. The quoted
# forms (``{'Cookie': '...'}``) are the key-value and pair patterns' business.
_COOKIE_LINE = re.compile(r"(?i)(?<![\w-])((?:set-)?cookie2?)([ \t]*:[ \t]*)([^\r\n]+)")

# ``scheme://``: the start of a URL whose userinfo (``user:password@``) is masked by
# :func:`_mask_userinfo`. The look-behind starts the scheme where its run of letters starts.
_SCHEME = re.compile(r"(?i)(?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]*://")
_USER_ONLY = re.compile(r"[^\s/?#@:]+@")
_USER_COLON = re.compile(r"[^\s/?#@:]*:")
_WORD = re.compile(r"[^\s]+")
_USERINFO_SPAN = 256
"""How far after ``scheme://`` the ``@`` ending a userinfo is looked for."""
_USERINFO_WORDS = 5
"""A password may hold spaces: up to this many words are searched for the ``@``."""
# A userinfo without a colon is a user name (``postgresql://app@db``, shown: it helps debugging)
# unless it looks like a token (``https://ghp_...@github.com``): 16 characters or more, or a
# prefix that issuers put on their tokens.
_TOKEN_LENGTH = 16
_TOKEN_PREFIX = re.compile(
    r"(?:gh[pousr]_|github_pat_|glpat-|gldt-|xox[a-z]-|sk[-_]|rk_|pk_|npm_|pypi-|hf_|AKIA|ASIA)"
)

# JSON Web Tokens: three base64url segments, the first always starting with ``eyJ`` ('{"').
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")

# A bare ``Bearer <token>`` outside an Authorization header (for instance in a curl line):
# the whole run of token characters goes. A ``name=value`` right after the word is the next
# parameter, not a token (``token_type=bearer expires_in=3600``, a challenge's
# ``Bearer realm="api"``), and stays readable; a padded token (``dG9rZW4=``, then a space or
# a closing quote) has nothing after its ``=`` and is masked.
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?![A-Za-z_]\w*=[\"']?\w)([A-Za-z0-9._~+/=-]+)")

# ``-----BEGIN RSA PRIVATE KEY-----`` ... ``-----END RSA PRIVATE KEY-----`` (PEM, OpenSSH, PGP):
# the body goes; a block cut before its END line is masked to the end of the text.
_PEM = re.compile(
    r"(-----BEGIN [A-Z0-9 ]{0,40}?PRIVATE KEY(?: BLOCK)?-----)"
    r"[\s\S]*?"
    r"(-----END [A-Z0-9 ]{0,40}?PRIVATE KEY(?: BLOCK)?-----|\Z)"
)

# A value: a quoted string (backslash escapes honoured; one cut off before its closing quote
# runs to the end), a bracketed tuple/list/dict (one level of nesting), or a bare word. A bare
# word runs through ``;``, ``,`` and ``&`` unless the next ``name=`` follows, so that
# ``password=abc;def`` loses all of ``abc;def`` while ``token=abc&page=2`` keeps ``page=2``.
_VALUE = (
    r"\"(?:[^\"\\]|\\[\s\S])*\"?"
    r"|'(?:[^'\\]|\\[\s\S])*'?"
    r"|\((?:[^()]|\([^()]*\))*\)?"
    r"|\[(?:[^\[\]]|\[[^\[\]]*\])*\]?"
    r"|\{(?:[^{}]|\{[^{}]*\})*\}?"
    r"|[^\s&;,'\"()\[\]{}](?:[^\s&;,'\")\]}]|[&;,](?![ \t]*[\w.\[\]-]+[ \t]*=))*"
)

# ``password=...``, ``db_password: ...``, ``"api_key": "..."``, ``?token=...&``, ``key=...``,
# and the query parameters of signed URLs the semantic conventions name for ``url.query``
# (``Signature``, ``sig``, ``X-Goog-Signature``, ``AWSAccessKeyId``). The key must start at
# a word start (the look-behind) so a long word is scanned once, not once per letter. A value
# already masked is left alone: ``https://x-access-token:***@github.com`` keeps its host.
_KEY_VALUE = re.compile(
    rf"(?i)(?<![\w.-])(?<!://)([\w.-]*?(?:{_NAMES})|key)(['\"]?\s*[:=]\s*)"
    rf"(?!{re.escape(MASK)}(?:[@\s&;,'\")\]}}]|$))({_VALUE})"
)

# ``('Authorization', 'Basic abc')`` / ``[('X-Api-Key', 'k')]``: header lists as (name, value)
# pairs, the way HTTP clients print them.
_PAIR = re.compile(
    rf"(?i)(?<=[(\[])(['\"])([\w.-]*?(?:{_NAMES}|authorization)|key)\1(\s*,\s*)"
    rf"(['\"])(?:({_SCHEMES})\s+)?(?:(?!\4)[^\\]|\\[\s\S])*(\4?)"
)

# Row values quoted by database errors. PostgreSQL: ``Key (email)=(alice@x.com) already
# exists.`` (also ``is not present in table``, ``is still referenced``, ``conflicts with``,
# ``is duplicated``) and ``Failing row contains (1, alice@x.com).``; MySQL: ``Duplicate entry
# 'alice@x.com' for key 'users.email'``. The column names stay, the values go. Each pattern
# takes the rest of the line and :func:`_pg_keys` / :func:`_failing_row` trim it in code, so a
# line full of ``Key (`` is scanned once.
_PG_KEY = re.compile(r"(?i)\bkey \([^\r\n]*")
_PG_KEY_END = re.compile(
    r"\)(?= already exists| is not present| is still referenced| conflicts with| is duplicated)"
)
_FAILING_ROW = re.compile(r"(?i)(\bfailing row contains \()([^\r\n]*)")
_DUPLICATE_ENTRY = re.compile(r"(?i)(\bduplicate entry )('(?:[^'\\]|\\[\s\S])*'?)")


# A name whose value is a secret: ``password``, ``db_password``, ``api_key``, ``X-Api-Key``,
# ``access_token``, ``client_secret``, ``Authorization``, ``session_cookie``, ``session_id``,
# ``private_key_pem``; also personal data a context should not export whole (``ssn``, ``pin``,
# ``cvv``, card numbers). The secret word ends the name, or is followed by a suffix naming an
# encoding of the same value (``_id``, ``_pem``, ``_b64``, ``_hash``, ``_value``).
_SECRET_NAME = re.compile(
    rf"(?i)(?:{_NAMES}|authorization|(?<!\w)key"
    r"|(?<![a-z0-9])(?:pin|ssn|cvv|cvc)|credit[_-]?card|card[_-]?number"
    r"|(?<![a-z0-9])e[_-]?mail(?:[_-]?address)?)"
    r"(?:[_.-]?(?:id|pem|b64|base64|hash|value))?$"
)
_MAX_NAME_PARTS = 8
_NAME_PUNCTUATION = " \t\r\n'\"()[]{},:="


def name_text(name: object) -> str:
    """``name`` (a context key, a header name) as text: bytes decoded, a tuple's parts joined
    with ``.``, surrounding whitespace removed. Never raises."""
    try:
        if isinstance(name, (bytes, bytearray)):
            return bytes(name).decode("utf-8", "replace").strip()
        if isinstance(name, tuple):
            return ".".join(name_text(part) for part in name[:_MAX_NAME_PARTS])
        return (name if isinstance(name, str) else str(name)).strip()
    except Exception:
        return ""


def names_a_secret(name: object) -> bool:
    """Whether a value stored under ``name`` (a context key, a header) is a secret as a
    whole: its text need not look like one (``{"password": "hunter2"}``).

    ``name`` may be bytes (``b"password"``), padded (``"password "``) or a tuple of parts
    (``("db", "password")``, a secret if any part names one).
    """
    if isinstance(name, tuple):
        return any(names_a_secret(part) for part in name[:_MAX_NAME_PARTS])
    # the quotes and brackets of a name that was already stringified (``"b'password'"``)
    return bool(_SECRET_NAME.search(name_text(name).strip(_NAME_PUNCTUATION).casefold()))


def _auth_header(match: re.Match[str]) -> str:
    scheme = match.group(3)
    shown = f"{scheme} {MASK}" if scheme else MASK
    return f"{match.group(1)}{match.group(2)}{shown}"


_CLOSING = {'"': '"', "'": "'", "(": ")", "[": "]", "{": "}"}


def _masked_value(value: str) -> str:
    """``***`` in the value's own quotes or brackets (the closing one only if it had one)."""
    opening = value[0]
    closing = _CLOSING.get(opening)
    if closing is None:
        return MASK
    return f"{opening}{MASK}{closing if len(value) > 1 and value.endswith(closing) else ''}"


def _key_value(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2)}{_masked_value(match.group(3))}"


def _pair(match: re.Match[str]) -> str:
    quote, name, separator, opening, scheme, closing = match.groups()
    shown = f"{scheme} {MASK}" if scheme else MASK
    return f"{quote}{name}{quote}{separator}{opening}{shown}{closing}"


def _mask_userinfo(text: str) -> str:
    """Mask everything between ``scheme://`` and the ``@`` that precedes the host.

    ``user:password@``: the user stays; the password runs to the *last* ``@`` of its word,
    because unencoded passwords do contain ``@``, ``/``, quotes; and when the word after the
    colon holds no ``@``, to the ``@`` of one of the next few words, because they also contain
    spaces (``postgresql://u:correct horse@db``). When a URL has a port and an ``@`` later in
    its path or on the same line this also hides the port and part of what follows; that
    over-redaction is accepted. ``token@`` (a userinfo without a colon, as GitHub tokens are
    given) is masked whole when it looks like a token rather than a user name.
    """
    pieces: list[str] = []
    done = 0
    for scheme in _SCHEME.finditer(text):
        start = scheme.end()
        if scheme.start() < done:
            continue  # inside a userinfo already masked
        end = text.find("\n", start, start + _USERINFO_SPAN)
        window = text[start : start + _USERINFO_SPAN] if end < 0 else text[start:end]
        only = _USER_ONLY.match(window)
        if only is not None:
            if only.end() > _TOKEN_LENGTH or _TOKEN_PREFIX.match(window):
                pieces += (text[done:start], MASK)
                done = start + only.end() - 1
            continue
        user = _USER_COLON.match(window)
        if user is None:
            continue
        at = -1
        for number, word in enumerate(_WORD.finditer(window, user.end())):
            if (number == 0 and word.start() != user.end()) or number >= _USERINFO_WORDS:
                break
            at = window.rfind("@", word.start(), word.end())
            if at >= 0:
                break
        if at < 0:
            continue
        name = window[: user.end() - 1]
        if len(name) > _TOKEN_LENGTH or _TOKEN_PREFIX.match(name):
            # the token in the user slot (``ghp_...:x-oauth-basic@``, ``AKIA...:secret@``)
            pieces += (text[done:start], MASK)
        else:
            pieces += (text[done : start + user.end()], MASK)
        done = start + at
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _pg_keys(match: re.Match[str]) -> str:
    """``Key (col)=(value) ...`` to ``Key (col)=(***) ...``, for every key on the line."""
    line = match.group(0)
    pieces: list[str] = []
    done = 0
    while True:
        equals = line.find(")=(", done)
        if equals < 0:
            break
        start = equals + 3
        end = _PG_KEY_END.search(line, start)
        if end is not None:
            stop = end.start()
        else:
            stop = line.rfind(")", start)
            stop = len(line) if stop < 0 else stop
        pieces += (line[done:start], MASK)
        done = stop
        if end is None:
            break
    if not pieces:
        return line
    pieces.append(line[done:])
    return "".join(pieces)


def _failing_row(match: re.Match[str]) -> str:
    rest = match.group(2)
    close = rest.rfind(")")
    return f"{match.group(1)}{MASK}{rest[close:] if close >= 0 else ''}"


_REDACT_SPAN = 65_536
"""How much of a text is redacted before it is cut to its displayed length."""

_TRAILING_WORD = re.compile(r"\S+$")


def redact_bounded(text: str, limit: int) -> str:
    """``redact(text)`` cut to ``limit`` characters, the redaction first: cut first, a
    secret straddling the cut loses the end its pattern needs (the ``@`` after a password,
    a token's second part) and is shown half, and masks shrinking the text before it pull
    that half into the shown part. A text longer than :data:`_REDACT_SPAN` is cut there,
    at a point that cannot split a secret: before a URL whose userinfo does not end within
    the kept part, and before its last word."""
    if len(text) > _REDACT_SPAN:
        text = _safe_cut(text, _REDACT_SPAN)
    return redact(text)[:limit]


def _safe_cut(text: str, at: int) -> str:
    kept = text[:at]
    scheme = kept.rfind("://")
    if scheme >= 0 and "@" not in kept[scheme:] and at - scheme <= _USERINFO_SPAN:
        kept = kept[: scheme + 3]  # its userinfo, if any, runs past the cut
    return _TRAILING_WORD.sub("", kept)  # a token cut in two is no token to the patterns


def redact(text: str) -> str:
    """Return ``text`` with passwords, tokens, credentials and quoted row values replaced by
    ``***``.

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
    try:
        if "private key" in lowered:
            text = _PEM.sub(rf"\1{MASK}\2", text)
        text = _AUTH_HEADER.sub(_auth_header, text)
        text = _COOKIE_LINE.sub(rf"\1\2{MASK}", text)
        if "://" in text:
            text = _mask_userinfo(text)
        text = _JWT.sub(MASK, text)
        text = _BEARER.sub(rf"\1 {MASK}", text)
        text = _PAIR.sub(_pair, text)
        text = _KEY_VALUE.sub(_key_value, text)
        text = _PG_KEY.sub(_pg_keys, text)
        text = _FAILING_ROW.sub(_failing_row, text)
        return _DUPLICATE_ENTRY.sub(rf"\1'{MASK}'", text)
    except Exception:  # a bug here must not leak the text it failed on
        return MASK
