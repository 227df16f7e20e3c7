"""Noise schedules: the forward process x_t = a(t) x0 + s(t) eps, eps ~ N(0, I).

Data x0 live in model space [-1, 1]. Every schedule exposes

* ``alpha_sigma(t) -> (a, s)`` and ``log_snr(t) = log(a^2 / s^2)`` (decreasing in t);
* ``t0``, ``t1``: the schedule's time range (ascending in noise);
* ``check_t(t)``: ``t`` as a tensor, or a ``ValueError`` naming the offending value.

The SDE schedules (:class:`SDESchedule`: ``vp``, ``subvp``, ``edm``) also give the linear SDE
dx = f(t) x dt + g(t) dW whose marginals are these: ``drift_coef(t)`` (f, so f(x, t) = f x),
``diffusion_sq(t)`` (g^2) and the log-density of the prior at ``t1`` (``prior_logp``). For all
of them the marginal variance obeys dVar/dt = 2 f Var + g^2.

=========  ====================  ================  ====================  ===================
name       time t                a(t)              s(t)                  prior at t1
=========  ====================  ================  ====================  ===================
``ddpm``   integer index 0..T-1  sqrt(alphabar_t)  sqrt(1 - alphabar_t)  (discrete)
``vp``     [t0, 1]               exp(-B(t)/2)      sqrt(1 - a^2)         N(0, I)
``subvp``  [t0, 1]               exp(-B(t)/2)      1 - a^2               N(0, I)
``edm``    sigma >= 0            1                 sigma                 N(0, sigma_max^2 I)
=========  ====================  ================  ====================  ===================

with B(t) = beta_0 t + (beta_1 - beta_0) t^2 / 2 and beta(t) = beta_0 + (beta_1 - beta_0) t
(score_sde's ``sde_lib``; DiffPure's beta(t) = 0.1 + 19.9 t is the same VP SDE). DDPM's
alphabar_t = prod_{i <= t} (1 - beta_i) with betas linear from 1e-4 to 0.02 over T = 1000
(Ho et al.), so index 0 is already slightly noisy. EDM's "time" is sigma itself (Karras et al.,
sigma(t) = t, s(t) = 1): f = 0 and g^2 = 2 sigma.

Outputs are floating tensors shaped like ``t``: ``t``'s dtype when it is floating, else torch's
default dtype (DDPM's table is computed in float64 and then cast).

>>> a, s = get_schedule("vp").alpha_sigma(torch.tensor([0.1, 0.5]))
>>> get_schedule("vpp")  # doctest: +SKIP
ValueError: unknown noise schedule 'vpp'; did you mean 'vp'? ...
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from benchmark.plugins.registry import UnknownNameError
from benchmark.plugins.suggest import did_you_mean

__all__ = [
    "DDPM",
    "EDM",
    "SCHEDULES",
    "SDESchedule",
    "Schedule",
    "SubVPSDE",
    "UnknownScheduleError",
    "VPSDE",
    "get_schedule",
]

TimeLike = Tensor | float | int

#: slack on the time range for float rounding of solver grids (values within it are clamped).
_T_SLACK = 1e-6


class UnknownScheduleError(UnknownNameError, ValueError):
    """An unknown schedule name; the message carries "did you mean" suggestions."""


def _as_float(t: TimeLike) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _describe(bad: Tensor) -> str:
    vals = bad.flatten()[:3].tolist()
    more = f" (and {bad.numel() - 3} more)" if bad.numel() > 3 else ""
    return ", ".join(repr(v) for v in vals) + more


class Schedule(ABC):
    """A forward noising process x_t = a(t) x0 + s(t) eps (see the module docstring)."""

    name: ClassVar[str]
    #: True for the continuous-time schedules that define an SDE (and hence a PF-ODE).
    is_sde: ClassVar[bool] = False
    #: True when t is an integer index (DDPM), False when t is a real number.
    discrete: ClassVar[bool] = False

    @property
    @abstractmethod
    def t0(self) -> float:
        """The least-noisy time of the schedule's range."""

    @property
    @abstractmethod
    def t1(self) -> float:
        """The noisiest time of the schedule's range."""

    @abstractmethod
    def check_t(self, t: TimeLike) -> Tensor:
        """``t`` as a tensor inside the schedule's range; ``ValueError`` naming bad values."""

    @abstractmethod
    def alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """(a(t), s(t)), each shaped like ``t``."""

    @abstractmethod
    def log_snr(self, t: TimeLike) -> Tensor:
        """log(a^2 / s^2), shaped like ``t``; +inf where s = 0."""

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The time t whose :meth:`log_snr` is ``log_snr`` (the inverse map), float64.

        Log-SNRs outside the schedule's image are clamped to its time range (the network of a
        published checkpoint was never trained outside it). Used by
        :class:`benchmark.zoo.external.EpsAdapter` to hand a network its own time input.
        """
        raise NotImplementedError(f"{type(self).__name__} has no inverse log-SNR map")


class SDESchedule(Schedule):
    """A schedule given by the linear SDE dx = f(t) x dt + g(t) dW."""

    is_sde: ClassVar[bool] = True

    @abstractmethod
    def drift_coef(self, t: TimeLike) -> Tensor:
        """f(t), with the drift f(x, t) = f(t) x."""

    @abstractmethod
    def diffusion_sq(self, t: TimeLike) -> Tensor:
        """g(t)^2."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at ``t1``."""

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) per sample (sum over all but the first dimension)."""
        flat = z.reshape(z.shape[0], -1)
        d = flat.shape[1]
        var = self.prior_std ** 2
        return -0.5 * (d * math.log(2 * math.pi * var) + flat.pow(2).sum(1) / var)


@dataclass(frozen=True)
class DDPM(Schedule):
    """Discrete DDPM (Ho et al. 2020): betas linear in [beta_start, beta_end], ``T`` steps.

    ``t`` is an integer index 0..T-1 (an int, or an integer tensor; a floating tensor must hold
    integral values). a = sqrt(alphabar_t), s = sqrt(1 - alphabar_t). Not an SDE: use
    :class:`VPSDE`, its continuous limit, for ODE/SDE methods.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    T: int = 1000
    _alphabar: Tensor = field(init=False, repr=False, compare=False)

    name: ClassVar[str] = "ddpm"
    discrete: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ValueError(f"DDPM needs T >= 1, got T={self.T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"DDPM needs 0 < beta_start <= beta_end < 1, got "
                             f"beta_start={self.beta_start}, beta_end={self.beta_end}")
        betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)
        object.__setattr__(self, "_alphabar", torch.cumprod(1.0 - betas, 0))

    @property
    def t0(self) -> float:
        return 0.0

    @property
    def t1(self) -> float:
        return float(self.T - 1)

    @property
    def alphabar(self) -> Tensor:
        """alphabar_t for t = 0..T-1 (float64, a copy)."""
        return self._alphabar.clone()

    def check_t(self, t: TimeLike) -> Tensor:
        t = torch.as_tensor(t)
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"DDPM timesteps must be integer indices, got dtype {t.dtype}")
        if t.is_floating_point():
            bad = t != torch.round(t)  # also catches NaN
            if bad.any():
                raise ValueError(f"DDPM timesteps must be integer indices, got {_describe(t[bad])}")
        bad = (t < 0) | (t > self.T - 1)
        if bad.any():
            raise ValueError(f"DDPM timestep outside [0, {self.T}): {_describe(t[bad])}")
        return t

    def _out_dtype(self, t: TimeLike) -> torch.dtype:
        t = torch.as_tensor(t)
        return t.dtype if t.is_floating_point() else torch.get_default_dtype()

    def _abar(self, t: TimeLike) -> Tensor:
        idx = self.check_t(t)
        return self._alphabar.to(idx.device)[idx.long()]

    def alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        abar, dtype = self._abar(t), self._out_dtype(t)
        return abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)

    def log_snr(self, t: TimeLike) -> Tensor:
        abar = self._abar(t)
        return (torch.log(abar) - torch.log1p(-abar)).to(self._out_dtype(t))

    #: an inverse index within this of an integer is that integer (float32 log-SNRs of integer
    #: timesteps come back as i +- 1e-4 at most; the rounding error is not a time).
    SNAP: ClassVar[float] = 1e-3

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """The fractional index i in [0, T-1] whose log-SNR is ``log_snr``: exact at the
        integers, linear in log-SNR between them, clamped at both ends (a log-SNR above index
        0's gives 0, below index T-1's gives T-1). Within :attr:`SNAP` of an integer it is
        that integer, so an integer timestep's float32 log-SNR maps back to it exactly."""
        abar = self._alphabar.to(log_snr.device)
        table = torch.log(abar) - torch.log1p(-abar)  # decreasing in i
        lam = log_snr.to(torch.float64).clamp(float(table[-1]), float(table[0]))
        neg = -table  # increasing
        hi = torch.searchsorted(neg, -lam.reshape(-1)).clamp(1, max(self.T - 1, 1))
        lo = hi - 1
        if self.T == 1:
            return torch.zeros_like(lam)
        l_lo, l_hi = table[lo], table[hi]
        frac = ((l_lo - lam.reshape(-1)) / (l_lo - l_hi)).clamp(0.0, 1.0)
        idx = (lo.to(torch.float64) + frac).reshape(lam.shape)
        near = torch.round(idx)
        return torch.where((idx - near).abs() < self.SNAP, near, idx)


