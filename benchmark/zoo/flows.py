"""Normalizing flows for images: :class:`RealNVP` and :class:`Glow` (multi-scale, affine coupling).

The flows of Pope, Balaji and Feizi (AISTATS 2020), small enough to train on the 16x16 digits on
a CPU, with a larger configuration for 3x32x32 images.

**Convention (one for every flow here).** A flow takes images ``x`` in [0, 1] (NCHW, float) and
is a deterministic bijection of the box onto R^D (D = C H W) followed by a standard normal prior
on all latents:

1. a fixed logit layer ``u = logit(alpha + (1 - 2 alpha) x)`` with ``alpha = 0.05`` (RealNVP's
   preprocessing; it keeps the box's faces at a finite distance, so attacked images clamped to
   [0, 1] stay finite), whose log-determinant is part of the likelihood;
2. ``num_scales`` levels of (squeeze, coupling steps, factor out half the channels);
3. z ~ N(0, I) over the concatenation of every factored-out half and the last level's output.

``log_prob(x)`` (and ``forward(x)``, so a flow is a ``kind = "density"`` model) is the
*continuous* log-density of ``x`` in [0, 1]^D, in nats. ``bits_per_dim(x)`` is
``-log_prob(x) / (D ln 2) + 8``: the negative log-likelihood of 8-bit data in bits per dimension
when ``x`` is the uniformly dequantized image ``(255 x_k + u) / 256``, u ~ U[0, 1)^D (the
convention of FFJORD and score_sde for [0, 1] data; :func:`dequantize`). The dequantization
noise is *not* drawn inside the model: the model is deterministic, so attack objectives are too;
the trainer and the evaluations dequantize explicitly with a seeded generator.

``encode(x) -> (z, log|det dz/dx|)`` and ``inverse(z) -> x`` are exact inverses (to floating
point precision; use float64 for tight checks); ``sample(n, generator=...)`` draws from the
model.

>>> flow = RealNVP(in_channels=1, image_size=16)
>>> flow.bits_per_dim(dequantize(torch.rand(2, 1, 16, 16))).shape
torch.Size([2])
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Flow", "Glow", "RealNVP", "dequantize"]

_LOG_2PI = math.log(2.0 * math.pi)
#: the logit layer's squeeze of [0, 1] into [alpha, 1 - alpha] (Dinh et al. 2017, section 4.1).
LOGIT_ALPHA = 0.05


def dequantize(x01: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of 8-bit images: ``(255 x + u) / 256``, u ~ U[0, 1).

    The result stays in [0, 1]. The noise is drawn on the CPU from ``generator`` and moved to
    ``x01``'s device, so a seed gives the same noise on every device.
    """
    u = torch.rand(x01.shape, generator=generator, dtype=x01.dtype).to(x01.device)
    return (255.0 * x01 + u) / 256.0


