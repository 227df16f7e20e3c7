"""Seed 000's figure 7 as a table: likelihood against complexity for simple and complex images.

    .venv/bin/python scripts/figure7.py [--n 8] [--seed 0] [--models pfode digits-realnvp-clean ...]
                                        [--pfode-solver accurate]
                                        [--out leaderboard/digits-density-figure7]

Arvinte et al. (2023, figure 7) find that monochrome images score the *highest* likelihood
under the PF-ODE and uniform noise the lowest, so that likelihood tracks (low) complexity rather
than being a detector of the data. This script computes, for six kinds of 16 x 16 images in
[0, 1]:

* ``black``, ``gray``, ``white``: constant 0, 0.5 and 1;
* ``test``: the first ``n`` digits of the ``test100-v1`` subset;
* ``filtered noise``: uniform noise blurred by a 5 x 5 binomial filter (smooth, no digit);
* ``uniform noise``: U(0, 1) per pixel;

their complexity by the three measures of :mod:`benchmark.complexity` (PNG bytes/dim, zlib
bytes/dim, spectral share) and, for every density model named, the reported log-likelihood in
bits/dim (mean over ``n`` images, or over ``n`` independent evaluations of a constant image,
with a 95% t-interval). Log-likelihoods are the detectors' own ``log_prob``: the PF-ODE's
accurate solver (1000 RK4 steps, a fresh Hutchinson probe per step), the flows' exact change of
variables, both of the continuous density at the given pixel values (no dequantization), as
the detectors score inputs (``--pfode-solver accurate-100``: the same solver at step 0.01, a
tenth of the cost, named in the table). Bits/dim = -log p / (D ln 2) + 8 (the 8-bit offset of [0, 1]
coordinates; lower is more likely).

Writes ``table.md``, ``table.csv`` and ``figure7.png`` (bits/dim against spectral complexity,
one panel per model) under ``--out``, and prints the table. Single-threaded; the flows take
seconds, the PF-ODE about 25 s per image with ``accurate`` and 2.4 s with ``accurate-100``
on this CPU (``--models`` selects).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

FLOWS = [f"digits-{arch}-{regime}" for arch in ("realnvp", "glow")
         for regime in ("clean", "adv", "hybrid")]
KINDS = ["black", "gray", "white", "test", "filtered noise", "uniform noise"]


def images(kind: str, n: int, seed: int):  # -> Tensor (n, 1, 16, 16)
    import torch
    import torch.nn.functional as F

    from benchmark.data.digits import load_digits
    from benchmark.data.subsets import get_subset, select

    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 16, 16)
    if kind in ("black", "gray", "white"):
        return torch.full(shape, {"black": 0.0, "gray": 0.5, "white": 1.0}[kind])
    if kind == "test":
        return select(load_digits(), get_subset("digits", "test100-v1"))[0][:n]
    noise = torch.rand(shape, generator=g)
    if kind == "uniform noise":
        return noise
    b = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (b[:, None] * b[None, :] / 256.0)[None, None]
    return F.conv2d(F.pad(noise, (2, 2, 2, 2), mode="reflect"), k)


def density(name: str, pfode_solver: str = "accurate"):
    from benchmark.plugins.builtin import DEFENSES

    if name == "pfode":
        return DEFENSES.get("pfode")(report_solver=pfode_solver)
    return DEFENSES.get("flow")(model=name)


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (0 for one value)."""
    from scipy import stats

    v = [float(x) for x in values]
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from benchmark.complexity import png_complexity, spectral_complexity, zlib_complexity

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="images (or evaluations) per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=["pfode", *FLOWS])
    ap.add_argument("--pfode-solver", default="accurate",
                    help="the PF-ODE's reporting solver (accurate: 1000 RK4 steps; "
                         "accurate-100: 100)")
    ap.add_argument("--out", type=Path, default=Path("leaderboard/digits-density-figure7"))
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    torch.set_num_threads(1)
    batches = {k: images(k, args.n, args.seed) for k in KINDS}
    rows: dict[str, dict[str, object]] = {
        k: {"kind": k,
            "png": float(png_complexity(x).mean()), "zlib": float(zlib_complexity(x).mean()),
            "spectral": float(spectral_complexity(x).mean())} for k, x in batches.items()}
    timing = {}
    for name in args.models:
        try:
            model = density(name, args.pfode_solver)
        except ValueError as e:
            raise SystemExit(f"--pfode-solver: {e}") from None
        model.reseed(args.seed)
        t = time.time()
        for k, x in batches.items():
            with torch.no_grad():
                bpd = model.bits_per_dim(x)  # the density contract's convention
            rows[k][name], rows[k][name + " ci"] = mean_ci(bpd.tolist())
            print(f"{name} / {k}: {rows[k][name]:.3f} bits/dim ({time.time() - t:.0f} s)",
                  file=sys.stderr, flush=True)
        timing[name] = time.time() - t
        print(f"{name}: {timing[name]:.0f} s", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    head = ["kind", "png", "zlib", "spectral"] + [m for m in args.models]
    lines = [f"Bits/dim (mean [95% CI half-width], lower = more likely) and complexity of "
             f"{args.n} images per kind (constant kinds: {args.n} evaluations), seed "
             f"{args.seed}. Command: `python scripts/figure7.py --n {args.n} --seed "
             f"{args.seed} --models {' '.join(args.models)}"
             + (f" --pfode-solver {args.pfode_solver}" if "pfode" in args.models else "")
             + "`; "
             + (f"PF-ODE reporting solver `{args.pfode_solver}`; " if "pfode" in args.models
                else "")
             + "single-threaded CPU seconds per model: "
             + ", ".join(f"{m} {s:.0f}" for m, s in timing.items()) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in KINDS:
        r = rows[k]
        cells = [k, f"{r['png']:.3f}", f"{r['zlib']:.3f}", f"{r['spectral']:.3f}"]
        cells += [f"{r[m]:.3f} ± {r[m + ' ci']:.3f}" for m in args.models]
        lines.append("| " + " | ".join(cells) + " |")
    # the seed's two claims, per model
    lines += ["", "| model | most likely kind | least likely kind | monochrome above test | "
                  "noise lowest |", "|---|---|---|---|---|"]
    for m in args.models:
        order = sorted(KINDS, key=lambda k: float(rows[k][m]))  # type: ignore[arg-type]
        mono = min(float(rows[k][m]) for k in ("black", "gray", "white"))  # type: ignore[arg-type]
        lines.append(f"| {m} | {order[0]} | {order[-1]} | "
                     f"{'yes' if mono < float(rows['test'][m]) else 'no'} | "  # type: ignore[arg-type]
                     f"{'yes' if order[-1] == 'uniform noise' else 'no'} |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text, encoding="utf-8")
    with open(args.out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[KINDS[0]].keys()))
        w.writeheader()
        for k in KINDS:
            w.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v)
                        for c, v in rows[k].items()})
    plot(rows, args.models, args.out / "figure7.png")
    print(text)


def plot(rows: dict[str, dict[str, object]], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(models), 4)
    fig, axes = plt.subplots(math.ceil(len(models) / cols), cols, squeeze=False,
                             figsize=(3.2 * cols, 2.8 * math.ceil(len(models) / cols)), dpi=100)
    for ax, m in zip(axes.flat, models, strict=False):
        for k in KINDS:
            ax.errorbar([rows[k]["spectral"]], [rows[k][m]], yerr=[rows[k][m + " ci"]],
                        marker="o", label=k, linestyle="none")
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("spectral complexity", fontsize=7)
        ax.set_ylabel("bits/dim (lower: more likely)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
