"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images), the embedded default.

The split is fixed and versioned: 36 test images per class (360 in all, exactly 20%), chosen per
class by NumPy's PCG64 stream with seed 0 (``Generator.random`` followed by a stable argsort,
which does not depend on scikit-learn's or NumPy's shuffling internals). Sample ids are the
scikit-learn indices. Images are upsampled once with bilinear interpolation
(``align_corners=False``) and clamped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.data import Dataset, Split
from benchmark.plugins import register_dataset

__all__ = ["RESOLUTIONS", "SPLIT_SEED", "TEST_PER_CLASS", "load_digits", "split_indices"]

#: supported image sizes; 8 is the native resolution.
RESOLUTIONS = (8, 16, 32)
SPLIT_SEED = 0
TEST_PER_CLASS = 36
_VERSION = "digits-v1"


def split_indices(labels: np.ndarray, *, test_per_class: int = TEST_PER_CLASS,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split: (train indices, test indices), each sorted ascending."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.argsort(rng.random(members.size), kind="stable")
        test.append(members[order[:test_per_class]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.size), test_idx)
    return train_idx, test_idx


@register_dataset("digits")
def load_digits(*, resolution: int = 16) -> Dataset:
    """The digits dataset at ``resolution`` x ``resolution`` (one of :data:`RESOLUTIONS`).

    Returns a :class:`~benchmark.data.Dataset` with 1,437 train and 360 test images of shape
    (1, resolution, resolution), 10 classes.
    """
    if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
        raise ValueError(f"digits resolution must be one of {RESOLUTIONS} (8 is native), "
                         f"got resolution={resolution!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # pixel values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    x = torch.from_numpy(images).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=False)
    x = x.clamp_(0.0, 1.0).contiguous()
    y = torch.from_numpy(labels)
    train_idx, test_idx = split_indices(labels)

    def part(idx: np.ndarray) -> Split:
        rows = torch.from_numpy(idx.astype(np.int64))
        return Split(x=x[rows].contiguous(), y=y[rows].contiguous(), ids=rows)

    return Dataset(
        name="digits",
        version=f"{_VERSION}-{resolution}px",
        num_classes=10,
        image_shape=(1, resolution, resolution),
        train=part(train_idx),
        test=part(test_idx),
    )
