"""The classifier trainer, at smoke scale (the shipped model is trained by the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark.plugins.builtin import TRAINERS
from benchmark.train.classifier import random_shift, train
from benchmark.zoo import ZooEntry, file_sha256, get_entry, load_entry


def test_train_smoke(tmp_path: Path) -> None:
    manifest_before = get_entry("digits-cnn")
    info = train(dataset="digits", max_steps=5, out_dir=tmp_path, register=False,
                 progress=False)
    assert info["steps"] == 5 and info["name"] == "digits-cnn"
    path = Path(info["path"])
    assert path.parent == tmp_path and path.is_file()
    assert info["sha256"] == file_sha256(path)
    assert 0.0 <= info["clean_acc_test"] <= 1.0
    assert not info["registered"]
    assert get_entry("digits-cnn") == manifest_before  # the shipped zoo is untouched

    state = load_file(str(path))
    assert "classifier.3.weight" in state
    entry = ZooEntry(name="smoke", arch="benchmark.zoo.cnn:DigitsCNN",
                     arch_kwargs={"in_channels": 1, "image_size": 16, "num_classes": 10},
                     dataset="digits", file=str(path), sha256=info["sha256"])
    net = load_entry(entry)
    assert net(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_train_is_seeded(tmp_path: Path) -> None:
    a = train(max_steps=3, out_dir=tmp_path / "a", register=False, progress=False)
    b = train(max_steps=3, out_dir=tmp_path / "b", register=False, progress=False)
    assert a["sha256"] == b["sha256"]


def test_trainer_registered() -> None:
    assert TRAINERS.get("classifier") is train


def test_random_shift_moves_content() -> None:
    x = torch.zeros(64, 1, 5, 5)
    x[:, :, 2, 2] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), torch.ones(64))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 5, pos % 5
    assert rows.min() >= 1 and rows.max() <= 3 and cols.min() >= 1 and cols.max() <= 3
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1


def test_train_rejects_bad_budgets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        train(max_steps=0, out_dir=tmp_path, register=False, progress=False)