def _squeeze(h: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block becomes 4 channels."""
    b, c, hh, ww = h.shape
    h = h.reshape(b, c, hh // 2, 2, ww // 2, 2)
    return h.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, hh // 2, ww // 2)


def _unsqueeze(h: Tensor) -> Tensor:
    b, c, hh, ww = h.shape
    h = h.reshape(b, c // 4, 2, 2, hh, ww)
    return h.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * hh, 2 * ww)


def _coupling_net(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """conv3x3-ReLU-conv1x1-ReLU-conv3x3; the last layer starts at zero (identity coupling)."""
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    assert last.bias is not None
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)


class _Step(nn.Module):
    """One invertible layer: ``forward`` goes data -> latent and returns the log-determinant."""

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, h: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# RealNVP (Dinh et al. 2017): masked affine couplings with tanh-bounded log-scales
# --------------------------------------------------------------------------------------------
class _MaskedAffineCoupling(_Step):
    """y = m x + (1 - m) (x exp(s) + t), (s, t) = net(m x), s = scale * tanh(raw).

    ``m`` is 1 on the conditioning entries: a spatial checkerboard (same for every channel) or
    the first/second half of the channels.
    """

    mask: Tensor

    def __init__(self, channels: int, size: int, hidden: int, *,
                 kind: Literal["checkerboard", "channel"], parity: int) -> None:
        super().__init__()
        if kind == "checkerboard":
            ij = torch.arange(size)[:, None] + torch.arange(size)[None, :]
            mask = ((ij + parity) % 2 == 0).float().expand(channels, size, size)
        else:
            mask = torch.zeros(channels, size, size)
            half = channels // 2
            mask[:half] = 1.0
            if parity:
                mask = 1.0 - mask
        self.register_buffer("mask", mask[None].clone(), persistent=False)
        self.kind = kind
        self.net = _coupling_net(channels, 2 * channels, hidden)
        self.log_scale_scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _st(self, masked: Tensor) -> tuple[Tensor, Tensor]:
        raw, t = self.net(masked).chunk(2, dim=1)
        free = 1.0 - self.mask.to(masked)
        return self.log_scale_scale * torch.tanh(raw) * free, t * free

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        m = self.mask.to(h)
        s, t = self._st(h * m)
        return h * m + (1.0 - m) * (h * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, h: Tensor) -> Tensor:
        m = self.mask.to(h)
        s, t = self._st(h * m)
        return h * m + (1.0 - m) * ((h - t) * torch.exp(-s))


# --------------------------------------------------------------------------------------------
# Glow (Kingma & Dhariwal 2018): actnorm, invertible 1x1 convolution, affine coupling
# --------------------------------------------------------------------------------------------
class _ActNorm(_Step):
    """y = (x + loc) exp(log_scale) per channel, initialized from the first training batch.

    The data-dependent initialization (zero mean, unit variance per channel) runs on the first
    data -> latent pass in training mode; ``initialized`` is saved with the weights, so a
    loaded model never re-initializes.
    """

    initialized: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.zeros(()))

    @torch.no_grad()
    def _initialize(self, h: Tensor) -> None:
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        std = h.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1.0)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(h)
        logdet = self.log_scale.sum() * (h.shape[2] * h.shape[3])
        return (h + self.loc) * torch.exp(self.log_scale), logdet.expand(h.shape[0])

    def inverse(self, h: Tensor) -> Tensor:
        return h * torch.exp(-self.log_scale) - self.loc


class _InvConv1x1(_Step):
    """Invertible 1x1 convolution, LU-parametrized: W = P (L + I) (U + diag(sign exp(log_s))).

    Starts at a random rotation (from the global torch RNG, so a training seed fixes it);
    log|det| = H W sum(log_s).
    """

    perm: Tensor
    sign_s: Tensor
    lower_mask: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.clone())
        self.register_buffer("sign_s", torch.sign(s).clone())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1),
                             persistent=False)
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> Tensor:
        lm = self.lower_mask.to(self.lower)
        eye = torch.eye(lm.shape[0], dtype=lm.dtype, device=lm.device)
        lower = self.lower * lm + eye
        upper = self.upper * lm.T + torch.diag(self.sign_s.to(lm) * torch.exp(self.log_s))
        return self.perm.to(lm) @ lower @ upper

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight()
        logdet = self.log_s.sum() * (h.shape[2] * h.shape[3])
        return F.conv2d(h, w[:, :, None, None]), logdet.expand(h.shape[0])

    def inverse(self, h: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(h, w_inv[:, :, None, None])


class _AffineCoupling(_Step):
    """Glow's coupling: x = (a, b), y = (a, (b + t) sigmoid(raw + 2)), (raw, t) = net(a)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.n_cond = channels // 2  # not ``half``: that would shadow Module.half()
        self.net = _coupling_net(self.n_cond, 2 * (channels - self.n_cond), hidden)

    def _st(self, a: Tensor) -> tuple[Tensor, Tensor]:
        raw, t = self.net(a).chunk(2, dim=1)
        return F.logsigmoid(raw + 2.0), t

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = h[:, :self.n_cond], h[:, self.n_cond:]
        log_s, t = self._st(a)
        return torch.cat([a, (b + t) * torch.exp(log_s)], 1), log_s.flatten(1).sum(1)

    def inverse(self, h: Tensor) -> Tensor:
        a, b = h[:, :self.n_cond], h[:, self.n_cond:]
        log_s, t = self._st(a)
        return torch.cat([a, b * torch.exp(-log_s) - t], 1)


class _GlowStep(_Step):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.actnorm = _ActNorm(channels)
        self.invconv = _InvConv1x1(channels)
        self.coupling = _AffineCoupling(channels, hidden)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h, ld1 = self.actnorm(h)
        h, ld2 = self.invconv(h)
        h, ld3 = self.coupling(h)
        return h, ld1 + ld2 + ld3

    def inverse(self, h: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(h)))


