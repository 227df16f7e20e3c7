"""Attacks against exact oracles: closed-form optima on linear models, hand-computed losses,
call counts for EOT, a zero-gradient defense for BPDA, and the threat-model check on StAdv."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attacks import BPDA, EOT, PGD, StAdv, get_loss
from attacks.eot import evaluate_draws
from attacks.losses import ce, dlr, margin
from benchmark.api.attack import Attack, Budget
from benchmark.api.threat import ThreatModel
from tests.toys import (
    Linear,
    NoisyLinear,
    Quantized,
    Recorder,
    TinyCNN,
    gen,
    single_thread,
    smooth_images,
)
from threat_models import L2Threat, LinfThreat, StAdvThreat, UnrestrictedThreat


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


_gen = gen


# -- losses ------------------------------------------------------------------------------------

def test_losses_match_hand_computed_values() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 2, 1])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert ce(z, y).tolist() == pytest.approx([lse - 1, lse - 3, F.cross_entropy(
        z[2:], y[2:]).item()], abs=1e-6)
    assert margin(z, y).tolist() == pytest.approx([2.0, -1.0, -5.0])
    # dlr = (max_{j != y} z_j - z_y) / (z_pi1 - z_pi3)
    assert dlr(z, y).tolist() == pytest.approx([1.0, -0.5, -5.0 / 6.0], abs=1e-6)


def test_dlr_is_shift_and_scale_invariant() -> None:
    z = torch.randn(5, 4, generator=_gen())
    y = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(dlr(3 * z + 7, y), dlr(z, y), atol=1e-5)


def test_loss_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"'xent'.*ce, dlr, margin"):
        get_loss("xent")
    with pytest.raises(ValueError, match="at least 3 classes, got 2"):
        dlr(torch.zeros(1, 2), torch.tensor([0]))


# -- PGD against closed-form optima ------------------------------------------------------------

def _linear_case(classes: int, seed: int = 0) -> tuple[Linear, Tensor, Tensor]:
    """x = 0.5 (interior of the box); for 3 classes the runner-up class 1 is also the class
    whose worst case is largest, so the margin loss's active piece never changes."""
    g = _gen(seed)
    d = 16
    w0 = torch.randn(d, generator=g)
    rows = [w0, w0 + 2 * torch.randn(d, generator=g)]
    bias = [0.0, -1.0]
    if classes == 3:
        rows.append(w0 + 0.3 * torch.randn(d, generator=g))
        bias.append(-3.0)
    w = torch.stack(rows)
    model = Linear(w, torch.tensor(bias) - torch.tensor(bias).mean())
    x = torch.full((1, 1, 4, 4), 0.5)
    return model, x, torch.tensor([0])


def _closed_form(model: Linear, x: Tensor, eps: float, dual: float) -> float:
    """max_j [z_j - z_y + eps * ||w_j - w_y||_dual] for y = 0."""
    z = model(x)[0]
    w = model.weight
    return max(float(z[j] - z[0] + eps * (w[j] - w[0]).norm(p=dual)) for j in range(1, len(w)))


# Cross-entropy is a monotone function of the margin only for two classes.
@pytest.mark.parametrize(("classes", "loss"), [(2, "margin"), (2, "ce"), (3, "margin")])
@pytest.mark.parametrize(("threat", "dual", "random_start"), [
    (LinfThreat(0.01), 1.0, True), (LinfThreat(0.01), 1.0, False),
    # From a random start l2 steps only approach the optimal direction geometrically.
    (L2Threat(0.03), 2.0, False),
])
def test_pgd_reaches_the_closed_form_optimum_on_a_linear_model(
        classes: int, threat: ThreatModel, dual: float, random_start: bool, loss: str) -> None:
    model, x, y = _linear_case(classes)
    result = PGD(steps=10, loss=loss, random_start=random_start).run(
        model, x, y, threat, generator=_gen())
    assert threat.check(x, result.x_adv, result.params) is None
    attained = float(margin(model(result.x_adv), y))
    expected = _closed_form(model, x, threat.eps, dual)
    assert attained == pytest.approx(expected, rel=1e-4)
    assert float(margin(model(x), y)) < expected  # the attack did move
    assert result.grad_evals == 10


def test_pgd_returns_the_params_that_produced_x_adv() -> None:
    model, x, y = _linear_case(3)
    x = x.repeat(3, 1, 1, 1)
    y = y.repeat(3)
    for threat in (LinfThreat(0.05), L2Threat(0.2), UnrestrictedThreat()):
        r = PGD(steps=5).run(model, x, y, threat, generator=_gen())
        assert r.params is not None
        assert torch.equal(threat.apply(x, r.params), r.x_adv)
        assert threat.check(x, r.x_adv, r.params) is None


