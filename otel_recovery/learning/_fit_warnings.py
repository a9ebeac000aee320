"""Silencing the statsmodels fits' warnings on the thread that runs them, and nowhere else.

The anomaly fits run on the span processor's worker thread, and statsmodels warns freely
(non-convergence, starting parameters, frequency guesses): noise for the host, which did
not ask for these models. ``warnings.catch_warnings()`` is the usual tool and the wrong one
here: it swaps the process-wide filter list for a copy and puts the old one back on exit,
so while a fit runs every thread's warnings are ignored, and a filter the host adds
meanwhile is lost. A plain ``filterwarnings("ignore", module="statsmodels")`` would hide the
host's own statsmodels warnings for good.

Instead one filter is added, once: its module matcher (the warnings machinery calls
``.match(module)`` on it) matches statsmodels' modules and the fitting module only while the
calling thread is inside :func:`quiet_fit`. numpy's floating-point warnings are silenced with
``np.errstate``, which is per thread already.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np

__all__ = ["quiet_fit"]

_FIT_MODULES = re.compile(r"(statsmodels|otel_recovery\.learning\.anomaly)(\.|$)")


class _InAFit(threading.local):
    depth = 0


_in_a_fit = _InAFit()


class _DuringFits:
    """The filter's module matcher: statsmodels and the fitting module, on a fitting thread."""

    pattern = "otel_recovery: statsmodels during an anomaly fit"  # shown by warnings.filters

    def match(self, module: str) -> bool:
        return _in_a_fit.depth > 0 and _FIT_MODULES.match(module) is not None

    def __repr__(self) -> str:
        return f"<{self.pattern}>"


_MATCHER = _DuringFits()


def _install() -> None:
    """Add the filter unless it is there (something may have reset the list since)."""
    filters: list[tuple[object, ...]] = warnings.filters  # type: ignore[assignment]
    if any(entry[3] is _MATCHER for entry in filters):
        return
    filters.insert(0, ("ignore", None, Warning, _MATCHER, 0))
    mutated = getattr(warnings, "_filters_mutated", None)
    if callable(mutated):  # drop the "already warned" caches, as filterwarnings does
        mutated()


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """Run a statsmodels fit with its warnings silenced on this thread only."""
    _install()
    _in_a_fit.depth += 1
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        _in_a_fit.depth -= 1
