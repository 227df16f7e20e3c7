"""Pope, Balaji & Feizi (2020) section 3 as oracles: PGD in l2 on a linear Gaussian flow reaches
the closed-form optimal likelihood drop (theorem 3.1 and its special cases), and simulated
adversarial training reproduces the trade-off L_nat-dr(m), L_sen(m) of section 3.2."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.flow_pgd import (
    FlowPGDIn,
    adversarial_training_alpha,
    pope_tradeoff,
    simulate_adversarial_training,
)
from tests.density_toys import GaussianDensity
from tests.toys import gen
from threat_models.l2 import L2Threat

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 2, 5)  # n = 10, as in the paper's figure 3
N = 10


def flow_density(cov: torch.Tensor, mean: torch.Tensor) -> GaussianDensity:
    return GaussianDensity(torch.linalg.cholesky(cov), mean.reshape(SHAPE))


def drops(defense: GaussianDensity, x: torch.Tensor, x_adv: torch.Tensor, delta_opt: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        before = defense.log_prob(x)
        return before - defense.log_prob(x_adv), before - defense.log_prob(x + delta_opt)


def attack_l2(defense: GaussianDensity, x: torch.Tensor, eps: float, **kw) -> torch.Tensor:
    """PGD in l2 with a constant step of eps / 5: on the sphere the normalized-gradient step
    followed by the projection has the optimum as a fixed point, so the iterates settle on it
    (Madry's 2.5 eps / steps only just reaches the sphere and turns too slowly along it)."""
    kw.setdefault("random_start", False)
    attack = FlowPGDIn(steps=kw.pop("steps", 200), step_size=eps / 5, **kw)
    return attack.run(defense, x, torch.zeros(len(x)), L2Threat(eps), generator=gen(3)).x_adv


def test_pgd_l2_reaches_theorem_3_1_on_a_general_covariance():
    g = gen(0)
    m = torch.randn(N, N, dtype=F64, generator=g)
    cov = 1e-3 * (m @ m.T / N + 0.2 * torch.eye(N, dtype=F64))
    mean = torch.full((N,), 0.5, dtype=F64)
    defense = flow_density(cov, mean)
    x = defense.flow.sample(8, generator=gen(1)).reshape(8, *SHAPE).clamp(0.2, 0.8)
    eps = 0.05  # x + delta stays inside [0, 1]: the pixel box is inactive, as in the theorem
    delta = defense.flow.optimal_l2_perturbation(x, eps)
    assert float(delta.flatten(1).norm(dim=1).sub(eps).abs().max()) < 1e-9
    got, best = drops(defense, x, attack_l2(defense, x, eps), delta)
    assert bool((got >= 0.99 * best).all()), (got / best)
    assert bool((got <= best * (1 + 1e-6)).all())  # nothing beats the optimum


def test_pgd_l2_reaches_the_spherical_optimum():
    """K = s I: delta* = eps (x - mu) / ||x - mu|| (eq. 3)."""
    mean = 0.5 + 0.05 * torch.randn(N, dtype=F64, generator=gen(2))
    defense = flow_density(4e-3 * torch.eye(N, dtype=F64), mean)
    x = defense.flow.sample(8, generator=gen(4)).reshape(8, *SHAPE).clamp(0.2, 0.8)
    eps = 0.05
    delta = defense.flow.spherical_l2_perturbation(x, eps)
    x_adv = attack_l2(defense, x, eps)
    got, best = drops(defense, x, x_adv, delta)
    assert bool((got >= 0.99 * best).all()), (got / best)
    cos = torch.nn.functional.cosine_similarity((x_adv - x).flatten(1), delta.flatten(1))
    assert bool((cos > 0.99).all()), cos


def test_pgd_l2_finds_the_universal_direction_at_the_mean():
    """x = mu: delta* = eps u_min(K) (section 3.1.2); the drop is eps^2 / (2 lambda_min)."""
    g = gen(5)
    q, _ = torch.linalg.qr(torch.randn(N, N, dtype=F64, generator=g))
    lam = torch.linspace(1e-3, 1e-2, N, dtype=F64)
    cov = q @ torch.diag(lam) @ q.T
    mean = torch.full((N,), 0.5, dtype=F64)
    defense = flow_density(cov, mean)
    x = mean.reshape(1, *SHAPE).repeat(4, 1, 1, 1)
    eps = 0.05
    u = defense.flow.universal_l2_perturbation(eps).reshape(1, *SHAPE)
    # from x = mu the gradient vanishes: the random start breaks the tie
    x_adv = attack_l2(defense, x, eps, random_start=True)
    got, best = drops(defense, x, x_adv, u.expand_as(x))
    torch.testing.assert_close(best, torch.full_like(best, eps**2 / (2 * float(lam[0]))))
    assert bool((got >= 0.99 * best).all()), (got / best)
    cos = torch.nn.functional.cosine_similarity((x_adv - x).flatten(1), u.flatten(1).expand(4, -1))
    assert bool((cos.abs() > 0.99).all()), cos


def test_alpha_matches_the_chi_moments_by_monte_carlo():
    g = torch.randn(200_000, N, dtype=F64, generator=gen(6))
    eps = 0.7
    norm = g.norm(dim=1, keepdim=True)
    adv = g + eps * g / norm
    cov = adv.T @ adv / len(adv)  # E[(x + eps x/|x|)(...)^T] for x ~ N(0, I)
    alpha = adversarial_training_alpha(N, eps)
    torch.testing.assert_close(torch.diagonal(cov).mean().item(), 1 + alpha, rtol=5e-3, atol=0)
    # the chi mean: E||g|| = sqrt(2) Gamma(11/2) / Gamma(5)
    assert abs(float(norm.mean()) - math.sqrt(2) * math.gamma(5.5) / math.gamma(5)) < 0.01


def test_tradeoff_closed_form_properties():
    m = torch.arange(0, 11)
    nat_dr, sen = pope_tradeoff(N, 1.0, m)
    assert float(nat_dr[0]) == 0.0
    assert bool((nat_dr.diff() > 0).all()) and bool((sen.diff() < 0).all())  # the trade-off
    # sigma only enters through eps / sigma
    a, b = pope_tradeoff(N, 0.5, m, sigma=0.5)
    torch.testing.assert_close(a, nat_dr)
    torch.testing.assert_close(b, sen)
    with pytest.raises(ValueError, match="m must be >= 0"):
        pope_tradeoff(N, 1.0, -1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0"):
        pope_tradeoff(N, 1.0, 1, sigma=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        adversarial_training_alpha(N, -1.0)
    with pytest.raises(ValueError, match="m must be an integer >= 0, got 1.5"):
        simulate_adversarial_training(N, 1.0, 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_simulated_adversarial_training_matches_the_closed_form(m):
    eps = 1.0
    sim = simulate_adversarial_training(N, eps, m, samples=20_000, generator=gen(7))
    nat_dr, sen = pope_tradeoff(N, eps, m)
    assert abs(sim["nat_dr"] - float(nat_dr)) <= 0.04 * float(nat_dr) + 0.01, sim["nat_dr"]
    assert abs(sim["sen"] - float(sen)) <= 0.03 * float(sen), sim["sen"]
    growth = (1 + adversarial_training_alpha(N, eps)) ** m
    torch.testing.assert_close(sim["cov"], growth * torch.eye(N, dtype=F64), atol=0.05 * growth,
                               rtol=0)


@pytest.mark.slow
def test_simulated_tradeoff_curve_of_figure_3():
    """m = 0..10, n = 10 (figure 3), 100k samples per round: within 2% everywhere."""
    eps = 0.5
    for m in range(11):
        sim = simulate_adversarial_training(N, eps, m, samples=100_000, generator=gen(m))
        nat_dr, sen = pope_tradeoff(N, eps, m)
        assert abs(sim["nat_dr"] - float(nat_dr)) <= 0.02 * float(nat_dr) + 5e-3, (m, sim)
        assert abs(sim["sen"] - float(sen)) <= 0.02 * float(sen), (m, sim)
