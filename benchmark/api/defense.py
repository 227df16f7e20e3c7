"""The defense contract: an ``nn.Module`` plus declared capabilities.

Every defense takes images in [0, 1] (NCHW, float32) and returns

* ``kind = "classifier"``: logits of shape (B, num_classes);
* ``kind = "density"``: per-sample log-likelihood of shape (B,).

Optional parts the adaptive attacks use (a defense provides them by overriding the method):

* ``purify(x)``: the non-classifier stage (likelihood maximization, diffusion purification);
* ``head(x)``: the classifier applied after purification, so ``forward == head(purify(x))``;
* ``surrogate()``: what BPDA differentiates in place of ``purify`` (identity by default);
* ``likelihood_objective(x)``: a per-sample term a Lagrange attack adds;
* ``nfe_per_call``: network evaluations per forward, for cost columns.

Stochastic defenses draw their noise through :meth:`Defense.generator_for`, which the harness
seeds per job, so the same seed gives the same table; a forward and its backward see the same
noise through ordinary autograd (and through replay in checkpointed defenses).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

Kind = Literal["classifier", "density"]

#: capability names that attacks may require.
CAPABILITIES = ("purify", "head", "surrogate", "likelihood_objective", "differentiable")


class Defense(nn.Module):
    """Base class for defenses. Subclasses implement ``forward`` and may override the parts."""

    kind: ClassVar[Kind] = "classifier"
    stochastic: ClassVar[bool] = False
    #: False when forward is not differentiable end to end (attacks then need BPDA / EOT).
    differentiable: ClassVar[bool] = True
    num_classes: int = 0
    nfe_per_call: int = 1

    def __init__(self) -> None:
        super().__init__()
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    # -- randomness ----------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Fix the noise stream (the harness calls this once per job with a derived seed)."""
        self._seed = int(seed)
        self._generator = None

    def generator_for(self, x: Tensor) -> torch.Generator | None:
        """The generator stochastic parts must draw from (``None`` before any ``reseed``)."""
        if self._seed is None:
            return None
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device)
            self._generator.manual_seed(self._seed)
        return self._generator

    # -- optional parts ------------------------------------------------------------------
    def purify(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no purification stage")

    def head(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no separate classifier head")

    def surrogate(self) -> nn.Module:
        """What BPDA differentiates instead of ``purify`` (identity by default)."""
        return nn.Identity()

    def likelihood_objective(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no likelihood objective")

    # -- introspection -------------------------------------------------------------------
    @classmethod
    def _overrides(cls, method: str) -> bool:
        return getattr(cls, method) is not getattr(Defense, method)

    def capabilities(self) -> frozenset[str]:
        caps = {f"kind:{self.kind}"}
        for part in ("purify", "head", "likelihood_objective"):
            if self._overrides(part):
                caps.add(part)
        caps.add("surrogate")  # identity by default, always available
        if self.differentiable:
            caps.add("differentiable")
        if self.stochastic:
            caps.add("stochastic")
        return frozenset(caps)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, stochastic={self.stochastic}, nfe_per_call={self.nfe_per_call}"


def has_capability(defense: nn.Module, cap: str) -> bool:
    if isinstance(defense, Defense):
        return cap in defense.capabilities()
    # A plain nn.Module is treated as a deterministic, differentiable classifier.
    return cap in {"kind:classifier", "surrogate", "differentiable"}


def describe(defense: nn.Module) -> tuple[str, bool, int]:
    """(kind, stochastic, nfe_per_call) of any module, with plain-module defaults."""
    return (
        getattr(defense, "kind", "classifier"),
        bool(getattr(defense, "stochastic", False)),
        int(getattr(defense, "nfe_per_call", 1)),
    )
