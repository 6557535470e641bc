"""Statistics for `lowres regress`: is the candidate's distribution slower than the baseline's?

One noisy number says little on a shared machine, so regress compares whole distributions of per-step
figures with two standard tools:

- a bootstrap percentile confidence interval of the ratio of medians (Efron & Tibshirani, *An Introduction
  to the Bootstrap*, 1993, ch. 13): both samples are resampled with replacement, independently, ``n_boot``
  times with a seeded generator, so the same data always give the same interval;
- the one-sided Mann–Whitney U test (scipy, when installed): is a candidate step more likely to be slower
  than a baseline step than the other way round?

The verdict follows airspeed velocity (``asv compare``): a change counts when it is both larger than the
threshold (the ratio of medians above ``1 + threshold``) and statistically clear (the whole confidence
interval above 1). Asking for the interval's lower end itself to clear ``1 + threshold`` would miss a real
10 % slowdown whenever the noise makes the interval wider than the 5 % margin, as it does on a busy laptop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RatioTest:
    """candidate / baseline: the ratio of medians, its confidence interval, and Mann–Whitney's p-value."""

    ratio: float
    low: float
    high: float
    confidence: float
    n_baseline: int
    n_candidate: int
    p_value: float | None  # one-sided "candidate larger"; None without scipy

    def regressed(self, threshold: float) -> bool:
        """Larger by more than ``threshold`` and clearly so (the interval lies above 1)."""
        return self.ratio > 1 + threshold and self.low > 1

    def improved(self, threshold: float) -> bool:
        """The mirror image: smaller by more than ``threshold`` and clearly so."""
        return self.ratio < 1 - threshold and self.high < 1


def median_ratio_test(baseline, candidate, *, confidence: float = 0.95, n_boot: int = 4000,
                      seed: int = 0) -> RatioTest:
    """Bootstrap CI of ``median(candidate) / median(baseline)`` plus the Mann–Whitney U p-value."""
    b = np.asarray(baseline, dtype=float)
    c = np.asarray(candidate, dtype=float)
    if b.size < 2 or c.size < 2:
        raise ValueError(f"need at least 2 values on each side, got {b.size} and {c.size}")
    if np.median(b) <= 0:
        raise ValueError("the baseline's median is not positive: a ratio means nothing")
    rng = np.random.default_rng(seed)
    mb = np.median(rng.choice(b, size=(n_boot, b.size), replace=True), axis=1)
    mc = np.median(rng.choice(c, size=(n_boot, c.size), replace=True), axis=1)
    ratios = mc / np.where(mb > 0, mb, np.nan)
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(ratios, [alpha, 1 - alpha])
    return RatioTest(float(np.median(c) / np.median(b)), float(low), float(high), confidence,
                     int(b.size), int(c.size), mann_whitney_greater(b, c))


def mann_whitney_greater(baseline, candidate) -> float | None:
    """One-sided p-value that candidate values tend to be larger; None when scipy is not installed."""
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        return None
    return float(mannwhitneyu(candidate, baseline, alternative="greater").pvalue)
