"""Django's ORM (``django.db.backends.postgresql`` on psycopg 3) over our psycopg layer.

Django talks to psycopg through ``psycopg.connect`` (or ``psycopg_pool`` with
``OPTIONS["pool"]``) and its own cursor classes, subclasses of ``psycopg.ClientCursor`` whose
``execute`` is the patched ``Cursor.execute``. What it does with an error depends on the
error's type: ``DatabaseErrorWrapper`` turns any ``psycopg.Error`` into the
``django.db.utils`` class of the same name (``OperationalError`` for a lost connection, a
statement timeout, a refused server, and our open circuit, a ``psycopg.OperationalError``),
sets ``errors_occurred``, and at the end of the request ``close_if_unusable_or_obsolete``
runs ``is_usable()`` (``SELECT 1``) to decide whether a persistent connection
(``CONN_MAX_AGE > 0``) is kept. ``CONN_HEALTH_CHECKS`` runs that same check before the first
query of a request and reconnects without telling the app. ``transaction.atomic`` sends
``SAVEPOINT`` / ``RELEASE SAVEPOINT`` / ``ROLLBACK TO SAVEPOINT`` through ``Cursor.execute``
(patched) and the outer ``COMMIT`` / ``ROLLBACK`` through ``Connection.commit`` /
``rollback`` (not patched). Server-side cursors (``QuerySet.iterator()``) declare and fetch
without ``Cursor.execute``.

So our layer must hand Django psycopg's exceptions unchanged (so it maps them, and keeps or
drops connections, as without us), never send a statement twice, only add connect attempts
where nothing has run, and leave Django's transaction bookkeeping able to recover. Every
test drives request boundaries with ``request_started`` / ``request_finished`` as Django's
handlers do, counts calls beneath our layer (``h.calls``), TCP connections (``PgFront``)
and rows, and compares with the uninstrumented baseline (``none``) where that helps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, IntegrityError, OperationalError, connections, transaction
from django.db.models import F
from django.db.models.expressions import RawSQL
from instrumentors.test_psycopg import TERMINATED, assert_connect_recovered, events
from opentelemetry.sdk.trace import ReadableSpan
from ours import marked_by_us
from psycopg_pool import PoolTimeout
from servers import (
    PG_PORT,
    PgFront,
    eventually,
    free_port,
    kill_idle,
    pg_admin,
    quiet,
    terminate_when_running,
)

from integrations.django_project import (
    TABLE,
    Item,
    add_alias,
    create_table,
    drop_table,
    remove_alias,
    request,
)
from integrations.sync_pg import ORDERS, SyncHarness, assert_not_retried
from otel_recovery.instrumentors.psycopg import PsycopgCircuitOpenError

pytestmark = pytest.mark.server

SLEEP = "(SELECT {} FROM pg_sleep(5))"
"""A value that keeps the statement running until ``terminate_when_running`` kills it."""


class DjangoHarness(SyncHarness):
    """The psycopg harness, plus Django aliases it closes before uninstrumenting."""

    def __init__(self) -> None:
        super().__init__()
        self.aliases: list[str] = []

    def alias(self, port: int = PG_PORT, **settings_dict: Any) -> str:
        alias = add_alias(port, **settings_dict)
        self.aliases.append(alias)
        return alias

    def pooled(self, port: int = PG_PORT, **pool: Any) -> str:
        """An alias on Django's native pool (psycopg_pool) of one connection."""
        options = {"min_size": 1, "max_size": 1, "timeout": 10, **pool}
        return self.alias(port, OPTIONS={"pool": options})

    def breaker(self, port: int = PG_PORT) -> Any:
        assert self.ours.targets is not None
        (breaker,) = [b for b in self.ours.targets.breakers() if b.name.endswith(f":{port}")]
        return breaker

    def close(self) -> None:
        """Every step runs whatever an earlier one raised (the first error is raised after):
        an alias that fails to close must not leave psycopg instrumented, nor our health-check
        guard registered, for the rest of the session."""
        with contextlib.ExitStack() as steps:
            steps.callback(super().close)  # last: uninstrument, restore, close the fronts
            for alias in self.aliases:
                steps.callback(remove_alias, alias)
            self.aliases = []


