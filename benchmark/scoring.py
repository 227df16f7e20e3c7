"""Scoring: K-draw aggregation of per-sample outcomes and Wilson intervals (DESIGN.md section 4).

Every sample's outcome is a *correct-count* c out of K independent draws of the defense
(K = 1 for deterministic defenses). A sample is robust for a set of attacks with count
``min(clean count, adversarial count of every attack)``. Three aggregations:

* ``mean``: c / K averaged over samples (expected accuracy of one draw);
* ``majority``: c > K / 2 (the headline number: a robust sample must be classified correctly
  by most draws, never on one lucky draw);
* ``worst``: c == K (worst-of-K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``(nan, nan)`` when n == 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """Accuracy over n samples under the three K-draw aggregations, with Wilson intervals."""

    n: int
    mean: float
    majority: float
    worst: float
    ci_low: float
    ci_high: float
    worst_ci_low: float
    worst_ci_high: float


def aggregate(counts: np.ndarray, k: int) -> Accuracy:
    """Aggregate per-sample correct-counts (out of ``k`` draws) into accuracies."""
    counts = np.asarray(counts, dtype=np.int64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if counts.size and (counts.min() < 0 or counts.max() > k):
        raise ValueError(f"correct-counts must lie in [0, {k}]")
    n = int(counts.size)
    if n == 0:
        nan = math.nan
        return Accuracy(0, nan, nan, nan, nan, nan, nan, nan)
    majority = int((2 * counts > k).sum())
    worst = int((counts == k).sum())
    lo, hi = wilson_interval(majority, n)
    wlo, whi = wilson_interval(worst, n)
    return Accuracy(
        n=n,
        mean=float(counts.mean() / k),
        majority=majority / n,
        worst=worst / n,
        ci_low=lo,
        ci_high=hi,
        worst_ci_low=wlo,
        worst_ci_high=whi,
    )
