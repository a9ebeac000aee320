"""A StrategyLearner's snapshot: it fits the store, a failed save never reaches the caller,
replicas sharing it merge (nothing lost, nothing counted twice), and a snapshot from a newer
version neither stops the service nor gets overwritten. Virtual time only."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading

import pytest

from otel_recovery.checkpoint import DEFAULT_MAX_SIZE, Checkpoints
from otel_recovery.classify import Classifier
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.learning import (
    DecisionKey,
    LearnedRetryAdvisor,
    MemoryLearnerStore,
    StrategyLearner,
)
from otel_recovery.learning.store import CheckpointLearnerStore
from otel_recovery.policies import CircuitBreaker, FixedBackoff, Retry
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.testing import FakeClock

ARMS = {"fail_fast": 0, "retry": 3, "exponential_backoff": 3}


def _pulls(snapshot, scope, key):
    for context in snapshot["contexts"]:
        if context["scope"] == scope and context["key"] == key:
            return sum(int(arm[3]) for arm in context["arms"].values())
    return 0


def _learn(learner, clock, key, times, *, step=0.5):
    for _ in range(times):
        rec = learner.choose(key, ARMS)
        learner.record(rec, success=True, retries=min(1, rec.max_retries), recovery_time=0.1)
        clock.advance(step)


# -- the snapshot fits the store, and a failed save stays inside the learner ------------------


def test_a_snapshot_of_a_full_learner_fits_the_real_checkpoint_limit(tmp_path):
    """Default settings (10,000 contexts): about 9,300 fingerprints used to pass the 1 MiB
    checkpoint limit, and every save raised CheckpointTooLargeError."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    clock = FakeClock()
    learner = StrategyLearner(clock=clock, store=CheckpointLearnerStore(url, name="big"))
    for i in range(12_000):
        key = DecisionKey(f"svc-{i % 50}", f"{i:016x}", "transient")
        rec = learner.choose(key, ARMS)
        learner.record(rec, success=True, retries=min(1, rec.max_retries), recovery_time=0.1)
        learner.observe_recovery(f"svc-{i % 50}", 0.1 + i % 7 / 100)
        clock.advance(0.001)  # no periodic save: the flush below is the first
    assert len(json.dumps(learner.to_dict())) > DEFAULT_MAX_SIZE  # too big as it is
    learner.flush()
    stored = CheckpointLearnerStore(url, name="big").load()
    assert stored is not None
    assert len(Checkpoints(f"sqlite:///{tmp_path / 'state.db'}").serializer.dumps(stored)) <= (
        DEFAULT_MAX_SIZE
    )
    kept = {(c["scope"], c["key"]) for c in stored["contexts"]}
    assert ("*", "category:transient") in kept
    assert all((f"svc-{n}", "category:transient") in kept for n in range(50))
    assert ("svc-49", f"fingerprint:{11_999:016x}") in kept  # the most recent stay...
    assert ("svc-0", f"fingerprint:{2_000:016x}") not in kept  # ...the oldest go first
    assert len(stored["delays"]) == 50
    restarted = StrategyLearner(clock=clock, store=CheckpointLearnerStore(url, name="big"))
    assert restarted.learned_delay("svc-3") is not None


class FailingStore:
    """A store that cannot save (too large, unreachable...) until it is healed."""

    def __init__(self) -> None:
        self.inner = MemoryLearnerStore()
        self.broken = True
        self.attempts = 0

    def load(self):
        return self.inner.load()

    def save(self, snapshot):
        self.attempts += 1
        if self.broken:
            raise RuntimeError("store says no")
        self.inner.save(snapshot)


KEY = DecisionKey("checkout", "fp-1", "transient")


