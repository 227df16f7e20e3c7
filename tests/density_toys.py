"""Exact density defenses for the likelihood-attack tests, and a box-constrained QP oracle."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmark.api.density import DensityDefense, check_images
from benchmark.zoo.analytic import LinearGaussianFlow

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianDensity(DensityDefense):
    """x ~ N(b, A A^T) on images of shape ``event_shape``: the linear flow x = A x1 + b of Pope
    et al. as a density defense, with the PF-ODE-style split of log p into the prior term
    log N(x1; 0, I) and the "integral" term -log|det A| (exact for a linear flow), and
    ``sample_from_latent(x1) = (A x1 + b, log p)`` and its inverse ``encode``. Computes in
    float64; returns x's dtype."""

    stochastic = False

    def __init__(self, A: Tensor, b: Tensor, *, check_box: bool = True) -> None:  # noqa: N803
        super().__init__()
        self.flow = LinearGaussianFlow(A.double(), b.double())
        self.event_shape = tuple(b.shape)
        self.dim = b.numel()
        self.check_box = check_box
        self.calls = 0

    @property
    def mean(self) -> Tensor:
        return self.flow.b

    @property
    def precision(self) -> Tensor:
        return torch.linalg.inv(self.flow.covariance)

    def log_prob(self, x: Tensor) -> Tensor:
        if self.check_box:
            check_images(x)
        self.calls += 1
        return self.flow.log_prob(x.double()).to(x.dtype)

    def log_prob_terms(self, x: Tensor, *, solver: str | None = None) -> dict[str, Tensor]:
        z = self.flow.inverse(x.double())
        prior = -0.5 * (self.dim * _LOG_2PI + (z * z).sum(1))
        integral = (-self.flow.log_abs_det).expand_as(prior)
        return {"logp": (prior + integral).to(x.dtype), "prior": prior.to(x.dtype),
                "integral": integral.to(x.dtype)}

    def sample_from_latent(self, x1: Tensor, *, solver: str | None = None
                           ) -> tuple[Tensor, Tensor]:
        z = x1.double().reshape(x1.shape[0], -1)
        x = self.flow(z).reshape(x1.shape)
        logp = -0.5 * (self.dim * _LOG_2PI + (z * z).sum(1)) - self.flow.log_abs_det
        return x.to(x1.dtype), logp.to(x1.dtype)


    def encode(self, x: Tensor, *, solver: str | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
        return (self.flow.inverse(x.double()).reshape(x.shape).to(x.dtype),
                self.log_prob_terms(x, solver=solver))


def box_qp_max_logp(defense: GaussianDensity, lo: Tensor, hi: Tensor, *,
                    iters: int = 20000) -> Tensor:
    """argmax of log N(x; b, K) over the box [lo, hi] (per sample), in float64.

    Equivalent to min_x (x - b)^T P (x - b) / 2 over the box, P = K^{-1}: accelerated projected
    gradient (FISTA) with step 1 / lambda_max(P), run to convergence. Returns (B, D)."""
    p = defense.precision.double()
    mu = defense.mean.double()
    lo = lo.double().reshape(lo.shape[0], -1)
    hi = hi.double().reshape(hi.shape[0], -1)
    step = 1.0 / float(torch.linalg.eigvalsh(p).max())
    x = torch.minimum(torch.maximum(mu.expand_as(lo), lo), hi)
    y, t = x.clone(), 1.0
    for _ in range(iters):
        x_new = torch.minimum(torch.maximum(y - step * (y - mu) @ p, lo), hi)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        y = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return x
