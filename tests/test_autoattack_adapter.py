"""The AutoAttack (pyautoattack) and torchattacks adapters on tiny linear models.

AutoAttack through a forward hook (BPDA, issue 15 hole 3) runs on a quantizing purifier with
zero gradient; the unfiltered selection for stochastic defenses (hole 4) on a defense that is
wrong on a lucky draw with probability p near the clean points and always wrong beyond.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pyautoattack import AutoAttack as PyAutoAttack
from pyautoattack.autopgd_base import APGDAttack
from torch import Tensor

from attacks import BPDA, PGD, AutoAttack, StAdv, TorchAttacks
from attacks.autoattack import VERSION_BUDGETS, DefenseView, _Selection
from attacks.bpda import bpda_forward
from benchmark.api.attack import Attack, Budget
from benchmark.api.defense import Defense
from benchmark.api.threat import ThreatModel
from benchmark.plugins.traits import attack_traits
from benchmark.run.runner import correct_counts
from tests.toys import Linear, NoisyLinear, Quantized, gen, single_thread
from threat_models import L2Threat, LinfThreat, StAdvThreat, UnrestrictedThreat


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


_gen = gen


def _linear(classes: int = 3, n: int = 24, seed: int = 0) -> tuple[Linear, torch.Tensor,
                                                                   torch.Tensor]:
    """A random linear classifier, interior images, labels = its own predictions."""
    g = _gen(seed)
    w = torch.randn(classes, 16, generator=g)
    model = Linear(w, -0.5 * w.sum(dim=1))  # decision boundaries through the box centre
    x = 0.25 + 0.5 * torch.rand(n, 1, 4, 4, generator=g)
    return model, x, model(x).argmax(1)


def _robust(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x_adv).argmax(1) == y).sum())


# -- AutoAttack --------------------------------------------------------------------------------

def _exact_robust(model: Linear, x: torch.Tensor, y: torch.Tensor, eps: float, dual: float
                  ) -> int:
    """Samples no perturbation in the ball can flip (the box does not bind at x in
    [0.25, 0.75] and small eps): z_y - z_j > eps * ||w_j - w_y||_dual for every j != y."""
    z, w = model(x), model.weight
    robust = 0
    for i, c in enumerate(y.tolist()):
        robust += all(float(z[i, c] - z[i, j]) > eps * float((w[j] - w[c]).norm(p=dual))
                      for j in range(len(w)) if j != c)
    return robust


@pytest.mark.parametrize(("threat", "dual"), [(LinfThreat(0.02), 1.0), (L2Threat(0.06), 2.0)],
                         ids=["linf", "l2"])
def test_apgd_subset_is_feasible_and_as_strong_as_pgd_and_the_exact_worst_case(
        threat: ThreatModel, dual: float) -> None:
    # APGD-CE alone is weaker than the margin on 3 classes (cross-entropy is not the margin),
    # so run it with APGD-DLR, as AutoAttack's rand and plus versions do.
    model, x, y = _linear()
    aa = AutoAttack(attacks=["apgd-ce", "apgd-dlr"], n_iter=20)
    r = aa.run(model, x, y, threat, generator=_gen())
    assert threat.check(x, r.x_adv, r.params) is None
    pgd = PGD(steps=20, loss="margin").run(model, x, y, threat, generator=_gen())
    robust_aa, robust_pgd = _robust(model, r.x_adv, y), _robust(model, pgd.x_adv, y)
    assert 0 < robust_pgd < len(y), "eps should break some samples but not all"
    assert robust_aa <= robust_pgd + 1
    assert robust_aa <= _exact_robust(model, x, y, threat.eps, dual) + 1
    assert r.extras["version"] == "custom" and r.extras["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert r.extras["selection"] == "library"  # deterministic: the library's filtering is exact
    assert r.extras["aa_robust_accuracy"] == pytest.approx(robust_aa / len(y))
    assert r.grad_evals > 0


def test_standard_version_runs_with_reduced_budgets() -> None:
    model, x, y = _linear(classes=10, n=8)
    threat = LinfThreat(0.05)
    aa = AutoAttack(version="standard", n_iter=5, n_queries=20, batch_size=4)
    r = aa.run(model, x, y, threat, generator=_gen())
    assert r.extras["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert threat.check(x, r.x_adv, r.params) is None
    assert _robust(model, r.x_adv, y) < len(y)
    assert aa.budget == Budget(steps=5, restarts=1, eot_draws=1)


def test_auto_resolves_to_rand_for_a_stochastic_defense() -> None:
    model, x, y = _linear(n=4)
    defense = NoisyLinear(model.weight, model.bias, sigma=0.05)
    defense.reseed(0)
    aa = AutoAttack(n_iter=3)
    assert aa.resolve_version(defense) == "rand"
    assert aa.resolve_version(model) == "standard"
    state = torch.get_rng_state()
    r = aa.run(defense, x, y, LinfThreat(0.05), generator=_gen())
    assert r.extras["version"] == "rand" and r.extras["selection"] == "unfiltered"
    assert r.extras["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert aa.budget == Budget(steps=3, restarts=1, eot_draws=20)
    defense.reseed(0)
    again = aa.run(defense, x, y, LinfThreat(0.05), generator=_gen())
    assert torch.equal(r.x_adv, again.x_adv)
    assert torch.equal(torch.get_rng_state(), state)


def test_eot_draws_overrides_the_versions_eot_and_is_counted() -> None:
    """A reduced-budget rand (issue 16's equal-NFE rows): the library's APGD runs eot_draws
    gradient draws per iteration, as the budget and the gradient-call count say."""
    model, x, y = _linear(n=4)
    defense = NoisyLinear(model.weight, model.bias, sigma=0.05)
    calls = {}
    for draws in (None, 3):
        defense.reseed(0)
        aa = AutoAttack(n_iter=4, eot_draws=draws)
        r = aa.run(defense, x, y, LinfThreat(0.05), generator=_gen())
        calls[draws] = r.grad_evals
        assert r.extras["eot_draws"] == (20 if draws is None else draws)
        assert aa.budget == Budget(steps=4, restarts=1, eot_draws=20 if draws is None else 3)
    # APGD-CE and APGD-DLR: (1 + n_iter) gradient steps, each of eot_draws draws
    assert calls[None] == 2 * 5 * 20 and calls[3] == 2 * 5 * 3
    with pytest.raises(ValueError, match="eot_draws must be an integer >= 1, got 0"):
        AutoAttack(eot_draws=0)
    config = AutoAttack(eot_draws=2).config()
    assert config["eot_draws"] == 2 and AutoAttack(**config).config() == config


@pytest.mark.parametrize("version", ["standard", "plus", "rand"])
def test_version_budgets_match_the_library(version: str) -> None:
    model, _, _ = _linear()
    aa = PyAutoAttack(model, eps=0.1, version=version)
    assert VERSION_BUDGETS[version] == (aa.apgd.n_restarts, aa.apgd.eot_iter)
    custom = PyAutoAttack(model, eps=0.1, version="custom", attacks=["apgd-ce"])
    assert VERSION_BUDGETS["custom"] == (custom.apgd.n_restarts, custom.apgd.eot_iter)


def test_n_iter_rescales_apgd_checkpoints_like_the_library() -> None:
    model, x, _ = _linear()
    aa = PyAutoAttack(model, eps=0.1, version="standard")
    AutoAttack(n_iter=12)._configure(aa, model, LinfThreat(0.1), classes=3)
    fresh = APGDAttack(model, n_iter=12, eps=0.1)
    for sub in (aa.apgd, aa.apgd_targeted):
        assert (sub.n_iter, sub.n_iter_2, sub.n_iter_min, sub.size_decr) == (
            fresh.n_iter, fresh.n_iter_2, fresh.n_iter_min, fresh.size_decr)
    assert aa.fab.n_iter == 12
    assert aa.apgd_targeted.n_target_classes == 2 and aa.fab.n_target_classes == 2


def test_autoattack_is_reproducible_silent_and_leaves_global_state_alone(
        capsys: pytest.CaptureFixture[str]) -> None:
    model, x, y = _linear(n=8)
    model.train()
    threat = LinfThreat(0.05)
    aa = AutoAttack(attacks=["apgd-ce", "square"], n_iter=5, n_queries=10)
    state = torch.get_rng_state()
    a = aa.run(model, x, y, threat, generator=_gen(7))
    b = aa.run(model, x, y, threat, generator=_gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.x_adv, b.x_adv) and a.extras["seed"] == b.extras["seed"]
    assert model.training
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_autoattack_reports_library_warnings() -> None:
    model, x, y = _linear(n=4)
    defense = NoisyLinear(model.weight, model.bias, sigma=0.5)
    aa = AutoAttack(attacks=["apgd-ce"], n_iter=2)
    r = aa.run(defense, x, y, LinfThreat(0.05), generator=_gen())
    assert any("randomized defense" in w for w in r.extras["warnings"])


def test_autoattack_parameters_and_compatibility() -> None:
    with pytest.raises(ValueError, match="did you mean 'apgd-ce'"):
        AutoAttack(attacks=["apgd-cee"])
    with pytest.raises(ValueError, match="'fast'"):
        AutoAttack(version="fast")
    with pytest.raises(ValueError, match="custom"):
        AutoAttack(version="standard", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1, got 0"):
        AutoAttack(n_iter=0)
    model, x, y = _linear(classes=3, n=2)
    reason = AutoAttack().incompatibility(model, StAdvThreat())
    assert reason is not None and "stadv" in reason
    assert AutoAttack().incompatibility(model, L2Threat(0.5)) is None
    with pytest.raises(ValueError, match="at least 4 classes"):
        AutoAttack(version="standard").run(model, x, y, LinfThreat(0.1))


def test_forward_hook_is_not_configuration() -> None:
    with pytest.raises(TypeError, match="forward must be a callable.*got 'bpda'"):
        AutoAttack(forward="bpda")  # type: ignore[arg-type]
    aa = AutoAttack(attacks=["apgd-dlr"], forward=bpda_forward)
    config = aa.config()
    assert "forward" not in config and not any(callable(v) for v in config.values())
    json.dumps(config)
    assert AutoAttack(**config).config() == config


def test_selection_parameters_and_config() -> None:
    with pytest.raises(ValueError, match="selection must be one of 'auto', 'library', "
                                         "'unfiltered'.*got 'best'"):
        AutoAttack(selection="best")
    with pytest.raises(ValueError, match="select_draws must be an integer >= 1, got 0"):
        AutoAttack(select_draws=0)
    config = AutoAttack(attacks=["apgd-dlr"], selection="library", select_draws=5).config()
    assert config["selection"] == "library" and config["select_draws"] == 5
    json.dumps(config)
    assert AutoAttack(**config).config() == config
    model, _, _ = _linear()
    noisy = NoisyLinear(model.weight, model.bias)
    assert AutoAttack().resolve_selection(noisy) == "unfiltered"
    assert AutoAttack().resolve_selection(model) == "library"
    assert AutoAttack(selection="library").resolve_selection(noisy) == "library"
    assert AutoAttack(selection="unfiltered").resolve_selection(model) == "unfiltered"


def test_selection_prefers_fewer_correct_draws_then_the_higher_margin() -> None:
    """On a deterministic two-class linear model every draw agrees: among correct candidates
    the higher margin wins, a misclassified one beats any correct one, and a candidate equal to
    the clean input costs no forward."""
    model, x, y = _linear(classes=2, n=4)
    toward = (model.weight[1] - model.weight[0]).view(1, 1, 4, 4) * (1 - 2 * y).view(-1, 1, 1, 1)
    chosen = _Selection(model, x, y, draws=4, batch_size=100)
    assert chosen.correct.tolist() == [4] * 4 and chosen.view.samples == 4 * 4
    idx = torch.arange(4)
    chosen.offer(idx, x.clone(), ("square", "returned"))  # the clean input again: skipped
    assert chosen.view.samples == 16 and chosen.labels == [("clean", "clean")]
    chosen.offer(idx, x + 1e-3 * toward, ("apgd-ce", "highest-loss"))  # higher margin
    chosen.offer(idx, x - 1e-3 * toward, ("apgd-ce", "misclassified"))  # lower: never chosen
    assert chosen.extras()["selected_iterate"] == ["highest-loss"] * 4
    # only the first two points cross the boundary
    far = x + torch.tensor([10.0, 10.0, 0.0, 2e-3]).view(-1, 1, 1, 1) * toward
    chosen.offer(idx, far, ("apgd-dlr", "misclassified"))
    extras = chosen.extras()
    assert model(far).argmax(1).ne(y).tolist() == [True, True, False, False]
    assert extras["selected_from"] == ["apgd-dlr", "apgd-dlr", "apgd-ce", "apgd-dlr"]
    assert extras["select_correct"] == [0, 0, 4, 4]
    assert extras["select_robust_accuracy"] == 0.5
    # 4 clean, 4 + 4 + 3 candidates (the third point's "far" is its clean input), 4 draws each
    assert extras["select_forward_samples"] == 4 * (4 + 4 + 4 + 3)


def test_defense_view_hides_the_defense_from_mode_switches() -> None:
    model, _, _ = _linear()
    model.eval()
    view = DefenseView(model, torch.device("cpu"))
    view.train()
    assert not model.training
    assert list(view.children()) == []


def test_unfiltered_runs_every_sub_attack_of_plus() -> None:
    """Every sub-attack kind (APGD restarts, APGD-T targets, FAB, FAB-T, Square) on every point;
    on a deterministic model the choice is never worse than the library's filtered run."""
    model, x, y = _linear(classes=4, n=8)
    threat = LinfThreat(0.05)
    params: dict[str, Any] = {"version": "plus", "n_iter": 3, "n_queries": 20}
    lib = AutoAttack(**params, selection="library").run(model, x, y, threat, generator=_gen())
    r = AutoAttack(**params, selection="unfiltered").run(model, x, y, threat, generator=_gen())
    assert threat.check(x, r.x_adv, r.params) is None
    assert r.extras["attacks"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert set(r.extras["selected_from"]) <= {"clean", *r.extras["attacks"]}
    assert set(r.extras["selected_iterate"]) <= {"clean", "highest-loss", "misclassified",
                                                 "returned"}
    robust = model(r.x_adv).argmax(1) == y
    assert [c == 10 for c in r.extras["select_correct"]] == robust.tolist()
    assert 0 < int(robust.sum()) <= _robust(model, lib.x_adv, y) < len(y)
    # every point meets every sub-attack
    assert r.extras["forward_samples"] > lib.extras["forward_samples"]


# -- AutoAttack through BPDA (issue 15, hole 3) --------------------------------------------------

def _quantized(stochastic: bool = False, n: int = 2) -> tuple[Quantized, Tensor, Tensor, float]:
    """4 classes; class 1 is the only rival (classes 2 and 3 sit 100 below). x = 0.5 is a
    multiple of 1/8, so l-inf 0.1 rounds to steps of 0.125 and the clean margin
    -0.1 ||w1||_1 becomes +0.025 ||w1||_1 at the quantized worst case. Rounding has zero
    gradient: only BPDA (identity surrogate) sees the head's."""
    w1 = torch.randn(16, generator=_gen(5))
    weight = torch.stack([torch.zeros(16), w1, torch.zeros(16), torch.zeros(16)])
    bias = torch.tensor([0.0, float(-(w1 * 0.5).sum() - 0.1 * w1.abs().sum()), -100.0, -100.0])
    defense = NoisyQuantized(weight, bias) if stochastic else Quantized(weight, bias)
    defense.reseed(0)
    return defense, torch.full((n, 1, 4, 4), 0.5), torch.zeros(n, dtype=torch.long), 0.1


class NoisyQuantized(Quantized):
    """:class:`tests.toys.Quantized` with Gaussian noise (sigma 0.01) before rounding: stochastic,
    though a draw flips a rounding only 3.75 sigma away (never, in practice)."""

    stochastic = True

    def purify(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator_for(x), device=x.device,
                            dtype=x.dtype)
        return super().purify(x + 0.01 * noise)


def test_bpda_autoattack_breaks_a_zero_gradient_purifier_that_autoattack_cannot() -> None:
    defense, x, y, eps = _quantized()
    threat = LinfThreat(eps)
    params: dict[str, Any] = {"attacks": ["apgd-dlr"], "n_iter": 10}
    plain = AutoAttack(**params).run(defense, x, y, threat, generator=_gen())
    assert (defense(plain.x_adv).argmax(1) == y).all()
    assert any("zero gradient" in w for w in plain.extras["warnings"])
    bpda = BPDA(attack="autoattack", **params)
    assert bpda.incompatibility(defense, threat) is None
    r = bpda.run(defense, x, y, threat, generator=_gen())
    assert threat.check(x, r.x_adv, r.params) is None
    assert (defense(r.x_adv).argmax(1) == 1).all()
    assert not any("zero gradient" in w for w in r.extras["warnings"])
    assert r.extras["gradient"] == "bpda" and r.extras["version"] == "custom"
    assert r.grad_evals > 0
    # BPDA is exactly AutoAttack with the straight-through hook
    hooked = AutoAttack(**params, forward=bpda_forward).run(defense, x, y, threat,
                                                            generator=_gen())
    assert torch.equal(hooked.x_adv, r.x_adv)
    # reported as a BPDA row wrapping AutoAttack; its configuration holds no callable
    config = bpda.config()
    json.dumps(config)
    assert config == {"attack": "autoattack", **params}
    assert "forward" not in bpda.inner.config()
    traits = attack_traits("bpda", config)
    assert traits.gradient == "bpda" and traits.wraps == "autoattack"
    assert bpda.budget == Budget(steps=10, restarts=5, eot_draws=1)
    reason = bpda.incompatibility(defense, StAdvThreat())
    assert reason is not None and "stadv" in reason


@pytest.mark.parametrize(("stochastic", "version", "selection"),
                         [(True, "rand", "unfiltered"), (False, "standard", "library")],
                         ids=["stochastic", "deterministic"])
def test_bpda_autoattack_auto_version_reads_the_defense(stochastic: bool, version: str,
                                                        selection: str) -> None:
    defense, x, y, eps = _quantized(stochastic)
    bpda = BPDA(attack="autoattack", n_iter=4, n_queries=10)
    r = bpda.run(defense, x, y, LinfThreat(eps), generator=_gen())
    assert (r.extras["version"], r.extras["selection"]) == (version, selection)
    assert bpda.budget == Budget(4, *VERSION_BUDGETS[version])
    assert (defense(r.x_adv).argmax(1) == 1).all()


# -- unfiltered selection on stochastic defenses (issue 15, hole 4) -----------------------------

class LuckyFlip(Defense):
    """Three classes, labels 0 or 1: ``logits = scale * (W x + b)``, and on each draw, with
    probability ``p``, class 2 wins by 1 with no gradient. Near the clean points a draw is wrong
    with probability p (the majority of K draws is right); beyond the linear boundary every draw
    is wrong. At scale 1e4 cross-entropy saturates (zero gradient), so APGD-CE only ever wins a
    lucky draw; APGD-DLR is scale-free and crosses the boundary."""

    stochastic = True

    def __init__(self, weight: Tensor, bias: Tensor, p: float = 0.3, scale: float = 1e4
                 ) -> None:
        super().__init__()
        self.weight, self.bias, self.p, self.scale = weight, bias, p, scale
        self.num_classes = 3
        self.samples = 0

    def forward(self, x: Tensor) -> Tensor:
        self.samples += len(x)
        z = self.scale * (x.flatten(1) @ self.weight.T + self.bias)
        lucky = z.detach().clone()
        lucky[:, 2] = lucky.amax(dim=1) + 1.0
        flip = torch.rand(len(x), generator=self.generator_for(x), device=x.device) < self.p
        return torch.where(flip[:, None], lucky, z)


def _lucky_case(n: int = 16, eps: float = 0.1) -> tuple[LuckyFlip, Tensor, Tensor, float]:
    """Points at a linear margin of 0.6 eps ||w0 - w1||_1 (a random start never crosses it,
    the l-inf worst case does), alternating labels 0 and 1."""
    g = _gen(0)
    w01 = torch.randn(2, 16, generator=g)
    weight = torch.cat([w01, torch.zeros(1, 16)])
    bias = torch.cat([-0.5 * w01.sum(dim=1), torch.tensor([-100.0])])
    d = w01[0] - w01[1]
    x0 = 0.475 + 0.05 * torch.rand(n, 16, generator=g)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    shift = (sign * 0.6 * eps * d.abs().sum() - (x0 - 0.5) @ d) / d.abs().sum()
    x = (x0 + shift[:, None] * d.sign()).view(n, 1, 4, 4)
    return LuckyFlip(weight, bias), x, (sign < 0).long(), eps


def _k_draw_robust(defense: Defense, x_adv: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """The harness's score: robust where more than half of k fresh draws are correct."""
    defense.reseed(123)
    return 2 * correct_counts(defense, x_adv, y, k, 3, 100, "lucky") > k


def test_unfiltered_selection_breaks_what_single_pass_filtering_leaves_robust() -> None:
    defense, x, y, eps = _lucky_case()
    threat = LinfThreat(eps)
    assert _k_draw_robust(defense, x, y, k=101).all()  # wrong on 30% of draws, not most
    defense.reseed(0)
    defense.samples = 0
    lib = AutoAttack(n_iter=10, selection="library").run(defense, x, y, threat,
                                                         generator=_gen())
    lib_samples = defense.samples
    lib_robust = _k_draw_robust(defense, lib.x_adv, y)
    # the library believes it fooled every point (one lucky draw each) ...
    assert lib.extras["aa_robust_accuracy"] == 0.0
    # ... but returned clean inputs or APGD-CE's random starts for many: the majority is right
    assert int(lib_robust.sum()) >= 4

    defense.reseed(0)
    defense.samples = 0
    r = AutoAttack(n_iter=10).run(defense, x, y, threat, generator=_gen())
    samples = defense.samples
    assert threat.check(x, r.x_adv, r.params) is None
    assert r.extras["version"] == "rand" and r.extras["selection"] == "unfiltered"
    assert not _k_draw_robust(defense, r.x_adv, y).any()
    assert r.extras["select_robust_accuracy"] == 0.0
    # APGD-CE has zero gradient here: every returned example is an APGD-DLR iterate
    assert r.extras["selected_from"] == ["apgd-dlr"] * len(y)
    assert set(r.extras["selected_iterate"]) <= {"highest-loss", "misclassified"}
    # costs: both sub-attacks on all 16 points, (10 + 1) x 20 EOT gradient calls each (the
    # library ran both too, APGD-DLR on fewer points); the selection's draws are extra
    assert r.grad_evals == lib.grad_evals == 2 * 11 * 20
    assert r.extras["grad_samples"] == 2 * 11 * 20 * len(y) > lib.extras["grad_samples"]
    assert r.extras["forward_samples"] > lib.extras["forward_samples"]
    assert r.extras["select_forward_samples"] % 10 == 0
    assert samples == r.extras["forward_samples"] + r.extras["select_forward_samples"]
    assert lib_samples == lib.extras["forward_samples"]


# -- torchattacks ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchattacks_pgd_runs_within_the_threat_model(mode: str) -> None:
    model, x, y = _linear()
    getattr(model, mode)()
    threat = LinfThreat(0.05)
    attack = TorchAttacks(attack="PGD", steps=10, alpha=0.01)
    assert attack.incompatibility(model, threat) is None
    r = attack.run(model, x, y, threat, generator=_gen())
    assert threat.check(x, r.x_adv) is None
    assert r.extras["kwargs"]["eps"] == 0.05
    assert _robust(model, r.x_adv, y) < len(y)
    assert model.training == (mode == "train")
    again = attack.run(model, x, y, threat, generator=_gen())
    assert torch.equal(r.x_adv, again.x_adv)
    assert attack.budget == Budget(steps=10, restarts=1, eot_draws=1)


def test_torchattacks_fills_the_class_count() -> None:
    model, x, y = _linear(classes=4, n=6)
    threat = L2Threat(0.2)
    r = TorchAttacks(attack="APGDT", norm="L2", steps=3).run(model, x, y, threat,
                                                            generator=_gen())
    assert r.extras["kwargs"]["n_classes"] == 4
    assert threat.check(x, r.x_adv) is None


def test_torchattacks_refuses_unknown_names_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="did you mean 'PGD'"):
        TorchAttacks(attack="PDG")
    with pytest.raises(ValueError, match="'MultiAttack'"):
        TorchAttacks(attack="MultiAttack")
    with pytest.raises(TypeError, match="stepz"):
        TorchAttacks(attack="PGD", stepz=3)


@pytest.mark.parametrize(("attack", "kwargs", "threat", "ok"), [
    ("PGD", {}, LinfThreat(0.1), True),
    ("PGD", {}, L2Threat(0.5), False),
    ("PGDL2", {}, L2Threat(0.5), True),
    ("APGD", {"norm": "L2"}, L2Threat(0.5), True),
    ("APGD", {"norm": "L2"}, LinfThreat(0.1), False),
    ("Square", {}, LinfThreat(0.1), True),
    ("CW", {}, L2Threat(0.5), False),
    ("CW", {}, UnrestrictedThreat(), True),
    ("PGD", {}, StAdvThreat(), False),
    ("PGD", {"eps": 0.2}, LinfThreat(0.1), False),
    ("PIFGSM", {"max_epsilon": 0.05}, LinfThreat(0.1), True),
])
def test_torchattacks_norm_table(attack: str, kwargs: dict[str, object], threat: ThreatModel,
                                 ok: bool) -> None:
    model, _, _ = _linear()
    reason = TorchAttacks(attack=attack, **kwargs).incompatibility(model, threat)
    assert (reason is None) == ok, reason


def test_torchattacks_budget_reads_the_attack_signature() -> None:
    assert TorchAttacks(attack="EOTPGD", eot_iter=3).budget == Budget(10, 1, 3)
    assert TorchAttacks(attack="APGD", n_restarts=2, steps=7).budget == Budget(7, 2, 1)


# -- devices -----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attacks_run_on_cuda_with_a_cuda_generator() -> None:
    dev = torch.device("cuda")
    model, x, y = _linear(n=6)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    cases: list[tuple[Attack, ThreatModel]] = [
        (PGD(steps=3, eot_draws=2), LinfThreat(0.02)),
        (StAdv(steps=3), StAdvThreat()),
        (AutoAttack(attacks=["apgd-ce", "apgd-dlr"], n_iter=3), L2Threat(0.06)),
        (TorchAttacks(attack="PGD", steps=3), LinfThreat(0.02)),
    ]
    for attack, threat in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        r = attack.run(model, x, y, threat, generator=g)
        assert r.x_adv.device == x.device, attack
        assert threat.check(x, r.x_adv, r.params) is None, attack


def test_torchattacks_alpha_scale_follows_the_threat_model():
    from attacks.torchattacks_adapter import TorchAttacks

    atk = TorchAttacks(attack="PGD", steps=20, alpha_scale=2.5)
    assert atk.config()["alpha_scale"] == 2.5
    with pytest.raises(TypeError, match="alpha_scale"):
        TorchAttacks(attack="PGD", steps=20, alpha=0.1, alpha_scale=2.5)
    with pytest.raises(ValueError, match="alpha_scale must be a number > 0, got -1"):
        TorchAttacks(attack="PGD", steps=20, alpha_scale=-1)


def test_square_with_an_empty_working_set_offers_the_clean_input(monkeypatch) -> None:
    """pyautoattack's Square can fail on an empty working set ('... of 0 elements'): the
    adapter offers the clean input as Square's candidate; any other error propagates."""
    model, x, y = _linear(classes=10, n=4)

    def empty(self, x, y=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot reshape tensor of 0 elements into shape [0, -1]")

    monkeypatch.setattr("pyautoattack.square.SquareAttack.perturb", empty)
    aa = AutoAttack(attacks=["square"], n_queries=10, selection="unfiltered")
    r = aa.run(model, x, y, LinfThreat(0.05), generator=_gen())
    assert torch.equal(r.x_adv, x)

    def broken(self, x, y=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: something else")

    monkeypatch.setattr("pyautoattack.square.SquareAttack.perturb", broken)
    with pytest.raises(RuntimeError, match="something else"):
        aa.run(model, x, y, LinfThreat(0.05), generator=_gen())
