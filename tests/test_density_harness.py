"""Density defenses in the harness: planning, execution, resumption, leaderboard columns
(against hand computations on an exact Gaussian density), threat violations and plots.

The toys (named in suites as ``tests.test_density_harness:Class``):

* :class:`GaussianDensity`: log p(x) = sum_i log N(x_i; mu, sigma^2), exact;
* :class:`AwayFromMean`: in-distribution ("lower") l-inf attack moving every pixel away from
  mu by ``overshoot * eps`` (overshoot > 1 breaks the threat model on purpose);
* :class:`NoiseTowardMean`: out-of-distribution ("raise") attack drawing uniform noise from the
  harness's generator and moving it toward mu by eps.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.density import DensityDefense
from benchmark.api.threat import ThreatModel
from benchmark.report.density import (
    acceptance_threshold,
    bootstrap_mean_interval,
    quantile_interval,
)
from benchmark.report.leaderboard import read_csv, render_markdown
from benchmark.report.stats import wilson_interval
from benchmark.report.tables import write_tables
from benchmark.run.harness import run_suite
from benchmark.spec.plan import plan_suite
from benchmark.spec.suite import parse_suite
from benchmark.store import Store

TOYS = "tests.test_density_harness"
LN2 = math.log(2.0)


class GaussianDensity(DensityDefense):
    stochastic = False
    bpd_offset = 8.0

    def __init__(self, *, mu: float = 0.5, sigma: float = 0.3) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.dim = 256

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x.flatten(1).double() - self.mu) / self.sigma
        return (-0.5 * z.pow(2) - math.log(self.sigma * math.sqrt(2 * math.pi))).sum(1)


def gaussian_logp(x: np.ndarray, mu: float = 0.5, sigma: float = 0.3) -> np.ndarray:
    z = (x.reshape(len(x), -1).astype(np.float64) - mu) / sigma
    return (-0.5 * z**2 - math.log(sigma * math.sqrt(2 * math.pi))).sum(1)


class _ToyDensityAttack(Attack):
    direction: ClassVar[str]
    start: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset({"kind:density"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"linf"})

    def __init__(self, *, steps: int = 4, overshoot: float = 1.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        self.steps, self.overshoot = steps, overshoot

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps)

    def _walk(self, defense: Any, x0: Tensor, target_sign: Tensor, eps: float) -> AttackResult:
        step = self.overshoot * eps / self.steps
        x, curve = x0.clone(), [defense.attack_log_prob(x0)]
        for _ in range(self.steps):
            x = (x + step * target_sign).clamp(0, 1)
            curve.append(defense.attack_log_prob(x))
        return AttackResult(x_adv=x, grad_evals=self.steps * len(x0),
                            extras={"x_start": x0, "curve": torch.stack(curve),
                                    "direction": self.direction})


class AwayFromMean(_ToyDensityAttack):
    name = "toy-away"
    direction = "lower"
    start = "test"

    def run(self, defense: Any, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        return self._walk(defense, x, torch.sign(x - defense.mu), threat.eps)


class NoiseTowardMean(_ToyDensityAttack):
    name = "toy-noise"
    direction = "raise"
    start = "generated"

    def run(self, defense: Any, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        x0 = torch.rand(x.shape, generator=generator, device=x.device)
        return self._walk(defense, x0, torch.sign(defense.mu - x0), threat.eps)


def density_suite(*, overshoot: float = 1.0, extra_defense: str = "", shard: int = 8,
                  eps: str = "[0.02, 0.05]") -> str:
    return f"""
[suite]
name = "dens"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 3
batch_size = 8
shard_size = {shard}

[[defenses]]
id = "gauss"
name = "{TOYS}:GaussianDensity"
params = {{ mu = 0.5, sigma = 0.3 }}
{extra_defense}

[[attacks]]
id = "away"
name = "{TOYS}:AwayFromMean"
params = {{ steps = 4, overshoot = {overshoot} }}

[[attacks]]
id = "noise"
name = "{TOYS}:NoiseTowardMean"
params = {{ steps = 4 }}

[[attacks]]
name = "pgd"
params = {{ steps = 2, random_start = false }}

[[threat_models]]
name = "linf"
eps = {eps}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("dens") / "run"
    suite = parse_suite(density_suite(), "dens.toml")
    summary = run_suite(suite, out, limit=16, progress="none", log=lambda m: None)
    assert summary.errors == 0
    return out, read_csv(write_tables(summary.out, summary.plan).csv)