# --------------------------------------------------------------------------------------------
# The shared multi-scale skeleton
# --------------------------------------------------------------------------------------------
class _Level(nn.Module):
    """pre-squeeze steps, squeeze, post-squeeze steps, then factor out half (if ``split``)."""

    def __init__(self, pre: list[_Step], post: list[_Step], *, squeeze: bool,
                 split: bool) -> None:
        super().__init__()
        self.pre = nn.ModuleList(pre)
        self.post = nn.ModuleList(post)
        self.squeeze = squeeze
        self.split = split

    def pre_steps(self) -> list[_Step]:
        return cast("list[_Step]", list(self.pre))

    def post_steps(self) -> list[_Step]:
        return cast("list[_Step]", list(self.post))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns (h to the next level, factored-out latent or None, log-determinant)."""
        logdet = h.new_zeros(h.shape[0])
        for step in self.pre_steps():
            h, ld = step(h)
            logdet = logdet + ld
        if self.squeeze:
            h = _squeeze(h)
        for step in self.post_steps():
            h, ld = step(h)
            logdet = logdet + ld
        if not self.split:
            return h, None, logdet
        half = h.shape[1] // 2
        return h[:, half:], h[:, :half], logdet

    def inverse(self, h: Tensor, z_out: Tensor | None) -> Tensor:
        if z_out is not None:
            h = torch.cat([z_out, h], 1)
        for step in reversed(self.post_steps()):
            h = step.inverse(h)
        if self.squeeze:
            h = _unsqueeze(h)
        for step in reversed(self.pre_steps()):
            h = step.inverse(h)
        return h


class Flow(nn.Module):
    """Base class: logit layer, multi-scale levels, N(0, I) prior (see the module docstring).

    Subclasses build ``self.levels`` (a list of :class:`_Level`) in ``__init__`` and call
    :meth:`_finish`. Inputs are images in [0, 1] of shape (B, in_channels, image_size,
    image_size); the model computes in the input's dtype.
    """

    kind: ClassVar[str] = "density"
    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    alpha: ClassVar[float] = LOGIT_ALPHA

    levels: nn.ModuleList

    def __init__(self, *, in_channels: int, image_size: int, num_scales: int,
                 steps_per_scale: int, hidden: int) -> None:
        super().__init__()
        if num_scales < 1 or steps_per_scale < 1 or hidden < 1:
            raise ValueError(f"num_scales, steps_per_scale and hidden must be >= 1, got "
                             f"{num_scales}, {steps_per_scale}, {hidden}")
        if image_size % (2 ** num_scales):
            raise ValueError(f"image_size {image_size} must be divisible by 2**num_scales "
                             f"= {2 ** num_scales}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_scales = num_scales
        self.steps_per_scale = steps_per_scale
        self.hidden = hidden
        self.event_shape = (in_channels, image_size, image_size)
        self.dim = in_channels * image_size * image_size
        self._latent_shapes: list[tuple[int, int, int]] = []

    def _finish(self, levels: list[_Level]) -> None:
        self.levels = nn.ModuleList(levels)
        # Record each latent's shape once (a dry run on the shapes only).
        with torch.no_grad():
            h = torch.zeros(1, *self.event_shape)
            shapes: list[tuple[int, int, int]] = []
            for level in levels:
                if level.squeeze:
                    h = _squeeze(h)
                if level.split:
                    half = h.shape[1] // 2
                    shapes.append((half, h.shape[2], h.shape[3]))
                    h = h[:, half:]
            shapes.append((h.shape[1], h.shape[2], h.shape[3]))
        self._latent_shapes = shapes

    def level_list(self) -> list[_Level]:
        """The levels, data side first."""
        return cast("list[_Level]", list(self.levels))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, "
                f"num_scales={self.num_scales}, steps_per_scale={self.steps_per_scale}, "
                f"hidden={self.hidden}")

    # -- the bijection --------------------------------------------------------------------
    def encode(self, x01: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> latent: (z of shape (B, D), log|det dz/dx| of shape (B,)), logit included."""
        if tuple(x01.shape[1:]) != self.event_shape:
            raise ValueError(f"{type(self).__name__} expects images of shape "
                             f"(B, {', '.join(map(str, self.event_shape))}), got "
                             f"{tuple(x01.shape)}")
        a = self.alpha
        p = a + (1.0 - 2.0 * a) * x01
        h = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1.0 - 2.0 * a) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        zs: list[Tensor] = []
        for level in self.level_list():
            h, z_out, ld = level(h)
            logdet = logdet + ld
            if z_out is not None:
                zs.append(z_out.flatten(1))
        zs.append(h.flatten(1))
        return torch.cat(zs, 1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        """Latent (B, D) -> image (B, C, H, W): the exact inverse of :meth:`encode`.

        The result lies in [0, 1] only for latents of images in the box; it is not clamped.
        """
        z = z.reshape(z.shape[0], -1)
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents of {self.dim} values, got {tuple(z.shape)}")
        parts: list[Tensor] = []
        start = 0
        for c, hh, ww in self._latent_shapes:
            n = c * hh * ww
            parts.append(z[:, start:start + n].reshape(z.shape[0], c, hh, ww))
            start += n
        h = parts[-1]
        outs = iter(reversed(parts[:-1]))
        for level in reversed(self.level_list()):
            h = level.inverse(h, next(outs) if level.split else None)
        return (torch.sigmoid(h) - self.alpha) / (1.0 - 2.0 * self.alpha)

    # -- densities ------------------------------------------------------------------------
    def log_prob(self, x01: Tensor) -> Tensor:
        """log p(x) in nats, shape (B,): the continuous density of ``x01`` on [0, 1]^D."""
        z, logdet = self.encode(x01)
        return -0.5 * (z * z).sum(1) - 0.5 * self.dim * _LOG_2PI + logdet

    def forward(self, x01: Tensor) -> Tensor:
        """Per-sample log-likelihood (B,) (same as :meth:`log_prob`): a ``density`` model."""
        return self.log_prob(x01)

    def bits_per_dim(self, x01: Tensor) -> Tensor:
        """-log p(x) / (D ln 2) + 8, shape (B,): 8-bit NLL for dequantized ``x01``."""
        return -self.log_prob(x01) / (self.dim * math.log(2.0)) + 8.0

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> Tensor:
        """``n`` images from the model (latents drawn on the CPU from ``generator``), clamped
        to [0, 1]."""
        ref = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=ref.dtype) * temperature
        return self.inverse(z.to(ref.device)).clamp(0.0, 1.0)


