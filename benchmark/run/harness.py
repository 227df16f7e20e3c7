"""The harness: plan a suite, run the pending jobs on an executor, write the store.

Resumption is the default: jobs already in the store are not run again (with ``rerun_stale``:
unless their stored code version differs from today's). Tables are not built here:
:mod:`benchmark.report` derives them from the store (the CLI calls
:func:`benchmark.report.tables.write_tables` after a run).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.run.executors import make_executor
from benchmark.run.lock import run_lock
from benchmark.spec.fingerprint import KEY_VERSION
from benchmark.spec.jobs import JobSpec
from benchmark.spec.plan import Plan, plan_suite
from benchmark.spec.stored import plan_record
from benchmark.spec.suite import Suite
from benchmark.store import Store
from benchmark.version import code_version


@dataclass
class RunSummary:
    out: Path
    total_jobs: int
    ran: int
    resumed: int
    errors: int
    wall_s: float
    skipped: list[dict[str, Any]]
    #: the plan the run executed (what :func:`benchmark.report.tables.write_tables` needs)
    plan: Plan


def _backup(path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            shutil.move(str(p), str(p) + f".{stamp}.bak")


def _check_key_version(store: Store, stored: list[dict[str, Any]], db: Path,
                       say: Callable[[str], None]) -> None:
    """Record the job-key version in the store; say so when its jobs were keyed otherwise
    (they cannot resume: every job of the plan is computed again, next to them)."""
    have = store.get_meta("job_key_version")
    if stored and have != str(KEY_VERSION):
        say(f"warning: the {len(stored)} jobs in {db} were keyed by job-key version "
            f"{have or 1}, this code keys by version {KEY_VERSION}: none of them resumes and "
            "the plan's jobs are computed again (use --fresh, or another --out, to start clean)")
    store.set_meta("job_key_version", str(KEY_VERSION))


#: ``(store, plan) -> (fallback jobs to run, defense id -> the flags that called for them)``
FallbackRule = Callable[[Store, Plan], tuple[list[JobSpec], dict[str, list[str]]]]


def run_suite(suite: Suite, out: str | Path, *, executor: str = "local",
              workers: int | None = None, device: str | None = None, limit: int | None = None,
              fresh: bool = False, retry_errors: bool = False, rerun_stale: bool = False,
              progress: str = "bar",
              ray_address: str | None = None,
              log: Callable[[str], None] | None = None,
              fallbacks: FallbackRule | None = None) -> RunSummary:
    """Run (or resume) a suite into ``out``: ``runs.sqlite`` (the store), the effective
    ``suite.toml`` and ``plan.json``. Tables are derived afterwards by
    :func:`benchmark.report.tables.write_tables`.

    ``retry_errors`` recomputes stored jobs that errored; ``rerun_stale`` recomputes stored jobs
    whose code version (:func:`benchmark.version.code_version` when they ran) is not today's.

    ``fallbacks(store, plan) -> (jobs, evidence)`` decides, after every ordinary job has run,
    which of ``plan.fallback`` (attacks with ``when = "masking"``) to run too (the CLI passes
    :func:`benchmark.report.fallback.fallback_jobs`; the run layer does not read flags
    itself); None runs none."""
    t0 = time.perf_counter()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    # one run per folder (RunLockedError names the holder); taken before anything else, so
    # before --fresh moves the store aside
    with run_lock(out):
        return _run_locked(suite, out, t0=t0, say=say, executor=executor, workers=workers,
                           device=device, limit=limit, fresh=fresh, retry_errors=retry_errors,
                           rerun_stale=rerun_stale, progress=progress, ray_address=ray_address,
                           fallbacks=fallbacks)


def _run_locked(suite: Suite, out: Path, *, t0: float, say: Callable[[str], None],
                executor: str, workers: int | None, device: str | None, limit: int | None,
                fresh: bool, retry_errors: bool, rerun_stale: bool, progress: str,
                ray_address: str | None, fallbacks: FallbackRule | None) -> RunSummary:
    ex = make_executor(executor, workers=workers, device=device, ray_address=ray_address,
                       num_cpus=suite.num_cpus, num_gpus=suite.num_gpus,
                       job_timeout_s=suite.job_timeout_s)
    plan = plan_suite(suite, limit=limit, cache=ex.cache)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "runs.sqlite"
    if fresh and db.exists():
        _backup(db)
        say(f"--fresh: previous store moved aside to {db}.*.bak")
    (out / "suite.toml").write_text(suite.text)

    def write_plan() -> None:
        (out / "plan.json").write_text(json.dumps({
            "suite": suite.name, "source": suite.source, "suite_sha256": suite.sha256,
            "subset": plan.subset.id, "subset_hash": plan.subset.short_hash,
            "limit": limit, "n_samples": len(plan.sample_ids),
            "jobs": [j.key for j in plan.jobs], "skipped": plan.skipped, **plan_record(plan)},
            indent=1))

    write_plan()
    version = code_version()
    with Store(db) as store:
        store.set_meta("suite", suite.name)
        stored = store.jobs()
        _check_key_version(store, stored, db, say)
        finished = {r["key"] for r in stored if r["status"] == "done" or not retry_errors}
        if rerun_stale:
            stale = {r["key"] for r in stored if r["code_version"] != version} & finished
            in_plan = {j.key for j in plan.jobs} & stale
            if in_plan:
                olds = sorted({r["code_version"] for r in stored if r["key"] in in_plan})
                say(f"--rerun-stale: {len(in_plan)} stored jobs of code {', '.join(olds)} are "
                    f"recomputed with code {version}")
            finished -= stale
        # entries that differ only by their ids share a key: computed once, shown under each
        todo = list({j.key: j for j in plan.jobs if j.key not in finished}.values())
        resumed = len(plan.jobs) - len([j for j in plan.jobs if j.key not in finished])
        if resumed:
            say(f"resuming: {resumed} of {len(plan.jobs)} jobs already in {db}")
            relabelled = store.relabel(j for j in plan.jobs if j.key in finished)
            if relabelled:
                say(f"relabelled {relabelled} stored jobs with the suite's current ids")
        for d, a, t, why in dict.fromkeys((s["defense"], s["attack"], s["threat_model"],
                                          s["reason"]) for s in plan.skipped):
            say(f"skipped: {d} / {a} / {t}: {why}")
        shared = Counter(j.key for j in plan.jobs)
        bar = tqdm(total=len(plan.jobs), initial=resumed, desc=f"genbench {suite.name}",
                   unit="job", disable=(progress != "bar"), dynamic_ncols=True)
        counts = {"done": resumed, "errors": 0, "resumed": resumed}
        written: set[str] = set()

        def run_jobs(jobs: list[JobSpec]) -> None:
            for job, result in ex.map(jobs):
                store.write(job, result, version)
                written.add(job.key)
                counts["done"] += 1
                if result.status != "done":
                    counts["errors"] += 1
                    say(f"error: {job.label()}: {result.error}")
                bar.update(shared[job.key])  # the plan's jobs under this key
                if progress == "plain":
                    say(f"[{counts['done']}/{len(plan.jobs)}] {job.label()} "
                        f"{result.status} in {result.wall_s:.1f}s")

        try:
            run_jobs(todo)
            # phase 2: the fallbacks of the defenses whose rows now show masking
            extra, masked = (fallbacks(store, plan) if fallbacks is not None and plan.fallback
                             else ([], {}))
            if extra:
                for did, flags in sorted(masked.items()):
                    ids = sorted({j.attack_id for j in extra if j.defense.id == did})
                    if ids:
                        say(f"masking evidence on {did} ({', '.join(flags)}): fallback attacks "
                            f"{', '.join(ids)}")
                plan.jobs.extend(extra)
                write_plan()
                shared.update(j.key for j in extra)
                bar.total = len(plan.jobs)
                have = finished | written
                more = list({j.key: j for j in extra if j.key not in have}.values())
                again = len([j for j in extra if j.key in have])
                counts["done"] += again
                counts["resumed"] += again
                bar.update(again)
                todo += more
                run_jobs(more)
        finally:
            bar.close()
    return RunSummary(out, len(plan.jobs), len(todo), counts["resumed"], counts["errors"],
                      time.perf_counter() - t0, plan.skipped, plan)


def default_progress() -> str:
    return os.environ.get("GENBENCH_PROGRESS", "bar" if sys.stderr.isatty() else "plain")
