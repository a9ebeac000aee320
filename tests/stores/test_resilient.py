"""An unreachable store degrades to local state, says so once, and resynchronises exactly."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import free_port

from otel_recovery.checkpoint import Checkpoints, CheckpointUnavailableError
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.stores import (
    MemoryStore,
    ResilientStore,
    StoreUnavailableError,
    open_store,
)
from otel_recovery.telemetry import attributes as names


class Flaky(MemoryStore):
    """A MemoryStore that can be switched off, or made to lose the reply of its next write."""

    def __init__(self, clock) -> None:
        super().__init__(clock=clock)
        self.url = "flaky://user:hunter2@db"
        self.down = False
        self.lose_next_reply = False
        self.calls = 0

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("flaky store is down")

    def _after_write(self) -> None:
        if self.lose_next_reply:
            self.lose_next_reply = False
            self.down = True
            raise StoreUnavailableError("connection lost after the write was applied")

    def put(self, key, data, **options):
        self._gate()
        record = super().put(key, data, **options)
        self._after_write()
        return record

    def get(self, key, version=None):
        self._gate()
        return super().get(key, version)

    def list(self, prefix=""):
        self._gate()
        return super().list(prefix)

    def delete(self, key):
        self._gate()
        return super().delete(key)

    def incr(self, namespace, amounts, *, batch_id=None):
        self._gate()
        applied = super().incr(namespace, amounts, batch_id=batch_id)
        self._after_write()
        return applied

    def counters(self, namespace, keys=None):
        self._gate()
        return super().counters(namespace, keys)


@pytest.fixture
def inner(fake_clock) -> Flaky:
    return Flaky(fake_clock)


@pytest.fixture
def store(inner, fake_clock) -> ResilientStore:
    return ResilientStore(inner, retry_interval=5, clock=fake_clock)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def _events(exporter, name):
    return [e for s in exporter.get_finished_spans() for e in s.events if e.name == name]


def test_degrades_once_with_one_log_and_one_span_event(store, inner, caplog, spans):
    tracer, exporter = spans
    store.put("a", b"1")
    inner.down = True
    with (
        caplog.at_level(logging.WARNING, logger="otel_recovery"),
        tracer.start_as_current_span("op"),
    ):
        for n in range(5):
            store.put("a", str(n).encode())
            store.get("a")
            store.incr("s", {"n": 1})
    assert store.degraded
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text  # the URL is quoted redacted
    (event,) = _events(exporter, names.EVENT_STORE_DEGRADED)
    assert event.attributes[names.STORE_URL] == "flaky://user:***@db"


def test_while_degraded_the_store_is_probed_once_per_retry_interval(store, inner, fake_clock):
    inner.down = True
    store.put("a", b"1")
    calls = inner.calls
    for _ in range(10):
        store.put("a", b"x")
    assert inner.calls == calls  # no call at all before the interval is up
    fake_clock.advance(5)
    store.put("a", b"y")
    assert inner.calls == calls + 1  # one probe, which failed
    assert store.degraded


def test_reads_while_degraded_answer_from_what_this_process_saw(store, inner):
    store.put("seen", b"old")
    inner.down = True
    assert store.get("seen").data == b"old"
    written = store.put("new", b"local")
    assert (written.version, store.get("new").data) == (1, b"local")
    assert [r.key for r in store.list()] == ["new", "seen"]
    with pytest.raises(StoreUnavailableError, match="no local copy of 'never'"):
        store.get("never")


def test_resync_replays_in_order_and_renumbers_behind_other_writers(store, inner, fake_clock):
    store.put("doc", b"v1")
    inner.down = True
    assert store.put("doc", b"mine-1").version == 2  # provisional
    assert store.put("doc", b"mine-2").version == 3
    store.put("gone", b"x")
    assert store.delete("gone") == 1
    inner.down = False
    inner.put("doc", b"theirs")  # another process wrote while we were cut off: version 2
    fake_clock.advance(5)
    assert store.get("doc").data == b"mine-2"  # the probe resynced first
    assert not store.degraded
    assert [(n, inner.get("doc", n).data) for n in (2, 3, 4)] == [
        (2, b"theirs"),
        (3, b"mine-1"),
        (4, b"mine-2"),
    ]
    assert inner.get("gone") is None and store.conflicts == []


def test_a_compare_and_set_made_while_degraded_is_not_forced_over_a_newer_version(
    store, inner, fake_clock, caplog
):
    store.put("doc", b"v1")
    inner.down = True
    assert store.put("doc", b"mine", expected_version=1).version == 2
    assert store.put("doc", b"mine again", expected_version=2).version == 3  # chained on it
    inner.down = False
    inner.put("doc", b"theirs")  # version 2 in the store
    fake_clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert store.resync()
    assert inner.get("doc").data == b"theirs"  # nothing overwritten silently
    assert [(c.key, c.provisional_version, c.store_version) for c in store.conflicts] == [
        ("doc", 2, 2),
        ("doc", 3, 2),
    ]
    assert store.conflicts[0].data == b"mine"
    assert "was not applied" in caplog.text


def _conflicting_outage(store, inner, fake_clock, keys):
    """One outage in which a compare-and-set write to each key is refused on resync."""
    inner.down = True
    for key in keys:
        store.put(key, b"mine " + key.encode(), expected_version=1)
    inner.down = False
    for key in keys:
        inner.put(key, b"theirs")
    fake_clock.advance(5)
    assert store.resync()


def test_each_resync_reports_its_own_conflicts_and_only_the_latest_are_kept(
    store, inner, fake_clock, spans
):
    """``conflicts`` kept every refused write, data included, for the life of the process
    (a learner's snapshot per blip), and each resynced event reported the running total."""
    from otel_recovery.stores._local_state import CONFLICTS_KEPT

    tracer, exporter = spans
    keys = [f"doc-{n}" for n in range(CONFLICTS_KEPT + 5)]
    for key in keys:
        store.put(key, b"v1")
    with tracer.start_as_current_span("first"):
        _conflicting_outage(store, inner, fake_clock, keys[:3])
    with tracer.start_as_current_span("second"):
        _conflicting_outage(store, inner, fake_clock, keys[3:5])
    with tracer.start_as_current_span("third"):
        _conflicting_outage(store, inner, fake_clock, keys[5:])
    reported = [
        e.attributes[names.STORE_CONFLICTS] for e in _events(exporter, names.EVENT_STORE_RESYNCED)
    ]
    assert reported == [3, 2, CONFLICTS_KEPT]
    assert len(store.conflicts) == CONFLICTS_KEPT  # the latest, oldest first
    assert [c.key for c in store.conflicts] == keys[5:]


def test_a_compare_and_set_replays_cleanly_when_nobody_else_wrote(store, inner, fake_clock):
    store.put("doc", b"v1")
    inner.down = True
    store.put("doc", b"v2", expected_version=1)
    store.put("doc", b"v3", expected_version=2)
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("doc").version, inner.get("doc").data, store.conflicts) == (3, b"v3", [])


