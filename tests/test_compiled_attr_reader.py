"""How the compiled layer reads the attribute that holds a call's plans (and, for asyncpg,
the attribute its key is): by the slot's offset, or as the instance's type, where getattr's
answer is known to be that (``_speedups_src/attr_reader.c``).

What must never change is the answer: whatever getattr would say now, after a slot is
reassigned or emptied, a property or ``__getattribute__`` is put on the class or a base, the
instance changes class, or a subclass shadows the slot. Each test first lets the layer learn
the fast way, then changes what getattr answers, and checks which table served the call."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from compiled_layers import CountingLayer

from otel_recovery._compiled import SPEEDUPS
from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.recover import RecoveryPolicy

pytestmark = pytest.mark.skipif(SPEEDUPS is None, reason="otel_recovery._speedups not built")

TOKEN = object()


class Pool:
    """A holder, with one table whose single plan has its own breaker."""

    def __init__(self, key: object = "GET") -> None:
        clock = FakeClock()
        self.breaker = CircuitBreaker(3, timeout=10.0, clock=clock, store="memory://")
        policy = RecoveryPolicy(breaker=self.breaker, clock=clock, telemetry=False)
        plan = (policy, "own", policy.runner())
        self.table = SPEEDUPS.PlanTable(TOKEN, {key: plan})  # type: ignore[union-attr]

    @property
    def served(self) -> int:
        """How many calls this pool's plan ran."""
        return self.breaker.snapshot().successful_calls


class Layer(CountingLayer):
    """A counting compiled Layer under this module's token."""

    def __init__(self, **given: Any) -> None:
        super().__init__(TOKEN, **given)


def _slotted_client_class() -> type:
    """A fresh class per test: tests change classes, and must not change each other's."""

    class Client:
        __slots__ = ("pool",)

        def __init__(self, pool: Pool) -> None:
            self.pool = pool

    return Client


def test_a_slot_reassigned_between_calls_is_read_as_it_is_now():
    first, second = Pool(), Pool()
    client = _slotted_client_class()(first)
    layer = Layer()
    layer(client)
    layer(client)
    client.pool = second
    layer(client)
    assert (first.served, second.served, layer.slow_calls) == (2, 1, 0)


def test_an_emptied_slot_sends_the_call_to_python_which_meets_the_same_error():
    pool = Pool()
    client = _slotted_client_class()(pool)
    layer = Layer()
    layer(client)
    del client.pool
    assert layer(client) == "GET"  # served by the Python layer (here: the original)
    assert (pool.served, layer.slow_calls) == (1, 1)
    client.pool = pool
    layer(client)
    assert (pool.served, layer.slow_calls) == (2, 1)


def test_a_property_put_on_the_class_after_learning_answers_from_then_on():
    slotted, elsewhere = Pool(), Pool()
    client_class = _slotted_client_class()
    client = client_class(slotted)
    layer = Layer()
    layer(client)
    slot = client_class.pool
    client_class.pool = property(lambda self: elsewhere)
    layer(client)
    client_class.pool = slot  # the slot again: it still holds `slotted`
    layer(client)
    assert (slotted.served, elsewhere.served, layer.slow_calls) == (2, 1, 0)


def test_a_getattribute_put_on_a_base_after_learning_answers_from_then_on():
    class Base:
        __slots__ = ()

    class Client(Base):
        __slots__ = ("pool",)

    slotted, elsewhere = Pool(), Pool()
    client = Client()
    client.pool = slotted
    layer = Layer()
    layer(client)

    def redirect(self: object, name: str) -> object:
        return elsewhere if name == "pool" else object.__getattribute__(self, name)

    Base.__getattribute__ = redirect  # type: ignore[method-assign,assignment]
    layer(client)
    del Base.__getattribute__
    layer(client)
    assert (slotted.served, elsewhere.served, layer.slow_calls) == (2, 1, 0)


def test_a_subclass_that_shadows_the_slot_is_read_its_own_way():
    elsewhere = Pool()
    client_class = _slotted_client_class()

    class Shadowing(client_class):  # type: ignore[misc,valid-type]
        __slots__ = ()

        @property
        def pool(self) -> Pool:
            return elsewhere

    slotted = Pool()
    plain, shadowing = client_class(slotted), Shadowing.__new__(Shadowing)
    layer = Layer()
    for _ in range(2):
        layer(plain)
        layer(shadowing)
    assert (slotted.served, elsewhere.served, layer.slow_calls) == (2, 2, 0)


def test_an_instance_dict_attribute_is_read_by_getattr_and_follows_changes():
    class Client:
        def __init__(self, pool: Pool) -> None:
            self.pool = pool

    first, second = Pool(), Pool()
    client = Client(first)
    layer = Layer()
    layer(client)
    client.pool = second
    layer(client)
    assert (first.served, second.served, layer.slow_calls) == (1, 1, 0)


