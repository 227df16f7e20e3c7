"""Unrestricted: the parameter is the image itself, constrained only to the pixel box.

``eps`` bounds nothing here; it is kept for a uniform interface and used as the PGD step scale.
The distance reported is the l2 distance to the original image (for semantic-distance columns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.api.threat import ThreatModel, Violation
from benchmark.plugins import register_threat_model


@register_threat_model("unrestricted")
class UnrestrictedThreat(ThreatModel):
    name = "unrestricted"

    def __init__(self, eps: float = 1.0) -> None:
        super().__init__(eps)

    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor:
        if random:
            return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x.clone()

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        return p.clamp(0.0, 1.0)

    def project(self, x: Tensor, p: Tensor) -> Tensor:
        return p.clamp(0.0, 1.0)

    def ascent(self, g: Tensor) -> Tensor:
        return g.sign()

    def distance(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Tensor:
        return (x_adv - x).reshape(len(x), -1).norm(dim=1)

    def default_step(self, steps: int) -> float:
        return 2.5 / max(int(steps), 1)

    def violations(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Violation:
        return Violation.from_reasons(self._base_violations(x, x_adv), len(x), x.device)
