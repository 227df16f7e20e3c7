"""`genbench compare`: exact McNemar, Newcombe intervals, the regression gate."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.report.compare import Side, compare, render
from benchmark.report.leaderboard import COLUMNS, write_csv
from benchmark.report.stats import mcnemar_exact, newcombe_paired, newcombe_unpaired

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "results" / "reference" / "quick"


def test_mcnemar_exact_hand_computed():
    # X ~ Bin(5, 1/2): P(X <= 0) = 1/32, two-sided 2/32
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # X ~ Bin(10, 1/2): P(X <= 1) = (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    # X ~ Bin(6, 1/2): 2 P(X <= 3) = 2 * 42/64 > 1, capped
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # 20 discordant pairs all one way: 2 / 2**20
    assert mcnemar_exact(0, 20) == pytest.approx(2 / 2**20)


def test_newcombe_unpaired_matches_published_examples():
    # Newcombe (1998), Stat. Med. 17:873, Table II, method 10
    for (x1, n1, x2, n2), (lo, hi) in {(56, 70, 48, 80): (0.0524, 0.3339),
                                       (9, 10, 3, 10): (0.1705, 0.8090),
                                       (5, 56, 0, 29): (-0.0381, 0.1926)}.items():
        d, low, high = newcombe_unpaired(x1, n1, x2, n2)
        assert d == pytest.approx(x1 / n1 - x2 / n2)
        assert low == pytest.approx(lo, abs=5e-5)
        assert high == pytest.approx(hi, abs=5e-5)


def _wilson(x: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = x / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def test_newcombe_paired_by_hand():
    a, b, c, d = 43, 8, 2, 47  # p1 = 51/100, p2 = 45/100
    l1, u1 = _wilson(51, 100)
    l2, u2 = _wilson(45, 100)
    phi = (a * d - b * c) / math.sqrt(51 * 49 * 45 * 55)
    low = 0.06 - math.sqrt((0.51 - l1) ** 2 - 2 * phi * (0.51 - l1) * (u2 - 0.45)
                           + (u2 - 0.45) ** 2)
    high = 0.06 + math.sqrt((u1 - 0.51) ** 2 - 2 * phi * (u1 - 0.51) * (0.45 - l2)
                            + (0.45 - l2) ** 2)
    diff, lo, hi = newcombe_paired(a, b, c, d)
    assert diff == pytest.approx(0.06)
    assert (lo, hi) == pytest.approx((low, high))
    assert (lo, hi) == pytest.approx((-0.000421, 0.119059), abs=1e-6)
    # no correlation: the paired interval is the unpaired one
    d0, lo0, hi0 = newcombe_paired(25, 25, 25, 25)
    assert (lo0, hi0) == pytest.approx(newcombe_unpaired(50, 100, 50, 100)[1:])


# -- planted changes on 200 paired samples ------------------------------------------------

N = 200


def _side(clean: list[int], robust: list[int], *, rows: int = 1, name: str = "x") -> Side:
    records = []
    outcomes = {}
    for i in range(rows):
        row = dict.fromkeys(COLUMNS)
        row.update(defense=f"d{i}", attack="pgd", threat_model="linf", eps=0.1, n=len(robust),
                   clean_acc=sum(clean) / len(clean), robust_acc=sum(robust) / len(robust))
        records.append(row)
        outcomes[(f"d{i}", "pgd", "linf", 0.1)] = {
            "clean": dict(enumerate(clean)), "robust": dict(enumerate(robust))}
    return Side(name, pd.DataFrame(records, columns=COLUMNS), outcomes)


def _outcomes(correct: int, n: int = N) -> list[int]:
    return [1] * correct + [0] * (n - correct)


def test_identical_runs_report_no_regression():
    side = _side(_outcomes(180), _outcomes(120), rows=3)
    deltas = compare(side, side)
    assert len(deltas) == 6
    assert not any(d.regression for d in deltas)
    assert all(d.test == "mcnemar" and d.diff == 0 and d.p_value == 1.0 for d in deltas)


def test_planted_ten_point_drop_fails_the_gate():
    old = _side(_outcomes(180), _outcomes(120))
    new = _side(_outcomes(180), _outcomes(100))  # 20 of 200 samples lost: -10 pp
    robust = [d for d in compare(old, new, margin=2.0) if d.metric == "robust"][0]
    assert robust.diff == pytest.approx(-0.10)
    assert robust.p_value == pytest.approx(2 / 2**20)
    assert robust.regression
    assert robust.ci_high < 0


def test_planted_one_point_drop_inside_margin_passes():
    old = _side(_outcomes(180), _outcomes(120))
    new = _side(_outcomes(180), _outcomes(118))  # -1 pp
    deltas = compare(old, new, margin=2.0)
    assert not any(d.regression for d in deltas)
    # a 1-point drop is also not significant on its own (p = 0.5)
    assert not any(d.regression for d in compare(old, new))


def test_significant_drop_inside_margin_passes_and_outside_fails():
    old = _side(_outcomes(180), _outcomes(120))
    new = _side(_outcomes(180), _outcomes(108))  # -6 pp, p = 2^-11
    assert [d.regression for d in compare(old, new, margin=5.0)] == [False, True]
    assert not any(d.regression for d in compare(old, new, margin=6.5))


def test_unpaired_when_sample_ids_differ():
    old = _side(_outcomes(180), _outcomes(120))
    new = _side(_outcomes(180), _outcomes(100))
    assert new.outcomes is not None
    new.outcomes = {k: {m: {s + 1000: c for s, c in v.items()} for m, v in o.items()}
                    for k, o in new.outcomes.items()}
    robust = [d for d in compare(old, new) if d.metric == "robust"][0]
    assert robust.test == "newcombe"
    assert (robust.diff, robust.ci_low, robust.ci_high) == pytest.approx(
        newcombe_unpaired(100, 200, 120, 200))
    assert robust.regression  # [-19.6, -0.3] pp excludes 0


def _csv(tmp_path: Path, side: Side, name: str) -> Path:
    return write_csv(side.frame, tmp_path / name)


def test_cli_missing_rows_fail_and_markdown(tmp_path, capsys):
    old = _csv(tmp_path, _side(_outcomes(180), _outcomes(120), rows=3), "old.csv")
    new = _csv(tmp_path, _side(_outcomes(180), _outcomes(120), rows=2), "new.csv")
    md = tmp_path / "cmp.md"
    assert main(["compare", str(old), str(old), "--fail-on-regression"]) == 0
    assert main(["compare", str(old), str(new), "--markdown", str(md)]) == 0
    assert main(["compare", str(old), str(new), "--fail-on-regression",
                 "--markdown", str(md)]) == 1
    out = capsys.readouterr().out
    assert "row missing in NEW" in out and "REGRESSION" in out
    text = md.read_text()
    assert "| d2 " in text and "row missing in NEW" in text
    # rows only in NEW are fine
    assert main(["compare", str(new), str(old), "--fail-on-regression"]) == 0


def test_cli_errors_on_bad_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope2")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


needs_reference = pytest.mark.skipif(not (REFERENCE / "runs.sqlite").exists(),
                                     reason="no committed reference run in results/reference/")
#: the reference's fast jobs, recomputed by the default regression-gate test
FAST = ("defense IN ('undefended', 'cnn-at') AND "
        "(attack = 'clean' OR (attack IN ('pgd', 'torchattacks-pgd') AND threat = 'linf'))")


def _limit() -> int:
    return int(json.loads((REFERENCE / "plan.json").read_text())["limit"])


def _gate(capsys, reference: Path, out: Path, md: Path) -> str:
    rc = main(["compare", str(reference), str(out), "--fail-on-regression",
               "--markdown", str(md)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "0 regression(s)" in text
    return text


@needs_reference
def test_regression_gate_recomputes_reference_jobs(tmp_path, capsys):
    """Recompute the reference's clean and PGD jobs on the same ids (--limit) and gate the
    whole table against the committed reference: recomputed rows are compared paired."""
    out = tmp_path / "quick"
    shutil.copytree(REFERENCE, out)
    with sqlite3.connect(out / "runs.sqlite") as conn:
        keys = [k for (k,) in conn.execute(f"SELECT key FROM jobs WHERE {FAST}")]
        n_clean = conn.execute("SELECT COUNT(*) FROM jobs WHERE attack='clean'").fetchone()[0]
        n_jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        # the two CNNs: clean + 2 x 2 l-inf PGD rows + the 2 PGD probes at l-inf 1
        assert len(keys) == 7 * 2
        conn.executemany("DELETE FROM samples WHERE job=?", [(k,) for k in keys])
        conn.executemany("DELETE FROM jobs WHERE key=?", [(k,) for k in keys])
    assert main(["run", "--suite", "quick", "--out", str(out), "--limit", str(_limit()),
                 "--progress", "none"]) == 0
    with sqlite3.connect(out / "runs.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE attack='clean'").fetchone()[0] == \
            n_clean
        stale = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - n_jobs
    # only the deleted jobs were recomputed: a job whose key changed (a new fingerprint) would
    # be run here on every test run and compared against nothing
    assert stale == 0, (f"the committed reference is stale: {stale} jobs `quick` plans today are "
                        "not in it; regenerate it (results/reference/README.md)")
    capsys.readouterr()
    text = _gate(capsys, REFERENCE, out, tmp_path / "gate.md")
    assert "mcnemar" in text
    gate = (tmp_path / "gate.md").read_text()
    assert re.search(r"\| undefended +\| pgd +\| linf", gate)
    assert re.search(r"\| realnvp-clean +\| flow-pgd-in +\| linf .*\| detector", gate)


@needs_reference
@pytest.mark.slow
def test_regression_gate_full_rerun(tmp_path, capsys):
    """The CI gate in full: rerun `quick` from scratch on the reference's ids, compare."""
    out = tmp_path / "quick"
    assert main(["run", "--suite", "quick", "--out", str(out), "--limit", str(_limit()),
                 "--progress", "none"]) == 0
    capsys.readouterr()
    _gate(capsys, REFERENCE, out, tmp_path / "gate.md")


