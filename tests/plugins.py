"""Toy defenses used by the harness tests, named in suites as ``tests.plugins:Class``."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmark.api.attack import Attack, AttackResult
from benchmark.api.defense import Defense
from benchmark.zoo import load_model


class _Wrapped(Defense):
    def __init__(self, model: str = "digits-cnn") -> None:
        super().__init__()
        self.net = load_model(model)
        self.num_classes = 10

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SlowDefense(_Wrapped):
    """The shipped CNN, slowed down so that a run can be killed in the middle."""

    def __init__(self, model: str = "digits-cnn", delay: float = 0.02) -> None:
        super().__init__(model)
        self.delay = delay

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.delay)
        return self.net(x)


class WrongShapeDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, :3]


class NaNDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("nan"))


class RaisingDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this plug-in always fails")


class NoisyDefense(_Wrapped):
    """A stochastic defense: Gaussian input noise from the seeded generator."""

    stochastic = True

    def __init__(self, model: str = "digits-cnn", sigma: float = 0.3) -> None:
        super().__init__(model)
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator_for(x), device=x.device)
        return self.net((x + self.sigma * noise).clamp(0, 1))


class OverBudget(Attack):
    """A cheating attack: perturbs by twice the budget (the harness must refuse it)."""

    name = "over-budget"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        return AttackResult(x_adv=(x + self.factor * threat.eps).clamp(0, 1))
