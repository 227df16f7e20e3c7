"""Image complexity: the PNG compression ratio of Serra et al. (2020) as used by Arvinte et al.
(2023, PF-ODE density robustness), and that paper's differentiable proxy for it, the
high-frequency DCT energy.

``C(x) = bytes(PNG(x)) / D`` with D = C H W, computed on the 8-bit quantization of ``x`` in
[0, 1] (round(255 x)) with Pillow at a fixed ``compress_level`` (default 9, the maximum, so the
ratio does not depend on Pillow's default). Values slightly above 1 occur for incompressible
images (PNG's header and filter bytes).

The high-complexity attack of Arvinte et al. (section 3) maximizes
``log p(x + delta) + lambda * || DCT(x + delta)[W/2:W, H/2:H] ||^2`` with lambda = 1: the energy
of the high-frequency quadrant of the orthonormal 2-D DCT-II, per channel, summed over
channels (:func:`dct_high_freq_energy`). The norm in the paper's formula is garbled in our copy
of the text; we use the squared l2 norm (an energy; ``squared=False`` gives the l2 norm).
The DCT is computed as two matrix products (:func:`dct2`), so it is batched and differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

__all__ = ["PNG_COMPRESS_LEVEL", "dct2", "dct_high_freq_energy", "dct_matrix",
           "png_complexity"]

#: Pillow's zlib level used for every reported complexity.
PNG_COMPRESS_LEVEL = 9


def png_complexity(x01: Tensor, *, compress_level: int = PNG_COMPRESS_LEVEL) -> Tensor:
    """Per-image PNG complexity (B,) of a batch (B, C, H, W) in [0, 1]; C must be 1 or 3."""
    from PIL import Image

    if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be an integer in [0, 9], got {compress_level!r}")
    if x01.dim() != 4 or x01.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x01.shape)}")
    lo, hi = float(x01.min()), float(x01.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    arr = (x01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    d = arr[0].size
    out = np.empty(len(arr))
    for i, img in enumerate(arr):  # Pillow encodes one image at a time
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1))
        buf = io.BytesIO()
        pil.save(buf, format="PNG", compress_level=compress_level)
        out[i] = buf.tell() / d
    return torch.from_numpy(out)


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix M (n, n): ``M @ v`` is ``scipy.fft.dct(v, norm="ortho")``.

    M[k, i] = sqrt(2 / n) cos(pi (2 i + 1) k / (2 n)), with row 0 scaled by 1 / sqrt(2).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"DCT size must be a positive integer, got {n!r}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    m[0] /= 2.0 ** 0.5
    return m.to(dtype=dtype, device=device)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (H, W) of ``x`` (any leading
    dimensions): ``M_H @ x @ M_W^T``, equal to ``scipy.fft.dctn(x, axes=(-2, -1),
    norm="ortho")``. Differentiable; floating inputs only."""
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"dct2 needs a floating tensor with at least 2 dimensions, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    mh = dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device)
    mw = dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T


def dct_high_freq_energy(x: Tensor, *, squared: bool = True) -> Tensor:
    """Seed 000's differentiable complexity proxy, per image (B,) for a batch (B, C, H, W):
    the squared l2 norm (``squared=False``: the l2 norm) of the high-frequency quadrant
    ``[H/2:H, W/2:W]`` of the orthonormal 2-D DCT-II of each channel, summed over channels.

    Zero for constant images (all energy is in the DC coefficient). The value depends on the
    space ``x`` is given in (the paper's images are in [-1, 1]: pass ``2 x - 1``, 4x the
    energy of [0, 1] images).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    h, w = x.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2 x 2 to have a high-frequency quadrant, "
                         f"got {h} x {w}")
    coef = dct2(x)[..., h // 2:, w // 2:]
    energy = coef.pow(2).flatten(1).sum(1)
    return energy if squared else energy.sqrt()