def _density_frame(rejected: float, accepted: float) -> pd.DataFrame:
    rows = [dict(defense="flow", attack="clean", threat_model=math.nan, eps=math.nan, n=50,
                 defense_kind="density", direction=math.nan, accepted=0.96, rejected=math.nan),
            dict(defense="flow", attack="ood", threat_model="linf", eps=0.05, n=50,
                 defense_kind="density", direction="raise", accepted=1 - rejected,
                 rejected=rejected),
            dict(defense="flow", attack="in", threat_model="linf", eps=0.05, n=50,
                 defense_kind="density", direction="lower", accepted=accepted,
                 rejected=1 - accepted)]
    return pd.DataFrame(rows).reindex(columns=[*COLUMNS, "defense_kind"]
                                      if "defense_kind" not in COLUMNS else COLUMNS)


def test_density_rows_compare_the_detector_survival_rate() -> None:
    old = Side("old", _density_frame(rejected=0.9, accepted=0.8), None)
    same = compare(old, Side("new", _density_frame(rejected=0.9, accepted=0.8), None))
    assert [(d.attack, d.metric) for d in same] == [("ood", "detector"), ("in", "detector")]
    assert not any(d.regression for d in same)
    worse = compare(old, Side("new", _density_frame(rejected=0.3, accepted=0.8), None))
    by = {d.attack: d for d in worse}
    assert by["ood"].regression and by["ood"].diff == pytest.approx(-0.6)
    assert not by["in"].regression
    # the clean row (no threat model, no epsilon) is matched, not reported missing
    gone = _density_frame(rejected=0.9, accepted=0.8).iloc[1:]
    missing = compare(old, Side("new", gone, None))
    assert [(d.attack, d.test) for d in missing if d.test == "missing"] == [("clean", "missing")]


