"""The classes put together from slot-less mixins, without the mixins' typing at run time."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc
import typing

import pytest

import otel_recovery
from otel_recovery import CircuitBreaker, Rule
from otel_recovery.learning import StrategyLearner
from otel_recovery.learning.anomaly import AnomalySpanProcessor, DetectorConfig


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (CircuitBreaker, "snapshot(self)"),
        (StrategyLearner, "record_call(self, service: 'str', calls: 'int' = 1)"),
        (AnomalySpanProcessor, "force_flush(self, timeout_millis: 'int' = 30000)"),
    ],
)
def test_help_shows_methods_without_the_mixins_typing(cls: type, method: str) -> None:
    """Each mixin types ``self`` with a Protocol of what it uses, for mypy; ``help()``
    showed it (``snapshot(self: '_Viewed')``), and a mixin's class-level annotation as
    ``__annotations__ = {}``."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert method in text
    assert "self: " not in text
    assert "__annotations__" not in text


def _package_classes() -> list[type]:
    classes: dict[str, type] = {}
    for module_info in pkgutil.walk_packages(otel_recovery.__path__, "otel_recovery."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__.startswith("otel_recovery"):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    return list(classes.values())


def test_no_method_of_any_class_keeps_a_self_annotation() -> None:
    """Every class of the package that takes methods from a slot-less mixin goes through
    ``plain_self``: a method seen from any class has no ``self`` annotation (a mixin left
    out, or a new one, fails here)."""
    typed = []
    for cls in _package_classes():
        for name in dir(cls):
            member = inspect.getattr_static(cls, name)
            if isinstance(member, property):
                member = member.fget
            if not str(getattr(member, "__module__", "")).startswith("otel_recovery"):
                continue  # another library's (redis-py annotates self in places)
            annotations = getattr(member, "__annotations__", None)
            if isinstance(annotations, dict) and "self" in annotations:
                typed.append(f"{cls.__qualname__}.{name}")
    assert not typed


@pytest.mark.parametrize("cls", [Rule, DetectorConfig])
def test_moved_public_classes_resolve_their_type_hints(cls: type) -> None:
    """Defined in a private module but named after their public one (``__module__``), their
    string annotations are resolved in the public module: what they name must be there."""
    assert typing.get_type_hints(cls)
