"""Datasets, the fixed digits split, evaluation subsets and the CIFAR-10 reader."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import Dataset, load_dataset
from benchmark.data.cifar10 import (
    DatasetNotFoundError,
    MalformedDatasetError,
    UnsafePickleError,
    load_cifar10,
    restricted_load,
)
from benchmark.data.digits import load_digits
from benchmark.data.subsets import (
    EvalSubset,
    UnknownSubsetError,
    get_subset,
    list_subsets,
    make_balanced_subset,
    make_random_subset,
    select,
)
from benchmark.plugins.registry import UnknownNameError

# Regression guards: the digits test split and the shipped subsets must never change.
DIGITS_TEST_IDS_SHA256 = "ccbee712db4a8852798eb3b6356e636a9cc736df5485b065d2d565c25173fe64"
SUBSET_SHA256 = {
    "digits-test100-v1": "2d2a59951877552c6eae1712734ef1484ce2159bcc1a1ac85885c2bb3671ec31",
    "digits-test360-v1": "37b5e17a8c07f87652e90cb30a43078a1f5240c6050e1d2eec52498818f128b7",
    "cifar10-test1000-v1": "37c30b770bdad880c5cdded579f02e6ebf77c859fbb11f93c4b085b8588b175d",
    "cifar10-test512-v1": "bd46b242767f18cbe72941f92b2ed39a0086c04387171557ebed0ce6bf75ef6f",
}


def _ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(",".join(map(str, ids.tolist())).encode()).hexdigest()


# -- digits ------------------------------------------------------------------------------------
def test_digits_shapes_range_and_split() -> None:
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert ds.version == "digits-v1-16px" and ds.num_classes == 10
    assert ds.image_shape == (1, 16, 16)
    assert ds.train.x.shape == (1437, 1, 16, 16) and ds.test.x.shape == (360, 1, 16, 16)
    for split in (ds.train, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.ids.dtype == torch.int64
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    assert torch.bincount(ds.test.y).tolist() == [36] * 10
    all_ids = torch.cat([ds.train.ids, ds.test.ids]).sort().values
    assert torch.equal(all_ids, torch.arange(1797))


def test_digits_split_is_fixed() -> None:
    ds = load_digits()
    assert _ids_hash(ds.test.ids) == DIGITS_TEST_IDS_SHA256
    again = load_digits()
    assert torch.equal(ds.test.x, again.test.x) and torch.equal(ds.train.ids, again.train.ids)


def test_digits_native_resolution_matches_sklearn() -> None:
    from sklearn.datasets import load_digits as sk

    ds = load_digits(resolution=8)
    assert ds.image_shape == (1, 8, 8) and ds.version == "digits-v1-8px"
    bunch = sk()
    i = int(ds.test.ids[0])
    expected = torch.from_numpy(bunch.images[i].astype(np.float32) / 16.0)
    assert torch.equal(ds.test.x[0, 0], expected)
    assert int(ds.test.y[0]) == int(bunch.target[i])


def test_digits_bad_resolution() -> None:
    with pytest.raises(ValueError, match="resolution=12"):
        load_digits(resolution=12)


def test_load_dataset_caches_and_suggests() -> None:
    assert load_dataset("digits") is load_dataset("digits")
    assert load_dataset("digits", resolution=8) is not load_dataset("digits")
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        load_dataset("digit")


# -- subsets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", sorted(SUBSET_SHA256))
def test_shipped_subsets_are_stable(stem: str) -> None:
    dataset, _, name = stem.partition("-")
    subset = get_subset(dataset, name)
    assert subset.id == stem and subset.split == "test"
    assert subset.sha256 == SUBSET_SHA256[stem] and subset.short_hash == subset.sha256[:12]
    assert len(set(subset.ids)) == len(subset.ids)


def test_list_subsets() -> None:
    assert set(list_subsets()) == set(SUBSET_SHA256)
    assert list_subsets("digits") == ["digits-test100-v1", "digits-test360-v1"]


def test_digits_subsets_select_and_balance() -> None:
    ds = load_dataset("digits")
    x, y, ids = select(ds, get_subset("digits", "test100-v1"))
    assert x.shape == (100, 1, 16, 16)
    assert torch.bincount(y, minlength=10).tolist() == [10] * 10
    # round-robin order: every prefix of 10k ids is balanced
    assert torch.bincount(y[:30], minlength=10).tolist() == [3] * 10
    x, y, ids = select(ds, get_subset("digits", "test360-v1"))
    assert sorted(ids.tolist()) == sorted(ds.test.ids.tolist())


def test_cifar_subsets_are_nested_and_in_range() -> None:
    big = get_subset("cifar10", "test1000-v1")
    small = get_subset("cifar10", "test512-v1")
    assert small.ids == big.ids[:512]
    assert all(0 <= i < 10_000 for i in big.ids)


def test_subset_generators_are_seeded() -> None:
    labels = np.repeat(np.arange(3), 5)
    ids = np.arange(15) + 100
    a = make_balanced_subset(labels, ids, per_class=2, seed=0)
    assert a == make_balanced_subset(labels, ids, per_class=2, seed=0)
    assert [labels[i - 100] for i in a] == [0, 1, 2, 0, 1, 2]
    assert make_random_subset(100, 10, seed=0) == make_random_subset(100, 10, seed=0)
    with pytest.raises(ValueError, match="class 0 has only 5"):
        make_balanced_subset(labels, ids, per_class=6, seed=0)


def test_subset_errors() -> None:
    with pytest.raises(UnknownSubsetError, match="did you mean 'test100-v1'"):
        get_subset("digits", "test10-v1")
    bogus = EvalSubset("digits-bogus", "digits", "test", (0, 999_999))
    with pytest.raises(KeyError, match="999999"):
        select(load_dataset("digits"), bogus)
    with pytest.raises(ValueError, match="twice"):
        EvalSubset("dup", "digits", "test", (1, 1))


def test_subset_hash_ignores_id_but_not_order() -> None:
    a = EvalSubset("a", "digits", "test", (1, 2, 3))
    assert a.sha256 == EvalSubset("b", "digits", "test", (1, 2, 3)).sha256
    assert a.sha256 != EvalSubset("a", "digits", "test", (3, 2, 1)).sha256
    assert a.sha256 != EvalSubset("a", "digits", "train", (1, 2, 3)).sha256


# -- CIFAR-10 on a tiny folder in the real format ---------------------------------------------
def _batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _write(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write(folder / f"data_batch_{i}", _batch(20, i), protocol=2 if i % 2 else 5)
    _write(folder / "test_batch", _batch(20, 0))
    return tmp_path


def test_cifar10_tiny_folder(cifar_root: Path) -> None:
    for root in (cifar_root, cifar_root / "cifar-10-batches-py"):
        ds = load_cifar10(root=root)
        assert ds.image_shape == (3, 32, 32) and ds.num_classes == 10
        assert ds.train.x.shape == (100, 3, 32, 32) and ds.test.x.shape == (20, 3, 32, 32)
        assert torch.equal(ds.test.ids, torch.arange(20))
        ref = _batch(20, 0)
        data = np.asarray(ref[b"data"]).reshape(20, 3, 32, 32)
        assert torch.allclose(ds.test.x, torch.from_numpy(data).float() / 255)
        assert ds.test.y.tolist() == ref[b"labels"]
        assert ds.train.y[20:40].tolist() == _batch(20, 2)[b"labels"]


def test_random_cifar10_folder_reads_back_through_the_restricted_loader(tmp_path: Path) -> None:
    from benchmark.data.cifar10 import write_random_cifar10

    root = write_random_cifar10(tmp_path, n_test=30, n_train_per_batch=4, seed=3)
    ds = load_cifar10(root=root)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (30, 3, 32, 32)
    assert float(ds.test.x.min()) >= 0 and float(ds.test.x.max()) <= 1
    again = load_cifar10(root=write_random_cifar10(tmp_path / "again", n_test=30,
                                                   n_train_per_batch=4, seed=3))
    assert torch.equal(ds.test.x, again.test.x)  # seeded
    with pytest.raises(ValueError, match="n_test and n_train_per_batch must be >= 1, got 0"):
        write_random_cifar10(tmp_path / "bad", n_test=0)


def test_cifar10_env_var(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENBENCH_CIFAR10", str(cifar_root))
    assert len(load_cifar10().train) == 100


def test_cifar10_missing_names_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(root=where)
    msg = str(err.value)
    assert str(where) in msg and str(where / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg
    assert isinstance(err.value, FileNotFoundError)
    monkeypatch.delenv("GENBENCH_CIFAR10", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DatasetNotFoundError, match="cache/genbench/cifar-10-batches-py"):
        load_cifar10()


def test_cifar10_missing_test_batch(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(MalformedDatasetError, match="test_batch.*missing"):
        load_cifar10(root=cifar_root)


@pytest.mark.parametrize("problem, match", [
    ({b"data": np.zeros((20, 100), np.uint8)}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((20, 3072), np.float32)}, "uint8"),
    ({b"labels": [11] * 20}, "label 11 out of range"),
    ({b"labels": [1] * 19}, "20 integers"),
])
def test_cifar10_malformed_batch(cifar_root: Path, problem: dict[bytes, object],
                                 match: str) -> None:
    bad = {**_batch(20, 3), **problem}
    _write(cifar_root / "cifar-10-batches-py" / "data_batch_3", bad)
    with pytest.raises(MalformedDatasetError, match=match) as err:
        load_cifar10(root=cifar_root)
    assert "data_batch_3" in str(err.value)


def test_cifar10_missing_key(cifar_root: Path) -> None:
    bad = _batch(20, 3)
    del bad[b"labels"]
    _write(cifar_root / "cifar-10-batches-py" / "data_batch_3", bad)
    with pytest.raises(MalformedDatasetError, match="data_batch_3.*labels"):
        load_cifar10(root=cifar_root)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_code_in_pickles(cifar_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    batch = _batch(20, 0)
    batch[b"labels"] = _Evil(marker)
    evil_file = cifar_root / "cifar-10-batches-py" / "test_batch"
    _write(evil_file, batch)
    with pytest.raises(UnsafePickleError) as err:
        load_cifar10(root=cifar_root)
    msg = str(err.value)
    assert "test_batch" in msg and f"{os.system.__module__}.system" in msg
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        restricted_load(evil_file)
    assert not marker.exists()


def test_cifar10_garbage_file(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(MalformedDatasetError, match="data_batch_1"):
        load_cifar10(root=cifar_root)
