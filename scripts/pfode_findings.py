"""Seed 000's PF-ODE findings, tested on a density run: one table per attack and a verdict per
finding (issue 17).

    .venv/bin/python scripts/pfode_findings.py RUN [--figure7 TABLE.csv] [--out DIR]

``RUN`` is the ``--out`` folder of ``genbench run`` on a suite with the ``pfode`` defense and the
six ``ll-*`` attacks (``leaderboard/digits-density-pfode-n32-cpu/suite.toml``). For each attack
row it prints: n; the attack objective (the fast solver's log p / D, nats of [0, 1]
coordinates, higher = more likely) at the start and at the last iterate; the *reported* NLL
(the defense's reporting solver, bits/dim, lower = more likely) before and after, with the
paired per-sample change and its 95% bootstrap interval; the share the 95% detector still
rejects (Wilson interval); and three complexities of the returned images (PNG and zlib bytes per
dimension, and the spectral share of :mod:`benchmark.complexity`, the one that orders
smooth < digits < noise at 16 x 16).

Then each of the seed's findings, with the rule that decides it:

1. *No sample with both high likelihood and high complexity*: no returned image is accepted by
   the detector (log p >= the clean threshold) while its spectral complexity exceeds that of the
   most complex clean test digit of the run. Also the Spearman correlation between reported
   NLL and spectral complexity over every returned image (the seed: likelihood and complexity
   are inversely related, i.e. a positive correlation with NLL).
2. *Monochrome images score highest, noise lowest* (figure 7): read from ``--figure7``, the
   ``table.csv`` of ``scripts/figure7.py`` with a ``pfode`` column.
3. *The prior-only attack is weaker than random-region*: the mean reported NLL after prior-only
   is above random-region's, with the 95% bootstrap interval of the difference of the means
   above 0 (unpaired: each attack draws its own starts).
4. *Adversarial samples are sometimes semantic*: the share of the images returned by the
   attacks that leave the test images (random-region, prior-only, reverse, unrestricted) that
   the zoo's honest ``digits-cnn`` classifies with confidence >= 0.9, and for ``ll-reverse``
   (which starts from a test digit's encoding) the share classified as that digit. A proxy, so
   the script also writes ``samples.png`` (first 8 samples of every attack) to look at.

Writes ``findings.md`` and ``samples.png`` under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: attacks whose result is a perturbed test image (the others generate their own start).
NEAR = ("ll-near-sample", "ll-high-complexity")
GENERATIVE = ("ll-random-region", "ll-prior-only", "ll-reverse", "ll-unrestricted")
CONFIDENT = 0.9


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch
    from scipy import stats

    from benchmark.complexity import png_complexity, spectral_complexity, zlib_complexity
    from benchmark.data import load_dataset
    from benchmark.data.subsets import get_subset, select
    from benchmark.report.density import (
        acceptance_threshold,
        bootstrap_mean_interval,
        load_density,
    )
    from benchmark.report.stats import wilson_interval
    from benchmark.spec.stored import load_plan
    from benchmark.store import Store
    from benchmark.zoo import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--figure7", type=Path, default=None,
                    help="table.csv of scripts/figure7.py with a pfode column")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.run / "runs.sqlite").is_file():
        raise SystemExit(f"{args.run} is not a run folder (no runs.sqlite)")
    torch.set_num_threads(1)

    plan = load_plan(args.run)
    ds = load_dataset(plan.suite.dataset)
    subset = get_subset(plan.suite.dataset, plan.suite.subset)
    x_all, y_all, ids_all = select(ds, subset)
    row_of = {int(i): r for r, i in enumerate(ids_all.tolist())}
    shape = tuple(x_all.shape[1:])
    with Store(args.run / "runs.sqlite") as store:
        data = load_density(store, plan)
        adv = {rkey: {sid: a for job in jobs if job["status"] == "done"
                      for sid, a in store.adversarial(job["key"], shape).items()}
               for rkey, jobs in data.jobs.items()}
    clean = [s for (d, _), s in data.clean.items() if d == "pfode"]
    if not clean:
        raise SystemExit(f"{args.run} has no clean pfode job")
    clean_s = clean[0]
    threshold = acceptance_threshold(clean_s.logp_before)
    cnn = load_model("digits-cnn").eval()
    clean_ids = [int(i) for i in clean_s.sample_ids]
    clean_x = x_all[[row_of[i] for i in clean_ids]]
    spec_test_max = float(spectral_complexity(clean_x).max())

    lines = [f"Run `{args.run.name}` (suite `{plan.suite.name}`), {len(clean_ids)} clean test "
             f"digits; detector threshold log p >= {threshold:.1f} nats (accepts 95% of "
             f"them). Objective: the attack's fast-solver log p / D (nats/dim, higher = more "
             f"likely); NLL: the reporting solver, bits/dim (lower = more likely); change: "
             f"paired per sample, mean [95% bootstrap]. Complexities of the returned images "
             f"(PNG / zlib bytes per dim, spectral share); the clean digits' are "
             f"{float(png_complexity(clean_x).mean()):.3f} / "
             f"{float(zlib_complexity(clean_x).mean()):.3f} / "
             f"{float(spectral_complexity(clean_x).mean()):.3f}.", "",
             "| attack | n | objective start -> last | NLL before | NLL after | change "
             "[95% CI] | detector rejects [95% CI] | PNG | zlib | spectral |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per_attack: dict[str, dict[str, object]] = {}
    for rkey, s in sorted(data.cells.items(), key=lambda kv: kv[0][2]):
        attack = rkey[2]
        if rkey[0] != "pfode" or len(s.sample_ids) == 0:
            continue
        sids = [int(i) for i in s.sample_ids]
        xa = torch.from_numpy(np.stack([adv[rkey][i] for i in sids])).clamp(0, 1)
        change = bootstrap_mean_interval(s.bpd_after - s.bpd_before)
        rejected = int((s.logp_after < threshold).sum())
        lo, hi = wilson_interval(rejected, len(sids))
        if s.curves is not None:
            obj = f"{np.nanmean(s.curves[:, 0]):.3f} -> {np.nanmean(s.curves[:, -1]):.3f}"
        else:
            obj = "n/a"
        spec = spectral_complexity(xa).numpy()
        with torch.no_grad():
            prob = torch.softmax(cnn(xa), dim=1)
        per_attack[attack] = {"s": s, "sids": sids, "x": xa, "spectral": spec,
                              "conf": prob.max(1).values.numpy(),
                              "pred": prob.argmax(1).numpy(),
                              "accepted": s.logp_after >= threshold}
        lines.append(
            f"| {attack} | {len(sids)} | {obj} | {np.mean(s.bpd_before):.3f} | "
            f"{np.mean(s.bpd_after):.3f} | {change[0]:+.3f} [{change[1]:+.3f}, {change[2]:+.3f}] | "
            f"{100 * rejected / len(sids):.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{float(png_complexity(xa).mean()):.3f} | {float(zlib_complexity(xa).mean()):.3f} | "
            f"{float(spec.mean()):.3f} |")

    lines += ["", "| seed 000's finding | rule | measured | verdict |", "|---|---|---|---|"]
    # 1. high likelihood and high complexity together
    both = sum(int((p["accepted"] & (p["spectral"] > spec_test_max)).sum())
               for p in per_attack.values())
    total = sum(len(p["sids"]) for p in per_attack.values())
    bpd = np.concatenate([p["s"].bpd_after for p in per_attack.values()])
    spec_all = np.concatenate([p["spectral"] for p in per_attack.values()])
    rho, pval = stats.spearmanr(bpd, spec_all)
    accepted = np.concatenate([p["accepted"] for p in per_attack.values()])
    which = np.concatenate([[a] * len(p["sids"]) for a, p in per_attack.items()])
    top = ""
    if accepted.any():  # the most complex accepted result, to show the margin either way
        i = int(np.argmax(np.where(accepted, spec_all, -np.inf)))
        top = (f"; the most complex accepted result: spectral {spec_all[i]:.3f}, "
               f"{bpd[i]:.3f} bits/dim ({which[i]})")
    lines.append(f"| no sample with both high likelihood and high complexity | accepted and "
                 f"spectral > the most complex clean digit ({spec_test_max:.3f}) | {both} of "
                 f"{total} returned images{top}; Spearman(NLL, spectral) = {rho:+.2f} (p = "
                 f"{pval:.2g}) | {'holds' if both == 0 else 'fails'} |")
    # 2. figure 7
    if args.figure7 is not None:
        import csv

        with open(args.figure7, newline="", encoding="utf-8") as f:
            rows = {r["kind"]: r for r in csv.DictReader(f)}
        if not rows or "pfode" not in next(iter(rows.values())):
            raise SystemExit(f"{args.figure7} has no pfode column")
        order = sorted(rows, key=lambda k: float(rows[k]["pfode"]))
        mono = min(("black", "gray", "white"), key=lambda k: float(rows[k]["pfode"]))
        ok = order[0] in ("black", "gray", "white") and order[-1] == "uniform noise"
        lines.append(f"| monochrome highest, noise lowest | the most likely kind is constant "
                     f"and the least likely uniform noise (figure 7 table) | most likely "
                     f"{order[0]} ({float(rows[order[0]]['pfode']):.3f} bits/dim), least "
                     f"{order[-1]} ({float(rows[order[-1]]['pfode']):.3f}); best constant "
                     f"{mono}, test digits {float(rows['test']['pfode']):.3f} | "
                     f"{'holds' if ok else 'fails'} |")
    # 3. prior-only vs random-region
    if "ll-prior-only" in per_attack and "ll-random-region" in per_attack:
        po, rr = per_attack["ll-prior-only"]["s"], per_attack["ll-random-region"]["s"]
        a, b = po.bpd_after[np.isfinite(po.bpd_after)], rr.bpd_after[np.isfinite(rr.bpd_after)]
        m, lo, hi = difference_interval(a, b)
        verdict = "holds" if lo > 0 else ("fails (reversed)" if hi < 0 else "not shown")
        lines.append(f"| prior-only weaker than random-region | mean NLL after, prior-only minus "
                     f"random-region, 95% CI above 0 | {np.mean(a):.3f} vs {np.mean(b):.3f}"
                     f" bits/dim, difference {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (n = {len(a)}, "
                     f"{len(b)}) | {verdict} |")
    # 4. semantic samples
    gen = [a for a in GENERATIVE if a in per_attack]
    if gen:
        parts = []
        for a in gen:
            conf = per_attack[a]["conf"]
            parts.append(f"{a.removeprefix('ll-')} {int((conf >= CONFIDENT).sum())}/{len(conf)}")
        rev = per_attack.get("ll-reverse")
        same = ""
        if rev is not None:
            labels = np.array([int(y_all[row_of[i]]) for i in rev["sids"]])
            same = (f"; reverse kept its start's digit on {int((rev['pred'] == labels).sum())}"
                    f"/{len(labels)}")
        lines.append(f"| adversarial samples sometimes semantic | digits-cnn confidence >= "
                     f"{CONFIDENT} on generated results (a proxy; see samples.png) | "
                     f"{', '.join(parts)}{same} | see the images |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "findings.md").write_text(text, encoding="utf-8")
        grid(per_attack, clean_x, args.out / "samples.png")


def difference_interval(a, b, *, resamples: int = 2000, seed: int = 0):
    """Mean of ``a`` minus mean of ``b`` and its 95% percentile-bootstrap interval, the two
    samples resampled independently (each attack draws its own starts from its job's seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    da = rng.choice(a, (resamples, len(a))).mean(1) - rng.choice(b, (resamples, len(b))).mean(1)
    return float(a.mean() - b.mean()), float(np.quantile(da, 0.025)), float(
        np.quantile(da, 0.975))


def grid(per_attack: dict[str, dict[str, object]], clean_x, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["clean", *per_attack]
    cols = 8
    fig, axes = plt.subplots(len(names), cols, figsize=(cols * 0.9, len(names) * 1.0), dpi=100,
                             squeeze=False)
    for r, name in enumerate(names):
        xs = clean_x if name == "clean" else per_attack[name]["x"]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(xs):
                ax.imshow(xs[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(name.removeprefix("ll-"), fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
