"""The instrumentor base: settings, layer-aware wrapping, per-target policies, resend count."""

from __future__ import annotations

import gc
import json
import re
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import pytest
import redis
import wrapt
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers import REDIS_HOST, REDIS_PORT, require_redis

from otel_recovery._attempt import ATTEMPT, current_attempt
from otel_recovery._first_times import FirstTimes
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._db_plans import PlanCache
from otel_recovery.instrumentors._http import plan_call
from otel_recovery.instrumentors._http_plans import HttpPlans
from otel_recovery.instrumentors._resend import install_resend_processor
from otel_recovery.instrumentors._settings import (
    RecoverySettings,
    SettingsError,
    load_settings,
    unknown_variables,
)
from otel_recovery.instrumentors._target_retries import hold_back
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.learning.strategy import StrategyLearner
from otel_recovery.policies import FixedBackoff, Retry, RetryBudget
from otel_recovery.recover import RecoveryPolicy

# -- settings ------------------------------------------------------------------------------


def test_defaults_are_conservative():
    s = load_settings(environ={})
    assert s.max_attempts == 3 and s.budget_ratio == 0.1
    assert s.http_retry_methods == {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
    assert "POST" not in s.http_retry_methods and s.sql_retry == "connect"


def test_environment_then_file_then_kwargs(tmp_path):
    config = tmp_path / "policy.toml"
    config.write_text(
        'max_attempts = 4\nbudget_ratio = 0.2\n[targets."api.local"]\nmax_attempts = 6\n'
        '[targets."api.local".operations."GET /prices"]\nfallback_value = []\n'
    )
    env = {
        "OTEL_RECOVERY_MAX_ATTEMPTS": "2",
        "OTEL_RECOVERY_BACKOFF_INITIAL": "0.2",
        "OTEL_RECOVERY_HTTP_RETRY_METHODS": "get, head",
        "OTEL_RECOVERY_CONFIG": str(config),
    }
    s = load_settings({"budget_ratio": 0.05}, environ=env)
    assert s.max_attempts == 4  # file beats env
    assert s.backoff_initial == 0.2  # env where the file is silent
    assert s.budget_ratio == 0.05  # kwargs beat both
    assert s.http_retry_methods == {"GET", "HEAD"}
    assert s.for_target("api.local", 443, None).max_attempts == 6
    priced = s.for_target("api.local", 443, "GET /prices")
    assert priced.has_fallback and priced.fallback_value == []
    assert not s.for_target("other.local", 443, "GET /prices").has_fallback


def test_json_policy_file(tmp_path):
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"max_attempts": 5, "targets": {"db:5432": {"max_attempts": 1}}}))
    s = load_settings(environ={"OTEL_RECOVERY_CONFIG": str(config)})
    assert s.max_attempts == 5 and s.for_target("db", 5432, None).max_attempts == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_RECOVERY_MAX_ATTEMPTS": "lots"}, r"OTEL_RECOVERY_MAX_ATTEMPTS='lots' is not valid"),
        ({"OTEL_RECOVERY_MAX_ATTEMPTS": "0"}, r"expected an integer from 1 to 20"),
        ({"OTEL_RECOVERY_BUDGET_RATIO": "10"}, r"a ratio from 0 to 1"),
        ({"OTEL_RECOVERY_SQL_RETRY": "always"}, r"'connect' or 'never'"),
        # OTEL_RECOVERY_ENABLED=maybe is logged and taken as false instead: test_settings.py
        ({"OTEL_RECOVERY_CONFIG": "/nonexistent/policy.toml"}, r"cannot be read"),
    ],
)
def test_bad_settings_fail_with_the_setting_named(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=env)


