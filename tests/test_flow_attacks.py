"""Pope et al.'s in- and out-of-distribution PGD attacks on the zoo's digits RealNVP."""

from __future__ import annotations

import pytest
import torch

from attacks.flow_pgd import FlowPGD, FlowPGDIn, FlowPGDOOD, FlowUniform
from benchmark.plugins.builtin import ATTACKS
from benchmark.zoo.flows import dequantize
from tests.toys import gen, single_thread
from threat_models.l2 import L2Threat
from threat_models.linf import LinfThreat
from threat_models.unrestricted import UnrestrictedThreat


@pytest.fixture(scope="module")
def flow():
    from defenses.flow import FlowDensity

    return FlowDensity(model="digits-realnvp-clean")


@pytest.fixture(scope="module")
def digits():
    from benchmark.data.digits import load_digits

    x = load_digits().test.x[:8]
    return dequantize(x, gen(0))


def test_in_distribution_attack_lowers_log_p_within_the_box(flow, digits):
    eps = 0.02
    with single_thread():
        res = FlowPGDIn(steps=10).run(flow, digits, torch.zeros(8), LinfThreat(eps),
                                      generator=gen(1))
        before, after = flow.log_prob(digits), flow.log_prob(res.x_adv)
    assert ATTACKS.get("flow-pgd-in") is FlowPGDIn
    assert torch.equal(res.extras["x_start"], digits)
    assert LinfThreat(eps).check(digits, res.x_adv) is None
    # the zoo's clean RealNVP is fragile (manifest: 4.1 -> 273 bits/dim at eps 0.02, 20 steps)
    gap = flow.logp_to_bpd(after) - flow.logp_to_bpd(before)
    assert bool((gap > 1.0).all()), gap
    # best iterate: the returned point scores the curve's maximum, and beats the start
    curve = res.extras["curve"]
    assert curve.shape == (11, 8)
    torch.testing.assert_close(-after / flow.dim, curve.max(0).values, rtol=1e-4, atol=1e-5)
    assert bool((curve.max(0).values > curve[0]).all())
    # monotone-ish: the running best never drops and the last iterate is close to it
    running = curve.cummax(0).values
    assert bool((running[-1] >= running[len(running) // 2]).all())


def test_out_of_distribution_attack_raises_log_p_of_noise(flow, digits):
    eps = 0.05
    with single_thread():
        res = FlowPGDOOD(steps=10).run(flow, digits[:4], torch.zeros(4), LinfThreat(eps),
                                       generator=gen(2))
        noise = res.extras["x_start"]
        before, after = flow.log_prob(noise), flow.log_prob(res.x_adv)
    assert FlowPGDOOD.direction == res.extras["direction"] == "raise"
    assert FlowPGDOOD.start == "generated" and FlowPGDIn.start == "test"
    assert not torch.equal(noise, digits[:4])
    assert float(noise.min()) >= 0 and float(noise.max()) <= 1
    assert LinfThreat(eps).check(noise, res.x_adv) is None
    assert bool((after > before).all())
    # reproducible: the noise and the random start come from the generator
    with single_thread():
        again = FlowPGDOOD(steps=10).run(flow, digits[:4], torch.zeros(4), LinfThreat(eps),
                                         generator=gen(2))
        other = FlowPGDOOD(steps=1).run(flow, digits[:4], torch.zeros(4), LinfThreat(eps),
                                        generator=gen(3))
    assert torch.equal(again.x_adv, res.x_adv)
    assert not torch.equal(other.extras["x_start"], noise)


def test_more_budget_hurts_more(flow, digits):
    """The attack's effect grows with eps (the paper's tables 1-2)."""
    x = digits[:4]
    with single_thread():
        bpd = [float(flow.bits_per_dim(FlowPGDIn(steps=5, random_start=False).run(
            flow, x, torch.zeros(4), LinfThreat(e)).x_adv).mean()) for e in (0.005, 0.02)]
    assert bpd[1] > bpd[0] > float(flow.bits_per_dim(x).mean())


def test_restarts_keep_the_best_of_every_run(flow, digits):
    """Restarts (issue 17: attacks at a strength that can be believed): each sample gets the
    best of its runs, so more restarts never do worse on the same first run."""
    x = digits[:4]
    with single_thread():
        one = FlowPGDOOD(steps=3).run(flow, x, torch.zeros(4), LinfThreat(0.05),
                                      generator=gen(4))
        three = FlowPGDOOD(steps=3, restarts=3).run(flow, x, torch.zeros(4), LinfThreat(0.05),
                                                    generator=gen(4))
    # the same noise (drawn first) and the same first run: three restarts can only add
    assert torch.equal(one.extras["x_start"], three.extras["x_start"])
    assert bool((three.extras["best_objective"] >= one.extras["best_objective"]).all())
    assert bool((three.extras["best_objective"] > one.extras["best_objective"]).any())
    assert three.grad_evals == 9 and FlowPGDOOD(restarts=3).budget.restarts == 3
    assert three.extras["curve"].shape == one.extras["curve"].shape == (4, 4)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1, got 0"):
        FlowPGDIn(restarts=0)


def test_uniform_baseline_fills_the_ball_and_pgd_beats_it(flow, digits):
    x = digits[:4]
    eps = 0.02
    with single_thread():
        base = FlowUniform().run(flow, x, torch.zeros(4), LinfThreat(eps), generator=gen(5))
        best8 = FlowUniform(samples=8).run(flow, x, torch.zeros(4), LinfThreat(eps),
                                           generator=gen(5))
        pgd = FlowPGDIn(steps=10).run(flow, x, torch.zeros(4), LinfThreat(eps), generator=gen(5))
        bpd = {k: flow.bits_per_dim(r.x_adv) for k, r in
               {"base": base, "best8": best8, "pgd": pgd}.items()}
    assert LinfThreat(eps).check(x, base.x_adv) is None
    assert float((base.x_adv - x).abs().max()) > 0.9 * eps  # it fills the ball
    assert bool((bpd["best8"] >= bpd["base"] - 1e-6).all())  # the first draw is among the 8
    assert bool((bpd["pgd"] > bpd["best8"]).all())  # the gradient beats random noise
    assert base.grad_evals == 0 and base.extras["direction"] == "lower"
    assert ATTACKS.get("flow-uniform") is FlowUniform


def test_l2_geometry_and_step_size(flow, digits):
    with single_thread():
        res = FlowPGDIn(steps=3, step_size=0.1).run(flow, digits[:2], torch.zeros(2),
                                                    L2Threat(0.5), generator=gen(0))
    assert L2Threat(0.5).check(digits[:2], res.x_adv) is None
    assert res.extras["step_size"] == 0.1 and res.grad_evals == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"step_size": -0.1}, "step_size must be a finite number > 0 or None, got -0.1"),
    ({"step_size": float("inf")}, "step_size must be"),
    ({"random_start": 1}, "random_start must be True or False, got 1"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowPGDIn(**kwargs)


def test_incompatible_threats_and_defenses(flow):
    from tests.toys import Linear

    assert "unrestricted" in (FlowPGDIn().incompatibility(flow, UnrestrictedThreat()) or "")
    msg = FlowPGDOOD().incompatibility(Linear(torch.zeros(10, 256)), LinfThreat(0.02))
    assert msg == "flow-pgd-ood requires kind:density, which the defense does not declare"
    with pytest.raises(ValueError, match="threat eps=2.0"):
        FlowPGDIn(steps=1).run(flow, torch.zeros(1, 1, 16, 16), torch.zeros(1), LinfThreat(2.0))
    assert issubclass(FlowPGDIn, FlowPGD)


def test_likelihood_attacks_run_on_a_flow(flow, digits):
    """Seed 000's near-sample attack on a flow: it raises log p of test digits within l-inf
    0.03 (smoothing them); the unrestricted attack raises log p of its gray start."""
    from attacks.likelihood import NearSampleAttack, UnrestrictedLikelihoodAttack

    x = digits[:4]
    with single_thread():
        near = NearSampleAttack(steps=30).run(flow, x, torch.zeros(4), LinfThreat(0.03))
        free = UnrestrictedLikelihoodAttack(steps=20).run(
            flow, x, torch.zeros(4), UnrestrictedThreat())
        before = flow.log_prob(x)
        assert bool((flow.log_prob(near.x_adv) > before).all())
        assert LinfThreat(0.03).check(x, near.x_adv) is None
        gray = flow.log_prob(free.extras["x_start"])
        assert bool((flow.log_prob(free.x_adv) > gray).all())
