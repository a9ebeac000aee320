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
state, so a failure is judged from them: its outermost frame of the library's entry point,
and every frame below it. A frame of code we do not know (the application's, another
instrumentation's) makes the failure prove nothing, so the unknown errs toward sending
once. Contrib's instrumentation (``opentelemetry``) and ``contextlib`` (the libraries map
their exceptions in context managers) are known. Read on the failure path only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable
from types import CodeType, FrameType, ModuleType

import opentelemetry

__all__ = ["sending_frame", "sources"]


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


_KNOWN = sources(contextlib, opentelemetry)
"""Frames that may sit between a client's entry point and its connection pool in every
client: the context managers that map exceptions, contrib's wrappers."""


def sending_frame(
    error: BaseException,
    entry: Collection[CodeType],
    libraries: tuple[str, ...],
    resends: Collection[CodeType] = (),
) -> FrameType | None:
    """The outermost frame of ``error``'s traceback that ran one of ``entry`` (the client's
    own function our layer calls, or its request loop), if every frame below it ran in
    ``libraries`` (see :func:`sources`) or known code and none ran one of ``resends`` (the
    client's code that sends again after a response); None otherwise, also when there is
    no such frame."""
    known = libraries + _KNOWN
    traceback = error.__traceback__
    found: FrameType | None = None
    while traceback is not None:
        frame = traceback.tb_frame
        code = frame.f_code
        if found is None:
            if code in entry:
                found = frame
        elif code in resends or not code.co_filename.startswith(known):
            return None
        traceback = traceback.tb_next
    return found