def test_a_failed_periodic_save_never_reaches_the_caller_and_is_logged_once(caplog):
    clock = FakeClock()
    store = FailingStore()
    learner = StrategyLearner(clock=clock, store=store, save_interval=1.0)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        _learn(learner, clock, KEY, 40)
    assert store.attempts >= 10  # it kept trying, once per save_interval
    warnings = [r for r in caplog.records if "could not save" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    store.broken = False
    learner.flush()  # nothing learned meanwhile was lost
    assert _pulls(store.inner.load(), "*", "category:transient") == 40


async def test_recover_from_error_returns_its_result_when_the_store_fails(fake_clock):
    store = FailingStore()
    learner = StrategyLearner(clock=fake_clock, store=store, save_interval=0.0)
    recovery = ErrorRecoveryInteraction(
        classifier=Classifier(clock=fake_clock),
        clock=fake_clock,
        telemetry=False,
        learner=learner,
        breaker_factory=lambda name: CircuitBreaker(10_000, name=name, clock=fake_clock),
    )
    for _ in range(5):
        result = await recovery.recover_from_error(
            ConnectionResetError("reset"), {"service_id": "inv", "retry_func": lambda: "ok"}
        )
        assert result["recovery_status"] in {"success", "failed"}
    assert store.attempts >= 5


def test_the_retry_advisor_path_logs_no_traceback_per_retry(fake_clock, caplog):
    store = FailingStore()
    learner = StrategyLearner(clock=fake_clock, store=store, save_interval=0.0)
    advisor = LearnedRetryAdvisor(learner, service="api")
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0.0), advisor=advisor),
        clock=fake_clock,
        telemetry=False,
    )
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        for _ in range(20):
            failures = iter([ConnectionResetError("reset")])

            def flaky():
                error = next(failures, None)
                if error is not None:
                    raise error
                return "ok"

            try:
                policy.call(flaky)
            except ConnectionResetError:
                pass
            fake_clock.advance(1.0)
    assert not [r for r in caplog.records if "failed to learn" in r.getMessage()]
    assert len([r for r in caplog.records if "could not save" in r.getMessage()]) == 1


# -- a fleet shares one snapshot ----------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def shared_store(request, tmp_path):
    if request.param == "memory":
        store = MemoryLearnerStore()
        return lambda: store
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    return lambda: CheckpointLearnerStore(url, name="checkout")


def test_replicas_merge_their_learning_without_losing_or_doubling_any(shared_store):
    clock = FakeClock()
    a = StrategyLearner(clock=clock, store=shared_store(), rng=random.Random(1))
    b = StrategyLearner(clock=clock, store=shared_store(), rng=random.Random(2))
    ka = DecisionKey("checkout", "fp-timeouts", "transient")
    kb = DecisionKey("checkout", "fp-resets", "transient")
    for _ in range(4):  # repeated saves: each must add only what is new
        _learn(a, clock, ka, 25)
        a.flush()
        _learn(b, clock, kb, 25)
        b.flush()
    b.flush()
    a.flush()
    fresh = StrategyLearner(clock=clock, store=shared_store())
    snapshot = fresh.to_dict()
    assert _pulls(snapshot, "checkout", "fingerprint:fp-timeouts") == 100
    assert _pulls(snapshot, "checkout", "fingerprint:fp-resets") == 100
    assert _pulls(snapshot, "*", "category:transient") == 200
    # the weights add up too: decayed sums of disjoint evidence are additive
    a_weight = a.explain(ka)["levels"][0]["arms"]
    fresh_weight = fresh.explain(ka)["levels"][0]["arms"]
    for arm, view in a_weight.items():
        assert fresh_weight[arm]["weight"] == pytest.approx(view["weight"], abs=0.01)
    # a running replica sees the other's learning after its next save
    assert a.explain(kb)["levels"][0]["arms"]
    assert sum(v["pulls"] for v in a.explain(kb)["levels"][0]["arms"].values()) == 100


def test_periodic_saves_of_two_replicas_merge(shared_store):
    clock = FakeClock()
    a = StrategyLearner(clock=clock, store=shared_store(), save_interval=5.0)
    b = StrategyLearner(clock=clock, store=shared_store(), save_interval=5.0)
    ka = DecisionKey("checkout", "fp-a", "transient")
    kb = DecisionKey("checkout", "fp-b", "transient")
    for _ in range(60):
        _learn(a, clock, ka, 1)
        _learn(b, clock, kb, 1)
    a.flush()
    b.flush()
    snapshot = StrategyLearner(clock=clock, store=shared_store()).to_dict()
    assert _pulls(snapshot, "*", "category:transient") == 120


