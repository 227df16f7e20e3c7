"""Leaderboards derived from the store (never edited by hand).

One row per (defense, attack, threat model, epsilon) plus a ``worst_case`` row per (defense,
threat model, epsilon): a sample counts as robust there only if every attack failed on it.
Accuracies are numbers in [0, 1] with n and a 95% Wilson interval.

Density defenses get rows in the same table with their own columns
(:data:`benchmark.report.density.DENSITY_COLUMNS`: acceptance threshold, fraction of attacked
points still accepted or rejected, NLL in bits/dim before and after; see
:mod:`benchmark.report.density`), a clean row per defense configuration, and no worst case.
``defense_kind`` says which columns a row fills; classifier columns are empty on density rows
and vice versa.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.plugins.traits import is_diagnostic
from benchmark.report.cells import (
    all_code_versions,
    code_versions,
    csv_safe,
    eps_text,
    pct,
    plugin_versions,
)
from benchmark.report.density import DENSITY_COLUMNS, density_flags, density_rows, load_density
from benchmark.report.evidence import WORST, FlagEvidence, collect_evidence
from benchmark.report.flags import compute_flags
from benchmark.report.stats import aggregate
from benchmark.spec.jobs import CLEAN
from benchmark.store import Store

if TYPE_CHECKING:
    from benchmark.spec.plan import Plan


COLUMNS = [
    "suite", "dataset", "subset_id", "subset_hash", "defense", "attack", "threat_model", "eps",
    "n", "clean_acc", "clean_ci_low", "clean_ci_high", "robust_acc", "robust_ci_low",
    "robust_ci_high", "robust_acc_mean", "robust_acc_worst_of_k", "stochastic", "k_draws",
    "eot_draws", "steps", "restarts", "nfe_per_pred", "grad_evals", "wall_s", "seed",
    "code_version", "plugin_versions", "n_errors", "strongest_attack", "flags", "error",
    "defense_name", "attack_name", "defense_params", "attack_params", *DENSITY_COLUMNS,
]



def _group_key(job: dict[str, Any]) -> tuple[str, str]:
    spec = job["spec"]
    return spec["defense"]["id"], json.dumps(spec["defense_params"], sort_keys=True)


def build_leaderboard(store: Store, plan: Plan) -> pd.DataFrame:
    """Rows for the plan's jobs, from the store (missing jobs are simply absent). A row's
    ``code_version`` is that of the stored jobs behind it (its attack jobs and its defense's
    clean jobs), ``;``-joined when they differ (flag ``mixed_code_versions``)."""
    density_ids = {d for d, kind in plan.kinds.items() if kind == "density"}
    # probes (the unconstrained attack on a few samples) are evidence for flags, never rows
    jobs = store.jobs_of(j for j in plan.jobs if j.defense.id not in density_ids and not j.probe)
    samples = store.samples({r["key"] for r in jobs})
    suite = plan.suite

    clean: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    clean_k: dict[tuple[str, str], int] = {}
    clean_err: dict[tuple[str, str], str] = {}
    clean_jobs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        dkey = _group_key(job)
        if job["attack"] == CLEAN:
            clean_jobs[dkey].append(job)
            if job["status"] != "done":
                clean_err[dkey] = job["error"]
            clean_k[dkey] = job["k"]
            for sid, correct, _, _ in samples[job["key"]]:
                clean[dkey][sid] = correct
        else:
            groups[(*dkey, job["attack"], job["threat"], job["eps"])].append(job)

    rows: list[dict[str, Any]] = []
    per_sample: dict[tuple[Any, ...], dict[int, int]] = {}
    for (did, dparams, aid, threat, eps), members in sorted(groups.items(), key=str):
        dkey = (did, dparams)
        first = members[0]
        spec = first["spec"]
        k = first["k"]
        errors = [m["error"] for m in members if m["status"] != "done"]
        adv: dict[int, int] = {}
        n_err = 0
        for m in members:
            for sid, correct, _, err in samples[m["key"]]:
                adv[sid] = correct
                n_err += err is not None
        row = _base_row(suite, plan, spec)
        row.update(code_version=code_versions([*members, *clean_jobs[dkey]]), defense=did,
                   attack=aid, threat_model=threat, eps=eps,
                   stochastic=bool(first["stochastic"]), k_draws=k,
                   steps=first["budget"].get("steps"), restarts=first["budget"].get("restarts"),
                   eot_draws=first["budget"].get("eot_draws"), nfe_per_pred=first["nfe_per_pred"],
                   grad_evals=sum(m["grad_evals"] for m in members),
                   wall_s=sum(m["wall_s"] for m in members), n_errors=n_err,
                   attack_name=spec["attack"]["name"],
                   attack_params=json.dumps(spec["attack"]["params"], sort_keys=True),
                   plugin_versions=plugin_versions(members))
        if errors or dkey in clean_err:
            if dkey in clean_err:
                errors.append(f"clean scoring failed: {clean_err[dkey]}")
            row["error"] = "; ".join(sorted(set(errors)))
        else:
            counts = _robust_counts(clean[dkey], adv)
            per_sample[(did, dparams, aid, threat, eps)] = counts
            _fill(row, clean[dkey], counts, clean_k.get(dkey, k))
        rows.append(row)

    rows += _worst_case_rows(rows, per_sample, clean, clean_k)
    for row in rows:
        row["defense_kind"] = "classifier"
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.sort_values(["threat_model", "eps", "defense", "attack"],
                              key=lambda s: s.map(lambda v: (v == WORST, v)
                                                  if s.name == "attack" else v),
                              kind="stable")
    dens = pd.DataFrame(density_rows(load_density(store, plan),
                                     lambda spec: _base_row(suite, plan, spec)),
                        columns=COLUMNS)
    # clean rows first, then by threat model, epsilon, defense and attack
    dens = dens.sort_values(["defense", "threat_model", "eps", "attack"],
                            key=lambda s: s.map(lambda v: (v != CLEAN, v)
                                                if s.name == "attack" else v),
                            kind="stable", na_position="first")
    frame = pd.concat([frame, dens], ignore_index=True) if len(dens) else frame
    # every flag, the store-evidence ones included (gradients, per-sample black-box vs white-box)
    frame["flags"] = flag_frame(frame, collect_evidence(store, plan))
    return frame.reset_index(drop=True)


def is_density(frame: pd.DataFrame) -> pd.Series:
    """Rows of density defenses (False everywhere for tables without ``defense_kind``)."""
    if "defense_kind" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["defense_kind"] == "density"


def flag_frame(frame: pd.DataFrame, evidence: FlagEvidence | None = None) -> pd.Series:
    """Validity flags of every row: :func:`benchmark.report.flags.compute_flags` on classifier rows,
    :func:`benchmark.report.density.density_flags` on density rows."""
    out = pd.Series("", index=frame.index, dtype=object)
    dens = is_density(frame)
    if (~dens).any():
        out[~dens] = compute_flags(frame[~dens], evidence)
    if dens.any():
        out[dens] = density_flags(frame[dens])
    return out


def _robust_counts(clean: dict[int, int], adv: dict[int, int]) -> dict[int, int]:
    """Per-sample robust count: correct draws of both the clean and the attacked input."""
    return {sid: min(clean.get(sid, 0), c) for sid, c in adv.items()}


def _fill(row: dict[str, Any], clean: dict[int, int], counts: dict[int, int], k: int) -> None:
    ids = sorted(counts)
    c_acc = aggregate(np.array([clean.get(s, 0) for s in ids]), k)
    r_acc = aggregate(np.array([counts[s] for s in ids]), k)
    row.update(n=r_acc.n, clean_acc=c_acc.majority, clean_ci_low=c_acc.ci_low,
               clean_ci_high=c_acc.ci_high, robust_acc=r_acc.majority,
               robust_ci_low=r_acc.ci_low, robust_ci_high=r_acc.ci_high,
               robust_acc_mean=r_acc.mean, robust_acc_worst_of_k=r_acc.worst)


def _worst_case_rows(rows: list[dict[str, Any]], per_sample: dict[tuple[Any, ...], dict[int, int]],
                     clean: dict[tuple[str, str], dict[int, int]],
                     clean_k: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    by_cell: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        dparams = row["defense_params"]
        by_cell[(row["defense"], dparams, row["threat_model"], row["eps"])].append(row)
    out = []
    for (did, dparams, threat, eps), members in by_cell.items():
        members = [m for m in members if not is_diagnostic(m["attack_name"])]
        ok = [m for m in members if not m.get("error")]
        if not ok:
            continue
        worst: dict[int, int] = {}
        for m in ok:
            for sid, c in per_sample[(did, dparams, m["attack"], threat, eps)].items():
                worst[sid] = min(worst.get(sid, c), c)
        first = ok[0]
        row = {c: first.get(c) for c in COLUMNS}
        strongest = min(ok, key=lambda m: (m["robust_acc"], m["robust_acc_mean"]))["attack"]
        row.update(attack=WORST, attack_name=WORST, attack_params="", steps=None,
                   restarts=None, eot_draws=max((m["eot_draws"] or 1) for m in ok),
                   grad_evals=sum(m["grad_evals"] for m in ok),
                   wall_s=sum(m["wall_s"] for m in ok),
                   n_errors=sum(m["n_errors"] for m in ok), strongest_attack=strongest,
                   plugin_versions=";".join(sorted({v for m in ok
                                                    for v in m["plugin_versions"].split(";")})),
                   code_version=";".join(sorted({v for m in ok
                                                 for v in m["code_version"].split(";")})),
                   error=("worst case excludes errored attacks: "
                          + ", ".join(m["attack"] for m in members if m.get("error")))
                   if len(ok) < len(members) else None)
        _fill(row, clean[(did, dparams)], worst, clean_k.get((did, dparams), first["k_draws"]))
        out.append(row)
    return out


def _base_row(suite: Any, plan: Plan, spec: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(suite=suite.name, dataset=suite.dataset, subset_id=plan.subset.id,
               subset_hash=plan.subset.short_hash, seed=suite.seed,
               defense_name=spec["defense"]["name"],
               defense_params=json.dumps(spec["defense_params"], sort_keys=True), n_errors=0)
    return row


# -- output --------------------------------------------------------------------------------

#: numbers of a leaderboard CSV; epsilons are written in full instead (:func:`csv_frame`).
FLOAT_FORMAT = "%.6g"
#: columns written at full precision (``repr``): rows are matched to their jobs on them.
EXACT_COLUMNS = ("eps",)


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` ready for ``to_csv(float_format=FLOAT_FORMAT)``: text cells spreadsheet-safe and
    epsilons as text that reads back as the same float (``%.6g`` made 8/255 read back as
    0.0313725, which no job has); the other numbers stay readable."""
    safe = frame.copy()
    for col in safe.columns:
        if safe[col].dtype == object:
            safe[col] = safe[col].map(csv_safe)
    for col in EXACT_COLUMNS:
        if col in safe.columns:
            safe[col] = safe[col].map(eps_text).astype(object)
    return safe


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".csv.tmp")
    csv_frame(frame).to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL,
                            float_format=FLOAT_FORMAT)
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a leaderboard CSV. Only empty cells are missing values, so that a defense called
    "nan" or "NA" stays a name."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def render_markdown(frame: pd.DataFrame, plan: Plan | None = None) -> str:
    parts = []
    if len(frame):
        first = frame.iloc[0]
        parts.append(f"# genbench leaderboard: suite `{first['suite']}`\n\n"
                     f"dataset `{first['dataset']}`, subset `{first['subset_id']}` "
                     f"(hash {first['subset_hash']}), seed {first['seed']}, "
                     f"code {all_code_versions(frame)}. Accuracies in %, robust with 95% Wilson "
                     "interval; stochastic defenses scored by majority vote over K draws.\n")
    density = is_density(frame)
    for threat, part in frame[~density].groupby("threat_model", sort=True):
        table = []
        for _, r in part.iterrows():
            robust = (f"{pct(r.robust_acc)} [{pct(r.robust_ci_low)}, {pct(r.robust_ci_high)}]"
                      if not pd.isna(r.robust_acc) else "error")
            table.append([r.defense, r.attack, f"{r.eps:g}", r.n if not pd.isna(r.n) else "",
                          pct(r.clean_acc), robust, pct(r.robust_acc_worst_of_k),
                          "" if pd.isna(r.nfe_per_pred) else f"{r.nfe_per_pred:g}",
                          f"{r.wall_s:.1f}", r["flags"] if isinstance(r["flags"], str) else ""])
        parts.append(f"## {threat}\n")
        parts.append(tabulate(table, headers=["defense", "attack", "eps", "n", "clean",
                                              "robust [95% CI]", "worst-of-K", "NFE/pred",
                                              "wall s", "flags"], tablefmt="github"))
        parts.append("")
    if density.any():
        parts.append(render_density_markdown(frame[density]))
    if plan is not None and plan.skipped:
        parts.append("## skipped\n")
        unique = dict.fromkeys((s["defense"], s["attack"], s["threat_model"], s["reason"])
                               for s in plan.skipped)
        parts.append(tabulate([list(u) for u in unique],
                              headers=["defense", "attack", "threat model", "reason"],
                              tablefmt="github"))
    return "\n".join(parts) + "\n"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "" if v is None or pd.isna(v) else format(float(v), fmt)


