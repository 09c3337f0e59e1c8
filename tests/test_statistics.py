"""Intervals and paired tests against hand-computed values."""

import math

import numpy as np
import pytest

from hetpure_bench.bench.statistics import (
    accuracy_interval,
    bootstrap_interval,
    half_width,
    mcnemar_exact,
    paired_difference,
    wilson_interval,
)

Z95 = 1.959963984540054


def wilson_by_hand(k, n, z=Z95):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(16, 32), (0, 10), (27, 32), (32, 32), (1, 256)])
def test_wilson_matches_the_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-9)


def test_wilson_hand_values():
    low, high = wilson_interval(16, 32)
    assert (round(low, 4), round(high, 4)) == (0.3363, 0.6637)
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0, abs=1e-12) and round(high, 4) == 0.2775


def test_half_width_sizes_the_run():
    assert round(100 * half_width(32)) == 16  # the widest case, p = 0.5
    assert round(100 * half_width(256)) == 6
    assert half_width(512) < half_width(256) < half_width(32)


def test_accuracy_interval_picks_the_method():
    binary = accuracy_interval([1, 0, 1, 1])
    assert binary.method.startswith("Wilson") and binary.value == 0.75
    assert (binary.low, binary.high) == pytest.approx(wilson_by_hand(3, 4))
    fractional = accuracy_interval([0.1, 0.5, 0.9, 1.0, 0.3])
    assert fractional.method.startswith("bootstrap") and fractional.low < fractional.value < fractional.high
    assert fractional.as_percent() == f"56.0 [{100 * fractional.low:.1f}, {100 * fractional.high:.1f}]"
    constant = accuracy_interval([0.5] * 8)  # a degenerate bootstrap is not reported as certainty
    assert constant.method.startswith("Wilson") and constant.low < 0.5 < constant.high


def test_bootstrap_is_seeded_and_reproducible():
    rng = np.random.default_rng(3)
    values = rng.uniform(size=40)
    first, again = bootstrap_interval(values, seed=7), bootstrap_interval(values, seed=7)
    assert first == again
    assert bootstrap_interval(values, seed=8) != first
    assert first[0] < values.mean() < first[1]
    # The percentile interval of the mean is close to the normal approximation on 40 values.
    se = values.std(ddof=1) / math.sqrt(40)
    assert first == pytest.approx((values.mean() - Z95 * se, values.mean() + Z95 * se), abs=0.03)


def test_mcnemar_exact_on_constructed_pairs():
    # 1 image only a gets right, 9 only b, 20 both, 2 neither: p = 2 * (1 + 10) / 2**10.
    a = [1] * 1 + [0] * 9 + [1] * 20 + [0] * 2
    b = [0] * 1 + [1] * 9 + [1] * 20 + [0] * 2
    a_only, b_only, p = mcnemar_exact(a, b)
    assert (a_only, b_only) == (1, 9)
    assert p == pytest.approx(22 / 1024, abs=1e-12)
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)


def test_paired_difference_and_its_sentence():
    a = [1] * 1 + [0] * 9 + [1] * 20 + [0] * 2
    b = [0] * 1 + [1] * 9 + [1] * 20 + [0] * 2
    diff = paired_difference(a, b)
    assert diff.difference == pytest.approx(-8 / 32)
    assert diff.low < diff.difference < diff.high < 0 and diff.distinguishable
    assert "below" in diff.sentence("A", "B") and "p = 0.0215" in diff.sentence("A", "B")
    # The interval is the Clopper-Pearson interval of 1/10 (hand-computed: 0.002529, 0.445016)
    # mapped to a difference of accuracies: 10 (2p - 1) / 32.
    assert (diff.low, diff.high) == pytest.approx((10 * (2 * 0.0025286 - 1) / 32, 10 * (2 * 0.4450161 - 1) / 32), abs=1e-6)
    same = paired_difference([1, 0, 1, 0], [0, 1, 1, 0])
    assert not same.distinguishable
    assert same.sentence("A", "B").startswith("A vs B: not distinguishable at n = 4")
    fractional = paired_difference([0.5, 0.2, 1.0], [0.4, 0.2, 0.9])
    assert fractional.p_value is None and fractional.difference == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_the_paired_interval_agrees_with_mcnemar():
    """4 images only a gets right, none only b: McNemar p = 0.125, so the interval contains 0
    (a bootstrap over images would exclude it)."""
    a = [1] * 4 + [1] * 10 + [0] * 18
    b = [0] * 4 + [1] * 10 + [0] * 18
    diff = paired_difference(a, b)
    assert diff.p_value == pytest.approx(0.125) and not diff.distinguishable
    for a_only, b_only in [(0, 6), (1, 9), (3, 12), (20, 40), (0, 0)]:
        rows_a = [1] * a_only + [0] * b_only + [1] * 30
        rows_b = [0] * a_only + [1] * b_only + [1] * 30
        d = paired_difference(rows_a, rows_b)
        assert d.distinguishable == (d.p_value < 0.05), (a_only, b_only, d)
