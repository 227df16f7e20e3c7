"""A run folder's tables: ``leaderboard.csv`` (canonical), ``leaderboard.md`` and, for density
defenses, the PNG plots of :mod:`benchmark.report.plots` in ``density/``. Derived from the
store, never edited by hand; ``genbench run`` writes them after the harness returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.report.leaderboard import build_leaderboard, write_csv, write_markdown
from benchmark.spec.plan import Plan
from benchmark.store import Store


@dataclass(frozen=True)
class Tables:
    csv: Path
    md: Path


def write_tables(out: str | Path, plan: Plan) -> Tables:
    """Build the leaderboard of ``plan`` from ``out/runs.sqlite`` and write it into ``out``."""
    out = Path(out)
    with Store(out / "runs.sqlite") as store:
        frame = build_leaderboard(store, plan)
        if "density" in plan.kinds.values():
            from benchmark.report.density import load_density
            from benchmark.report.plots import write_density_plots

            write_density_plots(load_density(store, plan), frame, out / "density")
    return Tables(write_csv(frame, out / "leaderboard.csv"),
                  write_markdown(frame, out / "leaderboard.md", plan=plan))
