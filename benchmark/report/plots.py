"""Plots of density defenses, written as PNG into ``<run>/density/`` by the leaderboard step
(``genbench publish`` copies them next to the published leaderboard).

* ``logp_vs_complexity_<defense>.png`` (Arvinte et al. 2023, fig. 2): NLL in bits/dim vs PNG
  complexity, one panel per (attack, threat model, epsilon): the clean test images, the
  attack's starts and its results, and the 95% acceptance threshold (dashed; images below it
  in NLL are accepted);
* ``convergence_<attack>.png`` (Arvinte et al. 2023, fig. 4): the attack objective (as the attack
  reports it in ``extras["curve"]``) against the curve index, the mean over samples with a band
  of +- 1.96 standard errors of the mean, one line per (defense, threat model, epsilon);
* ``nll_vs_eps_<attack>_<threat>.png`` (Pope et al. table 1 as a figure): mean NLL (bits/dim)
  of the attacked points against epsilon with the leaderboard's 95% bootstrap interval, one line
  per defense (e.g. per flow training regime); epsilon 0 is the attack's start. Only for
  attacks with an epsilon budget (not under ``unrestricted``).

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from benchmark.report.density import DensityData, RowKey

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_density_plots"]

_COLORS = {"clean": "#9e9e9e", "start": "#1f77b4", "after": "#d62728"}


def slug(text: str) -> str:
    """``text`` as a file-name part (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def save_percent_plot(fig: Any, ax: Any, out: Path, name: str, *, title: str, xlabel: str,
                      ylabel: str, legend_size: int = 8) -> str:
    """Finish a plot of percentages (y from -2 to 102, a light grid, the legend where there
    are lines), save it as ``out/name`` and close it; returns ``plots/name``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:  # a partial or failed run may have nothing to plot yet
        ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    fig.savefig(out / name)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"plots/{name}"


def _figure(n_panels: int, *, ncols: int = 3, size: float = 3.6
            ) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size * ncols + 0.6, size * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _label(rkey: RowKey) -> str:
    _, _, attack, threat, eps = rkey
    return f"{attack} ({threat} {eps:g})" if threat != "unrestricted" else f"{attack}"


def _scatter(data: DensityData, thresholds: dict[str, float], out: Path) -> list[Path]:
    by_defense: dict[str, list[RowKey]] = defaultdict(list)
    for rkey, s in sorted(data.cells.items(), key=lambda kv: str(kv[0])):
        if len(s.sample_ids):
            by_defense[rkey[0]].append(rkey)
    written = []
    for did, rkeys in sorted(by_defense.items()):
        fig, axes = _figure(len(rkeys))
        for ax, rkey in zip(axes, rkeys, strict=True):
            s = data.cells[rkey]
            clean = data.clean.get((rkey[0], rkey[1]))
            if clean is not None and len(clean.sample_ids):
                ax.scatter(clean.complexity_before, clean.bpd_before, s=9, alpha=0.5,
                           color=_COLORS["clean"], label="clean test")
            ax.scatter(s.complexity_before, s.bpd_before, s=9, alpha=0.7,
                       color=_COLORS["start"], label="start")
            ax.scatter(s.complexity_after, s.bpd_after, s=9, alpha=0.7, marker="x",
                       color=_COLORS["after"], label="attacked")
            tau = thresholds.get(did, math.nan)
            if not math.isnan(tau):
                ax.axhline(tau, color="k", lw=0.8, ls="--", label="95% acceptance threshold")
            ax.set_title(_label(rkey), fontsize=9)
            ax.set_xlabel("PNG complexity (bytes / dim)")
            ax.set_ylabel("NLL (bits / dim)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{did}: likelihood vs complexity")
        path = out / f"logp_vs_complexity_{slug(did)}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def _convergence(data: DensityData, out: Path) -> list[Path]:
    by_attack: dict[str, list[RowKey]] = defaultdict(list)
    for rkey, s in sorted(data.cells.items(), key=lambda kv: str(kv[0])):
        if s.curves is not None and len(s.curves):
            by_attack[rkey[2]].append(rkey)
    written = []
    for aid, rkeys in sorted(by_attack.items()):
        fig, (ax,) = _figure(1, size=5.0)
        for rkey in rkeys:
            s = data.cells[rkey]
            assert s.curves is not None and s.curve_steps is not None
            mean = np.nanmean(s.curves, axis=0)
            n = np.sum(~np.isnan(s.curves), axis=0)
            se = np.nanstd(s.curves, axis=0, ddof=1 if len(s.curves) > 1 else 0) / np.sqrt(n)
            label = f"{rkey[0]}" + ("" if rkey[3] == "unrestricted"
                                    else f" ({rkey[3]} {rkey[4]:g})")
            line = ax.plot(s.curve_steps, mean, label=label)
            ax.fill_between(s.curve_steps, mean - 1.96 * se,
                            mean + 1.96 * se, alpha=0.2, color=line[0].get_color())
        ax.set_xlabel("curve index (attack step)")
        ax.set_ylabel("attack objective (mean, 95% band)")
        ax.set_title(f"{aid}: convergence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"convergence_{slug(aid)}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def _nll_vs_eps(frame: pd.DataFrame, out: Path) -> list[Path]:
    rows = frame[(frame["attack"] != "clean") & frame["nll_bpd_after"].notna()
                 & (frame["threat_model"] != "unrestricted")]
    written = []
    for (aid, threat), part in rows.groupby(["attack", "threat_model"], sort=True):
        fig, (ax,) = _figure(1, size=5.0)
        for did, d in part.groupby("defense", sort=True):
            d = d.sort_values("eps")
            eps = np.concatenate([[0.0], d["eps"].to_numpy(float)])
            y = np.concatenate([[d["nll_bpd_before"].mean()], d["nll_bpd_after"].to_numpy(float)])
            lo = np.concatenate([[np.nan], d["nll_bpd_after_ci_low"].to_numpy(float)])
            hi = np.concatenate([[np.nan], d["nll_bpd_after_ci_high"].to_numpy(float)])
            err = np.nan_to_num(np.stack([y - lo, hi - y]))
            ax.errorbar(eps, y, yerr=err, marker="o", capsize=3,
                        label=str(did))
        values = part[["nll_bpd_before", "nll_bpd_after"]].to_numpy(float)
        if np.nanmin(values) > 0 and np.nanmax(values) > 10 * np.nanmin(values):
            ax.set_yscale("log")  # regimes differ by orders of magnitude (Pope et al. table 1)
        direction = str(part["direction"].iloc[0])
        what = "attacked test images" if direction == "lower" else "attacked points"
        ax.set_xlabel(f"{threat} epsilon (0: the attack's start)")
        ax.set_ylabel(f"NLL of {what} (bits / dim)")
        ax.set_title(f"{aid} ({direction} likelihood)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"nll_vs_eps_{slug(str(aid))}_{slug(str(threat))}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def write_density_plots(data: DensityData, frame: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write every density plot into ``out`` (created when there is anything to plot) and
    return the paths. ``frame`` is the leaderboard (its density rows give the NLL intervals)."""
    out = Path(out)
    if not data.cells and not data.clean:
        return []
    out.mkdir(parents=True, exist_ok=True)
    dens = frame[frame["defense_kind"] == "density"] if "defense_kind" in frame else frame[:0]
    clean = dens[(dens["attack"] == "clean") & dens["threshold_bpd"].notna()]
    thresholds = {str(r["defense"]): float(r["threshold_bpd"]) for _, r in clean.iterrows()}
    return (_scatter(data, thresholds, out) + _convergence(data, out)
            + _nll_vs_eps(dens, out))
