"""Whether a failed HTTP request never left the client, read from the failure's traceback.

A connection that could not be made proves that the request it was for was never written,
so even a POST may be sent again after one (``http_retry_unsent``). But the call our layer
wraps (``Session.request``, ``Client.send``, ``ClientSession._request``) may send more than
one request, and a connect failure proves nothing about the ones sent before it:

- the client follows a redirect, or runs an auth round or a response hook, after the
  server answered the first request (which may have applied it);
- code between the client's entry point and its connection pool (a transport or adapter
  of the application's that retries after a read error, an aiohttp middleware, a callable
  ``raise_for_status``) sent a request, then failed to connect for the next one.

Only the client library's own frames know. The traceback keeps them alive, with their
state (the responses a redirect loop received, the history of urllib3's ``Retry``), so a
failure is judged from them, and from every other frame in it: a frame of code we do not
know (the application's, another agent's wrapper) makes the failure prove nothing, so the
unknown errs toward sending once. Contrib's instrumentation (``opentelemetry``), wrapt and
``contextlib`` (the libraries map their exceptions in context managers) are known. Read on
the failure path only.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Collection, Iterable, Iterator
from types import CodeType, FrameType, ModuleType

import opentelemetry
import wrapt

import otel_recovery

__all__ = ["frames_of", "only_known_frames", "original_code", "sending_frames", "sources"]


def sources(*modules: ModuleType) -> tuple[str, ...]:
    """The source locations of ``modules``: a package's directory (with its separator, so
    ``httpx`` does not match ``httpx_retries``), a plain module's file."""
    found: list[str] = []
    for module in modules:
        paths: Iterable[str] = getattr(module, "__path__", ()) or ()
        if paths:
            found.extend(os.path.join(path, "") for path in paths)
        elif getattr(module, "__file__", None):
            found.append(str(module.__file__))
    return tuple(found)


_OURS = sources(otel_recovery)
"""Our own layer's frames, where the traceback starts: above the client's entry point."""
_KNOWN = sources(contextlib, opentelemetry, wrapt)
"""Frames that may sit anywhere in every client's failure: the context managers that map
exceptions, contrib's wrappers, wrapt's pure-Python wrappers (which only forward)."""


def frames_of(error: BaseException) -> Iterator[FrameType]:
    """The frames of ``error``'s traceback, from where it was caught to where it was raised."""
    traceback = error.__traceback__
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


def sending_frames(
    error: BaseException,
    entry: Collection[CodeType],
    libraries: tuple[str, ...],
    resends: Collection[CodeType] = (),
) -> list[FrameType] | None:
    """The frames of ``error``'s traceback from the outermost one that ran one of ``entry``
    (the client's own function our layer calls) down to where it was raised, if every
    frame of the traceback ran in ``libraries`` (see :func:`sources`) or known code, ours
    only above the entry, and none below the entry ran one of ``resends`` (the client's
    code that sends again after a response); None otherwise, also when no frame ran
    ``entry``. A foreign frame (the application's adapter, transport, middleware, hook or
    auth flow; a wrapper of another's on the method we patched) may have sent the request.

    The traceback starts where the error was caught: in our Python layer, or, under the
    compiled layer (which has no frame), at the function it called, which must then be the
    entry itself.
    """
    known = libraries + _KNOWN
    below: list[FrameType] | None = None
    for frame in frames_of(error):
        code = frame.f_code
        if below is not None:
            if code in resends or not code.co_filename.startswith(known):
                return None
            below.append(frame)
        elif code in entry:
            below = [frame]
        elif not code.co_filename.startswith(known + _OURS):
            return None
    return below


def only_known_frames(error: BaseException, libraries: tuple[str, ...]) -> bool:
    """Whether every frame of ``error``'s traceback ran in ``libraries`` or known code: for
    an error the library caught and raised another for (httpcore's, under httpx's), whose
    traceback holds the part of the call the outer one does not show (its connection
    pool)."""
    known = libraries + _KNOWN
    return all(frame.f_code.co_filename.startswith(known) for frame in frames_of(error))


def original_code(owner: type, name: str, libraries: tuple[str, ...]) -> frozenset[CodeType]:
    """The code of ``owner.name`` as the library defines it (under wrappers that say what
    they wrap), or nothing when that is not a Python function of ``libraries`` (a plain
    patch of another's, installed before us, would otherwise pass for the library's own
    entry point); with nothing, no failure of that client is judged never sent."""
    found = vars(owner).get(name)
    code = getattr(inspect.unwrap(found), "__code__", None) if found is not None else None
    if isinstance(code, CodeType) and code.co_filename.startswith(libraries):
        return frozenset({code})
    return frozenset()
