"""Settings: what a bad value does (whose it is decides), where each key may be set, which
level wins, and the values each setting accepts."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from otel_recovery import _config
from otel_recovery._config import set_active
from otel_recovery._first_times import FirstTimes
from otel_recovery.instrumentors import _setting_values
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._settings import SettingsError, load_settings
from otel_recovery.instrumentors._targets import TargetPolicies

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _fresh_log_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are logged once per process: start each test with none logged yet."""
    monkeypatch.setattr(_setting_values, "_warned", FirstTimes())
    monkeypatch.setattr(_config, "_reported", FirstTimes())
    for name in list(os.environ):
        if name.startswith("OTEL_RECOVERY_") and name != "OTEL_RECOVERY_STORE_URL":
            monkeypatch.delenv(name)


def policy(tmp_path: Path, text: str, name: str = "policy.toml") -> dict[str, str]:
    path = tmp_path / name
    path.write_text(text)
    return {"OTEL_RECOVERY_CONFIG": str(path)}


# -- a bad value: whose it is decides ------------------------------------------------------


class Client:
    def call(self) -> str:
        return "original"


def _ours(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> str:
    return f"ours({wrapped(*args, **kwargs)})"


class _Probe(RecoveryInstrumentor):
    """An instrumentor of ``Client`` (no library to find)."""

    library = "probe"

    def _install(self, patches: Any, targets: Any, kwargs: Any) -> None:
        patches.wrap(Client, "call", _ours)


@pytest.fixture
def probe() -> Any:
    original = Client.__dict__["call"]
    instrumentor = _Probe()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    assert Client.__dict__["call"] is original


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def error_loggers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.name for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_RECOVERY_MAX_ATTEMPTS": "abc"}, "OTEL_RECOVERY_MAX_ATTEMPTS='abc' is not valid"),
        ({"OTEL_RECOVERY_CONFIG": "/nonexistent/policy.toml"}, "cannot be read"),
        ("max_attempts = 99\n", "max_attempts (from policy file "),
        # read when the first target's breaker is made: checked at start-up instead
        ({"OTEL_RECOVERY_STORE_URL": "mysql://db/x"}, "OTEL_RECOVERY_STORE_URL='mysql://db/x'"),
        # the learner's store reads it when it is built: checked at start-up too
        (
            {"OTEL_RECOVERY_STORE_URL": "memory://", "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES": "lots"},
            "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES must be a positive number of bytes, got 'lots'",
        ),
        (
            {"OTEL_RECOVERY_STORE_URL": "memory://", "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES": "1²"},
            "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES must be a positive number of bytes, got '1²'",
        ),
        ('[targets."[::1"]\nmax_attempts = 2\n', "'[::1' is not a host or host:port"),
    ],
)
def test_a_bad_value_from_the_environment_or_file_is_logged_once_and_leaves_us_off(
    probe, caplog, monkeypatch, tmp_path, env, named
):
    for name, value in (policy(tmp_path, env) if isinstance(env, str) else env).items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        probe.instrument()  # under opentelemetry-instrument, raising would stop the loader
        probe.instrument()  # every instrumentor meets it: still one line
    (message,) = errors(caplog)
    assert named in message and "otel-recovery stays off" in message
    assert error_loggers(caplog) == ["otel_recovery.instrumentors"]
    assert not probe.is_instrumented_by_opentelemetry and Client().call() == "original"
    assert probe.targets is None
    for name in (
        "OTEL_RECOVERY_MAX_ATTEMPTS",
        "OTEL_RECOVERY_CONFIG",
        "OTEL_RECOVERY_STORE_URL",
        "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES",
    ):
        monkeypatch.delenv(name, raising=False)
    probe.instrument()  # fixed: a later instrument() installs us
    assert probe.is_instrumented_by_opentelemetry and Client().call() == "ours(original)"


