"""Fleet-wide circuit breakers: one state per name, shared by processes through Redis.

The fleet tests run 4 real processes (``_fleet_worker.py``) on the shared Redis under a
unique key prefix; the others use two breakers in this process as two members of a fleet,
on a FakeClock (shared times are the callers' clock, so virtual time drives Redis too). The
outage test restarts a private ``redis-server`` without persistence, so resync has to rebuild
the shared state from what the process did locally.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest
import redis

from otel_recovery import CircuitBreaker, CircuitState, RecoveryPolicy
from otel_recovery.stores import MemoryStore, ResilientStore, StoreConfigError, open_store
from otel_recovery.stores._shared_breaker import SharedCircuitBreaker
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry import get_telemetry
from otel_recovery.testing import FakeClock, capture_telemetry

from ._fleet import Fleet
from .conftest import callers_asking, cleanup, require, store_url, unique


def _cleanup_after_sync(kind, name):
    """Remove the test's keys, also those a last background sync of a dropped breaker wrote."""
    gc.collect()
    cleanup(kind, name)
    time.sleep(0.2)
    cleanup(kind, name)


SYNC = 0.1
LINK_POLL = 10.0
"""The link thread's longest wait when no sync is due (1 s in the package), raised in the
fleet workers: a thread not woken on the sync interval would then show a 10 s lag."""
LAG_BOUND = 2.5
"""How late a process may see what another did: one sync interval (0.1 s) is the documented
bound; 2.5 s (half of a ``wait_state``'s 5 s) still tells it from the 10 s above, with room
for a loaded machine."""


@pytest.fixture
def shared(tmp_path):
    """A private namespace on the shared Redis: (url, raw client, key of a name)."""
    require("redis")
    name = unique("otr_")
    url = store_url("redis", tmp_path, name)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    yield url, client, lambda *parts: f"otr-test:{name}:" + ":".join(parts)
    client.close()
    _cleanup_after_sync("redis", name)


def _opened(results):
    return {i: [t for t in r["transitions"] if t[0] == "open"] for i, r in results.items()}


def test_four_processes_open_the_breaker_together_after_the_configured_total(shared):
    url, client, key = shared
    config = {
        "breaker": {"failure_threshold": 20, "timeout": 30.0, "sync_interval": SYNC},
        "link_poll": LINK_POLL,
    }
    fleet = Fleet(url, "payments", config)
    try:
        # 4 x 4 + 3 = 19 failures, spread over every process: still closed everywhere.
        assert all(r["permitted"] == 4 for r in fleet.all(op="fail", n=4).values())
        for index in range(3):
            assert fleet.send(index, op="fail", n=1)["state"] == "closed"
        time.sleep(3 * SYNC)
        assert {r["state"] for r in fleet.all(op="state").values()} == {"closed"}
        # The 20th failure opens it; the process that made it knows at once ...
        assert fleet.send(3, op="fail", n=1)["state"] == "open"
        # ... and every other process at its next sync, every SYNC seconds (see LAG_BOUND).
        results = fleet.all(op="wait_state", state="open", within=5.0)
        assert {r["state"] for r in results.values()} == {"open"}
        opened = _opened(results)
        assert all(len(seen) == 1 for seen in opened.values()), opened
        tripped = opened[3][0][2]
        lags = [seen[0][2] - tripped for seen in opened.values()]
        assert max(lags) <= LAG_BOUND, f"observed after {lags}"
        assert {seen[0][1] for seen in opened.values()} == {"failure_threshold"}
        # Nobody lets a call through any more.
        assert all(r["permitted"] == 0 for r in fleet.all(op="fail", n=3).values())
    finally:
        fleet.close()
    assert client.hget(key("cb", "payments"), "fseq") == b"20"


