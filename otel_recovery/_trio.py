"""Running under trio instead of asyncio: what the async paths need to know.

httpx's ``AsyncClient``, the ASGI middleware under hypercorn, and ``@recover`` on a
coroutine function can all run under trio, where nothing of ``asyncio`` works: no running
loop, so ``asyncio.sleep`` and ``asyncio.timeout`` raise ``RuntimeError``. Every retry
would then fail inside our machinery instead of waiting. The few places that wait or time
an attempt out ask :func:`running_trio` and use trio's own primitives there.

Only the failure paths ask (a backoff, an attempt under a time limit), and where trio was
never imported the question is one dictionary lookup. trio is never imported here: if the
application runs trio, it has imported it already.
"""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["is_trio_cancellation", "running_trio"]


def running_trio() -> ModuleType | None:
    """The ``trio`` module when the calling task runs under trio; None under asyncio (or
    uvloop), or outside any event loop.

    Asked of sniffio, which trio requires and sets for its tasks, because asking asyncio
    first is wrong where both run in one thread: trio as a guest on an asyncio loop, or
    trio-asyncio, whose asyncio-mode tasks run under trio (and must get asyncio's sleep).
    """
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    sniffio = sys.modules.get("sniffio")  # imported by trio itself
    if sniffio is None:
        return None
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    return trio if library == "trio" else None


def is_trio_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is trio's ``Cancelled`` (a cancel scope unwinding, ours included)."""
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(error, trio.Cancelled)
