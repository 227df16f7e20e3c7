"""Bits/dim of the zoo's digits flows under Pope et al.'s in- and out-of-distribution attacks,
at a strength that can be believed: a step-size sweep, restarts, and the uniform baseline.

    .venv/bin/python scripts/flow_table.py [--n 32] [--noise 16] [--eps 0.01 0.02 0.05]
                                           [--steps 100] [--restarts 5]
                                           [--step-factors 1 2.5 10] [--seed 0]
                                           [--models digits-realnvp-clean ...] [--out DIR]

For each zoo flow (RealNVP and Glow; clean, adversarial and hybrid training) and l-inf eps:

* ``test``: the mean bits/dim of ``n`` uniformly dequantized test digits (the first ``n`` of
  ``test100-v1``, the manifest's evaluation set; dequantized, so these are 8-bit NLLs);
* ``uniform``: the same images plus uniform noise filling the ball (``flow-uniform``, Pope et
  al.'s baseline);
* ``pgd-in``: ``flow-pgd-in`` (lowering the likelihood), ``steps`` signed-gradient steps; the
  step size is swept over ``factor * eps / steps`` for each ``--step-factors`` (one run each),
  and the best factor (highest mean bits/dim) is rerun with ``restarts`` random starts, the
  best iterate per image kept over every run;
* ``noise`` and ``pgd-ood``: ``noise`` uniform-noise images (not dequantized: they are
  continuous) before and after ``flow-pgd-ood`` (raising their likelihood), swept and
  restarted the same way, with the share of attacked noise *accepted* by the 95% detector
  (threshold: the 95th percentile of the bits/dim of all 100 dequantized test digits).

Everything is seeded (dequantization, noise, random starts). Single-threaded. Prints a markdown
table and writes it (``table.md``, ``table.csv``) under ``--out`` when given. Higher bits/dim =
lower likelihood.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

MODELS = [f"digits-{arch}-{regime}" for arch in ("realnvp", "glow")
          for regime in ("clean", "adv", "hybrid")]


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from attacks.flow_pgd import FlowPGDIn, FlowPGDOOD, FlowUniform
    from benchmark.data.digits import load_digits
    from benchmark.data.subsets import get_subset, select
    from benchmark.zoo.flows import dequantize
    from defenses.flow import FlowDensity
    from threat_models.linf import LinfThreat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="test digits (in-distribution attack)")
    ap.add_argument("--noise", type=int, default=16, help="noise images (OOD attack)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--step-factors", type=float, nargs="+", default=[1.0, 2.5, 10.0],
                    help="step sizes swept, as multiples of eps / steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for flag in ("n", "noise", "steps", "restarts"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(1)

    x_all = select(load_digits(), get_subset("digits", "test100-v1"))[0]
    if args.n > len(x_all):
        raise SystemExit(f"--n must be in [1, {len(x_all)}], got {args.n}")
    x_ref = dequantize(x_all, torch.Generator().manual_seed(args.seed))
    x = x_ref[:args.n]
    shape = (args.noise, *x.shape[1:])

    def attack(cls, flow, inputs, eps, seed):  # -> (mean bpd, per-image bpd, factor)
        """The step sweep (one run per factor), then the best factor with restarts; the best
        iterate per image over every run (sweep included)."""
        best = None
        results = []
        for f in args.step_factors:
            r = cls(steps=args.steps, step_size=f * eps / args.steps).run(
                flow, inputs, torch.zeros(len(inputs)), LinfThreat(eps),
                generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                results.append((f, r, flow.bits_per_dim(r.x_adv)))
        factor = (max if cls is FlowPGDIn else min)(results, key=lambda t: float(t[2].mean()))[0]
        r = cls(steps=args.steps, step_size=factor * eps / args.steps,
                restarts=args.restarts).run(flow, inputs, torch.zeros(len(inputs)),
                                            LinfThreat(eps),
                                            generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            results.append((factor, r, flow.bits_per_dim(r.x_adv)))
        stacked = torch.stack([b for _, _, b in results])
        best = stacked.amax(0) if cls is FlowPGDIn else stacked.amin(0)
        return float(best.mean()), best, factor

    head = ["model", "eps", "test", "uniform", "pgd-in", "in step x", "noise", "pgd-ood",
            "ood step x", "ood accepted %"]
    rows: list[list[str]] = []
    t0 = time.time()
    print(f"mean bits/dim; {args.n} dequantized test digits (in), {args.noise} uniform-noise "
          f"images (ood); l-inf eps in [0, 1] units; {args.steps} steps, step sweep "
          f"{args.step_factors} x eps/steps, the best step with {args.restarts} restarts\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in args.models:
        flow = FlowDensity(model=name)
        with torch.no_grad():
            ref = flow.bits_per_dim(x_ref)
            threshold = float(torch.quantile(ref, 0.95))
            test = float(flow.bits_per_dim(x).mean())
        noise = torch.rand(shape, generator=torch.Generator().manual_seed(args.seed + 2))
        with torch.no_grad():
            noise_bpd = float(flow.bits_per_dim(noise).mean())
        for e in args.eps:
            base = FlowUniform().run(flow, x, torch.zeros(len(x)), LinfThreat(e),
                                     generator=torch.Generator().manual_seed(args.seed + 3))
            with torch.no_grad():
                uniform = float(flow.bits_per_dim(base.x_adv).mean())
            pgd_in, _, f_in = attack(FlowPGDIn, flow, x, e, args.seed + 1)
            # the same noise for every eps: FlowPGDOOD draws it first from its generator
            ood, ood_bpd, f_ood = attack(FlowPGDOOD, flow, x[:args.noise].new_zeros(shape), e,
                                         args.seed + 2)
            accepted = 100.0 * float((ood_bpd <= threshold).float().mean())
            row = [name.removeprefix("digits-"), f"{e:g}", f"{test:.2f}", f"{uniform:.2f}",
                   f"{pgd_in:.2f}", f"{f_in:g}", f"{noise_bpd:.2f}", f"{ood:.2f}", f"{f_ood:g}",
                   f"{accepted:.0f}"]
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
    took = time.time() - t0
    print(f"\n({took:.0f} s)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = "python scripts/flow_table.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
        text = (f"Command: `{cmd}` ({took:.0f} s, one thread).\n\n| " + " | ".join(head)
                + " |\n|" + "---|" * len(head) + "\n"
                + "".join("| " + " | ".join(r) + " |\n" for r in rows))
        (args.out / "table.md").write_text(text, encoding="utf-8")
        with open(args.out / "table.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(head)
            w.writerows(rows)


if __name__ == "__main__":
    main()
