"""Lagrange attack on RDC (seed 002, eq. 10): maximize the classification loss while keeping
the unconditional diffusion loss low, so that likelihood maximization leaves the adversarial
example where it is:

    maximize  CE(f(x), y) - l * L_uncond(x),   l in {0, 1, 10},

one PGD run per weight; a sample falls if any weight succeeds (paper: 77.54% on CIFAR-10,
no stronger than BPDA's 73.24%). The gradient of the classifier term is exact (through
``purify``); ``L_uncond`` is the defense's ``likelihood_objective``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.pgd import PGD
from benchmark.attack import Attack, AttackResult, Budget
from benchmark.threat import ThreatModel


class _Penalized(PGD):
    def __init__(self, weight: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.weight = weight

    def objective(self, defense: nn.Module, forward: Any, x_adv: Tensor, y: Tensor,
                  loss_fn: Any, draws: int) -> tuple[Tensor, Tensor]:
        losses, success = super().objective(defense, forward, x_adv, y, loss_fn, draws)
        if self.weight:
            objective: Any = defense.likelihood_objective  # guaranteed by `requires`
            losses = losses - self.weight * objective(x_adv)
        return losses, success


class Lagrange(Attack):
    name: ClassVar[str] = "lagrange"
    requires = frozenset({"kind:classifier", "likelihood_objective"})

    def __init__(self, *, weights: Sequence[float] = (0.0, 1.0, 10.0), **pgd: Any) -> None:
        ws = [float(w) for w in weights]
        if not ws or any(w < 0 for w in ws):
            raise ValueError(f"weights must be a non-empty list of numbers >= 0, got {weights!r}")
        self.weights = ws
        self.pgd = dict(pgd)
        self._runs = [_Penalized(w, **self.pgd) for w in ws]  # validates the PGD options

    @property
    def budget(self) -> Budget:
        b = self._runs[0].budget
        return Budget(steps=b.steps, restarts=b.restarts * len(self._runs),
                      eot_draws=b.eot_draws)

    def config(self) -> dict[str, Any]:
        return {"weights": self.weights, **self.pgd}

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        x_adv, params, fell = None, None, torch.zeros(len(x), dtype=torch.bool, device=x.device)
        evals = 0
        for run in self._runs:
            res = run.run(defense, x, y, threat, generator=generator)
            evals += res.grad_evals
            ok = torch.tensor(res.extras["success"], dtype=torch.bool, device=x.device)
            take = ok & ~fell if x_adv is not None else torch.ones_like(ok)
            if x_adv is None:
                x_adv = res.x_adv.clone()
                params = None if res.params is None else res.params.clone()
            else:
                assert params is not None and res.params is not None
                x_adv[take] = res.x_adv[take]
                params[take] = res.params[take]
            fell |= ok
        assert x_adv is not None
        return AttackResult(x_adv, params=params, grad_evals=evals,
                            extras={"success": fell.tolist(), "weights": self.weights})
