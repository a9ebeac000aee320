"""User rules: a user's override of the built-in classification, checked when it is made.

A :class:`Rule` pairs matchers (``on=`` exception classes, a ``when=`` predicate, a
``message=`` regex, HTTP ``status=`` values, error ``code=`` values) with the outcome fields
it overrides (category, severity, retryable, kind); a :class:`~otel_recovery.classify.Classifier`
applies the first rule whose every matcher holds. Kept apart from the classifier because a
rule is a value the user writes: everything that can be wrong with it is refused when it is
constructed, with a message that names the argument, not on the first failure it would
have classified. Public as ``otel_recovery.classify.Rule`` (its ``__module__``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from otel_recovery._error_vocabulary import ErrorCategory, ErrorKind, Severity, Verdict

__all__ = ["Rule"]

# A rule that changes the category also decides whether the failure is a dependency's.
_DEPENDENCY_CATEGORIES = frozenset(
    {ErrorCategory.TRANSIENT, ErrorCategory.RATE_LIMITED, ErrorCategory.EXTERNAL_SERVICE}
    | {ErrorCategory.CASCADING}
)


def _enum_field(cls: type[Any], name: str, value: object) -> Any:
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ValueError(
            f"Rule({name}=...) must be a {cls.__name__} or one of {accepted}, got {value!r}"
        ) from None


def _collection(
    name: str, value: object, item: type, check: Callable[[Any], bool]
) -> frozenset[Any]:
    items = (value,) if isinstance(value, item) else value
    if (isinstance(value, (str, bytes)) and item is not str) or not isinstance(items, Collection):
        raise TypeError(f"Rule({name}=...) must be a {item.__name__} or a collection of them")
    for one in items:
        if not isinstance(one, item) or isinstance(one, bool) or not check(one):
            raise ValueError(f"Rule({name}=...) holds an invalid value {one!r}")
    if not items:
        raise ValueError(f"Rule({name}=...) is empty; give at least one value or leave it None")
    return frozenset(one.upper() if isinstance(one, str) else one for one in items)


@dataclass(frozen=True)
class Rule:
    """A user override: when every given matcher matches, the given outcome fields win.

    Outcome fields left None keep the built-in answer, so ``Rule(on=MyError, retryable=False)``
    only stops retries and leaves category and severity to the built-in knowledge.
    """

    on: type[BaseException] | tuple[type[BaseException], ...] | None = None
    when: Callable[[BaseException], bool] | None = None
    message: str | re.Pattern[str] | None = None
    status: int | Collection[int] | None = None
    code: str | Collection[str] | None = None
    category: ErrorCategory | None = None
    severity: Severity | None = None
    retryable: bool | None = None
    kind: ErrorKind | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _statuses: frozenset[int] | None = field(default=None, init=False, repr=False, compare=False)
    _codes: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if all(m is None for m in (self.on, self.when, self.message, self.status, self.code)):
            raise ValueError(
                "Rule needs at least one matcher: on=, when=, message=, status= or code="
            )
        if all(o is None for o in (self.category, self.severity, self.retryable, self.kind)):
            raise ValueError("Rule sets no outcome: give category=, severity=, retryable= or kind=")
        on = self.on if isinstance(self.on, tuple) else (self.on,) if self.on is not None else ()
        if not on and self.on is not None:
            raise ValueError("Rule(on=()) matches nothing; give exception classes or leave it None")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TypeError(
                f"Rule(on=...) must be an exception class or a tuple of them, got {self.on!r}"
            )
        if self.when is not None and not callable(self.when):
            raise TypeError("Rule(when=...) must be a callable taking the exception")
        if self.retryable is not None and not isinstance(self.retryable, bool):
            raise TypeError(
                f"Rule(retryable=...) must be True, False or None, not {self.retryable!r}"
            )
        if self.message is not None:
            if not isinstance(self.message, (str, re.Pattern)):
                raise TypeError("Rule(message=...) must be a regex string or a compiled pattern")
            try:
                pattern = (
                    re.compile(self.message) if isinstance(self.message, str) else self.message
                )
            except re.error as exc:
                raise ValueError(f"Rule(message=...) is not a valid regex: {exc}") from None
            object.__setattr__(self, "_pattern", pattern)
        if self.status is not None:
            statuses = _collection("status", self.status, int, lambda s: 100 <= s <= 599)
            object.__setattr__(self, "_statuses", statuses)
        if self.code is not None:
            object.__setattr__(self, "_codes", _collection("code", self.code, str, bool))
        for name, cls in (("category", ErrorCategory), ("severity", Severity), ("kind", ErrorKind)):
            object.__setattr__(self, name, _enum_field(cls, name, getattr(self, name)))

    def matches(self, exc: BaseException | None, verdict: Verdict, message: str) -> bool:
        """All given matchers must hold; ``exc`` is None for status-only classification."""
        if self.on is not None and not isinstance(exc, self.on):
            return False
        if self._statuses is not None and verdict.status not in self._statuses:
            return False
        if self._codes is not None and (verdict.code or "").upper() not in self._codes:
            return False
        if self._pattern is not None and not self._pattern.search(message):
            return False
        return self.when is None or (exc is not None and bool(self.when(exc)))

    def apply(self, verdict: Verdict) -> Verdict:
        """``verdict`` with the fields this rule sets overridden (the rest kept)."""
        category = self.category or verdict.category
        return replace(
            verdict,
            category=category,
            severity=self.severity or verdict.severity,
            retryable=verdict.retryable if self.retryable is None else self.retryable,
            kind=self.kind or verdict.kind,
            dependency=(
                category in _DEPENDENCY_CATEGORIES if self.category else verdict.dependency
            ),
        )
