"""Error classification: what failed, how badly, and whether trying again can help.

Every recovery decision starts here. :func:`classify` turns an exception into an
:class:`ErrorInfo` using, in order: user :class:`Rule` s (first match wins), the built-in
knowledge of common libraries (``_known_errors``; matched by class name, never imported), the
exception chain (a failure *caused by* a dependency failure is CASCADING), the caller's
``criticality`` and how often the same fingerprint was seen recently.

Nothing here retries blindly: ``retryable`` is True only for conditions known to be transient,
so a policy that trusts the classifier never repeats a request that was rejected as invalid.
"""

from __future__ import annotations

import http
import inspect
import logging
import re  # noqa: F401 - Rule's annotations are resolved here (typing.get_type_hints)
from collections import OrderedDict, deque
from collections.abc import (
    Callable,
    Collection,  # noqa: F401 - as re
    Iterable,
    Mapping,
)
from dataclasses import dataclass, replace
from typing import Any

from otel_recovery._classify_rules import Rule
from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._error_codes import status_verdict
from otel_recovery._error_vocabulary import ErrorCategory, ErrorKind, Severity, Verdict
from otel_recovery._fingerprint import fingerprint
from otel_recovery._forksafe import new_lock
from otel_recovery._known_errors import resolve, safe_str
from otel_recovery._public_home import public_home
from otel_recovery._redact import redact_bounded
from otel_recovery._retry_after import header, parse_retry_after, retry_after_of
from otel_recovery._type_profiles import TypeProfile, profile_of

__all__ = [
    "CRITICALITY_LEVELS",
    "Classifier",
    "ErrorCategory",
    "ErrorInfo",
    "ErrorKind",
    "Rule",
    "Severity",
    "classify",
    "classify_status",
    "get_default_classifier",
    "set_default_classifier",
]

public_home(__name__, Rule)  # its annotations resolve here: hence re and Collection

_log = logging.getLogger(__name__)