def test_plan_density_jobs_and_skips() -> None:
    suite = parse_suite(density_suite(extra_defense='[[defenses]]\nid = "cnn"\n'
                                      'name = "undefended"\nparams = { model = "digits-cnn" }\n'),
                        "dens.toml")
    plan = plan_suite(suite, limit=16)
    assert plan.kinds == {"gauss": "density", "cnn": "classifier"}
    assert plan.attack_info["away"] == {"direction": "lower", "start": "test"}
    assert plan.attack_info["noise"] == {"direction": "raise", "start": "generated"}
    gauss = [j for j in plan.jobs if j.defense.id == "gauss"]
    # clean: 2 shards; (away, noise) x 2 eps x 2 shards
    assert sorted(j.attack_id for j in gauss) == ["away"] * 4 + ["clean"] * 2 + ["noise"] * 4
    reasons = {(s["defense"], s["attack"]): s["reason"] for s in plan.skipped}
    assert "kind:classifier" in reasons[("gauss", "pgd")]
    assert "kind:density" in reasons[("cnn", "away")]
    assert "kind:density" in reasons[("cnn", "noise")]
    cnn = {j.attack_id for j in plan.jobs if j.defense.id == "cnn"}
    assert cnn == {"clean", "pgd", "pgd@1-step"}  # the classifier's single-step probe
    assert not [j for j in gauss if j.probe]  # density defenses get no probes


def test_classifier_job_keys_unchanged() -> None:
    """Job keys hash the JobSpec's fields (minus its display labels), never the defense's
    kind: planning density defenses left the stored spec of classification jobs as it was."""
    suite = parse_suite(density_suite(extra_defense='[[defenses]]\nid = "cnn"\n'
                                      'name = "undefended"\nparams = { model = "digits-cnn" }\n'),
                        "dens.toml")
    job = next(j for j in plan_suite(suite, limit=8).jobs if j.defense.id == "cnn")
    assert set(job.to_json()) == {
        "suite", "dataset", "dataset_params", "subset_id", "subset_hash", "defense",
        "defense_params", "attack", "threat", "eps", "sample_ids", "seed", "k_draws",
        "batch_size", "shard", "resolved"}


def _clean_logp(n: int = 16) -> np.ndarray:
    from benchmark.data import load_dataset
    from benchmark.data.subsets import get_subset

    ds = load_dataset("digits")
    ids = list(get_subset("digits", "test100-v1").ids[:n])
    index = {int(i): r for r, i in enumerate(ds.test.ids.tolist())}
    return gaussian_logp(ds.test.x[[index[i] for i in ids]].numpy())


def test_leaderboard_against_hand_computation(run16: tuple[Path, pd.DataFrame]) -> None:
    out, frame = run16
    dens = frame[frame.defense_kind == "density"]
    assert set(frame.defense_kind) == {"density"}
    assert frame.robust_acc.isna().all() and frame.clean_acc.isna().all()
    logp = _clean_logp()
    tau = np.quantile(logp, 0.05)  # linear interpolation
    clean = dens[dens.attack == "clean"].iloc[0]
    assert clean.n == 16
    assert clean.threshold_logp == pytest.approx(tau, rel=1e-5)
    assert clean.threshold_bpd == pytest.approx(-tau / (256 * LN2) + 8, rel=1e-5)
    lo, hi = quantile_interval(logp, 0.05)
    assert clean.threshold_ci_low == lo and clean.threshold_ci_high == pytest.approx(hi, rel=1e-5)
    assert lo == -math.inf and hi >= tau  # n = 16 cannot bound the 5% quantile from below
    acc = int((logp >= tau).sum())
    assert acc == 15
    assert clean.accepted == pytest.approx(acc / 16)
    assert (clean.accepted_ci_low, clean.accepted_ci_high) == pytest.approx(
        wilson_interval(acc, 16), abs=1e-6)
    bpd = -logp / (256 * LN2) + 8
    assert clean.nll_bpd_before == pytest.approx(bpd.mean(), rel=1e-5)
    assert clean.nll_bpd_before_ci_low < bpd.mean() < clean.nll_bpd_before_ci_high

    plan = plan_suite(parse_suite(density_suite(), "dens.toml"), limit=16)
    with Store(out / "runs.sqlite") as store:
        for aid, eps in [(a, e) for a in ("away", "noise") for e in (0.02, 0.05)]:
            keys = [j.key for j in plan.jobs if j.attack_id == aid and j.eps == eps]
            adv = np.concatenate([np.stack([a for _, a in sorted(
                store.adversarial(k, (1, 16, 16)).items())]) for k in keys])
            after = gaussian_logp(adv)
            b_after = -after / (256 * LN2) + 8
            row = dens[(dens.attack == aid) & (dens.eps == eps)].iloc[0]
            assert row.n == 16 and row.n_errors == 0 and pd.isna(row["flags"])  # no flag
            assert row.threshold_logp == clean.threshold_logp
            assert row.nll_bpd_after == pytest.approx(b_after.mean(), rel=1e-5)
            if aid == "away":
                assert row.direction == "lower" and row.start == "test"
                hits, name, other = int((after >= tau).sum()), "accepted", "rejected"
                assert row.nll_bpd_before == pytest.approx(clean.nll_bpd_before, rel=1e-6)
                assert row.nll_bpd_after > row.nll_bpd_before
            else:
                assert row.direction == "raise" and row.start == "generated"
                hits, name, other = int((after < tau).sum()), "rejected", "accepted"
                assert row.nll_bpd_after < row.nll_bpd_before
            assert row[name] == pytest.approx(hits / 16)
            assert (row[f"{name}_ci_low"], row[f"{name}_ci_high"]) == pytest.approx(
                wilson_interval(hits, 16), abs=1e-6)
            assert pd.isna(row[other])
    # a larger budget never helps the detector here (the toy attacks are exact)
    for aid, name in (("away", "accepted"), ("noise", "rejected")):
        part = dens[dens.attack == aid].sort_values("eps")
        assert part[name].iloc[1] <= part[name].iloc[0]