def test_pgd_keeps_the_best_iterate() -> None:
    net = TinyCNN()
    x = smooth_images(8)
    y = net(x).argmax(1)
    spy = Recorder(net)
    threat = LinfThreat(0.02)
    # A step as large as the ball makes the iterates oscillate between corners.
    r = PGD(steps=8, step_size=0.02, loss="margin").run(spy, x, y, threat, generator=_gen())
    seen = torch.stack(spy.inputs)  # (steps + 1, B, ...)
    losses = torch.stack([margin(net(s), y) for s in seen])  # (steps + 1, B)
    final = margin(net(r.x_adv), y)
    assert torch.allclose(final, losses.max(dim=0).values, atol=1e-5)
    assert (losses[-1] < final - 1e-4).any(), "the test needs a last iterate that is not best"
    success = torch.tensor(r.extras["success"])
    assert torch.equal(success, (losses > 0).any(dim=0))


def test_restarts_never_make_it_worse() -> None:
    net = TinyCNN()
    x = smooth_images(16)
    y = net(x).argmax(1)
    threat = LinfThreat(0.01)
    one = PGD(steps=5, loss="margin").run(net, x, y, threat, generator=_gen(3))
    three = PGD(steps=5, loss="margin", restarts=3).run(net, x, y, threat, generator=_gen(3))
    l1, l3 = margin(net(one.x_adv), y), margin(net(three.x_adv), y)
    assert (l3 >= l1 - 1e-5).all()
    assert three.grad_evals == 3 * one.grad_evals


def test_pgd_never_accumulates_gradients_in_the_defense() -> None:
    model, x, y = _linear_case(2)
    model.weight.requires_grad_(True)
    PGD(steps=3).run(model, x, y, LinfThreat(0.01))
    assert model.weight.grad is None


def test_pgd_leaves_the_defense_mode_alone() -> None:
    model, x, y = _linear_case(2)
    model.train()
    PGD(steps=2).run(model, x, y, LinfThreat(0.01))
    assert model.training


# -- EOT ---------------------------------------------------------------------------------------

def _noisy(sigma: float = 0.1) -> NoisyLinear:
    model, _, _ = _linear_case(3)
    return NoisyLinear(model.weight, model.bias, sigma=sigma)


@pytest.mark.parametrize("build", [
    lambda: PGD(steps=5, eot_draws=4),
    lambda: EOT(attack="pgd", draws=4, steps=5),
])
def test_eot_draws_are_one_batched_forward_per_step(build: Callable[[], Attack]) -> None:
    defense = _noisy()
    defense.reseed(0)
    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    attack = build()
    r = attack.run(defense, x, y, LinfThreat(0.02), generator=_gen())
    assert defense.batch_sizes == [12] * 6  # 5 steps + the final iterate, 3 samples x 4 draws
    assert r.grad_evals == 20
    assert attack.budget == Budget(steps=5, restarts=1, eot_draws=4)


def test_eot_success_needs_a_majority_of_draws() -> None:
    # Two samples, four draws each; class 0 is correct. Logits per draw are fixed.
    wrong, right = [0.0, 1.0], [1.0, 0.0]
    table = torch.tensor([wrong, wrong, right, right,      # 2 of 4 wrong: not a success
                          wrong, wrong, wrong, right])     # 3 of 4 wrong: a success
    x = torch.zeros(2, 1, 1, 1)
    y = torch.zeros(2, dtype=torch.long)
    loss, success = evaluate_draws(lambda rep: table.clone(), x, y, margin, draws=4)
    assert success.tolist() == [False, True]
    assert loss.tolist() == pytest.approx([0.0, 0.5])


def test_eot_refuses_attacks_without_draws() -> None:
    with pytest.raises(TypeError, match="spsa.*eot_draws"):
        EOT(attack="spsa")
    # AutoAttack takes eot_draws (its APGD's EOT iterations): EOT sets them
    assert EOT(attack="autoattack", draws=3).budget.eot_draws == 3
    with pytest.raises(TypeError, match="draws="):
        EOT(attack="pgd", eot_draws=3)
    with pytest.raises(ValueError, match="draws must be an integer >= 1, got 0"):
        EOT(draws=0)


def test_eot_config_rebuilds_the_attack() -> None:
    attack = EOT(attack="pgd", draws=7, steps=3, loss="margin")
    assert attack.config() == {"attack": "pgd", "draws": 7, "steps": 3, "loss": "margin"}
    assert EOT(**attack.config()).budget == attack.budget == Budget(3, 1, 7)


# -- BPDA --------------------------------------------------------------------------------------

def _quantized_case() -> tuple[Quantized, Tensor, Tensor, float]:
    """Binary linear head on x = 0.5; quantizing to 1/8 turns an l-inf step of 0.1 into 0.125.
    The clean margin is -0.1 ||w||_1 (correct); after the quantized worst case it is
    +0.025 ||w||_1 (wrong)."""
    w1 = torch.randn(16, generator=_gen(5))
    x = torch.full((1, 1, 4, 4), 0.5)
    b1 = float(-(w1 * 0.5).sum() - 0.1 * w1.abs().sum())
    weight = torch.stack([torch.zeros(16), w1])
    return Quantized(weight, torch.tensor([0.0, b1])), x, torch.tensor([0]), 0.1


