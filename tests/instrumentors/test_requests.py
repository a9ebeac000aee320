"""RequestsRecoveryInstrumentor against a real local server with real faults.

Every test counts the requests the server actually received: that is the only honest
measure of "retried exactly N times" and "POST never sent twice".
"""

from __future__ import annotations

import contextlib
import gc
import http
import io
import logging
import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import wrapt
from frames import ours_that_ran, ours_that_ran_steadily
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from ours import marked_by_us
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

import otel_recovery.instrumentors.requests
from otel_recovery._first_times import FirstTimes
from otel_recovery.instrumentors import _wrapping, suppress_recovery
from otel_recovery.instrumentors._resend import ResendCountSpanProcessor
from otel_recovery.instrumentors._settings import SettingsError
from otel_recovery.instrumentors.requests import (
    RequestsCircuitOpenError,
    RequestsRecoveryInstrumentor,
)
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)
late = pytest.fixture(hf.late_port)

ORIGINAL_REQUEST = requests.sessions.Session.__dict__["request"]
ORIGINAL_SEND = requests.sessions.Session.__dict__["send"]


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()
    yield
    assert requests.sessions.Session.__dict__["request"] is ORIGINAL_REQUEST
    assert requests.sessions.Session.__dict__["send"] is ORIGINAL_SEND


@pytest.fixture
def clock():
    return FakeClock(wall_start=time.time())


@pytest.fixture
def instrument(tel, clock):
    """``instrument(order, contrib=True, **settings)``; uninstruments everything afterwards."""
    yield from hf.instrumenting(tel, clock, RequestsRecoveryInstrumentor, RequestsInstrumentor)


BOTH_ORDERS = pytest.mark.parametrize("order", ["ours_first", "contrib_first"])


