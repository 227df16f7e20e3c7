"""`genbench check-defense`: passes on the baseline, fails (naming the check) on broken defenses;
and its pytest form for plug-in authors, ``parametrize_with_checks``."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from benchmark.cli import main
from benchmark.verify.checks import ConformanceError, parametrize_with_checks
from benchmark.verify.conformance import CHECKS, FAIL, PASS, SKIP, check_defense, run_check
from defenses.baseline import Undefended
from tests.plugins import NoisyDefense, _Wrapped

pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- the pytest decorator for plug-in authors (parametrize_with_checks) ------------------------

def _broken_factory() -> NoisyDefense:
    raise RuntimeError("cannot load the weights")


@parametrize_with_checks([Undefended(), NoisyDefense], smoke=False)
def test_parametrize_with_checks_passes_a_deterministic_and_a_stochastic_defense(defense, check):
    result = check(defense)
    assert result.status == PASS and result.name == check.name


@parametrize_with_checks(
    {"wrong-shape": WrongShape, "batch-dependent": BatchDependent}, smoke=False,
    expected_failed_checks=lambda d: {WrongShape: {"output_shape": "3 logits, not 10"},
                                      BatchDependent: {"batch_independence": "batch stats"}}[d])
def test_parametrize_with_checks_marks_expected_failures_strictly(defense, check):
    # strict xfail with raises=ConformanceError: a check that passed would fail this test
    check(defense)


def _cases(defenses, **kw):
    mark = parametrize_with_checks(defenses, **kw)
    assert mark.args[0] == "defense, check"
    return {p.id: p for p in mark.args[1]}


def test_parametrize_with_checks_makes_one_case_per_check_with_readable_ids():
    cases = _cases({"mine": Undefended})
    assert list(cases) == [f"mine-{name}" for name in ("build", *CHECKS)]
    assert "smoke_pgd" in CHECKS and "smoke_autoattack" in CHECKS
    no_smoke = _cases([Undefended, WrongShape, WrongShape], smoke=False)
    assert "Undefended-nfe" in no_smoke and "WrongShape1-build" in no_smoke
    assert "WrongShape2-output_shape" in no_smoke
    assert not [i for i in no_smoke if "smoke" in i]
    with pytest.raises(TypeError, match="nn.Module or a zero-argument factory"):
        parametrize_with_checks(["defenses.baseline:Undefended"])


@pytest.mark.parametrize("cls, check_name, words", [
    (WrongShape, "output_shape", "expected logits of shape (1, 10)"),
    (RandomButDeclaredDeterministic, "determinism", "declares stochastic=False"),
    (BatchDependent, "batch_independence", "batch mates"),
    (NaNAtEdges, "range_edges", "non-finite output on all-0 images"),
    (WrongNFE, "nfe", "declared nfe_per_call=5"),
])
def test_generated_check_raises_on_a_broken_defense(cls, check_name, words):
    case = _cases([cls()], smoke=False)[f"{cls.__name__}-{check_name}"]
    defense, check = case.values
    with pytest.raises(ConformanceError, match=f"{check_name} failed: .*{re.escape(words)}"):
        check(defense)
    assert isinstance(ConformanceError("x"), AssertionError)  # pytest reports a failure


def test_generated_checks_skip_what_a_failed_prerequisite_blocks():
    cases = _cases([WrongShape()], smoke=False)
    defense, check = cases["WrongShape-determinism"].values
    with pytest.raises(pytest.skip.Exception, match="determinism: needs a passing output_shape"):
        check(defense)
    defense, check = cases["WrongShape-build"].values
    assert check(defense).status == PASS


def test_a_factory_is_built_once_and_a_failing_one_fails_build():
    calls = []

    def factory():
        calls.append(1)
        return Undefended()

    cases = _cases({"counted": factory}, smoke=False)
    for case in cases.values():
        defense, check = case.values
        assert defense is factory
        with contextlib.suppress(pytest.skip.Exception):  # device: no CUDA here
            check(defense)
    assert len(calls) == 1

    broken = _cases({"broken": _broken_factory}, smoke=False)
    defense, check = broken["broken-build"].values
    with pytest.raises(ConformanceError, match="build failed: RuntimeError: cannot load"):
        check(defense)
    defense, check = broken["broken-gradients"].values
    with pytest.raises(pytest.skip.Exception, match="needs a passing build check"):
        check(defense)


def test_run_check_agrees_with_check_defense():
    whole = _by_name(check_defense("defenses.baseline:Undefended", n=4))
    for name in ("build", *CHECKS):
        one = run_check(Undefended(), name, n=4)
        assert (one.name, one.status) == (name, whole[name].status), (one, whole[name])
    with pytest.raises(ValueError, match="unknown conformance check 'speed'"):
        run_check(Undefended(), "speed")


@pytest.mark.parametrize("module", ["benchmark.verify.checks", "benchmark.verify.conformance"])
def test_pytest_is_not_a_runtime_dependency(module):
    path = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert "pytest" not in names


# -- independent draws within a batch -----------------------------------------------------------

def test_broadcast_noise_fails_independent_draws(capsys):
    assert "independent_draws" in CHECKS
    rc = main(["check-defense", "tests.plugins:BroadcastNoiseDefense", "--no-smoke"])
    out = capsys.readouterr().out
    assert rc == 1, out
    line = next(line for line in out.splitlines() if line.split()[1:2] == ["independent_draws"])
    assert line.startswith(FAIL) and "share one noise draw" in line, line
    assert "PASS  determinism" in out  # reproducible after reseed: only this check catches it


def test_independent_draws_passes_per_row_noise_and_skips_deterministic_defenses():
    assert run_check(NoisyDefense(), "independent_draws").status == PASS
    skipped = run_check(Undefended(), "independent_draws")
    assert skipped.status == SKIP and "deterministic" in skipped.why
