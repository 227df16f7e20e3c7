"""``genbench compare OLD NEW``: per-row differences with statistics, and a regression gate.

Rows are matched on (defense, attack, threat model, epsilon), epsilons up to the rounding of
a ``%.6g`` CSV (published leaderboards wrote 8/255 as 0.0313725). Density rows compare the
detector's survival rate (attacked points still accepted, or still rejected) with the unpaired
interval below. For each matched classifier row and each of clean and robust accuracy the difference
``new - old`` is reported with a 95% interval:

* **paired**, when both sides are run folders whose store scored the same sample ids for the
  row: an exact McNemar test on the per-sample binary outcomes (a sample is correct when the
  majority of its K draws were; robust outcome = ``min(clean, adversarial)`` count per sample,
  and for ``worst_case`` the minimum over the attacks, exactly as the leaderboard scores it)
  and Newcombe's score interval for a paired difference (Newcombe 1998b, method 10);
* **unpaired** otherwise (CSV inputs, different samples): Newcombe's hybrid score interval from
  the two Wilson intervals (Newcombe 1998a, method 10), significant when it excludes 0.

Each row of the output names its test, and an unpaired row says why it could not be paired.

``--fail-on-regression`` exits 1 when an accuracy got worse, significantly at 5%, by more than
``--margin`` percentage points, when a row of OLD is missing in NEW, or when a row that had
numbers in OLD errored in NEW.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from tabulate import tabulate

from benchmark.report.cells import csv_unsafe, pct, same_eps
from benchmark.report.evidence import RowKey, majority, row_key, sample_counts
from benchmark.report.stats import mcnemar_exact, newcombe_paired, newcombe_unpaired

ALPHA = 0.05
EXIT_REGRESSION = 1
KEY = ("defense", "attack", "threat_model", "eps")
METRICS = (("clean", "clean_acc"), ("robust", "robust_acc"))
#: how each test is named in the output
TEST_NAMES = {"mcnemar": "mcnemar (paired)", "newcombe": "newcombe (unpaired)"}

V = TypeVar("V")


class RowIndex(Mapping[RowKey, V]):
    """Rows by key, looked up with epsilons matched up to a ``%.6g`` CSV's rounding
    (:func:`benchmark.report.cells.same_eps`): a run's store has 8/255 exactly, a published
    CSV 0.0313725."""

    def __init__(self, items: Mapping[RowKey, V]) -> None:
        self._exact = dict(items)
        self._by_cell: dict[tuple[str, str, str], list[RowKey]] = defaultdict(list)
        for key in self._exact:
            self._by_cell[key[:3]].append(key)

    def find(self, key: RowKey) -> RowKey | None:
        """The stored key matching ``key`` (the nearest epsilon within tolerance), or None."""
        if key in self._exact:
            return key
        near = [k for k in self._by_cell.get(key[:3], []) if same_eps(k[3], key[3])]
        return min(near, key=lambda k: abs(k[3] - key[3])) if near else None

    def __getitem__(self, key: object) -> V:
        found = self.find(key) if isinstance(key, tuple) else None
        if found is None:
            raise KeyError(key)
        return self._exact[found]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self.find(key) is not None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._exact)

    def __len__(self) -> int:
        return len(self._exact)



# -- loading ------------------------------------------------------------------------------

@dataclass
class Side:
    """One side of a comparison: its leaderboard rows and, for run folders, per-sample
    binary outcomes ``{row key: {"clean"|"robust": {sample id: 0/1}}}``."""

    source: str
    frame: pd.DataFrame
    outcomes: dict[RowKey, dict[str, dict[int, int]]] | None


def _detector_holds(r: Any) -> float:
    """A density row's survival rate: attacked points still accepted (``lower``) or still
    rejected (``raise``); NaN for clean density rows and classifier rows."""
    direction = r.get("direction")
    col = {"lower": "accepted", "raise": "rejected"}.get(direction if isinstance(direction, str)
                                                       else "")
    if col is None or col not in r or pd.isna(r[col]):
        return math.nan
    return float(r[col])


def load_side(path: str | Path) -> Side:
    """A run folder (``leaderboard.csv`` + ``runs.sqlite``) or a leaderboard CSV."""
    from benchmark.report.leaderboard import read_csv

    path = Path(path)
    if path.is_dir():
        csv_path = path / "leaderboard.csv"
        if not csv_path.exists():
            raise ValueError(f"{path} is not a genbench run folder: leaderboard.csv is missing")
        frame = read_csv(csv_path)
        db = path / "runs.sqlite"
        outcomes = per_sample_outcomes(path) if db.exists() else None
    elif path.is_file():
        frame = read_csv(path)
        outcomes = None
    else:
        raise FileNotFoundError(f"{path} is neither a run folder nor a leaderboard CSV")
    missing = [c for c in (*KEY, "n", "clean_acc", "robust_acc") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a genbench leaderboard (missing columns {missing})")
    for col in ("defense", "attack", "threat_model"):
        frame[col] = frame[col].map(csv_unsafe)
    return Side(str(path), frame, outcomes)


def per_sample_outcomes(run: str | Path) -> dict[RowKey, dict[str, dict[int, int]]]:
    """Binary per-sample clean and robust outcomes (majority of K draws) of every row of a run
    folder's store, for the jobs of its ``plan.json`` (all jobs when there is none)."""
    from benchmark.store import Store

    run = Path(run)
    plan_file = run / "plan.json"
    keys = json.loads(plan_file.read_text())["jobs"] if plan_file.exists() else None
    with Store(run / "runs.sqlite") as store:
        clean, robust, k_of = sample_counts(store, keys)
    return {key: {"clean": majority(clean[key], k_of[key]),
                  "robust": majority(robust[key], k_of[key])} for key in robust}