@BOTH_ORDERS
def test_503_then_429_then_200_recovers_with_one_client_span_per_attempt(
    server, tel, instrument, clock, order
):
    instrument(order)
    url = server.script("/a", hf.status(503), hf.retry_after(429, 1), hf.ok("fresh"))
    with tel.tracer_provider.get_tracer("app").start_as_current_span("app") as app:
        response = requests.get(url, timeout=2)

    assert (response.status_code, response.text) == (200, "fresh")
    assert server.count("/a") == 3
    assert clock.sleeps[1] >= 1.0  # Retry-After: 1 honoured (plus jitter)
    clients = tel.clients()
    assert [s.attributes.get("http.status_code") for s in clients] == [503, 429, 200]
    assert [s.attributes.get("http.request.resend_count") for s in clients] == [None, 1, 2]
    recovery = tel.recovery()
    assert recovery.kind is SpanKind.INTERNAL
    assert recovery.name == f"recover requests 127.0.0.1:{server.port}"
    assert recovery.status.status_code is StatusCode.UNSET  # recovered: not an error
    assert "error.type" not in recovery.attributes
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 3
    failed = hf.events(recovery, "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == ["503", "429"]
    assert failed[1]["otel_recovery.error.retry_after"] == 1.0
    assert len(hf.events(recovery, "otel_recovery.retry")) == 2
    # The resends nest under the recovery; the first attempt and the recovery share a parent.
    app_id = app.get_span_context().span_id
    assert recovery.parent.span_id == clients[0].parent.span_id == app_id
    assert [s.parent.span_id for s in clients[1:]] == [recovery.context.span_id] * 2


def test_a_request_sent_once_in_a_recovered_functions_retry_is_no_resend(server, tel, instrument):
    """The function failed before it sent anything; its second attempt's POST went out
    once, and read as a resend in Jaeger."""
    from otel_recovery import RecoveryPolicy, Retry
    from otel_recovery.policies import FixedBackoff

    instrument()
    warm = server.script("/warm", hf.status(503), hf.ok())
    assert requests.get(warm, timeout=2).status_code == 200  # a resend: the processor is in
    url = server.script("/pay", hf.ok())
    failed: list[bool] = []

    def pay() -> requests.Response:
        if not failed:
            failed.append(True)
            raise ConnectionError("the function's own step")
        return requests.post(url, timeout=2)

    policy = RecoveryPolicy(retry=Retry(2, backoff=FixedBackoff(0)), telemetry=False)
    assert policy.call(pay).status_code == 200 and server.count("/pay") == 1
    counts = [s.attributes.get("http.request.resend_count") for s in tel.clients()]
    assert counts == [None, 1, None]  # the warm-up's two sends, then the POST


def test_happy_path_adds_no_span_and_no_resend_count(server, tel, instrument):
    instrument()
    response = requests.get(server.script("/ok"), timeout=2)
    assert response.status_code == 200 and server.count("/ok") == 1
    assert [s.name for s in tel.spans()] == ["GET"]
    assert "http.request.resend_count" not in tel.clients()[0].attributes


def test_exhausted_retries_return_the_final_response_unchanged(server, tel, instrument):
    instrument()
    seen = []
    url = server.script("/down", *[hf.status(503, body="busy")] * 3)
    response = requests.get(
        url, timeout=2, stream=True, hooks={"response": lambda r, **_: seen.append(r)}
    )
    assert response.status_code == 503 and response.text == "busy"
    assert server.count("/down") == 3
    assert seen[-1] is response and len(seen) == 3
    assert all(r.raw.closed for r in seen[:2])  # retried responses were released
    recovery = tel.recovery()
    assert recovery.attributes["error.type"] == "503"
    assert recovery.status.status_code is StatusCode.ERROR
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "attempts_exhausted"


@pytest.mark.parametrize("status", [401, 409])
def test_a_listed_status_the_table_calls_an_answer_counts_on_the_breaker(
    server, instrument, status
):
    """A 401 or 409 is an answer from a healthy server by default (not retried, not
    counted); listed in ``http_retry_statuses`` it is the user's declared failure: retried,
    and counted against the host like a 503."""
    ours = instrument(http_retry_statuses=[status, 503])
    url = server.script("/listed", *[hf.status(status)] * 3)
    assert requests.get(url, timeout=2).status_code == status
    assert server.count("/listed") == 3
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1


def test_reset_and_stall_are_retried(server, tel, instrument):
    instrument()
    url = server.script("/flaky", hf.reset(), hf.hold(), hf.ok())
    response = requests.get(url, timeout=hf.HELD_TIMEOUT)
    assert response.status_code == 200 and server.count("/flaky") == 3
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == [
        "requests.exceptions.ConnectionError",
        "requests.exceptions.ReadTimeout",
    ]


def test_the_final_exception_reaches_the_app_unchanged(server, tel, instrument):
    instrument()
    url = server.script("/gone", hf.reset(), hf.reset(), hf.reset())
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        requests.get(url, timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert server.count("/gone") == 3
    assert tel.recovery().attributes["error.type"] == "requests.exceptions.ConnectionError"


def test_post_is_never_sent_twice_but_is_recorded(server, tel, instrument):
    ours = instrument()
    url = server.script("/pay", hf.status(503), hf.ok())
    assert requests.post(url, json={"amount": 5}, timeout=2).status_code == 503
    url = server.script("/pay2", hf.reset(), hf.ok())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, data=b"x", timeout=2)
    assert server.count("/pay") == 1 and server.count("/pay2") == 1
    recoveries = tel.recoveries()
    assert [r.attributes["otel_recovery.retry.attempts"] for r in recoveries] == [1, 1]
    assert [r.attributes["otel_recovery.retry.stop_reason"] for r in recoveries] == [
        "not_retryable",
        "not_retryable",
    ]
    assert [r.attributes["otel_recovery.retry.disallowed"] for r in recoveries] == [
        "non_idempotent_method",
        "non_idempotent_method",
    ]
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 2  # both counted against the target


def test_post_with_an_idempotency_key_is_retried_with_the_same_key_and_body(server, instrument):
    instrument()
    url = server.script("/orders", hf.status(503), hf.ok())
    response = requests.post(url, data=b"order-1", headers={"Idempotency-Key": "k-1"}, timeout=2)
    assert response.status_code == 200
    seen = server.seen("/orders")
    assert len(seen) == 2
    assert {s.headers["Idempotency-Key"] for s in seen} == {"k-1"}
    assert {s.body for s in seen} == {b"order-1"}


def _sent_key(seen: hf.Seen) -> bool:
    return any(name.lower() == "idempotency-key" for name in seen.headers)


@pytest.mark.parametrize(
    ("session_headers", "headers"),
    [
        ({}, {b"Idempotency-Key": b"k-1"}),
        ({}, {b"idempotency-key": "k-1"}),
        ({}, {b"IDEMPOTENCY-KEY": b""}),  # empty, as an empty str value: a key all the same
        ({b"Idempotency-Key": b"k-1"}, None),
        ({b"Idempotency-Key": b"k-1"}, {"Idempotency-Key": None}),  # removes the str one only
    ],
    ids=["bytes", "bytes_name", "empty_value", "on_the_session", "str_name_removed"],
)
def test_a_post_with_an_idempotency_key_spelt_in_bytes_is_retried_once(
    server, tel, instrument, session_headers, headers
):
    """requests sends a header named in bytes as it sends a str one; it merges the session's
    headers with the request's by ``name.lower()``, so a str name set to None leaves the
    session's bytes one in place. What the server saw decides: the key went out, so the
    POST is retried, once."""
    instrument()
    url = server.script("/orders", hf.status(503), hf.ok())
    with requests.Session() as session:
        session.headers.update(session_headers)
        response = session.post(url, data=b"order-1", headers=headers, timeout=2)
    assert response.status_code == 200
    seen = server.seen("/orders")
    assert len(seen) == 2
    assert all(_sent_key(s) for s in seen)
    assert {s.body for s in seen} == {b"order-1"}
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 2


@pytest.mark.parametrize(
    ("session_headers", "headers"),
    [
        ({}, {b"Idempotency": b"k-1"}),
        ({b"Idempotency-Key": b"k-1"}, {b"idempotency-key": None}),  # removed: not sent
    ],
    ids=["another_header", "bytes_name_removed"],
)
def test_a_post_without_an_idempotency_key_in_bytes_is_sent_once(
    server, tel, instrument, session_headers, headers
):
    instrument()
    url = server.script("/orders", hf.status(503), hf.ok())
    with requests.Session() as session:
        session.headers.update(session_headers)
        response = session.post(url, data=b"order-1", headers=headers, timeout=2)
    assert response.status_code == 503
    (seen,) = server.seen("/orders")
    assert not _sent_key(seen)
    assert tel.recovery().attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"


def test_idempotency_key_retries_can_be_switched_off(server, instrument):
    instrument(http_retry_idempotency_key=False)
    url = server.script("/k", hf.status(503), hf.ok())
    requests.post(url, headers={"Idempotency-Key": "k"}, timeout=2)
    assert server.count("/k") == 1


def test_non_replayable_bodies_are_sent_once(server, instrument):
    instrument()
    generator_url = server.script("/gen", hf.status(503), hf.ok())
    requests.put(generator_url, data=(chunk for chunk in [b"a", b"b"]), timeout=2)
    file_url = server.script("/file", hf.status(503), hf.ok())
    requests.put(file_url, files={"f": ("f.txt", io.BytesIO(b"data"))}, timeout=2)
    bytes_url = server.script("/bytes", hf.status(503), hf.ok())
    requests.put(bytes_url, data=b"data", timeout=2)
    assert (server.count("/gen"), server.count("/file"), server.count("/bytes")) == (1, 1, 2)


@pytest.mark.parametrize("remembered", [False, True])
def test_an_option_given_as_an_iterator_is_sent_once(server, tel, instrument, remembered):
    """``params=zip(names, values)`` is consumed by the first attempt: a resend would ask
    for the resource without its query string and hand the application that answer. The
    request is sent once, as one with a streamed body is, whether or not a plain request to
    the URL had its plan remembered (the compiled layer's path)."""
    instrument()
    actions = (hf.status(503), hf.ok("shoes, page 2"))
    url = _remembered(server, tel, "/search", *actions) if remembered else None
    url = url or server.script("/search", *actions)
    response = requests.get(url, params=zip(["q", "page"], ["shoes", "2"]), timeout=2)
    assert response.status_code == 503 and server.count("/search") == 1
    assert response.url.endswith("/search?q=shoes&page=2")
    assert tel.recovery().attributes["otel_recovery.retry.disallowed"] == "non_replayable_body"
    server.script("/search", hf.status(503), hf.ok("shoes"))
    response = requests.get(url, params={"q": "shoes"}, timeout=2)  # a dict: sent again
    assert response.text == "shoes" and server.count("/search") == 3


def test_a_form_that_holds_a_file_is_sent_once(server, instrument):
    """requests iterates a file given as a form value: a second attempt would send the
    field empty, and the server would take it."""
    instrument()
    url = server.script("/upload", hf.status(503), hf.ok())
    response = requests.put(url, data={"file": io.BytesIO(b"line\n")}, timeout=2)
    assert response.status_code == 503 and server.count("/upload") == 1
    pairs = server.script("/pairs", hf.status(503), hf.ok())
    response = requests.put(pairs, data=[("note", "a"), ("file", io.BytesIO(b"x"))], timeout=2)
    assert response.status_code == 503 and server.count("/pairs") == 1
    plain = server.script("/plain", hf.status(503), hf.ok())
    response = requests.put(plain, data={"a": "1", "n": 2, "tags": ["x", "y"]}, timeout=2)
    assert response.status_code == 200 and server.count("/plain") == 2
    assert {s.body for s in server.seen("/plain")} == {b"a=1&n=2&tags=x&tags=y"}


def test_a_retried_response_is_released_before_the_backoff(server, instrument):
    """Its connection goes back to the pool before the wait, not after it: a
    ``Retry-After: 2`` must not keep it from every other request for two seconds."""
    seen: list[requests.Response] = []
    at_sleep: list[list[bool]] = []
    instrument(clock=hf.SleepHook(lambda: at_sleep.append([r.raw.closed for r in seen])))
    url = server.script("/x", hf.retry_after(503, 1), hf.ok())
    with requests.Session() as session:
        session.hooks["response"].append(lambda r, *a, **k: seen.append(r))
        response = session.get(url, stream=True, timeout=2)
    assert response.status_code == 200 and at_sleep == [[True]]


def test_a_response_a_hook_raised_on_is_released_when_retried(server, instrument):
    """A response hook's ``raise_for_status()`` turns each 503 into an ``HTTPError``: the
    application only ever sees the last one, so the earlier ones' responses are ours to
    close, or a pool of one (``pool_block=True``) waits forever for their connections."""
    instrument()
    url = server.script("/x", *[hf.status(503, body="x" * 100_000)] * 3)
    seen: list[requests.Response] = []
    with requests.Session() as session:
        session.hooks["response"] += [
            lambda r, *a, **k: seen.append(r),
            lambda r, *a, **k: r.raise_for_status(),
        ]
        with pytest.raises(requests.HTTPError) as raised:
            session.get(url, stream=True, timeout=2)
    assert raised.value.response is seen[-1]
    assert [r.raw.closed for r in seen] == [True, True, False]  # the app's is left open


def _chain(error: BaseException | None) -> list[type[BaseException]]:
    """The types along an error's ``__cause__`` / ``__context__`` links."""
    types = []
    while error is not None and len(types) < 12:
        types.append(type(error))
        error = error.__cause__ or error.__context__
    return types


def test_the_final_error_keeps_its_own_chain(server, instrument):
    """After a 503 and a reset the app gets the library's exception as the library raised
    it: its ``__context__`` is its own (urllib3's error over the reset), as without us, not
    the failure before it nor our internal signal for the 503."""
    bare = server.script("/bare", hf.reset())
    with pytest.raises(requests.ConnectionError) as raised:
        requests.get(bare, timeout=2)
    expected = _chain(raised.value)
    instrument(max_attempts=2)
    url = server.script("/r", hf.status(503), hf.reset(), hf.status(503), hf.reset())
    for _ in range(2):  # planned, then remembered (the compiled layer, where it is built)
        with pytest.raises(requests.ConnectionError) as raised:
            requests.get(url, timeout=2)
        assert _chain(raised.value) == expected
    assert server.count("/r") == 4


def test_a_remembered_plan_only_answers_for_requests_of_its_shape(server, instrument):
    """Plans are remembered by method and URL; a body or a key still decides for itself."""
    instrument()
    url = server.script(
        "/same", hf.ok(), hf.status(503), hf.status(503), hf.ok(), hf.status(503), hf.status(503)
    )
    with requests.Session() as session:
        statuses = [
            session.put(url, timeout=2).status_code,  # planned, then remembered
            session.put(url, data=(c for c in [b"x"]), timeout=2).status_code,  # a stream: once
            session.put(url, timeout=2).status_code,  # the remembered plan: retried
            session.post(url, timeout=2).status_code,  # POST: once
            session.post(url, headers={"Idempotency-Key": "k"}, timeout=2).status_code,
        ]
    assert statuses == [200, 503, 200, 503, 200]
    assert server.count("/same") == 7


def test_the_resend_count_processor_joins_at_the_first_resend(server, tel, instrument):
    """Until a request is resent, the processor would only cost every span three calls."""
    instrument()

    def installed() -> bool:
        processors = tel.tracer_provider._active_span_processor._span_processors
        return any(isinstance(p, ResendCountSpanProcessor) for p in processors)

    assert requests.get(server.script("/first"), timeout=2).status_code == 200
    assert not installed()
    assert requests.get(server.script("/again", hf.status(503)), timeout=2).status_code == 200
    assert installed()


def test_retry_after_as_an_http_date_is_honoured(server, instrument, clock):
    instrument()
    url = server.script("/date", hf.retry_after_date(503, 3), hf.ok())
    assert requests.get(url, timeout=2).status_code == 200
    assert server.count("/date") == 2
    assert 1.5 <= clock.sleeps[0] <= 4.1  # 3 s, less date rounding, plus jitter


def test_retry_after_beyond_the_cap_returns_at_once(server, tel, instrument):
    instrument(retry_after_cap=5)
    url = server.script("/slow", hf.retry_after(429, 120), hf.ok())
    response = requests.get(url, timeout=2)
    assert response.status_code == 429 and server.count("/slow") == 1
    stop = tel.recovery().attributes["otel_recovery.retry.stop_reason"]
    assert stop == "retry_after_too_long"


def test_retry_after_waits_for_real(server, tel):
    """The only real sleep: the server's timing is the point."""
    ours = RequestsRecoveryInstrumentor()
    ours.instrument(tracer_provider=tel.tracer_provider, retry_after_cap=1.0)
    try:
        url = server.script("/wait", hf.retry_after(503, 1), hf.ok())
        started = time.monotonic()
        assert requests.get(url, timeout=2).status_code == 200
        assert time.monotonic() - started >= 1.0
        assert server.count("/wait") == 2
    finally:
        ours.uninstrument()


def test_the_circuit_opens_per_target_and_rejects_as_a_requests_error(server, tel, instrument):
    instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2, breaker_failure_rate=0.5)
    url = server.script("/x", *[hf.status(503)] * 2)
    assert [requests.get(url, timeout=2).status_code for _ in range(2)] == [503, 503]
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        requests.get(url, timeout=2)
    assert isinstance(raised.value, RequestsCircuitOpenError)
    assert (raised.value.request.method, raised.value.request.url) == ("GET", url)
    assert server.count("/x") == 2  # the third request never left the process
    rejected = tel.recoveries()[-1].attributes
    assert rejected["otel_recovery.outcome"] == "rejected"
    assert rejected["otel_recovery.retry.stop_reason"] == "rejected"
    # Another target (same server, another host name) has its own breaker.
    other = server.url("/x").replace("127.0.0.1", "localhost")
    assert requests.get(other, timeout=2).status_code == 200
    states = {
        (a["otel_recovery.circuit_breaker.name"], a["otel_recovery.circuit_breaker.state"]): v
        for a, v in tel.metric("otel_recovery.circuit_breaker.state")
    }
    assert states[(f"requests 127.0.0.1:{server.port}", "open")] == 1