def test_a_bad_keyword_argument_is_the_programs_own_call_and_raises(probe, monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_MAX_ATTEMPTS", "abc")
    with pytest.raises(SettingsError, match=r"max_attempts \(from instrument\(\) keyword") as bad:
        probe.instrument(max_attempts=0)  # reported first, whatever the environment holds
    assert bad.value.from_arguments
    assert not probe.is_instrumented_by_opentelemetry and Client().call() == "original"


def test_the_error_a_program_catches_has_a_public_home(probe):
    """``SettingsError`` is importable from the package the README names, and it is the
    class ``instrument()`` raises (a ``ValueError`` too, for code that catches that)."""
    from otel_recovery import instrumentors

    assert "SettingsError" in instrumentors.__all__
    with pytest.raises(instrumentors.SettingsError) as bad:
        probe.instrument(max_attempts="many")
    assert isinstance(bad.value, ValueError) and "max_attempts" in str(bad.value)


def test_an_invalid_enabled_is_logged_with_the_accepted_values_and_taken_as_false(
    probe, caplog, monkeypatch
):
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        assert load_settings(environ={"OTEL_RECOVERY_ENABLED": "flase"}).enabled is False
        monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "flase")
        probe.instrument()
    (message,) = errors(caplog)
    assert "OTEL_RECOVERY_ENABLED='flase'" in message
    assert "true, false, 1, 0, yes, no, on, off" in message and "taken as false" in message
    assert not probe.is_instrumented_by_opentelemetry and Client().call() == "original"
    assert load_settings(environ={"OTEL_RECOVERY_ENABLED": ""}).enabled is True
    with pytest.raises(SettingsError, match="enabled"):
        load_settings({"enabled": "nope"}, environ={})  # the program's own call


def test_importing_with_an_invalid_enabled_does_not_stop_the_program():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_RECOVERY_ENABLED"] = "flase"
    code = "import otel_recovery; print('active', otel_recovery.is_active())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "active False"
    assert "OTEL_RECOVERY_ENABLED='flase' is not valid" in done.stderr


PROBE_APP = """
import json, requests, redis
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor
from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor
print(json.dumps({
    "contrib": [RequestsInstrumentor().is_instrumented_by_opentelemetry,
                RedisInstrumentor().is_instrumented_by_opentelemetry],
    "ours": [RequestsRecoveryInstrumentor().is_instrumented_by_opentelemetry,
             RedisRecoveryInstrumentor()._patches is not None],
}))
"""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, None),  # the control: everything on
        ({"OTEL_RECOVERY_MAX_ATTEMPTS": "abc"}, "OTEL_RECOVERY_MAX_ATTEMPTS='abc' is not valid"),
        ({"OTEL_RECOVERY_ENABLED": "flase"}, "OTEL_RECOVERY_ENABLED='flase' is not valid"),
        (
            '[targets."api".operations."GET /x"]\nbreaker_window = 10\n',
            "breaker_* and budget_* settings are per target",
        ),
    ],
)
def test_under_opentelemetry_instrument_a_bad_setting_leaves_every_other_instrumentation_on(
    tmp_path, env, named
):
    """The auto-instrumentation loader re-raises an instrumentor's exception and abandons
    its loop: one bad value used to switch off every instrumentation, contrib's included."""
    if not (BIN / "opentelemetry-instrument").exists():
        pytest.skip("opentelemetry-instrument is not installed (pip install -e '.[test]')")
    app = tmp_path / "app.py"
    app.write_text(PROBE_APP)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(
        OTEL_SERVICE_NAME="settings-probe",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        **(policy(tmp_path, env) if isinstance(env, str) else env),
    )
    done = subprocess.run(
        [str(BIN / "opentelemetry-instrument"), sys.executable, str(app)],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Failed to auto" not in done.stderr, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["contrib"] == [True, True], done.stderr
    if named is None:
        assert state["ours"] == [True, True], done.stderr
    else:
        assert state["ours"] == [False, False]
        assert done.stderr.count(named) == 1, done.stderr  # six instrumentors, one line


def test_switched_off_we_report_not_instrumented_and_a_later_instrument_installs_us(
    probe, monkeypatch
):
    probe.instrument(enabled=False)
    assert not probe.is_instrumented_by_opentelemetry and Client().call() == "original"
    with set_active(False):
        probe.instrument()
        assert not probe.is_instrumented_by_opentelemetry
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "false")
    probe.instrument()
    assert not probe.is_instrumented_by_opentelemetry and Client().call() == "original"
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "true")
    probe.instrument()  # switched back on: installed, not a no-op
    assert probe.is_instrumented_by_opentelemetry and Client().call() == "ours(original)"
    probe.uninstrument()
    assert Client().call() == "original"