def test_bpda_breaks_a_zero_gradient_defense_that_pgd_cannot() -> None:
    defense, x, y, eps = _quantized_case()
    threat = LinfThreat(eps)
    assert defense(x).argmax(1).item() == 0
    plain = PGD(steps=10, random_start=False).run(defense, x, y, threat)
    assert plain.extras["zero_grad_frac"] == 1.0
    assert torch.equal(plain.x_adv, x)  # zero gradient: it never moved
    assert defense(plain.x_adv).argmax(1).item() == 0
    defense.train()
    bpda = BPDA(steps=10, random_start=False)
    assert bpda.incompatibility(defense, threat) is None
    r = bpda.run(defense, x, y, threat)
    assert defense.training  # BPDA leaves the mode to the harness
    assert threat.check(x, r.x_adv, r.params) is None
    assert defense(r.x_adv).argmax(1).item() == 1
    assert r.extras["gradient"] == "bpda"


def test_bpda_composes_with_eot() -> None:
    defense, x, y, eps = _quantized_case()
    attack = BPDA(attack="eot", draws=3, steps=4, random_start=False)
    assert attack.budget == Budget(steps=4, restarts=1, eot_draws=3)
    r = attack.run(defense, x, y, LinfThreat(eps))
    assert defense(r.x_adv).argmax(1).item() == 1
    assert r.grad_evals == 12
    json.dumps(attack.config())


def test_bpda_requires_purify_and_a_forward_hook() -> None:
    model, _, _ = _linear_case(2)
    reason = BPDA().incompatibility(model, LinfThreat(0.1))
    assert reason is not None and "purify" in reason
    assert BPDA.requires == frozenset({"kind:classifier", "purify"})
    with pytest.raises(TypeError, match="flow-pgd-in.*forward"):
        BPDA(attack="flow-pgd-in")  # a density attack: no forward hook


# -- StAdv -------------------------------------------------------------------------------------

def test_stadv_stays_in_the_bound_and_lowers_accuracy() -> None:
    net = TinyCNN()
    x = smooth_images(16)
    y = net(x).argmax(1)
    threat = StAdvThreat(0.05)
    r = StAdv(steps=40).run(net, x, y, threat)
    assert r.params is not None and r.params.shape == (16, 16, 16, 2)
    assert threat.check(x, r.x_adv, r.params) is None
    assert float(r.params.abs().max()) <= 0.05 + 1e-6
    acc = (net(r.x_adv).argmax(1) == y).float().mean().item()
    assert acc < 1.0
    assert r.extras["success"] == (net(r.x_adv).argmax(1) != y).tolist()
    assert r.extras["smoothness"] == pytest.approx(0.05)


def test_stadv_declares_its_threat_model() -> None:
    net = TinyCNN()
    reason = StAdv().incompatibility(net, LinfThreat(0.1))
    assert reason is not None and "stadv" in reason
    assert StAdv().incompatibility(net, StAdvThreat()) is None


def test_pgd_attacks_the_flow_too() -> None:
    net = TinyCNN()
    x = smooth_images(4)
    y = net(x).argmax(1)
    threat = StAdvThreat(0.05)
    r = PGD(steps=5).run(net, x, y, threat, generator=_gen())
    assert r.params is not None and threat.check(x, r.x_adv, r.params) is None


# -- parameters and configuration --------------------------------------------------------------

@pytest.mark.parametrize(("build", "value"), [
    (lambda: PGD(steps=0), "0"), (lambda: PGD(steps=2.5), "2.5"),  # type: ignore[arg-type]
    (lambda: PGD(steps=True), "True"), (lambda: PGD(restarts=0), "0"),
    (lambda: PGD(eot_draws=-1), "-1"), (lambda: PGD(step_size=0.0), "0.0"),
    (lambda: PGD(step_size=float("nan")), "nan"), (lambda: PGD(loss="hinge"), "'hinge'"),
    (lambda: StAdv(lr=-0.01), "-0.01"), (lambda: StAdv(steps=0), "0"),
    (lambda: StAdv(smoothness=-1.0), "-1.0"),
])
def test_bad_parameters_raise_naming_the_value(build: Callable[[], object], value: str) -> None:
    with pytest.raises(ValueError, match=value):
        build()


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_pgd_is_no_weaker_than_torchattacks_at_equal_budget(eps):
    """Cross-check against an independent implementation: same start (the clean input), same
    steps and step rule; with keep-best ours must fool at least every sample theirs fools."""
    import torchattacks

    from benchmark.data import load_dataset
    from benchmark.data.subsets import get_subset, select
    from defenses.baseline import Undefended

    x, y, _ = select(load_dataset("digits"), get_subset("digits", "test100-v1"))
    model = Undefended().eval().requires_grad_(False)
    threat = LinfThreat(eps)
    ours = PGD(steps=20, random_start=False).run(model, x, y, threat).x_adv
    ref = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=False)
    theirs = ref(x, y)
    with torch.no_grad():
        ours_ok = model(ours).argmax(1) == y
        theirs_ok = model(theirs).argmax(1) == y
    assert not (ours_ok & ~theirs_ok).any()
