"""Low-frequency perturbations: an l-inf ball confined to the lowest spatial frequencies.

DiffBreak (Kassis et al. 2024) finds perturbations confined to low spatial frequencies the
strongest against diffusion purification: the forward diffusion drowns high frequencies in
noise first, and the reverse process restores what the noise left. This threat model makes that
a threat model of its own, under which every parameter-space attack (PGD and what wraps it:
BPDA, exact, EOT, Lagrange, transfer) runs.

The perturbation is a sum of the lowest ``k x k`` two-dimensional cosines per channel (the
DCT-II basis), each of unit amplitude (the constant is 1, so a DC coefficient moves every pixel
by itself)::

    delta(c, i, j) = sum_{u, v < k} p(c, u, v) cos(pi (2i + 1) u / 2H) cos(pi (2j + 1) v / 2W)

with ``k = ceil(H * LOWFREQ_FRACTION)`` (the lowest quarter of the frequencies per axis: 4 x 4
of 16 x 16 digits, 8 x 8 of 32 x 32 CIFAR-10 images), and ``x_adv = clamp(x + delta, 0, 1)``.
The budget is pixel-space: ``max |delta| <= eps`` (so an epsilon means what it means for
``linf``, and ``lowfreq`` at eps is a subset of ``linf`` at eps). The parameter ``p`` (B, C, k, k)
travels with the result; ``check`` verifies the bound and that ``apply(x, p)`` reproduces x_adv,
as for StAdv. Projection rescales ``p`` until ``max |delta| <= eps`` (a feasible retraction
onto the set, not the Euclidean projection, which has no closed form here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmark.api.threat import CHECK_ATOL, ThreatModel, Violation
from benchmark.plugins import register_threat_model

#: the share of the frequencies per axis the perturbation may use (rounded up).
LOWFREQ_FRACTION = 0.25


def cosine_basis(n: int, k: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """(k, n): the ``k`` lowest DCT-II cosines on ``n`` points, of unit amplitude:
    ``B[u, i] = cos(pi (2i + 1) u / 2n)``."""
    i = torch.arange(n, dtype=torch.float64)
    u = torch.arange(k, dtype=torch.float64)
    return torch.cos(math.pi * (2 * i[None] + 1) * u[:, None] / (2 * n)).to(dtype=dtype,
                                                                         device=device)


def lowfreq_size(h: int, w: int) -> tuple[int, int]:
    """The number of cosines per axis for an ``h x w`` image."""
    return (max(1, math.ceil(h * LOWFREQ_FRACTION)), max(1, math.ceil(w * LOWFREQ_FRACTION)))


@register_threat_model("lowfreq")
class LowFreqThreat(ThreatModel):
    name = "lowfreq"
    needs_params = True

    def _shape(self, x: Tensor) -> tuple[int, int, int, int]:
        kh, kw = lowfreq_size(x.shape[2], x.shape[3])
        return (x.shape[0], x.shape[1], kh, kw)

    def delta(self, x: Tensor, p: Tensor) -> Tensor:
        """The pixel-space perturbation of coefficients ``p`` on images shaped like ``x``."""
        if p.dim() != 4 or tuple(p.shape) != self._shape(x):
            raise ValueError(f"lowfreq coefficients must have shape (B, C, kh, kw) = "
                             f"{self._shape(x)}, got {tuple(p.shape)}")
        bh = cosine_basis(x.shape[2], p.shape[2], dtype=p.dtype, device=p.device)
        bw = cosine_basis(x.shape[3], p.shape[3], dtype=p.dtype, device=p.device)
        return torch.einsum("bcuv,ui,vj->bcij", p, bh, bw)

    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor:
        shape = self._shape(x)
        if not random:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        u = torch.rand(shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.project(x, (2 * u - 1) * self.eps)

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        return (x + self.delta(x, p).to(x.dtype)).clamp(0.0, 1.0)

    def project(self, x: Tensor, p: Tensor) -> Tensor:
        peak = self.delta(x, p).flatten(1).abs().amax(dim=1)
        # a hair inside the bound, so that float32 round-off never reads as a violation
        scale = (self.eps * (1 - 1e-6) / peak.clamp(min=1e-30)).clamp(max=1.0)
        return p * scale.view(-1, 1, 1, 1)

    def ascent(self, g: Tensor) -> Tensor:
        return g.sign()

    def distance(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Tensor:
        if params is None or tuple(params.shape) != self._shape(x):
            return torch.full((x.shape[0],), float("nan"), device=x.device)
        return self.delta(x, params.to(x.dtype)).flatten(1).abs().amax(dim=1)

    def violations(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Violation:
        reasons = self._base_violations(x, x_adv)
        expected = self._shape(x)
        if params is None or tuple(params.shape) != expected:
            why = ("lowfreq result carries no coefficients to verify" if params is None else
                   f"coefficients have shape {tuple(params.shape)}, expected {expected}")
            return Violation.from_reasons(dict.fromkeys(range(len(x)), why), len(x), x.device)
        if not torch.isfinite(params).all():
            bad = (~torch.isfinite(params.flatten(1))).any(dim=1)
            for i in bad.nonzero().flatten().tolist():
                reasons.setdefault(i, "non-finite coefficients")
            params = torch.nan_to_num(params, nan=0.0, posinf=0.0, neginf=0.0)
        dist = self.distance(x, x_adv, params)
        over = ~(dist <= self.eps * (1 + 1e-4) + CHECK_ATOL)
        for i in over.nonzero().flatten().tolist():
            reasons.setdefault(i, f"lowfreq peak {dist[i]:.6g} > eps {self.eps:.6g}")
        with torch.no_grad():
            err = (self.apply(x, params.to(x.dtype)) - x_adv).flatten(1).abs().amax(dim=1)
        for i in (~(err <= 1e-4)).nonzero().flatten().tolist():
            reasons.setdefault(i, f"x_adv is not x plus the low-frequency perturbation of its "
                                  f"coefficients (max error {err[i]:.3g})")
        return Violation.from_reasons(reasons, len(x), x.device)
