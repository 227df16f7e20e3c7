"""A run folder's plan, read back without building any defense.

``genbench run`` writes the effective ``suite.toml`` and ``plan.json`` into its run folder.
``plan.json`` carries, besides the job keys, what reading the store needs and what otherwise
only building every defense would tell (:func:`plan_record`): each defense's kind, the
attacks' density information and every job's full spec. :func:`load_plan` rebuilds the
:class:`~benchmark.spec.plan.Plan` from those two files, so that ``genbench leaderboard``,
``publish`` and ``status`` print a table without loading a single model. Run folders written
before these fields existed (or whose job specs no longer hash to their stored keys, after a
change of the key) fall back to :func:`~benchmark.spec.plan.plan_suite`, which builds the
defenses as the run did.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmark.data.subsets import get_subset
from benchmark.plugins.cache import DefenseCache
from benchmark.spec.jobs import JobSpec
from benchmark.spec.plan import Plan, plan_suite
from benchmark.spec.suite import PluginSpec, Suite, freeze, parse_suite

#: version of the fields :func:`plan_record` adds to ``plan.json``.
PLAN_FORMAT = 1
RUN_FILES = ("runs.sqlite", "suite.toml", "plan.json")


class RunFolderError(ValueError):
    """Not a genbench run folder (a file is missing); the message names the file."""


def plan_record(plan: Plan) -> dict[str, Any]:
    """The fields of ``plan.json`` that :func:`load_plan` rebuilds ``plan`` from (the harness
    adds them to the keys it writes: suite, subset, limit, jobs, skipped, ...)."""
    return {"plan_format": PLAN_FORMAT, "kinds": dict(plan.kinds),
            "attack_info": {k: dict(v) for k, v in plan.attack_info.items()},
            "job_specs": [j.to_json() for j in plan.jobs]}


def check_run_folder(run: str | Path) -> Path:
    """``run`` as a Path; :class:`RunFolderError` naming the missing file otherwise."""
    run = Path(run)
    for name in RUN_FILES:
        if not (run / name).exists():
            raise RunFolderError(f"{run} is not a genbench run folder: {name} is missing "
                                 "(expected the --out folder of `genbench run`)")
    return run


def read_run(run: str | Path) -> tuple[Suite, dict[str, Any]]:
    """The effective suite and the ``plan.json`` record of a run folder."""
    run = check_run_folder(run)
    suite_file = run / "suite.toml"
    suite = parse_suite(suite_file.read_text(), source=str(suite_file))
    return suite, json.loads((run / "plan.json").read_text())


def load_plan(run: str | Path, *, cache: DefenseCache | None = None) -> Plan:
    """The plan of the run folder ``run``, from ``suite.toml`` and ``plan.json`` (no defense is
    built); old run folders fall back to :func:`plan_suite` (``cache`` is passed to it)."""
    suite, record = read_run(run)
    plan = plan_from_record(suite, record)
    if plan is None:
        plan = plan_suite(suite, limit=record.get("limit"), cache=cache)
    return plan


def plan_from_record(suite: Suite, record: dict[str, Any]) -> Plan | None:
    """The plan ``record`` (a ``plan.json``) describes, or None where it cannot say (fields
    missing, a job spec that does not rebuild or does not hash to its recorded key)."""
    needed = ("kinds", "attack_info", "job_specs", "jobs")
    if record.get("plan_format") != PLAN_FORMAT or any(k not in record for k in needed):
        return None
    specs, keys = record["job_specs"], record["jobs"]
    if not isinstance(specs, list) or not isinstance(keys, list) or len(specs) != len(keys):
        return None
    defenses = {d.id: d for d in suite.defenses}
    attacks = {a.id: a for a in suite.attacks}
    jobs = []
    for spec, key in zip(specs, keys, strict=True):
        job = job_from_json(spec, defenses, attacks)
        if job is None or job.key != key:
            return None
        jobs.append(job)
    limit = record.get("limit")
    subset = get_subset(suite.dataset, suite.subset)
    if record.get("subset_hash") not in (None, subset.short_hash):
        return None  # the shipped subset changed since the run: let plan_suite say so
    ids = tuple(subset.ids[:limit] if limit else subset.ids)
    return Plan(suite, subset, ids, jobs, list(record.get("skipped", [])),
                {str(k): str(v) for k, v in record["kinds"].items()},
                {str(k): dict(v) for k, v in record["attack_info"].items()})


_FIELDS = {f.name: f for f in dataclasses.fields(JobSpec)}


def _plugin(data: Any, known: dict[str, PluginSpec]) -> PluginSpec:
    """The suite's entry where it is the same plug-in (keeping its pairing and limits), else a
    plain spec with the recorded id, name and parameters."""
    spec = known.get(str(data["id"]))
    if spec is not None and spec.to_json() == data:
        return spec
    return PluginSpec(str(data["id"]), str(data["name"]), freeze(data.get("params") or {}))


def job_from_json(data: Any, defenses: dict[str, PluginSpec],
                  attacks: dict[str, PluginSpec]) -> JobSpec | None:
    """Inverse of :meth:`JobSpec.to_json` (None if ``data`` does not fit ``JobSpec``)."""
    if not isinstance(data, dict) or set(data) - set(_FIELDS):
        return None
    try:
        kwargs = dict(data)
        kwargs["defense"] = _plugin(data["defense"], defenses)
        kwargs["attack"] = None if data.get("attack") is None else _plugin(data["attack"],
                                                                           attacks)
        kwargs["defense_params"] = freeze(data.get("defense_params") or {})
        kwargs["dataset_params"] = freeze(data.get("dataset_params") or {})
        kwargs["sample_ids"] = tuple(int(i) for i in data["sample_ids"])
        if "resolved" in data:
            kwargs["resolved"] = freeze(data["resolved"])
        return JobSpec(**kwargs)
    except (KeyError, TypeError, ValueError):
        return None