def _prices_fall_back(tmp_path, monkeypatch):
    """A policy file giving ``GET /prices`` on 127.0.0.1 a fallback value."""
    config = tmp_path / "policy.toml"
    config.write_text(
        '[targets."127.0.0.1"]\n[targets."127.0.0.1".operations."GET /prices"]\n'
        'fallback_value = {"prices" = []}\n'
    )
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(config))


def test_a_fallback_value_answers_as_a_response(server, tel, instrument, tmp_path, monkeypatch):
    _prices_fall_back(tmp_path, monkeypatch)
    instrument(max_attempts=2)
    prices = server.script("/prices", hf.status(503), hf.status(503))
    response = requests.get(prices, timeout=2)
    assert response.status_code == 200 and response.json() == {"prices": []}
    assert response.headers["X-OTel-Recovery-Fallback"] == "value"
    # read as applications read real responses
    assert b"".join(response.iter_content(4)) == b'{"prices": []}' == response.raw.read()
    assert list(response.iter_lines()) == [b'{"prices": []}']
    assert response.elapsed.total_seconds() == 0
    assert server.count("/prices") == 2
    assert tel.recovery().attributes["otel_recovery.outcome"] == "fallback"
    other = server.script("/other", hf.status(503), hf.status(503))
    assert requests.get(other, timeout=2).status_code == 503  # no fallback configured there


def test_a_fallback_for_the_target_does_not_answer_for_a_post(
    server, tel, instrument, tmp_path, monkeypatch
):
    """A POST's failure may have applied it: a fallback set for the whole host (or the
    service) is for reads and must not turn it into a 200, nor a failed PUT's. One named
    for the operation is the user's explicit answer for it."""
    config = tmp_path / "policy.toml"
    config.write_text(
        '[targets."127.0.0.1"]\nfallback_value = "stale"\n'
        '[targets."127.0.0.1".operations."POST /quotes"]\nfallback_value = {"quote" = 0}\n'
    )
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(config))
    instrument(max_attempts=2)
    pay = server.script("/pay", hf.status(503), hf.ok())
    response = requests.post(pay, data=b"order-1", timeout=2)
    assert response.status_code == 503 and server.count("/pay") == 1
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "failure"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"
    put = server.script("/carts/1", hf.status(503), hf.status(503))
    assert requests.put(put, data=b"cart", timeout=2).status_code == 503  # retried, no fallback
    assert server.count("/carts/1") == 2
    quotes = server.script("/quotes", hf.status(503), hf.ok())
    response = requests.post(quotes, timeout=2)
    assert response.status_code == 200 and response.json() == {"quote": 0}
    assert server.count("/quotes") == 1
    tel.exporter.clear()
    prices = server.script("/prices", hf.status(503), hf.status(503))
    assert requests.get(prices, timeout=2).text == "stale"  # reads still fall back
    assert tel.recovery().attributes["otel_recovery.outcome"] == "fallback"


def test_suppressed_instrumentation_passes_straight_through(server, tel, instrument):
    instrument()
    url = server.script("/quiet", hf.status(503), hf.ok())
    with suppress_instrumentation():
        assert requests.get(url, timeout=2).status_code == 503
    assert server.count("/quiet") == 1 and tel.spans() == []


@BOTH_ORDERS
def test_suppress_recovery_steps_aside_while_contrib_still_traces(server, tel, instrument, order):
    """Inside ``suppress_recovery()`` a request goes out once, as the application sent it;
    an open circuit does not refuse it and it counts on no breaker; contrib's span stays."""
    ours = instrument(order)
    url = server.script("/probe", hf.ok(), hf.status(503), hf.ok())
    assert requests.get(url, timeout=2).status_code == 200  # remembered: compiled
    tel.exporter.clear()
    with suppress_recovery():
        assert requests.get(url, timeout=2).status_code == 503
    assert server.count("/probe") == 2
    spans = tel.spans()
    assert len(spans) == 1 and spans[0].kind is SpanKind.CLIENT and marked_by_us(spans) == []
    (breaker,) = ours.targets.breakers()
    breaker.force_open()
    before = breaker.snapshot()
    with suppress_recovery():
        assert requests.get(url, timeout=2).status_code == 200  # the open circuit let it go
    assert server.count("/probe") == 3 and breaker.snapshot() == before
    with pytest.raises(RequestsCircuitOpenError):
        requests.get(url, timeout=2)


