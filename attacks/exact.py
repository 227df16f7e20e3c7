"""Exact-gradient attack on purification defenses: PGD differentiating *through* ``purify``.

For RDC this is the "exact gradient" attack (Chen et al., ICML 2024, table 3): the gradient of the
classifier loss is taken through the likelihood-maximization steps, which needs second-order
derivatives (the defense builds the graph with ``create_graph=True`` when its input requires
grad). The paper could only afford N = 1 step on CIFAR-10 (69.53%); BPDA (N = 1) gave 69.92%.

"Exact" is exact, holes included: where ``purify`` takes sign-like steps (RDC v1 under l-inf,
``x + gamma sign(m)``; t1's first Adam step, m_hat / sqrt(v_hat) = g / |g|), their derivative is
zero, no second-order term survives, and the exact gradient is the identity masked where the box
clip binds: BPDA with holes, at about 2.5 times BPDA's cost (digits-eps, 4 digits, T' = 10,
N = 10: 14.5 s against 5.8 s per gradient on one CPU core). ``sign_tau`` asks the defense for a
smooth backward of those steps (its ``smooth_sign(tau)`` context; forward values unchanged), a
genuinely second-order gradient, at the exact gradient's cost. Each result's
``extras["gradient"]`` says which was used: ``"exact"`` or ``"exact-smooth(tau=...)"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_real
from attacks.pgd import PGD
from benchmark.api.attack import AttackResult
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


@register_attack("exact")
class Exact(PGD):
    """PGD with the exact gradient of the whole defense (``purify`` included).

    ``sign_tau`` (default None: the true derivative, zero through sign-like steps): run the
    defense inside its ``smooth_sign(sign_tau)`` context, which gives its sign-like steps the
    backward of a smooth surrogate (RDC: tanh(m / (tau mean|m|)); see
    ``RobustDiffusionClassifier.smooth_sign`` for the scale and the measured default 0.5). A
    finite number > 0. It enters :meth:`config` (and so the job key) only when set, so the
    keys of plain exact jobs are unchanged. Other keywords are :class:`PGD`'s.
    """

    name: ClassVar[str] = "exact"
    requires = frozenset({"kind:classifier", "purify", "differentiable"})

    def __init__(self, *, sign_tau: float | None = None, **pgd: Any) -> None:
        super().__init__(**pgd)
        self._sign_tau = check_real(sign_tau, "sign_tau", low=0.0, low_open=True, none_ok=True,
                                    expected="a finite number > 0 (the temperature of the "
                                    "smooth sign surrogate) or None")

    @property
    def sign_tau(self) -> float | None:
        return self._sign_tau

    @property
    def gradient_label(self) -> str:
        """What ``extras["gradient"]`` records: ``exact`` or ``exact-smooth(tau=...)``."""
        return "exact" if self._sign_tau is None else f"exact-smooth(tau={self._sign_tau!r})"

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        if self._sign_tau is not None:
            cfg["sign_tau"] = self._sign_tau
        return cfg

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        own = super().incompatibility(defense, threat)
        if own is not None or self._sign_tau is None:
            return own
        who = type(defense).__name__
        if not callable(getattr(defense, "smooth_sign", None)):
            return (f"{self.name} with sign_tau={self._sign_tau!r} needs a defense that provides "
                    f"smooth_sign(tau) (a smooth backward for the sign-like steps of its "
                    f"purify); {who} does not")
        if getattr(defense, "sign_steps", "") is None:  # declared: nothing sign-like
            return (f"{self.name} with sign_tau={self._sign_tau!r}: {who}'s purify has no "
                    f"sign-like step, so sign_tau would not change the gradient; run "
                    f"{self.name} without sign_tau")
        return None

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        if self._sign_tau is None:
            result = super().run(defense, x, y, threat, generator=generator)
        else:
            smooth: Any = getattr(defense, "smooth_sign", None)
            if not callable(smooth):
                raise TypeError(self.incompatibility(defense, threat) or
                                f"{type(defense).__name__} has no smooth_sign")
            with smooth(self._sign_tau):
                result = super().run(defense, x, y, threat, generator=generator)
        result.extras.setdefault("gradient", self.gradient_label)
        return result
