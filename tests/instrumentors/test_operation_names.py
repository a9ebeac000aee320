"""Operation sections and target keys of the policy file are read the way calls name them.

A section calls could never match used to load without a word and never apply: ``"get /x"``
(calls say ``GET /x``), a Redis ``"get"``, ``"GET /x?page=1"``, a port written ``05432``.
Each is now either the spelling calls use or an error at start-up naming the fix.
"""

from __future__ import annotations

import logging

import pytest

from otel_recovery.instrumentors._settings import SettingsError, load_settings
from otel_recovery.instrumentors._targets import TargetPolicies
from tests.instrumentors.test_settings import policy


@pytest.mark.parametrize(
    ("written", "called"),
    [
        ("get /v1/prices", "GET /v1/prices"),
        ("Get /", "GET /"),
        ("get", "GET"),
        ("config|get", "CONFIG GET"),
        ("Config  Get", "CONFIG GET"),
        ("json.get", "JSON.GET"),
        ("pipeline", "PIPELINE"),
        ("client no-evict", "CLIENT NO-EVICT"),  # a word with a dash, as Redis names some
        ("restore-asking", "RESTORE-ASKING"),
        ("Connect", "connect"),
        ("ACQUIRE", "acquire"),
    ],
)
def test_a_section_written_in_another_case_applies_to_the_calls_it_names(
    tmp_path, fake_clock, written, called
):
    env = policy(tmp_path, f'[targets."api:443".operations."{written}"]\nmax_attempts = 7\n')
    settings = load_settings(environ=env)
    assert settings.for_target("api", 443, called).max_attempts == 7
    assert settings.for_target("api", 443, "PUT /other").max_attempts == 3
    # the per-call path the instrumentors take finds it too
    targets = TargetPolicies("probe", settings, clock=fake_clock, telemetry=False)
    assert targets.policy_for("api", 443, called, retry_allowed=True).retry.attempts == 7


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("GET /x?page=1", r"holds a query or fragment.*write GET /x"),
        ("get /x#top", r"holds a query or fragment.*write GET /x"),
        ("GET https://api.example.com/v1/x", r"starts with '/'.*write GET /v1/x"),
        ("get v1/x", r"starts with '/'.*write GET /v1/x"),
        ("G(T /x", r"'G\(T' .* is not an HTTP method"),
        ("GET x", r"starts with '/'.*write GET /x"),
        ("FOO x", r"'FOO x' is not an operation name: use an HTTP method and a path"),
        ("get/x", r"is not an operation name"),
        ("CONFIG GET X", r"is not an operation name"),
        (" GET /x", r"has spaces around it: remove them"),
        ("", r"is empty"),
    ],
)
def test_an_operation_name_no_call_can_have_is_refused_with_its_fix(tmp_path, written, message):
    env = policy(tmp_path, f'[targets."api".operations."{written}"]\nmax_attempts = 7\n')
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings(environ=env)
    assert 'targets."api".operations.' in str(raised.value)


def test_two_sections_for_one_operation_are_refused(tmp_path):
    env = policy(
        tmp_path,
        '[targets."api".operations."GET /x"]\nmax_attempts = 7\n'
        '[targets."api".operations."get /x"]\nmax_attempts = 2\n',
    )
    with pytest.raises(SettingsError, match=r"both name the operation 'GET /x'.*merge them"):
        load_settings(environ=env)


def test_an_unknown_command_or_method_is_kept_with_a_warning_naming_the_closest(tmp_path, caplog):
    env = policy(
        tmp_path,
        '[targets."cache".operations."HGETAL"]\nmax_attempts = 6\n'
        '[targets."api".operations."PURGE /cache"]\nmax_attempts = 5\n'
        '[targets."cache".operations."CONFIG"]\nmax_attempts = 4\n'
        '[targets."cache".operations."CONFIG GTE"]\nmax_attempts = 3\n',
    )
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        settings = load_settings(environ=env)
    assert settings.for_target("cache", 6379, "HGETAL").max_attempts == 6
    assert settings.for_target("api", 80, "PURGE /cache").max_attempts == 5
    text = caplog.text
    assert "HGETAL is not a Redis command we know (did you mean HGETALL?)" in text
    assert "PURGE is not a standard HTTP method" in text
    assert "CONFIG takes a subcommand" in text
    assert "CONFIG GTE is not a Redis command we know (did you mean CONFIG GET?)" in text


def test_a_port_written_with_leading_zeros_matches_the_calls_to_that_port(tmp_path):
    env = policy(tmp_path, '[targets."db:05432"]\nbreaker_minimum_calls = 7\n')
    assert load_settings(environ=env).for_target("db", 5432, None).breaker_minimum_calls == 7


@pytest.mark.parametrize("key", ["db:5432 ", " api.example.com"])
def test_a_target_with_spaces_around_it_is_refused(tmp_path, key):
    env = policy(tmp_path, f'[targets."{key}"]\nbreaker_minimum_calls = 7\n')
    with pytest.raises(SettingsError, match=r"has spaces around it, so no call would ever match"):
        load_settings(environ=env)
