"""Transfer attack: a white-box attack on a differentiable source model, handed to the defense.

Papernot et al. 2016 ("Transferability in machine learning"); Carlini et al. 2019, "On
evaluating adversarial robustness", section 4.3 and checklist item "try a transfer attack from
a similar undefended model": a defense that masks its own gradients (non-differentiable
preprocessing, detached graphs, shattered or squashed gradients, saturated logits) does not
mask the gradients of the model it wraps, and examples crafted on that model often transfer.

``Transfer(source="digits-cnn", attack="pgd", **inner_params)`` loads the zoo classifier
``source`` (sha256-checked; no code named by the suite runs), runs the registered inner attack
``attack`` on it, and returns its examples; the harness re-checks them against the threat model
and scores them on the defense with K draws like any other attack. The defense is never
differentiated: the row is gradient-free (``gradient = "none"``), so the validity flags read it
as a black-box row (``blackbox_beats_whitebox`` compares it per sample with the white-box
rows), and it enters the worst case.

The inner attack sees only the source model; its own ``requires`` are checked against that
model (a plain zoo classifier: differentiable, deterministic). ``extras["source_success"]`` is
the fraction of returned examples that fool the source model, and ``evidence["source_adversarial"]``
says which (the transfer-failure indicator of Pintor et al. 2022 compares it, per sample, with
the defense's verdict on them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.eot import WrappedAttack
from benchmark.api.attack import Attack, AttackResult, AttackTraits
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


@register_attack("transfer")
class Transfer(WrappedAttack):
    """An inner attack run on the zoo model ``source``; its examples are scored on the defense."""

    name: ClassVar[str] = "transfer"
    gradient: ClassVar[str] = "none"

    def __init__(self, *, source: str = "digits-cnn", attack: str = "pgd",
                 **inner_params: Any) -> None:
        from benchmark.plugins.builtin import ATTACKS
        from benchmark.zoo import get_entry

        if not isinstance(source, str) or not source:
            raise ValueError(f"source must be the name of a zoo classifier, got {source!r}")
        get_entry(source)  # an unknown name fails here, when the suite is planned
        if attack == self.name:
            raise ValueError("transfer cannot wrap itself (attack = 'transfer')")
        self.source = source
        self.attack = attack
        self.inner_params = dict(inner_params)
        self._inner: Attack = ATTACKS.get(attack)(**inner_params)
        self._model: nn.Module | None = None

    @classmethod
    def traits(cls, params: Mapping[str, Any]) -> AttackTraits:
        return AttackTraits(gradient="none", wraps=str(params.get("attack", "pgd")))

    def config(self) -> dict[str, Any]:
        return {"source": self.source, "attack": self.attack, **self.inner_params}

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        own = Attack.incompatibility(self, defense, threat)
        if own:
            return own
        inner = self._inner.threat_models
        if inner is not None and threat.name not in inner:
            return (f"the inner attack {self.attack!r} supports threat models {sorted(inner)}, "
                    f"not {threat.name!r}")
        return None

    def source_model(self, device: torch.device) -> nn.Module:
        from benchmark.zoo import load_model

        if self._model is None or next(self._model.parameters()).device != device:
            self._model = load_model(self.source, device=device)
        return self._model

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        model = self.source_model(x.device)
        result = self._inner.run(model, x, y, threat, generator=generator)
        with torch.no_grad():
            fooled = model(result.x_adv.detach()).argmax(dim=1) != y
        # the defense was queried zero times for gradients: grad_evals are the source's. The
        # inner attack's own evidence (any adversarial iterate, its loss curve) is about the
        # source model, not the defense: only the source's verdict is passed on.
        return AttackResult(x_adv=result.x_adv.detach(), params=result.params, grad_evals=0,
                            extras={"source_success": fooled.float().mean().item(),
                                    "source_grad_evals": int(result.grad_evals)},
                            evidence={"source_adversarial": fooled})
