"""l2 ball of radius eps around the input, intersected with the pixel box."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.api.threat import AdditiveThreatModel, bcast
from benchmark.plugins import register_threat_model

_TINY = 1e-12


@register_threat_model("l2")
class L2Threat(AdditiveThreatModel):
    name = "l2"

    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor:
        if not random:
            return torch.zeros_like(x)
        # Uniform in the ball: Gaussian direction, radius eps * U^(1/d).
        d = x[0].numel()
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        radius = self.eps * r.pow(1.0 / d)
        direction = g / bcast(self._norm(g.reshape(len(g), -1)).clamp_min(_TINY), g)
        return self.project(x, direction * bcast(radius, g))

    def _norm(self, flat: Tensor) -> Tensor:
        return flat.norm(p=2, dim=1)

    def _project_ball(self, p: Tensor) -> Tensor:
        n = self._norm(p.reshape(len(p), -1))
        scale = (self.eps / n.clamp_min(_TINY)).clamp(max=1.0)
        return p * bcast(scale, p)

    def ascent(self, g: Tensor) -> Tensor:
        n = self._norm(g.reshape(len(g), -1)).clamp_min(_TINY)
        return g / bcast(n, g)
