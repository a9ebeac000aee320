"""``RecoveryPolicy`` and the ``@recover`` decorator: the library's front door.

Policies nest in one documented order, outermost first::

    fallback( breaker( bulkhead( retry-with-budget( timeout( call ) ) ) ) )

- the fallback sees every way the call can end badly, including rejections;
- the breaker counts one outcome per *logical* call, so three failed attempts are one
  failure, and a rejected call never reaches the bulkhead;
- the bulkhead slot is held across retries (a retry must not jump the queue);
- the budget is charged per retry, the timeout applies per attempt.

The happy path is a few attribute reads: no span, no metric write, no classification.
Everything else happens after a failure, in the drivers' slow paths
(:mod:`otel_recovery._driver_sync`, :mod:`otel_recovery._driver_async`), which follow the
decisions of the pure engine (:mod:`otel_recovery._engine`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar, cast, overload

from otel_recovery._attempts import Attempt, aiterate, iterate
from otel_recovery._clock import Duration
from otel_recovery._driver_async import AsyncDriver
from otel_recovery._driver_sync import SyncDriver
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.bulkhead import Bulkhead
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry, RetryOn
from otel_recovery.policies.timeout import Timeout

__all__ = ["RecoveryPolicy", "recover"]

P = ParamSpec("P")
T = TypeVar("T")


class RecoveryPolicy(SyncDriver, AsyncDriver):
    """A reusable combination of policies with sync (``call``) and async (``acall``) drivers.

    Keyword arguments: ``retry``, ``breaker``, ``budget``, ``timeout`` (a :class:`Timeout` or
    seconds), ``fallback``, ``bulkhead``, ``classifier``, ``name`` (labels the recovery span
    and metrics; defaults to the breaker's name or ``"default"``), ``context`` (passed to the
    classifier, e.g. ``{"criticality": "high"}``), ``clock`` and ``telemetry`` (``True``
    follows the process-wide telemetry, a :class:`~otel_recovery.telemetry.Telemetry` pins
    one, ``False`` switches tracing and metrics off for this policy).
    """

    __slots__ = ()

    def attempts(self) -> Iterator[Attempt]:
        """Retry a block: ``for attempt in policy.attempts(): with attempt: ...``.

        The block's exception is suppressed when the engine decides to retry and propagates
        unchanged when it gives up. Fallbacks do not apply (a block returns nothing).
        """
        return iterate(self)

    def aattempts(self) -> AsyncIterator[Attempt]:
        """The async twin: ``async for attempt in policy.aattempts(): with attempt: ...``."""
        return aiterate(self)

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Use the policy itself as a decorator: ``@policy``."""
        return _decorate(self, fn)

    def __repr__(self) -> str:
        parts = [
            f"{key}={value!r}"
            for key, value in (
                ("retry", self.retry),
                ("breaker", self.breaker),
                ("budget", self.budget),
                ("timeout", self.timeout),
                ("fallback", self.fallback),
                ("bulkhead", self.bulkhead),
            )
            if value is not None
        ]
        return f"RecoveryPolicy(name={self.name!r}, {', '.join(parts)})"


