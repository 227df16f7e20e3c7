"""Adversarial training (``genbench train cnn-at``) at smoke scale, and the shipped model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from attacks.pgd import PGD
from benchmark.data import load_dataset
from benchmark.data.subsets import get_subset, select
from benchmark.plugins.builtin import TRAINERS
from benchmark.train.classifier import train_adversarial
from benchmark.zoo import ZooEntry, file_sha256, get_entry, list_models, load_entry, load_model
from threat_models.linf import LinfThreat


def test_train_adversarial_smoke(tmp_path: Path) -> None:
    before = {n: get_entry(n) for n in list_models()}
    # eval_steps=2 keeps the recorded robust metrics cheap; the shipped model uses 50.
    info = train_adversarial(max_steps=3, out_dir=tmp_path, register=False, progress=False,
                             eval_steps=2)
    assert info["steps"] == 3 and info["name"] == "digits-cnn-at" and not info["registered"]
    assert info["eps"] == 0.1 and info["attack_steps"] == 10
    path = Path(info["path"])
    assert path.parent == tmp_path and path.is_file()
    assert info["sha256"] == file_sha256(path)
    for key in ("clean_acc_test", "pgd2_acc_linf_0.05", "pgd2_acc_linf_0.1"):
        assert 0.0 <= info[key] <= 1.0
    assert {n: get_entry(n) for n in list_models()} == before  # the shipped zoo is untouched

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["genbench"])
    assert meta["eps"] == 0.1 and meta["attack_steps"] == 10 and meta["steps"] == 3
    entry = ZooEntry(name="smoke", arch=meta["arch"], arch_kwargs=meta["arch_kwargs"],
                     dataset="digits", file=str(path), sha256=info["sha256"])
    net = load_entry(entry)
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_train_adversarial_is_seeded(tmp_path: Path) -> None:
    a, b = (train_adversarial(max_steps=2, out_dir=tmp_path / d, register=False,
                              progress=False, eval_steps=1) for d in "ab")
    assert a["sha256"] == b["sha256"]


@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf"), "abc", True, None])
def test_bad_eps_is_named(eps: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"got {eps!r}")):
        train_adversarial(eps=eps, max_steps=1, out_dir=tmp_path,  # type: ignore[arg-type]
                          register=False, progress=False)
    assert not any(tmp_path.iterdir())  # rejected before training


def test_bad_attack_steps_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="attack_steps.*got 0"):
        train_adversarial(attack_steps=0, out_dir=tmp_path, register=False, progress=False)


def test_trainer_registered() -> None:
    assert TRAINERS.get("cnn-at") is train_adversarial


def test_shipped_digits_cnn_at_entry() -> None:
    entry = get_entry("digits-cnn-at")
    assert entry.trained_by == "genbench train cnn-at --dataset digits --seed 0"
    assert entry.metrics["train_eps"] == 0.1 and entry.metrics["train_attack_steps"] == 10
    assert entry.metrics["clean_acc_test"] >= 0.9
    assert entry.metrics["pgd50_acc_linf_0.1"] >= 0.5
    assert file_sha256(entry.path()) == entry.sha256


def _pgd_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    res = PGD(steps=10, random_start=False).run(net, x, y, LinfThreat(0.1))
    with torch.no_grad():
        return (net(res.x_adv).argmax(1) == y).float().mean().item()


def test_shipped_digits_cnn_at_is_more_robust() -> None:
    x, y, _ = select(load_dataset("digits"), get_subset("digits", "test100-v1"))
    x, y = x[:50], y[:50]
    at = load_model("digits-cnn-at")  # sha256-checked
    plain = load_model("digits-cnn")
    with torch.no_grad():
        assert (at(x).argmax(1) == y).float().mean().item() >= 0.9
    acc_at, acc_plain = _pgd_accuracy(at, x, y), _pgd_accuracy(plain, x, y)
    assert acc_plain <= 0.2
    assert acc_at >= acc_plain + 0.5, (acc_at, acc_plain)  # measured: 0.80 vs 0.04