# -- epsilons: written in full, matched with a tolerance ------------------------------------

EPS = 8 / 255


def _eps_side(eps_in_frame: float, name: str, robust: list[int]) -> Side:
    """A run-folder side: its CSV rows carry ``eps_in_frame``, its store (outcomes) the exact
    8/255, as a published ``%.6g`` leaderboard next to its store does."""
    side = _side(_outcomes(180), robust, name=name)
    side.frame["eps"] = eps_in_frame
    assert side.outcomes is not None
    side.outcomes = {(d, a, t, EPS): o for (d, a, t, _), o in side.outcomes.items()}
    return side


def test_rounded_csv_epsilon_still_matches_and_pairs():
    rounded = float(f"{EPS:.6g}")
    assert rounded != EPS  # 0.0313725: what "%.6g" made of 8/255
    old = _eps_side(rounded, "old", _outcomes(120))
    new = _eps_side(EPS, "new", _outcomes(100))
    deltas = compare(old, new, margin=2.0)
    assert [d.metric for d in deltas] == ["clean", "robust"]  # matched, not "row missing"
    assert all(d.test == "mcnemar" for d in deltas)  # the store's outcomes were found: paired
    robust = deltas[1]
    assert robust.regression and robust.p_value == pytest.approx(2 / 2**20)