@dataclass(frozen=True)
class _BetaLinearSDE(SDESchedule):
    """Shared parts of VP and subVP: beta(t) = beta_0 + (beta_1 - beta_0) t on [t0, 1]."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    eps_t: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.beta_0 <= self.beta_1:
            raise ValueError(f"{type(self).__name__} needs 0 < beta_0 <= beta_1, got "
                             f"beta_0={self.beta_0}, beta_1={self.beta_1}")
        if not 0 <= self.eps_t < 1:
            raise ValueError(f"{type(self).__name__} needs 0 <= eps_t < 1, got {self.eps_t}")

    @property
    def t0(self) -> float:
        """``eps_t`` (score_sde's likelihood start, 1e-5): s(t0) > 0, so the score is finite."""
        return self.eps_t

    @property
    def t1(self) -> float:
        return 1.0

    @property
    def prior_std(self) -> float:
        return 1.0

    def check_t(self, t: TimeLike) -> Tensor:
        t = _as_float(t)
        bad = ~((t >= self.t0 - _T_SLACK) & (t <= self.t1 + _T_SLACK))  # also catches NaN
        if bad.any():
            raise ValueError(f"{self.name} time outside [t0={self.t0:g}, t1={self.t1:g}]: "
                             f"{_describe(t[bad])}")
        return t.clamp(self.t0, self.t1)

    def beta(self, t: TimeLike) -> Tensor:
        """beta(t) = beta_0 + (beta_1 - beta_0) t."""
        t = self.check_t(t)
        return self.beta_0 + (self.beta_1 - self.beta_0) * t

    def big_b(self, t: TimeLike) -> Tensor:
        """B(t) = int_0^t beta = beta_0 t + (beta_1 - beta_0) t^2 / 2."""
        t = self.check_t(t)
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t * t

    def drift_coef(self, t: TimeLike) -> Tensor:
        return -0.5 * self.beta(t)

    def time_from_big_b(self, big_b: Tensor) -> Tensor:
        """The t in [0, 1] with B(t) = ``big_b`` (the positive root of the quadratic, in the
        form that does not cancel for small B), float64."""
        b = big_b.to(torch.float64).clamp(min=0.0)
        d = self.beta_1 - self.beta_0
        t = 2.0 * b / (self.beta_0 + torch.sqrt(self.beta_0 ** 2 + 2.0 * d * b))
        return t.clamp(0.0, 1.0)


@dataclass(frozen=True)
class VPSDE(_BetaLinearSDE):
    """Variance-preserving SDE (Song et al. 2021): a = exp(-B/2), s = sqrt(1 - a^2), g^2 = beta.

    ``t`` in [t0, 1] with t0 = ``eps_t`` (default 1e-5; set ``eps_t=0`` to allow t = 0, where
    s = 0 and log_snr = +inf). Prior N(0, I).
    """

    name: ClassVar[str] = "vp"

    def alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        b = self.big_b(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def log_snr(self, t: TimeLike) -> Tensor:
        b = self.big_b(t)
        return -b - torch.log(-torch.expm1(-b))

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """t with log_snr(t) = ``log_snr``: B = log(1 + exp(-lambda)) = softplus(-lambda),
        then t from B; clamped to [0, 1] (not to [t0, 1]: t0 only guards the score)."""
        lam = log_snr.to(torch.float64)
        return self.time_from_big_b(torch.nn.functional.softplus(-lam))

    def diffusion_sq(self, t: TimeLike) -> Tensor:
        return self.beta(t)


@dataclass(frozen=True)
class SubVPSDE(_BetaLinearSDE):
    """Sub-VP SDE (Song et al. 2021): a = exp(-B/2), s = 1 - a^2, g^2 = beta (1 - exp(-2B)).

    ``t`` in [t0, 1] with t0 = ``eps_t`` (default 1e-5). Prior N(0, I) (score_sde's
    ``prior_logp``; the true marginal at t = 1 has variance (1 - a^2)^2 + a^2 Var(x0)).
    """

    name: ClassVar[str] = "subvp"

    def alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        b = self.big_b(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def log_snr(self, t: TimeLike) -> Tensor:
        b = self.big_b(t)
        return -b - 2.0 * torch.log(-torch.expm1(-b))

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """t with log_snr(t) = ``log_snr``. With u = exp(-B), exp(lambda) = u / (1 - u)^2, whose
        root in (0, 1) is 1 - u = (1 + r) / (2 e^lambda + 1 + r), r = sqrt(4 e^lambda + 1)
        (written without cancellation); B = -log(u), then t from B. Clamped to [0, 1]."""
        lam = log_snr.to(torch.float64).clamp(-60.0, 60.0)
        e = torch.exp(lam)
        r = torch.sqrt(4.0 * e + 1.0)
        b = -torch.log1p(-(1.0 + r) / (2.0 * e + 1.0 + r))
        return self.time_from_big_b(b)

    def diffusion_sq(self, t: TimeLike) -> Tensor:
        return self.beta(t) * -torch.expm1(-2.0 * self.big_b(t))


@dataclass(frozen=True)
class EDM(SDESchedule):
    """EDM (Karras et al. 2022) with sigma(t) = t: a = 1, s = sigma, f = 0, g^2 = 2 sigma.

    ``t`` is sigma: any finite sigma >= 0 is accepted (sigma = 0 gives s = 0 and log_snr =
    +inf); [sigma_min, sigma_max] = [t0, t1] is the sampling / ODE range. Prior
    N(0, sigma_max^2 I). The PF-ODE is Karras' dx/dsigma = -sigma * score.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    name: ClassVar[str] = "edm"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    @property
    def t0(self) -> float:
        return self.sigma_min

    @property
    def t1(self) -> float:
        return self.sigma_max

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def check_t(self, t: TimeLike) -> Tensor:
        t = _as_float(t)
        bad = ~((t >= 0) & torch.isfinite(t))
        if bad.any():
            raise ValueError(f"EDM sigma must be finite and >= 0, got {_describe(t[bad])}")
        return t

    def alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        sigma = self.check_t(t)
        return torch.ones_like(sigma), sigma

    def log_snr(self, t: TimeLike) -> Tensor:
        return -2.0 * torch.log(self.check_t(t))

    def time_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """sigma = exp(-lambda / 2) (any sigma >= 0: EDM's time is not clamped)."""
        return torch.exp(-0.5 * log_snr.to(torch.float64))

    def drift_coef(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(self.check_t(t))

    def diffusion_sq(self, t: TimeLike) -> Tensor:
        return 2.0 * self.check_t(t)


#: schedule name -> class; build one with :func:`get_schedule`.
SCHEDULES: dict[str, type[Schedule]] = {
    "ddpm": DDPM,
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "edm": EDM,
}


def get_schedule(name: str | Schedule, **kw: Any) -> Schedule:
    """The schedule ``name`` built with keyword options ``kw`` (a :class:`Schedule` passes through).

    Unknown names raise :class:`UnknownScheduleError` (a ``ValueError``) with suggestions.
    """
    if isinstance(name, Schedule):
        if kw:
            raise ValueError(f"options {sorted(kw)} given with a built schedule {name!r}")
        return name
    cls = SCHEDULES.get(name)
    if cls is None:
        msg = (f"unknown noise schedule {name!r}"
               f"{did_you_mean(str(name), sorted(SCHEDULES), n=3, cutoff=0.4)}")
        msg += f" (known: {', '.join(sorted(SCHEDULES))})"
        raise UnknownScheduleError(msg)
    return cls(**kw)