@pytest.fixture
def h() -> Iterator[DjangoHarness]:
    create_table()
    try:
        harness = DjangoHarness()
        try:
            yield harness
        finally:
            harness.close()
    finally:
        drop_table()


def items(alias: str) -> Any:
    return Item.objects.using(alias)


def pid(alias: str) -> int:
    backend: int = connections[alias].connection.info.backend_pid
    return backend


def warm(alias: str) -> int:
    """One request that opens the alias's connection; returns its backend pid."""
    with request():
        assert items(alias).count() >= 0
        return pid(alias)


def values() -> list[int]:
    """What the table holds, read past Django and every instrumentation."""
    with quiet(), pg_admin() as admin:
        return [row[0] for row in admin.execute(f"SELECT v FROM {TABLE} ORDER BY v")]


def gave_up(h: DjangoHarness) -> ReadableSpan:
    """The one span that records a failure of ours (contrib's, or our ``recover`` span)."""
    (span,) = [s for s in h.exporter.get_finished_spans() if events(s, "otel_recovery.give_up")]
    assert span.name.startswith("recover psycopg") is not h.contrib
    return span


def error_type(error: type[BaseException]) -> str:
    return f"{error.__module__}.{error.__qualname__}"


def assert_one_span_per_statement(h: DjangoHarness) -> None:
    """With contrib, every statement sent is one contrib span and we add none of our own."""
    spans = h.exporter.get_finished_spans()
    assert not [s for s in spans if s.name.startswith("recover")]
    assert len(spans) == h.calls["execute"]


# -- persistent connections whose backend was killed while idle ----------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_health_checks_replace_a_killed_persistent_connection_unseen(
    h: DjangoHarness, order: str
) -> None:
    """CONN_HEALTH_CHECKS: the request's first query runs ``is_usable()`` on the dead
    backend; the ``SELECT 1`` fails once (not retried: Django's check must see the failure),
    Django reconnects once and the app's query runs: three statements, one connect, no
    error, exactly as without us. The following request reuses the new connection."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
    old = warm(alias)
    kill_idle(old)
    h.reset()
    with request():
        items(alias).create(v=1)
        new = pid(alias)
    assert new != old and values() == [1]
    assert h.calls["connect"] == 1 and h.calls["execute"] == 2  # failed check, INSERT
    if order != "none":
        failed = assert_not_retried(gave_up(h), contrib=h.contrib)
        assert failed["error.type"] == error_type(TERMINATED)
        assert h.breaker_failures(PG_PORT) == 1
    h.reset()
    with request():
        assert items(alias).count() == 1 and pid(alias) == new
    assert h.calls["connect"] == 0 and h.calls["execute"] == 2  # check, SELECT


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_without_health_checks_the_first_query_fails_once_and_the_next_request_reconnects(
    h: DjangoHarness, order: str
) -> None:
    """Without health checks the app's query meets the dead backend: it gets Django's
    OperationalError caused by psycopg's own exception, the query sent once; at the end of
    the request Django finds the connection unusable and drops it; the next request
    connects once and works."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    old = warm(alias)
    kill_idle(old)
    h.reset()
    with pytest.raises(OperationalError) as caught, request():
        items(alias).create(v=1)
    assert type(caught.value.__cause__) is TERMINATED
    assert "terminating connection due to administrator command" in str(caught.value)
    assert h.calls["execute"] == 1 and h.calls["connect"] == 0
    assert connections[alias].connection is None  # Django let it go at request_finished
    assert values() == []
    if order != "none":
        failed = assert_not_retried(gave_up(h), contrib=h.contrib)
        assert failed["error.type"] == error_type(TERMINATED)
    h.reset()
    with request():
        items(alias).create(v=2)
        assert pid(alias) != old
    assert h.calls["connect"] == 1 and h.calls["execute"] == 1 and values() == [2]


