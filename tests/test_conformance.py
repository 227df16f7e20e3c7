"""`genbench check-defense`: passes on the baseline, fails (naming the check) on broken defenses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from benchmark.cli import main
from benchmark.verify.conformance import FAIL, PASS, SKIP, check_defense
from tests.plugins import _Wrapped


class RandomButDeclaredDeterministic(_Wrapped):
    """Declares stochastic = False (the default) but adds fresh noise on every call."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + torch.randn(len(x), 10)


class BatchDependent(_Wrapped):
    """Normalizes logits with batch statistics: a sample's output depends on its batch mates."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out - out.mean(dim=0, keepdim=True)


class NaNAtEdges(_Wrapped):
    """Fine on natural images, NaN on a constant image (0/0 in a per-image normalization)."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(len(x), -1)
        std = flat.std(dim=1).view(-1, 1, 1, 1)
        z = (x - flat.mean(dim=1).view(-1, 1, 1, 1)) / std
        return self.net(z * std + flat.mean(dim=1).view(-1, 1, 1, 1))


class WrongShape(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, :3]


class WrongNFE(_Wrapped):
    nfe_per_call = 5


def _by_name(results):
    return {r.name: r for r in results}


def test_baseline_passes_every_check_with_smoke_run(capsys):
    assert main(["check-defense", "defenses.baseline:Undefended",
                 "--param", 'model="digits-cnn"', "-n", "4"]) == 0
    out = capsys.readouterr().out
    for name in ("output_shape", "range_edges", "determinism", "gradients",
                 "batch_independence", "nfe", "smoke_pgd", "smoke_autoattack"):
        assert f"PASS  {name}" in out, out
    assert "FAIL" not in out
    assert ("SKIP  device" in out) != torch.cuda.is_available()


def test_stochastic_defense_that_reseeds_passes():
    results = _by_name(check_defense("tests.plugins:NoisyDefense", smoke=False))
    assert results["determinism"].status == PASS, results["determinism"]
    assert "reproducible" in results["determinism"].why
    assert results["batch_independence"].status == PASS, results["batch_independence"]
    assert results["smoke_pgd"].status == SKIP


@pytest.mark.parametrize("cls, check, words", [
    ("WrongShape", "output_shape", "expected logits of shape (1, 10)"),
    ("RandomButDeclaredDeterministic", "determinism", "declares stochastic=False"),
    ("BatchDependent", "batch_independence", "batch mates"),
    ("NaNAtEdges", "range_edges", "non-finite output on all-0 images"),
    ("WrongNFE", "nfe", "declared nfe_per_call=5"),
])
def test_broken_defense_fails_naming_the_check(cls, check, words, capsys):
    rc = main(["check-defense", f"tests.test_conformance:{cls}", "--no-smoke"])
    out = capsys.readouterr().out
    assert rc == 1, out
    line = next(line for line in out.splitlines() if line.split()[1:2] == [check])
    assert line.startswith(FAIL), out
    assert words in line, line
    assert f"failed: {check}" in out or f", {check}" in out


def test_wrong_shape_skips_dependent_checks():
    results = _by_name(check_defense("tests.test_conformance:WrongShape", smoke=False))
    assert results["output_shape"].status == FAIL
    assert results["determinism"].status == SKIP
    assert "output_shape" in results["determinism"].why


def test_unbuildable_defense_fails_build(capsys):
    assert main(["check-defense", "tests.test_conformance:Missing", "--no-smoke"]) == 1
    assert "FAIL  build" in capsys.readouterr().out