# -- comparison ---------------------------------------------------------------------------

@dataclass
class Delta:
    defense: str
    attack: str
    threat_model: str
    eps: float
    metric: str  # "clean", "robust", "detector" (density rows) or "row"
    old: float
    new: float
    diff: float
    ci_low: float
    ci_high: float
    test: str  # "mcnemar", "newcombe", "missing", "error"
    p_value: float
    n_old: int
    n_new: int
    regression: bool
    note: str = ""


def _significant_drop(delta: Delta, margin: float) -> bool:
    if not delta.diff < 0 or -delta.diff <= margin / 100 + 1e-12:
        return False
    if delta.test == "mcnemar":
        return delta.p_value < ALPHA
    return delta.ci_high < 0


def compare(old: Side, new: Side, *, margin: float = 0.0) -> list[Delta]:
    """Per-row, per-metric differences of ``new`` against ``old``."""
    if margin < 0:
        raise ValueError(f"--margin must be >= 0 percentage points, got {margin}")
    new_rows = RowIndex({row_key(r): r for _, r in new.frame.iterrows()})
    old_out = RowIndex(old.outcomes) if old.outcomes else None
    new_out = RowIndex(new.outcomes) if new.outcomes else None
    out: list[Delta] = []
    for _, o in old.frame.iterrows():
        key = row_key(o)
        nan = math.nan
        base: dict[str, Any] = dict(defense=key[0], attack=key[1], threat_model=key[2],
                                    eps=key[3])
        n_old = 0 if pd.isna(o["n"]) else int(o["n"])
        if key not in new_rows:
            out.append(Delta(**base, metric="row", old=nan, new=nan, diff=nan, ci_low=nan,
                             ci_high=nan, test="missing", p_value=nan, n_old=n_old, n_new=0,
                             regression=True, note="row missing in NEW"))
            continue
        r = new_rows[key]
        n_new = 0 if pd.isna(r["n"]) else int(r["n"])
        if o.get("defense_kind") == "density":
            ov, nv = _detector_holds(o), _detector_holds(r)
            if math.isnan(ov):
                continue  # a clean density row (its threshold is not a rate) or errored in OLD
            if math.isnan(nv):
                out.append(Delta(**base, metric="row", old=ov, new=nan, diff=nan, ci_low=nan,
                                 ci_high=nan, test="error", p_value=nan, n_old=n_old,
                                 n_new=n_new, regression=True, note="row errored in NEW"))
                continue
            diff, lo, hi = newcombe_unpaired(round(nv * n_new), n_new, round(ov * n_old), n_old)
            delta = Delta(**base, metric="detector", old=ov, new=nv, diff=diff, ci_low=lo,
                          ci_high=hi, test="newcombe", p_value=nan, n_old=n_old, n_new=n_new,
                          regression=False, note=f"{o['direction']}: still "
                          f"{'accepted' if o['direction'] == 'lower' else 'rejected'}")
            delta.regression = _significant_drop(delta, margin)
            out.append(delta)
            continue
        if pd.isna(o["robust_acc"]):
            continue  # errored in OLD: nothing to regress from
        if pd.isna(r["robust_acc"]):
            out.append(Delta(**base, metric="row", old=float(o["robust_acc"]), new=nan,
                             diff=nan, ci_low=nan, ci_high=nan, test="error", p_value=nan,
                             n_old=n_old, n_new=n_new, regression=True,
                             note="row errored in NEW"))
            continue
        paired_o = old_out.get(key) if old_out is not None else None
        paired_n = new_out.get(key) if new_out is not None else None
        for metric, col in METRICS:
            if pd.isna(o[col]) or pd.isna(r[col]):
                continue
            ov, nv = float(o[col]), float(r[col])
            if (paired_o is not None and paired_n is not None
                    and set(paired_o[metric]) == set(paired_n[metric]) and paired_o[metric]):
                po, pn = paired_o[metric], paired_n[metric]
                a = sum(1 for s in po if pn[s] and po[s])
                b = sum(1 for s in po if pn[s] and not po[s])  # correct in NEW only
                c = sum(1 for s in po if po[s] and not pn[s])  # correct in OLD only
                d = len(po) - a - b - c
                diff, lo, hi = newcombe_paired(a, b, c, d)
                delta = Delta(**base, metric=metric, old=(a + c) / len(po),
                              new=(a + b) / len(po), diff=diff, ci_low=lo, ci_high=hi,
                              test="mcnemar", p_value=mcnemar_exact(b, c), n_old=len(po),
                              n_new=len(pn), regression=False,
                              note=f"{c} samples lost, {b} gained")
            else:
                diff, lo, hi = newcombe_unpaired(round(nv * n_new), n_new, round(ov * n_old),
                                                 n_old)
                delta = Delta(**base, metric=metric, old=ov, new=nv, diff=diff, ci_low=lo,
                              ci_high=hi, test="newcombe", p_value=math.nan, n_old=n_old,
                              n_new=n_new, regression=False,
                              note="unpaired: " + _why_unpaired(old, new, paired_o, paired_n,
                                                               metric))
            delta.regression = _significant_drop(delta, margin)
            out.append(delta)
    return out


