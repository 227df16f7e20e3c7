"""scripts/pfode_findings.py (issue 17): its statistics and its refusals. The script itself
runs on a PF-ODE density run (hours of CPU), so only its pure parts are tested here."""

from __future__ import annotations

import numpy as np
import pytest

from tests.toys import load_script


def _script():
    return load_script("pfode_findings")


def test_difference_interval_is_unpaired_and_covers_the_true_difference():
    mod = _script()
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 300)
    m, lo, hi = mod.difference_interval(a, b)
    assert m == pytest.approx(a.mean() - b.mean())
    assert lo < 1.0 < hi and hi - lo < 0.5
    # unpaired: samples of different sizes, and a shift of one sample moves only the mean
    m2, lo2, hi2 = mod.difference_interval(a + 5.0, b)
    assert m2 == pytest.approx(m + 5.0) and lo2 == pytest.approx(lo + 5.0)
    # equal samples: the interval straddles 0 ("not shown")
    _, lo3, hi3 = mod.difference_interval(b, b)
    assert lo3 < 0 < hi3


def test_refuses_a_folder_that_is_not_a_run(tmp_path):
    mod = _script()
    with pytest.raises(SystemExit, match="not a run folder"):
        mod.main([str(tmp_path)])
