import math

import numpy as np
import pytest

from benchmark.report.stats import aggregate, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Hand-computed with z = 1.959964: centre = (p + z^2/2n)/(1 + z^2/n),
        # half = z sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n).
        (8, 10, 0.4901624, 0.9433178),
        (0, 10, 0.0, 0.2775328),
        (10, 10, 0.7224672, 1.0),
        (50, 100, 0.4038315, 0.5961685),
    ],
)
def test_wilson_matches_hand_computed_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-6)
    assert hi == pytest.approx(high, abs=1e-6)


def test_wilson_empty_and_invalid():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_aggregate_three_views_of_k_draws():
    # k = 4 draws; counts per sample
    acc = aggregate(np.array([4, 3, 2, 0]), 4)
    assert acc.n == 4
    assert acc.mean == pytest.approx((4 + 3 + 2 + 0) / 16)
    assert acc.majority == pytest.approx(2 / 4)  # 4 and 3 are > k/2; 2 is a tie -> not robust
    assert acc.worst == pytest.approx(1 / 4)
    assert acc.ci_low < acc.majority < acc.ci_high


def test_aggregate_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        aggregate(np.array([4]), 3)
    with pytest.raises(ValueError, match="k must be"):
        aggregate(np.array([1]), 0)
