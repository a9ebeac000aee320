"""Which reference cycles a piece of code left for the garbage collector to free.

Client libraries make some of their own (httpx's responses, the sockets of failed
connections); what the tests ask is that none of them runs through our frames or holds our
objects, since those would keep a failed call's frames and locals alive.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import otel_recovery

_PACKAGE = str(Path(otel_recovery.__file__).parent)


@contextmanager
def collected() -> Iterator[list[object]]:
    """Run the block with the collector off; afterwards the list holds every object that
    only the collector could free (those left in cycles, and all they reach)."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def ours(objects: list[object]) -> list[str]:
    """The frames of our package, and objects of our types, among ``objects``."""
    named = []
    for item in objects:
        code = getattr(item, "f_code", None)
        if code is not None and code.co_filename.startswith(_PACKAGE):
            named.append(f"frame {code.co_name} ({code.co_filename})")
        elif type(item).__module__.startswith("otel_recovery"):
            named.append(repr(type(item)))
    return named
