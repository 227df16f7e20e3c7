"""Every registered plug-in, tested the moment it registers (timm's ``test_models.py`` pattern).

* every attack in ``ATTACKS`` runs on a small toy under every threat model it declares (all
  registered threat models when it declares none), at the small parameters of
  :data:`SMALL_ATTACKS`, and its output passes the harness's re-check;
* every defense in ``DEFENSES`` passes the conformance checks of ``genbench check-defense``
  (one case per check, through :func:`benchmark.verify.checks.conformance_cases`) at the small
  parameters of :data:`SMALL_DEFENSES`.

A built-in plug-in missing from those tables fails here, asking its author to add small
parameters. Third-party plug-ins (entry-point names ``dist/name``) are skipped: their own test
suites run :func:`benchmark.verify.checks.parametrize_with_checks`.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.defense import Defense, has_capability
from benchmark.plugins.builtin import ATTACKS, DEFENSES, THREAT_MODELS
from benchmark.verify.checks import ConformanceError, conformance_cases
from tests.toys import TinyCNN

pytestmark = pytest.mark.usefixtures("one_thread")

# -- attacks -----------------------------------------------------------------------------------

#: the smallest budgets that still run every attack's code path (a contract test, not an
#: evaluation). Add an entry when you register an attack.
SMALL_ATTACKS: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 2},
    "eot": {"attack": "pgd", "draws": 2, "steps": 2},
    "bpda": {"attack": "pgd", "steps": 2},
    "stadv": {"steps": 2},
    "autoattack": {"attacks": ["apgd-ce"], "n_iter": 2},
    "torchattacks": {"attack": "PGD", "steps": 2},
    "exact": {"steps": 2},
    "lagrange": {"weights": [0.0, 1.0], "steps": 2},
    "ll-near-sample": {"steps": 2},
    "ll-random-region": {"steps": 2},
    "ll-high-complexity": {"steps": 2},
    "ll-reverse": {"steps": 2},
    "ll-prior-only": {"steps": 2},
    "ll-unrestricted": {"steps": 2},
    "flow-pgd-in": {"steps": 2},
    "flow-pgd-ood": {"steps": 2},
    "flow-uniform": {"samples": 2},
    "pgd-eot": {"steps": 2, "eot_draws": 2},
    "fixed-noise": {"attack": "pgd", "steps": 2},
    # 2 guided reverse-SDE steps of the zoo denoiser, judged by the zoo's digits-cnn
    "scoreag-gat": {"t_star": 0.02, "dt": 0.01, "judge": "digits-cnn"},
    "transfer": {"source": "digits-cnn", "attack": "pgd", "steps": 2},
    "spsa": {"steps": 2, "samples": 4},
    "diffhammer": {"steps": 2, "n_eval": 2},
}

#: attacks backed by an optional library: skipped, with the import error, where it is missing
#: or broken (torchattacks imports torchvision, whose wheel may not match the CPU torch).
OPTIONAL_LIBRARIES = {"torchattacks": "torchattacks"}

#: (attack, threat model) pairs an attack declares (or accepts by default) but refuses in
#: ``incompatibility``, with a word its reason must contain.
EXPECTED_INCOMPATIBLE = {
    ("torchattacks", "l2"): "linf attack",  # torchattacks.PGD is an l-inf attack
    ("torchattacks", "stadv"): "flow field",
    ("torchattacks", "lowfreq"): "DCT coefficients",
}

#: attacks that fail on their toy today, with the reason and the error (strict xfail: a fix is
#: reported, and the entry must go).
KNOWN_ATTACK_FAILURES: dict[str, tuple[str, type[Exception]]] = {
}

#: the budget each registered threat model is built with.
THREAT_EPS = {"linf": 0.1, "l2": 0.5, "lowfreq": 0.1, "stadv": 0.05, "unrestricted": 1.0}

#: images per attack run
N_IMAGES = 3


def _third_party(name: str) -> bool:
    return "/" in name


def _attack_cases() -> list[Any]:
    cases: list[Any] = []
    threats = THREAT_MODELS.names()
    for name in ATTACKS.names():
        if _third_party(name):
            cases.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(
                reason=f"third-party attack {name!r}: tested by its own package")))
            continue
        try:
            declared = ATTACKS.get(name).threat_models
        except Exception:  # reported by the test itself, not at collection
            cases.append(pytest.param(name, None, id=name))
            continue
        marks = []
        if name in KNOWN_ATTACK_FAILURES:
            reason, error = KNOWN_ATTACK_FAILURES[name]
            marks.append(pytest.mark.xfail(reason=reason, raises=error, strict=True))
        for threat in sorted(threats if declared is None else declared):
            cases.append(pytest.param(name, threat, id=f"{name}-{threat}", marks=marks))
    return cases


def _small_params(name: str) -> dict[str, Any]:
    if name not in SMALL_ATTACKS:
        pytest.fail(f"attack {name!r} is registered but has no small parameters: add "
                    f"SMALL_ATTACKS[{name!r}] = {{...}} (tiny budgets, e.g. steps=2) in "
                    f"{__name__.replace('.', '/')}.py so that it is tested here")
    return dict(SMALL_ATTACKS[name])


def _require_libraries(name: str) -> None:
    module = OPTIONAL_LIBRARIES.get(name)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or the RuntimeError of a mismatched torchvision
        pytest.skip(f"attack {name!r} needs the optional library {module!r}, which cannot be "
                    f"imported here: {type(exc).__name__}: {exc}")


def _threat(name: str) -> Any:
    if name not in THREAT_EPS:
        if _third_party(name):
            pytest.skip(f"third-party threat model {name!r}: tested by its own package")
        pytest.fail(f"threat model {name!r} is registered but has no budget: add "
                    f"THREAT_EPS[{name!r}] in {__name__.replace('.', '/')}.py")
    return THREAT_MODELS.get(name)(THREAT_EPS[name])


# Toy defenses, cheapest first; an attack runs on the first whose capabilities cover its
# `requires`.

class NoisyPurifier(Defense):
    """``head(purify(x))``: Gaussian input noise from the seeded generator (stochastic, with
    ``reseed``), then a random TinyCNN; differentiable end to end."""

    stochastic = True

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.sigma = sigma
        self.num_classes = 10

    def purify(self, x: Tensor, *, seed: int | list[int] | None = None) -> Tensor:
        """One draw; ``seed`` replays it (an int for the batch, or one seed per image)."""
        if seed is None:
            noise = torch.randn(x.shape, generator=self.generator_for(x), device=x.device,
                                dtype=x.dtype)
        else:
            seeds = seed if isinstance(seed, list) else None
            gens = [torch.Generator().manual_seed(int(s)) for s in (seeds or [seed])]
            noise = (torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens])
                     if seeds is not None else torch.randn(x.shape, generator=gens[0]))
            noise = noise.to(device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1)

    def head(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.purify(x))


def _digits() -> tuple[Tensor, Tensor]:
    from benchmark.data import load_dataset

    ds = load_dataset("digits")
    return ds.test.x[:N_IMAGES], ds.test.y[:N_IMAGES]


def _tiny_dc() -> nn.Module:
    """A diffusion classifier (``likelihood_objective``) on the optimal denoiser of 2 training
    images per class, T' = 2."""
    from defenses.rdc import OptimalDiffusionClassifier

    return OptimalDiffusionClassifier(per_class=2, timesteps=2, rows_per_batch=256)


