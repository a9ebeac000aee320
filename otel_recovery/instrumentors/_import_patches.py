"""Methods patched when their module is imported, for as long as a ``PatchSet`` is given.

The pools' health checks and redis-py's MultiDB health checks live in modules the
application imports after ``opentelemetry-instrument`` instrumented (an ORM, a pool, an
optional client), so they are patched by a wrapt post-import hook, which fires at once for a
module already imported. Hooks cannot be unregistered: they are registered once per process,
and one that fires while no ``PatchSet`` is given patches nothing. A hook never raises (its
failure would fail the application's import); a release without the method is skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import wrapt

from otel_recovery._forksafe import new_lock
from otel_recovery.instrumentors._wrapping import PatchSet, Wrapper, report_internal_error

__all__ = ["ImportedSite", "PatchedOnImport"]


class ImportedSite(Protocol):
    """Where a method is patched: ``owner.attribute`` of ``module``, reported as ``name``."""

    @property
    def module(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def attribute(self) -> str: ...
    @property
    def name(self) -> str: ...


_S = TypeVar("_S", bound=ImportedSite)


class PatchedOnImport(Generic[_S]):
    """The sites patched into :attr:`_patches` while it is set; a subclass says how to
    wrap one (:meth:`_wrapper`) and when the patch set is given or taken back."""

    def __init__(self, sites: tuple[_S, ...]) -> None:
        self._sites = sites
        self._lock = new_lock()
        self._patches: PatchSet | None = None
        self._installed: set[_S] = set()
        self._hooked = False

    def _patch_sites(self) -> None:
        """Patch every site now if its module is imported, else when it is (the first call
        registers the hooks, which also fire at once for an imported module)."""
        with self._lock:
            hook = not self._hooked
            self._hooked = True
        for site in self._sites:
            if hook:
                wrapt.register_post_import_hook(self._hook(site), site.module)
            elif site.module in sys.modules:
                self._imported(site)

    def _hook(self, site: _S) -> Callable[[object], None]:
        def imported(module: object) -> None:
            self._imported(site)

        return imported

    def _imported(self, site: _S) -> None:
        """Patch ``site`` if a patch set is given and it is not patched yet; never raises."""
        try:
            with self._lock:
                patches = self._patches
                if patches is None or site in self._installed:
                    return
                owner = getattr(sys.modules.get(site.module), site.owner, None)
                if owner is None or getattr(owner, site.attribute, None) is None:
                    return  # a release without this method: nothing to patch
                patches.wrap(owner, site.attribute, self._wrapper(site, owner))
                self._installed.add(site)
        except Exception as error:
            report_internal_error(f"patch {site.name}", error)

    def _wrapper(self, site: _S, owner: Any) -> Wrapper:
        """The wrapt wrapper for ``site`` (``owner`` is the class it is patched on)."""
        raise NotImplementedError