# -- servers that refuse connections -------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_a_refused_server_that_starts_listening_is_recovered_by_our_connect_retry(
    h: DjangoHarness, order: str
) -> None:
    """Django's connect meets a refused port that listens from the second attempt on: the
    first query of the request succeeds with two connects and one TCP connection."""
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    alias = h.alias(port)
    with request():
        items(alias).create(v=1)
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1
    assert h.calls["execute"] == 1 and values() == [1]
    failed = assert_connect_recovered(h, port, attempts=2)
    assert "Connection refused" in failed["otel_recovery.error.message"]


def test_a_server_starting_up_is_retried_until_it_accepts(h: DjangoHarness) -> None:
    """57P03 for the first two connections: three connects, three TCP connections."""
    h.instrument()
    front = PgFront(starting_up=2)
    h.fronts.append(front)
    alias = h.alias(front.port)
    with request():
        assert items(alias).count() == 0
    assert h.calls["connect"] == 3 and front.accepted == 3
    failed = assert_connect_recovered(h, front.port, attempts=3)
    assert "starting up" in failed["otel_recovery.error.message"]


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_a_server_that_stays_down_fails_after_exact_attempts_as_djangos_error(
    h: DjangoHarness, order: str
) -> None:
    """A port that stays refused: exactly max_attempts connects (one without us), then the
    app gets Django's OperationalError (a DatabaseError) caused by psycopg's. Django adds
    no attempt of its own. Once the server listens, the next request connects once."""
    h.instrument(order, max_attempts=3)
    port = free_port()
    alias = h.alias(port)
    with pytest.raises(DatabaseError) as caught, request():
        items(alias).count()
    assert type(caught.value) is OperationalError
    assert type(caught.value.__cause__) is psycopg.OperationalError
    assert "refused" in str(caught.value)
    assert h.calls["connect"] == (1 if order == "none" else 3)
    if order != "none":
        (span,) = h.spans(f"recover psycopg 127.0.0.1:{port}")
        assert dict(span.attributes or {})["otel_recovery.outcome"] == "failure"
    h.fronts.append(PgFront(port))
    h.reset()
    with request():
        assert items(alias).count() == 0
    assert h.calls["connect"] == 1 and h.fronts[0].accepted == 1


