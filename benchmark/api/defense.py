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
    # A plain nn.Module is treated as a differentiable classifier, deterministic unless found
    # otherwise (:func:`settle_randomness`).
    plain = {"kind:classifier", "surrogate", "differentiable"}
    if getattr(defense, "stochastic", False):
        plain.add("stochastic")
    return cap in plain


#: two passes of a classifier that declares ``stochastic = False`` over the same images whose
#: logits differ by more than this, relative to the largest logit (at least 1), are random:
#: far above float32 round-off and the run-to-run jitter of GPU kernels (~1e-6).
RANDOMNESS_RTOL = 1e-4
#: images the probe passes twice through the defense.
RANDOMNESS_PROBE = 4


def randomness_gap(defense: nn.Module, x: Tensor) -> float:
    """The largest difference between the outputs of two forward passes over ``x``, relative
    to the largest output (at least 1); ``inf`` where one pass is non-finite and the other is
    not; 0 for output that is not a tensor (the conformance checks report those)."""
    with torch.no_grad():
        a, b = defense(x), defense(x)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return float("inf")
    if not fa.any():
        return 0.0
    scale = max(float(a[fa].abs().max()), 1.0)
    return float((a[fa] - b[fa]).abs().max()) / scale


def settle_randomness(defense: nn.Module, x: Tensor) -> bool:
    """Check a classifier that declares ``stochastic = False`` for randomness it did not
    declare (two passes over ``x``, :data:`RANDOMNESS_RTOL`); one that is random is marked
    ``stochastic = True`` and ``undeclared_randomness = True`` on the instance, so that the
    harness scores it with K draws and plans EOT attacks for it, and nothing is counted
    robust on one lucky draw. Once per instance; returns whether it was found random."""
    if getattr(defense, "_randomness_settled", False):
        return bool(getattr(defense, "undeclared_randomness", False))
    kind, stochastic, _ = describe(defense)
    random = False
    if kind == "classifier" and not stochastic:
        random = randomness_gap(defense, x) > RANDOMNESS_RTOL
        if random:
            # instance attributes shadow the class's declaration (a ClassVar on Defense)
            object.__setattr__(defense, "stochastic", True)
            object.__setattr__(defense, "undeclared_randomness", True)
    object.__setattr__(defense, "_randomness_settled", True)
    return random


def describe(defense: nn.Module) -> tuple[str, bool, int]:
    """(kind, stochastic, nfe_per_call) of any module, with plain-module defaults."""
    return (
        getattr(defense, "kind", "classifier"),
        bool(getattr(defense, "stochastic", False)),
        int(getattr(defense, "nfe_per_call", 1)),
    )
