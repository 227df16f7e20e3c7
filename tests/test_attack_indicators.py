"""Pintor et al. (2022)'s indicators of attack failure read from per-sample attack-path
evidence: silent success, incomplete optimization and transfer failure. Oracles for the
per-sample rule and the curve binning, the evidence PGD reports on a linear model, each flag
fired end to end by a run that must trip it (and not by one that must not), and the runner's
refusal of malformed evidence."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attacks._ascent import LossCurve
from attacks.pgd import PGD
from benchmark.report.evidence import collect_evidence
from benchmark.report.flags import compute_flags, still_rising
from benchmark.report.leaderboard import build_leaderboard
from benchmark.run.harness import run_suite
from benchmark.spec.suite import parse_suite
from benchmark.store import Store
from tests.toys import Linear, single_thread
from threat_models.linf import LinfThreat

# -- the per-sample rule -------------------------------------------------------------------------

def test_still_rising_follows_pintor_et_al():
    steps = list(range(11))
    assert still_rising([float(s) for s in steps])  # linear: +0.2 over the last tenth
    assert not still_rising([min(s, 5.0) for s in steps])  # flat since half-way
    # the running best, not the last value: a late dip does not make a curve incomplete
    assert not still_rising([0, 5, 9, 10, 10, 10, 10, 10, 10, 10, 3.0])
    # the threshold: the last tenth (2 of 11 points, from the one before them) rises by 0.04
    # and by 0.06 of the curve's range
    assert not still_rising([0, .96, .96, .96, .96, .96, .96, .96, .96, .98, 1.0])
    assert still_rising([0, .94, .94, .94, .94, .94, .94, .94, .94, .97, 1.0])
    assert not still_rising([3.0] * 11)  # constant: nothing to optimize
    assert not still_rising([0.0, 1.0])  # too short to say
    assert still_rising([None, 0.0, float("nan"), 1.0, 2.0, 3.0])  # non-finite points dropped
    assert not still_rising([-1.0, -0.5, 0.0, 0.0, 0.0])  # scale-free: any sign and range


def test_loss_curve_bins_are_means_of_consecutive_evaluations():
    curve = LossCurve(bins=3)
    for step in range(7):
        curve(step, torch.tensor([float(step), 10.0 * step]))
    got = curve.binned()
    # 7 evaluations split 3 / 2 / 2
    assert torch.allclose(got, torch.tensor([[1.0, 3.5, 5.5], [10.0, 35.0, 55.0]]))
    assert LossCurve(bins=50).binned().shape == (0, 0)
    with pytest.raises(ValueError, match="bins"):
        LossCurve(bins=0)


def test_pgd_reports_its_path_on_a_linear_model():
    torch.manual_seed(0)
    model = Linear(torch.randn(3, 8))
    x = torch.rand(6, 1, 2, 4)
    y = model(x).argmax(1)
    threat = LinfThreat(0.3)
    result = PGD(steps=10, random_start=False).run(model, x, y, threat)
    curve, found = result.evidence["loss_curve"], result.evidence["any_adversarial"]
    assert curve.shape == (6, 11) and found.shape == (6,) and found.dtype == torch.bool
    # the first evaluation is the clean input (no random start): its cross-entropy
    assert torch.allclose(curve[:, 0], F.cross_entropy(model(x), y, reduction="none"),
                          atol=1e-6)
    # deterministic model: a success was kept, so "found" is exactly "the result fools it"
    assert torch.equal(found, model(result.x_adv).argmax(1) != y)
    # where nothing succeeded PGD returns its highest-loss iterate: the curve's maximum (one
    # evaluation per bin here)
    assert (~found).any()
    ce = F.cross_entropy(model(result.x_adv), y, reduction="none")
    assert torch.allclose(ce[~found], curve[~found].max(dim=1).values, atol=1e-5)


# -- end to end: each flag fired by a run that must trip it -------------------------------------

SUITE = """
[suite]
name = "indicators"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 3
batch_size = 8
shard_size = 8
unconstrained_probe = 0

[[defenses]]
id = "cnn-at"
name = "undefended"
params = { model = "digits-cnn-at" }

[[defenses]]
id = "reattached"
name = "tests.masking_traps:Reattached"
params = { model = "digits-cnn-at" }

[[defenses]]
id = "rough"
name = "tests.flag_toys:Rough"

[[attacks]]
id = "pgd"
name = "pgd"
params = { steps = 20 }

# 1e-4 per step: nowhere near the boundary after 10 steps, the loss still climbing linearly
[[attacks]]
id = "pgd-crawl"
name = "pgd"
params = { steps = 10, step_size = 0.0001, random_start = false }
defenses = ["cnn-at", "reattached"]

[[attacks]]
id = "forgetful"
name = "tests.flag_toys:Forgetful"
defenses = ["cnn-at"]

