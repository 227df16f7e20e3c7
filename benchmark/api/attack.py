"""The attack contract.

An attack declares what it requires of a defense (capabilities such as ``purify`` or
``kind:density``, see :mod:`benchmark.api.defense`) and which threat models it supports, exposes its
budget, and maps a batch of clean images to adversarial ones:

    result = attack.run(defense, x, y, threat, generator=g)

``result.x_adv`` must satisfy the threat model; the harness re-checks it (with ``result.params``
for parameter spaces that an image alone cannot verify, like StAdv's flow field).

Attacks are configured at construction, by keyword-only arguments recorded in result rows;
they are never configured by mutating attributes afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from benchmark.api.defense import has_capability
from benchmark.api.threat import ThreatModel

#: A differentiable map from images to logits (the defense, or a BPDA/EOT view of it).
Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Budget:
    """Budgets recorded in every result row."""

    steps: int = 0
    restarts: int = 1
    eot_draws: int = 1


#: How an attack gets its gradient: ``exact`` (the defense's own, through every stage it
#: declares differentiable), ``bpda`` (a surrogate's through a non-differentiable stage),
#: ``none`` (gradient-free: a black-box attack).
GRADIENT_KINDS = ("exact", "bpda", "none")


@dataclass(frozen=True)
class AttackTraits:
    """What the validity flags read about an attack row: plug-in attributes, never its name."""

    gradient: str = "exact"
    #: a diagnostic is reported but never enters the worst case (e.g. fixed-noise).
    diagnostic: bool = False
    #: registry name of the inner attack of a wrapper (BPDA, EOT, fixed-noise); else None.
    wraps: str | None = None

    def __post_init__(self) -> None:
        if self.gradient not in GRADIENT_KINDS:
            raise ValueError(f"gradient must be one of {GRADIENT_KINDS}, got {self.gradient!r}")

    @property
    def blackbox(self) -> bool:
        return self.gradient == "none"


#: Per-sample evidence an attack may report in :attr:`AttackResult.evidence` (each a tensor whose
#: first dimension is the batch), read by the validity flags (Pintor et al. 2022's indicators of
#: attack failure):
#:
#: * ``any_adversarial`` (bool): some evaluated iterate was adversarial under the attack's own
#:   forward (one pass, or the mean of its EOT draws); with a robust verdict on the returned
#:   example, a *silent success*.
#: * ``first_adversarial`` (int): the index of the first evaluated iterate that was adversarial
#:   under the attack's own forward (evaluations counted over every restart; an attack of S
#:   steps evaluates S + 1 iterates per restart), -1 if none was: the attack-efficiency curve
#:   (the share of samples still unbroken against iterations, and NFE) is read from it.
#: * ``loss_curve`` (float, (B, R)): the attack objective along its iterations, consecutive
#:   evaluations averaged into R <= :data:`LOSS_CURVE_BINS` bins (restarts concatenated); the
#:   last bin ends at the final evaluation. Read by *incomplete optimization*.
#: * ``source_adversarial`` (bool): the returned example fools the surrogate the attack optimized
#:   (a transfer attack's source model, the Lagrange attack's head); with a robust verdict on the
#:   defense, a *transfer failure*.
EVIDENCE_KEYS = ("any_adversarial", "first_adversarial", "loss_curve", "source_adversarial")
#: most bins of a reported loss curve.
LOSS_CURVE_BINS = 50


@dataclass
class AttackResult:
    x_adv: Tensor
    #: threat-model parameter (StAdv: the flow field) for re-checking; None for additive ones.
    params: Tensor | None = None
    #: gradient computations spent (forward+backward passes of the defense, EOT draws counted).
    grad_evals: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    #: per-sample evidence, names from :data:`EVIDENCE_KEYS` (the runner stores it per sample).
    evidence: dict[str, Tensor] = field(default_factory=dict)


class Attack(ABC):
    """Base class. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier"})
    #: threat-model names supported; ``None`` means every threat model.
    threat_models: ClassVar[frozenset[str] | None] = None
    #: one of :data:`GRADIENT_KINDS`; :meth:`traits` may refine it from the parameters.
    gradient: ClassVar[str] = "exact"
    #: reported, but never counted in the worst case over attacks.
    diagnostic: ClassVar[bool] = False

    @classmethod
    def traits(cls, params: Mapping[str, Any]) -> AttackTraits:
        """The traits of this attack built with ``params`` (class attributes by default;
        attacks whose nature depends on a parameter, e.g. a black-box sub-attack, override)."""
        return AttackTraits(gradient=cls.gradient, diagnostic=cls.diagnostic)

    @property
    def budget(self) -> Budget:
        return Budget()

    def config(self) -> dict[str, Any]:
        """The keyword configuration (JSON-serializable), for result rows and ``repr``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        """Why this attack cannot run on (defense, threat), or None if it can."""
        if self.threat_models is not None and threat.name not in self.threat_models:
            return (f"{self.name} supports threat models {sorted(self.threat_models)}, "
                    f"not {threat.name!r}")
        missing = sorted(c for c in self.requires if not has_capability(defense, c))
        if missing:
            return f"{self.name} requires {', '.join(missing)}, which the defense does not declare"
        return None

    @abstractmethod
    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
