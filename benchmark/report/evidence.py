"""Per-sample evidence from a run's store: correct-counts per row (the ``worst_case`` row the
minimum over attacks), majority outcomes, the attacks' extras and the clean jobs' gradient
diagnostics. The leaderboard's flags and ``genbench compare``'s paired tests read it."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmark.spec.jobs import CLEAN, SINGLE_STEP, JobSpec
from benchmark.spec.plan import Plan
from benchmark.store import Store

WORST = "worst_case"

RowKey = tuple[str, str, str, float]  # (defense, attack, threat model, eps)


@dataclass
class FlagEvidence:
    """What the store knows beyond the rows."""

    #: attack row -> the attack's per-batch extras of every job (shard) of the row.
    extras: dict[RowKey, list[dict[str, Any]]] = field(default_factory=dict)
    #: attack row -> per-sample binary robust outcome (majority of K of min(clean, adv)).
    robust: dict[RowKey, dict[int, int]] = field(default_factory=dict)
    #: defense id -> gradient diagnostics of its clean job (see benchmark.run.diagnostics).
    diagnostics: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: threat model -> smallest epsilon at which every image reaches the uniform gray image.
    sanity_eps: dict[str, float] = field(default_factory=dict)
    #: (defense, attack, threat) -> (samples still classified correctly, samples) of the
    #: unconstrained probe: the attack at an epsilon that allows any image.
    probes: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    #: chance accuracy (1 / number of classes); None disables the sanity flag.
    chance: float | None = None
    #: attack row -> evidence name -> sample id -> the attack's per-sample evidence
    #: (:data:`benchmark.api.attack.EVIDENCE_KEYS`: any adversarial iterate, binned loss curve,
    #: the surrogate's verdict), merged over the row's jobs.
    per_sample: dict[RowKey, dict[str, dict[int, Any]]] = field(default_factory=dict)
    #: (defense, threat, eps) -> sample id -> majority verdict (1 robust) of the cell's
    #: single-step probe (the robust outcome against the adversarial example alone).
    single_step: dict[tuple[str, str, float], dict[int, int]] = field(default_factory=dict)


def row_key(r: Any) -> RowKey:
    """A leaderboard row's key; a density defense's clean row has no threat model and no
    epsilon (``""`` and ``-1.0``)."""
    import pandas as pd

    threat = "" if pd.isna(r["threat_model"]) else str(r["threat_model"])
    eps = -1.0 if pd.isna(r["eps"]) else float(r["eps"])
    return (str(r["defense"]), str(r["attack"]), threat, eps)


def _rows(store: Store, jobs: Sequence[JobSpec] | Sequence[str] | None) -> list[dict[str, Any]]:
    """Stored rows of a plan's jobs (labelled by the plan), of job keys (labelled as stored),
    or of every job (None)."""
    if jobs and not isinstance(jobs[0], str):
        return store.jobs_of(jobs)  # type: ignore[arg-type]
    return store.jobs(jobs)  # type: ignore[arg-type]


def sample_counts(store: Store, jobs: Sequence[JobSpec] | Sequence[str] | None = None
                  ) -> tuple[dict[RowKey, dict[int, int]], dict[RowKey, dict[int, int]],
                             dict[RowKey, int]]:
    """Per-sample correct-counts from the store's finished jobs (``jobs``: the plan's jobs,
    or their keys): ``(clean, robust, k)`` keyed by row, where ``clean`` and ``robust`` map
    sample ids to the clean and ``min(clean, adversarial)`` counts, and ``worst_case`` rows take
    the minimum over the attacks, diagnostic ones (fixed-noise) left out, exactly as
    :mod:`benchmark.report.leaderboard` scores them."""
    from benchmark.plugins.traits import is_diagnostic

    rows = [j for j in _rows(store, jobs) if j["status"] == "done"
            and not j["spec"].get("probe")]  # probes are evidence, not rows
    samples = store.samples({j["key"] for j in rows})
    clean: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    adv: dict[tuple[str, str, str, str, float], dict[int, int]] = defaultdict(dict)
    k_of: dict[tuple[str, str], int] = {}
    diagnostic: set[str] = set()
    for job in rows:
        dkey = (job["defense"], json.dumps(job["spec"]["defense_params"], sort_keys=True))
        k_of[dkey] = job["k"]
        attack = job["spec"].get("attack")
        if attack and is_diagnostic(attack["name"]):
            diagnostic.add(job["attack"])
        target = clean[dkey] if job["attack"] == CLEAN else adv[
            (*dkey, job["attack"], job["threat"], float(job["eps"]))]
        for sid, correct, _, _ in samples[job["key"]]:
            target[sid] = correct
    out_clean: dict[RowKey, dict[int, int]] = {}
    out_robust: dict[RowKey, dict[int, int]] = {}
    out_k: dict[RowKey, int] = {}
    for (did, dparams, aid, threat, eps), counts in adv.items():
        dkey = (did, dparams)
        robust = {s: min(clean[dkey].get(s, 0), c) for s, c in counts.items()}
        keys = [(did, aid, threat, eps)] + ([] if aid in diagnostic else
                                            [(did, WORST, threat, eps)])
        for key in keys:
            if key[1] == WORST and key in out_robust:
                cell = out_robust[key]
                for s, c in robust.items():
                    cell[s] = min(cell.get(s, c), c)
            else:
                out_robust[key] = dict(robust)
            out_clean[key] = {s: clean[dkey].get(s, 0) for s in out_robust[key]}
            out_k[key] = k_of[dkey]
    return out_clean, out_robust, out_k


def majority(counts: dict[int, int], k: int) -> dict[int, int]:
    return {s: int(2 * c > k) for s, c in counts.items()}


def collect_evidence(store: Store, plan: Plan | None = None) -> FlagEvidence:
    """Evidence for :func:`compute_flags` from a run's store (restricted to ``plan``'s jobs)."""
    jobs = plan.jobs if plan is not None else None
    ev = FlagEvidence()
    for job in _rows(store, jobs):
        if job["status"] != "done":
            continue
        if job["attack"] == CLEAN:
            diag = job["extras"].get("grad_diagnostics")
            if diag and isinstance(diag[0], dict) and "error" not in diag[0]:
                ev.diagnostics[job["defense"]] = diag[0]
            continue
        if job["spec"].get("probe") == SINGLE_STEP:
            cell = (str(job["defense"]), str(job["threat"]), float(job["eps"]))
            ev.single_step[cell] = {sid: int(2 * c > job["k"]) for sid, c, _, _ in
                                   store.samples([job["key"]])[job["key"]]}
            continue
        if job["spec"].get("probe"):
            robust = sum(2 * c > job["k"] for _, c, _, _ in store.samples([job["key"]])[
                job["key"]])
            n = len(job["spec"]["sample_ids"])
            ev.probes[(job["defense"], job["attack"], job["threat"])] = (robust, n)
            continue
        key = (job["defense"], job["attack"], job["threat"], float(job["eps"]))
        ev.extras.setdefault(key, []).append(job["extras"])
        _merge_per_sample(ev.per_sample.setdefault(key, {}), job["extras"].get("evidence"))
    _, robust, k_of = sample_counts(store, jobs)
    ev.robust = {key: majority(c, k_of[key]) for key, c in robust.items()}
    if plan is not None:
        ev.sanity_eps, ev.chance = sanity_for(plan)
    return ev


def _merge_per_sample(into: dict[str, dict[int, Any]], batches: Any) -> None:
    """Fold a job's stored ``extras["evidence"]`` (one dict of lists per batch, aligned with
    its ``sample_ids``) into ``into``; malformed entries (a hand-edited store) are skipped."""
    if not isinstance(batches, list):
        return
    for batch in batches:
        if not isinstance(batch, dict) or not isinstance(batch.get("sample_ids"), list):
            continue
        ids = batch["sample_ids"]
        for name, values in batch.items():
            if name == "sample_ids" or not isinstance(values, list) or len(values) != len(ids):
                continue
            into.setdefault(name, {}).update(zip((int(i) for i in ids), values, strict=True))


def sanity_for(plan: Plan) -> tuple[dict[str, float], float | None]:
    """Sanity epsilons of a plan's dataset: l-inf 0.5 and l2 ``0.5 sqrt(d)`` reach the uniform
    gray image from any image in [0, 1]^d; chance is one over the number of classes."""
    from benchmark.data import load_dataset
    from benchmark.spec.suite import thaw

    ds = load_dataset(plan.suite.dataset, **(thaw(plan.suite.dataset_params) or {}))
    d = int(ds.test.x[0].numel())
    return {"linf": 0.5, "l2": 0.5 * math.sqrt(d)}, 1.0 / ds.num_classes