def test_the_otlp_exporters_own_requests_are_never_retried_or_traced(server, tel, instrument):
    ours = instrument()
    exporting = TracerProvider()
    endpoint = server.script("/v1/traces")
    exporting.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    exporting.get_tracer("app").start_span("exported").end()
    exporting.shutdown()
    assert server.count("/v1/traces") == 1  # the export really went out, through requests
    assert ours.targets.breakers() == []  # ...but never reached our policies
    assert tel.spans() == []  # nor contrib's spans


def test_disabled_by_environment(server, instrument, monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "false")
    instrument(contrib=False)
    assert requests.sessions.Session.__dict__["request"] is ORIGINAL_REQUEST
    url = server.script("/off", hf.status(503), hf.ok())
    assert requests.get(url, timeout=2).status_code == 503 and server.count("/off") == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_RECOVERY_MAX_ATTEMPTS": "lots"}, "OTEL_RECOVERY_MAX_ATTEMPTS='lots'"),
        ({"OTEL_RECOVERY_HTTP_RETRY_STATUSES": "503,x"}, "OTEL_RECOVERY_HTTP_RETRY_STATUSES"),
    ],
)
def test_a_bad_setting_from_the_environment_is_logged_and_leaves_us_off(
    monkeypatch, caplog, env, message
):
    """Raising would stop opentelemetry-instrument's loader, and every instrumentation after
    ours with it: the bad value is logged once, naming the setting, and we stay off."""
    monkeypatch.setattr("otel_recovery.instrumentors._setting_values._warned", FirstTimes())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ours = RequestsRecoveryInstrumentor()
    with caplog.at_level("ERROR", logger="otel_recovery.instrumentors"):
        ours.instrument()
    assert message in caplog.text and "otel-recovery stays off" in caplog.text
    assert not ours.is_instrumented_by_opentelemetry
    assert requests.sessions.Session.__dict__["request"] is ORIGINAL_REQUEST


def test_a_bad_keyword_argument_fails_at_start_up_naming_the_setting():
    ours = RequestsRecoveryInstrumentor()
    with pytest.raises(SettingsError, match="http_retry_statuses .*HTTP error status codes"):
        ours.instrument(http_retry_statuses=[503, 700])
    with pytest.raises(SettingsError, match=r"a 1xx, 2xx or 3xx answer is not a failure"):
        ours.instrument(http_retry_statuses=[200, 503])
    assert not ours.is_instrumented_by_opentelemetry
    assert requests.sessions.Session.__dict__["request"] is ORIGINAL_REQUEST


@pytest.mark.parametrize("first", ["ours", "contrib"])
@BOTH_ORDERS
def test_uninstrument_in_any_order_restores_the_originals(server, tel, order, first):
    ours, contrib = RequestsRecoveryInstrumentor(), RequestsInstrumentor()
    steps = [
        lambda: ours.instrument(),
        lambda: contrib.instrument(tracer_provider=tel.tracer_provider),
    ]
    for step in steps if order == "ours_first" else reversed(steps):
        step()
    for instrumentor in (ours, contrib) if first == "ours" else (contrib, ours):
        instrumentor.uninstrument()
    assert requests.sessions.Session.__dict__["request"] is ORIGINAL_REQUEST
    assert requests.sessions.Session.__dict__["send"] is ORIGINAL_SEND


def test_uninstrument_keeps_a_wrapper_someone_put_on_top_of_ours(server, instrument):
    ours = instrument(contrib=False)
    calls = []

    def theirs(wrapped, instance, args, kwargs):
        calls.append(kwargs["method"])
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(requests.sessions.Session, "request", theirs)
    try:
        ours.uninstrument()
        top = requests.sessions.Session.__dict__["request"]
        assert top.__wrapped__ is ORIGINAL_REQUEST  # our layer spliced out, theirs kept
        url = server.script("/top", hf.status(503), hf.ok())
        assert requests.get(url, timeout=2).status_code == 503 and calls == ["get"]
    finally:
        requests.sessions.Session.request = ORIGINAL_REQUEST


def test_a_bug_in_planning_falls_back_to_the_plain_call(server, instrument, monkeypatch, caplog):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    def broken(*args, **kwargs):
        raise RuntimeError("planning bug")

    monkeypatch.setattr("otel_recovery.instrumentors.requests.plan_call", broken)
    url = server.script("/bug", hf.ok("still fine"))
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        assert requests.get(url, timeout=2).text == "still fine"
        assert requests.get(url, timeout=2).text == "ok"
    assert server.count("/bug") == 2
    assert sum("requests: planning" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("url", ["http://[::1/x", "http://127.0.0.1:99999/x"])
def test_a_malformed_url_is_the_applications_error_not_ours(instrument, monkeypatch, caplog, url):
    """requests reports it in its own words; nothing is logged as our internal error, so
    the one report a site gets stays for a real one."""
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        with pytest.raises(requests.exceptions.InvalidURL):
            requests.get(url, timeout=2)
    assert not caplog.records


def test_a_bug_in_the_engine_before_sending_sends_exactly_once(server, instrument, monkeypatch):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    def broken(fn, args, kwargs):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(RecoveryPolicy, "runner", lambda self: broken)
    url = server.script("/engine", hf.ok("sent once"))
    assert requests.get(url, timeout=2).text == "sent once"
    assert server.count("/engine") == 1


def test_a_provider_set_up_after_instrument_still_gets_resend_counts(server, tel, monkeypatch):
    """Manual set-ups often call ``instrument()`` before configuring the SDK provider."""
    monkeypatch.setattr("otel_recovery.instrumentors._http._resend_waiting", [])
    ours, contrib = RequestsRecoveryInstrumentor(), RequestsInstrumentor()
    ours.instrument(backoff_initial=0.0)  # the global provider is still the API's proxy here
    contrib.instrument(tracer_provider=tel.tracer_provider)
    try:
        monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: tel.tracer_provider)
        url = server.script("/late", hf.status(503), hf.ok())
        assert requests.get(url, timeout=2).status_code == 200
        counts = [s.attributes.get("http.request.resend_count") for s in tel.clients()]
        assert counts == [None, 1]
    finally:
        contrib.uninstrument()
        ours.uninstrument()


# -- the compiled first attempt ------------------------------------------------------------
# Where the extension is built, a request whose plan is remembered makes its first attempt in
# C (otel_recovery._speedups.HttpLayer) and, if that attempt fails, hands over to Python
# mid-request. The tests above mostly send one request per URL, which the Python layer
# plans; these send one first, so the request under test runs the compiled attempt.


def _remembered(server, tel, path, *actions):
    """Script ``path`` after one good request to it (so its plan is remembered), with the
    server's and the exporter's records of that request cleared."""
    url = server.script(path)
    assert requests.get(url, timeout=2).status_code == 200
    server.reset()
    tel.exporter.clear()
    return server.script(path, *actions)


compiled_only = pytest.mark.skipif(
    not _wrapping.SPEEDUPS, reason="otel_recovery._speedups is not built"
)


@compiled_only
@pytest.mark.parametrize("form", ["requests.get", "session.get"])
def test_a_remembered_request_runs_no_python_of_ours(server, tel, instrument, form):
    instrument()
    assert type(ORIGINAL_REQUEST) is not type(requests.sessions.Session.__dict__["request"])
    url = _remembered(server, tel, "/warm")
    session = requests.Session()
    calls = []

    def get() -> requests.Response:
        calls.append(form)
        return (
            requests.get(url, timeout=2) if form == "requests.get" else session.get(url, timeout=2)
        )

    get()  # session.get spells the shape positionally: remembered on its first request
    response, ran = ours_that_ran_steadily(get)
    assert response.status_code == 200
    assert ran <= {"now"}, ran  # nothing but the test's FakeClock, which is Python
    assert [s.name for s in tel.spans()] == ["GET"] * len(calls)


