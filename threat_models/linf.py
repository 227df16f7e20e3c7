"""l-inf ball of radius eps around the input, intersected with the pixel box."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.api.threat import AdditiveThreatModel
from benchmark.plugins import register_threat_model


@register_threat_model("linf")
class LinfThreat(AdditiveThreatModel):
    name = "linf"

    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor:
        if not random:
            return torch.zeros_like(x)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x, (2 * u - 1) * self.eps)

    def _norm(self, flat: Tensor) -> Tensor:
        return flat.abs().amax(dim=1)

    def _project_ball(self, p: Tensor) -> Tensor:
        return p.clamp(-self.eps, self.eps)

    def ascent(self, g: Tensor) -> Tensor:
        return g.sign()
