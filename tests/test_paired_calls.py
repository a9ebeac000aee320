"""The call-by-call CPU comparison of ``benchmarks/instrumentors.py`` (``_paired_calls.py``):
its switch really takes our layer out of the path and puts it back, and its interval is the
order-statistic one it claims to be."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _paired_calls import (  # noqa: E402
    ORDERS,
    PAIRED_MODES,
    Paired,
    PerCallSwitch,
    median_interval,
    paired_difference,
    run_blocks,
)

from otel_recovery.instrumentors._wrapping import PatchSet, _wrapper_module  # noqa: E402


def _ours(node: object) -> bool:
    return _wrapper_module(node).startswith("otel_recovery")


class Client:
    def send(self, value: int) -> int:
        return value + 1


def _install_layer(calls: list[str]) -> tuple[PatchSet, Any]:
    patches = PatchSet("test")

    def build(original: Any) -> Any:
        def layer(instance: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append("enabled" if patches.enabled else "idle")
            return original(instance, *args, **kwargs)

        layer.__module__ = "otel_recovery.instrumentors.test"
        return layer

    original = Client.__dict__["send"]
    patches.layer(Client, "send", build)
    patches.enabled = True
    return patches, original


def test_switch_takes_our_layer_out_and_puts_it_back():
    calls: list[str] = []
    patches, original = _install_layer(calls)
    try:
        switch = PerCallSwitch([patches], _ours)
        client = Client()
        for mode in ("contrib", "recovery", "control", "idle", "recovery"):
            switch.select(mode)
            assert client.send(1) == 2
        assert calls == ["enabled", "idle", "enabled"]
        layer = switch.links[0].ours
        assert Client.__dict__["send"] is not layer  # a trampoline switches, not the class
        switch.restore()
        assert Client.__dict__["send"] is layer
        assert client.send(1) == 2 and calls[-1] == "enabled"
    finally:
        patches.remove_all()
    assert Client.__dict__["send"] is original


def test_run_blocks_times_every_mode_once_per_block_in_every_order():
    calls: list[str] = []
    patches, _ = _install_layer(calls)
    try:
        switch = PerCallSwitch([patches], _ours)
        client = Client()
        cpu = run_blocks(lambda: client.send(1), switch, len(ORDERS))
        switch.restore()
    finally:
        patches.remove_all()
    assert set(cpu) == set(PAIRED_MODES)
    assert all(len(column) == len(ORDERS) for column in cpu.values())
    # the layer ran once per block as "recovery" and once as "idle", never for the others
    assert calls.count("enabled") == len(ORDERS) and calls.count("idle") == len(ORDERS)
    assert len(set(ORDERS)) == 24  # every order of the four modes, once


def test_paired_difference_is_the_median_with_order_statistic_bounds():
    base = [1000] * 100
    other = [1000 + 10 * i for i in range(100)]  # differences 0.00, 0.01, ... 0.99 us
    result = paired_difference(base, other)
    assert result.median == (0.49 + 0.50) / 2
    # n = 100: ranks 50 -+ 1.96 * sqrt(100) / 2 = 40.2 .. 59.8 -> indexes 40 and 60
    assert (result.low, result.high) == (0.40, 0.60)


def test_paired_difference_of_a_constant_shift_is_that_shift():
    result = paired_difference([5000, 7000, 9000], [7000, 9000, 11000])
    assert (result.median, result.low, result.high) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("n", "low", "high", "coverage"),
    [
        # coverage of (x(k), x(n+1-k)) is 1 - 2 P(Binomial(n, 1/2) < k); the narrowest >= 95 %
        (2, 0, 1, 0.5),  # too few: (min, max) with the coverage it has
        (5, 0, 4, 0.9375),  # even (min, max) covers only 93.75 %
        (6, 0, 5, 0.96875),  # (min, max); (x(2), x(5)) would be 78.1 %
        (8, 0, 7, 0.9921875),  # (min, max); (x(2), x(7)) would be 93.0 %, just short
        (10, 1, 8, 0.978515625),  # (x(2), x(9)); (x(3), x(8)) would be 89.1 %
        (12, 2, 9, 0.961425781),  # (x(3), x(10)); (x(4), x(9)) would be 85.4 %
        (20, 5, 14, 0.958610535),  # (x(6), x(15)); (x(7), x(14)) would be 88.5 %
    ],
)
def test_median_interval_is_the_narrowest_exact_95_percent_order_statistic_interval(
    n: int, low: int, high: int, coverage: float
) -> None:
    values = [float(10 * i) for i in reversed(range(n))]  # unsorted on purpose
    result = median_interval(values)
    assert result.median == 10 * (n - 1) / 2
    assert (result.low, result.high) == (10.0 * low, 10.0 * high)
    assert result.coverage == pytest.approx(coverage, abs=1e-9)


def test_median_interval_of_one_value_is_that_value_and_of_none_an_error() -> None:
    assert median_interval([2.5]) == Paired(2.5, 2.5, 2.5, coverage=0.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])
