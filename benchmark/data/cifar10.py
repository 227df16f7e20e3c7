"""CIFAR-10 from a local ``cifar-10-batches-py`` folder (nothing is ever downloaded).

The folder is the "CIFAR-10 python version" from https://www.cs.toronto.edu/~kriz/cifar.html,
unpacked: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a pickled dict with
``b"data"`` (uint8, N x 3072, channel-major) and ``b"labels"``. The pickles are read with a
restricted unpickler that only rebuilds NumPy arrays; any other global is refused before it is
imported, so a tampered file cannot run code.

Where it looks: ``root`` if given, else ``$GENBENCH_CIFAR10``, else
``~/.cache/genbench/cifar-10-batches-py``; each may be the folder itself or its parent.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.data import Dataset, Split
from benchmark.plugins import register_dataset

__all__ = [
    "DatasetNotFoundError",
    "MalformedDatasetError",
    "UnsafePickleError",
    "load_cifar10",
    "restricted_load",
]

FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ENV_VAR = "GENBENCH_CIFAR10"
NUM_CLASSES = 10
_PIXELS = 3 * 32 * 32


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder is not where genbench looked; the message lists every path tried."""


class MalformedDatasetError(ValueError):
    """A dataset file exists but is not in the expected format; the message names the file."""


class UnsafePickleError(MalformedDatasetError):
    """A pickle referenced a global outside the allow-list (it was neither imported nor run)."""


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    # Resolve the objects here, not through the names in the file, so that the old
    # ``numpy.core`` spelling works on NumPy 2 without importing its deprecated shim.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import _codecs

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of bytes at protocol <= 2 go through _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # protocol-5 array pickles
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only NumPy array reconstruction is "
                "allowed in a CIFAR-10 batch") from None


def restricted_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` allowing only the globals NumPy arrays need (``encoding="bytes"``).

    Raises :class:`UnsafePickleError` (naming the file and the global) for anything else and
    :class:`MalformedDatasetError` for a file that is not a readable pickle.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise MalformedDatasetError(f"{path}: not a readable CIFAR-10 pickle ({exc})") from exc


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        bases = [Path(root).expanduser()]
    elif os.environ.get(ENV_VAR):
        bases = [Path(os.environ[ENV_VAR]).expanduser()]
    else:
        bases = [Path("~/.cache/genbench").expanduser() / FOLDER_NAME]
    out: list[Path] = []
    for base in bases:
        # The base may be the batches folder itself or its parent.
        for cand in (base / FOLDER_NAME, base):
            if cand not in out:
                out.append(cand)
    return out


def find_cifar10(root: str | os.PathLike[str] | None = None) -> Path:
    """The ``cifar-10-batches-py`` folder to read, or :class:`DatasetNotFoundError`."""
    cands = _candidates(root)
    expected = (*TRAIN_FILES, TEST_FILE)
    for cand in cands:
        if cand.is_dir() and (cand.name == FOLDER_NAME
                              or any((cand / f).exists() for f in expected)):
            return cand
    looked = "\n".join(f"  - {c}" for c in cands)
    raise DatasetNotFoundError(
        "CIFAR-10 not found (genbench never downloads). Looked in:\n"
        f"{looked}\n"
        f"Put the '{FOLDER_NAME}' folder of the CIFAR-10 python version "
        "(cifar-10-python.tar.gz, unpacked; files data_batch_1 ... data_batch_5 and test_batch) "
        f"at one of these places, or pass root=... or set ${ENV_VAR}.")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MalformedDatasetError(f"{path}: file is missing from the CIFAR-10 folder")
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise MalformedDatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    missing = [k for k in (b"data", b"labels") if k not in obj]
    if missing:
        raise MalformedDatasetError(
            f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} "
            f"(found {sorted(map(repr, obj))})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise MalformedDatasetError(
            f"{path}: b'data' must be a uint8 array of shape (N, {_PIXELS}), got {desc}")
    try:
        labels = np.asarray(obj[b"labels"])
    except (TypeError, ValueError) as exc:
        raise MalformedDatasetError(f"{path}: b'labels' is not a list of integers") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or \
            not np.issubdtype(labels.dtype, np.integer):
        raise MalformedDatasetError(
            f"{path}: b'labels' must be {data.shape[0]} integers (one per image), got "
            f"{labels.dtype} values of shape {labels.shape}")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise MalformedDatasetError(
            f"{path}: label {int(labels[bad][0])} out of range [0, {NUM_CLASSES})")
    return data, labels.astype(np.int64)


def _split(parts: list[tuple[np.ndarray, np.ndarray]]) -> Split:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)
    return Split(x=x, y=torch.from_numpy(labels),
                 ids=torch.arange(labels.shape[0], dtype=torch.int64))


@register_dataset("cifar10")
def load_cifar10(*, root: str | os.PathLike[str] | None = None) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (see the module docstring).

    Images are (3, 32, 32) in [0, 1]; sample ids are indices within each split. Raises
    :class:`DatasetNotFoundError` (listing where it looked) when the folder is absent and
    :class:`MalformedDatasetError` (naming the file) when a file is missing or malformed.
    """
    folder = find_cifar10(root)
    train = _split([_read_batch(folder / f) for f in TRAIN_FILES])
    test = _split([_read_batch(folder / TEST_FILE)])
    return Dataset(name="cifar10", version="cifar10-v1", num_classes=NUM_CLASSES,
                   image_shape=(3, 32, 32), train=train, test=test)


def write_random_cifar10(root: str | os.PathLike[str], *, n_test: int = 10000,
                         n_train_per_batch: int = 10, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` in the real format (pickled dicts of uint8 rows)
    with uniformly random images and labels: ``n_train_per_batch`` images in each of the five
    training batches and ``n_test`` test images (the evaluation subsets index test ids, so
    ``n_test`` must exceed the largest id a suite reads). For smoke runs and tests of the
    CIFAR-10 path on machines without the dataset; returns ``root``."""
    if n_test < 1 or n_train_per_batch < 1:
        raise ValueError(f"n_test and n_train_per_batch must be >= 1, got {n_test} and "
                         f"{n_train_per_batch}")
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [*((f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)),
                    ("test_batch", n_test)]:
        batch = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return Path(root)