# -- where each key may be set -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[targets."db:5432"]\nsql_retry = "never"\n',
            r"sql_retry in \[targets.\"db:5432\"\].*sql_retry applies to the whole service.*"
            r"set it at the top level of the policy file",
        ),
        ('[targets."api"]\nenabled = false\n', r"enabled applies to the whole service"),
        ('[targets."api"]\nlearning = "on"\n', r"learning applies to the whole service"),
        (
            '[targets."api".operations."GET /x"]\nlearning = "on"\n',
            r"learning applies to the whole service",
        ),
        (
            '[targets."api".operations."GET /x"]\nbreaker_window = 10\n',
            r"breaker_window in \[targets.\"api\".operations.\"GET /x\"\].*breaker_\* and "
            r"budget_\* settings are per target.*set it in \[targets.\"api\"\], not in an "
            r"operation section",
        ),
        (
            '[targets."api".operations."GET /x"]\nbudget_ratio = 0.5\n',
            r"breaker_\* and budget_\* settings are per target",
        ),
        (
            '[targets."r".operations."GET"]\nredis_retry_commands = "INCR"\n',
            r"redis_retry_commands is per target.*set it in \[targets.\"r\"\]",
        ),
        (
            '[operations."GET /x"]\nfallback_value = 1\n',
            r"operations table at the top level.*belong to a target",
        ),
        (
            '[targets."api".operations."GET /x".operations."y"]\nmax_attempts = 2\n',
            r"holds an operations table: operation sections do not nest",
        ),
        ('[targets."api"]\noperations = ["GET /x"]\n', r"operations in \[targets.\"api\"\].*"),
        ('[targets."api"]\noperations = 5\n', r"must be a table of operation sections"),
        (
            '[targets."api".operations]\n"GET /x" = 5\n',
            r"\[targets.\"api\".operations.\"GET /x\"\].*must be a table of settings",
        ),
        ('[targets."a".targets."b"]\nmax_attempts = 2\n', r"target sections go at the top"),
    ],
)
def test_a_key_where_it_has_no_effect_is_an_error_naming_where_it_belongs(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=policy(tmp_path, text))


def test_the_same_in_a_json_policy_file(tmp_path):
    text = json.dumps({"operations": {"GET /x": {"fallback_value": 1}}})
    with pytest.raises(SettingsError, match="operations table at the top level"):
        load_settings(environ=policy(tmp_path, text, "policy.json"))


def test_each_key_loads_where_it_has_an_effect(tmp_path):
    s = load_settings(
        environ=policy(
            tmp_path,
            'sql_retry = "never"\nlearning = "shadow"\nbreaker_window = 40\n'
            '[targets."api"]\nbreaker_window = 10\nbudget_ratio = 0.2\n'
            'redis_retry_commands = "HSET"\n'
            '[targets."api".operations."GET /x"]\nmax_attempts = 2\nattempt_timeout = 1\n'
            'http_retry_methods = "GET"\nfallback_value = []\n',
        )
    )
    op = s.for_target("api", 443, "GET /x")
    assert (s.sql_retry, s.learning, s.breaker_window) == ("never", "shadow", 40)
    assert (op.breaker_window, op.budget_ratio, op.redis_retry_commands) == (10, 0.2, {"HSET"})
    assert (op.max_attempts, op.attempt_timeout, op.fallback_value) == (2, 1.0, [])


# -- target keys: every spelling of a target ---------------------------------------------


def test_a_target_key_is_found_under_the_names_the_instrumentors_give(tmp_path, fake_clock):
    """A host's case, the brackets around an IPv6 address and an internationalised name's
    two forms do not matter; a socket path is kept as written. A Sentinel service's section
    covers every deployment's (their names carry ``@<sentinels>``)."""
    env = policy(
        tmp_path,
        '[targets."[::1]:5432"]\nbreaker_minimum_calls = 7\n'
        '[targets."[FE80::1]"]\nbreaker_minimum_calls = 8\n'
        '[targets."Api.Example.invalid"]\nbreaker_minimum_calls = 9\n'
        '[targets."Api.Example.invalid".operations."GET /x"]\nmax_attempts = 5\n'
        '[targets."BÜCHER.example:443"]\nbreaker_minimum_calls = 10\n'
        '[targets."xn--caf-dma.example"]\nbreaker_minimum_calls = 11\n'
        '[targets."/run/App.sock"]\nbreaker_minimum_calls = 12\n'
        '[targets."mymaster replicas"]\nbreaker_minimum_calls = 13\n'
        '[targets."mymaster replicas".operations."GET"]\nmax_attempts = 6\n',
    )
    s = load_settings(environ=env)
    found = {
        ("::1", 5432): 7,
        ("::1", 5433): 20,
        ("fe80::1", 80): 8,
        ("api.example.invalid", 80): 9,
        ("Api.Example.invalid", 80): 9,
        ("bücher.example", 443): 10,
        ("xn--bcher-kva.example", 443): 10,
        ("café.example", 80): 11,
        ("xn--caf-dma.example", 80): 11,
        ("/run/App.sock", None): 12,
        ("/run/app.sock", None): 20,
        ("mymaster replicas@127.0.0.1:26379", None): 13,
        ("mymaster replicas", None): 13,
        ("othermaster replicas@127.0.0.1:26379", None): 20,
    }
    for (host, port), minimum in found.items():
        assert s.for_target(host, port, None).breaker_minimum_calls == minimum, (host, port)
    targets = TargetPolicies("x", s, clock=fake_clock, telemetry=False)
    policy_for = targets.policy_for
    assert policy_for("api.example.invalid", 80, "GET /x", retry_allowed=True).retry.attempts == 5
    replicas = "mymaster replicas@127.0.0.1:26379"
    assert policy_for(replicas, None, "GET", retry_allowed=True).retry.attempts == 6