def _interval(r: Any, name: str, as_pct: bool = False) -> str:
    value = r.get(name)
    if value is None or pd.isna(value):
        return ""
    show = pct if as_pct else _num
    return f"{show(value)} [{show(r.get(name + '_ci_low'))}, {show(r.get(name + '_ci_high'))}]"


DENSITY_HEADERS = ["defense", "attack", "threat", "eps", "direction", "n",
                   "threshold log p (bpd)", "detector holds [95% CI]", "NLL before", "NLL after",
                   "complexity before / after", "wall s", "flags"]
DENSITY_NOTE = ("Density defenses accept an image when log p >= the threshold that accepts 95% "
                "of the clean test images (5% quantile, linear interpolation). In-distribution "
                "attacks (direction `lower`): % of attacked test images still accepted; "
                "out-of-distribution (`raise`): % of attacked points still rejected; 95% Wilson "
                "intervals. NLL in bits/dim (mean [95% bootstrap interval]) of the attack's start "
                "and of its result; complexity = PNG bytes / dim.")


def density_table(frame: pd.DataFrame) -> list[list[Any]]:
    """The density rows as display cells (:data:`DENSITY_HEADERS`), for Markdown and HTML."""
    table = []
    for _, r in frame.iterrows():
        if isinstance(r["error"], str) and r["error"]:
            survived = "error"
        elif r["direction"] == "raise":
            survived = "rejected " + _interval(r, "rejected", as_pct=True)
        else:
            survived = "accepted " + _interval(r, "accepted", as_pct=True)
        eps = "" if pd.isna(r["eps"]) else f"{r['eps']:g}"
        table.append([r["defense"], r["attack"], r["threat_model"] if eps else "", eps,
                      r["direction"] if isinstance(r["direction"], str) else "",
                      "" if pd.isna(r["n"]) else int(r["n"]),
                      f"{_num(r['threshold_logp'], '.1f')} ({_num(r['threshold_bpd'])})",
                      survived, _interval(r, "nll_bpd_before"), _interval(r, "nll_bpd_after"),
                      f"{_num(r['complexity_before'])} / {_num(r['complexity_after'])}".strip(" /"),
                      "" if pd.isna(r["wall_s"]) else f"{r['wall_s']:.1f}",
                      r["flags"] if isinstance(r["flags"], str) else ""])
    return table


def render_density_markdown(frame: pd.DataFrame) -> str:
    """The density rows: threshold, detector survival and NLL before/after per attack."""
    return (f"## density\n\n{DENSITY_NOTE}\n\n"
            + tabulate(density_table(frame), headers=DENSITY_HEADERS, tablefmt="github") + "\n")


def write_markdown(frame: pd.DataFrame, path: str | Path, plan: Plan | None = None) -> Path:
    path = Path(path)
    path.write_text(render_markdown(frame, plan))
    return path