def test_counter_increments_are_replayed_exactly_once_even_if_a_reply_is_lost(
    store, inner, fake_clock
):
    store.incr("stats", {"ok": 1})
    assert store.counters("stats") == {"ok": 1.0}
    inner.down = True
    store.incr("stats", {"ok": 2, "fail": 1})
    store.incr("stats", {"ok": 3})
    assert store.counters("stats") == {"ok": 6.0, "fail": 1.0}  # last snapshot + local
    inner.down = False
    inner.lose_next_reply = True  # the replayed batch is applied, but its reply never arrives
    fake_clock.advance(5)
    assert not store.resync()
    assert store.degraded
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert inner.counters("stats") == {"ok": 6.0, "fail": 1.0}  # not 11: the batch id held


# -- a write whose reply was lost may have been applied: replayed, it is not applied twice ----


def test_an_increment_whose_reply_is_lost_is_counted_once_with_a_batch_id(store, inner, fake_clock):
    store.incr("stats", {"ok": 1})
    inner.lose_next_reply = True  # the store applies the next one; its reply never arrives
    store.incr("stats", {"ok": 1}, batch_id="request-42")
    inner.down = False
    assert store.degraded and inner.counters("stats") == {"ok": 2.0}
    fake_clock.advance(5)
    assert store.resync()
    assert inner.counters("stats") == {"ok": 2.0}  # not 3: the caller's batch id held


