"""Evaluation subsets: fixed, versioned lists of sample ids (RobustBench-style).

A subset lives in ``benchmark/data/subsets/{dataset}-{name}.json`` as
``{"id": ..., "dataset": ..., "split": "test", "ids": [...]}``. Its :attr:`EvalSubset.sha256`
(over dataset, split and ids) goes into every result row, so two runs on different lists can
never be compared by accident. A published list is never edited: a change is a new ``-vN``.

The shipped lists were generated once by :func:`make_balanced_subset` and
:func:`make_random_subset` (see :func:`_regenerate`). Their order is part of the list: the
balanced ones go round-robin over the classes, so every prefix (``genbench run --limit``) is as
class-balanced as it can be; ``cifar10-test512-v1`` is the first 512 ids of ``cifar10-test1000-v1``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from torch import Tensor

from benchmark.data import Dataset
from benchmark.plugins.suggest import did_you_mean

__all__ = [
    "EvalSubset",
    "UnknownSubsetError",
    "get_subset",
    "list_subsets",
    "make_balanced_subset",
    "make_random_subset",
    "select",
]


class UnknownSubsetError(KeyError):
    """No shipped subset of that name; the message lists the available ones."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class EvalSubset:
    """A named, fixed list of sample ids of one split of one dataset."""

    id: str
    dataset: str
    split: str
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"subset {self.id!r} lists some sample ids twice")

    @property
    def sha256(self) -> str:
        """Hash of dataset, split and ids (canonical JSON); independent of ``id``."""
        canon = json.dumps({"dataset": self.dataset, "split": self.split, "ids": list(self.ids)},
                           sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"EvalSubset({self.id!r}, dataset={self.dataset!r}, split={self.split!r}, "
                f"n={len(self.ids)}, sha256={self.short_hash})")


def _folder() -> Any:
    return resources.files("benchmark.data").joinpath("subsets")


def list_subsets(dataset: str | None = None) -> list[str]:
    """Shipped subsets as ``{dataset}-{name}`` (only those of ``dataset`` if given)."""
    names = sorted(p.name[: -len(".json")] for p in _folder().iterdir()
                   if p.name.endswith(".json"))
    if dataset is not None:
        names = [n for n in names if n.startswith(f"{dataset}-")]
    return names


def get_subset(dataset: str, name: str) -> EvalSubset:
    """The shipped subset ``name`` of ``dataset``, e.g. ``get_subset("digits", "test100-v1")``."""
    stem = f"{dataset}-{name}"
    res = _folder().joinpath(f"{stem}.json")
    if not res.is_file():
        available = list_subsets()
        def show(h: str) -> str:  # the dataset's own subsets by the name the user types
            return h[len(dataset) + 1:] if h.startswith(f"{dataset}-") else h

        msg = (f"unknown evaluation subset {name!r} for dataset {dataset!r}"
               f"{did_you_mean(stem, available, n=3, cutoff=0.5, show=show)}")
        msg += f" (available: {', '.join(available) or 'none'})"
        raise UnknownSubsetError(msg)
    raw = json.loads(res.read_text(encoding="utf-8"))
    subset = EvalSubset(id=str(raw["id"]), dataset=str(raw["dataset"]), split=str(raw["split"]),
                        ids=tuple(int(i) for i in raw["ids"]))
    if subset.dataset != dataset:
        raise ValueError(f"subset file {stem}.json is for dataset {subset.dataset!r}, "
                         f"not {dataset!r}")
    return subset


def select(ds: Dataset, subset: EvalSubset) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, ids) of the subset's samples, in the subset's order."""
    if subset.dataset != ds.name:
        raise ValueError(f"subset {subset.id!r} is for dataset {subset.dataset!r}, "
                         f"not {ds.name!r}")
    split = ds.split(subset.split)
    row_of = {int(i): r for r, i in enumerate(split.ids.tolist())}
    missing = [i for i in subset.ids if i not in row_of]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise KeyError(f"subset {subset.id!r}: {len(missing)} sample id(s) not in the "
                       f"{ds.name} {subset.split} split ({ds.version}): {shown}")
    import torch

    rows = torch.tensor([row_of[i] for i in subset.ids], dtype=torch.long)
    return split.x[rows], split.y[rows], split.ids[rows]


def make_balanced_subset(labels: Sequence[int] | np.ndarray, ids: Sequence[int] | np.ndarray,
                         *, per_class: int, seed: int) -> tuple[int, ...]:
    """``per_class`` seeded picks of each class, interleaved round-robin over the classes.

    Picks per class use NumPy's PCG64 (``default_rng(seed).random`` + stable argsort), so the
    list is reproducible across platforms.
    """
    labels = np.asarray(labels)
    ids = np.asarray(ids)
    rng = np.random.default_rng(seed)
    per: list[np.ndarray] = []
    for c in np.unique(labels):
        members = ids[labels == c]
        if members.size < per_class:
            raise ValueError(f"class {c} has only {members.size} samples, need {per_class}")
        per.append(members[np.argsort(rng.random(members.size), kind="stable")[:per_class]])
    return tuple(int(group[k]) for k in range(per_class) for group in per)


def make_random_subset(n_total: int, k: int, *, seed: int) -> tuple[int, ...]:
    """``k`` seeded picks from ids ``0..n_total-1`` (in draw order: any prefix is random)."""
    rng = np.random.default_rng(seed)
    return tuple(int(i) for i in np.argsort(rng.random(n_total), kind="stable")[:k])


def _write(subset: EvalSubset, folder: Any) -> None:
    body = {"id": subset.id, "dataset": subset.dataset, "split": subset.split,
            "ids": list(subset.ids)}
    path = folder / f"{subset.id}.json"
    path.write_text(json.dumps(body, separators=(",", ":")) + "\n", encoding="utf-8")


def _regenerate(folder: Any = None) -> list[EvalSubset]:
    """Rebuild the shipped lists (run once; committed lists must not change)."""
    from pathlib import Path

    from benchmark.data.digits import load_digits

    out = Path(folder) if folder is not None else Path(str(_folder()))
    digits = load_digits(resolution=8)
    y, ids = digits.test.y.numpy(), digits.test.ids.numpy()
    made = [
        EvalSubset("digits-test100-v1", "digits", "test",
                   make_balanced_subset(y, ids, per_class=10, seed=0)),
        EvalSubset("digits-test360-v1", "digits", "test",
                   make_balanced_subset(y, ids, per_class=36, seed=0)),
        EvalSubset("cifar10-test1000-v1", "cifar10", "test",
                   make_random_subset(10_000, 1000, seed=0)),
        EvalSubset("cifar10-test512-v1", "cifar10", "test",
                   make_random_subset(10_000, 512, seed=0)),
    ]
    for s in made:
        _write(s, out)
    return made


if __name__ == "__main__":
    for s in _regenerate():
        print(s)
