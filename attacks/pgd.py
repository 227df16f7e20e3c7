"""Projected gradient ascent (Madry et al. 2018), generic over the threat model's parameter space.

Each step maps the parameter to an image, takes the gradient of the per-sample loss with
respect to the *parameter* and moves along the threat model's steepest-ascent direction:

    x_adv = threat.apply(x, p)
    p     = threat.project(x, p + step_size * threat.ascent(grad_p loss))

so the same loop is l-inf PGD (sign steps), l2 PGD (normalized steps), a StAdv flow attack or
an unrestricted pixel attack. Every evaluated iterate competes for the returned one, per sample
and across restarts: a misclassified iterate beats any correctly classified one, and ties are
broken by the higher loss. The loop and the best-iterate tracking are
:func:`attacks._ascent.ascend` and :class:`attacks._ascent.KeepBest`, shared with flow PGD,
StAdv and the likelihood attacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import (
    KeepBest,
    LossCurve,
    ascend,
    check_bool,
    check_positive_int,
    check_real,
    threat_update,
)
from attacks.eot import evaluate_draws
from attacks.losses import get_loss
from benchmark.api.attack import LOSS_CURVE_BINS, Attack, AttackResult, Budget, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack

#: Builds the differentiable view of a defense that an attack differentiates (BPDA uses it).
ForwardHook = Callable[[nn.Module], Forward]


@register_attack("pgd")
class PGD(Attack):
    """PGD with restarts, a choice of loss, EOT and a forward hook.

    ``step_size`` is absolute (in the threat model's parameter units); ``None`` uses
    ``threat.default_step(steps)`` (2.5 * eps / steps). ``random_start=False`` starts the first
    restart at the zero parameter; later restarts are always random. ``eot_draws > 1`` averages
    the loss over that many draws of a stochastic defense, stacked in one batched forward.
    ``forward`` maps the defense to the function to differentiate (default: the defense).

    ``result.params`` is the parameter that produced ``result.x_adv``; ``grad_evals`` counts
    batched forward+backward passes times draws (``steps * restarts * eot_draws``), and
    ``extras["zero_grad_frac"]`` the fraction of per-sample gradients that were exactly zero
    or non-finite (a gradient-masking symptom; non-finite gradients are replaced by zero).
    ``evidence`` holds, per sample, whether any evaluated iterate was adversarial and the loss
    curve over every restart (:data:`benchmark.api.attack.EVIDENCE_KEYS`).
    """

    name: ClassVar[str] = "pgd"

    def __init__(self, *, steps: int = 100, step_size: float | None = None, restarts: int = 1,
                 loss: str = "ce", random_start: bool = True, eot_draws: int = 1,
                 forward: ForwardHook | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.step_size = check_real(step_size, "step_size", low=0.0, low_open=True,
                                    none_ok=True)
        self.restarts = check_positive_int(restarts, "restarts")
        get_loss(loss)
        self.loss = loss
        self.random_start = check_bool(random_start, "random_start")
        self.eot_draws = check_positive_int(eot_draws, "eot_draws")
        self._forward = forward

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps, restarts=self.restarts, eot_draws=self.eot_draws)

    def objective(self, defense: nn.Module, forward: Forward, x_adv: Tensor, y: Tensor,
                  loss_fn: Any, draws: int) -> tuple[Tensor, Tensor]:
        """Per-sample loss to maximize and success flags (subclasses add terms, e.g. the
        Lagrange attack's likelihood penalty)."""
        return evaluate_draws(forward, x_adv, y, loss_fn, draws)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        forward: Forward = self._forward(defense) if self._forward is not None else defense
        loss_fn = get_loss(self.loss)
        step = self.step_size if self.step_size is not None else threat.default_step(self.steps)
        x, y = x.detach(), y.detach()
        draws = self.eot_draws

        def objective(p: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.objective(defense, forward, threat.apply(x, p), y, loss_fn, draws)

        grads = zero_grads = 0
        curve = LossCurve(LOSS_CURVE_BINS)

        def count_dead(step: int, value: Tensor, grad: Tensor | None) -> None:
            nonlocal grads, zero_grads
            curve(step, value)
            if grad is None:
                return
            flat = grad.reshape(len(grad), -1)
            dead = ~torch.isfinite(flat).all(dim=1) | (flat == 0).all(dim=1)
            grads += len(dead)
            zero_grads += int(dead.sum())

        update = threat_update(threat, x, step)
        best: KeepBest | None = None
        for restart in range(self.restarts):
            p = threat.init(x, generator, random=self.random_start or restart > 0)
            if best is None:
                # PGD's ranking since its first version: scores compared in the default dtype,
                # +-inf ranked like numbers (a success always has a finite loss)
                best = KeepBest(p, track_success=True, finite=False,
                                dtype=torch.get_default_dtype())
            ascend(objective, p, update, steps=self.steps, best=best, observe=count_dead)

        assert best is not None
        with torch.no_grad():
            x_adv = threat.apply(x, best.params)
        extras: dict[str, Any] = {
            "success": best.success.tolist(),
            "zero_grad_frac": zero_grads / max(grads, 1),
        }
        return AttackResult(x_adv.detach(), params=best.params,
                            grad_evals=self.steps * self.restarts * draws, extras=extras,
                            evidence={"any_adversarial": best.success.clone(),
                                      "first_adversarial": best.first.clone(),
                                      "loss_curve": curve.binned()})
