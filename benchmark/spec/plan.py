"""The plan: a suite expanded into jobs.

Expansion runs every compatible (defense, attack, threat model, epsilon) combination of a suite
on shards of its evaluation subset, plus one clean job per defense configuration and shard;
incompatible combinations are listed as skipped, with the reason. Classifiers also get probe
jobs, evidence for the validity flags and never rows: the unconstrained probe of every
white-box attack (``unconstrained_probe``) and the single-step probe of every cell with an
iterative white-box attack (``single_step_probe``).

Each job carries what the plan resolved in code (plug-in versions, the attack's config and
budget after construction, the defense's defaults, the sha256 of the zoo weights they name; see
:mod:`benchmark.spec.fingerprint`), which its key hashes. Entries that differ only by their
``id`` make jobs of the same key: the harness computes such a job once, and the report shows it
under every label.

Density defenses (``kind = "density"``) are planned the same way: a clean job per shard (log p
of every test image, from which the leaderboard takes the 95%-acceptance threshold) and a job
per compatible density attack, threat model, epsilon and shard. Classification attacks require
``kind:classifier`` and density attacks ``kind:density``, so each is skipped, with the reason,
on the other kind. Job keys do not depend on the defense's kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmark.api.defense import describe
from benchmark.data import load_dataset
from benchmark.data.subsets import EvalSubset, get_subset
from benchmark.plugins.builtin import ATTACKS, THREAT_MODELS
from benchmark.plugins.cache import DefenseCache
from benchmark.plugins.traits import attack_traits
from benchmark.spec import fingerprint
from benchmark.spec.jobs import SINGLE_STEP, JobSpec
from benchmark.spec.suite import PluginSpec, Suite, freeze, thaw


@dataclass
class Plan:
    suite: Suite
    subset: EvalSubset
    sample_ids: tuple[int, ...]
    jobs: list[JobSpec]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: defense id -> kind ("classifier" or "density").
    kinds: dict[str, str] = field(default_factory=dict)
    #: attack id -> {"direction": "lower" | "raise" | None, "start": "test" | "generated" | None}
    #: (class attributes of density attacks, for rows of jobs that errored).
    attack_info: dict[str, dict[str, str | None]] = field(default_factory=dict)
    #: the jobs of fallback attacks (``when = "masking"``), not in ``jobs``: the harness adds
    #: those of the defenses whose first-phase rows show masking (benchmark.report.fallback).
    fallback: list[JobSpec] = field(default_factory=list)


#: appended to an attack's id to name its single-step probe.
SINGLE_STEP_SUFFIX = "@1-step"


def single_step_of(attacks: list[tuple[PluginSpec, Any]]) -> tuple[PluginSpec, Any] | None:
    """The single-step probe of a cell (Carlini et al. 2019, "iterative attacks must beat
    single-step ones"): the first of ``attacks`` (the cell's, in suite order) that is
    white-box, not a diagnostic, iterative (``budget.steps > 1``) and accepts ``steps = 1``,
    rebuilt with one step (a ``step_size`` the suite set for many steps dropped: the attack's
    default for one step is used); its id is the attack's with :data:`SINGLE_STEP_SUFFIX`
    (its draws and examples are never mistaken for the attack's own). None if there is
    none."""
    for a, attack in attacks:
        traits = attack_traits(a.name, dict(a.kwargs()))
        budget = getattr(attack, "budget", None)
        if traits.blackbox or traits.diagnostic or getattr(budget, "steps", 0) <= 1:
            continue
        params = {k: v for k, v in a.kwargs().items() if k != "step_size"}
        params["steps"] = 1
        try:
            built = ATTACKS.get(a.name)(**params)
        except (TypeError, ValueError):  # no "steps" parameter (e.g. AutoAttack's n_iter)
            continue
        return PluginSpec(f"{a.id}{SINGLE_STEP_SUFFIX}", a.name, freeze(params)), built
    return None


def unconstrained_eps(threat: str, dim: int) -> float | None:
    """An epsilon at which the threat model allows any image in [0, 1]^dim (l-inf 1, l2
    sqrt(dim)); None where no epsilon does (StAdv's flow bound, unrestricted)."""
    return {"linf": 1.0, "l2": math.sqrt(dim)}.get(threat)


def plan_suite(suite: Suite, *, limit: int | None = None,
               cache: DefenseCache | None = None) -> Plan:
    """Expand a suite into jobs. Raises on bad input (unknown names, bad budgets) before
    anything runs. Defenses are built (on the CPU) to read their kind and capabilities;
    pass the executor's ``cache`` to build each one once per run."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    ds = load_dataset(suite.dataset, **(thaw(suite.dataset_params) or {}))
    subset = get_subset(suite.dataset, suite.subset)
    ids = tuple(subset.ids[:limit] if limit else subset.ids)
    dim = int(ds.test.x[0].numel())
    cpu = torch.device("cpu")
    cache = cache if cache is not None else DefenseCache()
    common = dict(suite=suite.name, dataset=suite.dataset, dataset_params=suite.dataset_params,
                  subset_id=subset.id, subset_hash=subset.short_hash, seed=suite.seed,
                  k_draws=suite.k_draws, batch_size=suite.batch_size)
    for t in suite.threat_models:
        THREAT_MODELS.get(t.name)  # unknown names fail here, with suggestions
    attacks = []
    for a in suite.attacks:
        cls = ATTACKS.get(a.name)
        try:
            attacks.append((a, cls(**a.kwargs())))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attack {a.id!r} ({a.name}): bad parameters "
                             f"{a.kwargs()}: {exc}") from exc
    zoo = fingerprint.zoo_hashes()
    attack_parts = {a.id: fingerprint.attack_part(a.name, attack) for a, attack in attacks}
    threat_parts = {t.name: fingerprint.threat_part(t.name) for t in suite.threat_models}
    jobs: list[JobSpec] = []
    fallback: list[JobSpec] = []
    skipped: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    info = {a.id: {"direction": getattr(attack, "direction", None),
                   "start": getattr(attack, "start", None)} for a, attack in attacks}
    for d in suite.defenses:
        mine = ids[:d.limit] if d.limit else ids  # a defense's `limit`: its first samples only
        shards = [mine[i:i + suite.shard_size] for i in range(0, len(mine), suite.shard_size)]
        clean_done: set[str] = set()
        for t in suite.threat_models:
            kwargs = d.kwargs(t.name)
            params = freeze(kwargs)
            dpart = fingerprint.defense_part(d.name, kwargs)
            template = JobSpec(defense=d, defense_params=params, attack=None, threat=None,
                               eps=None, sample_ids=(), **common)  # type: ignore[arg-type]
            defense = template.build_defense(cache, cpu)
            kind, _, _ = describe(defense)
            kinds[d.id] = kind
            if kind not in ("classifier", "density"):
                skipped.append(dict(defense=d.id, attack="*", threat_model=t.name, eps=None,
                                    reason=f"defense kind {kind!r} is not scored (expected "
                                           "'classifier' or 'density')"))
                continue
            if params not in clean_done:
                clean_done.add(params)
                resolved = freeze(fingerprint.resolve(dpart, kwargs, None, None, None, zoo))
                jobs += [JobSpec(defense=d, defense_params=params, attack=None, threat=None,
                                 eps=None, sample_ids=s, shard=i, resolved=resolved,
                                 **common)  # type: ignore[arg-type]
                         for i, s in enumerate(shards)]
            planned: set[str] = set()
            planned_at: set[tuple[str, float]] = set()
            for a, attack in attacks:
                for eps in t.eps:
                    reason: str | None
                    if a.threat_models is not None and t.name not in a.threat_models:
                        reason = f"suite restricts {a.id} to {list(a.threat_models)}"
                    elif a.eps is not None and eps not in a.eps:
                        reason = f"suite restricts {a.id} to eps {list(a.eps)}"
                    elif a.paired_with is not None and d.id not in a.paired_with:
                        reason = f"suite restricts {a.id} to defenses {list(a.paired_with)}"
                    elif d.paired_with is not None and a.id not in d.paired_with:
                        reason = f"suite restricts {d.id} to attacks {list(d.paired_with)}"
                    else:
                        reason = attack.incompatibility(defense, THREAT_MODELS.get(t.name)(eps))
                    if reason:
                        skipped.append(dict(defense=d.id, attack=a.id, threat_model=t.name,
                                            eps=eps, reason=reason))
                        continue
                    resolved = freeze(fingerprint.resolve(
                        dpart, kwargs, attack_parts[a.id], a.kwargs(), threat_parts[t.name], zoo))
                    made = [JobSpec(defense=d, defense_params=params, attack=a, threat=t.name,
                                    eps=eps, sample_ids=s, shard=i, resolved=resolved,
                                    **common)  # type: ignore[arg-type]
                            for i, s in enumerate(shards)]
                    if a.when is not None:  # a fallback: planned, run only on masking evidence
                        fallback += made
                        continue
                    jobs += made
                    planned.add(a.id)
                    planned_at.add((a.id, eps))
            # the unconstrained probe of every white-box attack that runs here (Pintor et al.)
            wide = unconstrained_eps(t.name, dim)
            for a, attack in attacks:
                if (kind != "classifier" or a.id not in planned or wide is None
                        or suite.unconstrained_probe < 1):
                    continue
                traits = attack_traits(a.name, dict(a.kwargs()))
                if (traits.blackbox or traits.diagnostic
                        or attack.incompatibility(defense, THREAT_MODELS.get(t.name)(wide))):
                    continue
                resolved = freeze(fingerprint.resolve(
                    dpart, kwargs, attack_parts[a.id], a.kwargs(), threat_parts[t.name], zoo))
                jobs.append(JobSpec(defense=d, defense_params=params, attack=a, threat=t.name,
                                    eps=wide, sample_ids=tuple(mine[:suite.unconstrained_probe]),
                                    shard=0, resolved=resolved, probe=True,
                                    **common))  # type: ignore[arg-type]
            # the single-step probe of every cell with an iterative white-box attack (Carlini)
            if kind != "classifier" or suite.single_step_probe < 1:
                continue
            for eps in t.eps:
                single = single_step_of([(a, attack) for a, attack in attacks
                                         if (a.id, eps) in planned_at])
                if single is None:
                    continue
                spec, built = single
                resolved = freeze(fingerprint.resolve(
                    dpart, kwargs, fingerprint.attack_part(spec.name, built), spec.kwargs(),
                    threat_parts[t.name], zoo))
                jobs.append(JobSpec(defense=d, defense_params=params, attack=spec,
                                    threat=t.name, eps=eps,
                                    sample_ids=tuple(mine[:suite.single_step_probe]), shard=0,
                                    resolved=resolved, probe=SINGLE_STEP,
                                    **common))  # type: ignore[arg-type]
    del ds
    return Plan(suite, subset, ids, jobs, skipped, kinds, info, fallback)