def test_a_socket_directory_and_an_ipv6_host_list_are_found_as_the_targets_name_them(
    tmp_path,
):
    """A socket directory's target is its real path (``/var/run/postgresql`` is
    ``/run/postgresql`` where ``/var/run`` links to ``/run``): its section reaches it. A
    host list with IPv6 members was refused at start-up, which left otel-recovery off."""
    import os

    from otel_recovery.instrumentors._pg_targets import pg_target

    linked = tmp_path / "run"
    (tmp_path / "real").mkdir()
    linked.symlink_to(tmp_path / "real")
    env = policy(
        tmp_path,
        f'[targets."{linked}:5432"]\nbreaker_minimum_calls = 7\n'
        '[targets."[::1]:5432,[::2]:5432"]\nbreaker_minimum_calls = 8\n',
    )
    s = load_settings(environ=env)
    socket_host, socket_port = pg_target([(f"{linked}/", 5432)])
    assert socket_host == os.path.realpath(linked)
    assert s.for_target(socket_host, socket_port, None).breaker_minimum_calls == 7
    listed_host, listed_port = pg_target([("::1", 5432), ("::2", 5432)])
    assert listed_host == "[::1]:5432,[::2]:5432"
    assert s.for_target(listed_host, listed_port, None).breaker_minimum_calls == 8


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("[::1", r"'\[::1' is not a host or host:port \(an IPv6 address goes in brackets"),
        ("[::1]5432", r"'\[::1\]5432' is not a host or host:port"),
        ("[::1]:", r"'\[::1\]:' is not a host or host:port"),
        ("[db.internal]:5432", r"brackets hold an IPv6 address, and 'db.internal' is not one"),
        ("db.internal:port", r"the port in 'db.internal:port' is not a number"),
        ("xn--zz.example", r"'xn--zz.example' is not a valid internationalised domain name"),
        # matched as written, these sections were never applied to any call
        ("https://api.example.com/v1", r"is a URL; .*\[targets.\"api.example.com\"\]"),
        ("db.internal:70000", r"the port in 'db.internal:70000' is not a TCP port"),
        ("[::1]:0", r"the port in '\[::1\]:0' is not a TCP port"),
    ],
)
def test_a_target_key_that_names_no_target_is_an_error_naming_it(tmp_path, key, message):
    with pytest.raises(SettingsError, match=r'\[targets."' + re.escape(key) + r'"\].*' + message):
        load_settings(environ=policy(tmp_path, f'[targets."{key}"]\nmax_attempts = 2\n'))


@pytest.mark.parametrize(
    ("first", "second"),
    [("Api.Example.invalid", "api.example.invalid"), ("[::1]:5432", "::1:5432")],
)
def test_two_sections_for_one_target_are_an_error(tmp_path, first, second):
    text = f'[targets."{first}"]\nmax_attempts = 2\n[targets."{second}"]\nmax_attempts = 4\n'
    with pytest.raises(SettingsError, match=r"both name the target .*merge them into one"):
        load_settings(environ=policy(tmp_path, text))


def test_backoff_is_checked_for_the_sections_a_call_meets_whatever_their_spelling(tmp_path):
    """A call to ``::1:5432`` meets ``[targets."::1"]`` and ``[targets."[::1]:5432"]``."""
    text = '[targets."::1"]\nbackoff_max = 0.1\n[targets."[::1]:5432"]\nbackoff_initial = 1\n'
    with pytest.raises(SettingsError, match=r"backoff_initial=1 .* is larger than backoff_max"):
        load_settings(environ=policy(tmp_path, text))


# -- which level wins --------------------------------------------------------------------


def test_keyword_arguments_win_over_every_level_of_the_file(tmp_path, fake_clock):
    env = policy(
        tmp_path,
        'max_attempts = 4\n[targets."api"]\nmax_attempts = 5\nbreaker_window = 10\n'
        '[targets."api:443"]\nmax_attempts = 6\n'
        '[targets."api:443".operations."GET /x"]\nmax_attempts = 7\ndeadline = 9\n',
    )
    s = load_settings({"max_attempts": 1}, environ=env)
    for operation in (None, "GET /x", "GET /y"):
        assert s.for_target("api", 443, operation).max_attempts == 1
    assert (
        s.for_target("api", 443, "GET /x").deadline == 9.0
    )  # the file's, where kwargs say nothing
    assert s.for_target("api", 80, None).breaker_window == 10
    targets = TargetPolicies("http", s, clock=fake_clock, telemetry=False)
    assert targets.policy_for("api", 443, "GET /x", retry_allowed=True).retry.attempts == 1
    # the file's target sections still beat the environment's service-wide values
    env["OTEL_RECOVERY_MAX_ATTEMPTS"] = "2"
    s = load_settings(environ=env)
    assert s.max_attempts == 4 and s.for_target("api", 80, None).max_attempts == 5
    assert s.for_target("other", 80, None).max_attempts == 4
    s = load_settings({"fallback_value": "kw"}, environ=env)
    assert s.for_target("api", 443, "GET /x").fallback_value == "kw"


