"""Pope, Balaji & Feizi, "Adversarial Robustness of Flow-Based Generative Models" (AISTATS 2020):
PGD likelihood attacks on density models, and the closed-form robustness/accuracy trade-off of
linear adversarial training.

**Attacks (section 4).** PGD with the log-likelihood in place of the classification loss:

* ``flow-pgd-in`` (:class:`FlowPGDIn`), the *in-distribution* attack: perturb a test image to
  *lower* its likelihood (direction "lower": a robust detector still *accepts* it);
* ``flow-pgd-ood`` (:class:`FlowPGDOOD`), the *out-of-distribution* attack: start from uniform
  noise (drawn from the harness's generator) and *raise* its likelihood (direction "raise": a
  robust detector still *rejects* it).

Both take signed-gradient steps in l-inf (normalized-gradient steps in l2, for the linear
theory of section 3.1), projected onto the threat's ball around the start and the pixel box
after every step; each sample keeps its best iterate. They run on any density defense
(``attack_log_prob`` is the objective).

Settings. The paper trains with m = 10 attack iterations at l-inf eps 8/255 and attacks RealNVP
with 10, 20 and 50 iterations (their table 3); it does not state the step size in the main
text. Defaults: 20 steps (the zoo's evaluation, ``benchmark.train.flow``) of Madry et al.'s
``2.5 eps / steps``, uniform random start in the ball (as the zoo's trainer does). Paper
numbers (bits/dim): GLOW on CIFAR-10, table 1, clean model 3.4 -> 6.3 / 14 / 320 / 2.0e6 at
eps = 1, 2, 4, 8 (/255), adversarially trained 4.7 -> 5.8 and hybrid 3.6 -> 5.9 at eps 8; the
OOD attack of figure 4 takes uniform noise from 17.7 to 6.8 bits/dim at eps 8.

**Linear theory (section 3.2).** :func:`adversarial_training_alpha`, :func:`pope_tradeoff`
(L_nat-dr(m), L_sen(m), figure 3) and :func:`simulate_adversarial_training`, a Monte-Carlo run
of the m-step adversarial training those formulas describe.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn

from attacks._ascent import (
    Curve,
    KeepBest,
    ascend,
    check_bool,
    check_int,
    check_positive_int,
    check_real,
    threat_update,
)
from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack

if TYPE_CHECKING:
    from benchmark.api.density import DensityDefense

__all__ = [
    "FlowPGD",
    "FlowPGDIn",
    "FlowPGDOOD",
    "FlowUniform",
    "adversarial_training_alpha",
    "pope_tradeoff",
    "simulate_adversarial_training",
]

#: the zoo's evaluation attack iterations (the paper trains with m = 10, table 3 uses 10-50).
DEFAULT_STEPS = 20


def _checked_eps(attack: Attack, defense: nn.Module, threat: ThreatModel) -> float:
    """The threat's eps, after refusing an incompatible pairing (TypeError) and an l-inf
    radius outside (0, 1] (ValueError)."""
    reason = attack.incompatibility(defense, threat)
    if reason is not None:
        raise TypeError(reason)
    eps = float(threat.eps)
    if threat.name == "linf" and not 0.0 < eps <= 1.0:
        raise ValueError(f"{attack.name}: the l-inf radius must be in (0, 1] for images in "
                         f"[0, 1], got threat eps={eps!r}")
    return eps


class FlowPGD(Attack):
    """PGD on ``attack_log_prob`` of a density defense (Pope et al. section 4).

    ``steps`` signed (l-inf) or normalized (l2) gradient steps of ``step_size`` (absolute, in
    [0, 1] pixel units; ``None``: the threat's ``2.5 eps / steps``), from a uniform random
    start in the ball (``random_start``) or from the start itself; ``restarts`` runs (the
    later ones from random points of the ball), the best iterate over all of them returned.
    Subclasses fix the start (``start``: "test" image or "generated" noise) and
    ``direction``: "lower" minimizes the likelihood, "raise" maximizes it.

    ``extras``: ``x_start`` (what the threat model is checked against, and the "before"
    point), ``curve`` ((R, B) float: the objective ``+-attack_log_prob / D`` in nats/dim, sign
    chosen so the attacker maximizes it, at ``curve_steps``: every ``record_every``-th step and
    the last; with restarts, the best over them per step), ``best_objective``, ``direction``,
    ``objective``. ``grad_evals = steps * restarts``.
    """

    name: ClassVar[str] = "flow-pgd"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:density"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"linf", "l2"})
    direction: ClassVar[str] = "lower"
    start: ClassVar[str] = "test"

    def __init__(self, *, steps: int = DEFAULT_STEPS, step_size: float | None = None,
                 random_start: bool = True, restarts: int = 1, record_every: int = 1) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.step_size = check_real(step_size, "step_size", low=0.0, low_open=True,
                                    none_ok=True)
        self.random_start = check_bool(random_start, "random_start")
        self.restarts = check_positive_int(restarts, "restarts")
        self.record_every = check_positive_int(record_every, "record_every")

    @property
    def budget(self) -> Budget:
        return Budget(steps=self.steps, restarts=self.restarts)

    @property
    def objective_name(self) -> str:
        sign = "-" if self.direction == "lower" else ""
        return f"{sign}attack_log_prob(x) / D (nats/dim, [0, 1] coordinates)"

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x.clone()

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        _checked_eps(self, defense, threat)
        density = cast("DensityDefense", defense)
        sign = -1.0 if self.direction == "lower" else 1.0
        d = int(getattr(defense, "dim", 0) or 0) or x[0].numel()
        step = self.step_size if self.step_size is not None else threat.default_step(self.steps)
        x_start = self._start(x.detach(), generator)

        def objective(p: Tensor) -> tuple[Tensor, None]:
            return sign * density.attack_log_prob(threat.apply(x_start, p)) / d, None

        best: KeepBest | None = None
        curves = []
        for r in range(self.restarts):
            # restarts after the first always start at a random point of the ball
            p = threat.init(x_start, generator, random=self.random_start or r > 0)
            best = best if best is not None else KeepBest(p)  # non-finite values never win
            curve = Curve(self.steps, self.record_every)
            ascend(objective, p, threat_update(threat, x_start, step), steps=self.steps,
                   best=best, observe=curve)
            curves.append(curve)
        assert best is not None
        best_p = best.params
        with torch.no_grad():
            x_adv = threat.apply(x_start, best_p)
        extras: dict[str, Any] = {
            "x_start": x_start,
            # per step, the best objective over the restarts (their envelope)
            "curve": torch.stack([c.stack() for c in curves]).amax(dim=0),
            "curve_steps": curves[0].steps_at,
            "best_objective": best.score.float().cpu(),
            "direction": self.direction,
            "objective": self.objective_name,
            "step_size": step,
        }
        return AttackResult(x_adv.detach(), params=best_p.detach(),
                            grad_evals=self.steps * self.restarts, extras=extras)


@register_attack("flow-pgd-in")
class FlowPGDIn(FlowPGD):
    """In-distribution attack: lower the likelihood of test images (Pope et al. section 4;
    GLOW/CIFAR-10 clean model: 3.4 -> 320 bits/dim at l-inf 4/255, table 1)."""

    name: ClassVar[str] = "flow-pgd-in"
    direction: ClassVar[str] = "lower"
    start: ClassVar[str] = "test"


@register_attack("flow-pgd-ood")
class FlowPGDOOD(FlowPGD):
    """Out-of-distribution attack: raise the likelihood of uniform noise U[0, 1]^D drawn from
    the generator (one image per input; the inputs only give the shape). Pope et al. figure 4:
    17.7 -> 6.8 bits/dim at l-inf 8/255 on GLOW/CIFAR-10."""

    name: ClassVar[str] = "flow-pgd-ood"
    direction: ClassVar[str] = "raise"
    start: ClassVar[str] = "generated"

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)


@register_attack("flow-uniform")
class FlowUniform(Attack):
    """Pope et al.'s baseline for the in-distribution attack: the test image plus uniform noise
    filling the threat's l-inf ball, ``clamp(x + U(-eps, eps)^D, 0, 1)`` (drawn from the
    generator). A random perturbation of the attack's size: PGD's damage is measured against
    it (a detector robust to this but not to PGD is not robust to its budget). ``samples``
    draws per image, the one with the lowest likelihood returned (1: the plain baseline).
    Direction "lower", as ``flow-pgd-in``; no gradient (``grad_evals = 0``)."""

    name: ClassVar[str] = "flow-uniform"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:density"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"linf"})
    direction: ClassVar[str] = "lower"
    start: ClassVar[str] = "test"
    objective_name: ClassVar[str] = "-log_prob(x) / D (nats/dim, [0, 1] coordinates)"

    def __init__(self, *, samples: int = 1) -> None:
        self.samples = check_positive_int(samples, "samples")

    @property
    def budget(self) -> Budget:
        return Budget(steps=0, restarts=self.samples)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        eps = _checked_eps(self, defense, threat)
        density = cast("DensityDefense", defense)
        d = int(getattr(defense, "dim", 0) or 0) or x[0].numel()
        x = x.detach()
        best = KeepBest(torch.zeros_like(x))
        with torch.no_grad():
            for _ in range(self.samples):
                u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                delta = threat.apply(x, (2 * u - 1) * eps) - x  # clamped to the box
                best.update(delta, -density.log_prob(x + delta) / d)
            x_adv = x + best.params
        return AttackResult(x_adv, grad_evals=0, extras={
            "x_start": x, "best_objective": best.score.float().cpu(),
            "direction": self.direction, "objective": self.objective_name})


# --------------------------------------------------------------------------------------------
# Section 3.2: adversarial training of a linear (Gaussian) flow, closed form and simulation
# --------------------------------------------------------------------------------------------
def _chi_mean(n: int) -> float:
    """E||g|| for g ~ N(0, I_n): sqrt(2) Gamma((n + 1) / 2) / Gamma(n / 2)."""
    return math.sqrt(2.0) * math.exp(math.lgamma((n + 1) / 2) - math.lgamma(n / 2))


def _check_tradeoff_args(n: int, eps: float, sigma: float) -> None:
    check_positive_int(n, "n")
    check_real(eps, "eps", low=0.0)
    check_real(sigma, "sigma", low=0.0, low_open=True)


def adversarial_training_alpha(n: int, eps: float, *, sigma: float = 1.0) -> float:
    """Pope et al. section 3.2: one step of adversarial training multiplies the covariance of a
    spherical Gaussian N(mu, sigma^2 I_n) by 1 + alpha,
    ``alpha = (2 sqrt(2) e / n) Gamma((n+1)/2) / Gamma(n/2) + e^2 / n`` with e = eps / sigma
    (the paper's derivation sets sigma = 1: its alpha measures eps in units of sigma)."""
    _check_tradeoff_args(n, eps, sigma)
    e = eps / sigma
    return 2.0 * e * _chi_mean(n) / n + e * e / n


def pope_tradeoff(n: int, eps: float, m: int | Tensor, *, sigma: float = 1.0
                  ) -> tuple[Tensor, Tensor]:
    """(L_nat-dr(m), L_sen(m)) of Pope et al. section 3.2.1 (their figure 3), in nats.

    After m steps of adversarial training the model is N(mu, sigma^2 (1 + alpha)^m I) (eq. 4):
    ``L_nat-dr(m) = n/2 [m log(1 + alpha) + (1 + alpha)^-m - 1]`` is the drop of the mean clean
    log-likelihood against the clean model, and
    ``L_sen(m) = (2 e sqrt(2) Gamma((n+1)/2) / Gamma(n/2) + e^2) / (2 (1 + alpha)^m)`` (eq. 5,
    e = eps / sigma) the mean log-likelihood drop the optimal l2 attack of radius eps causes
    on clean samples under the m-step model. ``m``: an int >= 0 or a tensor of them.
    """
    alpha = adversarial_training_alpha(n, eps, sigma=sigma)
    steps = torch.as_tensor(m, dtype=torch.float64)
    if bool((steps < 0).any()):
        raise ValueError(f"m must be >= 0, got {m!r}")
    growth = (1.0 + alpha) ** steps
    nat_dr = 0.5 * n * (steps * math.log1p(alpha) + 1.0 / growth - 1.0)
    e = eps / sigma
    sen = (2.0 * e * _chi_mean(n) + e * e) / (2.0 * growth)
    return nat_dr, sen


def simulate_adversarial_training(n: int, eps: float, m: int, *, samples: int = 100_000,
                                  sigma: float = 1.0, generator: torch.Generator | None = None
                                  ) -> dict[str, Any]:
    """Monte-Carlo m-step adversarial training of a linear Gaussian flow (Pope et al. 3.2).

    Data: N(mu, sigma^2 I_n) with a random mean. Round 0 fits the flow x = A z + b by maximum
    likelihood (sample mean and covariance, the closed-form optimum of the flow's training
    loss, A = chol(K)) on ``samples`` clean draws. Round k = 1..m is the paper's population
    step: draw ``samples`` points from the current model N(mu_k, K_k), perturb each by the
    optimal l2 attack on the current model (theorem 3.1, ``optimal_l2_perturbation``), refit
    by maximum likelihood. As in the paper's derivation of eq. 4 (which sets sigma = 1 at every
    round), the attack radius is measured in units of the current model's scale:
    ``eps * sigma_k / sigma`` with sigma_k^2 = tr(K_k) / n; this is what makes the covariance
    grow geometrically, K_m = sigma^2 (1 + alpha)^m I.

    Evaluation on fresh clean draws x ~ N(mu, sigma^2 I): ``nat_dr`` = mean(log p_0(x) -
    log p_m(x)) and ``sen`` = mean(log p_m(x) - log p_m(x + delta_m(x))) with delta_m the
    optimal radius-``eps`` attack on the m-step model. Float64 throughout. Returns a dict with
    ``nat_dr``, ``sen`` (floats), ``cov`` (K_m) and ``mean`` (mu_m).
    """
    from benchmark.zoo.analytic import LinearGaussianFlow

    _check_tradeoff_args(n, eps, sigma)
    check_positive_int(samples, "samples")
    check_int(m, "m", low=0)
    f64 = torch.float64
    mu = torch.randn(n, dtype=f64, generator=generator)

    def fit(data: Tensor) -> LinearGaussianFlow:
        mean = data.mean(0)
        centered = data - mean
        cov = centered.T @ centered / data.shape[0]
        return LinearGaussianFlow(torch.linalg.cholesky(cov), mean)

    def clean(count: int) -> Tensor:
        return mu + sigma * torch.randn(count, n, dtype=f64, generator=generator)

    model = first = fit(clean(samples))
    for _ in range(m):
        scale = math.sqrt(float(torch.trace(model.covariance)) / n)
        data = model.sample(samples, generator=generator)
        data = data + model.optimal_l2_perturbation(data, eps * scale / sigma)
        model = fit(data)
    x = clean(samples)
    with torch.no_grad():
        lp = model.log_prob(x)
        nat_dr = float((first.log_prob(x) - lp).mean())
        sen = float((lp - model.log_prob(x + model.optimal_l2_perturbation(x, eps))).mean())
    return {"nat_dr": nat_dr, "sen": sen, "cov": model.covariance, "mean": model.mean}
