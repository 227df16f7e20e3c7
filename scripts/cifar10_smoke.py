"""The shipped ``cifar10`` suite end to end on random models in the published formats.

    .venv/bin/python scripts/cifar10_smoke.py [--out results/cifar10-smoke] [--limit 4]
                                              [--full-size] [--workers 1]

A smoke check of the path a researcher with published checkpoints takes (README, "Evaluating
your own checkpoints"), with no download and no real data: it writes a CIFAR-10 folder in the
real format holding random images, saves random models in the formats the papers' checkpoints
use (an unconditional diffusers ``UNet2DModel`` folder as DiffPure's and GAP's denoiser, a
class-conditional one with a null label for RDC, a WideResNet state dict in RobustBench's
layout as the classifier), registers them with ``genbench models add``'s code in a private
registry, and runs the shipped ``cifar10.toml`` with the model names replaced by these and
every budget cut to a smoke size (:data:`SMOKE_BUDGETS`, printed): 2 steps per attack
(AutoAttack: 2 iterations, Square 20 queries), one EOT draw, K = 2 scoring draws, DiffPure's
and GAP's dt raised to 0.025 (4, 3 and 5 solver steps at t* = 0.1, 0.075, 0.125), RDC with 4
classifier timesteps and 2 likelihood-maximization steps. Every planned (defense, attack,
threat model) job and probe runs; the table it prints is a plumbing check on random models, not
a finding. Default sizes are tiny (the same block types); ``--full-size`` uses DDPM's CIFAR-10
UNet layout (35.7M parameters) and WRN-28-10, which is hours on a CPU.

Needs the optional dependency ``genbench[diffusers]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

#: the smoke budgets: (pattern in the shipped suite, replacement), applied in order
SMOKE_BUDGETS = [
    (r"\bsteps = \d+", "steps = 2"),
    (r"\beot_draws = \d+", "eot_draws = 1"),
    (r"\bn_iter = \d+", "n_iter = 2"),
    (r"\bk_draws = \d+", "k_draws = 2"),
    (r"\btimesteps = \d+", "timesteps = 4, steps = 2"),
    (r"(t_star = 0\.1)(,| \})", r"\1, dt = 0.025\2"),
    (r'version = "rand" \}', 'version = "rand", n_iter = 2, eot_draws = 1 }'),
    (r'version = "auto", n_iter = 2 \}', 'version = "auto", n_iter = 2, n_queries = 20 }'),
    (r'(attack = "pgd-eot", seed = 0)', r'\1, steps = 2'),
]


def write_cifar_folder(root: Path, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` in the real format, random images: 10 per training batch,
    the full 10000 test images (the subsets index them)."""
    from benchmark.data.cifar10 import write_random_cifar10

    return write_random_cifar10(root, seed=seed)


def register_models(folder: Path, registry: Path, full_size: bool) -> dict[str, str]:
    """Random models saved in the published formats and registered; role -> model name."""
    import torch

    from benchmark.verify.throughput import cifar_unet_config
    from benchmark.zoo.external import unet2d_class
    from benchmark.zoo.user import add_user_model
    from benchmark.zoo.wideresnet import WideResNet

    torch.manual_seed(0)
    names = {"denoiser": "smoke-cifar10-ddpm", "cond": "smoke-cifar10-ddpm-cond",
             "classifier": "smoke-cifar10-wrn"}
    for role, extra in (("denoiser", {}), ("cond", {"num_class_embeds": 11})):
        net = unet2d_class().from_config({**cifar_unet_config(quick=not full_size), **extra})
        with torch.no_grad():  # diffusers zero-initialises the output conv: make eps non-zero
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        net.save_pretrained(folder / role, safe_serialization=True)
        denoiser = {"time": "ddpm"}
        if extra:
            denoiser.update(num_classes=10, null_class=10)
        add_user_model(names[role], path=folder / role, fmt="diffusers", dataset="cifar10",
                       denoiser=denoiser, registry=registry, replace=True)
    depth, width = (28, 10) if full_size else (10, 1)
    wrn = WideResNet(depth=depth, widen_factor=width, num_classes=10).eval()
    # RobustBench's checkpoint layout: {"state_dict": {"module.<name>": tensor}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in wrn.state_dict().items()}},
               folder / "wrn.pt")
    add_user_model(names["classifier"], path=folder / "wrn.pt", fmt="state-dict",
                   dataset="cifar10", arch="wideresnet",
                   arch_kwargs={"depth": depth, "widen_factor": width,
                                "mean": [0.4914, 0.4822, 0.4465],
                                "std": [0.2471, 0.2435, 0.2616]},
                   state_dict_key="state_dict", strip_prefix="module.", registry=registry,
                   replace=True)
    return names