@compiled_only
@BOTH_ORDERS
def test_a_remembered_request_recovers_503_then_429_like_a_new_one(
    server, tel, instrument, clock, order
):
    instrument(order)
    url = _remembered(server, tel, "/a", hf.status(503), hf.retry_after(429, 1), hf.ok("fresh"))
    response, ran = ours_that_ran(lambda: requests.get(url, timeout=2))
    assert "resume" in ran and "layer" not in ran  # the compiled attempt handed over
    assert (response.status_code, response.text) == (200, "fresh")
    assert server.count("/a") == 3
    assert clock.sleeps[-1] >= 1.0
    clients = tel.clients()
    assert [s.attributes.get("http.status_code") for s in clients] == [503, 429, 200]
    assert [s.attributes.get("http.request.resend_count") for s in clients] == [None, 1, 2]
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 3
    failed = hf.events(recovery, "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == ["503", "429"]


@compiled_only
def test_a_remembered_request_returns_the_final_response_and_releases_the_others(
    server, tel, instrument
):
    instrument()
    seen = []
    url = _remembered(server, tel, "/down", *[hf.status(503, body="busy")] * 3)
    response = requests.get(
        url, timeout=2, stream=True, hooks={"response": lambda r, **_: seen.append(r)}
    )
    assert response.status_code == 503 and response.text == "busy"
    assert server.count("/down") == 3
    assert seen[-1] is response and all(r.raw.closed for r in seen[:2])
    assert tel.recovery().attributes["otel_recovery.retry.stop_reason"] == "attempts_exhausted"


@compiled_only
def test_a_remembered_request_retries_resets_and_raises_the_last_one_unchanged(
    server, tel, instrument
):
    instrument()
    url = _remembered(server, tel, "/flaky", hf.reset(), hf.hold(), hf.ok())
    assert requests.get(url, timeout=hf.HELD_TIMEOUT).status_code == 200
    assert server.count("/flaky") == 3
    url = _remembered(server, tel, "/gone", hf.reset(), hf.reset(), hf.reset())
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        requests.get(url, timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert server.count("/gone") == 3


@compiled_only
def test_a_remembered_request_is_rejected_by_an_open_circuit(server, tel, instrument):
    instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2, breaker_failure_rate=0.5)
    url = _remembered(server, tel, "/x", *[hf.status(503)] * 2)
    # the window holds the good request that remembered the plan, and now one 503: 50 %
    assert requests.get(url, timeout=2).status_code == 503
    with pytest.raises(RequestsCircuitOpenError):
        requests.get(url, timeout=2)
    assert server.count("/x") == 1


@compiled_only
def test_a_remembered_request_falls_back(server, tel, instrument, tmp_path, monkeypatch):
    _prices_fall_back(tmp_path, monkeypatch)
    instrument(max_attempts=2)
    url = _remembered(server, tel, "/prices", hf.status(503), hf.status(503))
    response = requests.get(url, timeout=2)
    assert response.json() == {"prices": []} and server.count("/prices") == 2
    assert tel.recovery().attributes["otel_recovery.outcome"] == "fallback"


@compiled_only
def test_a_remembered_request_with_a_body_or_suppressed_goes_through_python(
    server, tel, instrument
):
    instrument()
    url = _remembered(server, tel, "/quiet", hf.status(503), hf.ok())
    with suppress_instrumentation():
        assert requests.get(url, timeout=2).status_code == 503
    assert server.count("/quiet") == 1 and tel.spans() == []
    # a body makes the plan depend on it: never answered from the remembered shape
    _, ran = ours_that_ran(lambda: requests.get(url, data=b"x", timeout=2))
    assert "layer" in ran


@compiled_only
def test_an_interrupt_in_a_remembered_request_gives_the_breakers_permit_back(
    server, tel, instrument, monkeypatch
):
    class Interrupted(BaseException):
        pass

    ours = instrument(contrib=False)
    url = _remembered(server, tel, "/stop")

    def interrupted(self, request, **kwargs):
        raise Interrupted()

    released = []
    from otel_recovery.policies.circuit_breaker import CircuitBreaker

    real_release = CircuitBreaker.release
    monkeypatch.setattr(
        CircuitBreaker, "release", lambda self: released.append(self) or real_release(self)
    )
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", interrupted)
    with pytest.raises(Interrupted):
        requests.get(url, timeout=2)
    assert len(released) == 1
    assert ours is not None


@compiled_only
def test_a_remembered_url_gives_each_method_its_own_plan(server, tel, instrument):
    """Plans are remembered under the URL, then the method: a GET and a POST to one URL,
    both remembered, each run compiled with their own plan (the GET retried, the POST
    never sent twice); ``requests.get`` ("get") and ``session.get`` ("GET") both hit. (With
    Idempotency-Keys honoured, a POST's plan depends on its headers and is never
    remembered: switched off here so that it is.)"""
    instrument(http_retry_idempotency_key=False)
    session = requests.Session()
    url = server.script("/orders")
    for send in (
        lambda: session.get(url, timeout=2),
        lambda: requests.get(url, timeout=2),
        lambda: session.post(url, json={"id": 1}, timeout=2),
    ):
        send()  # remembered from here on
        response, ran = ours_that_ran_steadily(send)
        assert response.status_code == 200
        assert ran <= {"now"}, ran  # compiled: nothing of ours in Python but the FakeClock
    server.reset()
    server.script("/orders", hf.status(503), hf.ok("retried"))
    assert session.get(url, timeout=2).text == "retried"
    assert server.count("/orders") == 2
    server.script("/orders", hf.status(503), hf.ok("must not be sent"))
    assert session.post(url, json={"id": 1}, timeout=2).status_code == 503
    assert server.count("/orders") == 3


STATUS_VALUES = st.one_of(
    st.integers(min_value=-5, max_value=700),
    st.sampled_from([10**30, -(10**30), True, False, None, 503.0, "503"]),
    st.sampled_from(list(http.HTTPStatus)),
)


class _FakeSend:
    """``Session.send`` answering each request with the next queued status (then 200),
    recording the statuses it answered with and the methods it was sent."""

    def __init__(self) -> None:
        self.pending: list[object] = []
        self.sent: list[tuple[str, object]] = []

    def answer(self, request: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = self.pending.pop(0) if self.pending else 200  # type: ignore[assignment]
        response.raw, response.url, response.request = io.BytesIO(b""), request.url, request
        self.sent.append((request.method, response.status_code))
        return response


@contextlib.contextmanager
def _faked(layer: str, **settings: Any) -> Iterator[_FakeSend]:
    """Our instrumentor, the compiled or the Python layer, over a fake ``Session.send``."""
    from otel_recovery.instrumentors import _db

    if layer == "compiled" and _wrapping.SPEEDUPS is None:
        pytest.skip("otel_recovery._speedups is not built")
    fake = _FakeSend()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requests.Session, "send", lambda session, request, **_: fake.answer(request))
        if layer == "python":
            patch.setattr(_db, "SPEEDUPS", None)
        ours = RequestsRecoveryInstrumentor()
        ours.instrument(clock=FakeClock(), max_attempts=2, backoff_initial=0.01, **settings)
        try:
            compiled = type(requests.sessions.Session.__dict__["request"]).__name__
            assert (compiled == "HttpLayer") is (layer == "compiled")
            yield fake
        finally:
            ours.uninstrument()


def _check_judgement(layer: str, statuses: frozenset[int], answers: list[object]) -> None:
    """A remembered GET answered with each of ``answers`` is sent twice when the answer is an
    int (not a bool) in ``statuses`` and in HTTP's range, once otherwise: what
    ``HttpSite.attempt`` and the recovery after it decide."""
    with _faked(layer, http_retry_statuses=statuses) as fake:
        session = requests.Session()
        session.get("http://service.invalid/status")  # remembered from here on
        for answer in answers:
            fake.sent.clear()
            fake.pending[:] = [answer]
            session.get("http://service.invalid/status")
            retried = isinstance(answer, int) and not isinstance(answer, bool)
            # a status outside HTTP's range is not one to classify, so never retried
            retried = retried and answer in statuses and 100 <= answer <= 599  # type: ignore[operator]
            expected = [("GET", answer), ("GET", 200)] if retried else [("GET", answer)]
            assert fake.sent == expected, (answer, statuses)


@pytest.mark.parametrize("layer", ["compiled", "python"])
@settings(max_examples=60, deadline=None)
@given(
    # what the settings accept (the edge test below widens them to the whole bitmap)
    statuses=st.frozensets(st.integers(min_value=400, max_value=599), max_size=12),
    data=st.data(),
)
def test_any_status_is_judged_as_the_python_layer_judges_it(layer, statuses, data):
    """The compiled attempt answers "retry on this status?" from a bitmap of the configured
    statuses; whatever the response's status (ints in and out of range, huge ones, bools,
    ``HTTPStatus`` members, a float, a str, None), a remembered GET is sent as often as the
    Python layer sends it: twice for a status in the set, once otherwise."""
    near = sorted({n for s in statuses for n in (s - 1, s, s + 1)})  # members and neighbours
    choices = st.one_of(STATUS_VALUES, st.sampled_from(near)) if near else STATUS_VALUES
    _check_judgement(layer, statuses, data.draw(st.lists(choices, min_size=1, max_size=6)))


EDGE_ANSWERS = [99, 100, 101, 163, 164, 599, 600, 611, 612, 700, -1, 0]
EDGE_ANSWERS += [2**63 - 1, 2**63, -(2**63), 10**30, -(10**30), True, 503.0]


@pytest.mark.parametrize("layer", ["compiled", "python"])
@pytest.mark.parametrize(
    "statuses",
    [
        frozenset(range(100, 600)),
        frozenset({100}),
        frozenset({599}),
        frozenset({163, 164}),  # either side of a word of the bitmap
        frozenset(),
        # outside what the settings accept (so outside the bitmap): the set decides
        frozenset({99, 503, 612, 700, 2**63, 10**30}),
    ],
    ids=["all", "100", "599", "word-edge", "none", "out-of-range"],
)
def test_statuses_at_the_edges_are_judged_as_the_python_layer_judges_them(
    layer, statuses, monkeypatch
):
    from otel_recovery.instrumentors import _setting_values

    monkeypatch.setitem(_setting_values._CHECKS, "http_retry_statuses", (lambda v: True, "any"))
    _check_judgement(layer, statuses, EDGE_ANSWERS)


@pytest.mark.parametrize("layer", ["compiled", "python"])
def test_a_method_that_claims_to_equal_any_other_never_lends_its_plan(layer):
    """Only an exact str or bytes method is remembered: a str subclass whose ``__eq__``
    says yes to everything must not make a POST (sent once) use a GET's plan (retried)."""

    class LooseMethod(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    with _faked(layer, http_retry_idempotency_key=False) as fake:
        session = requests.Session()
        url = "http://service.invalid/orders"
        session.request(LooseMethod("GET"), url)
        session.request(LooseMethod("GET"), url)
        fake.sent.clear()
        fake.pending[:] = [503]
        session.post(url, json={"id": 1})
        assert fake.sent == [("POST", 503)]
        session.get(url)  # a plain GET, remembered
        fake.sent.clear()
        fake.pending[:] = [503]
        session.request(LooseMethod("POST"), url, json={"id": 1})
        assert fake.sent == [("POST", 503)]


def test_remembered_urls_and_methods_are_bounded():
    """At most ``limit`` URLs (past it they start over, but only for a new URL) and
    ``METHODS_PER_URL`` methods per URL (the oldest goes; one remembered again moves last)."""
    from otel_recovery.instrumentors._http import HttpCall
    from otel_recovery.instrumentors._http_plans import HttpPlan, HttpPlans
    from otel_recovery.instrumentors._settings import RecoverySettings
    from otel_recovery.instrumentors._targets import TargetPolicies

    plans = HttpPlans(TargetPolicies("requests", RecoverySettings()), limit=3)
    plan = HttpPlan(HttpCall(RecoveryPolicy(telemetry=False), frozenset(), False))
    for url in ("a", "b", "c"):
        plans.remember_by_url(url, "GET", plan)
    plans.remember_by_url("a", "PUT", plan)  # a known URL: nothing is forgotten
    assert sorted(plans.by_url) == ["a", "b", "c"]
    plans.remember_by_url("d", "GET", plan)  # a new one past the limit: start over
    assert list(plans.by_url) == ["d"]
    methods = [f"M{i}" for i in range(HttpPlans.METHODS_PER_URL + 2)]
    for method in [*methods, "M3"]:
        plans.remember_by_url("d", method, plan)
    kept = plans.by_url["d"][::2]
    assert len(kept) == HttpPlans.METHODS_PER_URL
    assert kept == (*[m for m in methods if m != "M3"][-(HttpPlans.METHODS_PER_URL - 1) :], "M3")
    assert plans.recall("d", "M3") is plan and plans.recall("d", "M0") is None
    assert plans.recall("d", bytes(bytearray(b"M3"))) is None  # bytes never equal a str


@pytest.mark.parametrize("layer", ["compiled", "python"])
def test_a_remembered_request_spelled_in_bytes_is_found_again(layer):
    """requests takes the method and URL as bytes too: such a request is remembered under
    them as given and found again by equality (each call here makes new bytes objects, so
    identity never decides): compiled, nothing of ours runs in Python; in Python, it is not
    planned afresh."""
    with _faked(layer) as fake:
        session = requests.Session()
        url = b"http://service.invalid/bytes"
        for _ in range(2):  # remembered by the first, found again from the second
            response, ran = ours_that_ran_steadily(
                lambda: session.request(bytes(bytearray(b"GET")), bytes(bytearray(url)))
            )
        assert response.status_code == 200
        assert ran <= {"now"} if layer == "compiled" else "_plan" not in ran, ran
        fake.sent.clear()
        fake.pending[:] = [503]
        assert session.request(bytes(bytearray(b"GET")), bytes(bytearray(url))).status_code == 200
        assert fake.sent == [("GET", 503), ("GET", 200)]


class _StatusRaises(requests.Response):
    """A response whose status cannot be read: the app's to judge, not ours."""

    @property  # type: ignore[override]
    def status_code(self) -> int:
        raise ValueError("no status today")

    @status_code.setter
    def status_code(self, value: int) -> None:
        pass


@pytest.mark.parametrize("layer", ["compiled", "python"])
@pytest.mark.parametrize("kind", ["raises", "missing"])
def test_a_response_whose_status_cannot_be_read_is_returned_as_it_is(
    layer, kind, monkeypatch, caplog
):
    """A status attribute that raises is reported (once per site) and the response returned
    unjudged; a missing one reads as None, which is no status to retry on. Sent once either
    way, by the compiled attempt as by the Python layer."""
    monkeypatch.setattr(_wrapping, "_reported", set())  # the report is once per process
    with _faked(layer) as fake:
        session = requests.Session()
        url = "http://service.invalid/odd"
        session.get(url)  # remembered from here on
        fake.sent.clear()
        odd = _StatusRaises() if kind == "raises" else requests.Response()
        if kind == "missing":
            del odd.status_code
        odd.raw = io.BytesIO(b"")
        monkeypatch.setattr(fake, "answer", lambda request: fake.sent.append("odd") or odd)
        with caplog.at_level(logging.ERROR, logger="otel_recovery"):
            response, ran = ours_that_ran(lambda: session.get(url))
        assert response is odd and fake.sent == ["odd"]
        assert ("layer" in ran) is (layer == "python"), ran  # compiled: judged in C
        reported = [r for r in caplog.records if "reading the response" in r.getMessage()]
        assert len(reported) == (1 if kind == "raises" else 0)


# -- urllib3's own Retry (an adapter's max_retries) ---------------------------------------
# requests sends through urllib3, which repeats requests by itself when a session's adapter
# is given a Retry. Our retry runs around the whole send, so repeating what urllib3 already
# repeated would multiply the requests a failing server receives (3 of ours x 4 of urllib3's).


def _session(**retry: Any) -> requests.Session:
    """A session whose adapters repeat as urllib3's ``Retry(**retry)`` says, without
    sleeping between attempts (urllib3 sleeps for real)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=Retry(backoff_factor=0, **retry))
    session.mount("http://", adapter)
    return session


def _client_retried(recovery: Any, repeats: int) -> None:
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "client_retried"
    assert recovery.attributes["otel_recovery.http.client_retries"] == repeats
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"
    assert recovery.attributes["otel_recovery.outcome"] == "failure"


@BOTH_ORDERS
@pytest.mark.parametrize("remembered", [False, pytest.param(True, marks=compiled_only)])
def test_a_status_urllib3_already_retried_is_not_retried_again(
    server, tel, instrument, order, remembered
):
    ours = instrument(order)
    busy = [hf.status(503, body="busy")] * 9
    url = _remembered(server, tel, "/busy", *busy) if remembered else server.script("/busy", *busy)
    with _session(total=2, status_forcelist=[503], raise_on_status=False) as session:
        response = session.get(url, timeout=2)
    assert (response.status_code, response.text) == (503, "busy")
    assert server.count("/busy") == 3  # urllib3's three, not nine
    assert len(tel.clients()) == 1  # one send as contrib sees it: urllib3 is beneath
    _client_retried(tel.recovery(), 2)
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1  # still counted against the server


def test_a_status_urllib3_does_not_repeat_is_retried_by_us(server, tel, instrument):
    instrument()
    url = server.script("/other", hf.status(503), hf.status(503), hf.ok("fine"))
    with _session(total=2, status_forcelist=[502]) as session:
        response = session.get(url, timeout=2)
    assert (response.status_code, response.text) == (200, "fine")
    assert server.count("/other") == 3
    assert "otel_recovery.retry.disallowed" not in tel.recovery().attributes


def test_retry_after_answers_urllib3_repeated_are_not_repeated_again(server, tel, instrument):
    """A ``Retry`` without ``status_forcelist`` still repeats a 503 or 429 that carries
    ``Retry-After`` (``respect_retry_after_header``); one without it is ours to retry."""
    instrument()
    url = server.script("/later", *[hf.retry_after(503, 0)] * 5)
    with _session(total=1) as session:
        assert session.get(url, timeout=2).status_code == 503
        assert server.count("/later") == 2
        _client_retried(tel.recovery(), 1)
        tel.exporter.clear()
        url = server.script("/plain", hf.status(503), hf.ok())
        assert session.get(url, timeout=2).status_code == 200
        assert server.count("/plain") == 2
        # an empty Retry-After is no Retry-After to urllib3 (it reads the header's truth)
        url = server.script("/empty", hf.status(503, {"Retry-After": ""}), hf.ok())
        assert session.get(url, timeout=2).status_code == 200
    assert server.count("/empty") == 2


@pytest.mark.parametrize(
    ("limits", "repeats"),
    [({"total": 2}, 2), ({"total": None, "status": 2}, 2), ({"total": 3, "status": 1}, 1)],
)
def test_a_retry_error_from_urllib3_reaches_the_app_unchanged(
    server, tel, instrument, limits, repeats
):
    instrument()
    url = server.script("/exhausted", *[hf.status(503)] * 9)
    with (
        _session(status_forcelist=[503], **limits) as session,
        pytest.raises(requests.exceptions.RetryError) as raised,
    ):
        session.get(url, timeout=2)
    assert type(raised.value) is requests.exceptions.RetryError
    assert server.count("/exhausted") == repeats + 1
    _client_retried(tel.recovery(), repeats)


@pytest.mark.parametrize("remembered", [False, pytest.param(True, marks=compiled_only)])
def test_dropped_connections_urllib3_already_retried_are_not_retried_again(
    server, tel, instrument, remembered
):
    instrument()
    resets = [hf.reset()] * 9
    url = (
        _remembered(server, tel, "/drop", *resets)
        if remembered
        else server.script("/drop", *resets)
    )
    with _session(total=2) as session, pytest.raises(requests.exceptions.ConnectionError) as raised:
        session.get(url, timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert server.count("/drop") == 3
    _client_retried(tel.recovery(), 2)


def test_refused_connections_urllib3_already_retried_are_not_retried_again(tel, instrument):
    instrument()
    with socket.socket() as closed:  # a port that was free a moment ago: refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/refused"
    with _session(connect=3) as session, pytest.raises(requests.exceptions.ConnectionError):
        session.get(url, timeout=2)
    _client_retried(tel.recovery(), 3)
    tel.exporter.clear()
    with requests.Session() as plain, pytest.raises(requests.exceptions.ConnectionError):
        plain.get(url, timeout=2)  # requests' default adapter repeats nothing: we do
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 3
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


def test_a_client_retried_failure_still_falls_back(server, tel, instrument, tmp_path, monkeypatch):
    _prices_fall_back(tmp_path, monkeypatch)
    instrument()
    url = server.script("/prices", *[hf.status(503)] * 9)
    with _session(total=1, status_forcelist=[503], raise_on_status=False) as session:
        response = session.get(url, timeout=2)
    assert response.status_code == 200 and response.json() == {"prices": []}
    assert server.count("/prices") == 2
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "fallback"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1


def test_a_bug_reading_the_client_retry_leaves_the_decision_to_ours(
    server, tel, instrument, monkeypatch, caplog
):
    """A bug of ours while reading urllib3's ``Retry`` must not break the request: it is
    reported and our retry decides as if urllib3 repeated nothing."""
    monkeypatch.setattr(_wrapping, "_reported", set())  # reported once per process
    instrument()

    def broken(adapter: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(otel_recovery.instrumentors.requests, "_urllib3_retry", broken)
    url = server.script("/broken", hf.status(503), hf.reset(), hf.ok())
    with _session(total=0) as session, caplog.at_level(logging.ERROR, logger="otel_recovery"):
        response = session.get(url, timeout=2)
    assert response.status_code == 200 and server.count("/broken") == 3
    assert "reading the client's own retry" in caplog.text


# -- no reference cycles (see tests/test_reference_cycles.py) -----------------------------


@pytest.mark.parametrize("remembered", [False, pytest.param(True, marks=compiled_only)])
@pytest.mark.parametrize("ending", ["recovered", "gave_up"])
def test_a_retried_request_leaves_no_reference_cycle(server, tel, instrument, remembered, ending):
    """Each failed attempt's response, and the signal our layer raised for it, are freed as
    soon as the request is over, without the garbage collector: kept in a cycle, they would
    hold every frame of the request (and each response's connection buffers) until it
    runs."""
    instrument()
    actions = [hf.status(503)] * 2 + ([hf.ok()] if ending == "recovered" else [hf.status(503)])
    url = (
        _remembered(server, tel, "/cyc", *actions)
        if remembered
        else server.script("/cyc", *actions)
    )
    responses: list[weakref.ref[requests.Response]] = []

    def keep(response: requests.Response, **_: Any) -> None:
        responses.append(weakref.ref(response))

    gc.collect()
    gc.disable()
    try:
        final = requests.get(url, timeout=2, hooks={"response": keep})
        assert final.status_code == (200 if ending == "recovered" else 503)
        assert len(responses) == 3
        del final
        assert [ref() for ref in responses] == [None, None, None]
    finally:
        gc.enable()


# -- requests that never left the client --------------------------------------------------
# A connection that could not be made (refused, connect timeout) proves the request was
# never written, so even a POST is sent again after it (as urllib3's ``connect`` retries
# and Envoy's ``reset-before-request`` do); a failure after the request was written never.


def _refused_connect(error: BaseException) -> bool:
    """Whether ``error`` is requests' own refused connect (urllib3's ``NewConnectionError``)."""
    cause = error.args[0] if error.args else None
    return isinstance(cause, MaxRetryError) and isinstance(cause.reason, NewConnectionError)


def _not_resent(recovery: Any, why: str) -> None:
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == why
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"
    assert recovery.attributes["otel_recovery.outcome"] == "failure"


@BOTH_ORDERS
def test_a_post_whose_connect_was_refused_is_sent_again_and_applied_once(
    late, tel, instrument, order
):
    instrument(order, clock=late.clock)
    response = requests.post(late.url("/orders"), data=b"order-1", timeout=2)
    assert (response.status_code, response.text) == (201, "created:order-1")
    hf.assert_resent_once(late, tel, failed=["requests.exceptions.ConnectionError"])


@compiled_only
def test_a_remembered_post_whose_connect_was_refused_is_sent_again(late, tel, instrument):
    """The compiled first attempt hands a refused connect over to Python, which resends it
    as it would a new request's. (A POST's plan is remembered only while Idempotency-Keys
    are ignored: otherwise it depends on the headers.)"""
    instrument(clock=late.clock, http_retry_idempotency_key=False)
    url = late.url("/orders")
    late.armed = False  # planned and remembered by a POST refused throughout
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, json={"id": 1}, timeout=2)
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 3  # resent, refused
    late.armed, slept = True, len(late.clock.sleeps)
    tel.exporter.clear()
    response, ran = ours_that_ran(lambda: requests.post(url, json={"id": 1}, timeout=2))
    assert "resume" in ran and "layer" not in ran  # the compiled attempt handed over
    assert (response.status_code, response.text) == (201, 'created:{"id": 1}')
    assert late.seen == [("POST", "/orders", b'{"id": 1}')]
    assert len(late.clock.sleeps) == slept + 1
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


def test_a_post_reset_after_it_was_sent_is_not_sent_again(server, tel, instrument, clock):
    """A dropped connection after the request was written may have been applied: the
    library's error goes to the app as it was raised."""
    instrument()
    url = server.script("/pay", hf.reset(), hf.ok())
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        requests.post(url, data=b"order-1", timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert not _refused_connect(raised.value)  # urllib3's ProtocolError: after the send
    assert [s.body for s in server.seen("/pay")] == [b"order-1"]
    assert clock.sleeps == [] and len(tel.clients()) == 1
    _not_resent(tel.recovery(), "non_idempotent_method")


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_resending_requests_that_never_left_can_be_switched_off(
    late, tel, instrument, monkeypatch, how
):
    """Off, a POST keeps to the method rules: refused, it is tried once (a GET is still
    retried, which opens the port: the POST would have met it had it been resent)."""
    if how == "environment":
        monkeypatch.setenv("OTEL_RECOVERY_HTTP_RETRY_UNSENT", "false")
        instrument(clock=late.clock)
    else:
        instrument(clock=late.clock, http_retry_unsent=False)
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        requests.post(late.url("/orders"), data=b"order-1", timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert _refused_connect(raised.value)
    assert late.clock.sleeps == [] and late.seen == []
    _not_resent(tel.recovery(), "non_idempotent_method")
    assert requests.get(late.url("/after"), timeout=2).status_code == 201
    assert late.seen == [("GET", "/after", b"")]


@pytest.mark.parametrize("body", ["generator", "file"])
def test_a_body_that_cannot_be_replayed_is_not_resent_after_a_refused_connect(
    late, tel, instrument, body
):
    """Only a body held in memory can be sent again; a POST of bytes to the same port is
    (and meets the port it opened)."""
    instrument(clock=late.clock)
    options: dict[str, Any] = (
        {"data": (chunk for chunk in [b"order-", b"1"])}
        if body == "generator"
        else {"files": {"f": ("order.txt", io.BytesIO(b"order-1"))}}
    )
    # older requests (2.25, the oldest supported) send a generator body through http.client
    # themselves (chunked) and let urllib3's refusal through unwrapped
    refused = (requests.exceptions.ConnectionError, NewConnectionError)
    with pytest.raises(refused) as raised:
        requests.post(late.url("/upload"), timeout=2, **options)
    assert type(raised.value) in refused
    assert late.clock.sleeps == [] and late.seen == [] and len(tel.clients()) == 1
    _not_resent(tel.recovery(), "non_replayable_body")
    assert requests.post(late.url("/bytes"), data=b"order-2", timeout=2).status_code == 201
    assert late.seen == [("POST", "/bytes", b"order-2")]


def test_a_refused_post_urllib3_already_reconnected_is_not_sent_again(late, tel, instrument):
    """urllib3 repeats a refused connect for any method (``Retry(connect=2)``): ours on
    top would multiply the connects; a resend would have slept, opening the port."""
    instrument(clock=late.clock)
    with (
        _session(connect=2) as session,
        pytest.raises(requests.exceptions.ConnectionError) as raised,
    ):
        session.post(late.url("/orders"), data=b"order-1", timeout=2)
    assert type(raised.value) is requests.exceptions.ConnectionError
    assert _refused_connect(raised.value)
    assert late.clock.sleeps == [] and late.seen == []
    _client_retried(tel.recovery(), 2)


def test_an_open_circuit_refuses_a_post_once_and_sends_nothing(late, tel, instrument):
    """Refused POSTs (each resent, each failing) open the target's circuit; the next POST
    is refused with our error, which never counts as a connect that failed: not resent
    (a resend would sleep, which would open the port to it)."""
    ours = instrument(
        clock=late.clock, breaker_window=2, breaker_minimum_calls=2, breaker_failure_rate=0.5
    )
    url = late.url("/orders")
    late.armed = False
    for _ in range(2):
        with pytest.raises(requests.exceptions.ConnectionError) as raised:
            requests.post(url, data=b"order-1", timeout=2)
        assert _refused_connect(raised.value)
    assert [r.attributes["otel_recovery.retry.attempts"] for r in tel.recoveries()] == [3, 3]
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().state == "open"
    late.armed, slept = True, len(late.clock.sleeps)
    tel.exporter.clear()
    with pytest.raises(RequestsCircuitOpenError) as raised:
        requests.post(url, data=b"order-1", timeout=2)
    assert not otel_recovery.instrumentors.requests._unsent(raised.value)
    assert len(late.clock.sleeps) == slept and late.seen == [] and tel.clients() == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "rejected"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


def _raised_by_requests(server: hf.FaultServer, fault: str) -> BaseException:
    """The error uninstrumented requests raises for a POST that meets ``fault``."""
    with contextlib.ExitStack() as stack:
        timeout: Any = 2
        options: dict[str, Any] = {}
        if fault in ("refused", "proxy_refused"):
            closed = stack.enter_context(socket.socket())
            closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
            url = f"http://127.0.0.1:{closed.getsockname()[1]}/orders"
            if fault == "proxy_refused":
                options["proxies"] = {"http": url}
                url = "http://service.invalid/orders"
        elif fault == "connect_timeout":
            url, timeout = (
                f"http://127.0.0.1:{stack.enter_context(hf.unaccepting_port())}/",
                (0.1, 2),
            )
        elif fault == "reset":
            url = server.script("/fault", hf.reset())
        else:  # held until the 0.2 s read timeout fired; the connect has 2 s
            url, timeout = server.script("/fault", hf.hold()), (2, 0.2)
        with pytest.raises(requests.exceptions.RequestException) as raised:
            requests.post(url, data=b"order-1", timeout=timeout, **options)
    return raised.value


@pytest.mark.parametrize(
    ("fault", "error", "unsent"),
    [
        ("refused", requests.exceptions.ConnectionError, True),
        ("connect_timeout", requests.exceptions.ConnectTimeout, True),
        ("reset", requests.exceptions.ConnectionError, False),
        ("read_timeout", requests.exceptions.ReadTimeout, False),
        # never connected either, but a proxy's errors are left alone as a whole
        ("proxy_refused", requests.exceptions.ProxyError, False),
    ],
)
def test_unsent_tells_a_connection_never_made_from_a_request_that_may_have_been_sent(
    server, fault, error, unsent
):
    raised = _raised_by_requests(server, fault)
    assert type(raised) is error
    assert otel_recovery.instrumentors.requests._unsent(hf.as_the_layer_sees(raised)) is unsent
    if fault in ("reset", "read_timeout"):
        assert server.count("/fault") == 1  # the request did reach the server


def test_unsent_never_counts_our_open_circuit_as_a_failed_connect():
    rejection = RequestsCircuitOpenError("requests 127.0.0.1:1", 5.0)
    assert isinstance(rejection, requests.exceptions.ConnectionError)
    assert not otel_recovery.instrumentors.requests._unsent(rejection)