def test_a_concurrent_save_is_merged_not_overwritten(tmp_path):
    """Another replica saves between this one's read and write: the compare-and-set fails,
    and the learner reads again and merges."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    clock = FakeClock()
    other = StrategyLearner(clock=clock, store=CheckpointLearnerStore(url, name="x"))
    _learn(other, clock, DecisionKey("checkout", "fp-other", "transient"), 10)

    class Racing(CheckpointLearnerStore):
        merges = 0

        def update(self, merge):
            def racing(shared):
                Racing.merges += 1
                if Racing.merges == 1:
                    other.flush()  # lands between our read and our write
                return merge(shared)

            super().update(racing)

    mine = StrategyLearner(clock=clock, store=Racing(url, name="x"))
    _learn(mine, clock, DecisionKey("checkout", "fp-mine", "transient"), 10)
    mine.flush()
    assert Racing.merges == 2
    snapshot = CheckpointLearnerStore(url, name="x").load()
    assert _pulls(snapshot, "*", "category:transient") == 20


def test_a_lone_learner_is_unchanged_by_its_own_saves():
    clock = FakeClock()
    learner = StrategyLearner(clock=clock, store=MemoryLearnerStore(), save_interval=1.0)
    _learn(learner, clock, KEY, 50)
    before = learner.to_dict()
    learner.flush()
    assert learner.to_dict() == before


# -- a snapshot from a newer version ----------------------------------------------------------


def test_a_newer_snapshot_neither_stops_the_service_nor_is_overwritten(caplog):
    store = MemoryLearnerStore()
    newer = {"format": "otel_recovery.strategy_learner", "version": 2, "saved_at": 0}
    store.save(newer)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        learner = StrategyLearner(clock=clock, store=store, save_interval=1.0)
        _learn(learner, clock, KEY, 20)  # periodic saves: refused, quietly
    assert learner.explain(KEY)["levels"][0]["arms"]  # it learns from the priors
    assert store.load() == newer
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "newer" in m and "starts from its priors" in m]) == 1
    assert len([m for m in messages if "does not save over" in m]) == 1
    with pytest.raises(ValueError, match="newer"):
        learner.flush()  # an explicit flush says why it did not save


def test_a_snapshot_beyond_max_contexts_is_trimmed_on_load():
    clock = FakeClock()
    big = StrategyLearner(clock=clock)
    for i in range(50):
        _learn(big, clock, DecisionKey("svc", f"fp-{i}", "transient"), 1)
    small = StrategyLearner.from_dict(big.to_dict(), clock=clock, max_contexts=10)
    assert len(small.to_dict()["contexts"]) == 10
    keys = {c["key"] for c in small.to_dict()["contexts"]}
    assert "fingerprint:fp-49" in keys and "fingerprint:fp-0" not in keys  # the oldest go


def test_replicas_saving_from_many_threads_lose_and_double_nothing():
    clock = FakeClock()
    store = MemoryLearnerStore()
    replicas = [
        StrategyLearner(clock=clock, store=store, save_interval=0.0, rng=random.Random(n))
        for n in range(2)
    ]

    def worker(learner, seed):
        key = DecisionKey("checkout", f"fp-{seed}", "transient")
        for _ in range(300):
            rec = learner.choose(key, ARMS)
            learner.record(rec, success=True, retries=min(1, rec.max_retries), recovery_time=0.1)

    threads = [threading.Thread(target=worker, args=(replicas[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for learner in replicas:
        learner.flush()
    replicas[0].flush()
    assert _pulls(store.load(), "*", "category:transient") == 1200
    assert (
        sum(
            v["pulls"]
            for v in replicas[0]
            .explain(DecisionKey("checkout", "fp-3", "transient"))["levels"][0]["arms"]
            .values()
        )
        == 300
    )


class InterruptedStore:
    """A load-and-save store whose save fails after ``during`` ran: evidence arrives while
    the save is in flight."""

    def __init__(self) -> None:
        self.inner = MemoryLearnerStore()
        self.during = None

    def load(self):
        return self.inner.load()

    def save(self, snapshot):
        if self.during is not None:
            during, self.during = self.during, None
            during()
            raise ConnectionError("store went away")
        self.inner.save(snapshot)


def test_recovery_times_owed_after_a_failed_save_keep_their_order():
    """The evidence that came in during a failed save was put before the older evidence it
    joined, so trimming to ``delay_samples`` dropped the newest recovery time."""
    store, clock = InterruptedStore(), FakeClock()
    other = StrategyLearner(clock=clock, store=store, delay_samples=4)
    other.observe_recovery("db", 0.5)
    other.flush()  # another replica's snapshot: this learner's saves now merge into it
    learner = StrategyLearner(clock=clock, store=store, delay_samples=4)
    for seconds in (1.0, 2.0, 3.0):
        learner.observe_recovery("db", seconds)
    store.during = lambda: [learner.observe_recovery("db", s) for s in (4.0, 5.0)]
    with pytest.raises(ConnectionError):
        learner.flush()
    learner.flush()
    assert store.load()["delays"]["db"] == [2.0, 3.0, 4.0, 5.0]


def test_what_was_learned_since_the_last_save_is_saved_at_exit(tmp_path):
    """A learner saves every ``save_interval``: the rest, up to a minute of learning, died
    with the process."""
    url = f"sqlite:///{tmp_path / 'learned.db'}"
    script = f"""