# -- an open circuit -----------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_an_open_circuit_is_djangos_operational_error_and_the_connection_stays_usable(
    h: DjangoHarness, order: str
) -> None:
    """A rejected statement reaches the app as ``django.db.OperationalError`` (an
    ``except DatabaseError`` catches it), nothing sent; once the circuit closes, the same
    persistent connection serves the same request and the next one (the end-of-request
    ``is_usable`` check passes), with no reconnect."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    backend = warm(alias)
    breaker = h.breaker()
    breaker.force_open()
    h.reset()
    with request():
        with pytest.raises(DatabaseError) as caught:
            items(alias).create(v=1)
        assert type(caught.value) is OperationalError
        assert isinstance(caught.value.__cause__, PsycopgCircuitOpenError)
        assert h.calls["execute"] == 0
        breaker.reset()
        items(alias).create(v=2)
        assert pid(alias) == backend
    assert values() == [2]
    assert h.calls["execute"] == 2  # the INSERT, the end-of-request is_usable check
    (rejected,) = [s for s in marked_by_us(h.exporter.get_finished_spans()) if s.events]
    assert [e.name for e in rejected.events if e.name.startswith("otel_recovery")] == [
        "otel_recovery.rejected"
    ]
    h.reset()
    with request():
        assert items(alias).count() == 1 and pid(alias) == backend
    assert h.calls["connect"] == 0


@pytest.mark.parametrize("health_checks", [False, True])
def test_a_circuit_still_open_at_a_health_check_keeps_the_healthy_connection(
    h: DjangoHarness, health_checks: bool
) -> None:
    """Django's ``is_usable()`` (``SELECT 1``: at the end of a request that had an error,
    and before its first query with CONN_HEALTH_CHECKS) is answered "usable" while the
    circuit refuses calls, not sent (see ``_health_checks``): Django keeps the healthy
    persistent connection instead of closing it and reconnecting; the app's statements fail
    fast with Django's OperationalError; after the circuit closes the same backend serves
    the next request with no connect."""
    h.instrument()
    alias = h.alias(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=health_checks)
    backend = warm(alias)
    breaker = h.breaker()
    breaker.force_open()
    h.reset()
    for _ in range(2):  # the second request starts with a health check if enabled
        with pytest.raises(OperationalError) as caught, request():
            items(alias).create(v=1)
        assert isinstance(caught.value.__cause__, PsycopgCircuitOpenError)
        assert connections[alias].connection is not None
    assert not h.calls
    breaker.reset()
    with request():
        items(alias).create(v=2)
        assert pid(alias) == backend
    assert h.calls["connect"] == 0 and values() == [2]


@pytest.mark.parametrize("order", ORDERS)
def test_a_rejected_statement_inside_atomic_rolls_back_and_the_next_atomic_works(
    h: DjangoHarness, order: str
) -> None:
    """The circuit opens between two INSERTs of an ``atomic`` block: the second is
    rejected, Django rolls the first back (``Connection.rollback``, not a statement of
    ours), the table is empty; after the circuit closes the next ``atomic`` on the same
    connection commits once."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    backend = warm(alias)
    breaker = h.breaker()
    h.reset()
    with request():
        with pytest.raises(OperationalError), transaction.atomic(using=alias):
            items(alias).create(v=1)
            breaker.force_open()
            items(alias).create(v=2)
        assert values() == [] and h.calls["execute"] == 1
        breaker.reset()
        with transaction.atomic(using=alias):
            items(alias).create(v=3)
        assert pid(alias) == backend
    assert values() == [3]
    assert h.calls["execute"] == 2  # INSERT 1, INSERT 3; INSERT 2 never sent
    assert h.calls["connect"] == 0  # atomic's rollback cleared errors_occurred: no check


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
@pytest.mark.parametrize("inner", ["integrity_error", "circuit_open", "circuit_opens_in_block"])
def test_a_handled_failure_in_a_nested_atomic_keeps_the_outer_transaction(
    h: DjangoHarness, order: str, inner: str
) -> None:
    """Django's documented pattern: ``try: with atomic(): ... except DatabaseError:``
    inside an outer ``atomic``. Django undoes the inner block with ``ROLLBACK TO
    SAVEPOINT`` (or ends it with ``RELEASE SAVEPOINT``) and the outer transaction goes on
    to commit. When the inner failure is a server's answer (``integrity_error``, the
    baseline) that is what happens. When the inner statement is rejected by an open circuit
    (or the circuit opens before the inner block ends), the savepoint statement must still
    reach the server: if it is rejected too, Django marks the outer block for rollback and
    discards the outer INSERT at its exit *without raising anything*, while the app reports
    success (the outer COMMIT/ROLLBACK bypasses ``Cursor.execute`` and is never rejected)."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    warm(alias)
    breaker = h.breaker()
    with request():
        first = items(alias).create(v=1)
    h.reset()
    handled: list[type[BaseException]] = []
    with request():
        with transaction.atomic(using=alias):
            items(alias).create(v=10)  # the outer work
            try:
                with transaction.atomic(using=alias):
                    if inner == "integrity_error":
                        Item(id=first.id, v=11).save(using=alias, force_insert=True)
                    elif inner == "circuit_open":
                        breaker.force_open()
                        items(alias).create(v=11)
                    else:
                        items(alias).create(v=11)
                        breaker.force_open()
            except (IntegrityError, OperationalError) as error:
                handled.append(type(error))
        breaker.reset()
    if inner == "circuit_opens_in_block":  # the inner block's work was done before
        assert (handled, values()) == ([], [1, 10, 11])
    else:
        expected = IntegrityError if inner == "integrity_error" else OperationalError
        assert (handled, values()) == ([expected], [1, 10])


# -- statements killed mid-flight ----------------------------------------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_an_insert_killed_mid_statement_outside_atomic_is_sent_once_and_not_applied(
    h: DjangoHarness, order: str
) -> None:
    """``create()`` in autocommit, its backend terminated while the INSERT runs: Django's
    OperationalError caused by psycopg's, one INSERT sent, no row; Django drops the
    connection at the end of the request and the next request reconnects once."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    backend = warm(alias)
    h.reset()
    killer = terminate_when_running(backend, "pg_sleep")
    with pytest.raises(OperationalError) as caught, request():
        items(alias).create(v=RawSQL(SLEEP.format(7), []))
    killer.join()
    assert type(caught.value.__cause__) is TERMINATED
    assert h.calls["execute"] == 1 and values() == []
    if order != "none":
        failed = assert_not_retried(gave_up(h), contrib=h.contrib)
        assert failed["otel_recovery.error.retryable"] is True  # transient, never repeated
    h.reset()
    with request():
        items(alias).create(v=8)
    assert h.calls["connect"] == 1 and values() == [8]


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_a_bulk_create_killed_inside_atomic_rolls_everything_back(
    h: DjangoHarness, order: str
) -> None:
    """``create`` then ``bulk_create`` in one ``atomic``; the backend dies during the bulk
    INSERT. Nothing of the block is in the table, each statement was sent once (one contrib
    span each); Django's exit from the outermost ``atomic`` restores autocommit, which
    reconnects (once, as without us), so the next request's ``atomic`` simply works."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    backend = warm(alias)
    h.reset()
    killer = terminate_when_running(backend, "pg_sleep")
    with pytest.raises(OperationalError) as caught, request(), transaction.atomic(using=alias):
        items(alias).create(v=1)
        items(alias).bulk_create([Item(v=2), Item(v=RawSQL(SLEEP.format(3), []))])
    killer.join()
    assert type(caught.value.__cause__) is TERMINATED
    assert h.calls["execute"] == 2 and h.calls["connect"] == 1 and values() == []
    if order != "none":
        failed = assert_not_retried(gave_up(h), contrib=h.contrib)
        assert failed["error.type"] == error_type(TERMINATED)
    if h.contrib:
        assert_one_span_per_statement(h)
    h.reset()
    with request(), transaction.atomic(using=alias):
        items(alias).bulk_create([Item(v=4), Item(v=5)])
        assert pid(alias) != backend
    assert h.calls["connect"] == 0 and h.calls["execute"] == 1 and values() == [4, 5]


@pytest.mark.parametrize("order", ORDERS)
def test_an_increment_killed_inside_atomic_is_never_applied_twice(
    h: DjangoHarness, order: str
) -> None:
    """``update(v=F("v") + 1)`` twice in one ``atomic``, the backend killed during the
    second: both are rolled back (v stays 0). A committed increment whose connection
    then dies (``UPDATE; COMMIT; pg_terminate_backend`` through Django's cursor) is applied
    exactly once: a repeated statement would make it 2."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    with request():
        items(alias).create(v=0)
        backend = pid(alias)
    h.reset()
    killer = terminate_when_running(backend, "pg_sleep")
    with pytest.raises(OperationalError), request(), transaction.atomic(using=alias):
        items(alias).update(v=F("v") + 1)
        items(alias).update(v=F("v") + RawSQL(SLEEP.format(1), []))
    killer.join()
    assert values() == [0] and h.calls["execute"] == 2
    assert_not_retried(gave_up(h), contrib=h.contrib)

    h.reset()
    with pytest.raises(OperationalError) as caught, request():
        with connections[alias].cursor() as cursor:
            cursor.execute(
                f"UPDATE {TABLE} SET v = v + 1; COMMIT; "
                "SELECT pg_terminate_backend(pg_backend_pid())"
            )
    assert type(caught.value.__cause__) is TERMINATED
    assert h.calls["execute"] == 1 and values() == [1]


# -- statement_timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_statement_timeout_is_djangos_operational_error_and_not_retried(
    h: DjangoHarness, order: str
) -> None:
    """``-c statement_timeout=500`` in OPTIONS: the slow INSERT inside ``atomic`` is
    cancelled (QueryCanceled, wrapped by Django as OperationalError), sent once, the block
    rolled back; the connection is healthy, so the same backend serves the next ``atomic``
    and, after the end-of-request check, the next request. (The limit applies to every
    statement of the session: 500 ms leaves the quick ones room on a loaded machine.)"""
    h.instrument(order)
    alias = h.alias(options="-c statement_timeout=500", CONN_MAX_AGE=60)
    backend = warm(alias)
    h.reset()
    with request():
        with pytest.raises(OperationalError) as caught, transaction.atomic(using=alias):
            items(alias).create(v=1)
            items(alias).create(v=RawSQL("(SELECT 2 FROM pg_sleep(3))", []))
        assert type(caught.value.__cause__) is psycopg.errors.QueryCanceled
        with transaction.atomic(using=alias):
            items(alias).create(v=3)
    assert values() == [3] and h.calls["execute"] == 3  # no is_usable: rollback worked
    assert h.calls["connect"] == 0
    failed = assert_not_retried(gave_up(h), contrib=h.contrib)
    assert failed["otel_recovery.error.code"] == "57014"
    assert warm(alias) == backend


