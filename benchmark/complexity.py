"""Image complexity: the PNG compression ratio of Serra et al. (2020) used by seed 000.

``C(x) = bytes(PNG(x)) / D`` with D = C H W, computed on the 8-bit quantization of ``x`` in
[0, 1] (round(255 x)) with Pillow at a fixed ``compress_level`` (default 9, the maximum, so the
ratio does not depend on Pillow's default). Values slightly above 1 occur for incompressible
images (PNG's header and filter bytes).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

__all__ = ["PNG_COMPRESS_LEVEL", "png_complexity"]

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