def test_without_a_batch_id_a_lost_reply_is_counted_at_least_once(store, inner, fake_clock):
    """The documented trade: no marker per increment in the store, at the price of a
    possible double count when a reply is lost."""
    for _ in range(100):
        store.incr("healthy", {"ok": 1})
    assert not inner._batches  # no marker per increment
    inner.lose_next_reply = True
    store.incr("stats", {"ok": 1})
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert inner.counters("stats") == {"ok": 2.0}
    assert len(inner._batches) == 1  # the replayed batch's, which a lost reply cannot double


def test_increments_made_while_degraded_still_merge_into_one_batch(store, inner, fake_clock):
    inner.down = True
    for _ in range(1000):
        store.incr("stats", {"ok": 1})  # not journaled one by one: the journal stays small
    assert store.local.pending() == 1
    inner.down = False
    fake_clock.advance(5)
    assert store.resync() and inner.counters("stats") == {"ok": 1000.0}


def test_a_compare_and_set_whose_reply_is_lost_is_recognised_on_replay(
    store, inner, fake_clock, caplog
):
    store.put("job", b"step-1")
    inner.lose_next_reply = True
    assert store.put("job", b"step-2", expected_version=1).version == 2  # applied there
    assert store.put("job", b"step-3", expected_version=2).version == 3  # built on it
    inner.down = False
    fake_clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert store.resync()
    assert store.conflicts == [] and "was not applied" not in caplog.text
    assert [inner.get("job", n).data for n in (1, 2, 3)] == [b"step-1", b"step-2", b"step-3"]


def test_a_compare_and_set_whose_reply_is_lost_finds_its_write_under_later_ones(
    store, inner, fake_clock
):
    """Another writer built on our applied write before we resynced: ours is there, at the
    version after the one it expected, and is not reported as refused."""
    store.put("job", b"a")
    inner.lose_next_reply = True
    store.put("job", b"ours", expected_version=1)
    inner.down = False
    inner.put("job", b"theirs", expected_version=2)  # saw ours: version 3
    fake_clock.advance(5)
    assert store.resync()
    assert store.conflicts == [] and inner.get("job").version == 3


def test_a_plain_put_whose_reply_is_lost_is_not_written_again(store, inner, fake_clock):
    store.put("doc", b"v1")
    inner.lose_next_reply = True
    store.put("doc", b"v2")
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("doc").version, inner.get("doc").data) == (2, b"v2")  # not a version 3


def test_a_plain_put_whose_reply_is_lost_is_found_under_a_later_write(store, inner, fake_clock):
    """Another process wrote over our applied (unanswered) put before we resynced: writing
    ours again would apply it twice and hide their newer write."""
    store.put("doc", b"v1")
    inner.lose_next_reply = True
    store.put("doc", b"ours")
    inner.down = False
    inner.put("doc", b"theirs")
    fake_clock.advance(5)
    assert store.resync()
    versions = [(r.version, r.data) for r in (inner.get("doc", n) for n in (1, 2, 3)) if r]
    assert versions == [(1, b"v1"), (2, b"ours"), (3, b"theirs")] and inner.get("doc", 4) is None


def test_an_old_version_with_the_same_bytes_is_not_the_lost_put(store, inner, fake_clock):
    store.put("doc", b"same")
    inner.put("doc", b"other")
    fake_clock.advance(3600)  # an hour later, the same bytes are written again
    inner.down = True
    store.put("doc", b"same")  # never reached the store
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("doc").version, inner.get("doc").data) == (3, b"same")


def test_a_replayed_delete_leaves_a_version_written_after_it(store, inner, fake_clock, caplog):
    store.put("job", b"old")
    inner.down = True
    assert store.delete("job") == 1
    inner.down = False
    fake_clock.advance(1)
    inner.put("job", b"new work")  # another process, after our delete: version 2
    fake_clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert store.resync()
    assert inner.get("job").data == b"new work"
    assert [(c.operation, c.key, c.store_version) for c in store.conflicts] == [
        ("delete", "job", 2)
    ]
    assert "the delete was not applied" in caplog.text