MAX_MESSAGE = 512
_MAX_CHAIN = 16
_CRITICALITY = {"low": -1, "normal": 0, "medium": 0, "high": 1, "critical": 2}
CRITICALITY_LEVELS: tuple[str, ...] = tuple(_CRITICALITY)
"""Accepted ``context["criticality"]`` values ("medium" is the same as "normal")."""
_UNKNOWN = Verdict(ErrorCategory.UNKNOWN, Severity.MEDIUM, False, ErrorKind.OTHER)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The classification of one failure; immutable so it can be shared and cached."""

    category: ErrorCategory
    severity: Severity
    retryable: bool
    retry_after: float | None
    error_type: str
    fingerprint: str
    kind: ErrorKind = ErrorKind.OTHER
    message: str = ""
    code: str | None = None
    status_code: int | None = None

    def to_attributes(self) -> dict[str, str | bool | float]:
        """Span/event attributes; ``error.type`` follows the OTel semantic conventions."""
        attributes: dict[str, str | bool | float] = {
            "otel_recovery.error.category": self.category.value,
            "otel_recovery.error.severity": self.severity.value,
            "otel_recovery.error.fingerprint": self.fingerprint,
            "otel_recovery.error.retryable": self.retryable,
            "otel_recovery.error.kind": self.kind.value,
            "error.type": self.error_type,
        }
        if self.retry_after is not None:
            attributes["otel_recovery.error.retry_after"] = self.retry_after
        if self.code is not None:
            attributes["otel_recovery.error.code"] = self.code
        return attributes


def _criticality_shift(context: Mapping[str, Any] | None) -> int:
    if not context:
        return 0
    value = context.get("criticality", "normal")
    shift = _CRITICALITY.get(value.lower()) if isinstance(value, str) else None
    if shift is None:
        raise ValueError(
            f"context['criticality'] must be one of 'low', 'normal', 'high', 'critical', "
            f"got {value!r}"
        )
    return shift


class Classifier:
    """Classifies failures; holds user rules and the recent-repeat memory.

    One instance is shared by every policy of a process (see :func:`get_default_classifier`),
    so repeat counting sees all call sites. Thread-safe: rules are an immutable tuple swapped
    under a lock, and the repeat memory is only touched under the lock.
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        clock: Clock | None = None,
        repeat_window: Duration = 60.0,
        repeat_threshold: int = 10,
        max_tracked_fingerprints: int = 10_000,
    ) -> None:
        self._clock: Clock = clock_or_default(clock)
        self._window = to_seconds(repeat_window, "repeat_window")
        if self._window <= 0:
            raise ValueError("repeat_window must be > 0 seconds")
        for name, value in (
            ("repeat_threshold", repeat_threshold),
            ("max_tracked_fingerprints", max_tracked_fingerprints),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._threshold = repeat_threshold
        self._max_tracked = max_tracked_fingerprints
        self._lock = new_lock()
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._rules: tuple[Rule, ...] = ()
        self._broken_rules: set[int] = set()
        for rule in rules:
            self.add_rule(rule)

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def add_rule(self, rule: Rule, *, first: bool = False) -> None:
        """Append ``rule`` (or put it before all others with ``first=True``)."""
        if not isinstance(rule, Rule):
            raise TypeError(f"add_rule() takes a Rule, got {type(rule).__name__}")
        with self._lock:
            self._rules = (rule, *self._rules) if first else (*self._rules, rule)

    def reset(self) -> None:
        """Forget recent repeats (severity goes back to each error's base level)."""
        with self._lock:
            self._seen.clear()

    def classify(
        self,
        exc: BaseException,
        context: Mapping[str, Any] | None = None,
        *,
        clock: Clock | None = None,
    ) -> ErrorInfo:
        """Classify ``exc``; ``context["criticality"]`` (low..critical) shifts the severity.

        ``clock``: the one a ``Retry-After`` HTTP-date is read against (a policy passes its
        own, so a ``FakeClock`` test sees the wait the date means); the classifier's own by
        default. Repeat counting always uses the classifier's clock, shared by every caller.
        """
        if not isinstance(exc, BaseException):
            raise TypeError(f"classify() takes an exception, got {type(exc).__name__}")
        shift = _criticality_shift(context)
        raw = safe_str(exc)
        profile, verdict = self._evaluate(exc, raw, 0, (clock or self._clock).wall)
        if profile.static is not None and profile.static.kind is ErrorKind.CANCELLED:
            verdict = replace(verdict, retryable=False)  # cancellation is never retried
        message = redact_bounded(raw, MAX_MESSAGE)
        return self._finish(verdict, profile.error_type, message, shift)

    def classify_status(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        *,
        clock: Clock | None = None,
    ) -> ErrorInfo:
        """Classify an HTTP response that is not an exception (result-based retry)."""
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"status must be an int HTTP status, got {status!r}")
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status in 100..599, got {status}")
        verdict = status_verdict(status)
        wall = (clock or self._clock).wall
        retry_after = parse_retry_after(header(headers, "Retry-After"), wall)
        verdict = replace(verdict, retry_after=retry_after)
        rule = self._match(None, verdict, "")
        if rule is not None:
            verdict = rule.apply(verdict)
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        return self._finish(verdict, str(status), phrase, 0)

    def _finish(self, verdict: Verdict, error_type: str, message: str, shift: int) -> ErrorInfo:
        fp = fingerprint(error_type, verdict.code, message)
        severity = verdict.severity.raised(shift + self._repeat_steps(fp))
        return ErrorInfo(
            verdict.category,
            severity,
            verdict.retryable,
            verdict.retry_after,
            error_type,
            fp,
            verdict.kind,
            message,
            verdict.code,
            verdict.status,
        )

    def _repeat_steps(self, fp: str) -> int:
        """Record an occurrence; 1 step up at ``threshold`` repeats in the window, 2 at 10x."""
        now = self._clock.now()
        horizon = now - self._window
        with self._lock:
            times = self._seen.get(fp)
            if times is None:
                times = self._seen[fp] = deque(maxlen=10 * self._threshold)
                if len(self._seen) > self._max_tracked:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(fp)
            while times and times[0] <= horizon:
                times.popleft()
            times.append(now)
            count = len(times)
        return 2 if count >= 10 * self._threshold else 1 if count >= self._threshold else 0

    def _match(self, exc: BaseException | None, verdict: Verdict, message: str) -> Rule | None:
        for rule in self._rules:
            try:
                if rule.matches(exc, verdict, message):
                    return rule
            except Exception:  # a broken user predicate must not break the failing call
                if id(rule) not in self._broken_rules:
                    self._broken_rules.add(id(rule))
                    _log.warning(
                        "otel_recovery: rule %r raised; treated as no match", rule, exc_info=True
                    )
        return None

    def _direct(
        self, exc: BaseException, raw: str, depth: int, wall: Callable[[], float]
    ) -> tuple[TypeProfile, Verdict, Rule | None]:
        """Built-in verdict plus Retry-After for ``exc`` alone, and the user rule matching it."""
        try:
            profile, verdict = resolve(exc, raw)
            if profile.group:
                verdict = self._group(exc, depth, wall)
            retry_after = retry_after_of(exc, profile, wall)
        except Exception:  # knowledge-base bug: degrade to UNKNOWN, never raise
            _log.debug("otel_recovery: built-in classification failed", exc_info=True)
            profile, verdict, retry_after = profile_of(type(exc)), _UNKNOWN, None
        if retry_after is not None:
            verdict = replace(verdict, retry_after=retry_after)
        return profile, verdict, self._match(exc, verdict, raw)

    def _evaluate(
        self, exc: BaseException, raw: str, depth: int, wall: Callable[[], float]
    ) -> tuple[TypeProfile, Verdict]:
        profile, verdict, rule = self._direct(exc, raw, depth, wall)
        if (
            not verdict.dependency
            and verdict.kind is not ErrorKind.CANCELLED
            and (rule is None or rule.category is None)
        ):
            cause = self._dependency_cause(exc, depth, wall)
            if cause is not None:
                verdict = replace(
                    cause,
                    category=ErrorCategory.CASCADING,
                    severity=max(cause.severity, Severity.MEDIUM),
                )
        return profile, verdict if rule is None else rule.apply(verdict)

    def _dependency_cause(
        self, exc: BaseException, depth: int, wall: Callable[[], float]
    ) -> Verdict | None:
        """First dependency failure in the ``__cause__``/``__context__`` chain (cycle-safe)."""
        seen = {id(exc)}
        current = exc
        for _ in range(_MAX_CHAIN):
            nxt = current.__cause__ if current.__cause__ is not None else current.__context__
            if nxt is None or id(nxt) in seen:
                return None
            seen.add(id(nxt))
            _, verdict, rule = self._direct(nxt, safe_str(nxt), depth + 1, wall)
            if rule is not None:
                verdict = rule.apply(verdict)
            if verdict.dependency:
                return verdict
            current = nxt
        return None

    def _group(self, group: BaseException, depth: int, wall: Callable[[], float]) -> Verdict:
        """An exception group is as bad as its first dependency failure."""
        subs = getattr(group, "exceptions", ())
        if depth < 8 and isinstance(subs, tuple):
            for sub in subs:
                if isinstance(sub, BaseException):
                    verdict = self._evaluate(sub, safe_str(sub), depth + 1, wall)[1]
                    if verdict.dependency:
                        return verdict
        return _UNKNOWN


