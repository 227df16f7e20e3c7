"""Kill `genbench run` with SIGKILL at random points, resume, and compare with a clean run.

    .venv/bin/python scripts/kill_resume_check.py [--suite quick] [--limit 8] [--kills 3]
                                                  [--seed 20261130] [--out /tmp/kill-check]

Runs the suite once uninterrupted into ``OUT/clean``; then, into ``OUT/killed``, starts it
``--kills`` times and kills each run with SIGKILL (no clean-up at all) once the store holds a
random number of finished jobs (drawn from ``--seed``, increasing) plus a random delay inside
the next job; finally resumes to the end. Prints whether the two ``leaderboard.csv`` files are
equal in every column but ``wall_s``, and exits 1 if they are not.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def _jobs(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    except sqlite3.Error:
        return 0


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--out", default="/tmp/kill-check")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cmd = [sys.executable, "-m", "benchmark.cli", "run", "--suite", args.suite,
           "--limit", str(args.limit), "--progress", "none"]
    t0 = time.time()
    clean = subprocess.run([*cmd, "--out", str(out / "clean"), "--fresh"],
                           capture_output=True, text=True)
    if clean.returncode != 0:
        print(clean.stderr, file=sys.stderr)
        return 2
    total = _jobs(out / "clean" / "runs.sqlite")
    print(f"uninterrupted: {total} jobs in {time.time() - t0:.0f} s")
    rng = random.Random(args.seed)
    points = sorted(rng.sample(range(2, max(3, total - 3)), args.kills))
    killed, db = out / "killed", out / "killed" / "runs.sqlite"
    shutil.rmtree(killed, ignore_errors=True)  # a previous check's folder
    for point in points:
        proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while _jobs(db) < point and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 2.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"SIGKILL with {_jobs(db)} of {total} jobs stored")
    resumed = subprocess.run([*cmd, "--out", str(killed)], capture_output=True, text=True)
    said = [line for line in resumed.stderr.splitlines() if line.startswith("resuming")]
    print(f"resume: exit {resumed.returncode}; {said[0] if said else 'nothing resumed'}")
    a = pd.read_csv(killed / "leaderboard.csv").drop(columns=["wall_s"])
    b = pd.read_csv(out / "clean" / "leaderboard.csv").drop(columns=["wall_s"])
    same = a.equals(b)
    print(f"seed {args.seed}, kill points {points}: leaderboards equal in every column but "
          f"wall_s: {same} ({a.shape[0]} rows x {a.shape[1]} columns)")
    if not same:
        for col in a.columns:
            if col in b.columns and not a[col].equals(b[col]):
                print(f"  differs: {col}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
