"""An example genbench defense distributed as its own package (see ``pyproject.toml``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from benchmark.api.defense import Defense
from benchmark.zoo import load_model

__all__ = ["Blurred"]


class Blurred(Defense):
    """A zoo classifier behind a ``size`` x ``size`` box blur: deterministic, differentiable,
    one network evaluation per call."""

    kind = "classifier"
    stochastic = False
    differentiable = True
    nfe_per_call = 1

    def __init__(self, *, model: str = "digits-cnn", size: int = 3) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be an odd number >= 1, got {size}")
        self.size = size
        self.net = load_model(model)
        self.num_classes = 10

    def forward(self, x: Tensor) -> Tensor:
        blurred = F.avg_pool2d(x, self.size, stride=1, padding=self.size // 2,
                               count_include_pad=False)
        return self.net(blurred)