_default = Classifier()


def get_default_classifier() -> Classifier:
    """The process-wide classifier used by :func:`classify` and by policies without their own."""
    return _default


def classify_on(
    classifier: Classifier,
    exc: BaseException,
    context: Mapping[str, Any] | None,
    clock: Clock | None,
) -> ErrorInfo:
    """``classifier.classify(exc, context, clock=clock)``, without ``clock`` for a subclass
    whose ``classify`` does not take it (written before it existed): one way to call any
    classifier, whether a policy's own or the process-wide one a user replaced."""
    if clock is not None and takes_clock(type(classifier)):
        return classifier.classify(exc, context, clock=clock)
    return classifier.classify(exc, context)


def takes_clock(kind: type[Classifier]) -> bool:
    """Whether ``kind.classify`` takes ``clock=``: the built-in one does; a subclass written
    before it did, overriding ``classify(exc, context)``, is called without it."""
    known = _takes_clock.get(kind)
    if known is None:
        known = _takes_clock[kind] = _signature_takes_clock(kind)
    return known


_takes_clock: dict[type[Classifier], bool] = {}


def _signature_takes_clock(kind: type[Classifier]) -> bool:
    if kind.classify is Classifier.classify:
        return True
    try:
        parameters = inspect.signature(kind.classify).parameters
    except (TypeError, ValueError):
        return False
    return "clock" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def check_classifier(classifier: object, setting: str = "classifier") -> None:
    """Refuse what is not a :class:`Classifier` where one is configured, before the first
    failure would find out; ``None`` means the process-wide one."""
    if classifier is not None and not isinstance(classifier, Classifier):
        raise TypeError(
            f"{setting} must be a Classifier, such as Classifier() with rules added by "
            f"add_rule(Rule(...)), got {classifier!r}"
        )


def set_default_classifier(classifier: Classifier) -> None:
    """Replace the process-wide classifier (for instance to add rules or a test clock)."""
    global _default
    if classifier is None:
        raise TypeError("set_default_classifier() takes a Classifier, got None")
    check_classifier(classifier, "set_default_classifier()'s argument")
    _default = classifier


def classify(exc: BaseException, context: Mapping[str, Any] | None = None) -> ErrorInfo:
    """Classify ``exc`` with the default classifier."""
    return _default.classify(exc, context)


def classify_status(
    status: int, headers: Mapping[str, str] | None = None, *, clock: Clock | None = None
) -> ErrorInfo:
    """Classify an HTTP status (and its Retry-After header) with the default classifier."""
    return _default.classify_status(status, headers, clock=clock)
