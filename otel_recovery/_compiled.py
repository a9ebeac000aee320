"""The optional compiled happy path (``otel_recovery/_speedups_src/``), or None.

Why optional: the package must install and work with nothing but Python, so the extension
is built only where a C compiler is present (``pip install`` says so and goes on when it
is not). Everything it does also exists in Python: ``RecoveryPolicy.runner()`` compiles a
closure, and each per-call layer is a plain function. The compiled versions only make the
remembered happy path cheaper; every other case calls the Python code.

``OTEL_RECOVERY_NO_EXTENSIONS=true`` ignores a built extension (as ``AIOHTTP_NO_EXTENSIONS``
does for aiohttp): to rule it out when chasing a problem, and for the test suite, which
runs the instrumentor and policy tests both ways.
"""

from __future__ import annotations

import logging
from types import ModuleType

from otel_recovery._config import env_flag

__all__ = ["SPEEDUPS"]

ABI = 5
"""The interface these Python sources expect of the extension (``SPEEDUPS_ABI`` in
``_speedups_src/module.c``; both change together, whenever a type's constructor or
behaviour does). An extension built from other sources, say one a checkout kept in place
after a ``git pull`` whose rebuild failed, is ignored rather than trusted."""

_log = logging.getLogger("otel_recovery")


def _load() -> ModuleType | None:
    if env_flag("OTEL_RECOVERY_NO_EXTENSIONS", default=False):
        return None
    try:
        from otel_recovery import _speedups
    except ImportError:  # built without a C compiler: the Python paths do the same work
        return None
    return _speedups if _matches(_speedups) else None


def _matches(module: ModuleType) -> bool:
    built = getattr(module, "ABI", None)
    if built == ABI:
        return True
    _log.warning(
        "otel_recovery: ignoring %s, built for interface %s where these sources expect %s; "
        "the Python paths run instead. Rebuild it: pip install --force-reinstall "
        "--no-deps otel-recovery (or pip install -e . in a checkout)",
        getattr(module, "__file__", "otel_recovery._speedups"),
        built,
        ABI,
    )
    return False


SPEEDUPS: ModuleType | None = _load()
"""``otel_recovery._speedups``, or None when it is not built or switched off."""