[[attacks]]
id = "transfer"
name = "transfer"
params = { source = "digits-cnn", attack = "pgd", steps = 10 }
defenses = ["cnn-at"]

[[threat_models]]
name = "linf"
eps = [0.1, 0.3]
"""


@pytest.fixture(scope="module")
def indicated(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("indicators")
    suite = parse_suite(SUITE, source="indicators.toml")
    with single_thread():
        summary = run_suite(suite, out, limit=8, progress="none", log=lambda _: None)
    with Store(out / "runs.sqlite") as store:
        frame = build_leaderboard(store, summary.plan)
        evidence = collect_evidence(store, summary.plan)
    frame["flags"] = compute_flags(frame, evidence)
    frame.attrs["evidence"] = evidence
    return frame


def _flags(frame: pd.DataFrame, defense: str, attack: str, eps: float = 0.1) -> set[str]:
    rows = frame[(frame.defense == defense) & (frame.attack == attack) & (frame.eps == eps)]
    assert len(rows) == 1, (defense, attack)
    return {f for f in str(rows["flags"].iloc[0]).split(";") if f}


def test_evidence_is_stored_per_sample(indicated):
    per = indicated.attrs["evidence"].per_sample[("cnn-at", "pgd", "linf", 0.3)]
    assert set(per) == {"any_adversarial", "first_adversarial", "loss_curve"}
    assert sorted(per["loss_curve"]) == sorted(per["any_adversarial"]) and len(per[
        "loss_curve"]) == 8
    assert all(len(c) == 21 for c in per["loss_curve"].values())  # 20 steps + the final one
    # deterministic defense, PGD keeps its successes: a sample it found is not robust, a robust
    # one was never found (both kinds occur over the two epsilons)
    kinds = set()
    for eps in (0.1, 0.3):
        ev = indicated.attrs["evidence"]
        found = ev.per_sample[("cnn-at", "pgd", "linf", eps)]["any_adversarial"]
        robust = ev.robust[("cnn-at", "pgd", "linf", eps)]
        assert sorted(found) == sorted(robust)
        assert not any(found[s] and robust[s] for s in found)
        kinds |= {(found[s], robust[s]) for s in found}
    assert {(True, 0), (False, 1)} <= kinds


def test_silent_success_fires_on_an_attack_that_returns_the_clean_image(indicated):
    assert "silent_success" in _flags(indicated, "cnn-at", "forgetful", 0.3)
    assert "silent_success" not in _flags(indicated, "cnn-at", "pgd", 0.3)
    # PGD broke those samples: the worst case (0% here) is not in doubt
    assert "silent_success" not in _flags(indicated, "cnn-at", "worst_case", 0.3)


def test_incomplete_optimization_fires_on_a_crawling_attack_only(indicated):
    assert "incomplete_optimization" in _flags(indicated, "cnn-at", "pgd-crawl")
    # the 20-step PGD and the curve-less forgetful attack left the same samples robust: the
    # worst case does not rest on the crawling attack alone
    assert "incomplete_optimization" not in _flags(indicated, "cnn-at", "worst_case")
    # zero gradients: PGD never moves, the curve is flat, nothing is left to optimize (the
    # masking is bad_gradients' to report)
    row = indicated[(indicated.defense == "reattached") & (indicated.attack == "pgd-crawl")]
    assert row["robust_acc"].notna().all() and (row["robust_acc"] > 0).all()
    assert "incomplete_optimization" not in _flags(indicated, "reattached", "pgd-crawl")
    assert "bad_gradients" in _flags(indicated, "reattached", "pgd-crawl")


def test_transfer_failure_is_the_transfer_rows_own(indicated):
    """The undefended CNN's examples fool it and mostly not the adversarially trained one:
    the transfer row measures the surrogate; the worst case does not inherit it."""
    ev = indicated.attrs["evidence"]
    fooled = ev.per_sample[("cnn-at", "transfer", "linf", 0.1)]["source_adversarial"]
    assert sum(fooled.values()) >= 6  # PGD at 0.1 breaks the undefended CNN
    assert "transfer_failure" in _flags(indicated, "cnn-at", "transfer")
    assert "transfer_failure" not in _flags(indicated, "cnn-at", "worst_case")
    assert "transfer_failure" not in _flags(indicated, "cnn-at", "pgd")


@pytest.mark.parametrize("what, message", [("length", "one entry per sample"),
                                           ("name", "made_up")])
def test_malformed_evidence_is_an_error_row(tmp_path, what, message):
    suite = parse_suite(f"""
[suite]
name = "bad-evidence"
dataset = "digits"
subset = "test100-v1"
seed = 0
unconstrained_probe = 0

[[defenses]]
name = "undefended"

[[attacks]]
name = "tests.flag_toys:BadEvidence"
params = {{ what = "{what}" }}