def test_a_replayed_delete_of_a_key_this_process_never_saw_spares_later_writes(
    store, inner, fake_clock
):
    inner.put("old", b"x")
    inner.down = True
    store.delete("old")
    store.delete("later")
    inner.down = False
    fake_clock.advance(1)
    inner.put("later", b"made after the delete")
    fake_clock.advance(5)
    assert store.resync()
    assert inner.get("old") is None  # created before the delete: deleted
    assert inner.get("later").data == b"made after the delete"


def test_a_replayed_delete_based_on_a_refused_write_is_not_applied(store, inner, fake_clock):
    store.put("job", b"v1")
    inner.down = True
    store.put("job", b"mine", expected_version=1)  # provisional 2
    store.delete("job")  # deletes what it knew: its own version 2
    inner.down = False
    inner.put("job", b"theirs")  # the store's version 2: ours will be refused
    fake_clock.advance(5)
    assert store.resync()
    assert inner.get("job").data == b"theirs"
    assert [c.operation for c in store.conflicts] == ["put", "delete"]


def test_closing_replays_what_is_local_or_says_it_is_lost(inner, fake_clock, caplog):
    store = ResilientStore(inner, retry_interval=5, clock=fake_clock)
    inner.down = True
    store.put("a", b"1")
    inner.down = False  # back, but not probed yet
    store.close()
    assert inner.get("a").data == b"1"

    other = ResilientStore(Flaky(fake_clock), retry_interval=5, clock=fake_clock)
    other.store.down = True
    other.put("b", b"2")
    other.incr("n", {"x": 1})
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        other.close()
    assert "with 2 local change(s) it never received" in caplog.text


def test_a_put_whose_ttl_ran_out_during_the_outage_is_not_replayed(store, inner, fake_clock):
    inner.down = True
    store.put("short", b"x", ttl=3)
    store.put("long", b"y", ttl=60)
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert inner.get("short") is None and inner.get("long").data == b"y"


def test_a_full_journal_refuses_the_write_instead_of_dropping_older_ones(inner, fake_clock):
    store = ResilientStore(inner, clock=fake_clock, journal_bytes=1000)
    inner.down = True
    store.put("a", b"x" * 500)
    with pytest.raises(StoreUnavailableError, match="journal is full"):
        store.put("b", b"x" * 500)
    checkpoints = Checkpoints(store, clock=fake_clock)
    with pytest.raises(CheckpointUnavailableError, match="'c' was not saved"):
        checkpoints.save("c", "x" * 500)


async def test_the_async_path_degrades_and_resyncs_too(store, inner, fake_clock):
    await store.aput("a", b"1")
    inner.down = True
    assert (await store.aput("a", b"2")).version == 2
    assert (await store.aget("a")).data == b"2"
    await store.aincr("s", {"n": 4})
    assert await store.acounters("s") == {"n": 4.0}
    inner.down = False
    fake_clock.advance(5)
    assert (await store.alist()) == inner.list()
    assert not store.degraded and inner.get("a").data == b"2" and inner.counters("s") == {"n": 4.0}


async def test_checkpoints_keep_working_on_an_unreachable_server(fake_clock, caplog):
    # Nothing listens on this port: every connection attempt is refused at once.
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    recovery = ErrorRecoveryInteraction(store=url, clock=fake_clock, telemetry=False)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert recovery.create_checkpoint("job", {"step": 1}) == 1
        assert (await recovery.restore_checkpoint("job"))["state"] == {"step": 1}
        missing = await recovery.restore_checkpoint("elsewhere")
    assert missing["recovery_status"] == "failed"
    assert "unreachable" in missing["reason"] and "secret" not in missing["reason"]
    assert "secret" not in caplog.text


def test_an_unreachable_postgres_is_reported_without_its_password(fake_clock):
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/test"
    raw = open_store(url, clock=fake_clock)
    with pytest.raises(StoreUnavailableError) as caught:
        raw.get("x")
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    checkpoints = Checkpoints(url, clock=fake_clock)
    assert checkpoints.save("job", [1]) == 1  # degraded, kept locally
    assert checkpoints.load("job").state == [1]


