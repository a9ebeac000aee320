"""Installing and removing our patches without disturbing anybody else's.

Per-call sites get a plain-function layer (:meth:`PatchSet.layer`: wrapt's per-call binding
costs more than our whole budget there); rarely called sites get a wrapt wrapper
(:meth:`PatchSet.wrap`). Both carry ``__wrapped__`` and are handled alike below.

Three facts from research/otel-conventions.md (sections 1.9 and 2) shape this module:

- contrib's ``unwrap`` removes whatever wrapper is on top, ours included; so we remove our
  own layer *by identity*, splicing it out of the chain when someone wrapped on top of it;
- where our layer cannot be removed (a non-wrapt closure captured it), it must become a
  no-op: every layer checks its :class:`PatchSet`'s ``enabled`` flag first;
- for DB and Redis our wrapper must sit *beneath* contrib's, so contrib's single span covers
  all our retries; when contrib is already installed we splice beneath its lowest layer.

It also owns the promise that the instrumentation never breaks the host application:
:func:`report_internal_error` logs an internal failure once per site, and wrappers then call
the original function as if uninstrumented.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import wrapt

from otel_recovery._compiled import SPEEDUPS
from otel_recovery._forksafe import new_lock

__all__ = ["PatchSet", "Wrapper", "report_internal_error"]

_log = logging.getLogger("otel_recovery.instrumentors")

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
"""The wrapt wrapper signature: ``(wrapped, instance, args, kwargs) -> result``."""

_CONTRIB_PREFIX = "opentelemetry.instrumentation."
# wrapt 2 renamed the proxy base (FunctionWrapper no longer subclasses wrapt.ObjectProxy).
_Proxy: Any = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)
_reported: set[str] = set()
_reported_lock = new_lock()


def report_internal_error(site: str, error: BaseException) -> None:
    """Log an internal otel_recovery failure once per ``site``; never raises."""
    try:
        with _reported_lock:
            if site in _reported:
                return
            _reported.add(site)
        _log.error(
            "otel_recovery internal error in %s; the call proceeds uninstrumented "
            "(reported once per site)",
            site,
            exc_info=(type(error), error, error.__traceback__),
        )
    except Exception:  # logging itself failed: nothing more we can do safely
        return


@dataclass
class _Installed:
    owner: Any
    attribute: str
    proxy: Any  # the wrapt.FunctionWrapper or the layer we installed


def _as_function(method: Any, owner: Any) -> Callable[..., Any]:
    """``method`` as a function taking the instance first.

    A plain function already is one. Anything else (another library's wrapt proxy, say) is
    bound to the instance first, as attribute access would: a wrapt wrapper called unbound
    would see ``instance=None`` and the instance among its arguments.
    """
    if type(method) is types.FunctionType:  # not isinstance: a wrapt proxy passes that
        return method

    def bound_call(instance: Any, *args: Any, **kwargs: Any) -> Any:
        return method.__get__(instance, owner)(*args, **kwargs)

    return bound_call


def _mark_coroutine_function(layer: Any) -> None:
    """Say that a compiled layer (not a Python coroutine function, though it returns an
    awaitable) stands for a coroutine method, as the method it replaces does: for
    ``inspect.iscoroutinefunction`` from 3.12 on, and for ``asyncio.iscoroutinefunction``
    before (3.10 and 3.11's ``inspect`` only recognises code objects)."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(layer)
    else:
        layer._is_coroutine = getattr(asyncio.coroutines, "_is_coroutine", None)


def _is_proxy(value: object) -> bool:
    return isinstance(value, _Proxy) or hasattr(value, "__wrapped__")


def _is_layer(node: object, ours: object) -> bool:
    """``node`` is our proxy, or a bound copy of it.

    contrib's ``unwrap`` does ``setattr(cls, name, getattr(cls, name).__wrapped__)``; with
    wrapt 2 the class lookup binds, so when contrib sat on top of us it leaves a
    ``BoundFunctionWrapper`` of our proxy on the class (its ``_self_parent`` is ours).
    """
    return node is ours or getattr(node, "_self_parent", None) is ours


def _wrapper_module(proxy: object) -> str:
    """Module of the function inside a wrapt proxy (contrib's may be a functools.partial),
    or of a plain-function layer such as ours; "" for anything else."""
    if type(proxy) is types.FunctionType or (
        SPEEDUPS is not None and type(proxy) in (SPEEDUPS.Layer, SPEEDUPS.HttpLayer)
    ):
        return str(proxy.__module__) if hasattr(proxy, "__wrapped__") else ""
    inner = getattr(proxy, "_self_wrapper", None)
    inner = getattr(inner, "func", inner)
    return str(getattr(inner, "__module__", "") or "")


class PatchSet:
    """The wrappers one instrumentor installed; ``remove_all`` takes out exactly those."""

    __slots__ = ("_installed", "_marks", "enabled", "name")  # layers read ``enabled`` per call

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = False
        self._installed: list[_Installed] = []
        self._marks: list[tuple[type, str]] = []

    def mark(self, owner: type, name: str, value: object) -> None:
        """Set ``owner.name`` (a class attribute of ours, such as the plans a compiled
        layer reads there); :meth:`remove_all` deletes it again. Not once this set is
        disabled: a call still in flight when it was removed must leave nothing behind."""
        if not self.enabled:
            return
        setattr(owner, name, value)
        if (owner, name) not in self._marks:
            self._marks.append((owner, name))

    def wrap(
        self,
        owner: Any,
        attribute: str,
        wrapper: Wrapper,
        *,
        beneath_contrib: bool = False,
        checks_enabled: bool = False,
    ) -> Any:
        """Wrap ``owner.attribute`` (a class or module attribute) with wrapt's ``wrapper``.

        For sites called rarely (connecting) or that are not plain methods (classmethods,
        module functions); a per-call hot path takes :meth:`layer` instead.

        ``beneath_contrib`` splices the wrapper under an OpenTelemetry contrib wrapper that is
        already there; if contrib instruments later, it lands on top by itself. Returns the
        proxy installed, so a wrapper can tell whether someone is wrapped on top of it.
        ``checks_enabled`` says the wrapper tests ``self.enabled`` itself (one frame less on a
        hot path); otherwise it is gated here.
        """
        patchset = self

        def gated(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            if not patchset.enabled:
                return wrapped(*args, **kwargs)
            return wrapper(wrapped, instance, args, kwargs)

        installed: Wrapper = wrapper if checks_enabled else gated

        current = vars(owner).get(attribute) if hasattr(owner, "__dict__") else None
        if current is None:
            current = getattr(owner, attribute)
        if beneath_contrib:
            lowest = None
            node = current
            while isinstance(node, _Proxy) and _wrapper_module(node).startswith(_CONTRIB_PREFIX):
                lowest = node
                node = node.__wrapped__
            if lowest is not None:
                proxy = wrapt.FunctionWrapper(lowest.__wrapped__, installed)
                lowest.__wrapped__ = proxy
                self._installed.append(_Installed(owner, attribute, proxy))
                return proxy
        proxy = wrapt.FunctionWrapper(current, installed)
        setattr(owner, attribute, proxy)
        self._installed.append(_Installed(owner, attribute, proxy))
        return proxy

    def layer(
        self,
        owner: Any,
        attribute: str,
        build: Callable[[Callable[..., Any]], Callable[..., Any]],
        *,
        beneath_contrib: bool = False,
    ) -> Callable[..., Any]:
        """Install ``build(original)`` as a layer of the method ``owner.attribute``.

        The layer is a plain function called like the method itself, the instance first:
        ``layer(self, *args, **kwargs)``; it calls ``original(self, *args, **kwargs)`` to go
        on, and must test :attr:`enabled` first (a layer someone captured stays reachable).
        It carries ``__wrapped__``, the protocol wrapt, functools and contrib's ``unwrap``
        follow, so it is spliced beneath contrib and removed by identity exactly like a
        wrapt proxy would be.

        Why a plain function and not a ``wrapt.FunctionWrapper``: wrapt binds its proxy on
        every attribute access, and that binding alone costs more than our whole per-call
        budget (wrapt 2.5: about 430 ns and 6,400 instructions per call, against about
        100 ns for a function; ``benchmarks/instrumentors.py --instructions`` counts it). The
        interpreter calls a plain function stored on a class without binding it at all.
        ``beneath_contrib`` splices the layer under an OpenTelemetry contrib wrapper that is
        already there; if contrib instruments later, it lands on top by itself. Returns the
        installed layer (a wrapper can tell from it whether someone sits on top).
        """
        current = vars(owner).get(attribute) if hasattr(owner, "__dict__") else None
        if current is None:
            current = getattr(owner, attribute)
        lowest = None
        if beneath_contrib:
            node = current
            while isinstance(node, _Proxy) and _wrapper_module(node).startswith(_CONTRIB_PREFIX):
                lowest = node
                node = node.__wrapped__
        original = current if lowest is None else lowest.__wrapped__
        if isinstance(original, (classmethod, staticmethod)):
            raise TypeError(
                f"{getattr(owner, '__name__', owner)}.{attribute} is a "
                f"{type(original).__name__}: a layer replaces plain methods and functions; "
                "install it with PatchSet.wrap() instead"
            )
        function: Any = build(_as_function(original, owner))
        # the original's name and docs, and __wrapped__; not its __module__ (ours marks the
        # layer as ours, see _wrapper_module) nor its __dict__ (contrib's markers)
        functools.update_wrapper(
            function, original, assigned=("__name__", "__qualname__", "__doc__"), updated=()
        )
        if inspect.iscoroutinefunction(original) and not inspect.iscoroutinefunction(function):
            _mark_coroutine_function(function)
        if lowest is None:
            setattr(owner, attribute, function)
        else:
            lowest.__wrapped__ = function
        self._installed.append(_Installed(owner, attribute, function))
        return cast(Callable[..., Any], function)

    def remove_all(self) -> None:
        """Take our wrappers out; one that cannot be reached stays as a disabled pass-through."""
        self.enabled = False
        for item in reversed(self._installed):
            try:
                self._remove(item)
            except Exception as error:
                report_internal_error(f"uninstrument {self.name}", error)
        self._installed.clear()
        for owner, name in self._marks:
            try:
                if name in vars(owner):
                    delattr(owner, name)
            except Exception as error:
                report_internal_error(f"uninstrument {self.name}", error)
        self._marks.clear()

    @staticmethod
    def _remove(item: _Installed) -> None:
        owner, attribute, ours = item.owner, item.attribute, item.proxy
        top = vars(owner).get(attribute) if hasattr(owner, "__dict__") else None
        if top is None:
            top = getattr(owner, attribute)
        if _is_layer(top, ours):
            setattr(owner, attribute, ours.__wrapped__)
            return
        node = top
        while _is_proxy(node):
            below = node.__wrapped__
            if _is_layer(below, ours):
                if isinstance(node, _Proxy):
                    node.__wrapped__ = ours.__wrapped__
                # else: a plain closure captured our proxy; it stays, disabled.
                return
            node = below
        # Not found: someone replaced the attribute wholesale; nothing of ours is reachable.
