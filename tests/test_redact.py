"""Secrets never survive redaction, and redaction never raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_recovery._fingerprint import normalise_message
from otel_recovery._redact import names_a_secret, redact
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
     "Authorization", "session_cookie", "pwd", "credentials"],
)  # fmt: skip
def test_names_that_hold_secrets_are_recognised(name):
    assert names_a_secret(name)


@pytest.mark.parametrize("name", ["tenant", "author", "signal", "tokens_used", "keyboard"])
def test_ordinary_names_are_not_taken_for_secrets(name):
    assert not names_a_secret(name)
