"""Statistics for `lowres regress`: is the candidate's distribution slower than the baseline's?

One noisy number says little on a shared machine, so regress compares whole distributions of per-step
figures with the rank-based pair of tools that belong together:

- the Hodges–Lehmann estimate of the ratio: the median, over every (candidate, baseline) pair of steps, of
  candidate / baseline (Hodges & Lehmann 1963, "Estimates of location based on rank tests"; on logarithms,
  so a ratio, not a difference). It is the effect size that goes with the Mann–Whitney test, and far steadier
  than a ratio of two medians when the machine's speed drifts or has two modes: measured here, a run with a
  real 9 % slowdown showed a ratio of medians of 1.039 and a Hodges–Lehmann ratio of 1.076 (bench/regress_noise.py);
- its distribution-free confidence interval (Moses 1965; Hollander & Wolfe, *Nonparametric Statistical
  Methods*, §4.3): the k-th smallest and k-th largest pairwise ratios, k from the normal approximation of the
  Mann–Whitney U distribution, which is accurate from about ten values a side;
- the one-sided Mann–Whitney U test (scipy, when installed): is a candidate step more likely to be slower
  than a baseline step than the other way round?

The verdict follows airspeed velocity (``asv compare``): a change counts when it is both larger than the
threshold (the ratio above ``1 + threshold``) and statistically clear (the whole confidence interval above 1).
Asking for the interval's lower end itself to clear ``1 + threshold`` would miss a real 10 % slowdown
whenever the noise makes the interval wider than the 5 % margin, as it does on a busy laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

MAX_PAIRS = 4_000_000  # above this many pairs both samples are thinned evenly (sorted, every k-th value)


@dataclass(frozen=True)
class RatioTest:
    """candidate / baseline: the Hodges–Lehmann ratio, its confidence interval, and Mann–Whitney's p-value."""

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


def _thin(x: np.ndarray, keep: int) -> np.ndarray:
    if x.size <= keep:
        return x
    return np.sort(x)[np.linspace(0, x.size - 1, keep).round().astype(int)]


def ratio_test(baseline, candidate, *, confidence: float = 0.95) -> RatioTest:
    """Hodges–Lehmann ratio of ``candidate`` over ``baseline`` with its Moses interval, plus Mann–Whitney's
    one-sided p-value. Values must be positive (times, bytes). Deterministic: no resampling."""
    b = np.asarray(baseline, dtype=float)
    c = np.asarray(candidate, dtype=float)
    if b.size < 2 or c.size < 2:
        raise ValueError(f"need at least 2 values on each side, got {b.size} and {c.size}")
    if (b <= 0).any() or (c <= 0).any():
        raise ValueError("values must be positive for a ratio (step times, bytes)")
    keep = int(math.sqrt(MAX_PAIRS))
    lb, lc = np.log(_thin(b, keep)), np.log(_thin(c, keep))
    d = np.sort((lc[:, None] - lb[None, :]).ravel())
    n, m = lc.size, lb.size
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    k = int(math.floor(n * m / 2 - z * math.sqrt(n * m * (n + m + 1) / 12)))
    k = min(max(k, 0), d.size - 1)
    return RatioTest(float(np.exp(np.median(d))), float(np.exp(d[k])), float(np.exp(d[d.size - 1 - k])),
                     confidence, int(b.size), int(c.size), mann_whitney_greater(b, c))


def mann_whitney_greater(baseline, candidate) -> float | None:
    """One-sided p-value that candidate values tend to be larger; None when scipy is not installed."""
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        return None
    return float(mannwhitneyu(candidate, baseline, alternative="greater").pvalue)