def _gaussian_density() -> nn.Module:
    """An exact Gaussian density on 1 x 4 x 4 images (``log_prob_terms``,
    ``sample_from_latent``)."""
    from tests.density_toys import GaussianDensity

    g = torch.Generator().manual_seed(0)
    a = 0.1 * torch.eye(16, dtype=torch.float64) + 0.02 * torch.randn(
        16, 16, dtype=torch.float64, generator=g).tril()
    b = 0.3 + 0.4 * torch.rand(1, 4, 4, dtype=torch.float64, generator=g)
    return GaussianDensity(a, b)


def _density_images() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = (0.5 + 0.15 * torch.randn(N_IMAGES, 1, 4, 4, generator=g)).clamp(0, 1)
    return x, torch.zeros(N_IMAGES, dtype=torch.long)


@dataclass(frozen=True)
class Toy:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor]]


TOYS = (
    Toy("tiny-cnn", TinyCNN, _digits),
    Toy("noisy-purifier", NoisyPurifier, _digits),
    Toy("tiny-dc", _tiny_dc, _digits),
    Toy("gaussian-density", _gaussian_density, _density_images),
)


@functools.cache
def _toy_defense(name: str) -> nn.Module:
    toy = next(t for t in TOYS if t.name == name)
    return toy.build().eval().requires_grad_(False)


