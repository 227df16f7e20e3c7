"""SPSA: a gradient-free attack that estimates the gradient from loss differences.

Uesato, O'Donoghue, van den Oord & Kohli, "Adversarial Risk and the Dangers of Evaluating
Against Weak Attacks" (ICML 2018), algorithm 1: at each step, the gradient of the loss at the
current image is estimated by simultaneous perturbation with ``samples`` Rademacher directions
``v`` (antithetic pairs),

    g = mean_v [(L(x + delta v) - L(x - delta v)) / (2 delta)] v,

and Adam (learning rate ``lr``) takes a step along it, followed by the projection onto the
threat model's ball. The loss is the logit margin ``max_{j != y} z_j - z_y`` (the paper's), so
the defense is only ever *evaluated*: masked, shattered or vanishing gradients do not slow it,
which is why Carlini et al. (2019) and the benchmark's fallbacks run it beside white-box attacks.
Defaults: the paper's delta = lr = 0.01, 100 steps; ``samples = 128`` directions per step (the
paper's CIFAR-10 batch; 8192 on ImageNet). Every evaluated iterate competes for the returned
example as in PGD (a misclassified one beats any other; then the higher loss).

Perturbed points are clamped to the pixel box before the defense sees them (every defense
expects images in [0, 1]); the difference quotient is taken on the clamped points. Stochastic
defenses are evaluated with fresh noise at each query: the estimate averages over it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import KeepBest, check_positive_int, check_real
from attacks.losses import get_loss
from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack

#: most images per forward pass while evaluating the perturbed points.
CHUNK = 1024


def spsa_gradient(loss: Callable[[Tensor], Tensor], x: Tensor, *, delta: float, samples: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """The SPSA estimate of the gradient of the per-sample ``loss`` at ``x`` (B, ...), from
    ``samples`` Rademacher directions per sample in antithetic pairs (``samples // 2`` pairs,
    at least one), perturbed points clamped to [0, 1]. ``loss`` maps (N, ...) images to (N,)."""
    b = x.shape[0]
    pairs = max(1, samples // 2)
    # drawn where the generator lives (the harness's is on the job's device)
    where = generator.device if generator is not None else x.device
    v = torch.randint(0, 2, (pairs, *x.shape), generator=generator, device=where
                      ).to(device=x.device, dtype=x.dtype).mul_(2).sub_(1)
    plus = (x[None] + delta * v).clamp(0.0, 1.0).reshape(-1, *x.shape[1:])
    minus = (x[None] - delta * v).clamp(0.0, 1.0).reshape(-1, *x.shape[1:])
    points = torch.cat([plus, minus])
    values = torch.cat([loss(points[i:i + CHUNK]) for i in range(0, len(points), CHUNK)])
    lp, lm = values.view(2, pairs, b)
    diff = ((lp - lm) / (2 * delta)).view(pairs, b, *[1] * (x.dim() - 1))
    return torch.nan_to_num(diff * v, nan=0.0, posinf=0.0, neginf=0.0).mean(dim=0)


@register_attack("spsa")
class SPSA(Attack):
    """SPSA with Adam and the threat model's projection (additive l-inf or l2 balls).

    ``grad_evals`` is 0 (the defense is never differentiated); ``extras["queries"]`` counts the
    forward evaluations per sample (``steps * (2 * pairs + 1) + 1``).
    """

    name: ClassVar[str] = "spsa"
    gradient: ClassVar[str] = "none"
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"linf", "l2"})

    def __init__(self, *, steps: int = 100, samples: int = 128, delta: float = 0.01,
                 lr: float = 0.01, loss: str = "margin") -> None:
        self.steps = check_positive_int(steps, "steps")
        self.samples = check_positive_int(samples, "samples")
        self.delta = check_real(delta, "delta", low=0.0, low_open=True)
        self.lr = check_real(lr, "lr", low=0.0, low_open=True)
        get_loss(loss)
        self.loss = loss

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps, restarts=1, eot_draws=1)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        loss_fn = get_loss(self.loss)
        x, y = x.detach(), y.detach()
        pairs = max(1, self.samples // 2)

        def evaluate(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            logits = defense(images)
            values = loss_fn(logits, labels)
            return values, (logits.argmax(dim=1) != labels) & torch.isfinite(values)

        def loss_at(images: Tensor) -> Tensor:  # the 2 * pairs copies of the batch, in order
            reps = len(images) // len(x)
            return evaluate(images, y.repeat(reps))[0]

        with torch.no_grad():
            p = threat.init(x, generator, random=False)
            leaf = p.clone().requires_grad_(False)
            opt = torch.optim.Adam([leaf], lr=self.lr)
            best = KeepBest(p, track_success=True)
            for _ in range(self.steps):
                current = threat.apply(x, leaf)
                value, success = evaluate(current, y)
                best.update(leaf, value, success)
                g = spsa_gradient(loss_at, current, delta=self.delta, samples=self.samples,
                                  generator=generator)
                leaf.grad = -g  # Adam minimizes: ascend the loss
                opt.step()
                leaf.copy_(threat.project(x, leaf))
            value, success = evaluate(threat.apply(x, leaf), y)
            best.update(leaf, value, success)
            x_adv = threat.apply(x, best.params)
        return AttackResult(
            x_adv.detach(), params=best.params, grad_evals=0,
            extras={"queries": self.steps * (2 * pairs + 1) + 1,
                    "success": best.success.tolist()},
            evidence={"any_adversarial": best.success.clone(),
                      "first_adversarial": best.first.clone()})
