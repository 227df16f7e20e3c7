"""Train the zoo's plain CNN classifier (``genbench train classifier``).

Seeded end to end: the initial weights come from ``torch.manual_seed(seed)``, the data order and
the augmentation from a separate ``torch.Generator`` seeded with ``seed``. The weights are written
as safetensors (no pickles) and, when written into the zoo's own folder, registered in the
manifest with their sha256 and test accuracy.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrainConfig", "config_for", "evaluate", "random_shift", "train"]

ARCH = "benchmark.zoo.cnn:DigitsCNN"


@dataclass(frozen=True)
class TrainConfig:
    """Per-dataset defaults (``epochs`` may be overridden by :func:`train`)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: random translation by up to this many pixels (zero padding), per sample.
    max_shift: int = 1
    hflip: bool = False
    width: int = 32


_CONFIGS = {
    "digits": TrainConfig(epochs=30, batch_size=64, lr=2e-3, max_shift=1),
    "cifar10": TrainConfig(epochs=30, batch_size=128, lr=1e-3, max_shift=4, hflip=True, width=64),
}


def config_for(dataset: str) -> TrainConfig:
    return _CONFIGS.get(dataset, TrainConfig())


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an independent integer offset in [-max_shift, max_shift]."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(b)[:, None, None, None]
    cidx = torch.arange(x.shape[1])[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train(*, dataset: str = "digits", seed: int = 0, epochs: int | None = None,
          max_steps: int | None = None, name: str | None = None,
          out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
          register: bool = True) -> dict[str, Any]:
    """Train :class:`~benchmark.zoo.cnn.DigitsCNN` on ``dataset``'s train split.

    ``epochs`` defaults per dataset (:func:`config_for`); ``max_steps`` stops earlier (for smoke
    tests). The weights go to ``out_dir/<name>.safetensors`` (default: the zoo's
    ``weights/`` folder, name ``f"{dataset}-cnn"``). ``register`` adds the model to the zoo
    manifest; it only applies when writing into the zoo's own folder.

    Returns ``{"name", "path", "sha256", "clean_acc_test", "wall_s", "steps", ...}``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from benchmark.data import load_dataset
    from benchmark.zoo import ZOO_DIR, ZooEntry, file_sha256, register_model
    from benchmark.zoo.cnn import DigitsCNN

    cfg = config_for(dataset)
    n_epochs = cfg.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    name = name or f"{dataset}-cnn"
    zoo_weights = ZOO_DIR / "weights"
    out = Path(out_dir) if out_dir is not None else zoo_weights
    into_zoo = out.resolve() == zoo_weights.resolve()

    ds = load_dataset(dataset)
    c, h, w = ds.image_shape
    if h != w:
        raise ValueError(f"{dataset}: DigitsCNN needs square images, got {h}x{w}")
    arch_kwargs = {"in_channels": c, "image_size": h, "num_classes": ds.num_classes,
                   "width": cfg.width}

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN(**arch_kwargs)
    model.train()
    x_train, y_train = ds.train.x, ds.train.y
    n = x_train.shape[0]
    steps_per_epoch = -(-n // cfg.batch_size)
    total = n_epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)

    step = 0
    bar = tqdm(total=total, desc=f"train {name}", disable=not progress, leave=False)
    try:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                idx = perm[i:i + cfg.batch_size]
                xb = random_shift(x_train[idx], cfg.max_shift, gen)
                if cfg.hflip:
                    flip = torch.rand(xb.shape[0], generator=gen) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = F.cross_entropy(model(xb), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        bar.close()

    model.eval()
    acc = evaluate(model, ds.test.x, ds.test.y)
    wall_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON (safetensors orders several keys at random) and no
    # timestamp: a retrain with the same seed on the same platform gives the same bytes.
    info = {"arch": ARCH, "arch_kwargs": arch_kwargs, "dataset": ds.version, "seed": seed,
            "steps": step}
    save_file(state, str(path), metadata={"genbench": json.dumps(info, sort_keys=True)})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; the zoo ships this one
    sha = file_sha256(path)

    trained_by = f"genbench train classifier --dataset {dataset} --seed {seed}"
    if epochs is not None:
        trained_by += f" --epochs {n_epochs}"
    if max_steps is not None:
        trained_by += f" --max-steps {max_steps}"
    registered = False
    if register and into_zoo:
        register_model(ZooEntry(
            name=name, arch=ARCH, arch_kwargs=arch_kwargs, dataset=dataset, file="", sha256=sha,
            trained_by=trained_by, metrics={"clean_acc_test": round(acc, 6)},
            created=_dt.date.today().isoformat(), dataset_version=ds.version,
        ), path)
        registered = True
    return {"name": name, "path": str(path), "sha256": sha, "clean_acc_test": acc,
            "wall_s": round(wall_s, 3), "steps": step, "epochs": n_epochs, "seed": seed,
            "dataset": dataset, "dataset_version": ds.version, "registered": registered}
