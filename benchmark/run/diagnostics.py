"""Gradient diagnostics of a defense on a few clean samples (validity flags, docs/design.md 4.5).

Input gradients of the cross-entropy loss, computed ``repeats`` times per sample in one batched
backward pass. A deterministic defense returns the same gradient every time; a stochastic one
returns a different gradient per draw, and their mean pairwise cosine similarity says how much
an attack without EOT is steering by noise (RDC, Chen et al. 2024, fig. 2c). Gradients that are
exactly zero, non-finite or huge, or an output that does not depend on the input through
autograd at all (a detached forward), are the classic gradient-masking symptoms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: samples and repeated gradients per sample that the clean job diagnoses.
DIAG_SAMPLES = 8
DIAG_REPEATS = 4
#: an input-gradient l2 norm above this (inputs in [0, 1]) is "exploding".
EXPLODING_NORM = 1e4


@dataclass(frozen=True)
class GradientDiagnostics:
    n: int
    repeats: int
    #: fractions of per-sample gradients that are exactly zero / non-finite / exploding.
    zero_frac: float
    nonfinite_frac: float
    exploding_frac: float
    #: mean pairwise cosine similarity of repeated gradients of the same input (nan when
    #: they are all zero); 1 for a deterministic defense.
    cosine: float
    #: the output does not depend on the input through autograd.
    detached: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gradient_diagnostics(defense: nn.Module, x: Tensor, y: Tensor, *,
                         repeats: int = DIAG_REPEATS) -> GradientDiagnostics:
    """Diagnose ``defense`` (a classifier returning logits) on clean ``x``, labels ``y``."""
    n = len(x)
    xr = x.detach().repeat(repeats, *[1] * (x.dim() - 1)).requires_grad_(True)
    with torch.enable_grad():
        logits = defense(xr)
        if not isinstance(logits, Tensor) or not logits.requires_grad:
            return GradientDiagnostics(n, repeats, 1.0, 0.0, 0.0, math.nan, detached=True)
        loss = F.cross_entropy(logits.float(), y.repeat(repeats), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xr, allow_unused=True)
    if grad is None:
        return GradientDiagnostics(n, repeats, 1.0, 0.0, 0.0, math.nan, detached=True)
    flat = grad.detach().double().reshape(repeats, n, -1)
    finite = torch.isfinite(flat).all(dim=2)
    clean = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    norms = clean.norm(dim=2)
    zero = finite & (norms == 0)
    exploding = finite & (norms > EXPLODING_NORM)
    total = repeats * n
    cosines = []
    for i in range(repeats):
        for j in range(i + 1, repeats):
            ok = (norms[i] > 0) & (norms[j] > 0) & finite[i] & finite[j]
            if ok.any():
                cos = F.cosine_similarity(clean[i][ok], clean[j][ok], dim=1)
                cosines.append(cos)
    cosine = float(torch.cat(cosines).mean()) if cosines else math.nan
    return GradientDiagnostics(
        n=n, repeats=repeats, zero_frac=float(zero.sum()) / total,
        nonfinite_frac=float((~finite).sum()) / total,
        exploding_frac=float(exploding.sum()) / total, cosine=cosine)


def safe_diagnostics(defense: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """:func:`gradient_diagnostics` on the first samples as a JSON dict; a defense that raises
    under autograd is reported, never fatal (its clean scores stand)."""
    try:
        return gradient_diagnostics(defense, x[:DIAG_SAMPLES], y[:DIAG_SAMPLES]).to_json()
    except Exception as exc:  # diagnostics must never fail the clean job
        return {"error": f"{type(exc).__name__}: {exc}"}
