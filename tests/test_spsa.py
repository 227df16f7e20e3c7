"""SPSA (Uesato et al. 2018): the gradient estimate against autograd on a linear model, a
gradient-free break of a defense whose gradients are zero, and its checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attacks.losses import margin
from attacks.pgd import PGD
from attacks.spsa import SPSA, spsa_gradient
from benchmark.api.attack import AttackTraits
from tests.masking_traps import Quantize
from tests.toys import Linear, TinyCNN
from threat_models import L2Threat, LinfThreat


def test_spsa_estimate_points_along_the_true_gradient():
    """Margin of a linear model, away from the box edges and argmax switches: the estimate is
    unbiased, so with many directions its cosine with the exact gradient is close to 1."""
    torch.manual_seed(0)
    model = Linear(torch.randn(3, 16))
    x = 0.3 + 0.4 * torch.rand(4, 1, 4, 4)
    y = model(x).argmin(1)  # far from the decision: the best other class is stable nearby
    exact = []
    for i in range(4):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(margin(model(xi), y[i:i + 1]).sum(), xi)
        exact.append(g[0])
    exact = torch.stack(exact)
    est = spsa_gradient(lambda z: margin(model(z), y.repeat(len(z) // 4)), x, delta=1e-3,
                        samples=4096, generator=torch.Generator().manual_seed(1))
    cos = F.cosine_similarity(est.flatten(1), exact.flatten(1), dim=1)
    assert (cos > 0.9).all(), cos
    few = spsa_gradient(lambda z: margin(model(z), y.repeat(len(z) // 4)), x, delta=1e-3,
                        samples=8, generator=torch.Generator().manual_seed(1))
    assert (F.cosine_similarity(few.flatten(1), exact.flatten(1), dim=1) < cos).all()


def test_spsa_breaks_what_zero_gradients_hide_from_pgd():
    """Quantize (16 gray levels) has zero input gradients: PGD never moves, SPSA does."""
    defense = Quantize()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = defense(x).argmax(1)
    threat = LinfThreat(0.3)
    pgd = PGD(steps=10, random_start=False).run(defense, x, y, threat)
    assert (defense(pgd.x_adv).argmax(1) == y).all()
    res = SPSA(steps=20, samples=64, delta=0.05, lr=0.05).run(
        defense, x, y, threat, generator=torch.Generator().manual_seed(2))
    assert threat.check(x, res.x_adv) is None and res.grad_evals == 0
    fooled = defense(res.x_adv).argmax(1) != y
    assert fooled.float().mean() >= 0.5
    assert torch.equal(res.evidence["any_adversarial"], fooled)
    assert res.extras["queries"] == 20 * 65 + 1


def test_spsa_under_l2_stays_in_the_ball_and_raises_the_margin():
    model = TinyCNN()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    threat = L2Threat(1.0)
    res = SPSA(steps=10, samples=32).run(model, x, y, threat,
                                         generator=torch.Generator().manual_seed(4))
    assert threat.check(x, res.x_adv) is None
    assert (margin(model(res.x_adv), y) >= margin(model(x), y) - 1e-6).all()


def test_spsa_is_gradient_free_and_checks_its_arguments():
    assert SPSA.traits({}) == AttackTraits(gradient="none")
    for bad, match in [({"steps": 0}, "steps"), ({"delta": 0.0}, "delta"),
                       ({"lr": -1.0}, "lr"), ({"samples": 1.5}, "samples"),
                       ({"loss": "hinge"}, "loss")]:
        with pytest.raises(ValueError, match=match):
            SPSA(**bad)
