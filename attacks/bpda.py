"""Backward Pass Differentiable Approximation (Athalye et al. 2018).

The forward pass is the real defense, ``head(purify(x))``; the backward pass differentiates
``defense.surrogate()`` (identity by default) in place of ``purify``, straight-through:

    s  = surrogate(x)
    xp = s + (purify(x) - s).detach()     # value of purify(x), gradient of surrogate(x)
    logits = head(xp)

``BPDA(attack="pgd", **inner_params)`` runs any attack with a ``forward`` hook (PGD, StAdv,
and EOT around them: ``BPDA(attack="eot", draws=20)``) through this view.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.eot import WrappedAttack
from benchmark.api.attack import AttackResult, Forward
from benchmark.api.defense import has_capability
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


def bpda_forward(defense: nn.Module) -> Forward:
    """The straight-through view of ``defense`` described in the module docstring."""
    parts: Any = defense  # a Defense; nn.Module's attribute typing does not know its parts
    surrogate, purify, head = parts.surrogate(), parts.purify, parts.head

    def forward(x: Tensor) -> Tensor:
        s = surrogate(x)
        # purify may run its own optimization (with autograd inside): give it a detached input
        # and keep only its value.
        real = purify(x.detach()).detach()
        return head(s + (real - s).detach())

    return forward


@register_attack("bpda")
class BPDA(WrappedAttack):
    """Runs an inner attack against the BPDA view of a defense with a purification stage."""

    name: ClassVar[str] = "bpda"
    gradient: ClassVar[str] = "bpda"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier", "purify"})

    def __init__(self, *, attack: str = "pgd", **inner_params: Any) -> None:
        if "forward" in inner_params:
            raise TypeError("BPDA sets the inner attack's forward hook itself; do not pass one")
        self._build_inner(attack, "forward", bpda_forward, inner_params)

    def config(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.inner_params}

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        own = super().incompatibility(defense, threat)
        if own is not None:
            return own
        if not has_capability(defense, "head"):
            return (f"{self.name} requires head (the classifier after purify), "
                    "which the defense does not declare")
        return self._inner.incompatibility(defense, threat)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        result = self._inner.run(defense, x, y, threat, generator=generator)
        result.extras.setdefault("gradient", "bpda")
        return result
