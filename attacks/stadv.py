"""StAdv (Xiao et al. 2018) as evaluated by perceptual-advex, DiffPure and RDC.

The parameter is the flow field of :mod:`threat_models.stadv` (normalized ``grid_sample``
coordinates, l-inf bound ``threat.eps`` on each component, 0.05 by default). From a zero flow,
unsigned Adam steps (lr 0.01, 100 iterations) minimize

    CW(x_adv) + (0.0025 / bound) * L_flow(flow),    CW = z_y - max_{j != y} z_j  (kappa = inf)

projecting the flow onto the bound after every step. The returned flow is the best iterate per
sample: a misclassified iterate beats a correctly classified one, and between equals the lower
regularized loss wins (recoloradv's ``keep_best``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.eot import check_positive_int, evaluate_draws
from attacks.losses import margin
from attacks.pgd import ForwardHook, KeepBest
from benchmark.api.attack import Attack, AttackResult, Budget, Forward
from benchmark.api.threat import ThreatModel
from threat_models.stadv import flow_smoothness

#: lambda = SMOOTHNESS_SCALE / bound, i.e. 0.05 at the default bound 0.05 (perceptual-advex).
SMOOTHNESS_SCALE = 0.0025


class StAdv(Attack):
    """Adam on the flow field; see the module docstring. ``smoothness=None`` means
    ``0.0025 / threat.eps``; ``eot_draws`` averages the loss over draws of a stochastic
    defense (one batched forward per step)."""

    name: ClassVar[str] = "stadv"
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"stadv"})

    def __init__(self, *, steps: int = 100, lr: float = 0.01, smoothness: float | None = None,
                 eot_draws: int = 1, forward: ForwardHook | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        if smoothness is not None and (
                isinstance(smoothness, bool) or not isinstance(smoothness, int | float)
                or not 0 <= smoothness < float("inf")):
            raise ValueError(f"smoothness must be a finite number >= 0 or None, got {smoothness!r}")
        self.smoothness = None if smoothness is None else float(smoothness)
        self.eot_draws = check_positive_int(eot_draws, "eot_draws")
        self._forward = forward

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps, restarts=1, eot_draws=self.eot_draws)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        if threat.name != "stadv":
            raise ValueError(f"StAdv optimizes a flow field; threat model must be 'stadv', "
                             f"got {threat.name!r}")
        forward: Forward = self._forward(defense) if self._forward is not None else defense
        lam = self.smoothness if self.smoothness is not None else SMOOTHNESS_SCALE / threat.eps
        x, y = x.detach(), y.detach()

        def objective(flow: Tensor) -> tuple[Tensor, Tensor]:
            # evaluate_draws maximizes its loss: the margin is -CW, so this is -(CW + lam L_flow).
            adv_margin, success = evaluate_draws(forward, threat.apply(x, flow), y, margin,
                                                 self.eot_draws)
            return adv_margin - lam * flow_smoothness(flow), success

        flow = threat.init(x, generator, random=False).requires_grad_(True)
        best = KeepBest(flow)
        opt = torch.optim.Adam([flow], lr=self.lr)
        for _ in range(self.steps):
            with torch.enable_grad():
                score, success = objective(flow)
                # Gradient w.r.t. the flow only: never accumulate into the defense's parameters.
                (grad,) = torch.autograd.grad(-score.sum(), flow)
            best.update(flow, score, success)
            flow.grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            with torch.no_grad():
                flow.copy_(threat.project(x, flow))
        with torch.no_grad():
            score, success = objective(flow)
        best.update(flow, score, success)

        with torch.no_grad():
            x_adv = threat.apply(x, best.params)
        extras: dict[str, Any] = {"success": best.success.tolist(), "smoothness": lam}
        return AttackResult(x_adv.detach(), params=best.params,
                            grad_evals=self.steps * self.eot_draws, extras=extras)