# -- accepted values ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["GET;HEAD", "GET HEAD", "GET,HE AD", "GET/HEAD", "(GET)"])
def test_an_http_method_that_is_not_a_token_is_an_error(tmp_path, value):
    with pytest.raises(SettingsError, match=r"OTEL_RECOVERY_HTTP_RETRY_METHODS.*not an HTTP"):
        load_settings(environ={"OTEL_RECOVERY_HTTP_RETRY_METHODS": value})
    with pytest.raises(SettingsError, match=r"separate methods with commas") as bad:
        load_settings({"http_retry_methods": value}, environ={})
    assert bad.value.from_arguments
    text = f'[targets."api"]\nhttp_retry_methods = {json.dumps(value)}\n'
    with pytest.raises(SettingsError, match=r"http_retry_methods \(from \[targets"):
        load_settings(environ=policy(tmp_path, text))


def test_an_unknown_but_well_formed_method_is_kept_with_a_warning_naming_the_closest(caplog):
    with caplog.at_level(logging.WARNING, logger="otel_recovery.instrumentors"):
        s = load_settings(environ={"OTEL_RECOVERY_HTTP_RETRY_METHODS": "GET,GTE,PURGE,patch"})
        load_settings(environ={"OTEL_RECOVERY_HTTP_RETRY_METHODS": "GET,GTE,PURGE,patch"})
    assert s.http_retry_methods == {"GET", "GTE", "PURGE", "PATCH"}
    assert [r.getMessage() for r in caplog.records] == [
        "OTEL_RECOVERY_HTTP_RETRY_METHODS: GTE is not a standard HTTP method "
        "(did you mean GET?); it is kept, as a custom method",
        "OTEL_RECOVERY_HTTP_RETRY_METHODS: PURGE is not a standard HTTP method; "
        "it is kept, as a custom method",
    ]


def test_a_misspelt_method_says_the_method_it_meant_is_no_longer_retried(caplog):
    """The list replaces the default one: ``GTE`` alone means GET is not retried any more,
    which the warning says, since that is what a user who meant GET must learn."""
    with caplog.at_level(logging.WARNING, logger="otel_recovery.instrumentors"):
        s = load_settings(environ={"OTEL_RECOVERY_HTTP_RETRY_METHODS": "HEAD,GTE"})
    assert s.http_retry_methods == {"HEAD", "GTE"}
    assert [r.getMessage() for r in caplog.records] == [
        "OTEL_RECOVERY_HTTP_RETRY_METHODS: GTE is not a standard HTTP method "
        "(did you mean GET?); it is kept, as a custom method; GET is not in the list, so "
        "GET requests are not retried",
    ]


@pytest.mark.parametrize("value", ["GET SET", "GET;SET", "get:x", "A B C", "CONFIG GET X", "1X"])
def test_a_redis_command_name_that_cannot_be_one_is_an_error(value):
    for name in ("REDIS_RETRY_COMMANDS", "REDIS_NO_RETRY_COMMANDS"):
        with pytest.raises(SettingsError, match=rf"OTEL_RECOVERY_{name}.*not a Redis command"):
            load_settings(environ={f"OTEL_RECOVERY_{name}": value})


def test_redis_command_names_in_their_forms_and_unknown_ones_with_the_closest(caplog):
    env = {
        "OTEL_RECOVERY_REDIS_RETRY_COMMANDS": "hset, config|get, SETT, CONFIG GTE, JSON.GET",
        "OTEL_RECOVERY_REDIS_NO_RETRY_COMMANDS": "XGROUP CREATE, CLIENT KILL, HGETAL",
    }
    with caplog.at_level(logging.WARNING, logger="otel_recovery.instrumentors"):
        s = load_settings(environ=env)
    assert s.redis_retry_commands == {"HSET", "CONFIG GET", "SETT", "CONFIG GTE", "JSON.GET"}
    assert s.redis_no_retry_commands == {"XGROUP CREATE", "CLIENT KILL", "HGETAL"}
    warned = [r.getMessage() for r in caplog.records]
    assert sorted(warned) == [
        "OTEL_RECOVERY_REDIS_NO_RETRY_COMMANDS: HGETAL is not a Redis command we know "
        "(did you mean HGETALL?); it is kept, as written",
        "OTEL_RECOVERY_REDIS_RETRY_COMMANDS: CONFIG GTE is not a Redis command we know "
        "(did you mean CONFIG GET?); it is kept, as written",
        "OTEL_RECOVERY_REDIS_RETRY_COMMANDS: SETT is not a Redis command we know "
        "(did you mean SET?); it is kept, as written",
    ]


