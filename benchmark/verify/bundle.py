"""Verifiable submission bundles: ``genbench submit`` and ``genbench verify``.

A robustness claim ships its adversarial inputs (RobustBench's rule for external evaluations).
``submit`` packs a run folder into a ``.tar.gz``::

    suite.toml, plan.json, leaderboard.csv     the spec and the claimed rows
    jobs.json                                   every job: spec, key, k, budget, plug-in versions
    outcomes.csv                                per-sample outcomes (job, sample, correct, ...)
    adv/<job key>.safetensors                   x_adv (float32, N x C x H x W) and sample_ids
    environment.json                            python, torch, platform, package versions
    manifest.json                               sha256 of every other file

``verify`` unpacks it safely (absolute paths, ``..``, links and special files are refused,
naming the member), checks every hash, re-checks every adversarial example against its threat
model, and re-scores the examples on the defense rebuilt from the suite spec: each row's
recomputed robust accuracy must lie within the claimed row's 95% interval (for deterministic
defenses it must be equal). Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import platform
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata as md
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

FORMAT = "genbench-bundle/1"
MANIFEST = "manifest.json"
EXIT_FAILED = 1
#: packages whose versions go into environment.json (plus every plug-in distribution)
RELEVANT = ("genbench", "torch", "numpy", "safetensors", "pyautoattack", "torchattacks",
            "torchdiffeq", "pandas", "scikit-learn", "ray")


class BundleError(ValueError):
    """A bundle that cannot be trusted (bad member, hash mismatch, missing file)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    limit = json.loads((run / "plan.json").read_text()).get("limit")
    return suite, plan_suite(suite, limit=limit)


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


# -- safe unpacking -------------------------------------------------------------------------

