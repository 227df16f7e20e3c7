"""StAdv (Xiao et al. 2018): a spatial flow field applied with ``grid_sample``.

The parameter is the flow ``f`` of shape (B, H, W, 2), in the *normalized* coordinates of
``grid_sample`` ([-1, 1] spans the image), so that the sampling grid is ``identity + f``. The
budget is an l-inf bound on each flow component (0.05 by default, as in perceptual-advex /
DiffPure / RDC: 0.05 * W / 2 pixels, i.e. 0.4 px at 16x16, 0.8 px at 32x32). Sampling is bilinear
with zero padding and ``align_corners=False``, passed explicitly.

Because an image alone does not determine its flow, StAdv results carry the flow as their
parameter and ``check`` verifies both the bound and that ``apply(x, flow)`` reproduces x_adv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.api.threat import CHECK_ATOL, ThreatModel, Violation
from benchmark.plugins import register_threat_model

ALIGN_CORNERS = False
MODE = "bilinear"
PADDING = "zeros"


def identity_grid(x: Tensor) -> Tensor:
    """The identity sampling grid (B, H, W, 2) for images ``x`` (B, C, H, W)."""
    b = x.shape[0]
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    return F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=ALIGN_CORNERS)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    grid = identity_grid(x) + flow
    return F.grid_sample(x, grid, mode=MODE, padding_mode=PADDING, align_corners=ALIGN_CORNERS)


def flow_smoothness(flow: Tensor) -> Tensor:
    """Xiao et al.'s L_flow per sample: sum over pixels and their 4 neighbours (edges
    replicated) of sqrt(du^2 + dv^2 + 1e-10)."""
    f = flow.permute(0, 3, 1, 2)  # (B, 2, H, W)
    padded = F.pad(f, (1, 1, 1, 1), mode="replicate")
    h, w = f.shape[-2:]
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # up, down, left, right
        nb = padded[:, :, dy:dy + h, dx:dx + w]
        total = total + torch.sqrt(((f - nb) ** 2).sum(dim=1) + 1e-10).sum(dim=(1, 2))
    return total


@register_threat_model("stadv")
class StAdvThreat(ThreatModel):
    name = "stadv"
    needs_params = True

    def __init__(self, eps: float = 0.05) -> None:
        super().__init__(eps)

    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor:
        b, _, h, w = x.shape
        if not random:
            return torch.zeros(b, h, w, 2, dtype=x.dtype, device=x.device)
        u = torch.rand((b, h, w, 2), generator=generator, dtype=x.dtype, device=x.device)
        return self.project(x, (2 * u - 1) * self.eps)

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        if p.shape != (x.shape[0], x.shape[2], x.shape[3], 2):
            raise ValueError(
                f"StAdv flow must have shape (B, H, W, 2) = "
                f"{(x.shape[0], x.shape[2], x.shape[3], 2)}, got {tuple(p.shape)}"
            )
        return warp(x, p)

    def project(self, x: Tensor, p: Tensor) -> Tensor:
        p = p.clamp(-self.eps, self.eps)
        ident = identity_grid(x)
        return (ident + p).clamp(-1.0, 1.0) - ident

    def ascent(self, g: Tensor) -> Tensor:
        return g.sign()

    def distance(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Tensor:
        if params is None:
            return torch.full((x.shape[0],), float("nan"), device=x.device)
        return params.reshape(params.shape[0], -1).abs().amax(dim=1)

    def violations(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Violation:
        reasons = self._base_violations(x, x_adv)
        expected = (x.shape[0], x.shape[2], x.shape[3], 2)
        if params is None or tuple(params.shape) != expected:
            why = ("StAdv result carries no flow field to verify" if params is None else
                   f"flow has shape {tuple(params.shape)}, expected {expected}")
            return Violation.from_reasons(dict.fromkeys(range(len(x)), why), len(x), x.device)
        dist = self.distance(x, x_adv, params)
        over = ~(dist <= self.eps + CHECK_ATOL)
        for i in over.nonzero().flatten().tolist():
            reasons.setdefault(i, f"flow component {dist[i]:.6g} > bound {self.eps:.6g}")
        with torch.no_grad():
            err = (self.apply(x, params.to(x.dtype)) - x_adv).reshape(len(x), -1).abs().amax(1)
        for i in (~(err <= 1e-4)).nonzero().flatten().tolist():
            reasons.setdefault(i, f"x_adv is not the warp of x by its flow (max error "
                                  f"{err[i]:.3g})")
        return Violation.from_reasons(reasons, len(x), x.device)