def test_unknown_keys_in_a_file_are_rejected_with_the_known_list(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text("max_atempts = 3\n")
    with pytest.raises(
        SettingsError, match=r"unknown setting 'max_atempts'.*known settings: .*max_attempts"
    ):
        load_settings(environ={"OTEL_RECOVERY_CONFIG": str(config)})


def test_an_unknown_variable_is_named_once_with_the_closest_real_one_and_ignored(
    caplog, monkeypatch
):
    monkeypatch.setattr("otel_recovery.instrumentors._setting_values._warned", FirstTimes())
    env = {
        "OTEL_RECOVERY_MAX_ATEMPTS": "5",  # a typo
        "OTEL_RECOVERY_SOMETHING_ELSE": "1",  # nothing close
        "OTEL_RECOVERY_BUDGET_RATIO": "0.2",
        # read elsewhere in the package: not unknown
        "OTEL_RECOVERY_STORE_URL": "sqlite://",
        "OTEL_RECOVERY_NO_EXTENSIONS": "false",
        "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES": "1000",
        "OTEL_SERVICE_NAME": "svc",  # not ours
    }
    with caplog.at_level("WARNING", logger="otel_recovery.instrumentors"):
        settings = load_settings(environ=env)
        load_settings(environ=env)  # every instrumentor loads them: still one warning each
    assert settings.max_attempts == 3 and settings.budget_ratio == 0.2
    assert [r.getMessage() for r in caplog.records] == [
        "OTEL_RECOVERY_MAX_ATEMPTS is not an otel-recovery setting and is ignored; "
        "did you mean OTEL_RECOVERY_MAX_ATTEMPTS?",
        "OTEL_RECOVERY_SOMETHING_ELSE is not an otel-recovery setting and is ignored",
    ]


def test_no_otel_recovery_variable_the_project_names_is_taken_for_unknown():
    """The variables read outside the settings are listed by hand (``_OTHER_VARIABLES``):
    every name the code, benchmarks, examples and docs mention must be known."""
    root = Path(__file__).resolve().parents[2]
    paths = [
        *root.glob("otel_recovery/**/*.py"),
        *root.glob("benchmarks/*.py"),
        *root.glob("examples/**/*.*"),
        *root.glob("docs/**/*.md"),
        root / "README.md",
        root / ".ci" / "run",
    ]
    named = set()
    for path in paths:
        named |= set(re.findall(r"OTEL_RECOVERY_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")))
    assert len(named) > 20  # the scan found the settings
    flagged = {name for name, _ in unknown_variables(dict.fromkeys(named, ""))}
    assert flagged == {"OTEL_RECOVERY_MAX_ATEMPTS"}  # the README's example of a typo


