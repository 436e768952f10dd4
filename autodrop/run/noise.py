"""How noisy one run's validation accuracy is, and how far the best of many runs leads by luck alone.

Two sources of noise make one trial's accuracy an imperfect measure of its placement: the
validation set is a sample (binomial noise, from its size), and training itself wobbles (the same
placement trained again, or read one epoch later, scores differently). Both are estimated from the
study at hand; the pruner, the search's verdict and the importances all judge against them.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Mapping

import numpy as np


def binomial_variance(accuracy: float, n_val: int) -> float:
    """Return the variance of an accuracy measured on ``n_val`` images (floored away from 0 and 1,
    where the binomial formula would claim no noise at all)."""
    p = min(max(accuracy, 0.5 / n_val), 1.0 - 0.5 / n_val)
    return p * (1.0 - p) / n_val


def curve_wobble(curves: Iterable[Mapping[int, float]], from_epoch: int) -> float:
    """Return the standard deviation of one epoch's validation accuracy around its curve's trend,
    from the epoch-to-epoch changes of ``curves`` (epoch -> accuracy) from ``from_epoch`` on; 0 with
    fewer than 3 changes.

    The plain standard deviation, not a robust one: the occasional large jump is exactly what
    makes one epoch's reading a poor guide to the end.
    """
    changes = []
    for curve in curves:
        changes += [curve[s + 1] - curve[s] for s in curve if s >= from_epoch and s + 1 in curve]
    changes = [c for c in changes if math.isfinite(c)]
    if len(changes) < 3:
        return 0.0
    # A change is the difference of two readings, each with this standard deviation.
    return float(np.std(changes, ddof=1) / math.sqrt(2.0))


def run_noise(accuracies: list[float], curves: list[Mapping[int, float]], n_val: int, epochs: int) -> float:
    """Return the standard deviation of one run's final validation accuracy: the binomial noise at
    the completed trials' median accuracy, and the wobble of their curves over the last third of
    the epochs (where a run's final reading is taken)."""
    median = float(np.median(accuracies)) if accuracies else 0.5
    wobble = curve_wobble(curves, max(1, epochs - max(1, epochs // 3)))
    return math.sqrt(binomial_variance(median, n_val) + wobble**2)


@lru_cache(maxsize=256)
def chance_lead(n_runs: int, level: float = 0.95) -> float:
    """Return, in units of one run's noise, the lead over one other run that the best of ``n_runs``
    runs of equal placements reaches with probability ``1 - level``: the ``level`` quantile of
    ``max(Z_1..Z_n) - Z_0`` for independent standard normal Z.

    For one run it is 1.645 * sqrt(2) = 2.33; for twenty it is about 3.7.
    """
    if n_runs < 1:
        raise ValueError(f"n_runs must be at least 1, but got {n_runs=}.")
    from scipy import stats

    z0 = np.linspace(-8.0, 8.0, 4001)
    weights = stats.norm.pdf(z0) * (z0[1] - z0[0])

    def cdf(t: float) -> float:
        return float(np.sum(weights * stats.norm.cdf(z0 + t) ** n_runs))

    low, high = 0.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < level else (low, middle)
    return (low + high) / 2


def spread_within_noise(accuracies: list[float], noise: float, level: float = 0.95) -> bool:
    """Whether the completed trials' accuracies vary no more than runs of one placement would: a
    chi-square test of their variance against ``noise`` squared (True with fewer than 3 trials)."""
    if len(accuracies) < 3 or noise <= 0.0:
        return len(accuracies) < 3
    from scipy import stats

    n = len(accuracies)
    statistic = (n - 1) * float(np.var(accuracies, ddof=1)) / noise**2
    return statistic <= float(stats.chi2.ppf(level, n - 1))