def safe_extract(bundle: str | Path, dest: str | Path) -> list[str]:
    """Extract regular files and folders only; refuse anything that could escape ``dest``."""
    dest = Path(dest).resolve()
    names = []
    try:
        tar = tarfile.open(bundle, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{bundle} is not a readable bundle: {exc}") from exc
    with tar:
        for m in tar.getmembers():
            path = PurePosixPath(m.name)
            if m.name.startswith(("/", "\\")) or path.is_absolute() or ":" in path.parts[0]:
                raise BundleError(f"refused member {m.name!r}: absolute path")
            if ".." in path.parts or "\\" in m.name:
                raise BundleError(f"refused member {m.name!r}: path escapes the bundle folder")
            if m.issym() or m.islnk():
                raise BundleError(f"refused member {m.name!r}: links are not allowed "
                                  f"(-> {m.linkname!r})")
            if not (m.isfile() or m.isdir()):
                raise BundleError(f"refused member {m.name!r}: not a regular file")
            target = (dest / path).resolve()
            if not target.is_relative_to(dest):
                raise BundleError(f"refused member {m.name!r}: path escapes the bundle folder")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            target.write_bytes(src.read())
            names.append(str(path))
    return names


# -- verify ---------------------------------------------------------------------------------

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


def _check_manifest(root: Path, names: list[str], report: Report) -> dict[str, Any]:
    if MANIFEST not in names:
        raise BundleError(f"bundle has no {MANIFEST}")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    listed: dict[str, str] = manifest.get("files", {})
    for name in sorted(set(names) - set(listed) - {MANIFEST}):
        raise BundleError(f"{name}: file not listed in the manifest")
    for name, digest in sorted(listed.items()):
        if name not in names:
            raise BundleError(f"{name}: listed in the manifest but missing from the bundle")
        actual = _sha256((root / name).read_bytes())
        if actual != digest:
            raise BundleError(f"{name}: sha256 mismatch (manifest {digest[:12]}..., file "
                              f"{actual[:12]}...): the file was modified")
    report.ok(f"manifest: {len(listed)} files, every sha256 matches")
    return manifest


def _spec_key(spec: dict[str, Any]) -> str:
    """The key a stored job spec hashes to. Specs without ``resolved`` were stored before job
    keys left display labels out (key version 1): their key is the hash of the whole spec."""
    if "resolved" not in spec:
        import hashlib

        from benchmark.spec.suite import canonical_json

        return hashlib.sha256(canonical_json(spec).encode()).hexdigest()
    return str(_job_spec(spec).key)


def _job_spec(spec: dict[str, Any]) -> Any:
    from benchmark.spec.jobs import JobSpec
    from benchmark.spec.suite import NO_PARAMS, PluginSpec, freeze

    def plugin(d: dict[str, Any] | None) -> PluginSpec | None:
        return None if d is None else PluginSpec(d["id"], d["name"], freeze(d["params"]))

    defense = plugin(spec["defense"])
    assert defense is not None
    return JobSpec(suite=spec["suite"], dataset=spec["dataset"],
                   dataset_params=freeze(spec["dataset_params"]), subset_id=spec["subset_id"],
                   subset_hash=spec["subset_hash"], defense=defense,
                   defense_params=freeze(spec["defense_params"]), attack=plugin(spec["attack"]),
                   threat=spec["threat"], eps=spec["eps"], sample_ids=tuple(spec["sample_ids"]),
                   seed=spec["seed"], k_draws=spec["k_draws"], batch_size=spec["batch_size"],
                   shard=spec["shard"],
                   resolved=freeze(spec["resolved"]) if "resolved" in spec else NO_PARAMS)


def _claims(root: Path) -> list[dict[str, Any]]:
    from benchmark.report.leaderboard import read_csv

    frame = read_csv(root / "leaderboard.csv")
    return [dict(r) for _, r in frame.iterrows()]


def verify_bundle(bundle: str | Path, *, defenses: list[str] | None = None,
                  device: str | None = None, rescore: bool = True) -> Report:
    """Verify ``bundle``; ``defenses`` (``ID`` or ``ID=module:Class``) restricts re-scoring to
    those leaderboard ids and may rebuild a defense from another reference."""
    import torch
    from safetensors.numpy import load_file

    from benchmark.api.defense import describe
    from benchmark.plugins.builtin import ATTACKS, DEFENSES, THREAT_MODELS
    from benchmark.report.stats import aggregate
    from benchmark.run.runner import correct_counts, resolve_device, shard_data

    report = Report()
    overrides: dict[str, str | None] = {}
    for item in defenses or []:
        did, _, ref = item.partition("=")
        overrides[did] = ref or None
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="genbench-verify-") as tmp:
        root = Path(tmp)
        names = safe_extract(bundle, root)
        report.ok(f"unpacked {len(names)} files (no absolute paths, '..' or links)")
        _check_manifest(root, names, report)
        jobs = json.loads((root / "jobs.json").read_text())
        specs = {j["key"]: _job_spec(j["spec"]) for j in jobs}
        bad_keys = [j["key"] for j in jobs if _spec_key(j["spec"]) != j["key"]]
        if bad_keys:
            report.fail(f"jobs.json: {len(bad_keys)} job specs do not hash to their key "
                        f"(first {bad_keys[0][:12]})")
        outcomes: dict[str, dict[int, tuple[int, str]]] = defaultdict(dict)
        with open(root / "outcomes.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                outcomes[row["job"]][int(row["sample_id"])] = (int(row["correct"]), row["error"])
        # -- threat model re-check -------------------------------------------------------
        adv: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        violations = 0
        unverifiable: set[str] = set()
        density_jobs: set[str] = set()
        for job in jobs:
            spec = specs[job["key"]]
            if spec.is_clean or job["status"] != "done":
                continue
            if "kind:density" in getattr(ATTACKS.get(spec.attack.name), "requires", ()):
                density_jobs.add(job["key"])  # checked against the attack's own start
                continue
            path = f"adv/{job['key']}.safetensors"
            if path not in names:
                report.fail(f"{path}: adversarial examples of {spec.label()} are missing")
                continue
            tensors = load_file(str(root / path))
            x_adv, ids = tensors["x_adv"], tensors["sample_ids"]
            if sorted(int(i) for i in ids) != sorted(spec.sample_ids) or len(ids) != len(x_adv):
                report.fail(f"{path}: sample ids do not match the job's shard")
                continue
            pos = {int(s): i for i, s in enumerate(ids)}
            order = [pos[s] for s in spec.sample_ids]
            x_adv, ids = x_adv[order], np.asarray(spec.sample_ids, dtype=np.int64)
            adv[job["key"]] = (x_adv, ids)
            threat = THREAT_MODELS.get(spec.threat)(spec.eps)
            if getattr(threat, "needs_params", False):
                unverifiable.add(f"{spec.threat} ({spec.attack_id})")
                continue
            x, _, _ = shard_data(spec, torch.device("cpu"))
            viol = threat.violations(x, torch.from_numpy(np.array(x_adv)))
            for i, why in enumerate(viol.per_sample):
                sid = int(ids[i])
                recorded = outcomes[job["key"]].get(sid, (0, ""))
                if why is not None and not recorded[1]:
                    violations += 1
                    report.fail(f"{path}: sample {sid} of {spec.label()} breaks the threat "
                                f"model ({why}) but is recorded as a valid attack result")
                elif why is None and recorded[1]:
                    report.fail(f"{path}: sample {sid} is recorded as a violation "
                                f"({recorded[1]}) but is within the threat model")
        n_checked = sum(len(v[1]) for v in adv.values())
        if not violations:
            report.ok(f"threat models: {n_checked} adversarial examples re-checked")
        for what in sorted(unverifiable):
            report.skip(f"threat model {what}: verifying needs the attack's parameters (flow "
                        "field), which the bundle does not carry")
        if not rescore:
            report.skip("re-scoring (--no-rescore)")
            return report
        # -- re-scoring -----------------------------------------------------------------
        counts: dict[str, dict[int, int]] = {}
        built: dict[tuple[str, Any], Any] = {}
        for job in jobs:
            spec = specs[job["key"]]
            did = spec.defense.id
            if job["status"] != "done" or (overrides and did not in overrides):
                continue
            bkey = (did, spec.defense_params)
            if bkey not in built:
                ref = overrides.get(did) or spec.defense.name
                defense = DEFENSES.get(ref)(**_thaw(spec.defense_params))
                built[bkey] = defense.to(dev).eval().requires_grad_(False)
            defense = built[bkey]
            if describe(defense)[0] == "density":
                density_jobs.add(job["key"])
                continue
            reseed = getattr(defense, "reseed", None)
            if callable(reseed):
                reseed(spec.run_seed)
            x, y, num_classes = shard_data(spec, dev)
            if not spec.is_clean:
                if job["key"] not in adv:
                    continue
                x_adv_t = torch.from_numpy(np.array(adv[job["key"]][0])).to(dev)
                invalid = torch.tensor([bool(outcomes[job["key"]].get(int(s), (0, ""))[1])
                                        for s in spec.sample_ids], device=dev)
                x = torch.where(invalid.view(-1, 1, 1, 1), x, torch.nan_to_num(x_adv_t))
            c = correct_counts(defense, x, y, job["k"], num_classes, spec.batch_size,
                               f"defense {did!r}")
            counts[job["key"]] = {int(s): (0 if outcomes[job["key"]].get(int(s), (0, ""))[1]
                                           else int(v))
                                  for s, v in zip(spec.sample_ids, c.tolist(), strict=True)}
        _compare(jobs, specs, counts, _claims(root), aggregate, report)
        if density_jobs:
            report.skip(f"{len(density_jobs)} density jobs not re-verified: bundles do not yet "
                        "carry the attacks' starting points and per-sample log-likelihoods")
    return report


def _thaw(params: Any) -> dict[str, Any]:
    from benchmark.spec.suite import thaw

    return thaw(params) or {}


def _compare(jobs: list[dict[str, Any]], specs: dict[str, Any], counts: dict[str, dict[int, int]],
             claims: list[dict[str, Any]], aggregate: Any, report: Report) -> None:
    """Recompute each claimed row's robust accuracy from the re-scored counts."""
    clean: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    cells: dict[tuple[Any, ...], dict[int, int]] = defaultdict(dict)
    k_of: dict[tuple[str, str], int] = {}
    stochastic: dict[str, bool] = {}
    for job in jobs:
        if job["key"] not in counts:
            continue
        spec = specs[job["key"]]
        dkey = (spec.defense.id, json.dumps(_thaw(spec.defense_params), sort_keys=True))
        k_of[dkey] = job["k"]
        stochastic[spec.defense.id] = bool(job["stochastic"])
        if spec.is_clean:
            clean[dkey].update(counts[job["key"]])
        else:
            cells[(*dkey, spec.attack_id, spec.threat, spec.eps)].update(counts[job["key"]])
    worst: dict[tuple[Any, ...], dict[int, int]] = defaultdict(dict)
    recomputed: dict[tuple[Any, ...], float] = {}
    for (did, dp, aid, threat, eps), adv in cells.items():
        robust = {s: min(clean[(did, dp)].get(s, 0), c) for s, c in adv.items()}
        recomputed[(did, dp, aid, threat, eps)] = aggregate(
            np.array([robust[s] for s in sorted(robust)]), k_of[(did, dp)]).majority
        for s, c in robust.items():
            w = worst[(did, dp, threat, eps)]
            w[s] = min(w.get(s, c), c)
    for (did, dp, threat, eps), w in worst.items():
        recomputed[(did, dp, "worst_case", threat, eps)] = aggregate(
            np.array([w[s] for s in sorted(w)]), k_of[(did, dp)]).majority
    checked = 0
    for row in claims:
        key = (row["defense"], row["defense_params"], row["attack"], row["threat_model"],
               float(row["eps"]))
        if key not in recomputed:
            continue
        if isinstance(row.get("error"), str) and row["error"] and row["attack"] != "worst_case":
            continue
        got = recomputed[key]
        lo, hi, claimed = row["robust_ci_low"], row["robust_ci_high"], row["robust_acc"]
        label = f"{row['defense']} / {row['attack']} {row['threat_model']} eps={row['eps']:g}"
        exact = not stochastic.get(row["defense"], False)
        if exact and abs(got - claimed) > 1e-6:
            report.fail(f"{label}: re-scored robust accuracy {got:.4f}, claimed {claimed:.4f} "
                        "(deterministic defense: must match exactly)")
        elif not lo - 1e-6 <= got <= hi + 1e-6:
            report.fail(f"{label}: re-scored robust accuracy {got:.4f} outside the claimed "
                        f"interval [{lo:.4f}, {hi:.4f}]")
        else:
            report.ok(f"{label}: re-scored {got:.4f}, claimed {claimed:.4f} "
                      f"[{lo:.4f}, {hi:.4f}]")
        checked += 1
    if not checked:
        report.skip("re-scoring: no leaderboard row matched the re-scored defenses")


# -- command line ---------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    manifest = make_bundle(args.run, args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(manifest['files']) + 1} files, {size / 1024:.1f} KiB "
          f"(suite {manifest['suite']}; plug-ins: {', '.join(manifest['plugin_versions'])})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from benchmark.verify.conformance import importable_cwd

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    importable_cwd()
    t0 = time.perf_counter()
    try:
        report = verify_bundle(args.bundle, defenses=args.defense, device=args.device,
                               rescore=not args.no_rescore)
    except BundleError as exc:
        print(f"FAIL  {exc}")
        print(f"bundle {args.bundle} REJECTED")
        return EXIT_FAILED
    for line in report.lines:
        print(line)
    verdict = "REJECTED" if report.failures else "verified"
    print(f"bundle {args.bundle} {verdict} in {time.perf_counter() - t0:.1f}s "
          f"({len(report.failures)} failures)")
    return EXIT_FAILED if report.failures else 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("submit", help="pack a finished run into a verifiable bundle")
    s.add_argument("--run", required=True, help="run folder (the --out of genbench run)")
    s.add_argument("--out", required=True, help="bundle file to write (.tar.gz)")
    s.set_defaults(func=cmd_submit)

    v = sub.add_parser("verify", help="check a submission bundle and re-score its examples")
    v.add_argument("bundle", help="bundle .tar.gz written by genbench submit")
    v.add_argument("--defense", action="append", metavar="ID[=module:Class]",
                   help="re-score only this defense id (repeatable); =REF rebuilds it from REF")
    v.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    v.add_argument("--no-rescore", action="store_true",
                   help="check hashes and threat models only")
    v.set_defaults(func=cmd_verify)
