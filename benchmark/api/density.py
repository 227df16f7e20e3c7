"""The density-defense contract.

A ``kind = "density"`` defense scores images in [0, 1] (NCHW, float32) with a per-sample
log-likelihood: ``forward(x) == log_prob(x)`` (nats, shape (B,)), the number every reported
metric uses. On top of the :class:`benchmark.api.defense.Defense` contract it provides:

* ``dim``: D, the number of dimensions of one image;
* ``bpd_offset``: the constant of the bits-per-dimension convention,
  ``bpd = -log p / (D ln 2) + bpd_offset`` (8 for data on [0, 1]: the 8-bit NLL convention
  of uniformly dequantized images; 7 for data on [-1, 1]). The harness scores images as
  given, not dequantized (the digits are not 8-bit data), so the bits/dim it reports are
  those of the *continuous* density at the pixel values, not an 8-bit NLL;
* ``attack_log_prob(x)``: the differentiable log-likelihood attacks optimize. For exact-density
  models (flows) this is ``log_prob``; for the PF-ODE detector it is the cheap ``fast`` solver,
  while ``log_prob`` (what is reported) uses the ``accurate`` one;
* ``bits_per_dim(x)``;
* optionally ``log_prob_terms(x, solver=...)`` -> ``{"logp", "integral", "prior"}`` (capability
  ``log_prob_terms``; the prior-only attack needs it) and ``sample_from_latent(x1, solver=...)``
  -> ``(x, logp)``, the image reached by integrating a latent backwards and its log-likelihood
  (capability ``sample_from_latent``; the reverse-integration attack needs it), and
  ``encode(x, solver=...)`` -> ``(x1, terms)``, the latent an image integrates to (capability
  ``encode``; the reverse-integration attack starts there, as published).

Log-likelihoods are densities of ``x`` in [0, 1]^D coordinates whatever space the model works
in (a model on [-1, 1] adds D ln 2), so bits/dim read the same for every density defense.

Detection (docs/design.md section 4.6, after Arvinte et al. 2023 and Pope, Balaji & Feizi
2020): an image is *accepted* when its log p is at least the threshold that accepts 95% of the
clean test images.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from benchmark.api.defense import Defense

__all__ = ["DensityDefense", "check_images"]

_LN2 = math.log(2.0)


def check_images(x: Tensor, *, low: float = 0.0, high: float = 1.0, what: str = "x") -> None:
    """Raise a ValueError naming the offending range if ``x`` is not NCHW within [low, high]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be a batch of images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} has non-finite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < low - 1e-6 or hi > high + 1e-6:
        raise ValueError(f"{what} must lie in the model's range [{low}, {high}], "
                         f"got values in [{lo:.4g}, {hi:.4g}]")


class DensityDefense(Defense):
    """Base class of density defenses (see the module docstring for the contract)."""

    kind = "density"
    differentiable = True
    #: bits/dim = -log p / (D ln 2) + bpd_offset
    bpd_offset: ClassVar[float] = 8.0
    dim: int = 0

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def attack_log_prob(self, x: Tensor) -> Tensor:
        """The differentiable objective attacks use (``log_prob`` unless overridden)."""
        return self.log_prob(x)

    def log_prob_terms(self, x: Tensor, *, solver: str | None = None) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not split log p into terms")

    def sample_from_latent(self, x1: Tensor, *, solver: str | None = None
                           ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} cannot integrate a latent backwards")

    def encode(self, x: Tensor, *, solver: str | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} cannot integrate an image forwards "
                                  "to its latent")

    def capabilities(self) -> frozenset[str]:
        caps = set(super().capabilities())
        for part in ("log_prob_terms", "sample_from_latent", "encode"):
            if getattr(type(self), part) is not getattr(DensityDefense, part):
                caps.add(part)
        return frozenset(caps)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        return self.logp_to_bpd(self.log_prob(x))

    def logp_to_bpd(self, logp: Tensor) -> Tensor:
        return -logp / (self.dim * _LN2) + self.bpd_offset
