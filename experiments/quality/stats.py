"""Confidence intervals for the benchmark's means and paired differences.

Percentile bootstrap over items: resample the items with replacement, take the statistic,
and report the 2.5% and 97.5% quantiles of its resampled values. For a paired difference the
same resampled items are used for both methods, so the item-to-item variation (some images
are easy for every method) cancels and the interval is much narrower than two separate
intervals would suggest.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000


def bootstrap_ci(values, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of `values` `(n,)`; NaN for an empty sample."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_ci(a, b, resamples: int = RESAMPLES, seed: int = 0,
              level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a − b, low, high) over items paired by position."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same items; got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, resamples, seed, level)


def separated(ci: tuple[float, float, float]) -> bool:
    """Whether an interval of a difference excludes 0."""
    return not (ci[1] <= 0 <= ci[2])
