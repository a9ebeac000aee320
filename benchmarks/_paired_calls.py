"""CPU per call, paired call by call: what ``instrumentors.py`` quotes against the 1 us target.

Why a second method next to the rounds: batch CPU time on this shared 2-core VM moves by
tens of microseconds per call from one batch to the next (the same client, the same mode),
and by up to 40 us with the position of a batch in its round. A median over a few hundred
rounds of per-round differences then still has an error of one to three microseconds: the
size of the target. Pairing call by call removes the drift: the modes take turns on every
call, so a slow stretch of the machine lands on all of them alike.

How a mode changes between two calls, in one process, with one client and one connection:

- ``contrib`` and ``control``: otel-recovery's per-call layers are out of the call path. The
  reference that points at our layer (the class attribute, or the ``__wrapped__`` of the
  contrib wrapper above it) points at what our layer wraps, exactly as ``uninstrument``
  leaves it. ``control`` is ``contrib`` again: their difference is the A/A noise.
- ``idle``: our layers are in the path with their ``PatchSet`` disabled (each tests its flag
  and calls through): the floor cost of being a layer at all.
- ``recovery``: our layers are in the path and enabled, as a deployment runs them.

Only references are re-pointed (and the ``enabled`` flag set); breakers, budgets and
remembered plans stay alive throughout, so every ``recovery`` call takes the remembered
(compiled, where built) happy path, which ``uses_python_of_ours`` checks. Every switch is
made before every call in every mode. Where our layer is the class attribute itself
(requests' ``Session.request``, psycopg's ``Cursor.execute``), the switch installs a
trampoline there once, a plain function that calls whichever of the two is selected, and
switches its target: setting the class attribute itself before every call would reset
the class's version tag and method cache every time, which costs the modes unequally (and
on 3.13 leaves the class without a tag). The trampoline costs every mode the same; our
layer is then called through it, as it is through contrib's wrapper for Redis.

Each block is four calls, one per mode, in an order that cycles through all 24 permutations,
so no mode is favoured by its position. The CPU time of a call is the calling thread's
(``time.thread_time_ns``): spans are exported by the batch span processor's thread, and our
layer adds no span and no attribute on the happy path (the rounds check the span count).
A process's figure is the median over blocks of ``mode - contrib``, with a distribution-free
95 % confidence interval (order statistics of the binomial), because rare long calls (garbage
collections, interrupts) make the mean's error several microseconds. That interval covers the
noise of one process only: its layout biases all its calls of a mode alike, so
``instrumentors.py`` runs several processes and takes the median over them
(``median_interval``).
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PAIRED_MODES = ("contrib", "control", "idle", "recovery")
ORDERS = list(itertools.permutations(range(len(PAIRED_MODES))))


@dataclass(frozen=True)
class _Link:
    """One reference that points at our layer when it is in the call path."""

    holder: Any  # the class (attribute) or a contrib wrapt proxy (``__wrapped__``)
    name: str
    ours: Any
    beneath: Any  # what our layer wraps: the reference's value when we are out
    target: list[Any] | None = None  # a class attribute's trampoline target (see below)

    def point(self, ours_in: bool) -> None:
        value = self.ours if ours_in else self.beneath
        if self.target is not None:
            self.target[0] = value
        else:
            setattr(self.holder, self.name, value)

    def restore(self) -> None:
        """Put our layer back where the trampoline stood."""
        if self.target is not None:
            setattr(self.holder, self.name, self.ours)


def _trampoline(target: list[Any]) -> Callable[..., Any]:
    """A class attribute that calls ``target[0]``: switching it costs no class change."""

    def through(instance: Any, *args: Any, **kwargs: Any) -> Any:
        return target[0](instance, *args, **kwargs)

    return through


class PerCallSwitch:
    """Puts otel-recovery's per-call layers in or out of the call path, and on or idle,
    between two calls (see the module docstring)."""

    def __init__(self, patch_sets: Iterable[Any], is_ours: Callable[[object], bool]) -> None:
        self.patch_sets = list(patch_sets)
        self.links: list[_Link] = []
        for patches in self.patch_sets:
            for item in patches._installed:
                link = _find_link(item.owner, item.attribute, item.proxy, is_ours)
                if link is not None:
                    self.links.append(link)
        if not self.links:
            raise RuntimeError("no otel_recovery layer found in any patched call path")

    def select(self, mode: str) -> None:
        ours_in = mode in ("idle", "recovery")
        for link in self.links:
            link.point(ours_in)
        for patches in self.patch_sets:
            patches.enabled = mode != "idle"

    def restore(self) -> None:
        """Our layers back in the path, enabled, trampolines gone."""
        self.select("recovery")
        for link in self.links:
            link.restore()


def _find_link(
    owner: Any, attribute: str, ours: Any, is_ours: Callable[[object], bool]
) -> _Link | None:
    beneath = ours.__wrapped__
    top = vars(owner).get(attribute) if hasattr(owner, "__dict__") else None
    if top is ours:
        target = [ours]
        setattr(owner, attribute, _trampoline(target))
        return _Link(owner, attribute, ours, beneath, target)
    node, depth = top, 0
    while node is not None and depth < 20 and not is_ours(node):
        below = getattr(node, "__wrapped__", None)
        if below is ours:
            return _Link(node, "__wrapped__", ours, beneath)
        node, depth = below, depth + 1
    return None


def uses_python_of_ours(call: Callable[[], object]) -> set[str]:
    """The otel_recovery Python functions one call runs in this thread (none when a
    compiled layer serves it)."""
    ran: set[str] = set()

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call" and "otel_recovery" in frame.f_code.co_filename:
            ran.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return ran


def run_blocks(
    call: Callable[[], object], switch: PerCallSwitch, blocks: int
) -> dict[str, list[int]]:
    """CPU ns of every call, per mode, aligned by block (index i of every mode is block i)."""
    cpu: dict[str, list[int]] = {mode: [0] * blocks for mode in PAIRED_MODES}
    columns = [cpu[mode] for mode in PAIRED_MODES]
    clock = time.thread_time_ns
    select = switch.select
    for block in range(blocks):
        for index in ORDERS[block % len(ORDERS)]:
            select(PAIRED_MODES[index])
            started = clock()
            call()
            columns[index][block] = clock() - started
    switch.select("recovery")
    return cpu


@dataclass(frozen=True)
class Paired:
    """A median (us) and its confidence interval: over blocks (``paired_difference``, 95 %)
    or over processes (``median_interval``, whose exact coverage it carries)."""

    median: float
    low: float
    high: float
    coverage: float = 0.95
    """The probability that the interval covers the true median."""

    def __str__(self) -> str:
        return f"{self.median:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def median_interval(values: Sequence[float]) -> Paired:
    """Median of a few values (one per worker process) with its exact order-statistic
    confidence interval: the narrowest (x(k), x(n+1-k)) that covers the median with at least
    95 % probability under the binomial, whatever the distribution. With fewer than six
    values even (min, max) falls short (93.75 % for five, 50 % for two): it is returned with
    the coverage it has, which the caller must show."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def coverage(k: int) -> float:  # of (x(k+1), x(n-k)), 1-based: 1 - 2 P(Bin(n, 1/2) <= k)
        return 1.0 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n

    k = 0  # 0-based index of the lower bound
    while k + 1 < n - 1 - (k + 1) and coverage(k + 1) >= 0.95:
        k += 1
    return Paired(statistics.median(ordered), ordered[k], ordered[n - 1 - k], coverage(k))


def paired_difference(base: Sequence[int], other: Sequence[int]) -> Paired:
    """Median over blocks of ``other - base`` in us, with the order-statistic 95 % interval
    (no assumption about the distribution of the differences)."""
    differences = sorted((y - x) / 1000.0 for x, y in zip(base, other, strict=True))
    n = len(differences)
    half = 1.96 * math.sqrt(n) / 2.0
    low = max(0, math.floor(n / 2.0 - half))
    high = min(n - 1, math.ceil(n / 2.0 + half))
    return Paired(statistics.median(differences), differences[low], differences[high])
