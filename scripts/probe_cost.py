"""What the automatic probes cost a finished run, as a share of its job time.

    .venv/bin/python scripts/probe_cost.py RUN_DIR

The automatic probes are the evidence the validity flags need and no suite lists: the
unconstrained probe of every white-box attack and the single-step probe of every iterative one
(probe jobs), the gradient diagnostics and prediction-instability probe of each defense's first
clean shard (their time is recorded as ``grad_diagnostics[0]["wall_s"]``), and the determinism
check of defenses declared deterministic (``randomness_check_s``). Prints one line per defense
and the total share; wall times are the jobs' own (summed over workers), so the share does not
depend on how many workers ran them.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path


def probe_costs(run: Path) -> tuple[dict[str, dict[str, float]], float]:
    """Per defense: seconds of ``jobs`` (all job time), ``probe_jobs``, ``diagnostics`` and
    ``determinism``; and the run's total job time."""
    from benchmark.store import Store

    path = run / "runs.sqlite"
    if not path.is_file():
        raise SystemExit(f"{run}: no runs.sqlite (expected a folder written by genbench run)")
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = 0.0
    with Store(path) as store:
        for job in store.jobs():
            if job["status"] != "done":
                continue
            wall = float(job["wall_s"] or 0.0)
            cost = out[str(job["defense"])]
            cost["jobs"] += wall
            total += wall
            if job["spec"].get("probe"):
                cost["probe_jobs"] += wall
            extras = job["extras"] or {}
            diag = extras.get("grad_diagnostics")
            if diag and isinstance(diag[0], dict):
                cost["diagnostics"] += float(diag[0].get("wall_s", 0.0))
            cost["determinism"] += sum(float(t) for t in extras.get("randomness_check_s", []))
    return out, total


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (holds runs.sqlite)")
    args = ap.parse_args(argv)
    costs, total = probe_costs(args.run)
    parts = ("probe_jobs", "diagnostics", "determinism")
    print(f"| defense | job s | {' | '.join(p.replace('_', ' ') + ' s' for p in parts)} "
          "| probes % of the defense's job time |")
    print("|---" * (len(parts) + 3) + "|")
    probes = 0.0
    for defense, cost in sorted(costs.items()):
        mine = sum(cost[p] for p in parts)
        probes += mine
        share = 100 * mine / cost["jobs"] if cost["jobs"] else 0.0
        print(f"| {defense} | {cost['jobs']:.1f} | "
              f"{' | '.join(f'{cost[p]:.1f}' for p in parts)} | {share:.1f} |")
    share = 100 * probes / total if total else 0.0
    print(f"\nautomatic probes: {probes:.1f} s of {total:.1f} s of job time ({share:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
