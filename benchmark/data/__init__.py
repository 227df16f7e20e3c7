"""Datasets: fixed, versioned train/test splits with stable sample ids.

Every image that leaves this package is float32 in [0, 1], NCHW. A sample id is stable across
platforms and library versions (for the digits it is the scikit-learn index, for CIFAR-10 the
index within its split), so evaluation subsets can be stored as id lists.

>>> ds = load_dataset("digits")
>>> ds.test.x.shape
torch.Size([360, 1, 16, 16])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Dataset", "Split", "clear_dataset_cache", "load_dataset"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset.

    ``x``: float32 images (N, C, H, W) in [0, 1]; ``y``: int64 labels (N,); ``ids``: int64
    stable sample ids (N,). The tensors may be shared through the dataset cache: never modify
    them in place.
    """

    x: Tensor
    y: Tensor
    ids: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, image_shape={tuple(self.x.shape[1:])})"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset with a fixed train/test split; ``version`` changes whenever the data could."""

    name: str
    version: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: Split
    test: Split

    def split(self, name: str) -> Split:
        """The split called ``name`` (``"train"`` or ``"test"``)."""
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        raise ValueError(
            f"dataset {self.name!r} has no split {name!r} (expected 'train' or 'test')")

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, version={self.version!r}, num_classes={self.num_classes}, "
                f"image_shape={self.image_shape}, train={len(self.train)}, test={len(self.test)})")


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a registered dataset (``benchmark.plugins.builtin.DATASETS``) by name.

    Keyword arguments go to the loader (e.g. ``resolution=8`` for the digits, ``root=...`` for
    CIFAR-10). Results are cached in-process per (name, kwargs); the returned tensors are shared
    between callers. Unknown names raise :class:`benchmark.plugins.registry.UnknownNameError` with
    "did you mean" suggestions.
    """
    key = tuple(sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable argument: load without caching
        return _load_uncached(name, key)
    return _load_cached(name, key)


def clear_dataset_cache() -> None:
    """Forget every dataset loaded so far (e.g. after changing ``GENBENCH_CIFAR10``)."""
    _load_cached.cache_clear()


def _load_uncached(name: str, key: tuple[tuple[str, Any], ...]) -> Dataset:
    from benchmark.plugins.builtin import DATASETS  # lazy: registries imports plug-in modules

    loader = DATASETS.get(name)
    ds = loader(**dict(key))
    if not isinstance(ds, Dataset):
        raise TypeError(f"dataset loader {name!r} returned {type(ds).__name__}, expected Dataset")
    return ds


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, key: tuple[tuple[str, Any], ...]) -> Dataset:
    return _load_uncached(name, key)