# -- Django's native pool (psycopg_pool) ---------------------------------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_pool_with_health_checks_replaces_a_killed_idle_connection_unseen(
    h: DjangoHarness, order: str
) -> None:
    """CONN_HEALTH_CHECKS with a pool: the pool's ``check_connection`` (``execute("")``)
    meets the dead backend once, the pool replaces it, the app sees no error: one connect,
    failed check + check + SELECT, as without us."""
    h.instrument(order)
    alias = h.alias(CONN_HEALTH_CHECKS=True, OPTIONS={"pool": {"min_size": 1, "max_size": 1}})
    old = warm(alias)
    kill_idle(old)
    h.reset()
    with request():
        assert items(alias).count() == 0
        assert pid(alias) != old
    assert h.calls["connect"] == 1 and h.calls["execute"] == 3
    assert connections[alias].pool.get_stats()["connections_lost"] == 1
    if order != "none":
        assert_not_retried(gave_up(h), contrib=h.contrib)


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_pool_without_checks_fails_the_first_query_once_then_serves_a_new_connection(
    h: DjangoHarness, order: str
) -> None:
    """Without checks the app's query meets the dead pooled backend: Django's
    OperationalError, sent once; the pool discards the connection when Django returns it
    and its worker connects again, once."""
    h.instrument(order)
    alias = h.pooled()
    old = warm(alias)
    kill_idle(old)
    h.reset()
    with pytest.raises(OperationalError) as caught, request():
        items(alias).count()
    assert type(caught.value.__cause__) is TERMINATED
    assert h.calls["execute"] == 1
    with request():
        assert items(alias).count() == 0 and pid(alias) != old
    assert h.calls["connect"] == 1 and h.calls["execute"] == 2
    assert connections[alias].pool.get_stats()["returns_bad"] == 1


