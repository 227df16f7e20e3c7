"""The model zoo: shipped weights, hash checks, manifest updates, the undefended baseline."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmark.data import load_dataset
from benchmark.data.subsets import get_subset, select
from benchmark.plugins.builtin import DEFENSES
from benchmark.zoo import (
    UnknownModelError,
    ZooEntry,
    ZooHashError,
    file_sha256,
    get_entry,
    list_models,
    load_entry,
    load_model,
    register_model,
)
from benchmark.zoo.cnn import DigitsCNN


def test_shipped_digits_cnn() -> None:
    assert "digits-cnn" in list_models()
    entry = get_entry("digits-cnn")
    assert entry.dataset == "digits" and entry.arch == "benchmark.zoo.cnn:DigitsCNN"
    path = entry.path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    assert file_sha256(path) == entry.sha256
    assert entry.metrics["clean_acc_test"] >= 0.97

    net = load_model("digits-cnn")
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    x, y, _ = select(load_dataset("digits"), get_subset("digits", "test100-v1"))
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97


def test_tampered_weights_raise(tmp_path: Path) -> None:
    entry = get_entry("digits-cnn")
    data = bytearray(entry.path().read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "digits-cnn.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ZooHashError) as err:
        load_entry(dataclasses.replace(entry, file=str(bad)))
    msg = str(err.value)
    assert str(bad) in msg and entry.sha256 in msg and file_sha256(bad) in msg
    with pytest.raises(ZooHashError, match="digits-cnn.safetensors"):
        load_model("digits-cnn", weights_dir=tmp_path)


def test_weights_dir_copy_loads(tmp_path: Path) -> None:
    shutil.copy(get_entry("digits-cnn").path(), tmp_path)
    net = load_model("digits-cnn", weights_dir=tmp_path)
    assert isinstance(net, DigitsCNN)


def test_unknown_model_suggests() -> None:
    with pytest.raises(UnknownModelError, match="did you mean 'digits-cnn'"):
        load_model("digit-cnn")


def test_register_model_in_tmp_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    weights = tmp_path / "weights" / "tiny.safetensors"
    weights.parent.mkdir()
    net = DigitsCNN(width=4, hidden=8)
    save_file(net.state_dict(), str(weights))
    entry = ZooEntry(name="tiny", arch="benchmark.zoo.cnn:DigitsCNN",
                     arch_kwargs={"width": 4, "hidden": 8}, dataset="digits", file="",
                     sha256="")
    stored = register_model(entry, weights, manifest=manifest)
    assert stored.file == "weights/tiny.safetensors"
    assert stored.sha256 == file_sha256(weights)
    assert json.loads(manifest.read_text())["tiny"]["sha256"] == stored.sha256
    assert list_models(manifest=manifest) == ["tiny"]
    loaded = load_model("tiny", manifest=manifest)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), net(x).detach())
    # registering again replaces, and leaves no temporary files behind
    register_model(dataclasses.replace(entry, trained_by="again"), weights, manifest=manifest)
    assert get_entry("tiny", manifest=manifest).trained_by == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights"]


def test_undefended_baseline() -> None:
    defense = DEFENSES.get("undefended")(model="digits-cnn")
    assert defense.kind == "classifier" and not defense.stochastic
    assert defense.num_classes == 10 and defense.nfe_per_call == 1
    x = load_dataset("digits").test.x[:4]
    assert defense(x).shape == (4, 10)
    assert torch.equal(defense(x), defense(x))
