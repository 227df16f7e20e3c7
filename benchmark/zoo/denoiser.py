"""The denoiser interface every diffusion defense uses, whatever the noise schedule.

A :class:`Denoiser` predicts the noise eps of x_t = a x0 + s eps from the variance-normalized
input z = x_t / sqrt(a^2 + s^2) and the per-sample log-SNR lambda = log(a^2 / s^2). These two
determine the posterior over x0 whatever the schedule (z is the VP process a' x0 + s' eps with
a'^2 = sigmoid(lambda), s'^2 = sigmoid(-lambda) and the same eps), so one network, or one
analytic model, serves DDPM, VP, subVP and EDM alike. Subclasses implement only
:meth:`Denoiser.eps_normalized`; the base class turns it into

* ``eps(x_t, t, y, schedule=...)``: E[eps | x_t] (the network output);
* ``x0_hat(...)`` = (x_t - s eps) / a: the one-step estimate of x0 (Tweedie);
* ``score(...)`` = -eps / s = grad log p_t(x_t);
* ``pf_ode_drift(...)`` = f x - g^2 score / 2 and ``reverse_sde_drift(...)`` = f x - g^2 score
  (SDE schedules only).

Conventions: x_t, x0 live in model space [-1, 1] (:func:`to_model_space` maps images in
[0, 1]); ``t`` is a scalar or one value per sample in the schedule's own units (see
:mod:`benchmark.zoo.schedules`); ``y`` is an int64 tensor of shape (B,) (or an int), and
``y=None`` asks for the unconditional prediction (a learned network maps it to the null class
index ``num_classes``, see :meth:`Denoiser.labels_or_null`).

``nfe`` counts network evaluations on batches: every call of :meth:`Denoiser.eps` (and so of
``x0_hat``, ``score`` and the drifts) adds 1, whatever the batch size. Calling the module
directly (``forward``, the training path) is not counted.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from benchmark.zoo.schedules import Schedule, SDESchedule, TimeLike, get_schedule

__all__ = ["Denoiser", "ScheduleLike", "from_model_space", "to_model_space"]

ScheduleLike = Schedule | str
LabelLike = Tensor | int | None


def to_model_space(img01: Tensor) -> Tensor:
    """Images in [0, 1] -> model space [-1, 1] (2 x - 1)."""
    return img01 * 2.0 - 1.0


def from_model_space(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> images in [0, 1] ((x + 1) / 2, no clipping)."""
    return (x + 1.0) / 2.0


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A (B,) tensor viewed as (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """Base class: an eps-prediction network conditioned on log-SNR (see the module docstring).

    Class attributes (a subclass or an instance may override them):

    * ``num_classes``: number of classes; labels are 0..num_classes-1 (0 when unconditional);
    * ``conditional``: whether labels ``y`` are accepted (``y`` given to an unconditional
      denoiser raises ``ValueError``);
    * ``data_range``: the model space, (-1, 1).
    """

    num_classes: int = 0
    conditional: bool = False
    data_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    to_model_space = staticmethod(to_model_space)
    from_model_space = staticmethod(from_model_space)

    def __init__(self) -> None:
        super().__init__()
        #: batched network evaluations so far (see the module docstring).
        self.nfe = 0

    # -- what subclasses implement ---------------------------------------------------------
    def eps_normalized(self, z: Tensor, log_snr: Tensor, y: Tensor | None) -> Tensor:
        """E[eps | z] for z = x_t / sqrt(a^2 + s^2), shaped like ``z``.

        ``log_snr`` has shape (B,); ``y`` is None (unconditional) or an int64 tensor (B,) of
        labels already checked to lie in [0, num_classes).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement eps_normalized")

    def forward(self, z: Tensor, log_snr: Tensor, y: Tensor | None = None) -> Tensor:
        """The raw network call (training path): :meth:`eps_normalized`, not counted in nfe."""
        return self.eps_normalized(z, log_snr, y)

    # -- helpers -----------------------------------------------------------------------------
    def reset_nfe(self) -> int:
        """Set ``nfe`` to 0 and return its previous value."""
        n, self.nfe = self.nfe, 0
        return n

    def check_labels(self, y: LabelLike, batch: int, device: torch.device) -> Tensor | None:
        """``y`` as an int64 tensor (B,) on ``device`` (an int is broadcast), or None."""
        if y is None:
            return None
        if not self.conditional:
            raise ValueError(f"{type(self).__name__} is not class-conditional, but labels y "
                             f"were given; call it with y=None")
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels y must be an integer tensor, got dtype {y.dtype}")
        y = y.long()
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"labels y must have shape ({batch},), got {tuple(y.shape)}")
        bad = (y < 0) | (y >= self.num_classes)
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}): "
                             f"{sorted(set(y[bad].tolist()))}")
        return y

    def labels_or_null(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Labels for an embedding table with a null row: ``y``, or ``num_classes`` for None."""
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return y

    @staticmethod
    def time_tensor(x_t: Tensor, t: TimeLike) -> Tensor:
        """``t`` as a (B,) floating tensor on ``x_t``'s device, in ``x_t``'s dtype or float32
        if that is narrower (so DDPM indices stay exact integers)."""
        batch = x_t.shape[0]
        if isinstance(t, bool) or (isinstance(t, Tensor) and t.dtype == torch.bool):
            raise ValueError(f"time t must be a number or a numeric tensor, got {t!r}")
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        if isinstance(t, Tensor):
            t = t.to(device=x_t.device, dtype=dtype)
        else:
            t = torch.tensor(float(t), dtype=dtype, device=x_t.device)
        if t.numel() == 1:
            t = t.reshape(()).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"time t must be a scalar or have shape ({batch},), "
                             f"got {tuple(t.shape)}")
        return t

    def coefficients(self, x_t: Tensor, t: TimeLike, *, schedule: ScheduleLike,
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """(a, s, log_snr) of ``schedule`` at ``t``, each of shape (B,) in ``x_t``'s dtype."""
        sched = get_schedule(schedule)
        tt = self.time_tensor(x_t, t)
        a, s = sched.alpha_sigma(tt)
        lam = sched.log_snr(tt)
        return a.to(x_t.dtype), s.to(x_t.dtype), lam.to(x_t.dtype)

    # -- the interface the defenses use ------------------------------------------------------
    def eps(self, x_t: Tensor, t: TimeLike, y: LabelLike = None, *,
            schedule: ScheduleLike) -> Tensor:
        """E[eps | x_t, y]: the noise prediction at time ``t`` of ``schedule`` (counts 1 NFE)."""
        a, s, lam = self.coefficients(x_t, t, schedule=schedule)
        labels = self.check_labels(y, x_t.shape[0], x_t.device)
        z = x_t / _per_sample(torch.sqrt(a * a + s * s), x_t)
        out = self(z, lam, labels)  # through __call__, so module hooks (NFE counters) see it
        self.nfe += 1
        if out.shape != x_t.shape:
            raise RuntimeError(f"{type(self).__name__}.eps_normalized returned shape "
                               f"{tuple(out.shape)} for input shape {tuple(x_t.shape)}")
        return out

    def x0_hat(self, x_t: Tensor, t: TimeLike, y: LabelLike = None, *,
               schedule: ScheduleLike) -> Tensor:
        """E[x0 | x_t, y] = (x_t - s eps) / a (Tweedie's formula)."""
        a, s, _ = self.coefficients(x_t, t, schedule=schedule)
        eps = self.eps(x_t, t, y, schedule=schedule)
        return (x_t - _per_sample(s, x_t) * eps) / _per_sample(a, x_t)

    def score(self, x_t: Tensor, t: TimeLike, y: LabelLike = None, *,
              schedule: ScheduleLike) -> Tensor:
        """grad_x log p_t(x_t | y) = -eps / s (any schedule; s must be > 0)."""
        _, s, _ = self.coefficients(x_t, t, schedule=schedule)
        if not bool((s > 0).all()):
            raise ValueError("the score is undefined where s(t) = 0 (no noise); "
                             "use a time inside the schedule's range")
        return -self.eps(x_t, t, y, schedule=schedule) / _per_sample(s, x_t)

    def _sde(self, schedule: ScheduleLike, what: str) -> SDESchedule:
        sched = get_schedule(schedule)
        if not isinstance(sched, SDESchedule):
            raise ValueError(f"{what} needs an SDE schedule (vp, subvp, edm), but schedule "
                             f"{sched.name!r} is discrete; use 'vp', its continuous limit")
        return sched

    def pf_ode_drift(self, x: Tensor, t: TimeLike, y: LabelLike = None, *,
                     schedule: ScheduleLike) -> Tensor:
        """Probability-flow ODE drift dx/dt = f(t) x - g(t)^2 score / 2 (SDE schedules only)."""
        sched = self._sde(schedule, "pf_ode_drift")
        return self._drift(x, t, y, sched, 0.5)

    def reverse_sde_drift(self, x: Tensor, t: TimeLike, y: LabelLike = None, *,
                          schedule: ScheduleLike) -> Tensor:
        """Drift of the reverse-time SDE, f(t) x - g(t)^2 score (its diffusion is g(t) dW)."""
        sched = self._sde(schedule, "reverse_sde_drift")
        return self._drift(x, t, y, sched, 1.0)

    def _drift(self, x: Tensor, t: TimeLike, y: LabelLike, sched: SDESchedule,
               weight: float) -> Tensor:
        score = self.score(x, t, y, schedule=sched)
        tt = self.time_tensor(x, t)
        f = _per_sample(sched.drift_coef(tt).to(x.dtype), x)
        g2 = _per_sample(sched.diffusion_sq(tt).to(x.dtype), x)
        return f * x - weight * g2 * score
