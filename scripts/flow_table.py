"""Bits/dim of the zoo's digits flows under Pope et al.'s in- and out-of-distribution attacks.

    .venv/bin/python scripts/flow_table.py [--n 32] [--noise 8] [--eps 0.01 0.02 0.05]
                                           [--steps 20] [--seed 0]

For each of the six zoo flows (RealNVP and Glow; clean, adversarial and hybrid training): the
mean bits/dim of ``n`` uniformly dequantized test digits (the first ``n`` of the
``test100-v1`` subset, the manifest's evaluation set) before and after ``flow-pgd-in``
(lowering their likelihood) at each l-inf eps, and of ``noise`` uniform-noise images before and
after ``flow-pgd-ood`` (raising theirs). Attacks: ``steps`` signed-gradient steps of
2.5 eps / steps from a uniform random start, best iterate kept (the attacks' defaults).
Everything is seeded (dequantization, noise, random starts); single-threaded, about a minute.
Prints a markdown table (higher bits/dim = lower likelihood).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODELS = [f"digits-{arch}-{regime}" for arch in ("realnvp", "glow")
          for regime in ("clean", "adv", "hybrid")]


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from attacks.flow_pgd import FlowPGDIn, FlowPGDOOD
    from benchmark.data.digits import load_digits
    from benchmark.data.subsets import get_subset, select
    from benchmark.zoo.flows import dequantize
    from defenses.flow import FlowDensity
    from threat_models.linf import LinfThreat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="test digits (in-distribution attack)")
    ap.add_argument("--noise", type=int, default=8, help="noise images (OOD attack)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=MODELS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    ds = load_digits()
    x_all = select(ds, get_subset("digits", "test100-v1"))[0]
    if not 1 <= args.n <= len(x_all):
        raise SystemExit(f"--n must be in [1, {len(x_all)}], got {args.n}")
    x = dequantize(x_all[:args.n], torch.Generator().manual_seed(args.seed))
    shape = (args.noise, *x.shape[1:])

    eps_cols = [f"{e:g}" for e in args.eps]
    head = (["model", "test"] + [f"in {c}" for c in eps_cols] + ["noise"]
            + [f"ood {c}" for c in eps_cols])
    print(f"mean bits/dim; {args.n} test digits (in), {args.noise} uniform-noise images (ood), "
          f"l-inf eps in [0, 1] units, {args.steps}-step PGD\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    t0 = time.time()
    for name in args.models:
        flow = FlowDensity(model=name)
        row = [name.removeprefix("digits-")]
        with torch.no_grad():
            row.append(f"{float(flow.bits_per_dim(x).mean()):.2f}")
        noise_bpd = ""
        ood: list[str] = []
        for e in args.eps:
            gen = torch.Generator().manual_seed(args.seed + 1)
            adv = FlowPGDIn(steps=args.steps).run(flow, x, torch.zeros(len(x)), LinfThreat(e),
                                                  generator=gen)
            gen = torch.Generator().manual_seed(args.seed + 2)  # the same noise for every eps
            res = FlowPGDOOD(steps=args.steps).run(flow, torch.zeros(shape), torch.zeros(
                args.noise), LinfThreat(e), generator=gen)
            with torch.no_grad():
                row.append(f"{float(flow.bits_per_dim(adv.x_adv).mean()):.2f}")
                noise_bpd = f"{float(flow.bits_per_dim(res.extras['x_start']).mean()):.2f}"
                ood.append(f"{float(flow.bits_per_dim(res.x_adv).mean()):.2f}")
        print("| " + " | ".join(row + [noise_bpd] + ood) + " |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