[[threat_models]]
name = "linf"
eps = [0.1]
""", source="bad.toml")
    with single_thread():
        run_suite(suite, tmp_path, limit=4, progress="none", log=lambda _: None)
    with Store(tmp_path / "runs.sqlite") as store:
        errors = [j["error"] for j in store.jobs() if j["status"] == "error"]
    assert len(errors) == 1 and message in errors[0] and "evidence" in errors[0]


def test_prediction_instability_oracles():
    from benchmark.run.diagnostics import prediction_instability

    x = torch.rand(5, 1, 2, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    const = Linear(torch.zeros(3, 8), torch.tensor([1.0, 2.0, 3.0]))
    assert prediction_instability(const, x, y) == 0.0
    # a linear model: the same noise drawn by hand, the margin's relative change averaged
    torch.manual_seed(0)
    model = Linear(torch.randn(3, 8))
    g = torch.Generator().manual_seed(7)
    noise = (torch.rand((4, *x.shape), generator=g) - 0.5) * 0.1
    def margin(z):
        logits = model(z).double()
        true = logits[torch.arange(len(z)), y]
        other = logits.clone()
        other[torch.arange(len(z)), y] = float("-inf")
        return true - other.amax(dim=1)
    m0 = margin(x)
    want = torch.stack([((margin((x + u).clamp(0, 1)) - m0).abs() / m0.abs()).clamp(max=1)
                        for u in noise]).mean()
    got = prediction_instability(model, x, y, radius=0.1, draws=4, seed=7)
    assert got == pytest.approx(float(want), rel=1e-9)


def test_unstable_predictions_flag_the_rough_defense_only(indicated):
    diag = indicated.attrs["evidence"].diagnostics
    assert diag["rough"]["instability"] > 0.1 > diag["cnn-at"]["instability"]
    assert "unstable_predictions" in _flags(indicated, "rough", "pgd")
    assert "unstable_predictions" in _flags(indicated, "rough", "worst_case")
    assert "unstable_predictions" not in _flags(indicated, "cnn-at", "worst_case")


def test_single_step_probe_is_planned_once_per_cell():
    from benchmark.spec.jobs import SINGLE_STEP
    from benchmark.spec.plan import plan_suite

    plan = plan_suite(parse_suite(SUITE, source="indicators.toml"), limit=8)
    probes = [j for j in plan.jobs if j.probe == SINGLE_STEP]
    # three classifiers x two epsilons, each with PGD (20 steps) as its first iterative attack
    assert sorted((j.defense.id, j.eps) for j in probes) == sorted(
        (d, e) for d in ("cnn-at", "reattached", "rough") for e in (0.1, 0.3))
    for j in probes:
        assert j.attack is not None and j.attack.id == "pgd@1-step" and j.attack.name == "pgd"
        assert j.attack.kwargs() == {"steps": 1} and len(j.sample_ids) == 4
        assert "single-step probe" in j.label()
    assert len({j.key for j in probes}) == len(probes)
    # never a row: the leaderboard has no 1-step PGD row
    off = parse_suite(SUITE.replace("unconstrained_probe = 0",
                                    "unconstrained_probe = 0\nsingle_step_probe = 0"),
                      source="off.toml")
    assert not [j for j in plan_suite(off, limit=8).jobs if j.probe]
    with pytest.raises(ValueError, match="single_step_probe"):
        parse_suite(SUITE.replace("unconstrained_probe = 0", "single_step_probe = -1"),
                    source="bad.toml")


def test_single_step_probe_flags_an_iterative_attack_that_crawls(indicated):
    """At l-inf 0.3 one full-size step breaks digits the 1e-4-per-step PGD leaves robust; the
    20-step PGD breaks at least as many."""
    ev = indicated.attrs["evidence"]
    probe = ev.single_step[("cnn-at", "linf", 0.3)]
    assert len(probe) == 4 and not all(probe.values())
    assert "single_step_beats_iterative" in _flags(indicated, "cnn-at", "pgd-crawl", 0.3)
    assert "single_step_beats_iterative" not in _flags(indicated, "cnn-at", "pgd", 0.3)
    # the worst case counts the probe's samples broken (the 20-step PGD broke them): no doubt
    worst = ev.robust[("cnn-at", "worst_case", "linf", 0.3)]
    assert not any(worst.get(s) == 1 for s, ok in probe.items() if not ok)
    assert "single_step_beats_iterative" not in _flags(indicated, "cnn-at", "worst_case", 0.3)
    # ... had every attack left one of them robust, the worst case would carry the flag
    from benchmark.report.flags import compute_flags

    doubted = copy.deepcopy(ev)
    broken = next(s for s, ok in probe.items() if not ok)
    doubted.robust[("cnn-at", "worst_case", "linf", 0.3)][broken] = 1
    frame = indicated.drop(columns=["flags"])
    frame["flags"] = compute_flags(frame, doubted)
    assert "single_step_beats_iterative" in _flags(frame, "cnn-at", "worst_case", 0.3)
    pgd = indicated[indicated["attack"] == "pgd"]  # no probe row: 3 defenses x 2 epsilons
    assert len(pgd) == 6 and set(pgd["steps"]) == {20}


# -- attack efficiency ---------------------------------------------------------------------------

def test_unbroken_curve_and_convergence_oracles():
    from benchmark.report.efficiency import converged_at, unbroken_curve

    # four samples fooled at evaluations 0, 2, 2 and never, over 5 evaluations
    curve = unbroken_curve({1: 0, 2: 2, 3: 2, 4: -1}, [1, 2, 3, 4], 5)
    assert curve.tolist() == [0.75, 0.75, 0.25, 0.25, 0.25]
    assert converged_at(curve) == 2
    assert converged_at(np.array([0.5, 0.5, 0.5])) == 0  # flat from the start
    assert converged_at(np.array([1.0, 0.6, 0.505, 0.5]), tol=0.01) == 2
    assert unbroken_curve({}, [], 5).size == 0


def test_pgd_reports_when_each_sample_first_fell():
    torch.manual_seed(0)
    model = Linear(torch.randn(3, 8))
    x = torch.rand(6, 1, 2, 4)
    y = model(x).argmax(1)
    result = PGD(steps=10, restarts=2, random_start=False).run(model, x, y, LinfThreat(0.3))
    first, found = result.evidence["first_adversarial"], result.evidence["any_adversarial"]
    assert first.dtype == torch.long and torch.equal(first >= 0, found)
    assert (first < 22).all()  # (10 steps + the final iterate) x 2 restarts
    # evaluation 0 is the clean input, which every sample's own label classifies correctly
    assert (first != 0).all()


def test_efficiency_table_and_published_curves(indicated, tmp_path):
    from benchmark.report import efficiency as eff

    table = eff.efficiency_table(indicated, indicated.attrs["evidence"])
    row = table[(table.defense == "cnn-at") & (table.attack == "pgd") & (table.eps == 0.3)]
    assert len(row) == 1 and row["evaluations"].item() == 21
    assert row["final_unbroken"].item() == 0.0  # every sample fell (robust 0% at 0.3)
    assert 0 < row["converged_at"].item() <= 21
    assert "transfer" not in set(table.attack)  # no path evidence about the defense
    plots = eff.write_efficiency_plots(table, tmp_path / "plots")
    assert plots == ["plots/efficiency_linf.png"] and (tmp_path / plots[0]).stat().st_size
    eff.efficiency_csv(table, tmp_path / "efficiency.csv")
    text = (tmp_path / "efficiency.csv").read_text()
    assert text.startswith("defense,attack,threat_model,eps") and "converged_at" in text


def test_worst_case_path_flags_judge_the_worst_cases_own_robust_samples():
    """Sample 1 is robust in the worst case; sample 2 is broken. Silent success and incomplete
    optimization on the worst case look at sample 1 only, across every white-box attack."""
    from benchmark.report.evidence import FlagEvidence

    rising, flat = [0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 3.0, 3.0]

    def frame(*attacks):
        rows = [dict(defense="d", defense_params="{}", attack=a, attack_name=a,
                     threat_model="linf", eps=0.1, robust_acc=0.5, stochastic=False,
                     n_errors=0, error=None, code_version="x", attack_params="{}",
                     steps=3, eot_draws=1, robust_ci_low=0.1, robust_ci_high=0.9)
                for a in (*attacks, "worst_case")]
        return pd.DataFrame(rows)

    def evidence(per):
        ev = FlagEvidence(robust={("d", a, "linf", 0.1): {1: 1, 2: 0} for a in
                                  ("pgd", "autoattack", "worst_case")})
        ev.per_sample = {("d", a, "linf", 0.1): v for a, v in per.items()}
        return ev

    def worst(f, ev):
        flags = compute_flags(f, ev)
        return set(flags[f.attack == "worst_case"].item().split(";")) - {""}

    hit = evidence({"pgd": {"any_adversarial": {1: True}, "loss_curve": {1: rising}}})
    assert worst(frame("pgd"), hit) == {"silent_success", "incomplete_optimization"}
    # broken sample 2 alone found / still rising: nothing in doubt
    only2 = evidence({"pgd": {"any_adversarial": {2: True}, "loss_curve": {1: flat,
                                                                            2: rising}}})
    assert worst(frame("pgd"), only2) == set()
    # an attack without a curve agreeing on sample 1 is evidence of convergence
    both = evidence({"pgd": {"loss_curve": {1: rising}}, "autoattack": {}})
    assert "incomplete_optimization" not in worst(frame("pgd", "autoattack"), both)
