"""Per-sample attack losses on logits, all to be *maximized* by an untargeted attack.

Each loss maps ``(logits (B, C), labels (B,))`` to a per-sample tensor of shape (B,):

* ``ce``: cross-entropy of the true class;
* ``margin``: Carlini & Wagner's margin ``max_{j != y} z_j - z_y`` (kappa = inf), positive
  exactly when the sample is misclassified;
* ``dlr``: Croce & Hein's difference-of-logits ratio
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``, invariant to shifting and scaling the
  logits; it needs at least 3 classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

Loss = Callable[[Tensor, Tensor], Tensor]

#: Keeps the DLR ratio finite when the top logits tie (same constant as Croce & Hein).
_DLR_TINY = 1e-12


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return true, others.amax(dim=1)


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the true class, per sample."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y`` per sample (> 0 means misclassified)."""
    true, other = _true_and_best_other(logits, y)
    return other - true


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR loss per sample; raises for fewer than 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the dlr loss needs at least 3 classes, got {logits.shape[1]}")
    true, other = _true_and_best_other(logits, y)
    top = logits.topk(3, dim=1).values
    return (other - true) / (top[:, 0] - top[:, 2] + _DLR_TINY)


LOSSES: dict[str, Loss] = {"ce": ce, "margin": margin, "dlr": dlr}


def get_loss(name: str) -> Loss:
    """The loss called ``name``; a ValueError names the bad value and the choices."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}"
        ) from None


__all__ = ["LOSSES", "Loss", "ce", "dlr", "get_loss", "margin"]