def _is_async(fn: object) -> bool:
    """Coroutine functions, and objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(_own_call(fn))


def _own_call(fn: object) -> object:
    """What runs when ``fn`` is called: the function itself, or the ``__call__`` its class
    defines for a callable instance."""
    if inspect.isroutine(fn):
        return fn
    for klass in type(fn).__mro__:
        if "__call__" in klass.__dict__:
            return klass.__dict__["__call__"]
    return fn


@contextlib.contextmanager
def _sample_generator() -> Iterator[None]:
    yield


@contextlib.asynccontextmanager
async def _sample_async_generator() -> AsyncIterator[None]:
    yield


_CONTEXT_MANAGER_FACTORIES = frozenset(
    {_sample_generator.__code__, _sample_async_generator.__code__}
)
"""The code of the function ``@contextmanager`` / ``@asynccontextmanager`` return: every
context-manager function made with them runs it."""


def _refuse_deferred(fn: object) -> None:
    """Refuse a callable whose call runs nothing of its own, so nothing could fail, be
    retried or counted: a generator function (its failures come while the caller iterates)
    and a ``@contextmanager`` function (its body runs in the ``with`` statement)."""
    own = _own_call(fn)
    if inspect.isgeneratorfunction(own) or inspect.isasyncgenfunction(own):
        raise TypeError(
            f"@recover cannot recover the generator function {fn!r}: calling it runs "
            "nothing, and its failures come while it is iterated. Decorate the function "
            "that consumes it, or one that returns list(...) of it"
        )
    if getattr(own, "__code__", None) in _CONTEXT_MANAGER_FACTORIES:
        raise TypeError(
            f"@recover cannot recover the context-manager function {fn!r}: calling it runs "
            "nothing, and its body runs in the `with` statement. Decorate the function "
            "whose `with` block does the work, or retry inside the block with "
            "`for attempt in policy.attempts(): with attempt: ...`"
        )


def _decorate(policy: RecoveryPolicy, fn: Callable[P, T]) -> Callable[P, T]:
    if isinstance(fn, (staticmethod, classmethod)):
        # Above @staticmethod/@classmethod: recover the function inside and keep the
        # descriptor outermost, or instance calls would pass `self` to a static method.
        inner = _decorate(policy, fn.__func__)
        return cast(Callable[P, T], type(fn)(inner))
    _refuse_deferred(fn)
    if _is_async(fn):
        coroutine_fn = cast(Callable[P, Awaitable[Any]], fn)
        async_wrapper: Any = functools.wraps(fn)(policy.awrap(coroutine_fn))
        async_wrapper.recovery_policy = policy
        return cast(Callable[P, T], async_wrapper)
    if not callable(fn):
        raise TypeError(f"@recover decorates functions, got {fn!r}")
    answer = policy.fallback.func if policy.fallback is not None else None
    if answer is not None and _is_async(answer):
        # A sync call cannot await it: found now rather than at the first failure.
        raise TypeError(
            f"@recover on the synchronous {fn!r} has the coroutine function {answer!r} as "
            "its fallback, which a synchronous call cannot await; give it a sync fallback, "
            "or make the function `async def`"
        )
    wrapper = functools.wraps(fn)(policy.wrap(fn))
    wrapper.recovery_policy = policy  # type: ignore[attr-defined]
    return wrapper


_POLICY_OPTIONS = frozenset({"classifier", "context", "clock", "telemetry", "span"})
"""What ``recover()`` passes on to :class:`RecoveryPolicy` beyond its own arguments."""


@overload
def recover(fn: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def recover(
    fn: None = None,
    /,
    *,
    attempts: int | None = None,
    on: RetryOn | None = None,
    retry: Retry | None = None,
    breaker: CircuitBreaker | None = None,
    budget: RetryBudget | None = None,
    timeout: Timeout | Duration | None = None,
    fallback: Fallback | None = None,
    bulkhead: Bulkhead | None = None,
    policy: RecoveryPolicy | None = None,
    name: str | None = None,
    **options: Any,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def recover(
    fn: Callable[P, T] | None = None,
    /,
    *,
    attempts: int | None = None,
    on: RetryOn | None = None,
    retry: Retry | None = None,
    breaker: CircuitBreaker | None = None,
    budget: RetryBudget | None = None,
    timeout: Timeout | Duration | None = None,
    fallback: Fallback | None = None,
    bulkhead: Bulkhead | None = None,
    policy: RecoveryPolicy | None = None,
    name: str | None = None,
    **options: Any,
) -> Callable[P, T] | Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a sync or async callable with recovery, keeping its signature.

    ``@recover`` alone retries what the classifier calls retryable, 3 attempts with jittered
    exponential backoff. ``attempts=`` / ``on=`` are shorthands for ``retry=Retry(...)``;
    ``policy=`` reuses a :class:`RecoveryPolicy` (and excludes the other arguments).
    Remaining keyword arguments (``classifier``, ``context``, ``clock``, ``telemetry``) go to
    :class:`RecoveryPolicy`.
    """
    if policy is not None:
        given = [
            k
            for k, v in (
                ("attempts", attempts),
                ("on", on),
                ("retry", retry),
                ("breaker", breaker),
                ("budget", budget),
                ("timeout", timeout),
                ("fallback", fallback),
                ("bulkhead", bulkhead),
                ("name", name),
            )
            if v is not None
        ]
        if given or options:
            raise TypeError(
                "recover(policy=...) takes no other settings, got "
                + ", ".join(given + list(options))
            )
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(
                f"recover(policy=...) takes a RecoveryPolicy such as "
                f"RecoveryPolicy(retry=Retry(3)), got {policy!r}"
            )
        shared = policy

        def build() -> RecoveryPolicy:
            return shared

    else:
        unknown = sorted(set(options) - _POLICY_OPTIONS)
        if unknown:
            raise TypeError(
                f"recover() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                "it takes attempts, on, retry, breaker, budget, timeout, fallback, bulkhead, "
                f"policy, name and {', '.join(sorted(_POLICY_OPTIONS))}"
            )
        if retry is not None and (attempts is not None or on is not None):
            raise TypeError("give either retry=Retry(...) or attempts=/on=, not both")
        if retry is None:
            retry = Retry(attempts if attempts is not None else 3, on=on)
        settings = {
            "retry": retry,
            "breaker": breaker,
            "budget": budget,
            "timeout": timeout,
            "fallback": fallback,
            "bulkhead": bulkhead,
            "name": name,
            **options,
        }
        # Built now so that a bad setting fails where recover(...) is written; the first
        # function decorated takes this one.
        unused = [RecoveryPolicy(**settings)]

        def build() -> RecoveryPolicy:
            # One policy per decorated function: `guarded = recover(attempts=5)` applied to
            # several functions must not name their spans and metrics after the first one.
            # What the caller passed as objects (a breaker, a budget, a bulkhead) is shared,
            # as they asked.
            return unused.pop() if unused else RecoveryPolicy(**settings)

    def decorator(func: Callable[P, T]) -> Callable[P, T]:
        local = build()
        if local.name == "default" and name is None and policy is None:
            local.name = getattr(func, "__qualname__", "default")
        return _decorate(local, func)

    if fn is not None:
        return decorator(fn)
    return decorator
