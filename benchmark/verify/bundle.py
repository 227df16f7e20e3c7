"""Verifiable submission bundles: ``genbench submit`` and ``genbench verify``.

A robustness claim ships its adversarial inputs (RobustBench's rule for external evaluations).
``submit`` packs a run folder into a ``.tar.gz``::

    suite.toml, plan.json, leaderboard.csv     the spec and the claimed rows
    jobs.json                                   every job: spec, key, k, budget, plug-in versions
    outcomes.csv                                per-sample outcomes (job, sample, correct, ...)
    adv/<job key>.safetensors                   x_adv (float32, N x C x H x W) and sample_ids
    environment.json                            python, torch, platform, package versions
    manifest.json                               sha256 of every other file

``verify`` treats everything in a bundle as data, never as code to run:

* it unpacks it safely (absolute paths, ``..``, links, special files, empty and duplicate paths,
  and archives over the size and member limits are refused, naming the member) and checks every
  hash against the manifest (which only proves the files were not changed after packing);
* it rebuilds the plan from a trusted suite (the shipped suite the bundle names, or the
  reviewer's ``--suite``), never from the bundle's own, and compares it with ``jobs.json`` job by
  job: a missing, extra or altered job rejects the bundle. Registries resolve registered names
  only (:func:`benchmark.plugins.registry.registered_only`): code outside them runs only when the
  reviewer names it (``--defense ID=module:Class``, or ``--trust-code``);
* it re-checks every adversarial example against its threat model, and re-scores them on the
  defense rebuilt from the trusted spec, with K and stochasticity from that defense (not from the
  bundle), an attack that pins the defense's noise scored with its pinned draw as the runner
  does; deterministic scores are compared sample by sample with ``outcomes.csv``, near-ties
  (float noise across devices and thread counts) allowed and counted;
* it rebuilds the leaderboard from the re-scored outcomes with the leaderboard's own code (worst
  case without diagnostic attacks) and matches every claimed row to it (epsilons with a
  tolerance): a row with no jobs behind it, a dropped row, and any number that does not follow
  (robust and clean accuracy, n, K, the intervals) reject the bundle; see
  :mod:`benchmark.verify.claims`.

Exit 1, with a one-line reason, on any failure.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import platform
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata as md
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.verify.unpack import (
    DEFAULT_LIMITS,
    FORMAT,
    MANIFEST,
    BundleError,
    Limits,
    MiB,
    check_manifest,
    read_json,
    safe_extract,
)
from benchmark.verify.unpack import sha256 as _sha256

__all__ = ["BundleError", "Limits", "Report", "make_bundle", "safe_extract", "verify_bundle"]

EXIT_FAILED = 1
#: packages whose versions go into environment.json (plus every plug-in distribution)
RELEVANT = ("genbench", "torch", "numpy", "safetensors", "pyautoattack", "torchattacks",
            "torchdiffeq", "pandas", "scikit-learn", "ray")


# -- submit ---------------------------------------------------------------------------------

def _environment(plugin_versions: Iterable[str]) -> dict[str, Any]:
    import torch

    packages: dict[str, str] = {}
    names = list(RELEVANT) + [v.split("==")[0] for v in plugin_versions if "==" in v]
    for name in dict.fromkeys(names):
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    from benchmark.version import code_version

    return {"python": sys.version, "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "code_version": code_version(), "packages": packages}


def _load_run(run: Path) -> tuple[Any, Any]:
    from benchmark.spec.plan import plan_suite
    from benchmark.spec.suite import parse_suite

    for name in ("runs.sqlite", "suite.toml", "plan.json", "leaderboard.csv"):
        if not (run / name).exists():
            raise BundleError(f"{run} is not a finished genbench run folder: {name} is missing")
    suite = parse_suite((run / "suite.toml").read_text(), source=str(run / "suite.toml"))
    record = json.loads((run / "plan.json").read_text())
    plan = plan_suite(suite, limit=record.get("limit"))
    # the fallbacks the run added on masking evidence are in its plan.json
    ran = set(record.get("jobs") or [])
    planned = {j.key for j in plan.jobs}
    plan.jobs.extend(j for j in plan.fallback if j.key in ran and j.key not in planned)
    return suite, plan


def make_bundle(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Pack the run folder ``run`` into the bundle ``out``; returns the manifest."""
    from safetensors.numpy import save as st_save

    from benchmark.data import load_dataset
    from benchmark.spec.suite import thaw
    from benchmark.store import Store

    run = Path(run)
    suite, plan = _load_run(run)
    shape = load_dataset(suite.dataset, **(thaw(suite.dataset_params) or {})).image_shape
    files: dict[str, bytes] = {n: (run / n).read_bytes()
                               for n in ("suite.toml", "plan.json", "leaderboard.csv")}
    keys = list(dict.fromkeys(j.key for j in plan.jobs))
    with Store(run / "runs.sqlite") as store:
        # one entry per job key, labelled by the plan (its first label when ids share a key)
        jobs = list({j["key"]: j for j in reversed(store.jobs_of(plan.jobs))}.values())[::-1]
        missing = set(keys) - {j["key"] for j in jobs}
        if missing:
            raise BundleError(f"{len(missing)} of {len(keys)} jobs of the plan are not in the "
                              "store; finish the run (genbench run resumes) before submitting")
        samples = store.samples(keys)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["job", "defense", "attack", "threat_model", "eps", "sample_id",
                         "correct", "k", "distance", "error"])
        versions: set[str] = set()
        for job in sorted(jobs, key=lambda j: j["key"]):
            versions.update(job["plugin_versions"].values())
            for sid, correct, dist, err in samples[job["key"]]:
                writer.writerow([job["key"], job["defense"], job["attack"], job["threat"] or "",
                                 "" if job["eps"] is None else repr(job["eps"]), sid, correct,
                                 job["k"], "" if dist is None else repr(dist), err or ""])
            adv = store.adversarial(job["key"], shape)
            if adv:
                ids = [i for i in job["spec"]["sample_ids"] if i in adv]  # the job's order
                files[f"adv/{job['key']}.safetensors"] = st_save({
                    "x_adv": np.stack([adv[i] for i in ids]).astype(np.float32),
                    "sample_ids": np.asarray(ids, dtype=np.int64)})
        files["outcomes.csv"] = buf.getvalue().encode()
        files["jobs.json"] = json.dumps(
            [{k: j[k] for k in ("key", "spec", "defense", "attack", "threat", "eps", "status",
                                "error", "k", "stochastic", "grad_evals", "nfe_per_pred",
                                "budget", "plugin_versions", "code_version")}
             for j in sorted(jobs, key=lambda j: j["key"])], indent=1, sort_keys=True).encode()
    files["environment.json"] = json.dumps(_environment(versions), indent=1).encode()
    manifest = {"format": FORMAT, "suite": suite.name, "created": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plugin_versions": sorted(versions),
        "files": {name: _sha256(data) for name, data in sorted(files.items())}}
    files[MANIFEST] = json.dumps(manifest, indent=1).encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return manifest


