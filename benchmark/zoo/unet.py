"""A small class-conditional UNet that predicts the noise (the zoo's learned denoiser).

:class:`EpsUNet` is a :class:`~benchmark.zoo.denoiser.Denoiser`: it sees the
variance-normalized input z = x_t / sqrt(a^2 + s^2) and the log-SNR, so one network serves
DDPM, VP, subVP and EDM (see :mod:`benchmark.zoo.denoiser`). The log-SNR enters through
Fourier features and an MLP, the label through an embedding table with one extra row, the
null label (index ``num_classes``), used for ``y=None``; their sum modulates every residual
block (scale and shift after its second GroupNorm).

Layout for ``channel_mults=(1, 2, 2)`` at 16x16: conv -> [res]x n at 16 -> down -> [res]x n
at 8 -> down -> [res]x n at 4 -> res, self-attention, res -> the mirror path with skip
connections -> GroupNorm, SiLU, conv (zero-initialised, so training starts from eps_hat = 0).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.zoo.denoiser import Denoiser

__all__ = ["EpsUNet", "log_snr_features"]


def log_snr_features(log_snr: Tensor, dim: int, *, min_period: float = 0.5,
                     max_period: float = 200.0) -> Tensor:
    """Fourier features (B, dim) of the log-SNR: cos and sin at ``dim // 2`` frequencies.

    Periods are geometric in [min_period, max_period] (log-SNR units): the slowest varies
    monotonically over the whole range genbench's schedules use (about -10 to 28), the fastest
    resolves half a unit.
    """
    if dim % 2:
        raise ValueError(f"the embedding size must be even, got {dim}")
    half = dim // 2
    periods = torch.logspace(math.log10(max_period), math.log10(min_period), half,
                             dtype=torch.float32, device=log_snr.device)
    ang = log_snr.float()[:, None] * (2.0 * math.pi / periods)[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """Zero-initialise a layer, so the residual branch it ends starts as the identity."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as scale and shift of the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of a (low-resolution) feature map."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class EpsUNet(Denoiser):
    """Class-conditional eps-prediction UNet on (B, in_channels, image_size, image_size).

    Keyword arguments (all stored, so the zoo rebuilds the network from ``arch_kwargs``):

    * ``num_classes``: labels 0..num_classes-1, plus the null label; 0 makes an unconditional
      network (``y`` given then raises ``ValueError``);
    * ``base_channels``, ``channel_mults``: width at full resolution and the multiplier per
      resolution level (each level after the first halves the resolution, so ``image_size``
      must be divisible by 2^(levels - 1));
    * ``num_res_blocks``: residual blocks per level on the way down (one more on the way up);
    * ``emb_dim``: size of the log-SNR + label embedding (default 4 * base_channels);
    * ``groups``: GroupNorm groups (reduced to a divisor of the channel count);
    * ``log_snr_clip``: the log-SNR is clamped to [-clip, clip] before embedding, so
      s = 0 (log-SNR = +inf) gives a finite output.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 16, num_classes: int = 10,
                 base_channels: int = 32, channel_mults: tuple[int, ...] | list[int] = (1, 2, 2),
                 num_res_blocks: int = 1, emb_dim: int | None = None, groups: int = 8,
                 log_snr_clip: float = 30.0) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        if not mults or min(mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {channel_mults}")
        if image_size % 2 ** (len(mults) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by "
                             f"2^{len(mults) - 1} (channel_mults={mults})")
        if num_classes < 0 or num_res_blocks < 1 or base_channels < 1:
            raise ValueError(f"bad EpsUNet sizes: num_classes={num_classes}, "
                             f"num_res_blocks={num_res_blocks}, base_channels={base_channels}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.conditional = num_classes > 0
        self.log_snr_clip = float(log_snr_clip)
        emb_dim = emb_dim or 4 * base_channels
        self.emb_dim = emb_dim

        self.snr_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                     nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row: the null label
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        chans = [base_channels * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base_channels]
        c = base_channels
        for level, c_out in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(c, c_out, emb_dim, groups))
                c = c_out
                skips.append(c)
            self.down.append(blocks)
            if level < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = _ResBlock(c, c, emb_dim, groups)
        self.mid_attn = _Attention(c, groups)
        self.mid2 = _ResBlock(c, c, emb_dim, groups)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(chans))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResBlock(c + skips.pop(), chans[level], emb_dim, groups))
                c = chans[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = _norm(c, groups)
        self.conv_out = _zero(nn.Conv2d(c, in_channels, 3, padding=1))

    def embedding(self, log_snr: Tensor, labels: Tensor) -> Tensor:
        """The (B, emb_dim) conditioning: MLP(Fourier(log-SNR)) + label embedding."""
        lam = torch.nan_to_num(log_snr.float(), nan=0.0).clamp(-self.log_snr_clip,
                                                               self.log_snr_clip)
        return self.snr_mlp(log_snr_features(lam, self.emb_dim)) + self.label_emb(labels)

    def eps_normalized(self, z: Tensor, log_snr: Tensor, y: Tensor | None) -> Tensor:
        labels = self.labels_or_null(y, z.shape[0], z.device)
        emb = self.embedding(log_snr, labels).to(z.dtype)
        h = self.conv_in(z)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in cast(nn.ModuleList, blocks):
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            for block in cast(nn.ModuleList, blocks):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, params={n}")