def test_half_open_lets_at_most_the_configured_probes_through_fleet_wide(shared):
    """Probe permits are fleet-wide, and a prober killed mid-probe lets go when its lease ends."""
    url, client, key = shared
    timeout = 2.0  # also the permit lease
    config = {
        "breaker": {
            "failure_threshold": 4, "timeout": timeout, "half_open_max_calls": 2,
            "success_threshold": 2, "sync_interval": SYNC,
        }
    }  # fmt: skip
    fleet = Fleet(url, "inventory", config)
    try:
        fleet.all(op="fail", n=1)
        assert {
            r["state"] for r in fleet.all(op="wait_state", state="open", within=5).values()
        } == {"open"}
        time.sleep(timeout + 0.1)
        # Every process hammers can_execute() at once: 2 probes in all, not 2 per process.
        granted = {i: r["granted"] for i, r in fleet.all(op="probe", seconds=0.3).items()}
        assert sum(granted.values()) == 2, granted
        # The probers crash without a word: their permits are leased, not lost forever.
        probers = [i for i, n in granted.items() if n]
        for index in probers:
            fleet.kill(index)
        started = time.monotonic()
        again = fleet.all(op="probe", seconds=0.3)
        if time.monotonic() - started < timeout - 0.5:  # well within the lease
            assert sum(r["granted"] for r in again.values()) == 0
        time.sleep(max(0.0, timeout + 0.2 - (time.monotonic() - started)))
        after = fleet.all(op="probe", seconds=0.3)
        assert sum(r["granted"] for r in after.values()) == 2
        # The survivors' probes succeed: closed for the whole fleet.
        fleet.all(op="succeed_held")
        results = fleet.all(op="wait_state", state="closed", within=5)
        assert {r["state"] for r in results.values()} == {"closed"}
    finally:
        fleet.close()
    assert client.hget(key("cb", "inventory"), "why") == b"probes_succeeded"


def _pair(url, clock, **options):
    """Two members of a fleet that sync only when the test says so (after a first sync)."""
    options = {"sync_interval": 60.0, **options}
    pair = [CircuitBreaker(name="dep", store=url, clock=clock, **options) for _ in range(2)]
    assert all(breaker.sync() for breaker in pair)
    return pair


def test_successes_clear_only_the_failures_their_process_had_seen(shared):
    url, _, _ = shared
    a, b = _pair(url, FakeClock(), failure_threshold=3)
    a.record_failure()
    b.record_failure()  # after a's last contact
    a.record_success()
    assert a.sync() and a.failure_count == 1  # b's failure still counts
    b.record_failure()
    b.record_failure()
    assert b.state is CircuitState.OPEN
    assert a.sync() and a.state is CircuitState.OPEN


def test_a_rate_window_counts_every_process_calls(shared):
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(
        url, clock, failure_rate_threshold=0.5, window="time", window_size=10, minimum_calls=10
    )
    for _ in range(5):
        a.record_success()
    assert a.sync()
    for _ in range(4):
        b.record_failure()
    assert b.state is CircuitState.CLOSED and b.snapshot().failure_rate is None  # 9 calls
    clock.advance(11)  # the window moves past all of them
    for _ in range(4):
        b.record_failure()
    assert b.snapshot().buffered_calls == 4
    for _ in range(6):
        a.record_success()
    a.sync()
    b.record_failure()  # 5 failures in 11 calls
    assert b.state is CircuitState.CLOSED
    b.record_failure()  # 6 of 12
    assert b.state is CircuitState.OPEN
    assert a.sync() and a.state is CircuitState.OPEN


def test_a_count_window_trims_the_oldest_batch_to_the_window(shared):
    url, _, _ = shared
    a, b = _pair(url, FakeClock(), failure_rate_threshold=0.5, window_size=10, minimum_calls=10)
    for _ in range(30):
        a.record_success()
    a.sync()
    for _ in range(4):
        b.record_failure()
    snapshot = b.snapshot()
    assert snapshot.buffered_calls == 10 and snapshot.failure_rate == pytest.approx(0.4)
    b.record_failure()
    assert b.state is CircuitState.OPEN


