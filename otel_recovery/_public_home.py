"""Public names defined in private modules, named after the public module that exports them.

A module split by concept moves a public class or function into a private module; its
``__module__`` would then name that private module in reprs, ``help()`` and pickles, and
change with every later split. :func:`public_home` gives it back the public module's name.
The public module must also import whatever the object's string annotations name, since
``typing.get_type_hints`` resolves them there; ``inspect.getsource`` looks there too and
fails for a class (the price of the public name, written in the README).
"""

from __future__ import annotations

__all__ = ["public_home"]


def public_home(module: str, *defined: object) -> None:
    """Name ``module`` (the caller's ``__name__``) as the home of each of ``defined``."""
    for thing in defined:
        thing.__module__ = module
