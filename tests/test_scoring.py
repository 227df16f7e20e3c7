import math

import numpy as np
import pytest
import torch

from benchmark.report.stats import aggregate, wilson_interval
from benchmark.run.runner import (
    DEFENSE_FAILED,
    majority_draws_left,
    score_adversarial,
    sequential_majority,
)


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


# -- sequential majority draws (the automatic probes) -------------------------------------------

class _Scripted(torch.nn.Module):
    """Draw j of sample i is correct iff ``script[i, j]``: sample i is the image filled with i,
    label 0; a correct draw puts the top logit on class 0, a wrong one on class 1. Counts the
    forwards each sample gets; with ``bad`` set, those samples' logits are NaN; with ``raise_on``
    set, a batch holding that sample raises."""

    stochastic = True

    def __init__(self, script, bad=(), raise_on=None):
        super().__init__()
        self.script, self.bad, self.raise_on = script, set(bad), raise_on
        self.seen = np.zeros(len(script), dtype=int)

    def forward(self, x):
        ids = x[:, 0, 0, 0].round().long().tolist()
        if self.raise_on in ids:
            raise RuntimeError("solver diverged")
        out = torch.zeros(len(ids), 3)
        for row, i in enumerate(ids):
            out[row, 0 if self.script[i, self.seen[i]] else 1] = 1.0
            self.seen[i] += 1
            if i in self.bad:
                out[row] = float("nan")
        return out


def _images(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 10])
def test_sequential_majority_gives_the_full_k_verdict_with_fewer_draws(k):
    rng = np.random.default_rng(k)
    script = rng.random((200, k)) < rng.random((200, 1))  # per-sample success rates
    script[0], script[1] = True, False  # always right, always fooled
    defense = _Scripted(script)
    counts, reasons = sequential_majority(defense, _images(200), torch.zeros(200, dtype=torch.long),
                                          k, 3, batch_size=7, who="scripted")
    full = 2 * script.sum(axis=1) > k
    assert ((2 * counts.numpy() > k) == full).all()
    assert reasons == [None] * 200
    assert (defense.seen <= k).all()
    assert defense.seen[0] == k // 2 + 1 and defense.seen[1] == k - k // 2
    assert (counts.numpy() == script[np.arange(200)[:, None], np.arange(k)[None]].cumsum(
        axis=1)[np.arange(200), defense.seen - 1]).all()  # the correct draws actually seen
    if k >= 4:
        assert defense.seen.sum() < 200 * k


def test_majority_draws_left_is_zero_exactly_when_decided():
    k = 10
    for c in range(k + 1):
        for w in range(k + 1 - c):
            left = int(majority_draws_left(torch.tensor(c), torch.tensor(w), k))
            decided = 2 * c > k or 2 * (k - w) <= k
            assert (left == 0) == decided, (c, w)
            assert c + w + left <= k


def test_sequential_majority_failures_count_zero_with_a_reason():
    script = np.ones((6, 10), dtype=bool)
    counts, reasons = sequential_majority(_Scripted(script, bad={2}), _images(6),
                                          torch.zeros(6, dtype=torch.long), 10, 3, 64, "nan")
    assert counts.tolist() == [6, 6, 0, 6, 6, 6]
    assert reasons[2].startswith(DEFENSE_FAILED) and "non-finite" in reasons[2]
    assert [r for i, r in enumerate(reasons) if i != 2] == [None] * 5
    counts, reasons = sequential_majority(_Scripted(script, raise_on=4), _images(6),
                                          torch.zeros(6, dtype=torch.long), 10, 3, 5, "raises")
    assert counts[4] == 0 and "RuntimeError: solver diverged" in reasons[4]
    assert counts[5] == 6 and reasons[5] is None  # its draws never shared a batch with 4's


def test_only_probes_score_sequentially():
    script = np.zeros((4, 10), dtype=bool)
    for sequential, draws in ((False, 10), (True, 5)):
        defense = _Scripted(script)
        score_adversarial(defense, None, _images(4), torch.zeros(4, dtype=torch.long), 10, 3,
                          40, "d", sequential=sequential)
        assert defense.seen.tolist() == [draws] * 4