def test_a_replay_that_meets_a_stores_bug_loses_nothing(store, inner, fake_clock, caplog):
    inner.down = True
    store.put("a", b"1")
    store.put("b", b"2")
    inner.down = False
    real_put = inner.put
    calls = 0

    def broken_once(key, data, **options):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in a third-party store")
        return real_put(key, data, **options)

    inner.put = broken_once
    fake_clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert not store.resync()  # stopped at "b", which is kept
    assert "they are kept" in caplog.text and store.degraded
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("a").data, inner.get("b").data) == (b"1", b"2")


async def test_a_replay_cancelled_midway_loses_nothing_and_can_run_again(store, inner, fake_clock):
    inner.down = True
    await store.aput("a", b"1")
    await store.aput("b", b"2")
    inner.down = False
    stalled = asyncio.Event()
    real_aput = inner.aput

    async def slow_aput(key, data, **options):
        if key == "b":
            await stalled.wait()
        return await real_aput(key, data, **options)

    inner.aput = slow_aput
    fake_clock.advance(5)
    replaying = asyncio.create_task(store.aresync())
    for _ in range(5):
        await asyncio.sleep(0)
    replaying.cancel()  # the request that probed is cancelled while "b" is replayed
    with pytest.raises(asyncio.CancelledError):
        await replaying
    inner.aput = real_aput
    fake_clock.advance(5)
    assert await store.aresync()  # not stuck "resyncing", and "b" was kept
    assert (inner.get("a").data, inner.get("b").data) == (b"1", b"2")


# -- a write racing the end of a resync: journaled only while the store counts as degraded -------

_PARK = 5.0
"""How long a hooked thread waits for the other one: on a regression the test fails, not hangs."""


def _call(mode, store, name, *args):
    """``store.<name>(...)``, or ``store.a<name>(...)`` in an event loop of this thread's own."""
    if mode == "sync":
        return getattr(store, name)(*args)
    return asyncio.run(getattr(store, "a" + name)(*args))


def _thread(target) -> threading.Thread:
    """Not started yet: the hooks compare the current thread with it, so bind it first."""
    return threading.Thread(target=target, daemon=True)