def test_listeners_fire_in_every_process_that_observes_a_change(shared):
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=1, timeout=5.0)
    seen = []
    a.add_listener(seen.append)
    b.record_failure()
    assert seen == []  # a has not looked yet
    a.sync()
    assert [(t.to_state, t.reason) for t in seen] == [(CircuitState.OPEN, "failure_threshold")]
    assert a.retry_after() == pytest.approx(5.0)
    clock.advance(5)
    assert b.can_execute() and not a.can_execute()  # one probe, and b has it
    b.record_success()
    a.sync()
    assert [t.to_state for t in seen][-1] is CircuitState.CLOSED


def test_a_prober_that_never_reports_holds_its_permit_only_for_the_lease(shared):
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=1, timeout=3.0)
    a.record_failure()
    clock.advance(3)
    assert a.can_execute()  # ... and a's process dies here
    assert b.sync() and b.state is CircuitState.HALF_OPEN
    clock.advance(2.9)
    assert not b.can_execute()
    clock.advance(60.2)  # past the lease (the open time), and past b's back-off
    assert b.can_execute()


def _probes_granted_in_threads(breaker, threads):
    """How many of ``threads`` threads, released at once, get a probe permit (each holds
    its permit in its own context and never reports)."""
    start, granted = threading.Barrier(threads), []

    def ask():
        start.wait(5)
        granted.append(breaker.can_execute())

    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    return sum(granted)


def test_a_burst_of_threads_gets_every_probe_permit_of_the_fleet(shared):
    """One permit request to Redis per process at a time refused every other thread of a
    burst: 1 probe of the 3 configured, and recovery took several bursts."""
    url, _, _ = shared
    clock = FakeClock()
    breaker, _ = _pair(url, clock, failure_threshold=1, timeout=3.0, half_open_max_calls=3)
    breaker.record_failure()
    clock.advance(3)
    assert _probes_granted_in_threads(breaker, 16) == 3
    assert breaker.would_refuse()
    clock.advance(2.9)
    assert _probes_granted_in_threads(breaker, 4) == 0  # the three are still out
    clock.advance(0.2)  # past Redis's lease (the open time): the holders are presumed lost
    assert not breaker.would_refuse()
    assert _probes_granted_in_threads(breaker, 16) == 3


def _probes_asked_one_by_one(breaker, callers):
    """What each of ``callers`` threads, one after the other, gets from ``can_execute()``
    (each holds what it got in its own context and never reports: an abandoned call)."""
    answers: list[bool] = []
    for _ in range(callers):
        caller = threading.Thread(target=lambda: answers.append(breaker.can_execute()))
        caller.start()
        caller.join(10)
    return answers


def test_probes_abandoned_past_their_lease_no_longer_count_against_the_process(shared):
    """Permits whose holders never reported stayed counted until the next generation: once
    Redis's lease on them had run out and it granted permits again, the first new grant
    made the process count the abandoned ones again, so it refused the other callers
    itself (1 probe per lease of half_open_max_calls=3). Each permit counts only within
    its own lease; nor does one past its lease become a local probe in an outage."""
    url, _, _ = shared
    clock = FakeClock()
    breaker, _ = _pair(
        url, clock, failure_threshold=1, timeout=1.0, half_open_max_calls=3, success_threshold=3
    )
    breaker.record_failure()
    clock.advance(1.2)
    assert _probes_asked_one_by_one(breaker, 3) == [True, True, True]  # all three abandoned
    assert breaker.would_refuse()
    clock.advance(1.5)  # past Redis's lease (max(1 s, the open time)): Redis lets them go
    assert not breaker.would_refuse()
    assert _probes_asked_one_by_one(breaker, 5) == [True, True, True, False, False]
    assert breaker.would_refuse()
    clock.advance(1.5)
    assert _probes_asked_one_by_one(breaker, 1) == [True]  # once more after the next lease
    # An outage now: only the permit still within its lease is the local breaker's probe.
    breaker.go_local()  # what the link does when it finds Redis gone
    assert breaker.state is CircuitState.HALF_OPEN
    assert _probes_asked_one_by_one(breaker, 3) == [True, True, False]


