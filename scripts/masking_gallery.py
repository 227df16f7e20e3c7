"""The masking-trap gallery (``tests/masking_traps.py``) as a table: flags and worst cases.

    .venv/bin/python scripts/masking_gallery.py [--n 100] [--out results/masking-gallery]
                                                [--pgd-steps 20] [--square-queries 1000]

Runs the gallery suite (the honest ``digits-cnn`` and seven traps wrapping it, under PGD,
APGD-DLR, Square and a transfer attack from the honest CNN, at l-inf 0.1 and 0.3) on the first
``n`` digits of ``test100-v1`` (resumable: the run folder is ``--out``), and prints per trap and
epsilon: the flags on its worst-case row, the worst case over the white-box attacks alone (what
a benchmark without gradient-free and transfer attacks would report), the worst case over all
attacks, and the honest CNN's worst case on the same samples. For ``secretnoise`` the
white-box-only column is the mean of K (one draw, as a defense declared deterministic was
scored before the randomness probe); its worst case is K-draw majority vote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmark.report.evidence import collect_evidence
    from benchmark.report.flags import compute_flags, is_blackbox
    from benchmark.report.leaderboard import build_leaderboard
    from benchmark.run.harness import run_suite
    from benchmark.spec.suite import parse_suite
    from benchmark.store import Store
    from tests.masking_traps import TRAPS, gallery_suite

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default=str(root / "results" / "masking-gallery"))
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--square-queries", type=int, default=1000)
    args = ap.parse_args(argv)
    suite = parse_suite(gallery_suite(pgd_steps=args.pgd_steps,
                                      square_queries=args.square_queries),
                        source="masking-gallery.toml")
    summary = run_suite(suite, args.out, limit=args.n, progress="bar")
    with Store(Path(args.out) / "runs.sqlite") as store:
        frame = build_leaderboard(store, summary.plan)
        frame["flags"] = compute_flags(frame, collect_evidence(store, summary.plan))
    rows = []
    for eps, cell in frame.groupby("eps"):
        honest = cell[(cell.defense == "honest") & (cell.attack == "worst_case")].iloc[0]
        for defense in ["honest", *(t.lower() for t in TRAPS)]:
            mine = cell[cell.defense == defense]
            worst = mine[mine.attack == "worst_case"].iloc[0]
            attacks = mine[mine.attack != "worst_case"]
            white = attacks[[not is_blackbox(r) for _, r in attacks.iterrows()]]
            column = "robust_acc_mean" if defense == "secretnoise" else "robust_acc"
            before = white[column].min() if len(white) else float("nan")
            rows.append((defense, f"{eps:g}", worst["flags"] or "-", f"{100 * before:.0f}",
                         f"{100 * worst['robust_acc']:.0f}",
                         f"{100 * honest['robust_acc']:.0f}", int(worst["n"])))
    print("| trap | l-inf eps | flags on the worst case | white-box only % | worst case % "
          "| honest CNN % | n |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    print(f"\nsuite: {summary.total_jobs} jobs in {summary.wall_s:.0f} s "
          f"(PGD and APGD-DLR {args.pgd_steps} steps, Square {args.square_queries} queries, "
          f"transfer: PGD {args.pgd_steps} steps on digits-cnn)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