def _no_stale_replay_later(store, inner, fake_clock):
    """A later write, then another outage and resync: nothing older is replayed over it."""
    store.put("a", b"4")
    inner.down = True
    store.put("b", b"x")
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert inner.get("a").data == b"4" and store.local.pending() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_write_made_while_a_resync_settles_is_not_stranded_in_the_journal(
    store, inner, fake_clock, mode
):
    store.put("a", b"1")
    inner.down = True
    store.put("a", b"2")  # degraded: journaled
    inner.down = False
    fake_clock.advance(5)

    # The resyncing thread R is parked right after LocalState.settle() has found the journal
    # empty (the store not yet declared healthy) until the writer W has chosen where its put
    # goes; W's put then finds the resync still running, so it chooses local state.
    resyncer_parked, writer_chose = threading.Event(), threading.Event()
    real_settle, real_route = store.local.settle, store._route

    def settle():
        replayed = real_settle()
        if replayed is not None and threading.current_thread() is resyncer:
            resyncer_parked.set()
            writer_chose.wait(_PARK)
        return replayed

    def route():
        due = real_route()
        if threading.current_thread() is writer:
            writer_chose.set()
        return due

    store.local.settle, store._route = settle, route
    resyncer = _thread(lambda: _call(mode, store, "get", "a"))
    writer = _thread(lambda: _call(mode, store, "put", "a", b"3"))
    resyncer.start()
    assert resyncer_parked.wait(_PARK)
    writer.start()
    writer.join(_PARK)
    resyncer.join(_PARK)
    assert not writer.is_alive() and not resyncer.is_alive()
    store.local.settle, store._route = real_settle, real_route

    # The write reached the store, its writer reads it, and nothing is left in the journal.
    assert (inner.get("a").data, store.local.pending(), store.degraded) == (b"3", 0, False)
    assert store.get("a").data == b"3"
    _no_stale_replay_later(store, inner, fake_clock)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_write_that_chose_local_state_before_a_resync_ended_goes_to_the_store(
    store, inner, fake_clock, mode
):
    store.put("a", b"1")
    inner.down = True
    store.put("a", b"2")  # degraded: journaled
    inner.down = False
    fake_clock.advance(5)

    # R is parked while it replays "a"=2 until W has found the resync running (so W chooses
    # local state); W is then parked until R has finished and declared the store healthy:
    # checking the journal and clearing the degraded mode in one step is not enough.
    replaying, writer_chose, resynced = threading.Event(), threading.Event(), threading.Event()
    real_put, real_route = inner.put, store._route

    def put(key, data, **options):
        if threading.current_thread() is resyncer:
            replaying.set()
            writer_chose.wait(_PARK)
        return real_put(key, data, **options)

    def route():
        due = real_route()
        if threading.current_thread() is writer and not writer_chose.is_set():
            writer_chose.set()
            resynced.wait(_PARK)
        return due

    inner.put, store._route = put, route
    resyncer = _thread(lambda: _call(mode, store, "get", "a"))
    writer = _thread(lambda: _call(mode, store, "put", "a", b"3"))
    resyncer.start()
    assert replaying.wait(_PARK)
    writer.start()
    resyncer.join(_PARK)
    assert not resyncer.is_alive() and not store.degraded
    resynced.set()
    writer.join(_PARK)
    assert not writer.is_alive()
    inner.put, store._route = real_put, real_route

    assert (inner.get("a").data, store.local.pending(), store.degraded) == (b"3", 0, False)
    assert store.get("a").data == b"3"
    _no_stale_replay_later(store, inner, fake_clock)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_write_the_store_failed_during_someone_elses_resync_is_replayed_not_stranded(
    store, inner, fake_clock, mode
):
    store.put("a", b"1")
    inner.down = True

    # The writer W is sent to the (healthy) store, which fails it; W is parked right after
    # switching to degraded mode, before it keeps its write locally, while this thread
    # probes, resyncs (an empty journal) and declares the store healthy again.
    writer_failed, resynced = threading.Event(), threading.Event()
    real_degrade = store._degrade

    def degrade(error):
        real_degrade(error)
        if threading.current_thread() is writer:
            writer_failed.set()
            resynced.wait(_PARK)

    store._degrade = degrade
    writer = _thread(lambda: _call(mode, store, "put", "a", b"3"))
    writer.start()
    assert writer_failed.wait(_PARK)
    inner.down = False
    fake_clock.advance(5)
    assert store.get("a").data == b"1" and not store.degraded
    resynced.set()
    writer.join(_PARK)
    assert not writer.is_alive()
    store._degrade = real_degrade

    # W's write, which the store may have applied, is kept and replayed by the next call
    # (looking first), not left in the journal of a store that counts as healthy.
    assert store.get("a").data == b"3"
    assert (inner.get("a").data, store.local.pending(), store.degraded) == (b"3", 0, False)
    _no_stale_replay_later(store, inner, fake_clock)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_failing_late_during_a_resync_does_not_let_a_second_resync_start(
    store, inner, fake_clock, mode
):
    """A store call that started while the store was healthy and fails while another thread
    resyncs used to clear the resync's claim: a second thread then claimed a resync too,
    found the journal (already taken by the first) empty, declared the store healthy, and
    wrote to it, and the first resync then replayed older values over that newer write."""
    store.put("a", b"1")
    inner.down = True
    store.put("a", b"2")
    store.put("a", b"3")  # degraded: both journaled
    inner.down = False
    fake_clock.advance(5)

    replaying, go_on = threading.Event(), threading.Event()
    real_put = inner.put

    def put(key, data, **options):
        if threading.current_thread() is resyncer and not replaying.is_set():
            replaying.set()
            go_on.wait(_PARK)
        return real_put(key, data, **options)

    inner.put = put
    resyncer = _thread(lambda: _call(mode, store, "get", "a"))
    resyncer.start()
    assert replaying.wait(_PARK)
    # a call sent while the store was healthy fails only now (its late failure)
    store._degrade(StoreUnavailableError("a late failure of a call made before the outage"))
    fake_clock.advance(5)  # past the retry interval: would another call resync?
    assert _call(mode, store, "get", "a").data == b"3"  # its writer's own latest
    _call(mode, store, "put", "a", b"4")
    go_on.set()
    resyncer.join(_PARK)
    assert not resyncer.is_alive()
    inner.put = real_put
    if store.degraded:
        fake_clock.advance(5)
        assert store.resync()
    assert (inner.get("a").data, store.local.pending(), store.degraded) == (b"4", 0, False)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_that_found_the_store_healthy_never_resyncs_unclaimed(
    store, inner, fake_clock, mode
):
    """A call routed to a healthy store, which another thread then degraded, ran a resync
    it had not claimed: the claimed one found the journal taken, declared the store
    healthy, a newer write went to the store, and the unclaimed replay of the older write
    landed over it."""
    routed, degraded_meanwhile = threading.Event(), threading.Event()
    replaying, go_on = threading.Event(), threading.Event()
    real_route, real_put = store._route, inner.put

    def route():
        where = real_route()
        if threading.current_thread() is caller:
            routed.set()
            degraded_meanwhile.wait(_PARK)
        return where

    def put(key, data, **options):
        if threading.current_thread() is caller and data == b"old":
            replaying.set()  # an unclaimed replay, parked
            go_on.wait(_PARK)
        return real_put(key, data, **options)

    store._route, inner.put = route, put
    caller = _thread(lambda: _call(mode, store, "get", "other"))
    caller.start()
    assert routed.wait(_PARK)
    inner.down = True
    store.put("k", b"old")  # fails: degraded, journaled
    inner.down = False
    degraded_meanwhile.set()
    replaying.wait(0.5)  # (the old code's unclaimed resync gets here)
    fake_clock.advance(5)
    assert store.resync()
    store.put("k", b"new")
    go_on.set()
    caller.join(_PARK)
    assert not caller.is_alive()
    store._route, inner.put = real_route, real_put
    assert (inner.get("k").data, store.local.pending(), store.degraded) == (b"new", 0, False)