def smoke_suite(shipped: str, names: dict[str, str], data_root: Path) -> str:
    """The shipped suite's text with the models replaced and the budgets cut."""
    text = shipped
    text = re.sub(r'denoiser = "cifar10-eps", variant', f'denoiser = "{names["cond"]}", variant',
                  text)
    text = text.replace('"cifar10-eps"', f'"{names["denoiser"]}"')
    text = text.replace('"cifar10-cnn"', f'"{names["classifier"]}"')
    for pattern, repl in SMOKE_BUDGETS:
        text = re.sub(pattern, repl, text)
    text = text.replace('name = "cifar10"\n', 'name = "cifar10-smoke"\n', 1)
    text = text.replace('dataset = "cifar10"\n',
                        f'dataset = "cifar10"\ndataset_params = {{ root = "{data_root}" }}\n', 1)
    return text


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=root / "results" / "cifar10-smoke")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--full-size", action="store_true",
                    help="DDPM's CIFAR-10 UNet layout and WRN-28-10 (slow on a CPU)")
    ap.add_argument("--workers", type=int, default=1, help="process workers (1: in process)")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("diffusers") is None:
        print("needs the optional dependency: pip install -c constraints.txt "
              "'genbench[diffusers]'", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    registry = out / "models.json"
    os.environ["GENBENCH_MODELS"] = str(registry)  # private: the user's registry is not read

    from benchmark.cli import main as genbench
    from benchmark.spec.plan import plan_suite
    from benchmark.spec.suite import parse_suite

    t0 = time.perf_counter()
    data = write_cifar_folder(out / "data")
    names = register_models(out / "models", registry, args.full_size)
    shipped = (root / "benchmark" / "spec" / "suites" / "cifar10.toml").read_text()
    text = smoke_suite(shipped, names, data)
    path = out / "cifar10-smoke.toml"
    path.write_text(text)
    setup_s = time.perf_counter() - t0
    print(f"set-up (random data folder, models saved and registered): {setup_s:.1f} s")
    print("smoke budgets: " + "; ".join(r for _, r in SMOKE_BUDGETS))
    jobs = len(plan_suite(parse_suite(text, str(path)), limit=args.limit).jobs)
    t0 = time.perf_counter()
    rc = genbench(["run", "--suite", str(path), "--out", str(out / "run"), "--limit",
                   str(args.limit), "--progress", "plain",
                   *(["--executor", "process", "--workers", str(args.workers)]
                     if args.workers > 1 else [])])
    run_s = time.perf_counter() - t0
    import pandas as pd

    frame = pd.read_csv(out / "run" / "leaderboard.csv")
    cols = [c for c in ("defense", "attack", "threat_model", "eps", "n", "clean_acc",
                        "robust_acc", "error", "flags") if c in frame.columns]
    if "error" in frame.columns:  # one line per row
        frame["error"] = frame["error"].map(lambda e: e if not isinstance(e, str) else
                                            e if len(e) <= 60 else e[:57] + "...")
    print(frame[cols].to_string(index=False))
    errors = int(frame["error"].notna().sum()) if "error" in frame.columns else 0
    print(json.dumps({"suite": "cifar10 (smoke budgets)", "limit": args.limit,
                      "full_size": args.full_size, "planned_jobs": jobs, "run_rc": rc,
                      "rows": len(frame), "rows_with_errors": errors,
                      "setup_s": round(setup_s, 1), "run_wall_s": round(run_s, 1)}))
    return 1 if errors or rc else 0


if __name__ == "__main__":
    raise SystemExit(main())
