"""Secrets never survive redaction, and redaction never raises."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_recovery._fingerprint import fingerprint, normalise_message
from otel_recovery._recovery_context import context_attributes
from otel_recovery._redact import MASK, names_a_secret, redact
from otel_recovery.classify import Classifier

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"

CASES = [
    # (input, expected output)
    ("postgresql://app:s3cr3t@db:5432/shop", "postgresql://app:***@db:5432/shop"),
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("amqp://guest:p@ss/w0rd@rabbit/", "amqp://guest:***@rabbit/"),
    ("host=db user=app password=s3cr3t dbname=shop", "host=db user=app password=*** dbname=shop"),
    ("host=db password='a b c' port=5432", "host=db password='***' port=5432"),
    ("GET /v1/items?user=bob&token=abc123&page=2", "GET /v1/items?user=bob&token=***&page=2"),
    ("GET /x?api_key=K1&secret=S2", "GET /x?api_key=***&secret=***"),
    ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer ***"),
    ("authorization: Basic dXNlcjpwYXNz", "authorization: Basic ***"),
    (
        "{'Authorization': 'Bearer xyz', 'Accept': '*/*'}",
        "{'Authorization': 'Bearer ***', 'Accept': '*/*'}",
    ),
    ("Authorization: s3cr3t", "Authorization: ***"),
    ("curl -H 'x' Bearer tok_live_123", "curl -H 'x' Bearer ***"),
    ("echo 'Bearer dG9rZW4=' | xargs", "echo 'Bearer ***' | xargs"),  # padded, in quotes
    ('["Bearer abc.def=="]', '["Bearer ***"]'),
    # the whole token goes, whatever token characters it holds
    ("Bearer 9f8e7d6c5b4a-secretpart=tail", "Bearer ***"),
    ("Bearer abc/def=ghi x", "Bearer *** x"),
    ("Bearer abc-def=ghi", "Bearer ***"),
    (f"token {JWT} rejected", "token *** rejected"),
    ('{"password": "hunter2", "user": "bob"}', '{"password": "***", "user": "bob"}'),
    ("DB_PASSWORD=hunter2 ./run", "DB_PASSWORD=*** ./run"),
    (
        "access_token=abc&apikey=def&passwd=ghi&pwd=jkl",
        "access_token=***&apikey=***&passwd=***&pwd=***",
    ),
    ("x-api-key: K-123", "x-api-key: ***"),
    ("auth=abc", "auth=***"),
    # signed URLs: the query parameters the semantic conventions redact in url.query
    (
        "GET https://a.blob.core.windows.net/c/b?sv=2021&sig=AZSIG&se=2",
        "GET https://a.blob.core.windows.net/c/b?sv=2021&sig=***&se=2",
    ),
    (
        "https://s3/x?AWSAccessKeyId=AKIA1&Signature=abc%2F&Expires=1",
        "https://s3/x?AWSAccessKeyId=***&Signature=***&Expires=1",
    ),
    (
        "https://storage.googleapis.com/o?X-Goog-Signature=dead&X-Goog-Date=1",
        "https://storage.googleapis.com/o?X-Goog-Signature=***&X-Goog-Date=1",
    ),
    ("design=ok; signal=3; config=x", "design=ok; signal=3; config=x"),
    ("Connection refused to 10.0.0.3:5432", "Connection refused to 10.0.0.3:5432"),
    ("author: Jane; max_tokens=5; tokenizer=x", "author: Jane; max_tokens=5; tokenizer=x"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_redact_table(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


SECRETS = ["s3cr3t", "hunter2", "abc123", "dXNlcjpwYXNz", "tok_live_123"]


@pytest.mark.parametrize(
    "message",
    [
        "could not connect: postgresql://app:s3cr3t@10.0.0.3:5432/shop",
        "connection to server failed (host=db password=hunter2)",
        "401 for url https://api/x?token=abc123",
        "sent headers {'Authorization': 'Basic dXNlcjpwYXNz'}",
        "retry with Bearer tok_live_123",
    ],
)
def test_errorinfo_and_fingerprint_never_hold_secrets(message: str) -> None:
    info = Classifier().classify(ConnectionError(message))
    for secret in SECRETS:
        assert secret not in info.message
        assert secret not in normalise_message(message)
    # the fingerprint is computed from the redacted text: the secret does not change it
    other = message
    for secret in SECRETS:
        other = other.replace(secret, "different-secret-value")
    assert Classifier().classify(ConnectionError(other)).fingerprint == info.fingerprint


def test_long_message_is_redacted_before_truncation() -> None:
    message = "x" * 500 + " postgresql://app:s3cr3t@db/shop " + "y" * 500
    info = Classifier().classify(RuntimeError(message))
    assert len(info.message) == 512
    assert "s3cr3" not in info.message and "s3c" not in info.message


@given(st.text())
def test_redact_never_raises(text: str) -> None:
    assert isinstance(redact(text), str)


@given(st.text(alphabet="=:@/?&'\" passwordtokenBearereyJ.-_abc", max_size=200))
def test_redact_never_raises_on_trigger_soup(text: str) -> None:
    assert isinstance(redact(text), str)


def test_redact_accepts_non_str_without_raising() -> None:
    assert redact(123) == "123"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["password", "DB_PASSWORD", "api_key", "X-Api-Key", "access_token", "client_secret",
     "Authorization", "session_cookie", "pwd", "credentials",
     "aws_secret_access_key", "secret_key", "access_key", "AWS_ACCESS_KEY_ID", "session",
     "sessionid", "session_id", "JSESSIONID", "pw", "db_pw", "passcode", "Set-Cookie", "key",
     "private_key_pem", b"password", ("db", "password"), ("password", "db"), "password ",
     " API_KEY\t", "PASSWORD", "card_pin", "ssn", "cvv", "email", "user_email",
     "E-Mail", "email_address"],
)  # fmt: skip
def test_names_that_hold_secrets_are_recognised(name):
    assert names_a_secret(name)


@pytest.mark.parametrize(
    "name",
    ["tenant", "author", "signal", "tokens_used", "keyboard", "author_id", "session_count",
     "primary_key", "monkey", "spin", "bypass", "passing", b"tenant", ("db", "host"),
     "emails_sent", "female"],
)  # fmt: skip
def test_ordinary_names_are_not_taken_for_secrets(name):
    assert not names_a_secret(name)


# --- leaks found by the eighteenth-session review -------------------------------------------
# Each case: the text, the secrets that must be gone, the parts that must stay (what the
# message is for: host, port, path, column, error wording).

PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"

LEAKS = [
    # A. URL userinfo: everything between "scheme://" and the "@" before the host
    (
        'redis://:Qu"otePW9@127.0.0.1:6379/0?prefix=otel_recovery:',
        ['Qu"ote', "otePW9"],
        ["redis://", "@127.0.0.1:6379/0?prefix=otel_recovery:"],
    ),
    ("redis://:it's-PW2@cache:6379/0 down", ["it's", "PW2"], ["@cache:6379/0 down"]),
    (
        "postgresql://u:pass WORD1@host:5432/db",
        ["pass", "WORD1"],
        ["postgresql://u:", "@host:5432/db"],
    ),
    (
        "OTEL_RECOVERY_STORE_URL='postgresql://app:pass word1@127.0.0.1:5432/test?bogus=1': "
        "unknown PostgreSQL option(s) 'bogus'",
        ["word1"],
        ["postgresql://app:", "@127.0.0.1:5432/test?bogus=1", "unknown PostgreSQL option(s)"],
    ),
    (
        "postgresql://u:correct horse battery staple@db:5432/x",
        ["correct", "horse", "battery", "staple"],
        ["@db:5432/x"],
    ),
    (
        "GET https://ghp_TOKENVALUE123@github.com/org/repo failed",
        ["ghp_TOKENVALUE123"],
        ["GET https://", "@github.com/org/repo failed"],
    ),
    ("pip install git+https://ghp_Ab1@github.com/o/r", ["ghp_Ab1"], ["@github.com/o/r"]),
    (
        "sentry https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/5",
        ["0123456789abcdef"],
        ["@o1.ingest.sentry.io/5"],
    ),
    (
        "git clone https://x-access-token:ghs_Abc123@github.com/o/r",
        ["ghs_Abc123"],
        ["x-access-token", "@github.com/o/r"],
    ),
    (
        "RedisStore('redis://:Qu\"otePW9@127.0.0.1:1/0?prefix=p:', prefix='p:')",
        ["otePW9"],
        ["@127.0.0.1:1/0?prefix=p:", "prefix='p:')"],
    ),
    # B. names and shapes the key-value pattern missed
    (
        "could not reach s3 with {'aws_access_key_id': 'AKIAEXAMPLE', "
        "'aws_secret_access_key': 'wJalrXUtnFEMIK7MDENG'}",
        ["wJalrXUtnFEMIK7MDENG"],
        ["could not reach s3", "'aws_secret_access_key': '"],
    ),
    (
        "AWS_SECRET_ACCESS_KEY=wJalrXUtn ./deploy",
        ["wJalrXUtn"],
        ["AWS_SECRET_ACCESS_KEY=", "./deploy"],
    ),
    ("secret_key=SKEY1 region=eu-west-1", ["SKEY1"], ["secret_key=", "region=eu-west-1"]),
    (
        "https://h.example/x?access_key=ACCESSKEY99&page=2",
        ["ACCESSKEY99"],
        ["https://h.example/x?access_key=", "&page=2"],
    ),
    (
        "GET https://maps.googleapis.com/maps/api/geocode/json?address=x&key=AIzaSyD-SECRETKEY",
        ["AIzaSyD-SECRETKEY"],
        ["maps.googleapis.com/maps/api/geocode/json?address=x&key="],
    ),
    (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=AZKEY==;EndpointSuffix=core",
        ["AZKEY"],
        ["AccountName=acct;", ";EndpointSuffix=core"],
    ),
    ("Creds(user='svc', pw='OBJPW_1')", ["OBJPW_1"], ["Creds(user='svc', pw="]),
    ("db_pw=DBPW2 host=db", ["DBPW2"], ["db_pw=", "host=db"]),
    ("passcode: 493817 rejected", ["493817"], ["passcode", "rejected"]),
    ("session=SESS355 path=/", ["SESS355"], ["session=", "path=/"]),
    ("sessionid=SESS356&next=/home", ["SESS356"], ["&next=/home"]),
    ("JSESSIONID=SESS357; Path=/", ["SESS357"], ["JSESSIONID=", "Path=/"]),
    (
        "Cookie: sessionid=COOKIESESS1; csrftoken=abc; theme=dark",
        ["COOKIESESS1", "csrftoken=abc", "theme=dark"],
        ["Cookie:"],
    ),
    (
        "{'Cookie': 'session=COOKIESESS2; uid=7', 'Accept': '*/*'}",
        ["COOKIESESS2", "uid=7"],
        ["'Cookie': '", "'Accept': '*/*'"],
    ),
    ("Set-Cookie: sid=COOKIESESS3; HttpOnly", ["COOKIESESS3"], ["Set-Cookie:"]),
    (
        "request failed\nCookie: uid=COOKIE4\nHost: api.example.com",
        ["COOKIE4"],
        ["request failed\n", "\nHost: api.example.com"],
    ),
    ("password=abc;DEFPW", ["abc", "DEFPW"], ["password="]),
    (
        "Server=db;Database=shop;Password=ab;cd;Encrypt=yes",
        ["ab;cd", ";cd"],
        ["Server=db;Database=shop;Password=", ";Encrypt=yes"],
    ),
    ("token=AB&CD&page=2", ["AB&CD", "&CD"], ["token=", "&page=2"]),
    ('{"password": "ab\\"CDPW", "user": "bob"}', ["CDPW"], ['{"password": "', '"user": "bob"}']),
    ("{'password': 'it\\'s-PW3', 'user': 'bob'}", ["PW3"], ["'user': 'bob'}"]),
    ('{"token": "TRUNCATEDTOK', ["TRUNCATEDTOK"], ['{"token": ']),
    ("auth=('user', 'AUTHTUPLEPW') timeout=5", ["AUTHTUPLEPW"], ["auth=(", "timeout=5"]),
    (
        "credentials={'user': 'u', 'extra': {'k': 'NESTEDCRED'}} retry",
        ["NESTEDCRED"],
        ["credentials={", "retry"],
    ),
    (
        "[('Authorization', 'Basic dXNlcjpwYXNz'), ('Accept', 'text/html')]",
        ["dXNlcjpwYXNz"],
        ["('Authorization', 'Basic ", "('Accept', 'text/html')"],
    ),
    ("[('X-Api-Key', 'XAPIKEY2')]", ["XAPIKEY2"], ["[('X-Api-Key', '"]),
    ("(('Cookie', 'sid=TUPCOOKIE'),)", ["TUPCOOKIE"], ["('Cookie', '"]),
    (
        f"load failed: -----BEGIN PRIVATE KEY-----\n{PEM_BODY}\nAbCd==\n-----END PRIVATE KEY-----"
        " (line 3)",
        [PEM_BODY, "AbCd=="],
        ["load failed: -----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY----- (line 3)"],
    ),
    (
        f"bad key '-----BEGIN RSA PRIVATE KEY-----\\n{PEM_BODY}\\n-----END RSA PRIVATE KEY-----'",
        [PEM_BODY],
        ["-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----"],
    ),
    (
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}",  # cut before its END line
        [PEM_BODY],
        ["-----BEGIN OPENSSH PRIVATE KEY-----"],
    ),
    # E. PostgreSQL DETAIL values: keep the column, drop the value
    (
        'duplicate key value violates unique constraint "users_email_key"\n'
        "DETAIL:  Key (email)=(alice.secret@example.com) already exists.",
        ["alice.secret", "example.com"],
        ['unique constraint "users_email_key"', "DETAIL:  Key (email)=(", ") already exists."],
    ),
    (
        "Key (tenant_id, email)=(7, bob.pii@example.com) already exists.",
        ["bob.pii"],
        ["Key (tenant_id, email)=(", ") already exists."],
    ),
    (
        "Key (lower(email::text))=(carol.pii@example.com) already exists.",
        ["carol.pii"],
        ["Key (lower(email::text))=(", ") already exists."],
    ),
    (
        "Key (note)=(a) b (c)) already exists.",
        ["a) b (c"],
        ["Key (note)=(", ") already exists."],
    ),
    (
        'Key (user_id)=(918273) is not present in table "users".',
        ["918273"],
        ["Key (user_id)=(", ') is not present in table "users".'],
    ),
    (
        "Key (room, during)=(R1VAL, [10,11)) conflicts with existing key (room, during)=(R2VAL, "
        "[10,12)).",
        ["R1VAL", "R2VAL"],
        ["Key (room, during)=(", "conflicts with existing key (room, during)=("],
    ),
    (
        'new row for relation "users" violates check constraint "age_ok"\n'
        "DETAIL:  Failing row contains (17, dave.pii@example.com, 123-45-6789).",
        ["dave.pii", "123-45-6789"],
        ['violates check constraint "age_ok"', "Failing row contains ("],
    ),
    (
        "(1062, \"Duplicate entry 'erin.pii@example.com' for key 'users.email'\")",
        ["erin.pii"],
        ["Duplicate entry '", "' for key 'users.email'"],
    ),
]


@pytest.mark.parametrize(("text", "secrets", "kept"), LEAKS)
def test_reviewed_leaks_are_redacted_and_context_stays(text, secrets, kept):
    out = redact(text)
    for secret in secrets:
        assert secret not in out, out
    for part in kept:
        assert part in out, out
    assert MASK in out
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize("text", [c[0] for c in LEAKS])
def test_reviewed_leaks_never_reach_a_fingerprint_or_message(text):
    secrets = next(c[1] for c in LEAKS if c[0] == text)
    info = Classifier().classify(ConnectionError(text))
    for secret in secrets:
        assert secret not in info.message
        assert secret.lower() not in normalise_message(text)


ORDINARY = [
    "Connection refused",
    "[Errno 111] Connection refused",
    "timeout after 5s",
    "ECONNRESET",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    'relation "users" does not exist',
    "Error 111 connecting to cache:6379. Connection refused.",
    "Redis store redis://cache:6379/0?prefix=otel_recovery: is unreachable",
    "PostgreSQL store postgresql://app@db:5432/shop is unreachable",  # a user name, not a token
    "https://api.example.com:8443/v1/items?page=2 returned 503",
    'insert or update on table "orders" violates foreign key constraint "orders_user_id_fkey"',
    "FOREIGN KEY (user_id) REFERENCES users (id) failed",
    "Session is closed",
    "passing tests: 3; bypass=true; primary_key=id; monkey=1",
    "cookies are disabled",
    "the key (a) was not found",
    "Failing row contains no data",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    # an OAuth token response's parameters after its type, and a challenge's parameters
    "token_type=bearer expires_in=3600 scope=read",
    'WWW-Authenticate: Bearer realm="api", error="invalid_token"',
    'WWW-Authenticate: Bearer error="insufficient_scope", scope="orders:write"',
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_messages_are_not_redacted(text):
    assert redact(text) == text


# The fingerprints (and so the learner's keys) of messages that hold nothing to hide are the
# ones earlier releases gave them.
STABLE_FINGERPRINTS = [
    ("ConnectionRefusedError", "ECONNREFUSED", "[Errno 111] Connection refused", "55284c65447587fc"),
    ("TimeoutError", None, "timeout after 5s", "0d45141ee0871bf5"),
    (
        "ConnectionResetError", "ECONNRESET", "[Errno 104] Connection reset by peer",
        "6eba1cb6d31c7a04",
    ),
    ("OSError", "ECONNRESET", "ECONNRESET", "0b8a24996a0e61a0"),
    (
        "redis.exceptions.ResponseError", None,
        "WRONGTYPE Operation against a key holding the wrong kind of value", "deb59aff30548393",
    ),
    ("psycopg.errors.UndefinedTable", "42P01", 'relation "users" does not exist', "22f0ee675321f617"),
    (
        "psycopg.OperationalError", None,
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection '
        "refused\n\tIs the server running on that host and accepting TCP/IP connections?",
        "feea9dd5eaa1bb7f",
    ),
    (
        "httpx.HTTPStatusError", None,
        "Server error '503 Service Unavailable' for url 'https://api.example.com/v1/items'",
        "67608299f9e0dd56",
    ),
    (
        "redis.exceptions.ConnectionError", None,
        "Error 111 connecting to cache:6379. Connection refused.", "cb878c74c3a88988",
    ),
    ("KeyError", None, "'missing'", "9fce7fabe0abc3c4"),
    (
        "psycopg.errors.SerializationFailure", "40001",
        "could not serialize access due to concurrent update", "caae78cd07db7db4",
    ),
    (
        "asyncpg.exceptions.DeadlockDetectedError", "40P01",
        "deadlock detected\nDETAIL:  Process 123 waits for ShareLock on transaction 456; "
        "blocked by process 789.",
        "6b373cad8e73e098",
    ),
    (
        "psycopg.errors.ForeignKeyViolation", "23503",
        'insert or update on table "orders" violates foreign key constraint "orders_user_id_fkey"',
        "ae3d531ad5e45214",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("error_type", "code", "message", "expected"), STABLE_FINGERPRINTS)
def test_fingerprints_of_ordinary_messages_do_not_change(error_type, code, message, expected):
    assert fingerprint(error_type, code, message) == expected


# D. A fingerprint must not be a hash of personal data: values differ, fingerprints do not.
UNIQUE = (
    'duplicate key value violates unique constraint "users_email_key"\n'
    "DETAIL:  Key (email)=({}) already exists."
)
SAME_FINGERPRINT = [
    # (message template, values that must all give one fingerprint, text the normalised keeps)
    (UNIQUE, ["alice.secret@example.com", "bob@example.org", "x"], "key (email)=("),
    (
        "Key (tenant_id, email)=({}) already exists.",
        ["1, a@b.io", "2, c@d.io"],
        "(tenant_id, email)",
    ),
    ("bad credentials for user {}", ["alice@example.com", "bob.b+tag@mail.example.org"], "<email>"),
    (
        "404 for url /users/{}/orders",
        ["alice%40example.com", "bob%40example.org"],
        "/users/<email>",
    ),
    ("404 for url https://api.example.com/search?q={}&page=2", ["alice", "bob"], "/search?q="),
    (
        "DETAIL:  Failing row contains ({}).",
        ["1, alice, 17", "2, bob, 90"],
        "failing row contains (",
    ),
    ("Duplicate entry '{}' for key 'users.email'", ["a@b.io", "c@d.io"], "for key <str>"),
]


@pytest.mark.parametrize(("template", "values", "kept"), SAME_FINGERPRINT)
def test_fingerprints_hold_no_personal_data(template, values, kept):
    messages = [template.format(value) for value in values]
    prints = {fingerprint("psycopg.errors.UniqueViolation", "23505", m) for m in messages}
    assert len(prints) == 1, [normalise_message(m) for m in messages]
    for value, message in zip(values, messages):
        normalised = normalise_message(message)
        assert kept in normalised
        for part in value.split(", "):
            if len(part) > 2:
                assert part.lower() not in normalised


def test_a_unique_violation_still_names_its_column_in_the_fingerprint():
    email = fingerprint("psycopg.errors.UniqueViolation", "23505", UNIQUE.format("a@b.io"))
    other = UNIQUE.replace("(email)", "(username)").format("a@b.io")
    assert fingerprint("psycopg.errors.UniqueViolation", "23505", other) != email


# Redaction stays linear: a large hostile message finishes quickly.
ADVERSARIAL = [
    "a.a." * 25_000 + "://",
    "x://y:" * 17_000,
    "x://" * 25_000,
    "https://u:" + "p " * 50_000,
    "password=" * 11_000,
    "password=a;" * 9_000,
    "token=a&" * 12_500,
    'token="' + "\\" * 100_000,
    "auth=" + "(" * 100_000,
    "auth={" + "{a" * 50_000,
    "Key (" * 20_000,
    "Key (a)=(" * 11_000,
    "Key (a)=(b" + ")=(" * 30_000,
    "Failing row contains (" * 4_500,
    "-----BEGIN PRIVATE KEY-----" * 3_700,
    "Cookie: " * 12_500,
    "[('password', '" * 7_000,
    "('Authorization', " * 6_000,
    "a@" * 50_000,
    "a%40" * 25_000,
    "a" * 100_000 + "@",
    "Duplicate entry '" * 6_000,
    "Bearer " * 14_000,
    "eyJ" * 33_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda t: repr(t[:16]))
def test_redaction_of_a_100_kb_hostile_message_is_fast(text):
    # CPU time of this thread, not elapsed time: waiting for a core on a loaded machine does
    # not count. Linear work takes up to ~0.12 s here; a quadratic scan of 100 KB ~10 s.
    started = time.thread_time()
    redact(text)
    normalise_message.__wrapped__(text)
    assert time.thread_time() - started < 0.5


# C. recover_from_error context: keys are normalised, nested headers are masked.
class _Creds:
    def __repr__(self) -> str:
        return "Creds(user='svc', pw='OBJPW_1')"


CONTEXT = {
    "endpoint": "https://api.example.com/v1/charge?key=ENDPOINTKEY_2&access_key=ACCKEY_3",
    "headers": {"Cookie": "sessionid=NESTEDCOOKIE_4", "Authorization": "Basic BASICB64_5",
                "Accept": "application/json"},
    "header_list": [("Authorization", "Basic LISTBASIC_6"), ("X-Api-Key", "LISTAPIKEY_7"),
                    ("Accept", "text/html")],
    b"password": "BYTESKEYPW_8",
    ("db", "password"): "TUPLEKEYPW_9",
    "password ": "TRAILINGSPACEPW_10",
    "session_id": "SESSIONID_11",
    "creds": _Creds(),
    "pw": "SHORTPW_12",
    "passcode": "PASSCODE_13",
    "db": {"host": "db.internal", "password": "NESTEDPW_14", "port": 5432},
    "access_key": "ACCESSKEY_15",
    "set_cookie": "sid=SETCOOKIE_16",
    "aws_secret_access_key": "AWSSECRET_17",
    "secret_key": "SECRETKEY_18",
    "sessionid": "SESSIONID_19",
    "tenant": "acme",
    "deep": {"a": {"b": {"c": {"d": {"token": "DEEPTOKEN_20"}}}}},
}  # fmt: skip
CONTEXT_SECRETS = [
    "ENDPOINTKEY_2", "ACCKEY_3", "NESTEDCOOKIE_4", "BASICB64_5", "LISTBASIC_6", "LISTAPIKEY_7",
    "BYTESKEYPW_8", "TUPLEKEYPW_9", "TRAILINGSPACEPW_10", "SESSIONID_11", "OBJPW_1", "SHORTPW_12",
    "PASSCODE_13", "NESTEDPW_14", "ACCESSKEY_15", "SETCOOKIE_16", "AWSSECRET_17", "SECRETKEY_18",
    "SESSIONID_19", "DEEPTOKEN_20",
]  # fmt: skip


def test_context_attributes_mask_secrets_however_they_are_keyed_or_nested():
    attributes = context_attributes(CONTEXT)
    shown = repr(attributes)
    for secret in CONTEXT_SECRETS:
        assert secret not in shown, secret
    prefix = "otel_recovery.context."
    assert attributes["otel_recovery.endpoint"].startswith("https://api.example.com/v1/charge?")
    assert "'Accept': 'application/json'" in attributes[prefix + "headers"]
    assert "'Cookie': '***'" in attributes[prefix + "headers"]
    assert "('Accept', 'text/html')" in attributes[prefix + "header_list"]
    assert "('X-Api-Key', '***')" in attributes[prefix + "header_list"]
    assert attributes[prefix + "password"] == MASK  # b"password" and "password " alike
    assert attributes[prefix + "db.password"] == MASK
    assert "'host': 'db.internal'" in attributes[prefix + "db"]
    assert "'port': 5432" in attributes[prefix + "db"]
    assert attributes[prefix + "tenant"] == "acme"
    assert attributes[prefix + "creds"] == "Creds(user='svc', pw='***')"


def test_context_masking_is_bounded():
    wide = {f"k{i}": i for i in range(10_000)}
    wide["password"] = "LATEPW"
    cyclic: list = []
    cyclic.append(cyclic)
    attributes = context_attributes({"wide": wide, "cyclic": cyclic})
    assert "LATEPW" not in repr(attributes)
    assert len(attributes["otel_recovery.context.wide"]) <= 256
    assert attributes["otel_recovery.context.cyclic"]


class _Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_context_masking_never_raises():
    class BadMapping(dict):
        def items(self):  # type: ignore[override]
            raise RuntimeError("no")

    attributes = context_attributes({"a": BadMapping(x=1), "b": _Hostile(), "c": [(_Hostile(), 1)]})
    assert set(attributes) == {f"otel_recovery.context.{k}" for k in "abc"}


JWT = (
    "eyJhbGciOiJIUzI1NiJ9."
    + "eyJzdWIiOiIxMjM0NTY3ODkwIn0" * 5
    + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)


@pytest.mark.parametrize("cut_into", [3, 12, 21])
def test_a_secret_straddling_the_old_cut_never_reaches_the_message(cut_into: int) -> None:
    """The text was cut at 4,096 characters before redaction: a password whose ``@`` fell
    past the cut was no userinfo to the patterns, and JWTs before it, shrinking to ``***``,
    pulled its first characters into the 512 kept."""
    password = "SuperSecretPassw0rdXYZ"
    head = "upstream rejected tokens: " + " ".join([JWT] * 20)
    tail = " while calling https://svc:"
    pad = 4096 - len(head) - len(tail) - cut_into
    message = head + " " * pad + tail + password + "@api.internal/v1/items"
    info = Classifier().classify(ConnectionError(message))
    assert password[:3] not in info.message
    assert (
        password[:3] not in context_attributes({"detail": message})["otel_recovery.context.detail"]
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://ghp_16C7e42F292c6912E7710c838347Ae178B4a:x-oauth-basic@github.com/o/r.git",
        "https://ghp_16C7e42F292c6912E7710c838347Ae178B4a:@github.com/o/r.git",
        "https://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@s3.amazonaws.com/b",
    ],
)
def test_a_token_in_the_user_slot_of_a_url_is_masked(url: str) -> None:
    """GitHub documents ``https://<token>:x-oauth-basic@github.com``: the user part was kept
    as a user name, token and all."""
    shown = redact(f"git fetch failed: {url}")
    assert "ghp_16C7" not in shown and "AKIAIOSF" not in shown and "wJalrXUt" not in shown
    assert redact("postgresql://app:s3cr3t@db/shop") == f"postgresql://app:{MASK}@db/shop"


def test_a_host_named_like_a_secret_keeps_its_port_and_path() -> None:
    """``http://auth:8080/health`` read as a ``name: value`` pair: the port and the path
    were masked as a secret."""
    assert redact("http://auth:8080/health returned 503") == "http://auth:8080/health returned 503"
    assert redact("auth: s3cr3t") == f"auth: {MASK}"
    assert redact("https://x-access-token:ghp_abc123@github.com/o/r") == (
        f"https://x-access-token:{MASK}@github.com/o/r"
    )
