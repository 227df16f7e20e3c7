"""Every (defense, attack, threat model) pairing a shipped suite plans runs, on two images, at
the smallest budgets that still take every code path.

A suite is only as trustworthy as its least-tested job: ``digits-dc`` once planned Lagrange on
``dc`` and the job raised, with no test to notice. Here each shipped suite is shrunk
(:func:`shrink`: attack steps, EOT draws, the diffusion classifier's T', the purification
solvers' steps, ...; the plug-ins and their other parameters stay the suite's) and planned
exactly as ``genbench run`` plans it; each distinct pairing then runs through the runner
(:func:`benchmark.run.runner.execute`) and must finish without an error row, with every
returned example inside its threat model. Pairings shared by several suites run once.

The zoo's digits denoiser (1.2 M parameters, ~5 ms per row on one core) is swapped for a tiny
random :class:`~benchmark.zoo.unet.EpsUNet` of the same interface (:func:`tiny_zoo`): this is
a test of the code paths, not of the numbers. The zoo's classifiers and flows are used as
shipped (they are small).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest

from benchmark.plugins.builtin import ATTACKS, DEFENSES
from benchmark.spec.plan import plan_suite
from benchmark.spec.suite import PluginSpec, Suite, freeze, load_suite, shipped_suites, thaw

pytestmark = pytest.mark.usefixtures("one_thread")

#: budget keys and the value each is shrunk to (never raised: min(value, small)).
SMALL = {
    "steps": 2, "n_iter": 2, "n_queries": 8, "eot_draws": 2, "draws": 2, "restarts": 1,
    "timesteps": 2, "lm_timesteps": 2, "select_draws": 2, "samples": 4,
}
#: images per job
N_IMAGES = 2
#: pairings already run by an earlier suite's test in this session (key: names and params)
_DONE: set[str] = set()


def _parameters(cls: Any) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``cls(...)`` accepts, following ``**kwargs`` up the MRO (RDC
    passes DC's keywords on)."""
    out: dict[str, inspect.Parameter] = {}
    for klass in getattr(cls, "__mro__", (cls,)):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
                out.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return out


def _signature_default(cls: Any, name: str) -> Any:
    param = _parameters(cls).get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def shrink(params: dict[str, Any], cls: Any) -> dict[str, Any]:
    """The smallest budgets of ``params`` for plug-in class ``cls``: counts in :data:`SMALL`
    capped, a reverse SDE of ``t_star`` integrated in two steps (``dt = t_star / 2``), and a
    fixed denoiser batch (no throughput probe)."""
    out = dict(params)
    for key, small in SMALL.items():
        if isinstance(out.get(key), int) and not isinstance(out[key], bool):
            out[key] = min(out[key], small)
        elif key not in out and isinstance(_signature_default(cls, key), int) and \
                _signature_default(cls, key) > small:
            out[key] = small  # a costly default (DC's T' = 100, AutoAttack's 100 iterations)
    params = _parameters(cls)
    if "rows_per_batch" in params:  # "auto" times a few batch sizes first: not under test here
        out["rows_per_batch"] = 256
    if "dt" in params:
        t_star = out.get("t_star", _signature_default(cls, "t_star"))
        if isinstance(t_star, int | float):
            out["dt"] = t_star / 2
    return out


def _shrink_spec(spec: PluginSpec, registry: Any) -> PluginSpec:
    cls = registry.get(spec.name)
    by_threat = {t: shrink({**thaw(spec.params), **p}, cls)
                 for t, p in (thaw(spec.params_by_threat) or {}).items()}
    return dataclasses.replace(spec, params=freeze(shrink(thaw(spec.params), cls)),
                               params_by_threat=freeze(by_threat))