# -- verify ---------------------------------------------------------------------------------

#: near-tie tolerance for deterministic scoring: a re-scored decision may differ from the
#: recorded one only where the true class's logit is within this fraction (of the sample's
#: largest |logit|, at least 1) of the best other class's: float arithmetic on another device
#: or thread count can flip such a sample, and nothing else.
NEAR_TIE = 1e-3
#: level of the test that a stochastic defense's recorded draws are exchangeable with fresh
#: ones, shared (Bonferroni) by all the rows tested: a genuine bundle fails it at most 1%
#: of the time.
ALPHA = 0.01


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ok(self, msg: str) -> None:
        self.lines.append(f"PASS  {msg}")

    def fail(self, msg: str) -> None:
        self.lines.append(f"FAIL  {msg}")
        self.failures.append(msg)

    def skip(self, msg: str) -> None:
        self.lines.append(f"SKIP  {msg}")


@dataclass
class _Content:
    """What verify reads from a bundle: data only, never a name it resolves."""

    manifest: dict[str, Any]
    jobs: dict[str, dict[str, Any]]
    plan_jobs: list[str]
    limit: int | None
    outcomes: dict[str, dict[int, tuple[int, str]]]
    claims: Any  # pandas.DataFrame


_JOB_FIELDS = {"key": str, "spec": dict, "status": str, "k": int, "budget": dict,
               "plugin_versions": dict}


