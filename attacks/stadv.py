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

from attacks._ascent import (
    KeepBest,
    LossCurve,
    ascend,
    check_positive_int,
    check_real,
    optimizer_update,
)
from attacks.eot import evaluate_draws
from attacks.losses import margin
from attacks.pgd import ForwardHook
from benchmark.api.attack import LOSS_CURVE_BINS, Attack, AttackResult, Budget, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack
from threat_models.stadv import flow_smoothness

#: lambda = SMOOTHNESS_SCALE / bound, i.e. 0.05 at the default bound 0.05 (perceptual-advex).
SMOOTHNESS_SCALE = 0.0025


@register_attack("stadv")
class StAdv(Attack):
    """Adam on the flow field; see the module docstring. ``smoothness=None`` means
    ``0.0025 / threat.eps``; ``eot_draws`` averages the loss over draws of a stochastic
    defense (one batched forward per step)."""

    name: ClassVar[str] = "stadv"
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"stadv"})

    def __init__(self, *, steps: int = 100, lr: float = 0.01, smoothness: float | None = None,
                 eot_draws: int = 1, forward: ForwardHook | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.lr = check_real(lr, "lr", low=0.0, low_open=True)
        self.smoothness = check_real(smoothness, "smoothness", low=0.0, none_ok=True)
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
        # recoloradv's keep_best, as PGD ranks: success first, then the score; +-inf ranked
        # like numbers and scores compared in the default dtype, as this attack always has
        best = KeepBest(flow, track_success=True, finite=False, dtype=torch.get_default_dtype())
        opt = torch.optim.Adam([flow], lr=self.lr)
        # Adam minimizes CW + lam L_flow: the gradient of -score (w.r.t. the flow only; never
        # accumulated into the defense's parameters), then a projection onto the bound
        curve = LossCurve(LOSS_CURVE_BINS)
        ascend(objective, flow, optimizer_update(opt, flow, lambda f: threat.project(x, f)),
               steps=self.steps, best=best, descent=True, observe=curve)

        with torch.no_grad():
            x_adv = threat.apply(x, best.params)
        extras: dict[str, Any] = {"success": best.success.tolist(), "smoothness": lam}
        return AttackResult(x_adv.detach(), params=best.params,
                            grad_evals=self.steps * self.eot_draws, extras=extras,
                            evidence={"any_adversarial": best.success.clone(),
                                      "first_adversarial": best.first.clone(),
                                      "loss_curve": curve.binned()})
