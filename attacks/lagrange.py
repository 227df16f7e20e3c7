"""Lagrange attack on RDC (Chen et al., ICML 2024, eq. 10): maximize the classification loss
while keeping the unconditional diffusion loss low, so that likelihood maximization leaves the
adversarial example where it is:

    maximize  CE(f(x), y) - l * L_uncond(x),   l in {0, 1, 10},

one PGD run per weight; a sample falls if any weight succeeds against the whole defense
(paper: 77.54% on CIFAR-10, no stronger than BPDA's 73.24%). ``L_uncond`` is the objective the
defense's likelihood maximization itself minimizes, so that a low penalty means purification has
nothing to do: the defense's ``lm_objective`` where it has one (RDC: t1's EDM denoising loss at
sigma ~ U[0.4, 0.6], v1's DDPM loss over its ``lm_timesteps``), else its
``likelihood_objective`` (DC: the DDPM loss over the classifier's T'). See
:func:`likelihood_penalty`.

``through`` picks the classifier term f:

* ``"head"`` (default, the paper): p(y|x) "given by Eq. (6)", i.e. the diffusion classifier
  evaluated on x itself (RDC's ``head``; a defense without one, such as ``dc``, is its own
  head). The likelihood maximization is not in the attack's graph at all: the penalty is what
  keeps it from moving the example. This is also the cheap form (no second-order terms).
* ``"defense"``: f is the whole defense, differentiated exactly through ``purify`` (second
  order; a stronger, costlier variant that the paper could not afford at N = 10).

Which samples fell is always decided on the whole defense (one draw, no gradient), since the
head's success on x says nothing about RDC's decision after purification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_choice, check_real
from attacks.pgd import PGD
from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.defense import Defense, has_capability
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


def likelihood_penalty(defense: nn.Module) -> Any:
    """The per-sample penalty of eq. 10 for ``defense``: its ``lm_objective`` (the objective of
    its own likelihood maximization, fresh noise per row) if it has one, else its
    ``likelihood_objective``."""
    lm = getattr(defense, "lm_objective", None)
    if callable(lm):
        return lm
    return defense.likelihood_objective  # guaranteed by Lagrange.requires


class _Penalized(PGD):
    def __init__(self, weight: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.weight = weight

    def objective(self, defense: nn.Module, forward: Any, x_adv: Tensor, y: Tensor,
                  loss_fn: Any, draws: int) -> tuple[Tensor, Tensor]:
        losses, success = super().objective(defense, forward, x_adv, y, loss_fn, draws)
        if self.weight:
            losses = losses - self.weight * likelihood_penalty(defense)(x_adv)
        return losses, success


THROUGH = ("head", "defense")


def _head_forward(defense: nn.Module) -> Any:
    """The paper's eq. 10 classifier: the defense's ``head`` on the input (no purification)."""
    if isinstance(defense, Defense):  # Defense.head always exists: use the declared capability
        return defense.head if has_capability(defense, "head") else defense
    head = getattr(defense, "head", None)  # a plain module with a head method
    return head if callable(head) else defense


@register_attack("lagrange")
class Lagrange(Attack):
    name: ClassVar[str] = "lagrange"
    requires = frozenset({"kind:classifier", "likelihood_objective"})

    def __init__(self, *, weights: Sequence[float] = (0.0, 1.0, 10.0), through: str = "head",
                 **pgd: Any) -> None:
        if isinstance(weights, str) or not isinstance(weights, Sequence) or not weights:
            raise ValueError(f"weights must be a non-empty list of numbers >= 0, got {weights!r}")
        ws = [check_real(w, "weights", low=0.0, expected="finite numbers >= 0 (Lagrange "
                         "weights)") for w in weights]
        check_choice(through, "through", THROUGH, note="the classifier term of eq. 10")
        if through == "head" and "forward" in pgd:
            raise TypeError("through='head' sets the forward itself; pass through='defense' "
                            "to use your own forward hook")
        self.weights = ws
        self.through = through
        self.pgd = dict(pgd)
        hook = {"forward": _head_forward} if through == "head" else {}
        self._runs = [_Penalized(w, **hook, **self.pgd) for w in ws]  # validates the options

    @property
    def budget(self) -> Budget:
        b = self._runs[0].budget
        return Budget(steps=b.steps, restarts=b.restarts * len(self._runs),
                      eot_draws=b.eot_draws)

    def config(self) -> dict[str, Any]:
        return {"weights": self.weights, "through": self.through, **self.pgd}

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        x_adv, params, fell = None, None, torch.zeros(len(x), dtype=torch.bool, device=x.device)
        surrogate = torch.zeros_like(fell)  # some run fooled the head it optimized ("head")
        evals = 0
        for run in self._runs:
            res = run.run(defense, x, y, threat, generator=generator)
            evals += res.grad_evals
            if self.through == "head":  # the head's success on x is not the defense's
                surrogate |= torch.tensor(res.extras["success"], dtype=torch.bool,
                                          device=x.device)
                with torch.no_grad():
                    ok = defense(res.x_adv).argmax(1) != y
            else:
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
        # through "head" the runs optimize a surrogate (the head on x, eq. 6): which examples
        # fooled it is the transfer-failure evidence; through "defense" they are the defense's
        # own iterates
        evidence = ({"source_adversarial": surrogate} if self.through == "head"
                    else {"any_adversarial": fell.clone()})
        return AttackResult(x_adv, params=params, grad_evals=evals,
                            extras={"success": fell.tolist(), "weights": self.weights},
                            evidence=evidence)
