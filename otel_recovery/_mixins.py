"""Classes put together from slot-less mixins, without the mixins' typing in ``help()``.

``CircuitBreaker``, ``StrategyLearner``, ``AnomalySpanProcessor``, ``RedisStore``, the
engine's ``PolicyCore`` and the fleet-wide stores' ``Link`` take parts from mixins, one
module per concern, each with ``__slots__ = ()``. A mixin types ``self`` with a Protocol of
the attributes it uses, and may declare at class level an attribute whose type mypy must
know, so that mypy checks its methods against the class they end up in. At run time those
annotations only clutter ``help()`` (``snapshot(self: '_Viewed')``, ``__annotations__ =
{}``): :func:`plain_self` drops them, once, when the class is defined. ``help()`` still
names the mixins in the class's MRO and groups their methods under them.
"""

from __future__ import annotations

__all__ = ["plain_self"]


def _is_our_mixin(base: type) -> bool:
    return base.__module__.startswith("otel_recovery.") and vars(base).get("__slots__") == ()


def plain_self(cls: type) -> None:
    """Drop the ``self`` annotation of every function, property accessor, staticmethod and
    classmethod ``cls`` takes from otel-recovery's slot-less mixins, and the mixins' own
    class-level annotations. Other bases (another library's, or a base with state of its
    own) are left alone."""
    for mixin in filter(_is_our_mixin, cls.__mro__[1:]):
        for member in vars(mixin).values():
            if isinstance(member, property):
                parts: tuple[object, ...] = (member.fget, member.fset, member.fdel)
            elif isinstance(member, (staticmethod, classmethod)):
                parts = (member.__func__,)
            else:
                parts = (member,)
            for part in parts:
                annotations = getattr(part, "__annotations__", None)
                if isinstance(annotations, dict):
                    annotations.pop("self", None)
        if "__annotations__" in vars(mixin):
            delattr(mixin, "__annotations__")
