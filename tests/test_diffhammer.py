"""DiffHammer (Wang et al. 2024): the E/M selection and weights against a hand computation,
per-image draw replay in DiffPure, and the attack end to end on a stochastic purifier."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.diffhammer import DiffHammer, em_weights
from tests.test_registered_plugins import NoisyPurifier
from threat_models import L2Threat, LinfThreat


def test_em_selection_and_weights_by_hand():
    grads = torch.tensor([[[1.0, 0.0]], [[1.0, 0.1]], [[-1.0, 0.0]]])  # (N=3, B=1, D=2)
    losses = torch.ones(3, 1)
    chosen, w = em_weights(losses, grads, torch.sign, eps=0.1, lam=5.0)
    # sum_j elu(1 + 0.1 <sign(g_i), g_j>): 3.1, 3.11, 2.9 -> the second draw
    assert chosen.tolist() == [1]
    want = [1 / (1 + math.exp(-5 * 2.0)), 1 / (1 + math.exp(-5 * 2.1)), 0.5]
    assert w[:, 0].tolist() == pytest.approx(want)


def test_diffpure_replays_each_images_draw_in_any_batch():
    from defenses.diffpure import DiffPure

    d = DiffPure(t_star=0.01, dt=0.005)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    both = d.purify(x, seed=[11, 22, 33])
    for i, s in enumerate([11, 22, 33]):  # the same noise (the batch changes float round-off)
        torch.testing.assert_close(both[i:i + 1], d.purify(x[i:i + 1], seed=s), atol=1e-5,
                                   rtol=0)
    assert torch.equal(d.purify(x, seed=5), d.purify(x, seed=5))  # an int: the batch's draw
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        d.purify(x, seed=[1, 2])


@pytest.mark.parametrize("threat", [LinfThreat(0.3), L2Threat(3.0)], ids=["linf", "l2"])
def test_diffhammer_breaks_a_noisy_purifier_within_the_threat(threat):
    torch.manual_seed(0)
    defense = NoisyPurifier(sigma=0.05).eval().requires_grad_(False)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = defense.head(x).argmax(1)
    attack = DiffHammer(steps=8, n_eval=4, step_ratio=0.25)
    res = attack.run(defense, x, y, threat, generator=torch.Generator().manual_seed(2))
    assert threat.check(x, res.x_adv, res.params) is None
    assert res.grad_evals == 8 and res.extras["eval_forwards"] == 8 * 5
    fooled = torch.stack([defense(res.x_adv).argmax(1) != y for _ in range(9)]).float().mean(0)
    assert (fooled > 0.5).float().mean() >= 0.5, fooled
    assert res.evidence["loss_curve"].shape == (6, 8)
    # evidence indices count the (unevaluated) start as evaluation 0: S steps, S + 1 iterates
    first = res.evidence["first_adversarial"]
    assert bool(((first == -1) | ((first >= 1) & (first <= 8))).all())
    assert bool((first[res.evidence["any_adversarial"]] >= 1).all())
    assert bool(res.evidence["any_adversarial"].any())
    again = attack.run(defense, x, y, threat, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.x_adv, res.x_adv)  # the generator decides every draw


def test_diffhammer_refuses_defenses_it_cannot_replay():
    from tests.plugins import NoisyDefense

    reason = DiffHammer().incompatibility(NoisyDefense(), LinfThreat(0.1))
    assert reason is not None and ("purify" in reason)
    with pytest.raises(ValueError, match="n_eval"):
        DiffHammer(n_eval=0)
