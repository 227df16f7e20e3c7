"""Machinery shared by the gradient attacks: one ascent loop, one best-iterate tracker, the
per-step updates, a curve recorder, and the argument checks every attack uses.

Modelled on Foolbox's ``gradient_descent_base.py``: one loop, the geometry supplied from
outside. :func:`ascend` runs

    value, success = objective(p)            # per sample, (B,) and (B,) bool or None
    g = d sum(value) / dp                    # d -sum(value) / dp for a minimizing optimizer
    best.update(p, value, success); observe(step, value, g)
    p = update(p, nan_to_num(g))             # under no_grad

``steps`` times and evaluates the final iterate once more. The update is the threat model's
steepest-ascent step (:func:`threat_update`: PGD, flow PGD) or an optimizer step followed by a
projection (:func:`optimizer_update`: StAdv's and the likelihood attacks' Adam).

Threat models share the per-sample broadcast :func:`benchmark.api.threat.bcast` with the attacks:
it lives in the contract layer because ``threat_models/`` must not import ``attacks/``.

(A private module: it registers no attack, so the plug-in registry never lists it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, Literal, overload

import torch
from torch import Tensor

from benchmark.api.threat import ThreatModel, bcast

__all__ = [
    "Curve",
    "KeepBest",
    "LossCurve",
    "Objective",
    "Update",
    "ascend",
    "check_bool",
    "check_choice",
    "check_int",
    "check_positive_int",
    "check_real",
    "optimizer_update",
    "threat_update",
]

#: ``objective(p) -> (value, success)``: the per-sample score (B,) and success flags (B,) bool,
#: or ``None`` for an attack without a notion of success.
Objective = Callable[[Tensor], tuple[Tensor, "Tensor | None"]]
#: ``update(p, grad) -> p``: one step from iterate ``p`` given the sanitized gradient.
Update = Callable[[Tensor, Tensor], Tensor]
#: ``observe(step, value, grad)``: called once per evaluation (``grad`` is ``None`` at the
#: final evaluation, and holds the raw, unsanitized gradient otherwise).
Observer = Callable[[int, Tensor, "Tensor | None"], None]


# --------------------------------------------------------------------------------------------
# Argument checks: every message names the parameter, the bad value and what was expected
# --------------------------------------------------------------------------------------------
def check_int(value: object, name: str, *, low: int) -> int:
    """``value`` as an int >= ``low``; a bool is not an int here. ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1, or a ValueError naming the bad value."""
    return check_int(value, name, low=1)


def _bound_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    lo, hi = math.isfinite(low), math.isfinite(high)
    if lo and hi:
        return (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    if lo:
        return f"{'>' if low_open else '>='} {low:g}"
    if hi:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


@overload
def check_real(value: object, name: str, *, low: float = ..., high: float = ...,
               low_open: bool = ..., high_open: bool = ..., expected: str | None = ...,
               none_ok: Literal[False] = ...) -> float: ...


@overload
def check_real(value: object, name: str, *, low: float = ..., high: float = ...,
               low_open: bool = ..., high_open: bool = ..., expected: str | None = ...,
               none_ok: bool) -> float | None: ...


def check_real(value: object, name: str, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False, expected: str | None = None,
               none_ok: bool = False) -> float | None:
    """``value`` as a finite float within the bounds (``low_open`` / ``high_open`` exclude the
    bound itself), or ``None`` when ``none_ok`` and ``value is None``.

    A bool or a non-number is a TypeError; NaN, an infinity or a value out of bounds a
    ValueError, ``"{name} must be {expected}, got {value!r}"``. ``expected`` defaults to
    "a finite number" and the bounds ("a finite number > 0", "... in (0, 1]"), with " or None"
    appended when ``none_ok``.
    """
    if expected is None:
        bound = _bound_text(low, high, low_open, high_open)
        expected = "a finite number" + (f" {bound}" if bound else "")
        if none_ok:
            expected += " or None"
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number ({expected}), got {value!r} "
                        f"({type(value).__name__})")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0, 1 or a string); ValueError otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Collection[Any], *, note: str = "") -> Any:
    """``value`` if it is one of ``choices``; otherwise a ValueError listing them (``note``, if
    given, follows the list, e.g. what the choice means)."""
    options = tuple(choices)
    # a bool matches only a bool (True == 1); values are compared, so lists are fine too
    if not any(isinstance(value, bool) == isinstance(c, bool) and value == c for c in options):
        listed = ", ".join(repr(c) for c in options)
        raise ValueError(f"{name} must be one of {listed}{f' ({note})' if note else ''}, "
                         f"got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Best iterate
# --------------------------------------------------------------------------------------------
class KeepBest:
    """The best parameter seen so far, per sample.

    Ranking: with ``track_success``, a successful iterate beats a failed one (``success``
    records whether *any* iterate succeeded so far); otherwise, and between equals, the higher
    score wins (the lower one with ``maximize=False``); the first of equal scores is kept. NaN
    scores never win. With ``finite`` (the default) no non-finite score wins at all, and a
    success with a non-finite score does not count; ``finite=False`` is PGD's and StAdv's
    historical rule, where +-inf compares like any number (their losses are finite
    whenever they succeed: :func:`attacks.eot.evaluate_draws`).

    Scores are compared in ``dtype`` (float64 by default; PGD and StAdv pass the default
    dtype, as they always have: for float32 losses either gives the same ranking).
    """

    def __init__(self, p0: Tensor, *, maximize: bool = True, track_success: bool = False,
                 finite: bool = True, dtype: torch.dtype = torch.float64) -> None:
        b = p0.shape[0]
        self.maximize, self.track_success, self.finite = maximize, track_success, finite
        self.params = p0.detach().clone()
        worst = float("-inf") if maximize else float("inf")
        self.score = torch.full((b,), worst, dtype=dtype, device=p0.device)
        self.success = torch.zeros(b, dtype=torch.bool, device=p0.device)
        #: with ``track_success``: per sample, the index of the first offered iterate that
        #: succeeded (counting every ``update`` call, restarts included), -1 while none has.
        self.first = torch.full((b,), -1, dtype=torch.long, device=p0.device)
        self.offered = 0

    def skip(self) -> None:
        """Count an iterate that was not evaluated (``first`` indices stay the iterate's
        index: an attack that never evaluates its start skips evaluation 0)."""
        self.offered += 1

    def update(self, p: Tensor, score: Tensor, success: Tensor | None = None) -> Tensor:
        """Offer iterate ``p`` with per-sample ``score`` (and ``success`` flags, required with
        ``track_success``); returns the mask of samples whose best changed."""
        s = score.detach().to(self.score.dtype)
        gain = s > self.score if self.maximize else s < self.score
        ok = torch.isfinite(s) if self.finite else None
        if ok is not None:
            gain = ok & gain
        if self.track_success:
            if success is None:
                raise ValueError("this KeepBest tracks success: update() needs success flags")
            won = success if ok is None else success & ok
            better = (won & ~self.success) | ((won == self.success) & gain)
            self.first = torch.where(won & ~self.success,
                                     torch.full_like(self.first, self.offered), self.first)
            self.success = self.success | won
        else:
            better = gain
        self.params = torch.where(bcast(better, p), p.detach(), self.params)
        self.score = torch.where(better, s, self.score)
        self.offered += 1
        return better


# --------------------------------------------------------------------------------------------
# Curve of the objective
# --------------------------------------------------------------------------------------------
class Curve:
    """An observer for :func:`ascend` that records the objective at every ``record_every``-th
    evaluation and at the last one (``steps``): ``stack()`` is (R, B) float32 on the CPU and
    ``steps_at`` the evaluation indices."""

    def __init__(self, steps: int, record_every: int) -> None:
        self.steps, self.record_every = steps, record_every
        self.rows: list[Tensor] = []
        self.steps_at: list[int] = []

    def __call__(self, step: int, value: Tensor, grad: Tensor | None = None) -> None:
        if step % self.record_every == 0 or step == self.steps:
            self.rows.append(value.detach().float().cpu())
            self.steps_at.append(step)

    def stack(self) -> Tensor:
        return torch.stack(self.rows)


class LossCurve:
    """An observer for :func:`ascend` that keeps every evaluation's per-sample objective (over
    every restart it observes, in order) and reports it as ``evidence["loss_curve"]``:
    consecutive evaluations averaged into at most ``bins`` bins (a mean, not a subsample, so
    a stochastic objective's curve is smoothed rather than aliased)."""

    def __init__(self, bins: int = 50) -> None:
        self.bins = check_positive_int(bins, "bins")
        self.rows: list[Tensor] = []

    def __call__(self, step: int, value: Tensor, grad: Tensor | None = None) -> None:
        self.rows.append(value.detach().double().cpu())

    def binned(self) -> Tensor:
        """(B, R) float32: the binned curve (R = min(bins, evaluations)); empty before any
        evaluation."""
        if not self.rows:
            return torch.zeros(0, 0)
        curve = torch.stack(self.rows, dim=1)  # (B, evaluations)
        parts = torch.tensor_split(curve, min(self.bins, curve.shape[1]), dim=1)
        return torch.stack([p.mean(dim=1) for p in parts], dim=1).float()


# --------------------------------------------------------------------------------------------
# Updates and the loop
# --------------------------------------------------------------------------------------------
def threat_update(threat: ThreatModel, x: Tensor, step_size: float) -> Update:
    """The threat model's projected steepest-ascent step: ``project(x, p + step * ascent(g))``
    (signed steps for l-inf, normalized ones for l2, flow steps for StAdv)."""

    def update(p: Tensor, grad: Tensor) -> Tensor:
        return threat.project(x, p.detach() + step_size * threat.ascent(grad))

    return update


def optimizer_update(optimizer: torch.optim.Optimizer, leaf: Tensor,
                     project: Callable[[Tensor], Tensor]) -> Update:
    """An optimizer step on ``leaf`` (the tensor ``optimizer`` holds) followed by an in-place
    projection; for :func:`ascend` with ``descent=True`` (the optimizer minimizes)."""

    def update(p: Tensor, grad: Tensor) -> Tensor:
        leaf.grad = grad
        optimizer.step()
        leaf.copy_(project(leaf))
        return leaf

    return update


def ascend(objective: Objective, p: Tensor, update: Update, *, steps: int, best: KeepBest,
           descent: bool = False, observe: Observer | None = None) -> Tensor:
    """``steps`` gradient steps on ``objective`` from ``p``, every evaluated iterate offered to
    ``best``; returns the last iterate (see the module docstring for one step).

    The gradient is taken with respect to a fresh leaf holding ``p``'s values (never into the
    defense's parameters); non-finite entries are zeroed before ``update``. The final iterate is
    evaluated without a graph. ``descent=True`` passes the gradient of ``-sum(value)``, for an
    optimizer that minimizes (Adam).
    """
    for step in range(steps):
        q = p.detach().requires_grad_(True)
        with torch.enable_grad():
            value, success = objective(q)
            total = value.sum()
            (grad,) = torch.autograd.grad(-total if descent else total, q)
        best.update(q, value, success)
        if observe is not None:
            observe(step, value, grad)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            p = update(p, grad)
    with torch.no_grad():
        value, success = objective(p)
    best.update(p, value, success)
    if observe is not None:
        observe(steps, value, None)
    return p