class RealNVP(Flow):
    """RealNVP (Dinh et al. 2017), multi-scale.

    Each level but the last: ``steps_per_scale`` checkerboard couplings (alternating parity),
    squeeze, ``steps_per_scale`` channel couplings (alternating halves), factor out half the
    channels. The last level: ``steps_per_scale`` checkerboard couplings. Coupling nets are
    conv3x3-conv1x1-conv3x3 with ``hidden`` channels; log-scales are ``scale * tanh(raw)``
    with a learned per-channel ``scale``. No batch norm, so train and eval agree.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 16, num_scales: int = 2,
                 steps_per_scale: int = 3, hidden: int = 32) -> None:
        super().__init__(in_channels=in_channels, image_size=image_size,
                         num_scales=num_scales, steps_per_scale=steps_per_scale, hidden=hidden)
        k = steps_per_scale
        c, size = in_channels, image_size
        levels: list[_Level] = []
        for li in range(num_scales):
            pre: list[_Step] = [_MaskedAffineCoupling(c, size, hidden, kind="checkerboard",
                                                      parity=i % 2) for i in range(k)]
            if li == num_scales - 1:
                levels.append(_Level(pre, [], squeeze=False, split=False))
                break
            c, size = 4 * c, size // 2
            post: list[_Step] = [_MaskedAffineCoupling(c, size, hidden, kind="channel",
                                                       parity=i % 2) for i in range(k)]
            levels.append(_Level(pre, post, squeeze=True, split=True))
            c //= 2
        self._finish(levels)


class Glow(Flow):
    """Glow (Kingma & Dhariwal 2018), multi-scale.

    Each level: squeeze, ``steps_per_scale`` steps of (actnorm, LU-parametrized invertible 1x1
    convolution, affine coupling with scale ``sigmoid(raw + 2)``), then factor out half the
    channels (all levels but the last). Factored-out halves get the N(0, I) prior (not Glow's
    learned conditional prior). Actnorm initializes from the first training batch.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 16, num_scales: int = 2,
                 steps_per_scale: int = 4, hidden: int = 64) -> None:
        super().__init__(in_channels=in_channels, image_size=image_size,
                         num_scales=num_scales, steps_per_scale=steps_per_scale, hidden=hidden)
        c = in_channels
        levels: list[_Level] = []
        for li in range(num_scales):
            c *= 4
            last = li == num_scales - 1
            steps: list[_Step] = [_GlowStep(c, hidden) for _ in range(steps_per_scale)]
            levels.append(_Level([], steps, squeeze=True, split=not last))
            if not last:
                c //= 2
        self._finish(levels)
