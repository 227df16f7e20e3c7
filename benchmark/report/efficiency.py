"""Attack-efficiency curves from the attacks' per-sample evidence.

An iterative attack that reports ``first_adversarial`` (the index of the first evaluated
iterate that fooled the defense under the attack's own forward; PGD and what wraps it, StAdv)
gives, per leaderboard row, the share of samples it had not yet fooled after each evaluation:
a curve that has flattened long before the budget ran out says the attack converged; one still
falling at the end says more iterations would break more (compare the flag
``incomplete_optimization``, read from the loss curves). The curve is the attack's own verdict
(one pass, or the majority of its EOT draws), not the K-draw score of the returned example.

``converged_at`` is the first evaluation from which the curve stays within ``tol`` (1 point) of
its final value; times the attack's EOT draws it is the number of defense evaluations (NFE in
units of one forward) the attack needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.report.evidence import WORST, FlagEvidence, row_key
from benchmark.report.plots import save_percent_plot, slug

#: the tolerance of :func:`converged_at` (a share: 1 point).
CONVERGED_TOL = 0.01


def unbroken_curve(first: Mapping[int, Any], samples: Iterable[int], evaluations: int
                   ) -> np.ndarray:
    """(evaluations,): the share of ``samples`` with no adversarial iterate among evaluations
    0..e, from their ``first_adversarial`` indices (-1 or missing: never fooled)."""
    ids = list(samples)
    if not ids or evaluations < 1:
        return np.zeros(0)
    firsts = np.array([int(first[s]) if isinstance(first.get(s), int) and first[s] >= 0
                       else evaluations for s in ids])
    steps = np.arange(evaluations)
    return (firsts[None, :] > steps[:, None]).mean(axis=1)


def converged_at(curve: np.ndarray, tol: float = CONVERGED_TOL) -> int:
    """The first index from which ``curve`` stays within ``tol`` of its final value."""
    if len(curve) == 0:
        return 0
    far = np.nonzero(curve > curve[-1] + tol + 1e-12)[0]
    return int(far[-1] + 1) if len(far) else 0


def efficiency_table(frame: pd.DataFrame, ev: FlagEvidence) -> pd.DataFrame:
    """One row per attack row with ``first_adversarial`` evidence: its evaluations
    ((steps + 1) x restarts), EOT draws, the final share not fooled (single-pass verdict), the
    evaluation at which it converged to within 1 point, and the curve itself."""
    rows = []
    for _, r in frame.iterrows():
        if r["attack"] == WORST:
            continue
        first = ev.per_sample.get(row_key(r), {}).get("first_adversarial")
        steps, restarts = r.get("steps"), r.get("restarts")
        if not first or steps is None or pd.isna(steps):
            continue
        restarts = 1 if restarts is None or pd.isna(restarts) else int(restarts)
        evaluations = (int(steps) + 1) * restarts
        curve = unbroken_curve(first, sorted(first), evaluations)
        eot = r.get("eot_draws")
        draws = 1 if eot is None or pd.isna(eot) else int(eot)
        at = converged_at(curve)
        rows.append(dict(defense=r["defense"], attack=r["attack"],
                         threat_model=r["threat_model"], eps=r["eps"], n=len(first),
                         evaluations=evaluations, eot_draws=draws,
                         final_unbroken=float(curve[-1]), converged_at=at,
                         converged_evals=at * draws, curve=curve))
    return pd.DataFrame(rows)


def write_efficiency_plots(table: pd.DataFrame, out: Path) -> list[str]:
    """One PNG per threat model: the share of samples not yet fooled against the attack's
    evaluations, a line per (defense, attack, epsilon), a dot where it converged."""
    if table.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for tm, part in table.groupby("threat_model", sort=True):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for _, r in part.sort_values(["defense", "attack", "eps"]).iterrows():
            curve = 100 * np.asarray(r["curve"])
            line, = ax.plot(np.arange(len(curve)), curve,
                            label=f"{r['defense']} / {r['attack']} eps={r['eps']:g}")
            ax.plot([r["converged_at"]], [curve[min(r["converged_at"], len(curve) - 1)]],
                    marker="o", color=line.get_color())
        written.append(save_percent_plot(
            fig, ax, out, f"efficiency_{slug(str(tm))}.png",
            xlabel="attack evaluations (iterates, restarts concatenated)",
            ylabel="samples not yet fooled, attack's own verdict (%)",
            title=f"attack efficiency: {tm} (dot: within 1 point of the end)", legend_size=6))
    return written


def efficiency_csv(table: pd.DataFrame, path: Path) -> None:
    """The table without its curves, plus the curve as a ``;``-joined list of shares
    (spreadsheet-safe, as every CSV genbench writes)."""
    from benchmark.report.leaderboard import write_csv

    if table.empty:
        return
    flat = table.drop(columns=["curve"]).copy()
    flat["curve"] = [";".join(f"{v:.4g}" for v in c) for c in table["curve"]]
    write_csv(flat.astype({c: object for c in flat.columns
                           if pd.api.types.is_string_dtype(flat[c])}), path)