#: attacks made for stochastic defenses run on the stochastic toy rather than the cheapest
#: one that their `requires` allow.
PREFERRED_TOY = {"eot": "noisy-purifier", "pgd-eot": "noisy-purifier"}


def _toy_for(attack: Attack) -> Toy:
    preferred = PREFERRED_TOY.get(attack.name)
    for toy in TOYS:
        if preferred is not None and toy.name != preferred:
            continue
        defense = _toy_defense(toy.name)
        if all(has_capability(defense, c) for c in attack.requires):
            return toy
    pytest.fail(f"no toy defense in {__name__}.TOYS declares {sorted(attack.requires)}, "
                f"which {attack.name!r} requires: add one")


@pytest.mark.parametrize("attack_name, threat_name", _attack_cases())
def test_registered_attack_runs_under_each_threat_model(attack_name: str,
                                                        threat_name: str | None) -> None:
    cls = ATTACKS.get(attack_name)  # a plug-in that fails to load fails here
    assert threat_name is not None, f"{attack_name}: could not read its threat models"
    params = _small_params(attack_name)
    _require_libraries(attack_name)
    attack = cls(**params)
    threat = _threat(threat_name)
    toy = _toy_for(attack)
    defense = _toy_defense(toy.name)
    x, y = toy.data()

    reason = attack.incompatibility(defense, threat)
    expected = EXPECTED_INCOMPATIBLE.get((attack_name, threat_name))
    if expected is not None:
        assert isinstance(reason, str) and reason.strip(), (
            f"{attack_name} under {threat_name} should refuse with a reason, got {reason!r}")
        assert expected in reason, reason
        return
    assert reason is None, (
        f"{attack_name} refuses {threat_name} on {toy.name} ({reason}); if the pair cannot "
        f"run, add it to EXPECTED_INCOMPATIBLE, else fix incompatibility()")

    _run_and_check(attack, defense, x, y, threat)


def _run_and_check(attack: Attack, defense: nn.Module, x: Tensor, y: Tensor,
                   threat: Any) -> AttackResult:
    """Run ``attack`` as the harness does and assert the attack contract on its result."""
    name = getattr(attack, "name", type(attack).__name__)
    reseed = getattr(defense, "reseed", None)
    if callable(reseed):
        reseed(0)
    result = attack.run(defense, x, y, threat, generator=torch.Generator().manual_seed(0))

    assert isinstance(result, AttackResult)
    x_adv = result.x_adv
    assert isinstance(x_adv, Tensor)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, (x_adv.shape, x_adv.dtype)
    assert torch.isfinite(x_adv).all()
    # the harness re-check, against the attack's start when it reports one (density attacks)
    x_start = result.extras.get("x_start", x)
    assert isinstance(x_start, Tensor) and x_start.shape == x.shape
    params = None if result.params is None else result.params.detach()
    violation = threat.check(x_start.detach(), x_adv.detach(), params)
    assert violation is None, f"{name} left the {threat.name} threat model: {violation}"
    assert isinstance(result.grad_evals, int) and result.grad_evals >= 0
    json.dumps(attack.config())
    return result


def test_the_contract_check_catches_an_attack_outside_its_budget() -> None:
    from tests.plugins import OverBudget

    x, y = _digits()
    with pytest.raises(AssertionError, match="left the linf threat model"):
        _run_and_check(OverBudget(), _toy_defense("tiny-cnn"), x, y, _threat("linf"))


def test_a_missing_optional_library_skips_with_the_reason(monkeypatch: Any) -> None:
    monkeypatch.setitem(OPTIONAL_LIBRARIES, "some-attack", "no_such_library_here")
    with pytest.raises(pytest.skip.Exception, match="'no_such_library_here'.*ModuleNotFound"):
        _require_libraries("some-attack")


def test_an_attack_without_small_parameters_fails_naming_the_table() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"SMALL_ATTACKS\['new-attack'\]"):
        _small_params("new-attack")


def _registered_attacks() -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.skip(reason="third-party attack"))
            if _third_party(n) else n for n in ATTACKS.names()]