def _why_unpaired(old: Side, new: Side, paired_o: Any, paired_n: Any, metric: str) -> str:
    for side, paired, name in ((old, paired_o, "OLD"), (new, paired_n, "NEW")):
        if side.outcomes is None:
            return f"{name} has no per-sample outcomes (a CSV, or a run folder without its store)"
        if paired is None:
            return f"{name}'s store has no per-sample outcomes for this row"
    if not paired_o[metric]:
        return "no samples"
    return "the two sides scored different sample ids"


# -- output -------------------------------------------------------------------------------

def _pp(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:+.1f}"


def render(deltas: list[Delta], *, tablefmt: str = "simple", margin: float = 0.0,
           old: str = "OLD", new: str = "NEW") -> str:
    rows = []
    for d in deltas:
        ci = "" if math.isnan(d.ci_low) else f"[{_pp(d.ci_low)}, {_pp(d.ci_high)}]"
        p = "" if math.isnan(d.p_value) else f"{d.p_value:.3g}"
        verdict = "REGRESSION" if d.regression else ("better" if d.diff > 0 and (
            (d.test == "mcnemar" and d.p_value < ALPHA) or (d.test == "newcombe"
                                                            and d.ci_low > 0)) else "")
        rows.append([d.defense, d.attack, d.threat_model, f"{d.eps:g}" if d.eps >= 0 else "",
                     d.metric, pct(d.old),
                     pct(d.new), _pp(d.diff), ci, TEST_NAMES.get(d.test, d.test), p, verdict,
                     d.note])
    table = tabulate(rows, headers=["defense", "attack", "threat", "eps", "metric", "old %",
                                    "new %", "diff pp", "95% CI pp", "test", "p", "verdict",
                                    "note"], tablefmt=tablefmt, disable_numparse=True)
    n_reg = sum(d.regression for d in deltas)
    tests = Counter(d.test for d in deltas)
    used = ", ".join(f"{tests[t]} {TEST_NAMES[t]}" for t in TEST_NAMES if tests[t])
    summary = (f"{n_reg} regression(s) of {len(deltas)} comparisons (worse, significant at 5%, "
               f"by more than {margin:g} pp; or missing/errored rows); OLD={old}, NEW={new}"
               + (f"\ntests used: {used}" if used else ""))
    return f"{table}\n\n{summary}\n"


def cmd_compare(args: argparse.Namespace) -> int:
    old, new = load_side(args.old), load_side(args.new)
    deltas = compare(old, new, margin=args.margin)
    print(render(deltas, margin=args.margin, old=args.old, new=args.new), end="")
    if args.markdown:
        Path(args.markdown).write_text(
            "# genbench compare\n\n"
            + render(deltas, tablefmt="github", margin=args.margin, old=args.old, new=args.new))
    if args.fail_on_regression and any(d.regression for d in deltas):
        print("genbench compare: regression detected", file=sys.stderr)
        return EXIT_REGRESSION
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare two runs (or leaderboard CSVs) with statistics")
    p.add_argument("old", help="reference run folder or leaderboard.csv")
    p.add_argument("new", help="new run folder or leaderboard.csv")
    p.add_argument("--fail-on-regression", action="store_true", dest="fail_on_regression",
                   help="exit 1 on a significant drop larger than --margin, or missing rows")
    p.add_argument("--margin", type=float, default=0.0, metavar="PP",
                   help="tolerated drop in percentage points (default 0)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.set_defaults(func=cmd_compare)
