"""The threat-model contract: a perturbation *parameter space*, not only an epsilon.

An attack written against this interface (PGD, APGD, EOT, BPDA) works under every threat model:

* ``init(x, generator, random=...)`` gives a starting parameter (zero or random start);
* ``apply(x, p)`` maps the parameter to an adversarial image in the pixel box [0, 1];
* ``project(x, p)`` maps any parameter back into the feasible set;
* ``ascent(g)`` is the steepest-ascent direction of a gradient in this geometry (sign for
  l-inf, normalized gradient for l2);
* ``check(x, x_adv, params)`` returns a :class:`Violation` or ``None``; the harness re-checks
  every returned adversarial example, and a violation is an error row, never a robust point;
* ``distance(x, x_adv, params)`` is the per-sample size of the perturbation.

Images are NCHW float32 in [0, 1].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

#: Slack for float32 round-off when re-checking a perturbation against its budget.
CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class Violation:
    """Which samples broke the threat model, and why.

    ``per_sample[i]`` is the reason sample ``i`` violates (``None`` where it does not);
    ``mask`` is the corresponding boolean tensor.
    """

    mask: Tensor  # bool, shape (B,)
    per_sample: tuple[str | None, ...]

    @classmethod
    def from_reasons(cls, reasons: dict[int, str], batch: int, device: torch.device
                     ) -> Violation:
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        if reasons:
            mask[list(reasons)] = True
        return cls(mask=mask, per_sample=tuple(reasons.get(i) for i in range(batch)))

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(r for r in self.per_sample if r is not None)

    def __str__(self) -> str:
        n = int(self.mask.sum())
        head = "; ".join(self.reasons[:3])
        return f"{n} sample(s) violate the threat model: {head}"


def validate_eps(eps: object, *, name: str = "eps", allow_zero: bool = False) -> float:
    """Return ``eps`` as a float, or raise naming the bad value and what was expected."""
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"{name} must be a real number, got {eps!r} ({type(eps).__name__})")
    value = float(eps)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {eps!r}")
    return value


def _per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample values ``v`` (B,) as (B, 1, ..., 1), to broadcast against ``like`` (B, ...).

    Shared by the threat models and the attacks (it lives here, in the contract layer, because
    threat models must not import ``attacks/``). A view of ``v`` when ``v`` is contiguous.
    """
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class ThreatModel(ABC):
    """Base class. Subclasses set ``name`` and implement the parameter space."""

    name: ClassVar[str]
    #: whether ``check`` needs the attack's parameter (StAdv: the flow field) to verify x_adv.
    needs_params: ClassVar[bool] = False

    def __init__(self, eps: float) -> None:
        self.eps = validate_eps(eps)

    # -- the parameter space -------------------------------------------------------------
    @abstractmethod
    def init(self, x: Tensor, generator: torch.Generator | None = None, *, random: bool = False
             ) -> Tensor: ...

    @abstractmethod
    def apply(self, x: Tensor, p: Tensor) -> Tensor: ...

    @abstractmethod
    def project(self, x: Tensor, p: Tensor) -> Tensor: ...

    @abstractmethod
    def ascent(self, g: Tensor) -> Tensor:
        """Unit steepest-ascent direction of gradient ``g`` in this geometry."""

    @abstractmethod
    def distance(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Tensor: ...

    def default_step(self, steps: int) -> float:
        """Madry et al.'s step: 2.5 * eps / steps (reaches the boundary from any start)."""
        return 2.5 * self.eps / max(int(steps), 1)

    # -- verification --------------------------------------------------------------------
    def _base_violations(self, x: Tensor, x_adv: Tensor) -> dict[int, str]:
        """Reasons (by sample index) for non-finite values and pixels outside [0, 1]."""
        if x_adv.shape != x.shape:
            raise ValueError(f"x_adv has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
        flat = _per_sample(x_adv)
        bad = ~torch.isfinite(flat).all(dim=1)
        reasons = {i: "non-finite values" for i in bad.nonzero().flatten().tolist()}
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        box = ((lo < -CHECK_ATOL) | (hi > 1 + CHECK_ATOL)) & ~bad
        for i in box.nonzero().flatten().tolist():
            reasons[i] = f"outside the pixel box [0,1] (min {lo[i]:.4g}, max {hi[i]:.4g})"
        return reasons

    def violations(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Violation:
        """Per-sample check; ``mask`` is all-False when everything is within the budget."""
        reasons = self._base_violations(x, x_adv)
        if len(reasons) < len(x):
            dist = self.distance(x, x_adv, params)
            over = ~(dist <= self.eps * (1 + 1e-4) + CHECK_ATOL)
            for i in over.nonzero().flatten().tolist():
                reasons.setdefault(i, f"{self.name} distance {dist[i]:.6g} > eps {self.eps:.6g}")
        return Violation.from_reasons(reasons, len(x), x.device)

    def check(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Violation | None:
        v = self.violations(x, x_adv, params)
        return v if bool(v.mask.any()) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g})"


class AdditiveThreatModel(ThreatModel):
    """Shared machinery for l-p balls where the parameter is an additive delta."""

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        return (x + p).clamp(0.0, 1.0)

    def distance(self, x: Tensor, x_adv: Tensor, params: Tensor | None = None) -> Tensor:
        return self._norm(_per_sample(x_adv - x))

    @abstractmethod
    def _norm(self, flat: Tensor) -> Tensor: ...

    def project(self, x: Tensor, p: Tensor) -> Tensor:
        p = self._project_ball(p)
        # Clamping x + p into the box moves each coordinate toward x, so it stays in the ball.
        return (x + p).clamp(0.0, 1.0) - x

    @abstractmethod
    def _project_ball(self, p: Tensor) -> Tensor: ...
