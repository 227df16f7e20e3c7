"""DiffHammer (Wang et al., NeurIPS 2024, "DiffHammer: Rethinking the Robustness of
Diffusion-Based Adversarial Purification"): selective EOT with gradient grafting.

Averaging the gradients of many purification draws (EOT) mixes draws whose vulnerabilities point
in incompatible directions. DiffHammer instead estimates, by expectation-maximization over
``n_eval`` draws, which draws share a vulnerability, and attacks those. Each iteration:

1. **Evaluate** ``n_eval`` draws of the current example (seeds from the attack's generator):
   for draw j, its loss ``l_j`` and its *classifier-level* gradient ``g_j`` (the gradient of
   the loss with respect to the purified image, cheap: no backward through purification).
2. **E/M step** (their ``seeds_select`` and ``EM``): pick the draw ``i*`` whose direction
   raises the loss of the others most to first order,
   ``i* = argmax_i sum_j elu(l_j + eps <u(g_i), g_j>)`` (``u`` the threat's unit ascent
   direction: sign for l-inf), weigh every draw by its membership of that draw's cluster,
   ``w_j = sigmoid(lam (l_j + <u(g_i*), g_j>))``, and aggregate ``r = sum_j w_j g_j / sum_j w_j``.
3. **Graft**: one backward pass through the purification of draw ``i*`` (its noise replayed,
   per sample: every draw is seeded per image) with ``r`` in place of that draw's own
   classifier gradient: the gradient with respect to the input costs one exact backward however
   many draws were evaluated.
4. **Step**: mix with the previous gradient, ``v g + (1 - v) g_prev`` with
   ``v = (iteration + 1) ** -alpha``, and take the threat model's projected ascent step.

The first iteration has no estimate yet and uses the exact gradient of one fresh draw. Each
sample keeps its best iterate by the number of the ``n_eval`` draws it fooled (then the mean
loss). Defaults are the public code's: ``n_eval = 10``, ``lam = 5``, ``alpha = 0.5``; the
step is Lee & Kim's 0.007 at 8/255 as a fraction of eps (the public code's PGD step).
**Simplification** (named here and in the row): the public code's default update is APGD
cycling the CW, CE and DLR losses over 3 restarts of 50 iterations; this is PGD with one loss
(``loss``, default CE) per run. The EM runs one E/M pass as the public code's does (its loop
over ``em_steps`` does not feed the estimate back).

Requires a purification defense whose ``purify(x, seed=[one seed per image])`` replays draws
(DiffPure, GAP) and a differentiable ``head``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks._ascent import KeepBest, LossCurve, check_positive_int, check_real
from attacks.losses import get_loss
from attacks.pgd_eot import LEE_KIM_STEP_RATIO
from benchmark.api.attack import LOSS_CURVE_BINS, Attack, AttackResult, Budget
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


def em_weights(losses: Tensor, grads: Tensor, unit: Any, eps: float, lam: float
               ) -> tuple[Tensor, Tensor]:
    """DiffHammer's selection and weights for one batch: ``losses`` (N, B) and classifier-level
    ``grads`` (N, B, D) of N draws; ``unit`` maps gradients to unit ascent directions. Returns
    the selected draw per sample (B,) and the weights (N, B)."""
    u = unit(grads)  # (N, B, D)
    delta = torch.einsum("ibd,jbd->ijb", u, grads)  # <u(g_i), g_j>
    expected = F.elu(losses[None] + eps * delta).sum(dim=1)  # (N_i, B)
    chosen = expected.argmax(dim=0)  # (B,)
    r = u[chosen, torch.arange(grads.shape[1], device=grads.device)]  # (B, D)
    weights = torch.sigmoid(lam * (losses + torch.einsum("bd,jbd->jb", r, grads)))
    return chosen, weights


def _replays(defense: nn.Module) -> bool:
    purify = getattr(defense, "purify", None)
    try:
        return purify is not None and "seed" in inspect.signature(purify).parameters
    except (TypeError, ValueError):
        return False


@register_attack("diffhammer")
class DiffHammer(Attack):
    """DiffHammer's selective EOT with gradient grafting; see the module docstring.

    ``grad_evals`` counts the grafted backward passes (one per step); ``extras`` record the
    forward purifications (``eval_forwards``: ``steps * n_eval`` plus the grafted ones) and
    the mean number of the ``n_eval`` draws the returned examples fooled.
    """

    name: ClassVar[str] = "diffhammer"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier", "purify", "head",
                                                    "stochastic"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"linf", "l2"})

    def __init__(self, *, steps: int = 50, n_eval: int = 10, step_ratio: float =
                 LEE_KIM_STEP_RATIO, lam: float = 5.0, alpha: float = 0.5,
                 loss: str = "ce") -> None:
        self.steps = check_positive_int(steps, "steps")
        self.n_eval = check_positive_int(n_eval, "n_eval")
        self.step_ratio = check_real(step_ratio, "step_ratio", low=0.0, low_open=True)
        self.lam = check_real(lam, "lam", low=0.0)
        self.alpha = check_real(alpha, "alpha", low=0.0)
        get_loss(loss)
        self.loss = loss

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps, restarts=1, eot_draws=self.n_eval)

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        own = super().incompatibility(defense, threat)
        if own is None and not _replays(defense):
            return ("diffhammer replays purification draws: it needs purify(x, seed=...), "
                    "which this defense's purify does not take")
        return own

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        parts: Any = defense
        loss_fn = get_loss(self.loss)
        x, y = x.detach(), y.detach()
        b = len(x)
        step = self.step_ratio * threat.eps

        def seeds_for_batch() -> list[int]:  # one seed per sample: draws replay per sample
            where = generator.device if generator is not None else torch.device("cpu")
            return torch.randint(2**62, (b,), generator=generator, device=where).tolist()

        def graft(p: Tensor, draw: list[int], cls_grad: Tensor | None) -> Tensor:
            """The gradient w.r.t. ``p`` through the purification draws ``draw`` (a seed per
            sample), with ``cls_grad`` (B, ...) grafted at the purified images (None: the
            draws' own classifier gradient)."""
            q = p.detach().requires_grad_(True)
            with torch.enable_grad():
                purified = parts.purify(threat.apply(x, q), seed=draw)
                if cls_grad is None:
                    total = loss_fn(parts.head(purified), y).sum()
                    (g,) = torch.autograd.grad(total, q)
                else:
                    (g,) = torch.autograd.grad(purified, q, grad_outputs=cls_grad)
            return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

        def evaluate(p: Tensor) -> tuple[Tensor, Tensor, Tensor, list[list[int]]]:
            """Losses (N, B), classifier-level gradients (N, B, ...), fooled (N, B), and the
            seeds (N lists of B)."""
            seeds = [seeds_for_batch() for _ in range(self.n_eval)]
            xa = threat.apply(x, p)
            losses, grads, fooled = [], [], []
            for s in seeds:
                with torch.no_grad():
                    purified = parts.purify(xa, seed=s)
                z = purified.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = parts.head(z)
                    loss = loss_fn(logits, y)
                    (g,) = torch.autograd.grad(loss.sum(), z)
                losses.append(loss.detach())
                grads.append(torch.nan_to_num(g.detach()))
                fooled.append((logits.argmax(1) != y) & torch.isfinite(loss))
            return torch.stack(losses), torch.stack(grads), torch.stack(fooled), seeds

        p = threat.init(x, generator, random=True)
        best = KeepBest(p, track_success=True)
        # the random start is never evaluated (the first step follows one fresh draw): the
        # evidence counts it as evaluation 0, so index i is the iterate after i steps, as for
        # PGD (and the efficiency curves compare like with like)
        best.skip()
        curve = LossCurve(LOSS_CURVE_BINS)
        attack_seeds, em_grad, past = seeds_for_batch(), None, None
        for it in range(self.steps):
            # one backward: each sample through its selected draw, the EM estimate grafted
            grad = graft(p, attack_seeds, em_grad)
            if past is not None:
                v = (it + 1) ** -self.alpha
                grad = v * grad + (1 - v) * past
            past = grad
            with torch.no_grad():
                p = threat.project(x, p + step * threat.ascent(grad))
            losses, grads, fooled, seeds = evaluate(p)
            share = fooled.float().mean(dim=0)
            best.update(p, losses.mean(dim=0) + 1e3 * share, share > 0.5)
            curve(it, losses.mean(dim=0))
            flat = grads.reshape(self.n_eval, b, -1)
            chosen, w = em_weights(losses, flat, threat.ascent, threat.eps, self.lam)
            em_grad = ((w[..., None] * flat).sum(0) / w.sum(0).clamp(min=1e-12)[:, None]
                       ).view_as(x)
            attack_seeds = [seeds[int(c)][i] for i, c in enumerate(chosen.tolist())]
        with torch.no_grad():
            x_adv = threat.apply(x, best.params)
        return AttackResult(
            x_adv.detach(), params=best.params, grad_evals=self.steps,
            extras={"eval_forwards": self.steps * (self.n_eval + 1),
                    "simplification": "PGD steps, one loss (public code: APGD over CW, CE, "
                                      "DLR restarts)"},
            evidence={"any_adversarial": best.success.clone(),
                      "first_adversarial": best.first.clone(),
                      "loss_curve": curve.binned()})