@pytest.mark.parametrize("order", ORDERS)
def test_pool_worker_connects_through_our_retry_to_a_refused_server(
    h: DjangoHarness, order: str
) -> None:
    """The pool's worker meets a refused port that listens from the second attempt: our
    retry connects inside the worker, the pool records no error, the request works."""
    h.instrument(order)
    port = free_port()
    h.listen_on_second_attempt(port)
    alias = h.pooled(port)
    with request():
        items(alias).create(v=1)
    assert h.calls["connect"] == 2 and h.fronts[0].accepted == 1 and values() == [1]
    assert "connections_errors" not in connections[alias].pool.get_stats()
    assert_connect_recovered(h, port, attempts=2)


@pytest.mark.parametrize("order", ["none", "ours_only", "contrib_first"])
def test_pool_to_a_server_that_stays_down_times_out_as_djangos_error(
    h: DjangoHarness, order: str
) -> None:
    """The pool's first connect attempt is max_attempts connects of ours (one without us),
    then the pool waits about a second before its own next attempt; the request's
    ``getconn`` times out first: Django's OperationalError caused by the pool's
    PoolTimeout (a psycopg.OperationalError)."""
    h.instrument(order, max_attempts=3)
    alias = h.pooled(free_port(), timeout=0.5)
    with pytest.raises(OperationalError) as caught, request():
        items(alias).count()
    assert isinstance(caught.value.__cause__, PoolTimeout)
    expected = 1 if order == "none" else 3
    # the pool's worker thread may still be between our attempts when getconn gives up
    assert eventually(lambda: h.calls["connect"] >= expected), h.calls
    assert h.calls["connect"] == expected