def test_would_refuse_follows_the_fleet_without_asking_for_a_permit(shared):
    """A pool's health check asks ``would_refuse()``: a member holding every probe permit is
    refused; a member that may still ask Redis for one is not (its check goes through the
    breaker, and a refusal from Redis comes back as ours); one Redis just refused is, until
    its next ask."""
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=1, timeout=3.0)
    a.record_failure()
    assert a.would_refuse()
    clock.advance(3)
    assert not a.would_refuse() and a.state is CircuitState.OPEN  # asking moved nothing
    assert a.can_execute()  # the fleet's only probe permit
    assert a.would_refuse()  # a holds every permit: a second call of a's would be refused
    assert b.sync() and b.state is CircuitState.HALF_OPEN
    assert not b.would_refuse()
    assert not b.can_execute()  # Redis: the permit is a's
    assert b.would_refuse()


def test_manual_modes_apply_to_the_whole_fleet(shared):
    url, _, _ = shared
    a, b = _pair(url, FakeClock())
    a.force_open()
    assert b.sync() and b.state is CircuitState.FORCED_OPEN and not b.can_execute()
    b.reset()
    assert a.sync() and a.state is CircuitState.CLOSED and a.can_execute()


def test_probe_now_ends_the_open_time_of_the_whole_fleet(shared):
    """One process's signal half-opens the fleet's breaker: the fleet's one probe permit goes
    to whoever asks first, and its outcome decides for everyone."""
    url, _, _ = shared
    a, b = _pair(url, FakeClock(), failure_threshold=1, timeout=30.0)
    a.record_failure()
    assert b.sync() and b.state is CircuitState.OPEN and not b.can_execute()
    assert b.probe_now("multidb_active") is True
    assert b.state is CircuitState.HALF_OPEN
    assert a.sync() and a.state is CircuitState.HALF_OPEN
    assert a.can_execute()  # the fleet's only probe permit
    assert not b.can_execute()
    a.record_success()
    assert b.sync() and b.state is CircuitState.CLOSED
    assert a.probe_now() is False  # closed: no open time to end


def test_probe_now_right_after_a_refused_probe_lets_the_signalling_process_probe(shared):
    """A process refused a probe permit in the last half-open period waits ``sync_interval``
    before asking Redis again. Its own ``probe_now()`` starts a new half-open period with
    no permit out: its next call asks Redis and is the probe (refused, it would fail the
    database the router just sent traffic to over again)."""
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=1, timeout=30.0)
    a.record_failure()
    clock.advance(30)
    assert a.can_execute()  # the fleet's probe
    assert b.sync() and not b.can_execute()  # refused: b waits sync_interval to ask again
    a.record_failure()  # the probe failed: open again
    assert b.sync() and b.state is CircuitState.OPEN
    assert b.probe_now("multidb_active") is True
    assert b.state is CircuitState.HALF_OPEN
    assert b.can_execute()  # nobody holds the new period's permit


def test_the_store_argument_and_the_environment_decide_what_is_shared(shared, monkeypatch):
    url, _, _ = shared
    monkeypatch.delenv("OTEL_RECOVERY_STORE_URL", raising=False)
    assert type(CircuitBreaker(name="x")) is CircuitBreaker
    assert type(CircuitBreaker(name="x", store="memory://")) is CircuitBreaker
    assert type(CircuitBreaker(name="x", store=MemoryStore())) is CircuitBreaker
    assert type(CircuitBreaker(name="x", store=url)) is SharedCircuitBreaker
    resilient = ResilientStore(open_store(url))
    assert type(CircuitBreaker(name="x", store=resilient)) is SharedCircuitBreaker
    with pytest.raises(StoreConfigError, match="only through Redis"):
        CircuitBreaker(name="x", store="sqlite:///x.db")
    with pytest.raises(TypeError, match="store must be"):
        CircuitBreaker(name="x", store=42)  # type: ignore[arg-type]
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    assert type(CircuitBreaker(name="x")) is SharedCircuitBreaker
    assert type(CircuitBreaker()) is CircuitBreaker  # unnamed breakers never merge fleet-wide
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "sqlite:///checkpoints.db")
    assert type(CircuitBreaker(name="x")) is CircuitBreaker
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "mongodb://x")
    with pytest.raises(StoreConfigError, match="OTEL_RECOVERY_STORE_URL"):
        CircuitBreaker(name="x")