def test_a_state_written_back_to_an_earlier_value_is_not_taken_for_the_earlier_write(
    store, inner, fake_clock
):
    """idle -> busy -> idle, the last put unanswered and never applied: the store's version
    1 holds the same bytes and is seconds old, but it was there before the send, so it is
    not this write. Taken for it, the state would silently stay "busy"."""
    store.put("worker", b'"idle"')
    store.put("worker", b'"busy"')
    inner.down = True
    store.put("worker", b'"idle"')  # sent, no answer, not applied
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("worker").version, inner.get("worker").data) == (3, b'"idle"')


class _LosesReplies:
    """Makes a real store's next put apply its write, then fail as if the reply was lost."""

    def __init__(self, real) -> None:
        self.real, self.armed = real, False
        self.original = real.put
        real.put = self.put

    def put(self, key, data, **options):
        record = self.original(key, data, **options)
        if self.armed:
            self.armed = False
            raise StoreUnavailableError("connection lost after the write was applied")
        return record


@pytest.mark.parametrize("expected", [None, 1])
def test_a_json_write_whose_reply_is_lost_is_recognised_on_every_durable_store(durable, expected):
    """PostgreSQL gives JSON back in jsonb's rendering (``{"step": 2}`` for ``{"step":2}``):
    compared as bytes, a plain put whose reply was lost was written again (a second
    version), and a compare-and-set one reported as a conflict though it was applied."""
    real = durable.open()
    lossy = _LosesReplies(real)
    store = ResilientStore(real, retry_interval=5, clock=durable.clock)
    store.put("job", b'{"step":1,"of":3}')
    lossy.armed = True
    store.put("job", b'{"step":2,"of":3}', expected_version=expected)  # applied, unanswered
    durable.clock.advance(5)
    assert store.resync()
    assert store.conflicts == []
    latest = real.get("job")
    assert latest.version == 2 and json.loads(latest.data) == {"step": 2, "of": 3}


def test_json_that_decodes_equal_in_python_but_differs_is_not_taken_for_the_write(
    store, inner, fake_clock
):
    """``true == 1`` in Python: a store holding another writer's ``{"ok": 1}`` has not
    applied our ``{"ok": true}``."""
    store.put("flag", b'{"ok":0}')
    inner.put("flag", b'{"ok":1}')  # another process, unseen by this one: version 2
    inner.down = True
    store.put("flag", b'{"ok":true}')  # unanswered, not applied; v2 looks equal to Python
    inner.down = False
    fake_clock.advance(5)
    assert store.resync()
    assert (inner.get("flag").version, inner.get("flag").data) == (3, b'{"ok":true}')
