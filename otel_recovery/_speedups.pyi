"""Types of the compiled happy path; see ``_speedups_src/module.c`` for why and
``_compiled.py`` for when."""

from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any

ABI: int
"""The interface it was built for (``otel_recovery._compiled.ABI``)."""

class Runner:
    """``run(fn, args, kwargs)``: ``RecoveryPolicy.runner()``'s happy path, compiled; with
    ``resolve``, ``arunner()``'s, and ``run(...)`` returns an awaitable :class:`AsyncRun`."""

    def __init__(
        self,
        switches: Any,
        now: Callable[[], float],
        breaker: Any,
        gate_unlocked: bool,
        tallied: bool,
        budget: Any,
        counter: Iterator[object] | None,
        remember: Callable[..., object] | None,
        recover: Callable[..., Any],
        reject: Callable[..., Any],
        rejection: Callable[[], BaseException],
        *,
        resolve: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
    ) -> None: ...
    def __call__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], /
    ) -> Any: ...

class AsyncRun(Coroutine[Any, Any, Any]):
    """One awaited run of an async :class:`Runner`: behaves as the coroutine of
    ``AsyncDriver.arunner()``'s Python closure (``_speedups_src/async_run.c``)."""

    cr_running: bool
    cr_await: Any
    def __await__(self) -> Generator[Any, None, Any]: ...
    def send(self, value: Any, /) -> Any: ...
    def throw(self, *args: Any) -> Any: ...
    def close(self) -> None: ...

class PlanTable:
    """The plans a :class:`Layer` may use for one holder, valid while ``token`` is the
    layer's token and ``guard_map[guard_key] is guard_value``, and until it is retired."""

    token: object
    plans: dict[Any, Any]
    guard_map: dict[Any, Any] | None
    guard_key: object
    guard_value: object
    retired: bool
    def retire(self) -> None:
        """The holder has a new table: layers that remembered this one read it again."""
    def __init__(
        self,
        token: object,
        plans: dict[Any, Any],
        guard_map: dict[Any, Any] | None = None,
        guard_key: object = None,
        guard_value: object = None,
    ) -> None: ...

class Layer:
    """A per-call patch site whose remembered happy path is compiled; every other case
    calls ``slow``."""

    slow: Callable[..., Any]
    original: Callable[..., Any]
    def __init__(
        self,
        slow: Callable[..., Any],
        original: Callable[..., Any],
        patches: Any,
        context_var: Any,
        suppress_keys: tuple[object, ...],
        site: Any,
        owner: Any,
        attribute: str,
        token: object,
        holder_attr: str,
        table_attr: str,
        key_index: int,
        explain: Callable[[Any, BaseException], None],
        *,
        awaits: bool = False,
        key_attr: str | None = None,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any: ...

class HttpLayer:
    """A request-sending patch site whose remembered first attempt is compiled; every
    other request runs ``slow``; a failed first attempt goes on in ``resume`` (the runner's
    recovery) and ``settle`` (what the app gets back)."""

    slow: Callable[..., Any]
    original: Callable[..., Any]
    def __init__(
        self,
        slow: Callable[..., Any],
        original: Callable[..., Any],
        patches: Any,
        context_var: Any,
        suppress_keys: tuple[object, ...],
        by_url: dict[Any, tuple[Any, ...]],
        plan_type: type,
        body_names: tuple[str, ...],
        status_attribute: str,
        signal: Callable[[Any], BaseException | None],
        unreadable: Callable[[Exception], object],
        resume: Callable[..., Any],
        settle: Callable[..., Any],
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any: ...

class Counter(Iterator[int]):
    """``Counter(start=0)``: ``next()`` returns the count and adds one; the compiled runner
    adds one without making an int. ``value`` is the next count."""

    def __init__(self, start: int = 0) -> None: ...
    def __next__(self) -> int: ...
    @property
    def value(self) -> int: ...