def test_bad_values_in_target_sections_fail_at_load_time(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[targets."x"]\nbudget_ratio = 3\n')
    with pytest.raises(SettingsError, match=r'budget_ratio \(from \[targets."x"\] in policy file'):
        load_settings(environ={"OTEL_RECOVERY_CONFIG": str(config)})


# -- wrapping ------------------------------------------------------------------------------


class Client:
    def call(self, value):
        return ("original", value)


def contrib_like_wrapper(wrapped, instance, args, kwargs):
    return ("contrib", wrapped(*args, **kwargs))


contrib_like_wrapper.__module__ = "opentelemetry.instrumentation.fake"


def ours(wrapped, instance, args, kwargs):
    return ("ours", wrapped(*args, **kwargs))


@pytest.fixture
def client_class():
    original = Client.__dict__["call"]
    yield Client
    Client.call = original


def test_wrap_and_remove_restores_the_original_identity(client_class):
    original = client_class.__dict__["call"]
    patches = PatchSet("test")
    patches.wrap(client_class, "call", ours)
    patches.enabled = True
    assert client_class().call(1) == ("ours", ("original", 1))
    patches.remove_all()
    assert client_class.__dict__["call"] is original


def test_disabled_patchset_passes_straight_through(client_class):
    patches = PatchSet("test")
    patches.wrap(client_class, "call", ours)
    assert client_class().call(1) == ("original", 1)  # not enabled yet


def test_beneath_contrib_splices_under_an_existing_contrib_wrapper(client_class):
    wrapt.wrap_function_wrapper(client_class, "call", contrib_like_wrapper)
    patches = PatchSet("test")
    patches.wrap(client_class, "call", ours, beneath_contrib=True)
    patches.enabled = True
    assert client_class().call(1) == ("contrib", ("ours", ("original", 1)))
    patches.remove_all()
    assert client_class().call(1) == ("contrib", ("original", 1))


def test_removing_ours_when_someone_wrapped_on_top_keeps_their_layer(client_class):
    original = client_class.__dict__["call"]
    patches = PatchSet("test")
    patches.wrap(client_class, "call", ours)
    patches.enabled = True
    wrapt.wrap_function_wrapper(client_class, "call", contrib_like_wrapper)  # contrib loads later
    patches.remove_all()
    top = client_class.__dict__["call"]
    assert client_class().call(1) == ("contrib", ("original", 1))
    assert top.__wrapped__ is original


def ours_layer(original):
    def layer(*args, **kwargs):
        return ("ours", original(*args, **kwargs))

    return layer


def test_a_layer_splices_under_contrib_and_leaves_by_identity(client_class):
    original = client_class.__dict__["call"]
    wrapt.wrap_function_wrapper(client_class, "call", contrib_like_wrapper)
    patches = PatchSet("test")
    patches.layer(client_class, "call", ours_layer, beneath_contrib=True)
    assert client_class().call(1) == ("contrib", ("ours", ("original", 1)))
    patches.remove_all()
    top = client_class.__dict__["call"]
    assert client_class().call(1) == ("contrib", ("original", 1))
    assert top.__wrapped__ is original


def test_a_layer_above_a_foreign_wrapt_proxy_passes_it_the_instance(client_class):
    seen = []

    def foreign(wrapped, instance, args, kwargs):
        seen.append(instance)
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(client_class, "call", foreign)
    foreign_proxy = client_class.__dict__["call"]
    patches = PatchSet("test")
    patches.layer(client_class, "call", ours_layer)
    client = client_class()
    assert client.call(1) == ("ours", ("original", 1))
    assert seen == [client]  # bound as attribute access would, not instance=None
    patches.remove_all()
    assert client_class.__dict__["call"] is foreign_proxy


def test_a_layer_refuses_a_classmethod_with_the_fix_named():
    class Factory:
        @classmethod
        def make(cls):
            return cls

    with pytest.raises(TypeError, match=r"Factory.make is a classmethod.*PatchSet.wrap\(\)"):
        PatchSet("test").layer(Factory, "make", ours_layer)
    assert Factory.make() is Factory


def test_internal_errors_are_reported_once(caplog):
    for _ in range(3):
        report_internal_error("unit-test-site", RuntimeError("boom"))
    assert sum("unit-test-site" in r.getMessage() for r in caplog.records) == 1


# -- targets -------------------------------------------------------------------------------


def test_one_breaker_and_budget_per_target_and_single_attempt_twins(fake_clock):
    targets = TargetPolicies("http", RecoverySettings(), clock=fake_clock)
    a = targets.policy_for("a.local", 443, "GET /", retry_allowed=True)
    a_post = targets.policy_for("a.local", 443, "POST /", retry_allowed=False)
    b = targets.policy_for("b.local", 443, "GET /", retry_allowed=True)
    assert a.breaker is a_post.breaker and a.breaker is not b.breaker
    assert a.retry.attempts == 3 and a_post.retry.attempts == 1
    assert a_post.budget is None and a.budget is not None
    assert targets.policy_for("a.local", 443, "GET /x", retry_allowed=True) is a
    assert a.breaker.name == "http a.local:443"


def test_target_count_is_bounded(fake_clock):
    targets = TargetPolicies("http", RecoverySettings(), clock=fake_clock, max_targets=3)
    for i in range(10):
        targets.policy_for(f"h{i}", 80, None, retry_allowed=True)
    assert len(targets.breakers()) == 3


def test_a_forgotten_target_takes_the_plans_remembered_for_it_along(fake_clock):
    """Past ``max_targets`` the table forgets its oldest target: a plan still remembered
    for it (by URL, or by call shape) would go on with a breaker the table no longer has,
    while new calls to the same server got a new one, two circuits for one server."""
    targets = TargetPolicies("http", RecoverySettings(), clock=fake_clock, max_targets=2)
    http, db = HttpPlans(targets), PlanCache(targets)

    def remembered(host: str) -> tuple[Any, Any]:
        call = plan_call(
            targets, "GET", host, 80, "/", has_key=lambda: False, replayable=True,
            unsent=lambda error: False,
        )  # fmt: skip
        http.remember_by_url(f"http://{host}/", "GET", http.compile(call))
        return http.recall(f"http://{host}/", "GET"), db.plan(host, 80, "GET", "own")

    first_http, first_db = remembered("a.local")
    remembered("b.local")
    assert http.recall("http://a.local/", "GET") is first_http  # both still in the table
    remembered("c.local")  # a.local is forgotten
    assert http.recall("http://a.local/", "GET") is None
    again_http, again_db = remembered("a.local")
    breaker = targets.known_breaker("a.local", 80)
    assert again_http.call.policy.breaker is breaker is again_db.policy.breaker
    # a plan kept elsewhere (a client's pool holds first_db) keeps the forgotten target:
    # asked for again, it comes back, so the server still has one circuit
    assert breaker is first_http.call.policy.breaker is first_db.policy.breaker


def test_a_forgotten_target_still_in_use_comes_back_with_its_breaker(fake_clock):
    """A client's pool keeps its plans (Redis, psycopg) past the table forgetting their
    target: new clients of the same server got a new breaker, so one server had two
    circuits, one open for the old clients and one closed for the new."""
    targets = TargetPolicies("redis", RecoverySettings(), clock=fake_clock, max_targets=2)
    kept = targets.policy_for("a.local", 6379, None, retry_allowed=True)  # a pool's plan
    kept.breaker.force_open()
    for host in ("b.local", "c.local", "d.local"):  # a.local is forgotten
        targets.policy_for(host, 6379, None, retry_allowed=True)
    assert targets.known_breaker("a.local", 6379) is None
    fresh = targets.policy_for("a.local", 6379, None, retry_allowed=True)  # a new client
    assert fresh.breaker is kept.breaker and fresh.budget is kept.budget
    assert targets.known_breaker("a.local", 6379) is kept.breaker


def test_a_forgotten_target_leaves_nothing_holding_its_breaker_and_budget(fake_clock):
    """Past ``max_targets`` the table forgets its oldest target, and its policies resolved
    by call shape go with it: kept there, they kept its breaker and budget alive (fleet-wide
    ones syncing with Redis, idle, for good) until the cache reached 4 x ``max_targets``."""
    targets = TargetPolicies("forgets", RecoverySettings(), clock=fake_clock, max_targets=8)
    breakers = []
    for i in range(20):  # one call shape per target: the cache never fills (4 x 8 shapes)
        policy = targets.policy_for(f"h{i}.local", 80, "GET", retry_allowed=True)
        breakers.append(weakref.ref(policy.breaker))
    del policy
    gc.collect()
    assert [i for i, breaker in enumerate(breakers) if breaker() is not None] == list(range(12, 20))
    budgets = {
        budget.name
        for budget in gc.get_objects()
        if isinstance(budget, RetryBudget) and budget.name.startswith("forgets ")
    }
    assert budgets == {f"forgets h{i}.local:80" for i in range(12, 20)}
    again = targets.policy_for("h0.local", 80, "GET", retry_allowed=True)  # a new breaker
    assert again.breaker is targets.known_breaker("h0.local", 80)
    assert breakers[0]() is None
    assert targets.policy_for("h0.local", 80, "GET", retry_allowed=True) is again


def test_a_forgotten_target_stops_syncing_its_fleet_wide_breaker_and_budget(monkeypatch):
    """With ``OTEL_RECOVERY_STORE_URL=redis://...`` every target's breaker and budget sync
    with Redis while they live: a forgotten target's must leave the sync thread's round."""
    require_redis()
    prefix = f"otr-test:{uuid.uuid4().hex[:10]}:"
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={prefix}"
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    targets = TargetPolicies("fleet", RecoverySettings(), max_targets=2)
    try:
        for i in range(6):
            policy = targets.policy_for(f"h{i}.local", 80, "GET", retry_allowed=True)
        link = policy.breaker._link  # type: ignore[attr-defined]
        del policy
        kinds = ("circuit_breaker", "retry_budget")
        kept = {f"{kind} fleet h{i}.local:80" for kind in kinds for i in (4, 5)}

        def synced() -> set[str]:
            with link._lock:
                return {member.description for member in link._members}

        deadline = time.monotonic() + 5.0  # a sync in flight holds its member until done
        while synced() != kept and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert synced() == kept
    finally:
        del targets
        gc.collect()
        time.sleep(0.3)  # a last sync in flight writes its keys again
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_per_operation_settings_get_their_own_policy(tmp_path, fake_clock):
    config = tmp_path / "p.toml"
    config.write_text('[targets."api"]\n[targets."api".operations."GET /slow"]\nmax_attempts = 5\n')
    s = load_settings(environ={"OTEL_RECOVERY_CONFIG": str(config)})
    targets = TargetPolicies("http", s, clock=fake_clock)
    slow = targets.policy_for("api", 80, "GET /slow", retry_allowed=True)
    other = targets.policy_for("api", 80, "GET /fast", retry_allowed=True)
    assert slow.retry.attempts == 5 and other.retry.attempts == 3
    assert slow.breaker is other.breaker


def _failing_then(*outcomes: object):
    """A call that raises or returns ``outcomes`` in turn; ``seen`` lists its arguments."""
    pending = list(outcomes)
    seen: list[tuple[object, ...]] = []

    def call(*args: object) -> object:
        seen.append(args)
        outcome = pending.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call, seen


def test_a_call_that_may_not_be_repeated_is_repeated_after_a_failure_proving_it_never_ran(
    fake_clock,
):
    class Refused(TimeoutError):  # retryable by its class, as READONLY is
        pass

    targets = TargetPolicies("redis", RecoverySettings(), clock=fake_clock, telemetry=False)
    incr = targets.policy_for(
        "r", 6379, None, retry_allowed=False, disallowed="non_idempotent_command",
        never_ran=lambda error: isinstance(error, Refused),
    )  # fmt: skip
    call, seen = _failing_then(Refused("READONLY"), Refused("READONLY"), 7)
    assert incr.call(call, "n") == 7 and len(seen) == 3
    assert incr.budget is not None  # its repeats spend the target's retry budget
    call, seen = _failing_then(ConnectionError("reset"), 7)  # may have run: not repeated
    with pytest.raises(ConnectionError):
        incr.call(call, "n")
    assert len(seen) == 1


def test_a_refused_call_is_not_resent_once_its_mend_held_it_back(fake_clock):
    class Refused(TimeoutError):
        pass

    def mend(error: BaseException, args: tuple[object, ...]) -> None:
        hold_back(error)  # the proof does not hold for this call (redis-py may have resent)

    targets = TargetPolicies(
        "redis", RecoverySettings(), clock=fake_clock, telemetry=False, mend=mend
    )
    incr = targets.policy_for(
        "r", 6379, None, retry_allowed=False, disallowed="non_idempotent_command",
        never_ran=lambda error: isinstance(error, Refused),
    )  # fmt: skip
    call, seen = _failing_then(Refused("READONLY"), 7)
    with pytest.raises(Refused):
        incr.call(call, "n")
    assert len(seen) == 1


def test_a_replica_refusal_is_known_by_its_reply_also_from_a_script_before_redis_7():
    import redis

    from otel_recovery._redis_replica import refused_by_replica

    assert refused_by_replica(redis.exceptions.ReadOnlyError("You can't write"))
    # Redis 6.2 wraps an error a script's call raised (redis/redis#10218 changed that)
    assert refused_by_replica(
        redis.exceptions.ResponseError(
            "Error running script (call to f_0b1c): @user_script:1: @user_script: 1: "
            "-READONLY You can't write against a read only replica."
        )
    )
    assert not refused_by_replica(redis.exceptions.ResponseError("WRONGTYPE Operation"))
    assert not refused_by_replica(ValueError("-READONLY "))


def test_the_mend_sees_each_failed_attempt_and_its_arguments(fake_clock):
    mended: list[tuple[str, tuple[object, ...]]] = []
    targets = TargetPolicies(
        "redis", RecoverySettings(), clock=fake_clock, telemetry=False,
        mend=lambda error, args: mended.append((str(error), args)),
    )  # fmt: skip
    policy = targets.policy_for("r", 6379, None, retry_allowed=True)
    call, _ = _failing_then(ConnectionError("first"), ConnectionError("second"), "ok")
    assert policy.call(call, "client") == "ok"
    assert mended == [("first", ("client",)), ("second", ("client",))]
    mended.clear()
    assert policy.call(lambda client: "ok", "client") == "ok"
    assert mended == []  # a call that succeeds first time is never mended


async def test_an_awaited_call_is_mended_by_amend(fake_clock):
    mended: list[str] = []

    async def amend(error: BaseException, args: tuple[object, ...]) -> None:
        mended.append(str(error))

    targets = TargetPolicies(
        "redis", RecoverySettings(), clock=fake_clock, telemetry=False, amend=amend
    )
    policy = targets.policy_for("r", 6379, None, retry_allowed=True)
    call, _ = _failing_then(ConnectionError("first"), "ok")

    async def acall(*args: object) -> object:
        return call(*args)

    assert await policy.acall(acall, "client") == "ok"
    assert mended == ["first"]


def test_a_mend_that_fails_is_logged_once_and_the_call_goes_on(fake_clock, caplog):
    def mend(error: BaseException, args: tuple[object, ...]) -> None:
        raise RuntimeError("a bug in the mend")

    targets = TargetPolicies(
        "redis", RecoverySettings(), clock=fake_clock, telemetry=False, mend=mend
    )
    policy = targets.policy_for("r", 6380, None, retry_allowed=True)
    for _ in range(2):
        call, seen = _failing_then(ConnectionError("reset"), "ok")
        assert policy.call(call) == "ok" and len(seen) == 2
    logged = [r for r in caplog.records if "after a failure" in r.getMessage()]
    assert len(logged) == 1 and "a bug in the mend" in str(logged[0].exc_info)


# -- resend count --------------------------------------------------------------------------


def test_with_learning_a_targets_policies_share_one_advisor_counting_its_calls(fake_clock):
    """Each policy made its own advisor, told no calls: the learner's retry-ratio cap then
    measured retries against failures alone (and blocked most retries of healthy, busy
    targets). One advisor per target reads the calls the target's budget counts."""
    learner = StrategyLearner(clock=fake_clock)
    targets = TargetPolicies("http", RecoverySettings(), clock=fake_clock, learner=learner)
    get = targets.policy_for("a.local", 443, "GET /", retry_allowed=True)
    head = targets.policy_for("a.local", 443, "HEAD /", retry_allowed=True, timed=False)
    other = targets.policy_for("b.local", 443, "GET /", retry_allowed=True)
    assert get.retry.advisor is head.retry.advisor is not other.retry.advisor
    advisor = get.retry.advisor
    for _ in range(250):
        get.budget.record_call()
    assert advisor._new_calls() == 250 and advisor._new_calls() == 0  # each call told once


class _HttpPolicy(RecoveryPolicy):
    """A policy whose retries resend an HTTP request, as the HTTP instrumentors' are."""

    __slots__ = ()
    _marks_resends = True


def _resend_counts(retrying: RecoveryPolicy, send: Any) -> list[tuple[str, Any]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_resend_processor(provider)
    retrying.call(send, provider.get_tracer("contrib-like"))
    return [
        (s.name, s.attributes.get("http.request.resend_count"))
        for s in exporter.get_finished_spans()
    ]


def _http_span(tracer: Any, name: str) -> Any:
    return tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT, attributes={"http.request.method": "GET"}
    )


def test_a_request_made_in_a_retry_of_something_else_is_a_first_send(fake_clock):
    """A recovered function, or a Redis command, retried: the HTTP request its second
    attempt makes is sent for the first time, and read as a resend in Jaeger."""
    failed: list[bool] = []

    def work(tracer: Any) -> None:
        with _http_span(tracer, "POST /pay"):
            pass
        if not failed:
            failed.append(True)
            raise ConnectionError("the function's own step failed")

    plain = RecoveryPolicy(
        retry=Retry(2, backoff=FixedBackoff(0)), clock=fake_clock, telemetry=False
    )
    assert _resend_counts(plain, work) == [("POST /pay", None), ("POST /pay", None)]


def test_only_the_resent_requests_own_span_counts_the_resend(fake_clock):
    """A request made inside the resent one (a hook's), or after it in the same attempt, is
    a first send of its own."""
    attempts: list[int] = []

    def send(tracer: Any) -> None:
        attempts.append(current_attempt())
        with _http_span(tracer, "GET"):
            with _http_span(tracer, "inside"):
                pass
        with _http_span(tracer, "after"):
            pass
        if len(attempts) < 2:
            raise ConnectionError("reset")

    http = _HttpPolicy(retry=Retry(2, backoff=FixedBackoff(0)), clock=fake_clock, telemetry=False)
    assert _resend_counts(http, send) == [
        ("inside", None), ("GET", None), ("after", None),
        ("inside", None), ("GET", 1), ("after", None),
    ]  # fmt: skip


def test_resend_count_is_stamped_on_http_client_spans_of_retries(fake_clock):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert install_resend_processor(provider) is True
    assert install_resend_processor(provider) is True  # idempotent
    tracer = provider.get_tracer("contrib-like")

    def send():
        with tracer.start_as_current_span(
            "GET", kind=SpanKind.CLIENT, attributes={"http.request.method": "GET"}
        ):
            assert current_attempt() >= 1
            if current_attempt() < 3:
                raise ConnectionError("reset")
        with tracer.start_as_current_span("db", kind=SpanKind.CLIENT):
            pass  # not HTTP: never stamped

    policy = _HttpPolicy(retry=Retry(3, backoff=FixedBackoff(0)), clock=fake_clock, telemetry=False)
    policy.call(send)
    http = [s for s in exporter.get_finished_spans() if s.name == "GET"]
    assert [s.attributes.get("http.request.resend_count") for s in http] == [None, 1, 2]
    db = [s for s in exporter.get_finished_spans() if s.name == "db"]
    assert "http.request.resend_count" not in db[0].attributes
    assert ATTEMPT.get() == 1
    assert install_resend_processor(object()) is False


class _NeedsAMissingLibrary(RecoveryInstrumentor):
    """An instrumentor whose library is not installed (as auto-instrumentation meets ours
    in a service without, say, asyncpg)."""

    library = "nothing"
    instruments = ("otel-recovery-no-such-library >= 1",)
    installed = False

    def _install(self, patches, targets, kwargs):
        type(self).installed = True


def test_a_missing_library_skips_only_its_instrumentor_as_the_loader_expects(monkeypatch):
    """The loader calls ``instrument(skip_dep_check=True)``. With a loader that knows
    ``DependencyConflictError`` (0.53b0+) we raise it, and the loader logs and goes on; an
    older loader re-raises any exception and stops loading every instrumentor after ours,
    so there the skip must be quiet."""
    from opentelemetry.instrumentation import dependencies

    found = getattr(dependencies, "DependencyConflictError", None)
    if found is not None:
        with pytest.raises(found, match="otel-recovery-no-such-library"):
            _NeedsAMissingLibrary().instrument(skip_dep_check=True)
        _NeedsAMissingLibrary().uninstrument()
        monkeypatch.delattr(dependencies, "DependencyConflictError")
    instrumentor = _NeedsAMissingLibrary()
    instrumentor.instrument(skip_dep_check=True)  # quiet: no exception
    assert not _NeedsAMissingLibrary.installed and instrumentor.targets is None
    instrumentor.uninstrument()