@pytest.mark.parametrize("health_checks", [False, True])
def test_pool_keeps_its_connection_through_an_open_circuit(
    h: DjangoHarness, health_checks: bool
) -> None:
    """An open circuit with Django's pool: the app's statement fails fast with Django's
    OperationalError (no wait for the pool's timeout, nothing sent); the pool's check, if
    any, is answered healthy rather than sent, so the pool neither discards the good
    connection nor asks for a new one; after the circuit closes the same backend serves."""
    h.instrument()
    alias = h.alias(
        CONN_HEALTH_CHECKS=health_checks,
        OPTIONS={"pool": {"min_size": 1, "max_size": 1, "timeout": 5}},
    )
    backend = warm(alias)
    breaker = h.breaker()
    breaker.force_open()
    h.reset()
    with pytest.raises(OperationalError) as caught, request():
        items(alias).create(v=1)
    assert isinstance(caught.value.__cause__, PsycopgCircuitOpenError)  # not a PoolTimeout
    assert not h.calls
    breaker.reset()
    with request():
        items(alias).create(v=2)
        assert pid(alias) == backend
    assert h.calls["connect"] == 0 and values() == [2]
    stats = connections[alias].pool.get_stats()
    assert "connections_lost" not in stats and "returns_bad" not in stats


# -- server-side cursors -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["none", *ORDERS])
def test_server_side_cursor_fails_between_fetches_as_without_us(
    h: DjangoHarness, order: str
) -> None:
    """``QuerySet.iterator()`` declares a named cursor (``ServerCursor.execute``, patched
    on its own: one call counted) and fetches from it with ``FETCH``, which no layer sees
    (contrib does not trace named cursors). A backend killed between two fetches fails the
    next fetch exactly as without us: Django's OperationalError caused by psycopg's, three
    rows delivered, no reconnect in the request, no span; the next request reconnects
    once."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    with request():
        items(alias).bulk_create([Item(v=i) for i in range(10)])
        backend = pid(alias)
    h.reset()
    seen: list[int] = []
    with pytest.raises(OperationalError) as caught, request():
        for v in items(alias).order_by("v").values_list("v", flat=True).iterator(chunk_size=3):
            seen.append(v)
            if v == 0:
                kill_idle(backend)
    assert seen == [0, 1, 2]
    assert type(caught.value.__cause__) is TERMINATED
    assert h.calls == {"execute": 1} and not h.exporter.get_finished_spans()
    with request():
        assert items(alias).count() == 10
    assert h.calls["connect"] == 1


# -- spans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first"])
def test_one_contrib_span_per_statement_and_nothing_of_ours_on_success(
    h: DjangoHarness, order: str
) -> None:
    """A request that creates, updates, counts and runs an ``atomic`` with a savepoint:
    each statement is exactly one contrib span, none carries anything of ours."""
    h.instrument(order)
    alias = h.alias(CONN_MAX_AGE=60)
    warm(alias)
    h.reset()
    with request(), transaction.atomic(using=alias):
        items(alias).create(v=1)
        with transaction.atomic(using=alias):
            items(alias).update(v=F("v") + 1)
        assert items(alias).count() == 1
    assert values() == [2]
    assert_one_span_per_statement(h)
    assert h.calls["execute"] == 5  # INSERT, SAVEPOINT, UPDATE, RELEASE, COUNT
    assert not marked_by_us(h.exporter.get_finished_spans())
