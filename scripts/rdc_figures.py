"""Figures of the DC/RDC issue that are not leaderboard rows: gradient randomness and the peak
memory of the exact-gradient attack.

    .venv/bin/python scripts/rdc_figures.py randomness [--n 4] [--repeats 10]
    .venv/bin/python scripts/rdc_figures.py memory [--n 4] [--steps 1 2 5]

``randomness``: mean pairwise cosine of ``repeats`` input gradients of the cross-entropy loss on
the same clean images (RDC paper, fig. 2c), for ``dc`` and ``rdc`` (v1, exact gradient through
the likelihood maximization), with the defaults of ``benchmark.plugins.builtin``.

``memory``: peak resident memory of one exact-gradient evaluation (the ``exact`` attack's step)
through RDC v1 with N likelihood-maximization steps, each N in a fresh process, as the increase
of the process's peak RSS over its peak after loading and one no-grad forward. With gradient
checkpointing the increase should grow with N times the state size, not N times the
activations; ``--no-checkpoint`` shows the difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _data(n: int):
    from benchmark.data import load_dataset

    ds = load_dataset("digits")
    return ds.test.x[:n], ds.test.y[:n]


def randomness(n: int, repeats: int) -> None:
    from benchmark.plugins.builtin import DEFENSES
    from benchmark.run.diagnostics import gradient_diagnostics

    x, y = _data(n)
    for name in ("dc", "rdc"):
        defense = DEFENSES.get(name)()
        defense.reseed(0)
        t0 = time.perf_counter()
        diag = gradient_diagnostics(defense, x, y, repeats=repeats)
        print(json.dumps({"defense": name, "n": n, "repeats": repeats,
                          "mean_pairwise_cosine": round(diag.cosine, 4),
                          "zero_frac": diag.zero_frac, "seconds": round(
                              time.perf_counter() - t0, 1)}), flush=True)


def memory_one(n: int, steps: int, checkpoint: bool) -> None:
    import torch

    from attacks.exact import Exact
    from benchmark.plugins.builtin import THREAT_MODELS
    from defenses.rdc import RobustDiffusionClassifier

    torch.set_num_threads(1)
    x, y = _data(n)
    rdc = RobustDiffusionClassifier(variant="v1", steps=steps, checkpoint=checkpoint)
    rdc.reseed(0)
    with torch.no_grad():
        rdc(x)
    base = _rss_mib()
    t0 = time.perf_counter()
    Exact(steps=1, random_start=False).run(rdc, x, y, THREAT_MODELS.get("linf")(eps=8 / 255))
    print(json.dumps({"N": steps, "n": n, "checkpoint": checkpoint,
                      "peak_increase_mib": round(_rss_mib() - base, 1),
                      "baseline_peak_mib": round(base, 1),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("randomness")
    r.add_argument("--n", type=int, default=4)
    r.add_argument("--repeats", type=int, default=10)
    m = sub.add_parser("memory")
    m.add_argument("--n", type=int, default=4)
    m.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5])
    m.add_argument("--no-checkpoint", action="store_true")
    m.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what == "randomness":
        randomness(args.n, args.repeats)
    elif args.one:
        memory_one(args.n, args.steps[0], not args.no_checkpoint)
    else:
        for steps in args.steps:  # a fresh process per N: ru_maxrss never goes down
            cmd = [sys.executable, __file__, "memory", "--one", "--n", str(args.n),
                   "--steps", str(steps)] + (["--no-checkpoint"] if args.no_checkpoint else [])
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
