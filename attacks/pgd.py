"""Projected gradient ascent (Madry et al. 2018), generic over the threat model's parameter space.

Each step maps the parameter to an image, takes the gradient of the per-sample loss with
respect to the *parameter* and moves along the threat model's steepest-ascent direction:

    x_adv = threat.apply(x, p)
    p     = threat.project(x, p + step_size * threat.ascent(grad_p loss))

so the same loop is l-inf PGD (sign steps), l2 PGD (normalized steps), a StAdv flow attack or
an unrestricted pixel attack. Every evaluated iterate competes for the returned one, per sample
and across restarts: a misclassified iterate beats any correctly classified one, and ties are
broken by the higher loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.eot import check_positive_int, evaluate_draws
from attacks.losses import get_loss
from benchmark.api.attack import Attack, AttackResult, Budget, Forward
from benchmark.api.threat import ThreatModel

#: Builds the differentiable view of a defense that an attack differentiates (BPDA uses it).
ForwardHook = Callable[[nn.Module], Forward]


class KeepBest:
    """The best parameter seen so far, per sample.

    Ranking: a success beats a failure; between equals, the higher ``score`` wins (PGD: the
    loss; StAdv: minus its regularized loss). Non-finite scores never win.
    """

    def __init__(self, p0: Tensor) -> None:
        b = p0.shape[0]
        self.params = p0.detach().clone()
        self.score = torch.full((b,), float("-inf"), device=p0.device)
        self.success = torch.zeros(b, dtype=torch.bool, device=p0.device)

    def update(self, p: Tensor, score: Tensor, success: Tensor) -> None:
        score = score.detach().to(self.score.dtype)
        better = (success & ~self.success) | ((success == self.success) & (score > self.score))
        self.params = torch.where(better.view(-1, *[1] * (p.dim() - 1)), p.detach(), self.params)
        self.score = torch.where(better, score, self.score)
        self.success = self.success | success


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
    """

    name: ClassVar[str] = "pgd"

    def __init__(self, *, steps: int = 100, step_size: float | None = None, restarts: int = 1,
                 loss: str = "ce", random_start: bool = True, eot_draws: int = 1,
                 forward: ForwardHook | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        if step_size is not None and (
                isinstance(step_size, bool) or not isinstance(step_size, int | float)
                or not step_size > 0 or step_size == float("inf")):
            raise ValueError(f"step_size must be a finite number > 0 or None, got {step_size!r}")
        self.step_size = None if step_size is None else float(step_size)
        self.restarts = check_positive_int(restarts, "restarts")
        get_loss(loss)
        self.loss = loss
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start
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

        best: KeepBest | None = None
        grads = zero_grads = 0
        for restart in range(self.restarts):
            p = threat.init(x, generator, random=self.random_start or restart > 0)
            if best is None:
                best = KeepBest(p)
            for _ in range(self.steps):
                p = p.detach().requires_grad_(True)
                with torch.enable_grad():
                    losses, success = self.objective(defense, forward, threat.apply(x, p), y,
                                                     loss_fn, draws)
                    (grad,) = torch.autograd.grad(losses.sum(), p)
                best.update(p, losses, success)
                flat = grad.reshape(len(grad), -1)
                dead = ~torch.isfinite(flat).all(dim=1) | (flat == 0).all(dim=1)
                grads += len(dead)
                zero_grads += int(dead.sum())
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                with torch.no_grad():
                    p = threat.project(x, p.detach() + step * threat.ascent(grad))
            with torch.no_grad():
                losses, success = self.objective(defense, forward, threat.apply(x, p), y,
                                                 loss_fn, draws)
            best.update(p, losses, success)

        assert best is not None
        with torch.no_grad():
            x_adv = threat.apply(x, best.params)
        extras: dict[str, Any] = {
            "success": best.success.tolist(),
            "zero_grad_frac": zero_grads / max(grads, 1),
        }
        return AttackResult(x_adv.detach(), params=best.params,
                            grad_evals=self.steps * self.restarts * draws, extras=extras)