def test_redis_gears_commands_are_names_we_know(caplog):
    """RedisGears 2's commands (redis-py 5's ``tfcall``, ``tfunction_load``): ``TFCALL`` is
    no misspelt ``FCALL``, and ``TFUNCTION`` takes a subcommand as ``FUNCTION`` does."""
    env = {"OTEL_RECOVERY_REDIS_NO_RETRY_COMMANDS": "tfcall, TFCALLASYNC, tfunction|load"}
    with caplog.at_level(logging.WARNING, logger="otel_recovery.instrumentors"):
        s = load_settings(environ=env)
    assert s.redis_no_retry_commands == {"TFCALL", "TFCALLASYNC", "TFUNCTION LOAD"}
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BREAKER_WINDOW", "100001"),
        ("BREAKER_WINDOW", "99999999999"),  # allocated a window that size: MemoryError
        ("BREAKER_MINIMUM_CALLS", "100001"),
        ("BREAKER_HALF_OPEN_CALLS", "1001"),
        ("BREAKER_OPEN_SECONDS", "86401"),
        ("BREAKER_OPEN_SECONDS", "1e308"),
        ("DEADLINE", "86401"),
        ("ATTEMPT_TIMEOUT", "86401"),
        ("RETRY_AFTER_CAP", "86401"),
        ("BUDGET_MIN_PER_SECOND", "1e300"),  # no budget at all, accepted before
    ],
)
def test_numbers_have_an_upper_bound(name, value):
    bounded = rf"OTEL_RECOVERY_{name}='{value}' is not valid: expected .*(at most|to) "
    with pytest.raises(SettingsError, match=bounded):
        load_settings(environ={f"OTEL_RECOVERY_{name}": value})


NUMBERS = [
    "backoff_initial",
    "backoff_max",
    "deadline",
    "attempt_timeout",
    "retry_after_cap",
    "budget_ratio",
    "budget_min_per_second",
    "breaker_failure_rate",
    "breaker_open_seconds",
    "max_attempts",
    "breaker_window",
]


def test_inf_and_nan_are_rejected_everywhere(tmp_path):
    for name in NUMBERS:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(SettingsError, match=f"OTEL_RECOVERY_{name.upper()}"):
                load_settings(environ={f"OTEL_RECOVERY_{name.upper()}": value})
            with pytest.raises(SettingsError, match=rf"{name} \(from instrument"):
                load_settings({name: float(value)}, environ={})
            text = f'[targets."api"]\n{name} = {value}\n'
            with pytest.raises(SettingsError, match=rf"{name} \(from \[targets"):
                load_settings(environ=policy(tmp_path, text))


@pytest.mark.parametrize("name", ["max_attempts", "breaker_window", "deadline", "budget_ratio"])
def test_a_boolean_is_not_a_number(tmp_path, name):
    with pytest.raises(SettingsError, match=rf"{name} \(from instrument.*=True is not valid"):
        load_settings({name: True}, environ={})
    with pytest.raises(SettingsError, match=rf"{name} \(from policy file"):
        load_settings(environ=policy(tmp_path, f"{name} = true\n"))