def shrunk_suite(suite: Suite) -> Suite:
    return dataclasses.replace(
        suite, k_draws=2, batch_size=N_IMAGES, shard_size=N_IMAGES, unconstrained_probe=0,
        single_step_probe=0,  # the probe is the same attack code with one step
        defenses=tuple(_shrink_spec(d, DEFENSES) for d in suite.defenses),
        attacks=tuple(_shrink_spec(a, ATTACKS) for a in suite.attacks),
        threat_models=suite.threat_models)


#: the zoo models replaced by a tiny random network of the same class and interface
TINY = {"digits-eps": {"base_channels": 8, "channel_mults": (1, 2), "groups": 4}}


@pytest.fixture
def tiny_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmark.zoo.load_model`` returns a tiny seeded random network for the names in
    :data:`TINY` (every plug-in loads zoo models through it, at call time)."""
    import torch

    import benchmark.zoo
    from benchmark.zoo.unet import EpsUNet

    real = benchmark.zoo.load_model
    built: dict[str, Any] = {}

    def load_model(name: str, **kw: Any) -> Any:
        if name not in TINY:
            return real(name, **kw)
        if name not in built:
            torch.manual_seed(0)
            net = EpsUNet(**TINY[name]).eval()
            net.requires_grad_(False)
            built[name] = net
        return built[name]

    monkeypatch.setattr(benchmark.zoo, "load_model", load_model)


def _pairing_key(job: Any) -> str:
    return json.dumps([job.defense.name, thaw(job.defense_params),
                       None if job.attack is None else [job.attack.name, thaw(job.attack.params)],
                       job.threat], sort_keys=True)


#: defenses whose pairings take minutes even at these budgets (second-order gradients through
#: RDC's likelihood maximization under AutoAttack's restarts, the PF-ODE solvers): run by
#: ``make test-slow``. DC's and every other defense's pairings run in every test run.
SLOW_DEFENSES = {"rdc", "pfode"}
#: (suite, defense id) pairs whose code paths another case covers in every test run (the same
#: defense with another zoo classifier): run by ``make test-slow``
SLOW_CASES = {("digits", "diffpure-at"), ("digits", "scoreag-gap-at")}


def _cases() -> list[Any]:
    cases = []
    for name in shipped_suites():
        for d in load_suite(name).defenses:
            slow = d.name in SLOW_DEFENSES or (name, d.id) in SLOW_CASES
            marks = [pytest.mark.slow] if slow else []
            cases.append(pytest.param(name, d.id, id=f"{name}:{d.id}", marks=marks))
    return cases


@pytest.mark.usefixtures("tiny_zoo")
@pytest.mark.parametrize(("name", "defense"), _cases())
def test_every_planned_pairing_runs(name: str, defense: str) -> None:
    from benchmark.data.cifar10 import DatasetNotFoundError
    from benchmark.plugins.cache import DefenseCache
    from benchmark.run.runner import execute

    suite = shrunk_suite(load_suite(name))
    suite = dataclasses.replace(suite, defenses=tuple(d for d in suite.defenses
                                                      if d.id == defense))
    try:
        plan = plan_suite(suite, limit=N_IMAGES)
    except DatasetNotFoundError as exc:  # cifar10: a local copy of the dataset is needed
        pytest.skip(f"suite {name!r} needs its dataset: {exc}")
    jobs = []
    for job in [*plan.jobs, *plan.fallback]:  # fallbacks run where masking shows: test them too
        key = _pairing_key(job)
        if job.shard == 0 and key not in _DONE:
            _DONE.add(key)
            jobs.append(job)
    failures = []
    cache = DefenseCache()  # as the harness: a defense is built once per configuration
    for job in jobs:
        result = execute(job, cache=cache)
        if result.status != "done":
            failures.append(f"{job.label()}: {result.error}")
            continue
        bad = [o.error for o in result.outcomes if o.error]
        if bad:
            failures.append(f"{job.label()}: {bad[0]}")
    assert not failures, (f"{len(failures)} of {len(jobs)} pairings of {name!r} failed:\n"
                          + "\n".join(failures))
