"""Does a PF-ODE likelihood attack's objective transfer to the likelihood the detector reports?

    .venv/bin/python scripts/pfode_transfer.py [--n 4] [--steps 30] [--cases near ...]
    .venv/bin/python scripts/pfode_transfer.py --cases roundtrip --n 8 [--grid 0.05 0.02 0.01]

Runs the near-sample attack (l-inf 0.03, the paper's 0.06 on [-1, 1]) and the unrestricted
attack on the first ``n`` digits of ``test100-v1`` against ``PFODEDensity()`` (the zoo's
``digits-eps``), each with the attack objective of three settings:

* ``fast``: the paper's (20 RK4 steps, one fixed Hutchinson probe), no checks;
* ``fast-fresh``: a new probe at every step and call, no checks;
* ``fast-fresh`` with ``check_every = 10``: the best iterate by the *reported* log p.

For each it prints the reported NLL (the accurate solver: 1000 RK4 steps, fresh probes;
bits/dim, lower = more likely) of the start and of the result, per image, the attack objective
at the start and at the returned iterate, and the attack's wall time. One thread; about 8
minutes per case at n = 4 and 30 steps on this CPU (the checked case about twice that).

``roundtrip``: what the reverse-integration attack's start costs before it optimizes anything,
``decode(encode(x))`` with a fixed-probe RK4 grid of each ``--grid`` step (0.05 is the fast
solver's): the pixel error and the reported NLL of the round-tripped image against the test
image's (reported by ``accurate-100``; a few seconds per image and grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CASES = [("near", "fast", 0), ("near", "fast-fresh", 0), ("near", "fast-fresh", 10),
         ("unrestricted", "fast", 0), ("unrestricted", "fast-fresh", 0)]


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from attacks.likelihood import NearSampleAttack, UnrestrictedLikelihoodAttack
    from benchmark.data.digits import load_digits
    from benchmark.data.subsets import get_subset, select
    from defenses.pfode import PFODEDensity
    from threat_models import LinfThreat, UnrestrictedThreat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cases", nargs="+", default=["near", "unrestricted"],
                    choices=["near", "unrestricted", "roundtrip"])
    ap.add_argument("--grid", type=float, nargs="+", default=[0.05, 0.02, 0.01],
                    help="roundtrip: the RK4 grid steps to compare (0.05: the fast solver)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = select(load_digits(), get_subset("digits", "test100-v1"))[0][:args.n]
    if "roundtrip" in args.cases:
        roundtrip(x, args.grid)
    y = torch.zeros(len(x), dtype=torch.long)
    for attack, solver, check in CASES:
        if attack not in args.cases:
            continue
        defense = PFODEDensity(attack_solver=solver)
        defense.reseed(0)
        if attack == "near":
            atk, threat = NearSampleAttack(steps=args.steps, check_every=check), LinfThreat(0.03)
        else:
            atk, threat = (UnrestrictedLikelihoodAttack(steps=args.steps, check_every=check),
                           UnrestrictedThreat(1.0))
        t = time.time()
        res = atk.run(defense, x, y, threat, generator=torch.Generator().manual_seed(0))
        took = time.time() - t
        defense.reseed(1)
        before = defense.bits_per_dim(res.extras["x_start"])
        after = defense.bits_per_dim(res.x_adv)
        change = [round(float(v), 3) for v in after - before]
        print(f"{attack} {solver} check_every={check}: reported NLL {before.mean():.3f} -> "
              f"{after.mean():.3f} bits/dim (per image {change}); objective "
              f"{res.extras['curve'][0].mean():.4f} -> "
              f"{res.extras['best_objective'].mean():.4f}; attack {took:.0f} s", flush=True)


def roundtrip(x: torch.Tensor, grid: list[float]) -> None:
    """Print, per grid step, the error of ``decode(encode(x))`` and its reported NLL."""
    import torch

    from defenses.pfode import PFODEDensity, Solver

    defense = PFODEDensity(report_solver="accurate-100")
    defense.reseed(1)
    print(f"test images: reported NLL {defense.bits_per_dim(x).mean():.3f} bits/dim "
          f"(accurate-100)", flush=True)
    for step in grid:
        solver = Solver(f"rk4-{step:g}", step=step, fresh_noise=False)
        t = time.time()
        with torch.no_grad():
            x1, _ = defense.encode(x, solver=solver)
            x0, _ = defense.sample_from_latent(x1, solver=solver)
        took = time.time() - t
        err = (x0 - x).flatten(1)
        nll = defense.bits_per_dim(x0.clamp(0, 1))
        print(f"grid step {step:g}: pixel error RMS {err.pow(2).mean(1).sqrt().mean():.5f}, "
              f"max {err.abs().amax(1).mean():.4f}; reported NLL after the round trip "
              f"{nll.mean():.3f} bits/dim; round trip {took:.1f} s", flush=True)


if __name__ == "__main__":
    main()