def test_distinct_epsilons_are_not_merged():
    old = _eps_side(0.031, "old", _outcomes(120))  # a different epsilon, not a rounding
    new = _eps_side(EPS, "new", _outcomes(120))
    assert [d.test for d in compare(old, new)] == ["missing"]


def test_write_csv_keeps_epsilons_exact_and_other_numbers_readable(tmp_path):
    from benchmark.report.leaderboard import read_csv

    frame = _side(_outcomes(180), _outcomes(120)).frame
    frame["eps"] = EPS
    frame["robust_acc"] = 1 / 3
    path = write_csv(frame, tmp_path / "lb.csv")
    text = path.read_text()
    assert repr(EPS) in text and ",0.333333," in text
    back = read_csv(path)
    assert back["eps"].iloc[0] == EPS  # bit for bit: rows match their jobs


def test_output_names_the_test_of_each_row(tmp_path, capsys):
    old = _csv(tmp_path, _side(_outcomes(180), _outcomes(120)), "old.csv")
    assert main(["compare", str(old), str(old)]) == 0
    out = capsys.readouterr().out
    assert "newcombe (unpaired)" in out
    assert "unpaired: OLD has no per-sample outcomes" in out
    assert "tests used: 2 newcombe (unpaired)" in out
    text = render(compare(*(2 * [_side(_outcomes(180), _outcomes(120))])))
    assert "mcnemar (paired)" in text and "tests used: 2 mcnemar (paired)" in text


def test_exchangeable_draws_by_hand_and_calibration():
    from benchmark.report.stats import exchangeable_draws

    # one sample, K = 3, 4 correct of 6 draws: recorded 3 has probability C(4,3) C(2,0) / C(6,3)
    # = 4/20; recorded 1 the same, recorded 2 12/20: two-sided p = 8/20
    assert exchangeable_draws([3], [1], 3) == pytest.approx(8 / 20)
    assert exchangeable_draws([2], [2], 3) == 1.0
    assert exchangeable_draws([3, 0], [3, 0], 3) == 1.0  # all or none correct: uninformative
    # every recorded draw correct, the fresh ones mostly not: not the same defense
    assert exchangeable_draws([3] * 8, [1, 2, 1, 2, 3, 0, 2, 1], 3) < 1e-3
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(400, 40))
    ps = np.array([exchangeable_draws(rng.binomial(3, q), rng.binomial(3, q), 3) for q in p])
    assert (ps < 0.05).mean() <= 0.07  # a genuine submission fails at (at most about) the level
    big = rng.uniform(size=4000)  # the normal approximation past EXACT_DRAWS
    assert exchangeable_draws(rng.binomial(10, big), rng.binomial(10, big), 10) > 0.01
    assert exchangeable_draws(np.full(4000, 10), rng.binomial(10, big), 10) < 1e-6
