"""Scoring: K-draw aggregation of per-sample outcomes and Wilson intervals (docs/design.md 4).

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


def binom_cdf(n: int, q: float) -> np.ndarray:
    """``P(B <= k)`` for k = 0..n, B ~ Binomial(n, q). Exact (integer arithmetic) for q = 1/2,
    as McNemar's test needs; otherwise in log space (no underflow for large n)."""
    if n < 0 or not 0.0 < q < 1.0:
        raise ValueError(f"need n >= 0 and 0 < q < 1, got n={n!r}, q={q!r}")
    if q == 0.5:
        total, out = 0, []
        for i in range(n + 1):
            total += math.comb(n, i)
            out.append(total / 2**n)
        return np.array(out)
    k = np.arange(n + 1)
    lgam = np.vectorize(math.lgamma)
    logpmf = (lgam(n + 1) - lgam(k + 1) - lgam(n - k + 1)
              + k * math.log(q) + (n - k) * math.log1p(-q))
    return np.cumsum(np.exp(logpmf))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts ``b`` and ``c``:
    ``min(1, 2 P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)`` (1.0 when b + c = 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * float(binom_cdf(n, 0.5)[min(b, c)]))


def newcombe_unpaired(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float, float]:
    """``p1 - p2`` with Newcombe's hybrid score 95% interval for independent proportions."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1)
    l2, u2 = wilson_interval(x2, n2)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def newcombe_paired(a: int, b: int, c: int, d: int) -> tuple[float, float, float]:
    """``p1 - p2`` with Newcombe's score 95% interval for a paired difference (method 10).

    ``a``: both correct, ``b``: correct in 1 only, ``c``: correct in 2 only, ``d``: neither;
    so ``p1 = (a + b) / n`` and ``p2 = (a + c) / n``.
    """
    n = a + b + c + d
    if n == 0:
        return (math.nan, math.nan, math.nan)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n)
    l2, u2 = wilson_interval(a + c, n)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    dl = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return diff, diff - math.sqrt(max(dl, 0.0)), diff + math.sqrt(max(du, 0.0))


#: largest (informative samples x K) for which :func:`exchangeable_draws` is exact
EXACT_DRAWS = 20_000


def exchangeable_draws(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Two-sided p-value that two sets of K draws per sample are exchangeable: ``a[i]`` and
    ``b[i]`` count the correct ones among K draws each of sample i (say, a submission's recorded
    draws and a verifier's fresh ones of the same input).

    Conditional exact test: given the ``t = a + b`` correct draws among the 2K of a sample,
    ``a`` is hypergeometric (2K draws, t correct, K drawn) under the null, independently across
    samples; the statistic is ``sum(a)``, its null distribution the convolution, and the p-value
    the probability of an outcome no more likely than the observed one. Samples with all draws
    correct or all wrong say nothing and drop out. A normal approximation (with continuity
    correction) takes over past :data:`EXACT_DRAWS`."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if k < 1 or a.shape != b.shape:
        raise ValueError("need k >= 1 and one count of each side per sample")
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) > k):
        raise ValueError(f"counts must lie in [0, {k}]")
    t = a + b
    keep = (t > 0) & (t < 2 * k)
    a, t = a[keep], t[keep]
    if not a.size:
        return 1.0
    if a.size * k > EXACT_DRAWS:
        q = t / (2 * k)
        mean = float((k * q).sum())
        var = float((k * q * (1 - q) * k / (2 * k - 1)).sum())
        z = max(0.0, abs(float(a.sum()) - mean) - 0.5) / math.sqrt(var)
        return min(1.0, math.erfc(z / math.sqrt(2)))
    total = math.comb(2 * k, k)
    pmf = np.ones(1)
    offset = 0
    for ti in t.tolist():
        lo, hi = max(0, ti - k), min(ti, k)
        p = np.array([math.comb(ti, x) * math.comb(2 * k - ti, k - x) / total
                      for x in range(lo, hi + 1)])
        pmf = np.convolve(pmf, p)
        offset += lo
    observed = pmf[int(a.sum()) - offset]
    return min(1.0, float(pmf[pmf <= observed * (1 + 1e-9)].sum()))