class _Connection:
    """Where asyncpg's layer finds its table: on the connection's class, keyed by an
    attribute of the connection (``_addr``), both read as attributes of the instance."""

    __slots__ = ("_addr",)


def _class_holder_layer() -> Layer:
    return Layer(holder_attr="__class__", key_attr="_addr", key_index=0)


def test_the_class_as_holder_follows_an_instance_that_changes_class():
    first, second = Pool(key=("db", 1)), Pool(key=("db", 1))

    class First(_Connection):
        __slots__ = ()
        table = first.table

    class Second(_Connection):
        __slots__ = ()
        table = second.table

    connection = First()
    connection._addr = ("db", 1)
    layer = _class_holder_layer()
    layer(connection)
    layer(connection)
    connection.__class__ = Second
    layer(connection)
    assert (first.served, second.served, layer.slow_calls) == (2, 1, 0)


def test_a_class_that_defines_class_itself_is_asked_what_it_is():
    """Mocks and proxies define ``__class__`` (a property) to pass for another class:
    getattr gives that answer, and so must the layer."""
    real, pretended = Pool(key=("db", 1)), Pool(key=("db", 1))

    class Pretended:
        table = pretended.table

    class Connection(_Connection):
        __slots__ = ()
        table = real.table

    class Proxy(Connection):
        __slots__ = ()
        __class__ = property(lambda self: Pretended)  # type: ignore[assignment]

    connection, proxy = Connection(), Proxy()
    connection._addr = proxy._addr = ("db", 1)
    layer = _class_holder_layer()
    for _ in range(2):
        layer(connection)
        layer(proxy)
    assert (real.served, pretended.served, layer.slow_calls) == (2, 2, 0)


def test_a_key_slot_reassigned_between_calls_selects_its_own_plan():
    pool = Pool(key=("db", 1))

    class Connection(_Connection):
        __slots__ = ()
        table = pool.table

    connection = Connection()
    connection._addr = ("db", 1)
    layer = _class_holder_layer()
    layer(connection)
    connection._addr = ("db", 2)  # no plan for it: Python decides
    layer(connection)
    connection._addr = ("db", 1)
    layer(connection)
    assert (pool.served, layer.slow_calls) == (2, 1)


def test_a_learned_class_is_released_with_the_layer():
    client_class = _slotted_client_class()
    layer = Layer()
    layer(client_class(Pool()))
    assert layer.slow_calls == 0
    learned = weakref.ref(client_class)
    del client_class
    gc.collect()
    assert learned() is not None  # the layer keeps the class it learned
    del layer
    gc.collect()
    assert learned() is None


def test_a_learned_class_is_reported_as_referred_to_by_the_layer():
    client_class = _slotted_client_class()
    layer = Layer()
    layer(client_class(Pool()))
    assert any(referrer is layer.layer for referrer in gc.get_referrers(client_class))


def test_two_classes_in_turn_are_each_served_and_each_change_is_obeyed():
    """A site serves every class that inherits it (psycopg's Cursor and ClientCursor); the
    reader keeps the last two, and checks the one it returns to as it checks the last."""
    first_pool, second_pool, elsewhere = Pool(), Pool(), Pool()
    first_class, second_class = _slotted_client_class(), _slotted_client_class()
    first, second = first_class(first_pool), second_class(second_pool)
    layer = Layer()
    for _ in range(3):
        layer(first)
        layer(second)
    first_class.pool = property(lambda self: elsewhere)
    layer(first)
    layer(second)
    assert (first_pool.served, second_pool.served, elsewhere.served) == (3, 4, 1)
    assert layer.slow_calls == 0


def test_a_class_changed_while_the_layer_learns_it_is_kept_alive_and_not_learned():
    """Learning looks the name up in class dicts, which can run Python code: a key whose
    hash collides with the name compares itself by ``__eq__``. Code there that moves the
    instance to another class, and frees the old one, must find the layer holding it, and
    the layer must not keep what it learned about a class the instance left."""

    class Slotted:
        __slots__ = ("pool",)

    class Other(Slotted):
        __slots__ = ()

    seen_alive: list[bool] = []
    armed = [False]

    class Colliding:
        def __hash__(self) -> int:
            return hash("pool")

        def __eq__(self, other: object) -> bool:
            if armed[0]:
                armed[0] = False
                client.__class__ = Other
                gc.collect()
                seen_alive.append(learned() is not None)
            return False

    learning = type("Learning", (Slotted,), {Colliding(): 1, "__slots__": ()})
    client = learning()
    pool = client.pool = Pool()
    learned = weakref.ref(learning)
    del learning
    layer = Layer()
    _ = client.pool  # CPython's method cache answers getattr: only the layer's lookups compare
    armed[0] = True
    layer(client)
    assert seen_alive == [True]
    for _ in range(3):
        layer(client)
    assert (type(client), pool.served, layer.slow_calls) == (Other, 4, 0)