from otel_recovery.learning import DecisionKey, StrategyLearner
from otel_recovery.learning.store import CheckpointLearnerStore
learner = StrategyLearner(store=CheckpointLearnerStore({url!r}), save_interval=3600)
learner.observe_recovery("db", 0.25)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert CheckpointLearnerStore(url).load()["delays"] == {"db": [0.25]}


class CommitsThenRaises(InterruptedStore):
    """A load-and-save store whose next save stores the snapshot and then raises, as a
    timeout after the commit would: the learner cannot tell whether it landed."""

    ambiguous = False

    def save(self, snapshot):
        self.inner.save(snapshot)
        if self.ambiguous:
            self.ambiguous = False
            raise TimeoutError("no answer after the commit")


def test_a_save_that_landed_but_raised_is_not_counted_twice():
    """The evidence of a save that raised was folded back into what was owed, and saved
    again: every observation of a save that had in fact landed was counted twice."""
    store, clock = CommitsThenRaises(), FakeClock()
    other = StrategyLearner(clock=clock, store=store, delay_samples=8)
    other.observe_recovery("db", 0.5)
    other.flush()  # another replica's snapshot: this learner's saves merge into it
    learner = StrategyLearner(clock=clock, store=store, delay_samples=8)
    learner.observe_recovery("db", 1.0)
    store.ambiguous = True
    with pytest.raises(TimeoutError):
        learner.flush()  # it did land
    learner.observe_recovery("db", 2.0)
    learner.flush()
    assert store.load()["delays"]["db"] == [0.5, 1.0, 2.0]


def test_a_save_that_raised_and_did_not_land_is_owed_again_after_another_replica_saved():
    store, clock = InterruptedStore(), FakeClock()
    other = StrategyLearner(clock=clock, store=store, delay_samples=8)
    other.observe_recovery("db", 0.5)
    other.flush()
    learner = StrategyLearner(clock=clock, store=store, delay_samples=8)
    learner.observe_recovery("db", 1.0)
    store.during = lambda: None  # the save raises before storing anything
    with pytest.raises(ConnectionError):
        learner.flush()
    other.observe_recovery("db", 0.75)
    other.flush()  # the store's snapshot moves on meanwhile
    learner.flush()
    assert sorted(store.load()["delays"]["db"]) == [0.5, 0.75, 1.0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("stored_before", [False, True])
def test_a_forked_worker_never_saves_what_its_parent_still_owes(tmp_path, stored_before):
    """A pre-fork server: the parent learned 10 outcomes and 10 recovery times it had not
    saved, then forked. The child's copy of its state holds them too; saving it for a
    context the store lacked, the child wrote them, and the parent's own save added them
    again: 21 where 11 were learned."""
    url = f"sqlite:///{tmp_path / 'learner.db'}"
    key = DecisionKey("svc", "fp", "transient")

    def learner() -> StrategyLearner:
        return StrategyLearner(
            store=CheckpointLearnerStore(url, name="f"),
            half_life=float("inf"), max_weight=float("inf"), save_interval=float("inf"),
        )  # fmt: skip

    parent = learner()
    if stored_before:  # the store already holds another context: the snapshot is not empty
        parent.observe(DecisionKey("other", "fp", "transient"), "retry", success=True,
                       retries=1, recovery_time=0.1)  # fmt: skip
        parent.flush()
    for _ in range(10):
        parent.observe(key, "retry", success=True, retries=1, recovery_time=0.1)
        parent.observe_recovery("svc", 0.5)
    child = os.fork()
    if child == 0:  # the worker: learn one more of each, save, and leave
        try:
            parent.observe(key, "retry", success=True, retries=1, recovery_time=0.1)
            parent.observe_recovery("svc", 0.5)
            parent.flush()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    parent.flush()
    snapshot = CheckpointLearnerStore(url, name="f").load()
    assert snapshot is not None
    weights = [
        arm[0]
        for context in snapshot["contexts"]
        if context["scope"] == "svc" and context["key"] == "fingerprint:fp"
        for arm in context["arms"].values()
    ]
    assert weights == [11.0]
    assert len(snapshot["delays"]["svc"]) == 11
