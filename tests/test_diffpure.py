"""DiffPure: exact checkpointed gradients equal plain autograd; replayed noise; bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.zoo.analytic import GaussianDenoiser
from defenses.diffpure import DiffPure, euler_maruyama_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(checkpoint: bool, t_star: float = 0.01) -> DiffPure:
    d = 16  # 1 x 4 x 4 images
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g) / 4
    den = GaussianDenoiser(torch.zeros(1, 4, 4), a @ a.T + 0.1 * torch.eye(d))
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(d, 3))
    return DiffPure(denoiser=den, classifier=head, t_star=t_star, dt=1e-3, checkpoint=checkpoint)


def test_checkpointed_exact_gradient_equals_plain_autograd():
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (True, False):
        model = _toy(ckpt)
        model.reseed(5)
        xr = x.clone().requires_grad_(True)
        loss = model(xr).logsumexp(1).sum()
        (grad,) = torch.autograd.grad(loss, xr)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_noise_is_replayed_from_the_seed():
    model = _toy(True)
    x = torch.rand(2, 1, 4, 4)
    model.reseed(3)
    a = model.purify(x)
    model.reseed(3)
    b = model.purify(x)
    c = model.purify(x)  # the stream goes on: a different draw
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert model.nfe_per_call == 11


def test_purification_keeps_a_sample_of_the_data_distribution_close():
    """At small t* the chain returns close to its input (the reverse SDE undoes the noise)."""
    model = _toy(False, t_star=0.02)
    model.reseed(0)
    x = torch.full((4, 1, 4, 4), 0.5)
    assert (model.purify(x) - x).abs().mean() < 0.1


@pytest.mark.parametrize(
    ("t_star", "dt", "match"),
    [(0.0, 1e-3, r"t_star must lie in \(0, 1\], got 0.0"),
     (1.5, 1e-3, "got 1.5"),
     (0.1, 0.03, "does not divide"),
     (0.1, -1e-3, r"dt must lie in"),
     ("0.1", 1e-3, "t_star must be a number")],
)
def test_bad_schedule_arguments_name_the_value(t_star, dt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        euler_maruyama_steps(t_star, dt)


def test_published_step_counts():
    assert euler_maruyama_steps(0.1, 1e-3) == 100
    assert euler_maruyama_steps(0.075, 1e-3) == 75
    assert euler_maruyama_steps(0.125, 1e-3) == 125