def test_store_density_rows_and_curves(run16: tuple[Path, pd.DataFrame]) -> None:
    out, _ = run16
    with sqlite3.connect(out / "runs.sqlite") as conn:
        n = conn.execute("SELECT COUNT(*) FROM density").fetchone()[0]
        # clean 16 + (away, noise) x 2 eps x 16
        assert n == 16 + 4 * 16
        curve, = conn.execute("SELECT curve FROM density WHERE curve IS NOT NULL LIMIT 1"
                              ).fetchone()
        assert len(json.loads(curve)) == 5  # steps + 1 <= 50 points: all kept
        extras = [json.loads(e) for (e,) in conn.execute(
            "SELECT extras FROM jobs WHERE attack='away'")]
    assert all(e["direction"] == "lower" and e["curve_steps"] == [0, 1, 2, 3, 4]
               and len(e["curve_mean"]) == 5 for e in extras)
    # the objective (log p) decreases monotonically along an in-distribution curve
    assert all(np.all(np.diff(e["curve_mean"]) < 0) for e in extras)


def test_resume_reruns_nothing(run16: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    out, frame = run16
    suite = parse_suite(density_suite(), "dens.toml")
    summary = run_suite(suite, out, limit=16, progress="none", log=lambda m: None)
    assert summary.ran == 0 and summary.resumed == summary.total_jobs == 2 + 8
    again = read_csv(write_tables(summary.out, summary.plan).csv)
    pd.testing.assert_frame_equal(frame.drop(columns=["wall_s", "code_version"]),
                                  again.drop(columns=["wall_s", "code_version"]))


def test_markdown_shows_density_section(run16: tuple[Path, pd.DataFrame]) -> None:
    out, frame = run16
    md = (out / "leaderboard.md").read_text()
    assert "## density" in md and "accepted 93.8 [" in md and "rejected 0.0 [" in md
    assert render_markdown(frame) == render_markdown(read_csv(out / "leaderboard.csv"))


def test_publish_shows_density_rows_and_plots(run16: tuple[Path, pd.DataFrame],
                                              tmp_path: Path) -> None:
    from benchmark.report.publish import publish

    out, frame = run16
    site = publish(out, tmp_path / "lb")
    html = (site / "index.html").read_text()
    assert "<h2>Density defenses</h2>" in html
    import re

    assert len(re.findall(r"<tr><td>gauss *</td>", html)) == len(frame[frame.defense == "gauss"])
    readme = (site / "README.md").read_text()
    assert "### density" in readme and "plots/logp_vs_complexity_gauss.png" in readme
    assert (site / "plots" / "logp_vs_complexity_gauss.png").exists()


def test_plots_written(run16: tuple[Path, pd.DataFrame]) -> None:
    out, _ = run16
    pngs = sorted(p.name for p in (out / "density").glob("*.png"))
    assert pngs == ["convergence_away.png", "convergence_noise.png",
                    "logp_vs_complexity_gauss.png", "nll_vs_eps_away_linf.png",
                    "nll_vs_eps_noise_linf.png"]
    for name in pngs:
        data = (out / "density" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_threat_violation_is_an_error_outcome(tmp_path: Path) -> None:
    suite = parse_suite(density_suite(overshoot=2.0, eps="[0.05]"), "dens.toml")
    summary = run_suite(suite, tmp_path / "run", limit=8, progress="none", log=lambda m: None)
    frame = read_csv(write_tables(summary.out, summary.plan).csv)
    row = frame[frame.attack == "away"].iloc[0]
    # every pixel moved 0.1 > eps away: every sample breaks the threat model, and counts as a
    # success of the attack (not accepted), never as a robust point
    assert row.n == 8 and row.n_errors == 8
    assert row.accepted == 0.0
    assert pd.isna(row.nll_bpd_after)
    assert "threat_violation" in row["flags"]
    with sqlite3.connect(tmp_path / "run" / "runs.sqlite") as conn:
        errs = conn.execute("SELECT s.error FROM samples s JOIN jobs j ON s.job = j.key "
                            "WHERE j.attack = 'away'").fetchall()
    assert len(errs) == 8 and all("linf distance" in e for (e,) in errs)


def test_old_store_without_density_table_opens(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    with Store(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE density")
    with Store(db) as store:
        assert store.density(["nothing"]) == {}
        assert store.count_samples() == 0


# -- metric helpers: exact oracles and bad input --------------------------------------------

def test_threshold_is_linear_five_percent_quantile() -> None:
    values = np.arange(21, dtype=float)  # position 0.05 * 20 = 1
    assert acceptance_threshold(values) == pytest.approx(1.0)
    assert acceptance_threshold(np.arange(11, dtype=float)) == pytest.approx(0.5)
    assert math.isnan(acceptance_threshold([]))
    with pytest.raises(ValueError, match="accept must be in"):
        acceptance_threshold(values, accept=1.0)
    with pytest.raises(ValueError, match="finite"):
        acceptance_threshold([1.0, math.nan])


def test_quantile_interval_order_statistics() -> None:
    values = np.arange(1, 201, dtype=float)
    lo, hi = quantile_interval(values, 0.05)
    # B ~ Bin(200, 0.05) (scipy.stats.binom.cdf): P(B <= 3) = 0.0090 <= 0.025 < P(B <= 4)
    # = 0.0264 -> l = 4; P(B <= 15) = 0.9556 < 0.975 <= P(B <= 16) = 0.9762 -> u = 17
    assert (lo, hi) == (4.0, 17.0)
    assert quantile_interval(np.arange(10.0), 0.05)[0] == -math.inf
    with pytest.raises(ValueError, match="q and level"):
        quantile_interval(values, 1.5)


def test_bootstrap_interval() -> None:
    assert bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = bootstrap_mean_interval(np.random.default_rng(1).normal(size=400))
    se = np.random.default_rng(1).normal(size=400).std() / 20
    assert lo < m < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_mean_interval([1.0, 3.0]) == bootstrap_mean_interval([1.0, 3.0])
    assert math.isnan(bootstrap_mean_interval([5.0])[1])
    assert math.isnan(bootstrap_mean_interval([])[0])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_interval([1.0, 2.0], resamples=0)


class SidewaysAttack(AwayFromMean):
    """Declares a direction that is neither 'lower' nor 'raise'."""

    name = "toy-sideways"
    direction = "sideways"


class NoCurveShapeAttack(AwayFromMean):
    """Returns a curve of the wrong shape."""

    name = "toy-bad-curve"

    def run(self, defense: Any, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        result = super().run(defense, x, y, threat, generator=generator)
        result.extras["curve"] = result.extras["curve"][:, :1]
        return result


def test_malformed_density_attacks_are_error_rows(tmp_path: Path) -> None:
    text = density_suite(eps="[0.05]").replace(
        "[[threat_models]]",
        f'[[attacks]]\nid = "sideways"\nname = "{TOYS}:SidewaysAttack"\n\n'
        f'[[attacks]]\nid = "badcurve"\nname = "{TOYS}:NoCurveShapeAttack"\n\n'
        "[[threat_models]]")
    summary = run_suite(parse_suite(text, "bad.toml"), tmp_path / "run", limit=8,
                        progress="none", log=lambda m: None)
    assert summary.errors == 2
    frame = read_csv(write_tables(summary.out, summary.plan).csv).set_index("attack")
    assert "direction 'sideways'" in frame.loc["sideways", "error"]
    assert "extras['curve'] of shape (5, 1), expected (steps + 1, 8)" in frame.loc[
        "badcurve", "error"]
    for aid in ("sideways", "badcurve"):
        assert frame.loc[aid, "flags"] == "attack_error" and pd.isna(frame.loc[aid, "accepted"])
    assert pd.isna(frame.loc["away", "error"])  # the other rows are unaffected


def test_shipped_density_suites() -> None:

    from benchmark.plugins.builtin import ATTACKS
    from benchmark.spec.suite import load_suite

    suite = load_suite("digits-density")
    assert [d.name for d in suite.defenses] == ["pfode"] + ["flow"] * 6
    assert {a.name for a in suite.attacks} == {
        "ll-near-sample", "ll-high-complexity", "ll-random-region", "ll-prior-only",
        "ll-reverse", "ll-unrestricted", "flow-pgd-in", "flow-pgd-ood"}
    quick = load_suite("quick")
    assert {"flow-pgd-in", "flow-pgd-ood"} <= {a.name for a in quick.attacks}
    assert {a.name for a in suite.attacks} <= set(ATTACKS.names())
    plan = plan_suite(quick, limit=8)
    assert plan.kinds["realnvp-clean"] == "density"
    assert {j.attack_id for j in plan.jobs if j.defense.id == "realnvp-clean"} == {
        "clean", "flow-pgd-in", "flow-pgd-ood"}


def test_no_transfer_flags_a_density_row_whose_reported_nll_moved_against_the_attack():
    """Issue 17's case: a likelihood-raising attack whose *reported* NLL rose (the PF-ODE
    near-sample attack, 0.285 -> 0.565 bits/dim, over-fitting the fast solver) is flagged; one
    that lowered it is not; a likelihood-lowering attack the other way round."""
    from benchmark.report.density import density_flags, moved_against

    def row(direction, before, after, **more):
        return dict(defense="d", defense_params="{}", attack="a", threat_model="linf",
                    eps=0.03, direction=direction, n_errors=0, error=None, accepted=0.5,
                    accepted_ci_high=0.7, rejected=0.5, rejected_ci_high=0.7,
                    nll_bpd_before=before, nll_bpd_after=after, code_version="x", **more)

    frame = pd.DataFrame([row("raise", 0.285, 0.565), row("raise", 0.285, 0.1),
                          row("lower", 2.0, 1.5), row("lower", 2.0, 3.0),
                          row("raise", 0.285, float("nan"))])
    frame.loc[1:, "eps"] = [0.031, 0.032, 0.033, 0.034]  # one row per cell: no eps ordering
    flags = density_flags(frame)
    assert [("no_transfer" in f.split(";")) for f in flags] == [True, False, True, False, False]
    assert moved_against(frame.iloc[0]) and not moved_against(frame.iloc[4])


def test_no_transfer_reads_the_paired_change_interval_so_solver_noise_is_not_a_move():
    """A checked attack that kept its start: the accurate solver's fresh probes still move the
    mean NLL by a few hundredths (measured: 0.323 -> 0.293 bits/dim on 4 digits). The paired
    interval straddles 0, so nothing is flagged; an interval wholly above 0 is."""
    from benchmark.report.density import bootstrap_mean_interval, moved_against

    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.05, size=16)  # after - before: solver noise only, ...
    noise = noise - noise.mean() + 0.005  # ... whose mean happens to be against the attack
    _, lo, hi = bootstrap_mean_interval(noise)
    base = dict(direction="raise", nll_bpd_before=0.30, nll_bpd_after=0.30 + noise.mean())
    assert lo < 0 < hi
    assert not moved_against({**base, "nll_bpd_change_ci_low": lo, "nll_bpd_change_ci_high": hi})
    _, lo, hi = bootstrap_mean_interval(noise + 0.3)  # the likelihood really fell
    assert moved_against({**base, "nll_bpd_change_ci_low": lo, "nll_bpd_change_ci_high": hi})
    assert not moved_against({**base, "direction": "lower", "nll_bpd_change_ci_low": lo,
                              "nll_bpd_change_ci_high": hi})