def test_a_policy_drives_a_shared_breaker_like_a_local_one(shared):
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=2)
    policy = RecoveryPolicy(breaker=a, clock=clock, telemetry=False)

    def down():
        raise ConnectionError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            policy.call(down)
    assert b.sync() and b.state is CircuitState.OPEN


def _events(captured, name):
    return [e for s in captured.spans() for e in s.events if e.name == name]


def test_a_redis_restart_degrades_to_local_state_and_resyncs(volatile_redis, caplog):
    url = f"{volatile_redis.url}?prefix=fleet:"
    with capture_telemetry() as captured, caplog.at_level(logging.INFO, logger="otel_recovery"):
        breaker = CircuitBreaker(3, 30.0, name="db", store=url, sync_interval=0.05)
        breaker.record_failure()
        volatile_redis.stop()
        with get_telemetry().tracer.start_as_current_span("request"):
            for _ in range(2):  # never an exception: the local breaker takes over
                breaker.record_failure()
        assert not breaker.shared
        assert breaker.state is CircuitState.OPEN  # 1 shared + 2 local failures
        assert not breaker.can_execute()
        volatile_redis.start()  # empty: no persistence
        deadline = time.monotonic() + 10
        # the sync thread flips `shared` first, then logs and announces the resync
        while time.monotonic() < deadline and not (
            breaker.shared and _events(captured, names.EVENT_STORE_RESYNCED)
        ):
            time.sleep(0.02)
        assert breaker.shared
        assert breaker.state is CircuitState.OPEN
        assert 20 < breaker.retry_after() <= 30  # the local trip's open time, continued
    # The fresh Redis got the open state from the process that saw the outage.
    other = CircuitBreaker(3, 30.0, name="db", store=open_store(url), sync_interval=60)
    assert other.sync() and other.state is CircuitState.OPEN
    degraded = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    resynced = [r for r in caplog.records if "is reachable again" in r.getMessage()]
    assert len(degraded) == 1 and len(resynced) == 1
    (event,) = _events(captured, names.EVENT_STORE_DEGRADED)
    assert event.attributes[names.STORE_COMPONENTS] == ("circuit_breaker db",)
    assert len(_events(captured, names.EVENT_STORE_RESYNCED)) == 1
    raw = redis.Redis.from_url(volatile_redis.url)
    assert raw.hget("fleet:cb:db", "why") == b"local_trip"
    raw.close()


def test_a_probe_now_while_redis_is_unreachable_reaches_the_fleet_at_the_resync(private_redis):
    """A router sent traffic back to the dependency while the store was unreachable (not
    lost: it keeps the fleet's breaker, open for most of its open time). The local breaker's
    open time ended and its probe succeeded; at the resync the signal goes to the fleet's
    breaker too, which goes half-open, instead of this process adopting the fleet's open
    state as it stood and refusing again (the router would take the traffic away again).
    The probes decide as ever: this process's next call is the fleet's probe."""
    url = f"{private_redis.url}?prefix=pn:"
    clock = FakeClock()
    breaker = CircuitBreaker(1, 30.0, name="db", store=url, clock=clock, sync_interval=60)
    other = CircuitBreaker(1, 30.0, name="db", store=open_store(url), clock=clock, sync_interval=60)
    breaker.record_failure()
    assert other.sync() and other.state is CircuitState.OPEN
    private_redis.stop()
    assert breaker.probe_now("multidb_active") is True  # locally: Redis is unreachable
    assert not breaker.shared and breaker.can_execute()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    private_redis.start()  # with the fleet's breaker as it was: open, 30 s to go
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not breaker.shared:
        time.sleep(0.02)
    assert breaker.shared
    assert breaker.state is CircuitState.HALF_OPEN and breaker.can_execute()
    breaker.record_success()
    assert other.sync() and other.state is CircuitState.CLOSED


