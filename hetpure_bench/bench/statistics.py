"""Uncertainty of accuracies measured on a finite set of images.

- Per-image outcomes that are 0/1 (single, vote:m, worst:N) get Wilson score intervals.
- Per-image outcomes that are fractions (expected:K: the share of K purifications that are right)
  get a seeded percentile bootstrap over images.
- Two rows measured on the same images are compared per image. For 0/1 outcomes: the exact
  McNemar test (a binomial test on the images where exactly one of the two rows is right) and the
  interval that goes with it (Clopper-Pearson on those discordant images, scaled to a difference
  of accuracies), so the interval and the test never disagree about whether there is a
  difference. For fractional outcomes: a seeded paired bootstrap over images.

All intervals are two-sided at ``CONFIDENCE`` unless given otherwise. scipy does the statistics;
this module only decides which method fits which outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """An accuracy (a fraction in [0,1]) with its interval and how the interval was made."""

    value: float
    low: float
    high: float
    method: str

    def as_percent(self, digits: int = 1) -> str:
        """ "84.4 [67.2, 93.1]" (percent)."""
        return f"{100 * self.value:.{digits}f} [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    array = _as_array(values)
    return bool(np.all((array == 0) | (array == 1)))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images (seeded: the same values give the
    same interval). Identical values give the degenerate interval [v, v]."""
    array = _as_array(values)
    if array.size == 0:
        return float("nan"), float("nan")
    if np.all(array == array[0]):
        return float(array[0]), float(array[0])
    result = stats.bootstrap(
        (array,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def accuracy_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> Interval:
    """The accuracy (mean of per-image outcomes) with its interval: Wilson for 0/1 outcomes, the
    seeded bootstrap over images for fractional ones. When every image has the same fractional
    outcome the bootstrap degenerates, so the Wilson interval of the rounded count is used."""
    array = _as_array(values)
    n = array.size
    value = float(array.mean()) if n else float("nan")
    level = f"{100 * confidence:g}%"
    if is_binary(array) or (n and np.all(array == array[0])):
        low, high = wilson_interval(round(value * n), n, confidence)
        return Interval(value, low, high, f"Wilson {level}")
    low, high = bootstrap_interval(array, confidence, seed)
    return Interval(value, low, high, f"bootstrap {level} over images (seed {seed})")


def half_width(n: int, p: float = 0.5, confidence: float = CONFIDENCE) -> float:
    """Half the width of the Wilson interval at n images for an observed accuracy p (0.5: the
    widest): what a user buys with n, e.g. 0.17 at n = 32 and 0.06 at n = 256."""
    low, high = wilson_interval(round(p * n), n, confidence)
    return (high - low) / 2


@dataclass(frozen=True)
class PairedDifference:
    """accuracy(a) - accuracy(b) over the same images, with a paired interval and, for 0/1
    outcomes, the exact McNemar test (``a_only``/``b_only``: images only a / only b gets right)."""

    n: int
    difference: float
    low: float
    high: float
    method: str
    a_only: int | None
    b_only: int | None
    p_value: float | None

    @property
    def distinguishable(self) -> bool:
        """False when the interval contains 0."""
        return not (self.low <= 0 <= self.high)

    def sentence(self, a: str, b: str) -> str:
        """One plain sentence: the difference in points with its interval, or that the two are
        not distinguishable at this n."""
        interval = f"{100 * self.difference:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        test = f", McNemar exact p = {self.p_value:.3g} ({self.a_only} vs {self.b_only} discordant images)" if self.p_value is not None else ""
        if not self.distinguishable:
            return f"{a} vs {b}: not distinguishable at n = {self.n} ({interval}{test})"
        return f"{a} {'above' if self.difference > 0 else 'below'} {b} by {interval} at n = {self.n}{test}"


def mcnemar_exact(a_correct: Sequence[float] | np.ndarray, b_correct: Sequence[float] | np.ndarray) -> tuple[int, int, float]:
    """(a_only, b_only, two-sided exact p-value): the binomial test of a_only out of the
    discordant images against 1/2. No discordant image gives p = 1."""
    a, b = _as_array(a_correct).astype(bool), _as_array(b_correct).astype(bool)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if a_only + b_only == 0:
        return a_only, b_only, 1.0
    return a_only, b_only, float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)


def discordant_interval(a_only: int, b_only: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of accuracy(a) - accuracy(b) = (a_only - b_only) / n given the m = a_only + b_only
    discordant images: the exact (Clopper-Pearson) interval [p_lo, p_hi] of a_only / m mapped by
    p -> m (2p - 1) / n. It contains 0 exactly when the exact test of p = 1/2 at this level does
    not reject, so the interval agrees with McNemar's test. No discordant image gives [0, 0]."""
    m = a_only + b_only
    if m == 0:
        return 0.0, 0.0
    ci = stats.binomtest(a_only, m, 0.5).proportion_ci(confidence_level=confidence, method="exact")
    return m * (2 * float(ci.low) - 1) / n, m * (2 * float(ci.high) - 1) / n


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> PairedDifference:
    """Per-image paired comparison of two rows' outcomes on the same images (same order)."""
    a_arr, b_arr = _as_array(a), _as_array(b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired outcomes need the same images: {a_arr.size} vs {b_arr.size}")
    difference = float(a_arr.mean() - b_arr.mean())
    level = f"{100 * confidence:g}%"
    if is_binary(a_arr) and is_binary(b_arr):
        a_only, b_only, p_value = mcnemar_exact(a_arr, b_arr)
        low, high = discordant_interval(a_only, b_only, a_arr.size, confidence)
        return PairedDifference(a_arr.size, difference, low, high, f"exact {level} on the discordant images",
                                a_only, b_only, p_value)
    low, high = bootstrap_interval(a_arr - b_arr, confidence, seed)
    return PairedDifference(a_arr.size, difference, low, high, f"paired bootstrap {level} over images (seed {seed})",
                            None, None, None)
