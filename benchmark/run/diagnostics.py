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

#: the clean job's diagnostic budget: this many input gradients of the defense. A
#: deterministic defense returns the same gradient on every pass (checked on forward passes
#: before, :meth:`benchmark.spec.jobs.JobSpec.settle_randomness`), so it gets one gradient on
#: each of DIAG_SAMPLES samples; a stochastic one gets DIAG_REPEATS per sample on
#: DIAG_GRADIENTS // DIAG_REPEATS samples, whose pairwise cosines measure how random its
#: gradients are. Each gradient costs a full exact gradient of the defense (RDC, T' = 10: 2.5 s
#: on one core; 16 of them were a third of RDC's automatic probes on quick). Four cosines tell the
#: digits' stochastic defenses from the 0.9 threshold: per-sample cosines on the first 8
#: quick digits, two seeds, DC 0.52-0.93, RDC v1 0.35-0.80, DiffPure 0.28-0.85; the mean of
#: the first 4 within 0.06 of the mean of 8 and at most 0.73 (quick's T' and dt).
DIAG_GRADIENTS = 8
DIAG_REPEATS = 2
#: samples of a deterministic defense's gradients and of its prediction-instability probe.
DIAG_SAMPLES = DIAG_GRADIENTS
#: an input-gradient l2 norm above this (inputs in [0, 1]) is "exploding".
EXPLODING_NORM = 1e4
#: the unstable-predictions probe: uniform noise of this width (Pintor et al.'s 8/255) and
#: this many draws per sample.
INSTABILITY_RADIUS = 8 / 255
INSTABILITY_DRAWS = 8


@dataclass(frozen=True)
class GradientDiagnostics:
    n: int
    repeats: int
    #: fractions of per-sample gradients that are exactly zero / non-finite / exploding.
    zero_frac: float
    nonfinite_frac: float
    exploding_frac: float
    #: mean pairwise cosine similarity of repeated gradients of the same input (nan when
    #: they are all zero, or with one repeat); 1 for a deterministic defense.
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


def prediction_instability(defense: nn.Module, x: Tensor, y: Tensor, *,
                           radius: float = INSTABILITY_RADIUS, draws: int = INSTABILITY_DRAWS,
                           seed: int = 0) -> float:
    """Pintor et al. (2022)'s unstable-predictions indicator on clean ``x``: the mean, over
    samples and ``draws`` uniform perturbations of width ``radius`` (each pixel moved by up to
    ``radius / 2``, the image kept in [0, 1]), of the relative change of the margin (true logit
    minus the largest other), |m(x + u) - m(x)| / |m(x)| (divided by 1 where m(x) = 0),
    capped at 1. Pintor et al. use the loss; the margin is used here because a confident
    model's cross-entropy is near 0, where any relative change is large. Non-finite outputs
    count as 1. One batched forward of ``draws + 1`` copies; meant for deterministic defenses
    (a stochastic one changes its margin with every draw)."""
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    x = x.detach()
    noise = (torch.rand((draws, *x.shape), generator=g, device=x.device) - 0.5) * radius
    batch = torch.cat([x[None], (x[None] + noise).clamp(0, 1)]).reshape(-1, *x.shape[1:])
    with torch.no_grad():
        logits = defense(batch).double().reshape(draws + 1, len(x), -1)
    true = logits.gather(2, y.view(1, -1, 1).expand(draws + 1, -1, 1)).squeeze(2)
    other = logits.scatter(2, y.view(1, -1, 1).expand(draws + 1, -1, 1),
                           float("-inf")).amax(dim=2)
    margin = true - other
    ref = margin[0].abs()
    ref = torch.where(ref > 0, ref, torch.ones_like(ref))
    change = ((margin[1:] - margin[0]).abs() / ref).clamp(max=1.0)
    change = torch.where(torch.isfinite(change), change, torch.ones_like(change))
    return float(change.mean())


def safe_diagnostics(defense: nn.Module, x: Tensor, y: Tensor, *,
                     stochastic: bool = False) -> dict[str, Any]:
    """:func:`gradient_diagnostics` on the first samples as a JSON dict (``DIAG_GRADIENTS``
    gradients: one per sample of a deterministic defense, ``DIAG_REPEATS`` per sample of a
    stochastic one), with :func:`prediction_instability` (``instability``) where the defense
    is deterministic; a defense that raises under autograd is reported, never fatal (its clean
    scores stand)."""
    repeats = DIAG_REPEATS if stochastic else 1
    xs, ys = x[:DIAG_GRADIENTS // repeats], y[:DIAG_GRADIENTS // repeats]
    try:
        out = gradient_diagnostics(defense, xs, ys, repeats=repeats).to_json()
        if not stochastic:  # on the same DIAG_SAMPLES samples
            out["instability"] = prediction_instability(defense, xs, ys)
        return out
    except Exception as exc:  # diagnostics must never fail the clean job
        return {"error": f"{type(exc).__name__}: {exc}"}