def test_a_probe_now_whose_local_probe_failed_is_not_pushed_at_the_resync(private_redis):
    """The signal was answered while the store was unreachable: the local probe failed and
    the local breaker is open again, so the resync pushes that (the fleet's breaker is
    open already) and no half-open period."""
    url = f"{private_redis.url}?prefix=pn:"
    clock = FakeClock()
    breaker = CircuitBreaker(1, 30.0, name="db", store=url, clock=clock, sync_interval=60)
    breaker.record_failure()
    private_redis.stop()
    assert breaker.probe_now("multidb_active") is True
    assert breaker.can_execute()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    private_redis.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not breaker.shared:
        time.sleep(0.02)
    assert breaker.shared and breaker.state is CircuitState.OPEN and not breaker.can_execute()


def _probe_out_when_redis_goes(volatile_redis, name):
    breaker = CircuitBreaker(
        1, 0.5, name=name, store=f"{volatile_redis.url}?prefix=probe:", sync_interval=60
    )
    breaker.record_failure()
    time.sleep(0.6)  # the shared open time, on Redis's clock too
    assert breaker.can_execute() and breaker.state is CircuitState.HALF_OPEN  # from Redis
    volatile_redis.stop()
    return breaker


def test_a_probe_out_when_redis_goes_stays_the_only_probe_and_decides(volatile_redis):
    breaker = _probe_out_when_redis_goes(volatile_redis, "probe-out")
    breaker.go_local()  # what the link does when it finds Redis gone
    others: list[bool] = []
    threads = [threading.Thread(target=lambda: others.append(breaker.can_execute()))]
    threads += [threading.Thread(target=lambda: others.append(breaker.can_execute()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert others == [False, False]  # nobody joins the stalled probe
    breaker.record_failure()  # the probe's own outcome decides
    assert breaker.state is CircuitState.OPEN


def test_a_probe_whose_report_redis_refuses_is_decided_locally(volatile_redis):
    breaker = _probe_out_when_redis_goes(volatile_redis, "probe-report")
    breaker.record_failure()  # Redis is gone as the failure is reported
    assert not breaker.shared and breaker.state is CircuitState.OPEN
    assert not breaker.can_execute()


def test_a_redis_that_stops_answering_costs_a_caller_one_bounded_wait(volatile_redis):
    """CLIENT PAUSE: the server accepts and never replies. One caller waits the decision
    timeout, everyone else goes on locally at once, and the breaker resyncs afterwards."""
    url = f"{volatile_redis.url}?prefix=paused:"
    breaker = CircuitBreaker(5, 30.0, name="slow", store=url, sync_interval=0.05)
    assert breaker.sync()
    asked = callers_asking(breaker._link)
    pauser = redis.Redis.from_url(volatile_redis.url)
    pauser.execute_command("CLIENT", "PAUSE", 4000, "ALL")
    started = time.monotonic()
    breaker.record_failure()
    waited = time.monotonic() - started
    # One bounded wait: at most one turn and one exchange, each cut at DECISION_TIMEOUT
    # (none at all if the link thread's sync met the pause first) ...
    assert asked.count("turn") <= 1 and asked.count("run") <= 1, asked
    assert not breaker.shared
    # ... not a wait for Redis to answer, which only comes when the 4 s pause ends. Half of
    # that, far above the 2 x DECISION_TIMEOUT the link allows: margin for a loaded machine.
    assert waited < 2.0, f"waited {waited:.2f} s"
    asked.clear()
    for _ in range(10):
        breaker.record_failure()  # local now: Redis is not even asked
        breaker.can_execute()
    assert asked == []
    assert breaker.state is CircuitState.OPEN
    deadline = time.monotonic() + 10
    while not breaker.shared and time.monotonic() < deadline:
        time.sleep(0.02)
    assert breaker.shared and breaker.state is CircuitState.OPEN
    pauser.close()


async def test_the_async_driver_shares_the_breaker_too(shared):
    url, _, _ = shared
    clock = FakeClock()
    a, b = _pair(url, clock, failure_threshold=2)
    policy = RecoveryPolicy(breaker=a, clock=clock, telemetry=False)

    async def down():
        raise ConnectionError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await policy.acall(down)
    assert b.sync() and b.state is CircuitState.OPEN
