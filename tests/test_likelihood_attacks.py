"""The six log-likelihood attacks of Arvinte et al. (2023) against exact Gaussian densities
(closed-form or box-QP optima), plus their contracts and failure paths."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.likelihood import (
    PAPER_LR,
    PIXEL_LR,
    HighComplexityAttack,
    LikelihoodAttack,
    NearSampleAttack,
    PriorOnlyAttack,
    RandomRegionAttack,
    ReverseIntegrationAttack,
    UnrestrictedLikelihoodAttack,
    dct2,
    dct_highfreq_norm,
)
from benchmark.plugins.builtin import ATTACKS
from tests.density_toys import GaussianDensity, box_qp_max_logp
from tests.toys import gen
from threat_models.linf import LinfThreat
from threat_models.unrestricted import UnrestrictedThreat

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 4, 4)
D = 16


def diagonal_gaussian(seed: int = 0) -> GaussianDensity:
    g = gen(seed)
    std = 0.05 + 0.15 * torch.rand(D, dtype=F64, generator=g)
    mu = -0.2 + 1.4 * torch.rand(SHAPE, dtype=F64, generator=g)
    return GaussianDensity(torch.diag(std), mu)


def full_gaussian(seed: int = 0) -> GaussianDensity:
    g = gen(seed)
    m = torch.randn(D, D, dtype=F64, generator=g)
    cov = 0.02 * m @ m.T / D + 0.002 * torch.eye(D, dtype=F64)
    mu = 0.2 + 0.6 * torch.rand(SHAPE, dtype=F64, generator=g)
    return GaussianDensity(torch.linalg.cholesky(cov), mu)


def sample_images(defense: GaussianDensity, n: int = 6, seed: int = 1) -> torch.Tensor:
    return defense.flow.sample(n, generator=gen(seed)).reshape(n, *SHAPE).clamp(0, 1)


def gain_ratio(defense: GaussianDensity, x0: torch.Tensor, x_adv: torch.Tensor,
               x_opt: torch.Tensor) -> torch.Tensor:
    """(log p(x_adv) - log p(x0)) / (log p(x*) - log p(x0)) per sample."""
    with torch.no_grad():
        before = defense.log_prob(x0)
        return (defense.log_prob(x_adv) - before) / (
            defense.log_prob(x_opt.reshape(x0.shape)) - before)


# --------------------------------------------------------------------------------------------
# Oracles: the attacks reach the maximizer of log p over their feasible set
# --------------------------------------------------------------------------------------------
def test_near_sample_reaches_clip_of_the_mean_for_a_diagonal_gaussian():
    defense = diagonal_gaussian()
    x = sample_images(defense)
    eps = 0.03
    res = NearSampleAttack().run(defense, x, torch.zeros(len(x)), LinfThreat(eps),
                                 generator=gen(2))
    x_opt = torch.minimum(torch.maximum(defense.mean.reshape(SHAPE), x - eps), x + eps)
    x_opt = x_opt.clamp(0, 1)
    ratio = gain_ratio(defense, x, res.x_adv, x_opt)
    assert bool((ratio > 0.99).all()) and bool((ratio < 1 + 1e-9).all()), ratio
    assert LinfThreat(eps).check(res.extras["x_start"], res.x_adv) is None
    assert torch.equal(res.extras["x_start"], x)


@pytest.mark.parametrize("eps", [0.03, 0.2])  # 0.2: optima partly inside the box
def test_near_sample_reaches_the_box_qp_optimum_for_a_full_covariance(eps):
    defense = full_gaussian()
    x = sample_images(defense)
    res = NearSampleAttack().run(defense, x, torch.zeros(len(x)), LinfThreat(eps))
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_opt = box_qp_max_logp(defense, lo, hi)
    ratio = gain_ratio(defense, x, res.x_adv, x_opt)
    assert bool((ratio > 0.99).all()) and bool((ratio < 1 + 1e-6).all()), ratio


def test_random_region_and_prior_only_reach_the_optimum_of_their_region():
    defense = full_gaussian(3)
    x = sample_images(defense, 4)
    for attack in (RandomRegionAttack(), PriorOnlyAttack()):
        res = attack.run(defense, x, torch.zeros(len(x)), UnrestrictedThreat(), generator=gen(5))
        start = res.extras["x_start"]
        assert not torch.equal(start, x)
        # the attack's own region: l-inf 0.08 around its start, within the box
        assert float((res.x_adv - start).abs().max()) <= 0.08 + 1e-12
        lo, hi = (start - 0.08).clamp(0, 1), (start + 0.08).clamp(0, 1)
        ratio = gain_ratio(defense, start, res.x_adv, box_qp_max_logp(defense, lo, hi))
        assert bool((ratio > 0.99).all()), (attack.name, ratio)
        assert res.extras["region_eps"] == 0.08


def test_random_region_start_matches_the_paper_distribution():
    """x ~ N(0, 0.2) in [-1, 1] (0.2 read as the std) -> N(0.5, 0.1^2) in [0, 1]."""
    defense = diagonal_gaussian()
    x = torch.zeros(500, *SHAPE, dtype=F64)
    res = RandomRegionAttack(steps=1).run(defense, x, torch.zeros(500), UnrestrictedThreat(),
                                          generator=gen(0))
    start = res.extras["x_start"]
    assert abs(float(start.mean()) - 0.5) < 0.005
    assert abs(float(start.std()) - 0.1) < 0.005


def test_unrestricted_reaches_the_box_optimum_from_gray():
    defense = diagonal_gaussian(4)
    x = sample_images(defense, 3)
    res = UnrestrictedLikelihoodAttack().run(defense, x, torch.zeros(3), UnrestrictedThreat())
    assert bool((res.extras["x_start"] == 0.5).all())
    x_opt = defense.mean.reshape(SHAPE).clamp(0, 1).expand_as(x)
    ratio = gain_ratio(defense, res.extras["x_start"], res.x_adv, x_opt)
    assert bool((ratio > 0.99).all()), ratio


def test_reverse_integration_finds_the_mode_through_the_latent():
    """For x = A x1 + b, eq. 6 is maximized at x1 = 0, whose sample is the mean b."""
    g = gen(6)
    a = torch.diag(0.05 + 0.1 * torch.rand(D, dtype=F64, generator=g))
    defense = GaussianDensity(a, 0.3 + 0.4 * torch.rand(SHAPE, dtype=F64, generator=g))
    x = torch.zeros(4, *SHAPE, dtype=F64)
    res = ReverseIntegrationAttack(init="prior", lr=0.05, steps=300).run(
        defense, x, torch.zeros(4), UnrestrictedThreat(), generator=gen(7))
    x_opt = defense.mean.reshape(SHAPE).expand_as(x)
    ratio = gain_ratio(defense, res.extras["x_start"], res.x_adv, x_opt)
    assert bool((ratio > 0.99).all()), ratio
    assert bool((res.extras["box_excess"] == 0).all())
    torch.testing.assert_close(res.extras["latent_logp"].double(),
                               defense.log_prob(res.x_adv).float().double())


def test_reverse_integration_starts_from_the_test_images_latent():
    """As published (figure 4): the start is encode(x); decoding it gives x back (exact for a
    linear flow), so the first objective value is log p(x) / D and x_start is the test image."""
    g = gen(8)
    a = torch.diag(0.05 + 0.1 * torch.rand(D, dtype=F64, generator=g))
    defense = GaussianDensity(a, 0.3 + 0.4 * torch.rand(SHAPE, dtype=F64, generator=g))
    x = sample_images(defense, 3)
    attack = ReverseIntegrationAttack(lr=0.05, steps=5)
    assert attack.init == "encoding" and attack.start == "test"
    assert "init" in attack.config() and "start" not in attack.config()
    res = attack.run(defense, x, torch.zeros(3), UnrestrictedThreat(), generator=gen(9))
    assert torch.equal(res.extras["x_start"], x)
    torch.testing.assert_close(res.extras["curve"][0].double(),
                               (defense.log_prob(x) / D).float().double())
    # ... and the attack raised it from there
    assert bool((defense.log_prob(res.x_adv) > defense.log_prob(x)).all())
    prior = ReverseIntegrationAttack(init="prior", lr=0.05, steps=5)
    assert prior.start == "generated"
    res = prior.run(defense, x, torch.zeros(3), UnrestrictedThreat(), generator=gen(9))
    assert not torch.equal(res.extras["x_start"], x)
    with pytest.raises(ValueError, match="init must be one of 'encoding', 'prior'"):
        ReverseIntegrationAttack(init="noise")


def test_reverse_integration_clamps_samples_outside_the_box_and_reports_it():
    defense = GaussianDensity(torch.eye(D, dtype=F64) * 0.1, torch.full(SHAPE, 1.3, dtype=F64),
                              check_box=False)
    x = torch.zeros(2, *SHAPE, dtype=F64)
    # the paper's selection (by the objective; checks would rank by the clamped image's log p)
    res = ReverseIntegrationAttack(init="prior", lr=0.05, steps=200, check_every=0).run(
        defense, x, torch.zeros(2), UnrestrictedThreat(), generator=gen(0))
    assert float(res.x_adv.max()) <= 1.0 and float(res.x_adv.min()) >= 0.0
    assert bool((res.extras["box_excess"] > 0.25).all())
    # with the penalty the sample is pulled back towards the box
    pen = ReverseIntegrationAttack(init="prior", lr=0.05, steps=200, box_penalty=100.0,
                                   check_every=0).run(
        defense, x, torch.zeros(2), UnrestrictedThreat(), generator=gen(0))
    assert bool((pen.extras["box_excess"] < res.extras["box_excess"]).all())


# --------------------------------------------------------------------------------------------
# High complexity: the DCT term
# --------------------------------------------------------------------------------------------
def test_dct_matches_scipy_and_is_orthonormal():
    fft = pytest.importorskip("scipy.fft")
    x = torch.rand(3, 2, 8, 6, dtype=F64, generator=gen(0))
    ref = torch.from_numpy(fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    torch.testing.assert_close(dct2(x), ref)
    torch.testing.assert_close(dct2(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    hf = ref[..., 4:, 3:].reshape(3, -1).norm(dim=1)
    torch.testing.assert_close(dct_highfreq_norm(x), 2 * hf)  # [-1, 1] units


def test_high_complexity_with_zero_lambda_is_the_near_sample_attack():
    defense = full_gaussian(8)
    x = sample_images(defense, 3)
    a = NearSampleAttack(steps=50).run(defense, x, torch.zeros(3), LinfThreat(0.03))
    b = HighComplexityAttack(steps=50, lam=0.0).run(defense, x, torch.zeros(3), LinfThreat(0.03))
    assert torch.equal(a.x_adv, b.x_adv)


def test_high_complexity_trades_likelihood_for_high_frequencies():
    defense = full_gaussian(8)
    x = sample_images(defense, 4)
    y = torch.zeros(4)
    near = NearSampleAttack(steps=200).run(defense, x, y, LinfThreat(0.03))
    hc = HighComplexityAttack(steps=200, lam=1.0).run(defense, x, y, LinfThreat(0.03))
    assert bool((dct_highfreq_norm(hc.x_adv) > dct_highfreq_norm(near.x_adv)).all())
    assert bool((defense.log_prob(hc.x_adv) < defense.log_prob(near.x_adv)).all())
    # its best objective is at least the near-sample point's value of the same objective
    near_obj = defense.log_prob(near.x_adv) / D + dct_highfreq_norm(near.x_adv)
    assert bool((hc.extras["best_objective"].double() >= near_obj - 1e-6).all())
    assert LinfThreat(0.03).check(x, hc.x_adv) is None


# --------------------------------------------------------------------------------------------
# Contracts: extras, curve, determinism, registration
# --------------------------------------------------------------------------------------------
ALL: list[type[LikelihoodAttack]] = [
    NearSampleAttack, RandomRegionAttack, HighComplexityAttack, ReverseIntegrationAttack,
    PriorOnlyAttack, UnrestrictedLikelihoodAttack]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_result_contract(cls):
    defense = full_gaussian(9)
    x = sample_images(defense, 3).float()
    threat = LinfThreat(0.03) if cls.start == "test" else UnrestrictedThreat()
    attack = cls(steps=7, record_every=3)
    assert attack.incompatibility(defense, threat) is None
    res = attack.run(defense, x, torch.zeros(3), threat, generator=gen(1))
    assert res.extras["direction"] == cls.direction == "raise"
    assert res.extras["curve"].shape == (4, 3)  # steps 0, 3, 6 and 7
    assert res.extras["curve_steps"] == [0, 3, 6, 7]
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert threat.check(res.extras["x_start"], res.x_adv) is None
    assert res.grad_evals == 7 and attack.budget.steps == 7
    # best iterate: never below the start's objective, equal to the curve's maximum
    best = res.extras["best_objective"]
    torch.testing.assert_close(best, res.extras["curve"].max(0).values)
    assert bool((best >= res.extras["curve"][0]).all())
    again = cls(steps=7, record_every=3).run(defense, x, torch.zeros(3), threat, generator=gen(1))
    assert torch.equal(again.x_adv, res.x_adv)
    assert repr(attack).startswith(cls.__name__ + "(steps=7")
    assert ATTACKS.get(cls.name) is cls


class MisleadingObjective(GaussianDensity):
    """A density whose attack objective points the wrong way (-log p): the no-transfer failure
    in its purest form (an objective that rises while the reported likelihood falls)."""

    def attack_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(x)


def test_checks_against_the_reported_log_p_keep_the_best_reported_iterate():
    a = full_gaussian(4)
    defense = MisleadingObjective(a.flow.A, a.flow.b.reshape(SHAPE))
    x = sample_images(defense, 4)
    threat = LinfThreat(0.03)
    blind = NearSampleAttack(steps=20, check_every=0).run(defense, x, torch.zeros(4), threat)
    assert bool((defense.log_prob(blind.x_adv) < defense.log_prob(x)).all())  # no transfer
    assert "checked_log_prob" not in blind.extras
    checked = NearSampleAttack(steps=20, check_every=5)
    assert checked.checks() == 5  # steps 0, 5, 10, 15, 20
    res = checked.run(defense, x, torch.zeros(4), threat)
    # the start is checked and wins: the reported log p never falls below it
    assert torch.equal(res.x_adv, x)
    torch.testing.assert_close(res.extras["checked_log_prob"],
                               (defense.log_prob(x) / D).float())
    assert res.extras["checks"] == 5
    # the "objective of the checked iterate" is the start's, not the blind run's best
    torch.testing.assert_close(res.extras["best_objective"], (-defense.log_prob(x) / D).float())
    assert NearSampleAttack(steps=7, check_every=3).checks() == 4  # 0, 3, 6 and 7
    # checked by default (the fast PF-ODE objective does not transfer; see the module docs)
    from attacks.likelihood import CHECK_EVERY

    assert NearSampleAttack().check_every == CHECK_EVERY == 50
    assert NearSampleAttack().checks() == 11
    # the high-complexity attack ranks by its own objective, with the reported log p in it
    hc = HighComplexityAttack(lam=2.0)
    torch.testing.assert_close(hc._checked(defense, x),
                               defense.log_prob(x) / D + 2.0 * dct_highfreq_norm(x))
    with pytest.raises(ValueError, match="check_every must be an integer >= 0.*got -1"):
        NearSampleAttack(check_every=-1)


def test_checks_follow_a_faithful_objective_to_the_same_optimum():
    defense = full_gaussian(5)
    x = sample_images(defense, 3)
    plain = NearSampleAttack(steps=30).run(defense, x, torch.zeros(3), LinfThreat(0.03))
    res = NearSampleAttack(steps=30, check_every=10).run(defense, x, torch.zeros(3),
                                                          LinfThreat(0.03))
    # on a deterministic density the last iterate is the best by both: the same point
    torch.testing.assert_close(res.x_adv, plain.x_adv)
    rev = ReverseIntegrationAttack(steps=10, check_every=5).run(
        defense, x, torch.zeros(3), UnrestrictedThreat())
    before = defense.log_prob(x) / D
    assert bool((rev.extras["checked_log_prob"] >= before.float() - 1e-6).all())


def test_generated_starts_depend_on_the_generator():
    defense = full_gaussian(9)
    x = sample_images(defense, 2)
    a = RandomRegionAttack(steps=2).run(defense, x, torch.zeros(2), UnrestrictedThreat(),
                                        generator=gen(1))
    b = RandomRegionAttack(steps=2).run(defense, x, torch.zeros(2), UnrestrictedThreat(),
                                        generator=gen(2))
    assert not torch.equal(a.extras["x_start"], b.extras["x_start"])


def test_pixel_learning_rate_reproduces_the_paper_run_in_minus_one_one_units():
    """Adam with lr/2 on x in [0, 1] visits exactly (x_pm + 1) / 2 of Adam with lr on x_pm."""
    defense = full_gaussian(10)
    x = sample_images(defense, 2)
    res = NearSampleAttack(steps=30).run(defense, x, torch.zeros(2), LinfThreat(0.03))
    xpm = (2 * x - 1).clone().requires_grad_(True)
    opt = torch.optim.Adam([xpm], lr=PAPER_LR)
    lo, hi = (2 * x - 1 - 0.06).clamp(-1, 1), (2 * x - 1 + 0.06).clamp(-1, 1)
    best, best_x = torch.full((2,), -math.inf, dtype=F64), xpm.detach().clone()
    for _ in range(31):
        lp = defense.log_prob((xpm + 1) / 2)
        better = lp.detach() > best
        best_x[better], best[better] = xpm.detach()[better], lp.detach()[better]
        opt.zero_grad()
        (-lp.sum()).backward()
        opt.step()
        with torch.no_grad():
            xpm.copy_(torch.minimum(torch.maximum(xpm, lo), hi))
    assert PIXEL_LR == PAPER_LR / 2
    torch.testing.assert_close(res.x_adv, (best_x + 1) / 2, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Failure paths
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (HighComplexityAttack, {"lam": -1.0}, "lam must be a finite weight >= 0"),
    (NearSampleAttack, {"steps": 0}, "steps must be an integer >= 1, got 0"),
    (NearSampleAttack, {"lr": 0.0}, "lr must be a finite learning rate > 0, got 0.0"),
    (NearSampleAttack, {"lr": float("nan")}, "lr must be"),
    (RandomRegionAttack, {"region_eps": 1.5}, "region_eps must be an l-inf radius in"),
    (RandomRegionAttack, {"region_eps": 0}, "got 0"),
    (RandomRegionAttack, {"start_std": -0.1}, "start_std must be"),
    (ReverseIntegrationAttack, {"box_penalty": -1}, "box_penalty must be"),
    (NearSampleAttack, {"record_every": 0}, "record_every must be an integer >= 1"),
])
def test_bad_parameters_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_non_numbers_are_type_errors():
    with pytest.raises(TypeError, match="lam must be a real number"):
        HighComplexityAttack(lam="1")  # type: ignore[arg-type]


def test_threat_eps_outside_the_pixel_range_is_named():
    defense = diagonal_gaussian()
    x = sample_images(defense, 1)
    with pytest.raises(ValueError, match="threat eps=1.5"):
        NearSampleAttack(steps=1).run(defense, x, torch.zeros(1), LinfThreat(1.5))


def test_incompatible_defenses_and_threats():
    from tests.toys import Linear

    classifier = Linear(torch.zeros(10, D))
    msg = NearSampleAttack().incompatibility(classifier, LinfThreat(0.03))
    assert msg is not None and "kind:density" in msg
    with pytest.raises(TypeError, match="kind:density"):
        NearSampleAttack(steps=1).run(classifier, torch.zeros(1, *SHAPE), torch.zeros(1),
                                      LinfThreat(0.03))
    msg = RandomRegionAttack().incompatibility(diagonal_gaussian(), LinfThreat(0.03))
    assert msg is not None and "'linf'" in msg and "unrestricted" in msg
    msg = NearSampleAttack().incompatibility(diagonal_gaussian(), UnrestrictedThreat())
    assert msg is not None and "'unrestricted'" in msg


def test_flows_lack_the_parts_prior_only_and_reverse_need():
    from defenses.flow import FlowDensity

    flow = FlowDensity(model="digits-realnvp-clean")
    assert PriorOnlyAttack().incompatibility(flow, UnrestrictedThreat()) == (
        "ll-prior-only requires log_prob_terms, which the defense does not declare")
    msg = ReverseIntegrationAttack().incompatibility(flow, UnrestrictedThreat())
    assert msg is not None and "sample_from_latent" in msg
    assert NearSampleAttack().incompatibility(flow, LinfThreat(0.03)) is None


# --------------------------------------------------------------------------------------------
# End to end through the PF-ODE detector on Gaussian data (issue 17, item 6)
# --------------------------------------------------------------------------------------------
PF_SHAPE = (1, 2, 2)


def _pf_ode_gaussian() -> tuple[object, object, GaussianDensity]:
    """PFODEDensity over the analytic denoiser of N(mu, Sigma) (model space), its exact prior,
    a 10-step attack solver; and the exact data density at t0 in [0, 1] coordinates as a
    GaussianDensity (the box-QP oracle's input)."""
    from benchmark.zoo.analytic import GaussianDenoiser
    from benchmark.zoo.schedules import SubVPSDE
    from defenses.pfode import PFODEDensity, Solver

    g = gen(11)
    mu = 0.3 * torch.randn(PF_SHAPE, generator=g, dtype=F64)
    a = 0.3 * torch.randn(4, 4, generator=g, dtype=F64)
    sigma = a @ a.T + 0.1 * torch.eye(4, dtype=F64)
    gauss = GaussianDenoiser(mu, sigma)
    sde = SubVPSDE()
    pf = PFODEDensity(denoiser=gauss, schedule=sde,
                      attack_solver=Solver("coarse", step=0.1, fresh_noise=False),
                      prior=lambda x1: gauss.log_prob_marginal(x1, sde.t1, schedule=sde))
    at, st = sde.alpha_sigma(torch.tensor([sde.t0], dtype=F64))
    cov01 = (at**2 * sigma + st**2 * torch.eye(4, dtype=F64)) / 4
    exact = GaussianDensity(torch.linalg.cholesky(cov01), (at * mu + 1) / 2)
    return pf, sde, exact


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_every_attack_raises_the_exact_log_p_through_the_pf_ode(cls):
    pf, _, exact = _pf_ode_gaussian()
    x = exact.flow.sample(3, generator=gen(12)).reshape(3, *PF_SHAPE).clamp(0.05, 0.95)
    threat = LinfThreat(0.03) if cls.start == "test" else UnrestrictedThreat()
    # the optimization itself (check_every = 0): on 4 dimensions the reporting solver's
    # Hutchinson noise is of the size of a 10-step gain, so checks could keep the start
    res = cls(steps=10, lr=0.003 if cls is not ReverseIntegrationAttack else 0.05,
              check_every=0).run(pf, x, torch.zeros(3), threat, generator=gen(13))
    start = res.extras["x_start"]
    gain = exact.log_prob(res.x_adv) - exact.log_prob(start)
    if cls is HighComplexityAttack:
        # it trades likelihood for high frequencies (lam = 1): its exact objective rises
        gain = gain / 4 + dct_highfreq_norm(res.x_adv) - dct_highfreq_norm(start)
    assert bool((gain > 0).all()), (cls.name, gain)
    if cls is NearSampleAttack:  # within 5% of the box-constrained optimum's gain
        lo, hi = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
        ratio = gain_ratio(exact, x, res.x_adv, box_qp_max_logp(exact, lo, hi))
        assert bool((ratio > 0.95).all()), ratio
