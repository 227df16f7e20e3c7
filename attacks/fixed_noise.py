"""The fixed-noise diagnostic (Liu et al., ICLR 2025: a deterministic white box where the attacker
knows the defense's noise seed).

The defense is reseeded to the same seed before every forward of the inner attack and before
the scoring draw (the runner scores it with that one pinned draw, counted for all K), so its
row measures how much of the robustness is the randomness itself. ``diagnostic = True``: the
leaderboard never counts it in the worst case over attacks, because it is not an attack on the
deployed (freshly random) defense.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_int
from attacks.eot import WrappedAttack
from benchmark.api.attack import AttackResult, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


def pinned(defense: nn.Module, seed: int) -> Forward:
    """``defense`` with its noise stream reset to ``seed`` before every call."""
    reseed = getattr(defense, "reseed", None)
    if not callable(reseed):
        raise TypeError(f"{type(defense).__name__} has no reseed(seed): its noise cannot be "
                        "fixed")

    def forward(x: Tensor) -> Tensor:
        reseed(seed)
        out: Tensor = defense(x)
        return out

    return forward


@register_attack("fixed-noise")
class FixedNoise(WrappedAttack):
    """Diagnostic: an inner attack (any attack with a ``forward`` hook, default ``pgd``) against
    the defense with its noise pinned to ``seed``; see the module docstring.

    ``pinned_seed`` tells the runner to score the result with the same pinned draw.
    """

    name: ClassVar[str] = "fixed-noise"
    diagnostic: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier", "stochastic"})

    def __init__(self, *, attack: str = "pgd", seed: int = 0, **inner_params: Any) -> None:
        check_int(seed, "seed", low=0)
        if "forward" in inner_params:
            raise TypeError("fixed-noise sets the inner attack's forward hook itself; "
                            "do not pass one")
        self.seed = seed
        self._build_inner(attack, "forward", lambda d: pinned(d, seed), inner_params)
        draws = getattr(self._inner, "eot_draws", 1)
        if draws != 1:
            # copies stacked along the batch would see other rows of the pinned noise than the
            # scoring draw does, and averaging draws of one fixed noise is not a diagnostic
            raise ValueError(f"fixed-noise pins one draw: the inner attack needs eot_draws=1, "
                             f"got {draws!r}")

    @property
    def pinned_seed(self) -> int:
        return self.seed

    def config(self) -> dict[str, Any]:
        return {"attack": self.attack, "seed": self.seed, **self.inner_params}

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        return super().incompatibility(defense, threat) or self._inner.incompatibility(
            defense, threat)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        result = self._inner.run(defense, x, y, threat, generator=generator)
        result.extras["fixed_noise_seed"] = self.seed
        result.extras["diagnostic"] = True
        return result