@pytest.mark.parametrize("name", _registered_attacks())
def test_registered_attack_builds_with_defaults_and_serializes(name: str) -> None:
    _require_libraries(name)
    attack = ATTACKS.get(name)()
    assert attack.name == name
    assert isinstance(attack.budget, Budget)
    json.dumps(attack.config())
    assert repr(attack).startswith(type(attack).__name__ + "(")


def test_small_parameter_tables_name_registered_plugins_only() -> None:
    assert not set(SMALL_ATTACKS) - set(ATTACKS.names())
    assert not set(SMALL_DEFENSES) - set(DEFENSES.names())
    assert not {a for a, _ in EXPECTED_INCOMPATIBLE} - set(ATTACKS.names())
    assert not set(PREFERRED_TOY) - set(ATTACKS.names())
    assert set(PREFERRED_TOY.values()) <= {t.name for t in TOYS}


# -- defenses ----------------------------------------------------------------------------------

def _tiny_solver() -> Any:
    from defenses.pfode import Solver

    # 4 Euler steps over [t0, 1]: one fixed Hutchinson z (as the fast solver)
    return Solver("tiny", step=0.25, fresh_noise=False, method="euler")


#: small constructor parameters of each registered defense (the zoo networks, few steps).
#: Add an entry when you register a defense.
SMALL_DEFENSES: dict[str, Callable[[], dict[str, Any]]] = {
    "undefended": dict,
    "dc": lambda: {"timesteps": 2, "rows_per_batch": 512},
    "rdc": lambda: {"timesteps": 2, "steps": 1, "rows_per_batch": 512},
    "dc-optimal": lambda: {"per_class": 2, "timesteps": 2, "rows_per_batch": 512},
    "diffpure": lambda: {"dt": 0.05},  # t* = 0.1: 2 reverse-SDE steps
    "scoreag-gap": lambda: {"dt": 0.05},
    "flow": dict,
    "pfode": lambda: {"attack_solver": _tiny_solver(), "report_solver": _tiny_solver()},
}

#: defenses on the zoo's 1.2M-parameter UNet: their costliest checks (16 draws x 2, attacks)
#: run in the slow lane (``pytest -m slow``); every other check runs always.
ZOO_UNET = frozenset({"dc", "rdc", "diffpure", "scoreag-gap", "pfode"})
SLOW_CHECKS = frozenset({"batch_independence", "smoke_pgd", "smoke_autoattack"})

#: (defense, check) pairs that fail today, with the reason (strict xfail: fixing one is
#: reported).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

#: probe images of the conformance checks
N_PROBE = 2


def _defense_factory(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if name not in SMALL_DEFENSES:
            raise LookupError(f"defense {name!r} is registered but has no small parameters: "
                              f"add SMALL_DEFENSES[{name!r}] in tests/test_registered_plugins.py")
        return DEFENSES.get(name)(**SMALL_DEFENSES[name]())

    build.__name__ = name
    return build


def _defense_cases() -> list[Any]:
    names = [n for n in DEFENSES.names() if not _third_party(n)]
    cases = conformance_cases({n: _defense_factory(n) for n in names}, n=N_PROBE)
    params = []
    for case in cases:
        marks: list[Any] = []
        key = (case.defense_id, case.check.name)
        if key in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[key], strict=True,
                                           raises=ConformanceError))
        if case.defense_id in ZOO_UNET and case.check.name in SLOW_CHECKS:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case.defense, case.check, id=case.id, marks=marks))
    params += [pytest.param(None, None, id=n, marks=pytest.mark.skip(
        reason=f"third-party defense {n!r}: tested by its own package"))
        for n in DEFENSES.names() if _third_party(n)]
    return params


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if not _third_party(n)])
def test_registered_defense_has_small_parameters(name: str) -> None:
    if name not in SMALL_DEFENSES:
        pytest.fail(f"defense {name!r} is registered but has no small parameters: add "
                    f"SMALL_DEFENSES[{name!r}] in tests/test_registered_plugins.py so that "
                    "check-defense runs on it here")


def test_a_defense_without_small_parameters_fails_naming_the_table() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"SMALL_DEFENSES\['new-defense'\]"):
        test_registered_defense_has_small_parameters("new-defense")
    with pytest.raises(LookupError, match=r"SMALL_DEFENSES\['new-defense'\]"):
        _defense_factory("new-defense")()


@pytest.mark.parametrize("defense, check", _defense_cases())
def test_registered_defense_passes_conformance_check(defense: Any, check: Any) -> None:
    check(defense)