def test_backoff_initial_above_backoff_max_is_an_error_naming_both(tmp_path, probe, caplog):
    # above the default backoff_max only: the longest wait follows it, as it always did
    alone = load_settings(environ={"OTEL_RECOVERY_BACKOFF_INITIAL": "5"})
    made = TargetPolicies("x", alone).policy_for("h", 80, None, retry_allowed=True)
    assert (made.retry.backoff.initial, made.retry.backoff.maximum) == (5, 5)
    with pytest.raises(
        SettingsError,
        match=r"backoff_initial=5 \(from OTEL_RECOVERY_BACKOFF_INITIAL\) is larger than "
        r"backoff_max=2 \(from OTEL_RECOVERY_BACKOFF_MAX\)",
    ) as bad:
        load_settings(
            environ={"OTEL_RECOVERY_BACKOFF_INITIAL": "5", "OTEL_RECOVERY_BACKOFF_MAX": "2"}
        )
    assert not bad.value.from_arguments
    env = policy(
        tmp_path,
        'backoff_max = 0.5\n[targets."api"]\n[targets."api".operations."GET /x"]\n'
        "backoff_initial = 1\n",
    )
    with pytest.raises(
        SettingsError,
        match=r'backoff_initial=1 \(from \[targets."api".operations."GET /x"\] in policy file '
        r'.*backoff_max=0.5 \(from policy file .*\) for \[targets."api".operations."GET /x"\]',
    ):
        load_settings(environ=env)
    with pytest.raises(SettingsError, match=r"backoff_initial=1 \(from instrument") as bad:
        load_settings({"backoff_initial": 1, "backoff_max": 0.5}, environ={})
    assert bad.value.from_arguments  # the program's own call: it raises out of instrument()
    probe.instrument(backoff_initial=3)  # above the default backoff_max: taken as the longest
    assert probe.is_instrumented_by_opentelemetry
    probe.uninstrument()
    assert not errors(caplog)
    s = load_settings({"backoff_max": 2}, environ=env)  # the keyword argument wins: no conflict
    assert s.for_target("api", 80, "GET /x").backoff_max == 2


def test_every_seconds_setting_accepts_a_timedelta():
    seconds = [
        "backoff_initial",
        "backoff_max",
        "deadline",
        "attempt_timeout",
        "retry_after_cap",
        "breaker_open_seconds",
    ]
    s = load_settings(dict.fromkeys(seconds, timedelta(milliseconds=1500)), environ={})
    assert [getattr(s, name) for name in seconds] == [1.5] * len(seconds)
    with pytest.raises(SettingsError, match="budget_ratio"):
        load_settings({"budget_ratio": timedelta(seconds=1)}, environ={})  # not a time


@pytest.mark.parametrize("value", ["{bad json", "nan", "NaN", "Infinity", "[1,]"])
def test_a_fallback_value_that_is_not_json_says_so(value):
    with pytest.raises(
        SettingsError, match=r"OTEL_RECOVERY_FALLBACK_VALUE=.* expected a JSON value"
    ):
        load_settings(environ={"OTEL_RECOVERY_FALLBACK_VALUE": value})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("policy.yaml", "max_attempts: 3\n", r"names a YAML file"),
        ("policy.yml", "max_attempts = 3\n", r"names a YAML file"),
        ("policy.conf", '{"max_attempts": 3}', r"holds JSON.*\.json"),
        ("policy", '{"max_attempts": 3}', r"holds JSON.*\.json"),
        ("policy.toml", "max_attempts = \n", r"is not valid TOML"),
        ("policy.json", '{"max_attempts": 3,}', r"is not valid JSON"),
    ],
)
def test_a_policy_file_in_another_format_names_the_accepted_ones(tmp_path, name, text, message):
    with pytest.raises(SettingsError, match=message) as bad:
        load_settings(environ=policy(tmp_path, text, name))
    assert "TOML, or JSON with a .json extension" in str(bad.value)


def test_uninstrument_saves_what_the_learner_learned_since_its_last_save(
    probe, monkeypatch, tmp_path
):
    from otel_recovery.learning.store import CheckpointLearnerStore

    url = f"sqlite:///{tmp_path / 'learned.db'}"
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    monkeypatch.setenv("OTEL_RECOVERY_LEARNING", "shadow")
    probe.instrument()
    probe.targets.learner.observe_recovery("probe:api", 0.25)  # saved every minute at most
    probe.uninstrument()
    saved = CheckpointLearnerStore(url, name="instrumentor.probe").load()
    assert saved is not None and saved["delays"] == {"probe:api": [0.25]}


@pytest.mark.parametrize(
    "text",
    [
        "fallback_value = 1979-05-27T07:32:00Z\n",  # a TOML datetime
        '[targets."api".operations."GET /x"]\nfallback_value = [1, 07:32:00]\n',
    ],
)
def test_a_fallback_value_in_the_file_no_client_could_answer_with_is_refused(tmp_path, text):
    """It was found by ``json.dumps`` when an HTTP call fell back, and the TypeError
    replaced the failure the fallback was there to answer."""
    with pytest.raises(SettingsError, match=r"fallback_value.*a TOML date or time is not JSON"):
        load_settings(environ=policy(tmp_path, text))


@pytest.mark.parametrize("value", [object(), float("nan"), {b"member"}])
def test_an_http_instrumentor_refuses_a_fallback_value_it_cannot_answer_with(value):
    """From ``instrument()`` any value is a Redis or SQL read's answer (a set, a row); an
    HTTP instrumentor, whose answer is a body, refuses one that is not bytes, text or JSON."""
    from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor

    assert load_settings({"fallback_value": value}, environ={}).fallback_value is value
    http = RequestsRecoveryInstrumentor()
    with pytest.raises(SettingsError, match=r"fallback_value .*an HTTP client answers with bytes"):
        http.instrument(fallback_value=value)
    assert not http.is_instrumented_by_opentelemetry
    assert load_settings({"fallback_value": b"\x00raw"}, environ={}).fallback_value == b"\x00raw"


