"""A run folder's tables: ``leaderboard.csv`` (canonical), ``leaderboard.md`` and, for density
defenses, the PNG plots of :mod:`benchmark.report.plots` in ``density/``. Derived from the
store, never edited by hand; ``genbench run`` writes them after the harness returns.

The Markdown header says when the table is partial ("partial: N of M jobs done": jobs of the
plan are not in the store yet) and lists the worst cases that miss an errored attack (never
ranked: :func:`benchmark.report.publish.ranked`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.report.evidence import WORST
from benchmark.report.leaderboard import build_leaderboard, is_density, render_markdown, write_csv
from benchmark.spec.plan import Plan
from benchmark.store import Store


@dataclass(frozen=True)
class Tables:
    csv: Path
    md: Path


@dataclass(frozen=True)
class Progress:
    """How many of a plan's jobs the store holds, finished (``done``) or errored."""

    total: int
    done: int
    errored: int

    @property
    def pending(self) -> int:
        return self.total - self.done - self.errored

    @property
    def partial(self) -> bool:
        return self.pending > 0


def job_states(store: Store, plan: Plan) -> dict[str, str]:
    """Job key -> "done", "error" or "pending" for every job of ``plan``."""
    stored = {r["key"]: r["status"] for r in store.jobs([j.key for j in plan.jobs])}
    return {j.key: ("pending" if j.key not in stored else
                    "done" if stored[j.key] == "done" else "error") for j in plan.jobs}


def run_progress(store: Store, plan: Plan) -> Progress:
    states = list(job_states(store, plan).values())
    return Progress(len(states), states.count("done"), states.count("error"))


def _cell(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def incomplete_worst_cases(frame: pd.DataFrame) -> list[str]:
    """One line per (defense, threat model, eps) whose worst case misses an errored attack."""
    rows = frame[~is_density(frame)]
    lines = []
    for (defense, tm, eps), cell in rows.groupby(["defense", "threat_model", "eps"], sort=True):
        attacks = cell[cell["attack"] != WORST]
        errored = attacks[attacks["error"].map(_cell)]
        if len(errored):
            lines.append(f"{defense} / {tm} eps={float(eps):g}: "
                         f"{', '.join(str(a) for a in errored['attack'])} errored")
    return lines


def header_notes(frame: pd.DataFrame, progress: Progress | None) -> list[str]:
    """The paragraphs :func:`render_leaderboard` puts under the title."""
    notes = []
    if progress is not None and progress.partial:
        errored = f", {progress.errored} errored" if progress.errored else ""
        notes.append(f"**partial: {progress.done} of {progress.total} jobs done** "
                     f"({progress.pending} pending{errored}); `genbench run` with the same "
                     "suite and --out resumes the run.")
    incomplete = incomplete_worst_cases(frame)
    if incomplete:
        notes.append("**Incomplete worst cases** (an attack errored, so the worst case misses "
                     "it: flag `worst_case_incomplete`; such rows are never ranked and their "
                     "robust accuracy is only an upper bound): "
                     + "; ".join(incomplete) + ".")
    return notes


def render_leaderboard(frame: pd.DataFrame, plan: Plan, progress: Progress | None = None
                       ) -> str:
    """:func:`benchmark.report.leaderboard.render_markdown` with :func:`header_notes` under
    its title."""
    text = render_markdown(frame, plan)
    notes = header_notes(frame, progress)
    if not notes:
        return text
    block = "\n\n".join(notes)
    if text.startswith("# "):
        title, _, rest = text.partition("\n\n")
        return f"{title}\n\n{block}\n\n{rest}"
    return f"# genbench leaderboard: suite `{plan.suite.name}`\n\n{block}\n\n{text}"


def write_tables(out: str | Path, plan: Plan) -> Tables:
    """Build the leaderboard of ``plan`` from ``out/runs.sqlite`` and write it into ``out``."""
    out = Path(out)
    with Store(out / "runs.sqlite") as store:
        frame = build_leaderboard(store, plan)
        progress = run_progress(store, plan)
        if "density" in plan.kinds.values():
            from benchmark.report.density import load_density
            from benchmark.report.plots import write_density_plots

            write_density_plots(load_density(store, plan), frame, out / "density")
    csv = write_csv(frame, out / "leaderboard.csv")
    md = out / "leaderboard.md"
    md.write_text(render_leaderboard(frame, plan, progress))
    return Tables(csv, md)
