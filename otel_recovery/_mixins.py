"""Classes put together from mixins, shown by ``help()`` as the one class they are.

``CircuitBreaker``, ``StrategyLearner`` and ``AnomalySpanProcessor`` take their parts from
mixins, one module per concern. Each mixin types ``self`` with a Protocol of the attributes
it uses, so that mypy checks its methods against the class they end up in; at run time those
annotations only clutter ``help()`` (``snapshot(self: '_Viewed')``). :func:`plain_self`
drops them, once, when the class is defined.
"""

from __future__ import annotations

__all__ = ["plain_self"]


def plain_self(cls: type) -> None:
    """Drop the ``self`` annotation from the methods and properties ``cls`` takes from
    otel-recovery's own mixins (a base class of another library is left alone)."""
    for mixin in cls.__mro__[1:]:
        if not mixin.__module__.startswith("otel_recovery."):
            continue
        for member in vars(mixin).values():
            parts = (member.fget, member.fset) if isinstance(member, property) else (member,)
            for part in parts:
                annotations = getattr(part, "__annotations__", None)
                if isinstance(annotations, dict):
                    annotations.pop("self", None)
