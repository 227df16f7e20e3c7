"""The harness: expand a suite into jobs, run the pending ones, write the store and tables.

Expansion runs every compatible (defense, attack, threat model, epsilon) combination of a suite
on shards of its evaluation subset, plus one clean job per defense configuration and shard;
incompatible combinations are listed as skipped, with the reason. Resumption is the default:
jobs already in the store are not run again.

Density defenses (``kind = "density"``) are planned the same way: a clean job per shard (log p
of every test image, from which the leaderboard takes the 95%-acceptance threshold) and a job
per compatible density attack, threat model, epsilon and shard. Classification attacks require
``kind:classifier`` and density attacks ``kind:density``, so each is skipped, with the reason,
on the other kind. Job keys do not depend on the defense's kind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.data import load_dataset
from benchmark.data.subsets import EvalSubset, get_subset
from benchmark.defense import describe
from benchmark.executors import make_executor
from benchmark.jobs import JobSpec
from benchmark.registries import ATTACKS, THREAT_MODELS
from benchmark.runner import CACHE, resolve_device
from benchmark.store import Store
from benchmark.suite import Suite, freeze, thaw


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


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    from benchmark import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "benchmark", "defenses", "attacks", "threat_models"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def plan_suite(suite: Suite, *, limit: int | None = None) -> Plan:
    """Expand a suite into jobs. Raises on bad input (unknown names, bad budgets) before
    anything runs."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    ds = load_dataset(suite.dataset, **(thaw(suite.dataset_params) or {}))
    subset = get_subset(suite.dataset, suite.subset)
    ids = tuple(subset.ids[:limit] if limit else subset.ids)
    cpu = resolve_device("cpu")
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
    jobs: list[JobSpec] = []
    skipped: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    info = {a.id: {"direction": getattr(attack, "direction", None),
                   "start": getattr(attack, "start", None)} for a, attack in attacks}
    for d in suite.defenses:
        mine = ids[:d.limit] if d.limit else ids  # a defense's `limit`: its first samples only
        shards = [mine[i:i + suite.shard_size] for i in range(0, len(mine), suite.shard_size)]
        clean_done: set[tuple[Any, ...]] = set()
        for t in suite.threat_models:
            params = freeze(d.kwargs(t.name))
            probe = JobSpec(defense=d, defense_params=params, attack=None, threat=None, eps=None,
                            sample_ids=(), **common)  # type: ignore[arg-type]
            defense = CACHE.defense(probe, cpu)
            kind, _, _ = describe(defense)
            kinds[d.id] = kind
            if kind not in ("classifier", "density"):
                skipped.append(dict(defense=d.id, attack="*", threat_model=t.name, eps=None,
                                    reason=f"defense kind {kind!r} is not scored (expected "
                                           "'classifier' or 'density')"))
                continue
            if params not in clean_done:
                clean_done.add(params)
                jobs += [JobSpec(defense=d, defense_params=params, attack=None, threat=None,
                                 eps=None, sample_ids=s, shard=i, **common)  # type: ignore[arg-type]
                         for i, s in enumerate(shards)]
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
                    jobs += [JobSpec(defense=d, defense_params=params, attack=a, threat=t.name,
                                     eps=eps, sample_ids=s, shard=i, **common)  # type: ignore[arg-type]
                             for i, s in enumerate(shards)]
    del ds
    return Plan(suite, subset, ids, jobs, skipped, kinds, info)


@dataclass
class RunSummary:
    out: Path
    total_jobs: int
    ran: int
    resumed: int
    errors: int
    wall_s: float
    leaderboard_csv: Path
    leaderboard_md: Path
    skipped: list[dict[str, Any]]


def _backup(path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            shutil.move(str(p), str(p) + f".{stamp}.bak")


def run_suite(suite: Suite, out: str | Path, *, executor: str = "local",
              workers: int | None = None, device: str | None = None, limit: int | None = None,
              fresh: bool = False, retry_errors: bool = False, progress: str = "bar",
              ray_address: str | None = None,
              log: Callable[[str], None] | None = None) -> RunSummary:
    """Run (or resume) a suite into ``out`` and write ``leaderboard.csv`` / ``leaderboard.md``
    (and, for density defenses, the PNG plots of :mod:`benchmark.density_plots` into
    ``out/density/``)."""
    from benchmark.leaderboard import build_leaderboard, write_csv, write_markdown

    t0 = time.perf_counter()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    plan = plan_suite(suite, limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "runs.sqlite"
    if fresh and db.exists():
        _backup(db)
        say(f"--fresh: previous store moved aside to {db}.*.bak")
    (out / "suite.toml").write_text(suite.text)
    (out / "plan.json").write_text(json.dumps({
        "suite": suite.name, "source": suite.source, "suite_sha256": suite.sha256,
        "subset": plan.subset.id, "subset_hash": plan.subset.short_hash,
        "limit": limit, "n_samples": len(plan.sample_ids),
        "jobs": [j.key for j in plan.jobs], "skipped": plan.skipped}, indent=1))
    version = code_version()
    ex = make_executor(executor, workers=workers, device=device, ray_address=ray_address,
                       num_cpus=suite.num_cpus, num_gpus=suite.num_gpus)
    with Store(db) as store:
        store.set_meta("suite", suite.name)
        finished = {r["key"] for r in store.jobs() if r["status"] == "done" or not retry_errors}
        todo = [j for j in plan.jobs if j.key not in finished]
        resumed = len(plan.jobs) - len(todo)
        if resumed:
            say(f"resuming: {resumed} of {len(plan.jobs)} jobs already in {db}")
        for d, a, t, why in dict.fromkeys((s["defense"], s["attack"], s["threat_model"],
                                          s["reason"]) for s in plan.skipped):
            say(f"skipped: {d} / {a} / {t}: {why}")
        errors = 0
        bar = tqdm(total=len(plan.jobs), initial=resumed, desc=f"genbench {suite.name}",
                   unit="job", disable=(progress != "bar"), dynamic_ncols=True)
        try:
            for i, (job, result) in enumerate(ex.map(todo), start=1):
                store.write(job, result, version)
                if result.status != "done":
                    errors += 1
                    say(f"error: {job.label()}: {result.error}")
                bar.update(1)
                if progress == "plain":
                    say(f"[{resumed + i}/{len(plan.jobs)}] {job.label()} "
                        f"{result.status} in {result.wall_s:.1f}s")
        finally:
            bar.close()
        frame = build_leaderboard(store, plan, version)
        if "density" in plan.kinds.values():
            from benchmark.density_metrics import load_density
            from benchmark.density_plots import write_density_plots

            write_density_plots(load_density(store, plan), frame, out / "density")
    csv_path = write_csv(frame, out / "leaderboard.csv")
    md_path = write_markdown(frame, out / "leaderboard.md", plan=plan)
    return RunSummary(out, len(plan.jobs), len(todo), resumed, errors,
                      time.perf_counter() - t0, csv_path, md_path, plan.skipped)


def default_progress() -> str:
    return os.environ.get("GENBENCH_PROGRESS", "bar" if sys.stderr.isatty() else "plain")