def _read_content(root: Path, names: list[str], manifest: dict[str, Any]) -> _Content:
    from benchmark.report.cells import csv_unsafe
    from benchmark.report.leaderboard import read_csv
    from benchmark.verify.claims import REQUIRED

    for name in ("jobs.json", "plan.json", "outcomes.csv", "leaderboard.csv", "suite.toml"):
        if name not in names:
            raise BundleError(f"bundle has no {name}")
    raw = read_json(root, "jobs.json")
    if not isinstance(raw, list):
        raise BundleError("jobs.json: expected a list of jobs")
    jobs: dict[str, dict[str, Any]] = {}
    for i, job in enumerate(raw):
        if not isinstance(job, dict):
            raise BundleError(f"jobs.json: job {i} is not an object")
        for key, typ in _JOB_FIELDS.items():
            if not isinstance(job.get(key), typ) or isinstance(job.get(key), bool):
                raise BundleError(f"jobs.json: job {i}: {key!r} must be a {typ.__name__}")
        if job["status"] not in ("done", "error") or job["k"] < 1:
            raise BundleError(f"jobs.json: job {i}: bad status {job['status']!r} or k")
        if job["key"] in jobs:
            raise BundleError(f"jobs.json: job {job['key'][:12]} is listed twice")
        jobs[job["key"]] = job
    plan = read_json(root, "plan.json")
    if not isinstance(plan, dict) or not isinstance(plan.get("jobs"), list):
        raise BundleError("plan.json: expected an object with the list of job keys")
    limit = plan.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise BundleError(f"plan.json: 'limit' must be a positive integer or null, got "
                          f"{limit!r}")
    outcomes: dict[str, dict[int, tuple[int, str]]] = defaultdict(dict)
    try:
        with open(root / "outcomes.csv", newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                if row.get("job") not in jobs:
                    raise BundleError(f"outcomes.csv, line {line}: job {row.get('job')!r} is "
                                      "not in jobs.json")
                sid = int(row["sample_id"])
                if sid in outcomes[row["job"]]:
                    raise BundleError(f"outcomes.csv, line {line}: sample {sid} of job "
                                      f"{row['job'][:12]} is listed twice")
                outcomes[row["job"]][sid] = (int(row["correct"]), row["error"] or "")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"outcomes.csv: malformed ({type(exc).__name__}: {exc})") from exc
    try:
        claims = read_csv(root / "leaderboard.csv")
    except Exception as exc:  # pandas raises many kinds on a malformed CSV
        raise BundleError(f"leaderboard.csv: malformed ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in REQUIRED if c not in claims.columns]
    if missing:
        raise BundleError(f"leaderboard.csv: missing columns {missing}")
    for col in ("defense", "attack", "threat_model"):
        claims[col] = claims[col].map(csv_unsafe)
    for col in ("eps", "n", "k_draws", "clean_acc", "clean_ci_low", "clean_ci_high",
                "robust_acc", "robust_ci_low", "robust_ci_high"):
        if claims[col].dtype == object:
            raise BundleError(f"leaderboard.csv: column {col!r} is not numeric")
    return _Content(manifest, jobs, [str(k) for k in plan["jobs"]], limit, dict(outcomes),
                    claims)


def _trusted_suite(suite: str | None, manifest: dict[str, Any]) -> tuple[Any, str]:
    """The suite the plan is rebuilt from: the reviewer's ``--suite``, else the shipped suite
    the bundle names. The bundle's own ``suite.toml`` is never trusted (it could leave out the
    strongest attack)."""
    from importlib import resources

    from benchmark.spec.suite import load_suite, parse_suite, shipped_suites

    if suite:
        return load_suite(suite), f"suite {suite} (--suite)"
    name = manifest["suite"]
    if name not in shipped_suites():
        raise BundleError(f"cannot rebuild the plan: the bundle's suite {name!r} is not a "
                          "shipped suite, and its own suite.toml proves nothing; pass --suite "
                          "FILE, a copy you trust")
    text = (resources.files("benchmark.spec") / "suites" / f"{name}.toml").read_text()
    return parse_suite(text, source=f"suites/{name}.toml"), f"shipped suite {name!r}"


def _alias_cache(alias: dict[str, str]) -> Any:
    """A defense cache that builds the defenses named ``name`` from ``alias[name]`` (the
    reviewer's ``--defense ID=module:Class``)."""
    from benchmark.plugins.cache import DefenseCache

    class AliasCache(DefenseCache):
        def get(self, name: str, kwargs: Any, device: Any, *, key: Any) -> Any:
            return super().get(alias.get(name, name), kwargs, device, key=key)

    return AliasCache()


def _overrides(defenses: list[str] | None, suite: Any) -> tuple[dict[str, str | None],
                                                                 dict[str, str]]:
    """``--defense ID[=REF]`` as {id: ref or None} and {suite name of ID: ref}."""
    overrides: dict[str, str | None] = {}
    for item in defenses or []:
        did, _, ref = item.partition("=")
        overrides[did] = ref or None
    ids = {d.id: d.name for d in suite.defenses}
    unknown = sorted(set(overrides) - set(ids))
    if unknown:
        raise ValueError(f"--defense {unknown[0]!r}: no defense with that id in the trusted "
                         f"suite (ids: {', '.join(sorted(ids))})")
    alias: dict[str, str] = {}
    for did, given in overrides.items():
        if given:
            if ids[did] in alias and alias[ids[did]] != given:
                raise ValueError(f"--defense {did}={given}: another id of the same defense "
                                 f"{ids[did]!r} is rebuilt from {alias[ids[did]]!r}")
            alias[ids[did]] = given
    return overrides, alias


def _describe_job(job: dict[str, Any]) -> str:
    """A bundle's job in words, its names as data (repr), never resolved."""
    spec = job["spec"]
    defense = spec.get("defense") if isinstance(spec.get("defense"), dict) else {}
    attack = spec.get("attack") if isinstance(spec.get("attack"), dict) else {}
    return (f"defense {defense.get('id')!r} = {defense.get('name')!r} / attack "
            f"{(attack or {}).get('name', 'clean')!r} {spec.get('threat')!r} "
            f"eps={spec.get('eps')!r}, key {str(job.get('key'))[:12]}")


def _match_plan(plan: Any, content: _Content, source: str, report: Report) -> bool:
    """Compare the trusted plan with the bundle's jobs, job by job."""
    from benchmark.spec.suite import canonical_json

    # fallback jobs (``when = "masking"``) the run added on masking evidence: the bundle may
    # hold the trusted plan's, and they are checked like any job from here on
    planned = {j.key for j in plan.jobs}
    fallbacks = [j for j in getattr(plan, "fallback", []) if j.key in content.jobs
                 and j.key not in planned]
    plan.jobs.extend(fallbacks)
    trusted: dict[str, Any] = {}
    for job in plan.jobs:  # ids that share a key (same defense, same budgets): the first label
        trusted.setdefault(job.key, job)
    missing = [j for k, j in trusted.items() if k not in content.jobs]
    extra = [k for k in content.jobs if k not in trusted]
    limit = content.limit
    where = f"{source}, {'all samples' if limit is None else f'limit {limit}'}"
    if extra:
        report.fail(f"plan: {len(extra)} jobs of the bundle are not in the trusted plan "
                    f"({where}) (first: {_describe_job(content.jobs[extra[0]])})")
    if missing:
        report.fail(f"plan: {len(missing)} of the {len(trusted)} jobs of the trusted plan "
                    f"({where}) are missing from the bundle (first: {missing[0].label()})")
    if set(content.plan_jobs) != set(content.jobs):
        report.fail("plan.json: its job list is not the bundle's jobs.json")
    differ = [k for k in trusted if k in content.jobs and canonical_json(
        content.jobs[k]["spec"]) != canonical_json(trusted[k].to_json())]
    if differ:
        report.fail(f"jobs.json: {len(differ)} job specs differ from the trusted plan's under "
                    f"the same key (first: {trusted[differ[0]].label()})")
    if missing or extra or differ:
        return False
    taken = (f", {len({j.key for j in fallbacks})} of them fallbacks run on masking evidence"
             if fallbacks else "")
    report.ok(f"plan: the {len(trusted)} jobs of the trusted plan ({where}{taken}) match "
              "jobs.json job by job")
    return True


def _exact_counts(defense: Any, x: Any, y: Any, k: int, num_classes: int, batch_size: int,
                  who: str, pinned_seed: int | None, tie_tol: float) -> tuple[Any, Any]:
    """Correct-counts of a deterministic score (a deterministic defense, K = 1, or an attack
    that pins the defense's noise, counted for all K as the runner does), batch by batch as
    the runner scored them, and which samples are near-ties."""
    import torch

    from benchmark.plugins.cache import PluginOutputError
    from benchmark.run.runner import check_logits, out_of_memory

    counts, ties = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if pinned_seed is not None:
                reseed = getattr(defense, "reseed", None)
                if not callable(reseed):
                    raise PluginOutputError(f"{who} has no reseed(seed), but the attack pins "
                                            "its noise")
                reseed(pinned_seed)
            try:
                out = defense(xb)
            except Exception as exc:  # as the runner scores it: those samples are not robust
                if out_of_memory(exc):
                    raise
                counts.append(torch.zeros(len(xb), dtype=torch.long, device=xb.device))
                ties.append(torch.zeros(len(xb), dtype=torch.bool, device=xb.device))
                continue
            logits = check_logits(out, len(xb), num_classes, who, finite=False).double()
            finite = torch.isfinite(logits).all(dim=1)
            true = logits.gather(1, yb.view(-1, 1)).squeeze(1)
            other = logits.scatter(1, yb.view(-1, 1), float("-inf")).max(dim=1).values
            scale = logits.abs().max(dim=1).values.clamp(min=1.0)
            counts.append(((logits.argmax(dim=1) == yb) & finite).long() * k)
            ties.append(((true - other).abs() <= tie_tol * scale) & finite)
    return torch.cat(counts).cpu().numpy(), torch.cat(ties).cpu().numpy()


def _leaderboard(store_path: Path, plan: Any, jobs: dict[str, tuple[Any, Any]],
                 recorded: dict[str, dict[int, tuple[int, str]]],
                 counts: dict[str, dict[int, int]] | None = None,
                 defense_k: dict[str, tuple[int, bool]] | None = None,
                 extras: dict[str, dict[str, Any]] | None = None) -> Any:
    """The leaderboard of the plan's classifier jobs, by the leaderboard's own code, from the
    bundle's recorded outcomes (with its K), or, with ``counts``, from the re-scored ones where
    there are some (with the rebuilt defense's K). ``extras``: job key -> the extras to store
    with it (the verifier's own diagnostics; a bundle's are never read)."""
    from benchmark.report.leaderboard import build_leaderboard
    from benchmark.spec.jobs import JobResult, SampleOutcome
    from benchmark.store import Store

    with Store(store_path) as store:
        for key, (spec, job) in jobs.items():
            if plan.kinds.get(spec.defense.id) != "classifier":
                continue
            mine = recorded.get(key, {})
            if counts is not None and key in counts and defense_k is not None:
                k, stochastic = defense_k[key]
                outs = [SampleOutcome(s, c, math.nan, mine.get(s, (0, ""))[1] or None)
                        for s, c in sorted(counts[key].items())]
            else:
                k, stochastic = job["k"], bool(job.get("stochastic"))
                outs = [SampleOutcome(s, c, math.nan, err or None)
                        for s, (c, err) in sorted(mine.items())]
            done = job["status"] == "done"
            nfe = job.get("nfe_per_pred")
            store.write(spec, JobResult(
                key=key, status=job["status"], outcomes=outs if done else [], k=k, wall_s=0.0,
                error=None if done else str(job.get("error")),
                grad_evals=int(job.get("grad_evals") or 0),
                nfe_per_pred=float(nfe) if isinstance(nfe, int | float) else math.nan,
                stochastic=stochastic, budget=job["budget"],
                plugin_versions={str(a): str(b) for a, b in job["plugin_versions"].items()},
                extras=(extras or {}).get(key, {})),
                str(job.get("code_version") or "verify"))
        return build_leaderboard(store, plan)


def _trusted_diagnostics(plan: Any, jobs: dict[str, tuple[Any, Any]], cache: Any
                         ) -> dict[str, dict[str, Any]]:
    """Job key -> ``{"grad_diagnostics": [...]}`` for the first clean shard of every defense
    the trusted plan has fallbacks for: the verifier's own gradient diagnostics of the rebuilt
    defense, computed as the runner computes them (a bundle carries none, and a submitter's
    would not be evidence)."""
    import torch

    from benchmark.api.defense import describe
    from benchmark.run.diagnostics import safe_diagnostics
    from benchmark.run.runner import shard_data

    owing = {j.defense.id for j in getattr(plan, "fallback", [])}
    cpu = torch.device("cpu")
    extras: dict[str, dict[str, Any]] = {}
    for key, (spec, job) in jobs.items():
        if (spec.is_clean and spec.shard == 0 and spec.defense.id in owing
                and job["status"] == "done"):
            defense = spec.build_defense(cache, cpu)
            spec.settle_randomness(defense, cpu)
            x, y, _ = shard_data(spec, cpu)
            _, stochastic, _ = describe(defense)
            extras[key] = {"grad_diagnostics": [safe_diagnostics(defense, x, y,
                                                                 stochastic=stochastic)]}
    return extras


def _check_fallbacks(store_path: Path, plan: Any, content: _Content, report: Report) -> None:
    """The fallbacks the bundle owes: where a defense shows masking, the trusted plan's
    fallback jobs of that defense must be in the bundle, as the harness would have run them.
    The evidence is the bundle's recorded outcomes (``blackbox_beats_whitebox``,
    ``unconstrained_attack_failure``) and the verifier's own gradient diagnostics of the
    rebuilt defense (``bad_gradients``, ``unstable_predictions``;
    :func:`_trusted_diagnostics`), both in the store at ``store_path``."""
    from benchmark.report.fallback import masked_defenses
    from benchmark.store import Store

    if not getattr(plan, "fallback", None):
        return
    with Store(store_path) as store:
        masked = masked_defenses(store, plan)
    owed = {d: [j for j in plan.fallback if j.defense.id == d and j.key not in content.jobs]
            for d in masked}
    owed = {d: jobs for d, jobs in owed.items() if jobs}
    for d, missing in sorted(owed.items()):
        report.fail(f"fallbacks: defense {d!r} shows masking ({', '.join(masked[d])}: its "
                    f"recorded outcomes and the verifier's own gradient diagnostics), but "
                    f"{len(missing)} fallback jobs of the trusted plan on it are missing from "
                    f"the bundle (first: {missing[0].label()}): its worst case rests on the "
                    "misled attacks alone")
    if masked and not owed:
        report.ok(f"fallbacks: every defense that shows masking ({', '.join(sorted(masked))}) "
                  "has the trusted plan's fallback jobs")
    elif not masked:
        report.ok("fallbacks: no defense shows masking (recorded outcomes, the verifier's own "
                  "gradient diagnostics): none are owed")


def _test_draws(jobs: dict[str, tuple[Any, Any]], stochastic_draws: dict[str, Any],
                recorded: dict[str, dict[int, tuple[int, str]]], report: Report) -> None:
    """A stochastic defense's recorded draws against the verifier's fresh ones, per row (a
    defense's clean jobs, or an attack's jobs at one threat model and epsilon)."""
    from benchmark.report.stats import exchangeable_draws

    cells: dict[tuple[Any, ...], list[tuple[Any, Any, int]]] = defaultdict(list)
    for key, (fresh, k) in stochastic_draws.items():
        spec = jobs[key][0]
        mine = np.array([recorded[key][s][0] for s in spec.sample_ids])
        cells[(spec.defense.id, spec.attack_id, spec.threat or "", spec.eps or 0.0)].append(
            (mine, fresh, k))
    if not cells:
        return
    level = ALPHA / len(cells)
    for (did, aid, threat, eps), parts in sorted(cells.items(), key=str):
        mine = np.concatenate([p[0] for p in parts])
        fresh = np.concatenate([p[1] for p in parts])
        k = parts[0][2]
        p = exchangeable_draws(mine, fresh, k)
        what = f"{did} / {aid}" + (f" {threat} eps={eps:g}" if threat else "")
        counts = (f"{int(mine.sum())} recorded and {int(fresh.sum())} fresh correct draws of "
                  f"{len(mine)} samples x K={k}")
        if p < level:
            report.fail(f"draws: {what}: {counts}: the recorded draws are not the defense's "
                        f"(exchangeability p={p:.2g} < {level:.2g})")
        else:
            report.ok(f"draws: {what}: {counts}: exchangeable (p={p:.2g} >= {level:.2g}, "
                      f"{ALPHA:g} over {len(cells)} rows)")


def verify_bundle(bundle: str | Path, *, defenses: list[str] | None = None,
                  device: str | None = None, rescore: bool = True, suite: str | None = None,
                  trust_code: bool = False, allow_errors: bool = False,
                  tie_tol: float = NEAR_TIE, limits: Limits | None = None) -> Report:
    """Verify ``bundle`` against the plan of a trusted ``suite`` (default: the shipped suite the
    bundle names). ``defenses`` (``ID`` or ``ID=module:Class``) restricts re-scoring to those
    defense ids and may rebuild one from another reference; only registered plug-ins and those
    references are imported, unless ``trust_code``."""
    from contextlib import nullcontext

    from benchmark.plugins.registry import registered_only

    report = Report()
    with tempfile.TemporaryDirectory(prefix="genbench-verify-") as tmp:
        root = Path(tmp) / "bundle"
        names = safe_extract(bundle, root, limits)
        report.ok(f"unpacked {len(names)} files (no absolute paths, '..', links, empty or "
                  "duplicate paths; within the size limits)")
        manifest = check_manifest(root, names)
        report.ok(f"manifest: {len(manifest['files'])} files, every sha256 matches")
        content = _read_content(root, names, manifest)
        trusted, source = _trusted_suite(suite, manifest)
        overrides, alias = _overrides(defenses, trusted)
        allowed = set(alias.values())
        with nullcontext() if trust_code else registered_only(allowed):
            _verify(content, trusted, source, overrides, alias, report, Path(tmp), root,
                    names, device=device, rescore=rescore, allow_errors=allow_errors,
                    tie_tol=tie_tol)
    return report


def _verify(content: _Content, trusted: Any, source: str, overrides: dict[str, str | None],
            alias: dict[str, str], report: Report, tmp: Path, root: Path, names: list[str], *,
            device: str | None, rescore: bool, allow_errors: bool, tie_tol: float) -> None:
    import torch
    from safetensors.numpy import load_file

    from benchmark.api.defense import describe
    from benchmark.plugins.builtin import ATTACKS, THREAT_MODELS
    from benchmark.run.runner import (
        DEFENSE_FAILED,
        correct_counts,
        resolve_device,
        score_adversarial,
        shard_data,
    )
    from benchmark.spec.plan import plan_suite
    from benchmark.verify.claims import check_row, label, match

    cache = _alias_cache(alias)
    cpu = torch.device("cpu")
    try:
        plan = plan_suite(trusted, limit=content.limit, cache=cache)
    except Exception as exc:  # an unregistered name, a missing model, bad parameters
        report.fail(f"cannot rebuild the plan from the trusted {source}: "
                    f"{type(exc).__name__}: {exc}")
        return
    if not _match_plan(plan, content, source, report):
        return  # nothing of a bundle that is not the trusted plan is worth re-scoring
    jobs: dict[str, tuple[Any, dict[str, Any]]] = {}
    for spec in plan.jobs:  # ids that share a key: the first label, as make_bundle stores it
        jobs.setdefault(spec.key, (spec, content.jobs[spec.key]))
    # -- errors, K and stochasticity of the rebuilt defenses ------------------------------
    errored = [(spec, job) for spec, job in jobs.values() if job["status"] != "done"]
    if errored and not allow_errors:
        spec, job = errored[0]
        report.fail(f"{len(errored)} jobs errored in the submission (first: {spec.label()}: "
                    f"{str(job.get('error'))[:100]}); an errored attack drops out of the worst "
                    "case, so re-run them (genbench run --retry-errors) or pass --allow-errors")
    defense_k: dict[str, tuple[int, bool]] = {}
    claimed_k: dict[tuple[str, Any], set[tuple[int, bool]]] = defaultdict(set)
    for key, (spec, job) in jobs.items():
        defense = spec.build_defense(cache, cpu)
        spec.settle_randomness(defense, cpu)  # as the runner settles it
        _, stochastic, _ = describe(defense)
        k = spec.k_draws if stochastic and plan.kinds[spec.defense.id] == "classifier" else 1
        defense_k[key] = (k, stochastic)
        if job["status"] == "done":
            claimed_k[(spec.defense.id, spec.defense_params)].add(
                (job["k"], bool(job.get("stochastic"))))
    for (did, params), claimed in sorted(claimed_k.items(), key=str):
        spec = next(s for s, _ in jobs.values() if (s.defense.id, s.defense_params) == (
            did, params))
        k, stochastic = defense_k[spec.key]
        if claimed != {(k, stochastic)}:
            said = ", ".join(f"stochastic={s}, K={kk}" for kk, s in sorted(claimed))
            report.fail(f"jobs.json: defense {did} claims {said}; the rebuilt defense is "
                        f"{'stochastic' if stochastic else 'deterministic'} (K={k})")
    # -- recorded outcomes cover each finished classifier job's shard ----------------------
    for key, (spec, job) in jobs.items():
        if plan.kinds.get(spec.defense.id) != "classifier":
            continue
        got = content.outcomes.get(key, {})
        if job["status"] == "done" and sorted(got) != sorted(spec.sample_ids):
            raise BundleError(f"outcomes.csv: {spec.label()} has outcomes for {len(got)} "
                              f"samples, its shard has {len(spec.sample_ids)}")
        if job["status"] != "done" and got:
            raise BundleError(f"outcomes.csv: {spec.label()} errored but has outcomes")
        if any(not 0 <= c <= job["k"] for c, _ in got.values()):
            raise BundleError(f"outcomes.csv: {spec.label()} has correct-counts outside "
                              f"[0, {job['k']}]")
    # -- threat model re-check -------------------------------------------------------------
    adv: dict[str, Any] = {}
    invalid: dict[str, Any] = {}
    violations = 0
    unverifiable: set[str] = set()
    density_jobs = {k for k, (s, _) in jobs.items() if plan.kinds.get(s.defense.id) == "density"}
    for key, (spec, job) in jobs.items():
        if spec.is_clean or job["status"] != "done" or key in density_jobs:
            continue
        path = f"adv/{key}.safetensors"
        if path not in names:
            report.fail(f"{path}: adversarial examples of {spec.label()} are missing")
            continue
        try:
            tensors = load_file(str(root / path))
            x_adv, ids = tensors["x_adv"], tensors["sample_ids"]
        except Exception as exc:
            report.fail(f"{path}: not readable adversarial examples ({exc})")
            continue
        if sorted(int(i) for i in ids) != sorted(spec.sample_ids) or len(ids) != len(x_adv):
            report.fail(f"{path}: sample ids do not match the job's shard")
            continue
        pos = {int(s): i for i, s in enumerate(ids)}
        x_adv = np.asarray(x_adv[[pos[s] for s in spec.sample_ids]], dtype=np.float32)
        x, _, _ = shard_data(spec, cpu)
        if x_adv.shape != tuple(x.shape):
            report.fail(f"{path}: shape {x_adv.shape}, the shard's images are {tuple(x.shape)}")
            continue
        adv[key] = x_adv
        recorded = content.outcomes.get(key, {})
        # a recorded error is a claimed threat violation, unless the defense failed on a valid
        # adversarial example (scored not robust; re-scoring below checks it)
        bad = np.array([bool(recorded.get(s, (0, ""))[1]) and not recorded[s][1].startswith(
            DEFENSE_FAILED) for s in spec.sample_ids])
        threat = THREAT_MODELS.get(str(spec.threat))(float(spec.eps or 0.0))
        if getattr(threat, "needs_params", False):
            unverifiable.add(f"{spec.threat} ({spec.attack_id})")
            invalid[key] = bad
            continue
        viol = threat.violations(x, torch.from_numpy(x_adv.copy()))
        for i, why in enumerate(viol.per_sample):
            sid = spec.sample_ids[i]
            if why is not None and not bad[i]:
                violations += 1
                report.fail(f"{path}: sample {sid} of {spec.label()} breaks the threat "
                            f"model ({why}) but is recorded as a valid attack result")
            elif why is None and bad[i]:
                violations += 1
                report.fail(f"{path}: sample {sid} is recorded as a violation "
                            f"({recorded[sid][1]}) but is within the threat model")
        invalid[key] = np.array([why is not None for why in viol.per_sample])
    if not violations:
        report.ok(f"threat models: {sum(len(v) for v in adv.values())} adversarial examples "
                  "re-checked")
    for what in sorted(unverifiable):
        report.skip(f"threat model {what}: verifying needs the attack's parameters (flow "
                    "field), which the bundle does not carry")
    # -- re-scoring ------------------------------------------------------------------------
    counts: dict[str, dict[int, int]] = {}
    stochastic_draws: dict[str, tuple[Any, int]] = {}
    if rescore:
        dev = resolve_device(device)
        attacks: dict[str, Any] = {}
        n_exact = ties = 0
        for key, (spec, job) in jobs.items():
            did = spec.defense.id
            if (job["status"] != "done" or key in density_jobs
                    or (overrides and did not in overrides)
                    or (not spec.is_clean and key not in adv)):
                continue
            defense = spec.build_defense(cache, dev)
            k, stochastic = defense_k[key]
            reseed = getattr(defense, "reseed", None)
            if callable(reseed):
                reseed(_fresh_seed(spec.run_seed))
            x, y, num_classes = shard_data(spec, dev)
            pinned = None
            if not spec.is_clean:
                assert spec.attack is not None
                if spec.attack.id not in attacks:
                    attacks[spec.attack.id] = ATTACKS.get(spec.attack.name)(
                        **spec.attack.kwargs())
                pinned = getattr(attacks[spec.attack.id], "pinned_seed", None)
                mask = torch.from_numpy(invalid[key]).to(dev).view(-1, 1, 1, 1)
                x = torch.where(mask, x, torch.nan_to_num(torch.from_numpy(adv[key]).to(dev)))
            who = f"defense {did!r}"
            if stochastic and pinned is None:
                if spec.is_clean:
                    c = correct_counts(defense, x, y, k, num_classes, spec.batch_size,
                                       who).cpu().numpy()
                else:  # non-finite or raising draws count as not robust, as the runner does
                    c = score_adversarial(defense, None, x, y, k, num_classes, spec.batch_size,
                                          who, sequential=bool(spec.probe))[0].cpu().numpy()
                near = None
            else:
                c, near = _exact_counts(defense, x, y, k, num_classes, spec.batch_size, who,
                                        pinned, tie_tol)
            bad = invalid.get(key, np.zeros(len(c), dtype=bool))
            c = np.where(bad, 0, c)
            recorded = content.outcomes.get(key, {})
            if near is None:
                # a K that differs from the rebuilt one failed above; a probe's draws stop at
                # its majority (not K draws), and its fresh verdicts make the flags (below)
                if job["k"] == k and not spec.probe:
                    stochastic_draws[key] = (c, k)
            else:  # a deterministic score: sample by sample against outcomes.csv
                differ = []
                for i, sid in enumerate(spec.sample_ids):
                    want = recorded[sid][0]
                    if int(c[i]) != want:
                        if near[i] and not bad[i]:
                            ties += 1
                            c[i] = want  # undecidable across devices: the recorded one stands
                        else:
                            differ.append((sid, want, int(c[i])))
                n_exact += len(c)
                if differ:
                    sid, want, again = differ[0]
                    report.fail(f"outcomes.csv: {len(differ)} of {len(c)} samples of "
                                f"{spec.label()} re-score differently (sample {sid}: "
                                f"recorded {want}, re-scored {again})")
            counts[key] = {int(s): int(v) for s, v in zip(spec.sample_ids, c, strict=True)}
        if n_exact:
            report.ok(f"per-sample outcomes: {n_exact} deterministic scores (deterministic "
                      f"defenses, pinned-noise attacks) re-scored against outcomes.csv; "
                      f"{ties} near-ties (|logit margin| <= {tie_tol:g} x scale) kept as "
                      "recorded")
        _test_draws(jobs, stochastic_draws, content.outcomes, report)
    # -- claimed rows ------------------------------------------------------------------------
    from benchmark.report.evidence import row_key

    # the verifier's own diagnostics ride in the recorded store (they never enter the rows)
    recorded_frame = _leaderboard(tmp / "recorded.sqlite", plan, jobs, content.outcomes,
                                  extras=_trusted_diagnostics(plan, jobs, cache))
    _check_fallbacks(tmp / "recorded.sqlite", plan, content, report)
    rescored_rows = {}
    if counts:
        rescored_rows = {row_key(r): r for _, r in _leaderboard(
            tmp / "rescored.sqlite", plan, jobs, content.outcomes, counts,
            defense_k).iterrows()}
    expected: dict[Any, Any] = {row_key(r): r for _, r in recorded_frame.iterrows()}
    for spec, _ in jobs.values():
        if plan.kinds.get(spec.defense.id) == "density":
            expected[(spec.defense.id, spec.attack_id, spec.threat or "",
                      -1.0 if spec.eps is None else float(spec.eps))] = None
    rescored = {spec.defense.id for key, (spec, _) in jobs.items() if key in counts}
    m = match(content.claims, expected)
    for claim in m.fabricated:
        report.fail(f"leaderboard.csv: the row {label(row_key(claim))} has no jobs behind it "
                    "in the trusted plan (fabricated, or its epsilon/ids were changed)")
    for claim in m.duplicates:
        report.fail(f"leaderboard.csv: the row {label(row_key(claim))} is claimed twice")
    for row_id in m.dropped:
        report.fail(f"leaderboard.csv: no row for {label(row_id)}, which the trusted plan's jobs "
                    "produce (rows dropped)")
    if not (m.fabricated or m.duplicates or m.dropped):
        report.ok(f"leaderboard.csv: {len(m.pairs)} rows, one for each row the trusted plan "
                  "produces")
    unchecked = density = 0
    for row_id, claim, row in m.pairs:
        if row is None:
            density += 1
            continue
        rerow = rescored_rows.get(row_id) if row_id[0] in rescored else None
        unchecked += rerow is None
        ok, msg = check_row(row_id, claim, row, rerow)
        (report.ok if ok else report.fail)(msg)
    if unchecked:
        why = "--no-rescore" if not rescore else "--defense restricts re-scoring"
        report.skip(f"{unchecked} rows not re-scored ({why}): checked against outcomes.csv "
                    "only")
    if density:
        report.skip(f"{density} density rows not re-verified: bundles do not yet carry the "
                    "attacks' starting points and per-sample log-likelihoods")


def _fresh_seed(run_seed: int) -> int:
    """The seed of the verifier's draws of a job: not the job's own, whose noise stream the
    attack consumed (its first draws are those the adversarial examples were optimized
    against: re-scoring with them would favour the attack over the submission's fresh draws)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"genbench-verify:{run_seed}".encode()).digest()[:4],
                          "little")


# -- command line ---------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    manifest = make_bundle(args.run, args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(manifest['files']) + 1} files, {size / 1024:.1f} KiB "
          f"(suite {manifest['suite']}; plug-ins: {', '.join(manifest['plugin_versions'])})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from benchmark.plugins.registry import PluginLoadError
    from benchmark.verify.conformance import importable_cwd

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if args.trust_code or any("=" in d for d in args.defense or []):
        importable_cwd()  # code the reviewer named may live in the current folder
    limits = Limits(members=args.max_members, total_bytes=args.max_unpacked_mb * MiB,
                    member_bytes=min(DEFAULT_LIMITS.member_bytes, args.max_unpacked_mb * MiB))
    t0 = time.perf_counter()
    try:
        report = verify_bundle(args.bundle, defenses=args.defense, device=args.device,
                               rescore=not args.no_rescore, suite=args.suite,
                               trust_code=args.trust_code, allow_errors=args.allow_errors,
                               tie_tol=args.tie_tol, limits=limits)
    except (BundleError, PluginLoadError) as exc:
        print(f"FAIL  {exc}")
        print(f"bundle {args.bundle} REJECTED: {exc}")
        return EXIT_FAILED
    for line in report.lines:
        print(line)
    took = time.perf_counter() - t0
    if report.failures:
        print(f"bundle {args.bundle} REJECTED: {report.failures[0]} ({len(report.failures)} "
              f"failures, {took:.1f}s)")
        return EXIT_FAILED
    print(f"bundle {args.bundle} verified in {took:.1f}s (0 failures)")
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("submit", help="pack a finished run into a verifiable bundle")
    s.add_argument("--run", required=True, help="run folder (the --out of genbench run)")
    s.add_argument("--out", required=True, help="bundle file to write (.tar.gz)")
    s.set_defaults(func=cmd_submit)

    v = sub.add_parser("verify", help="check a submission bundle and re-score its examples")
    v.add_argument("bundle", help="bundle .tar.gz written by genbench submit")
    v.add_argument("--suite", help="the suite to rebuild the plan from (shipped name or .toml "
                                   "you trust; default: the shipped suite the bundle names)")
    v.add_argument("--defense", action="append", metavar="ID[=module:Class]",
                   help="re-score only this defense id (repeatable); =REF rebuilds it from REF, "
                        "which may be code outside the registry")
    v.add_argument("--trust-code", action="store_true", dest="trust_code",
                   help="import any module:Class the trusted suite names (default: registered "
                        "plug-ins and --defense references only)")
    v.add_argument("--allow-errors", action="store_true", dest="allow_errors",
                   help="accept jobs that errored in the submission (their rows claim nothing)")
    v.add_argument("--tie-tol", type=float, default=NEAR_TIE, dest="tie_tol", metavar="R",
                   help="near-tie tolerance of deterministic re-scoring, relative to the "
                        f"logits' scale (default {NEAR_TIE:g})")
    v.add_argument("--max-unpacked-mb", type=int, default=DEFAULT_LIMITS.total_bytes // MiB,
                   dest="max_unpacked_mb", metavar="MB",
                   help="refuse bundles that unpack to more (default %(default)s)")
    v.add_argument("--max-members", type=int, default=DEFAULT_LIMITS.members,
                   dest="max_members", help="refuse bundles with more files "
                                            "(default %(default)s)")
    v.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    v.add_argument("--no-rescore", action="store_true",
                   help="check hashes, the plan, threat models and rows only")
    v.set_defaults(func=cmd_verify)
