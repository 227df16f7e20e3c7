"""Denoiser throughput: load time and network evaluations per second (NFE/s), one table.

``scripts/gpu_check.sh`` runs this on the GPU machine; a unit test runs it on the CPU at tiny
sizes (``--quick``). Two models:

* ``digits``: the zoo's ``digits-eps`` (the learned denoiser of the digits suites, 16 x 16);
* ``cifar-ddpm``: a random ``UNet2DModel`` with the layout of DDPM's CIFAR-10 model as diffusers
  distributes it (block_out_channels 128, 256, 256, 256; two ResNet blocks per level; attention
  at 16 x 16; 35.7M parameters), saved with ``save_pretrained`` and loaded back through
  genbench's registry (:mod:`benchmark.zoo.user`), so the load time is genbench's: sha256 of
  the files, config, strict safetensors load. ``--quick`` shrinks it to a few thousand
  parameters.

NFE/s counts images: batch size x batched calls / seconds (one call of a batch of B is B NFE
here, unlike :attr:`benchmark.zoo.denoiser.Denoiser.nfe`, which counts batched calls). Each
measurement is one warm-up call, then calls until ``--seconds`` have passed (at least one), under
``torch.no_grad`` (attacks differentiate, which costs about 3x more); bf16 runs under
``torch.autocast``. Prints one table; ``--json FILE`` writes the rows too.

    python -m benchmark.verify.throughput --device cuda --batches 256,1024,4096 \\
        --dtypes fp32,bf16
    python -m benchmark.verify.throughput --device cpu --quick      # seconds, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DDPM_CIFAR10_CONFIG", "Row", "cifar_unet_config", "main", "measure", "render"]

#: diffusers' UNet2DModel config of DDPM's CIFAR-10 model (Ho et al. 2020, 35.7M parameters).
DDPM_CIFAR10_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6,
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
    "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
    "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "dropout": 0.1,
}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cifar_unet_config(quick: bool = False) -> dict[str, Any]:
    """DDPM's CIFAR-10 layout, or (``quick``) a tiny one with the same block types."""
    if not quick:
        return dict(DDPM_CIFAR10_CONFIG)
    return {**DDPM_CIFAR10_CONFIG, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
            "norm_num_groups": 4, "attention_head_dim": 8}


@dataclass(frozen=True)
class Row:
    model: str
    params_m: float
    device: str
    dtype: str
    batch: int
    nfe_per_s: float
    ms_per_call: float
    load_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(den: Any, shape: tuple[int, ...], batch: int, dtype: str, device: torch.device,
            seconds: float) -> tuple[float, float]:
    """(NFE/s, ms per batched call) of ``den.eps_normalized`` on a batch of ``batch``."""
    z = torch.randn((batch, *shape), device=device)
    lam = torch.zeros(batch, device=device)
    y = (torch.zeros(batch, dtype=torch.long, device=device)
         if getattr(den, "conditional", False) else None)
    cast = (torch.autocast(device_type=device.type, dtype=_DTYPES[dtype]) if dtype != "fp32"
            else nullcontext())
    with torch.no_grad(), cast:
        den.eps_normalized(z, lam, y)  # warm-up (kernels, allocator)
        _sync(device)
        calls, t0 = 0, time.perf_counter()
        while True:
            den.eps_normalized(z, lam, y)
            calls += 1
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    return batch * calls / elapsed, 1000.0 * elapsed / calls


def _load_cifar(quick: bool, device: torch.device, folder: Path) -> tuple[Any, float]:
    """Save a random UNet2DModel, register it in a private registry, load it by name."""
    from benchmark.zoo import load_model
    from benchmark.zoo.external import unet2d_class
    from benchmark.zoo.user import add_user_model

    torch.manual_seed(0)
    net = unet2d_class().from_config(cifar_unet_config(quick))
    net.save_pretrained(folder / "unet", safe_serialization=True)
    registry = folder / "models.json"
    old = os.environ.get("GENBENCH_MODELS")
    os.environ["GENBENCH_MODELS"] = str(registry)
    try:
        add_user_model("throughput-cifar-ddpm", path=folder / "unet", fmt="diffusers",
                       dataset="cifar10", registry=registry, check=False)
        t0 = time.perf_counter()
        den = load_model("throughput-cifar-ddpm", device=device)
        _sync(device)
        return den, time.perf_counter() - t0
    finally:
        if old is None:
            del os.environ["GENBENCH_MODELS"]
        else:
            os.environ["GENBENCH_MODELS"] = old


def _load_digits(device: torch.device) -> tuple[Any, float]:
    from benchmark.zoo import load_model

    t0 = time.perf_counter()
    den = load_model("digits-eps", device=device)
    _sync(device)
    return den, time.perf_counter() - t0


def run(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], device: str,
        seconds: float, quick: bool, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Measure every (model, dtype, batch); ``on_row`` sees each row as it is measured."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available (torch {torch.__version__})")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="genbench-throughput-") as tmp:
        for model in models:
            if model == "digits":
                den, load_s = _load_digits(dev)
                shape: tuple[int, ...] = (den.in_channels, den.image_size, den.image_size)
            elif model == "cifar-ddpm":
                den, load_s = _load_cifar(quick, dev, Path(tmp))
                shape = (3, 32, 32)
            else:
                raise SystemExit(f"unknown model {model!r} (expected digits, cifar-ddpm)")
            params = sum(p.numel() for p in den.parameters()) / 1e6
            for dtype in dtypes:
                for batch in batches:
                    rate, ms = measure(den, shape, batch, dtype, dev, seconds)
                    rows.append(Row(model, round(params, 3), str(dev), dtype, batch,
                                    round(rate, 1), round(ms, 2), round(load_s, 3)))
                    if on_row is not None:
                        on_row(rows[-1])
            del den
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def render(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table."""
    head = ("model", "params_M", "device", "dtype", "batch", "NFE/s", "ms/call", "load_s")
    body = [(r.model, f"{r.params_m:g}", r.device, r.dtype, str(r.batch), f"{r.nfe_per_s:,.1f}",
             f"{r.ms_per_call:.2f}", f"{r.load_s:.3f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _ints(raw: str) -> list[int]:
    return [int(v) for v in raw.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.verify.throughput",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="digits,cifar-ddpm")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    p.add_argument("--quick", action="store_true",
                   help="a tiny CIFAR UNet and short timings (a dry run on any machine)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad} (expected {', '.join(_DTYPES)})")
    seconds = min(args.seconds, 0.05) if args.quick else args.seconds
    if "bf16" in dtypes and args.device == "cpu":
        print("warning: bf16 autocast on a CPU can be many times slower than fp32 (on this "
              "project's 2-core machine a 35.7M UNet at batch 64 did not finish one call in "
              "minutes); each row is printed as it is measured", file=sys.stderr)

    def measured(row: Row) -> None:
        print(f"measured {row.model} {row.dtype} batch {row.batch}: {row.nfe_per_s:,.1f} NFE/s",
              file=sys.stderr, flush=True)

    rows = run([m for m in args.models.split(",") if m], _ints(args.batches), dtypes,
               args.device, seconds, args.quick, on_row=measured)
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