def test_an_empty_variable_means_the_same_as_an_unset_one():
    """The OpenTelemetry rule for environment variables. An empty one used to stop
    recovery (``MAX_ATTEMPTS=``), empty a list (``HTTP_RETRY_METHODS=``: no retries) or name
    a policy file called " "."""
    empty = {
        "OTEL_RECOVERY_MAX_ATTEMPTS": "",
        "OTEL_RECOVERY_HTTP_RETRY_METHODS": " ",
        "OTEL_RECOVERY_DEADLINE": "",
        "OTEL_RECOVERY_FALLBACK_VALUE": "",
        "OTEL_RECOVERY_CONFIG": "  ",
        "OTEL_RECOVERY_ENABLED": "",
    }
    assert load_settings(environ=empty) == load_settings(environ={})


def test_a_minimum_of_calls_above_the_window_is_refused(tmp_path):
    """It was clamped to the window without a word: a minimum of 100 calls judged after 2."""
    with pytest.raises(
        SettingsError, match="breaker_minimum_calls=100 .* larger than breaker_window=2"
    ):
        load_settings(
            environ={
                "OTEL_RECOVERY_BREAKER_WINDOW": "2",
                "OTEL_RECOVERY_BREAKER_MINIMUM_CALLS": "100",
            }
        )
    with pytest.raises(SettingsError, match="larger than breaker_window=50 \\(from the default\\)"):
        load_settings({"breaker_minimum_calls": 60}, environ={})
    text = '[targets."db:5432"]\nbreaker_window = 10\nbreaker_minimum_calls = 20\n'
    with pytest.raises(SettingsError, match='for targets."db:5432"|db:5432'):
        load_settings(environ=policy(tmp_path, text))
    assert load_settings({"breaker_minimum_calls": 50}, environ={}).breaker_minimum_calls == 50


def test_a_key_given_twice_in_a_json_policy_file_is_refused(tmp_path):
    """json kept the last silently, a whole target section included; TOML refuses it."""
    text = '{"targets": {"a.example": {"max_attempts": 2}, "a.example": {"budget_ratio": 0.5}}}'
    with pytest.raises(SettingsError, match="'a.example' is given twice"):
        load_settings(environ=policy(tmp_path, text, "policy.json"))


@pytest.mark.parametrize("name", ["policy.toml", "policy.json"])
def test_a_policy_file_saved_with_a_byte_order_mark_is_read(tmp_path, name):
    text = "max_attempts = 5\n" if name.endswith(".toml") else '{"max_attempts": 5}'
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_settings(environ={"OTEL_RECOVERY_CONFIG": str(path)}).max_attempts == 5


@pytest.mark.parametrize("blank", ["", ",", " , "])
def test_a_list_that_names_nothing_is_refused_rather_than_switching_retries_off(tmp_path, blank):
    """From the file or instrument(), "" gave an empty set: no method retried, silently;
    an empty variable means the default, and [] says "none" on purpose."""
    with pytest.raises(SettingsError, match="names nothing"):
        load_settings({"http_retry_methods": blank}, environ={})
    with pytest.raises(SettingsError, match="names nothing"):
        load_settings(environ=policy(tmp_path, f'http_retry_statuses = "{blank}"\n'))
    assert load_settings({"http_retry_methods": []}, environ={}).http_retry_methods == frozenset()


def test_bytes_for_a_list_setting_are_refused():
    """Iterated, ``b"GET"`` was the numbers 71, 69 and 84: GET was no longer retried."""
    with pytest.raises(SettingsError, match="not bytes"):
        load_settings({"http_retry_methods": b"GET"}, environ={})


def test_an_infinite_fallback_value_from_the_environment_is_refused():
    """``1e999`` became inf and was answered as the body ``Infinity``, which is not JSON."""
    with pytest.raises(SettingsError, match="OTEL_RECOVERY_FALLBACK_VALUE"):
        load_settings(environ={"OTEL_RECOVERY_FALLBACK_VALUE": "1e999"})


def test_an_ipv6_server_is_one_target_however_its_address_is_spelled():
    from otel_recovery.instrumentors._http import target_of

    assert target_of("http", "0:0:0:0:0:0:0:1", 8080) == target_of("http", "::1", 8080)
    assert target_of("http", "[0:0:0:0:0:0:0:1]", None) == ("[::1]", 80)
    assert target_of("http", "Example.COM", None) == ("example.com", 80)
