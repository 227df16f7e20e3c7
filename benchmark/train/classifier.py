"""Train the zoo's CNN classifiers: plain (``genbench train classifier``) and Madry PGD
adversarial training (``genbench train cnn-at``).

Seeded end to end: the initial weights come from ``torch.manual_seed(seed)``, the data order and
the augmentation from a separate ``torch.Generator`` seeded with ``seed`` (the adversarial
trainer's random starts from a third one, on the training device). The weights are written as
safetensors (no pickles) and, when written into the zoo's own folder, registered in the manifest
with their sha256 and test metrics.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.plugins import register_trainer

if TYPE_CHECKING:
    from benchmark.data import Dataset

__all__ = ["EVAL_EPS", "TrainConfig", "config_for", "evaluate", "random_shift", "robust_accuracy",
           "train", "train_adversarial"]

ARCH = "benchmark.zoo.cnn:DigitsCNN"

#: one optimizer step's loss: (model, augmented batch on the device, labels) -> scalar.
StepLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
    #: :func:`train_adversarial`'s default epochs (a step costs attack_steps + 1 passes).
    adv_epochs: int = 15


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
    """Top-1 accuracy of ``model`` on (x, y) (moved to the model's device batch by batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


# --- shared plumbing of the trainers ---------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A trainer's resolved options: what to train, on what, and where the weights go."""

    cfg: TrainConfig
    n_epochs: int
    max_steps: int | None
    name: str
    out: Path
    into_zoo: bool
    device: torch.device
    ds: Dataset
    arch_kwargs: dict[str, Any]


def _plan(*, dataset: str, epochs: int | None, max_steps: int | None, name: str,
          out_dir: str | os.PathLike[str] | None, device: str | torch.device,
          adversarial: bool = False) -> _Plan:
    from benchmark.data import load_dataset
    from benchmark.zoo import ZOO_DIR

    cfg = config_for(dataset)
    default_epochs = cfg.adv_epochs if adversarial else cfg.epochs
    n_epochs = default_epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    zoo_weights = ZOO_DIR / "weights"
    out = Path(out_dir) if out_dir is not None else zoo_weights
    ds = load_dataset(dataset)
    c, h, w = ds.image_shape
    if h != w:
        raise ValueError(f"{dataset}: DigitsCNN needs square images, got {h}x{w}")
    return _Plan(cfg=cfg, n_epochs=n_epochs, max_steps=max_steps, name=name, out=out,
                 into_zoo=out.resolve() == zoo_weights.resolve(), device=torch.device(device),
                 ds=ds, arch_kwargs={"in_channels": c, "image_size": h,
                                     "num_classes": ds.num_classes, "width": cfg.width})


def _fit(plan: _Plan, *, seed: int, step_loss: StepLoss, progress: bool) -> tuple[nn.Module, int]:
    """Seed, build the model and run Adam + one-cycle over augmented batches of ``step_loss``.

    Returns the model (eval mode, on the plan's device) and the number of optimizer steps.
    """
    from tqdm import tqdm

    from benchmark.zoo.cnn import DigitsCNN

    cfg = plan.cfg
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN(**plan.arch_kwargs).to(plan.device)
    model.train()
    x_train, y_train = plan.ds.train.x, plan.ds.train.y
    n = x_train.shape[0]
    steps_per_epoch = -(-n // cfg.batch_size)
    total = plan.n_epochs * steps_per_epoch
    if plan.max_steps is not None:
        total = min(total, plan.max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)

    step = 0
    bar = tqdm(total=total, desc=f"train {plan.name}", disable=not progress, leave=False)
    try:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                idx = perm[i:i + cfg.batch_size]
                # Augment on the CPU (the generator lives there), then move the batch.
                xb = random_shift(x_train[idx], cfg.max_shift, gen)
                if cfg.hflip:
                    flip = torch.rand(xb.shape[0], generator=gen) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = step_loss(model, xb.to(plan.device), y_train[idx].to(plan.device))
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
    return model, step


def _save(plan: _Plan, model: nn.Module, info: dict[str, Any]) -> tuple[Path, str]:
    """Write the weights as safetensors with ``info`` as metadata; returns (path, sha256)."""
    from safetensors.torch import save_file

    from benchmark.zoo import file_sha256

    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / f"{plan.name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON (safetensors orders several keys at random) and no
    # timestamp: a retrain with the same seed on the same platform gives the same bytes.
    meta = {"arch": ARCH, "arch_kwargs": plan.arch_kwargs, "dataset": plan.ds.version, **info}
    save_file(state, str(path), metadata={"genbench": json.dumps(meta, sort_keys=True)})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; the zoo ships this one
    return path, file_sha256(path)


def _trained_by(trainer: str, plan: _Plan, *, seed: int, epochs: int | None,
                params: dict[str, float | int] | None = None) -> str:
    """The command line that reproduces this training (non-default ``params`` as --param)."""
    cmd = f"genbench train {trainer} --dataset {plan.ds.name} --seed {seed}"
    if epochs is not None:
        cmd += f" --epochs {plan.n_epochs}"
    if plan.max_steps is not None:
        cmd += f" --max-steps {plan.max_steps}"
    for key, value in (params or {}).items():
        cmd += f" --param {key}={value}"
    return cmd


def _register(plan: _Plan, path: Path, sha: str, *, trained_by: str,
              metrics: dict[str, float]) -> bool:
    """Add the model to the zoo manifest if it was written into the zoo's folder."""
    from benchmark.zoo import ZooEntry, register_model

    if not plan.into_zoo:
        return False
    register_model(ZooEntry(
        name=plan.name, arch=ARCH, arch_kwargs=plan.arch_kwargs, dataset=plan.ds.name, file="",
        sha256=sha, trained_by=trained_by, metrics=metrics,
        created=_dt.date.today().isoformat(), dataset_version=plan.ds.version,
    ), path)
    return True


def _clean_step_loss(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
    return F.cross_entropy(model(xb), yb)


# --- trainers -----------------------------------------------------------------------------------


@register_trainer("classifier")
def train(*, dataset: str = "digits", seed: int = 0, epochs: int | None = None,
          max_steps: int | None = None, name: str | None = None,
          out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
          register: bool = True, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train :class:`~benchmark.zoo.cnn.DigitsCNN` on ``dataset``'s train split.

    ``epochs`` defaults per dataset (:func:`config_for`); ``max_steps`` stops earlier (for smoke
    tests). The weights go to ``out_dir/<name>.safetensors`` (default: the zoo's
    ``weights/`` folder, name ``f"{dataset}-cnn"``). ``register`` adds the model to the zoo
    manifest; it only applies when writing into the zoo's own folder.

    Returns ``{"name", "path", "sha256", "clean_acc_test", "wall_s", "steps", ...}``.
    """
    plan = _plan(dataset=dataset, epochs=epochs, max_steps=max_steps,
                 name=name or f"{dataset}-cnn", out_dir=out_dir, device=device)
    t0 = time.perf_counter()
    model, step = _fit(plan, seed=seed, step_loss=_clean_step_loss, progress=progress)
    acc = evaluate(model, plan.ds.test.x, plan.ds.test.y)
    wall_s = time.perf_counter() - t0

    path, sha = _save(plan, model, {"seed": seed, "steps": step})
    registered = register and _register(
        plan, path, sha, trained_by=_trained_by("classifier", plan, seed=seed, epochs=epochs),
        metrics={"clean_acc_test": round(acc, 6)})
    return {"name": plan.name, "path": str(path), "sha256": sha, "clean_acc_test": acc,
            "wall_s": round(wall_s, 3), "steps": step, "epochs": plan.n_epochs, "seed": seed,
            "dataset": dataset, "dataset_version": plan.ds.version, "registered": registered}


#: l-inf radii of the robust-accuracy metrics recorded for an adversarially trained model.
EVAL_EPS = (0.05, 0.1)


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (an l-inf radius in [0, 1] pixel "
                         f"units), got {eps!r}")
    return float(eps)


def _check_steps(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 50,
                    batch_size: int = 512, seed: int = 0) -> float:
    """Accuracy under our l-inf PGD (``steps`` steps of 2.5 * eps / steps, one restart from
    the clean input, as the suites run it) on (x, y)."""
    from attacks.pgd import PGD
    from threat_models.linf import LinfThreat

    device = next(model.parameters()).device
    attack = PGD(steps=steps, restarts=1, loss="ce", random_start=False)
    threat = LinfThreat(eps)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_adv = torch.cat([attack.run(model, x[i:i + batch_size].to(device),
                                  y[i:i + batch_size].to(device), threat, generator=gen).x_adv
                       for i in range(0, x.shape[0], batch_size)])
    return evaluate(model, x_adv, y, batch_size=batch_size)


@register_trainer("cnn-at")
def train_adversarial(*, dataset: str = "digits", seed: int = 0, eps: float = 0.1,
                      attack_steps: int = 10, epochs: int | None = None,
                      max_steps: int | None = None, name: str | None = None,
                      out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                      register: bool = True, device: str | torch.device = "cpu",
                      eval_steps: int = 50) -> dict[str, Any]:
    """Madry et al. (2018) PGD adversarial training of :class:`~benchmark.zoo.cnn.DigitsCNN`.

    Every batch (same augmentation, optimizer and schedule as :func:`train`) is replaced by
    adversarial examples only: our :class:`~attacks.pgd.PGD` under the l-inf threat of radius
    ``eps`` with ``attack_steps`` steps of 2.5 * eps / attack_steps from a uniform random start
    (the best iterate per sample, as PGD returns it). Full ``eps`` from the first step, no
    warm-up. The model is in eval mode while attacked. ``epochs`` defaults per dataset
    (``config_for(dataset).adv_epochs``: 15 for the digits).

    The weights go to ``out_dir/<name>.safetensors`` (default: the zoo's ``weights/`` folder,
    name ``f"{dataset}-cnn-at"``), registered in the manifest when written there and
    ``register``. Metrics: clean test accuracy and accuracy under ``eval_steps``-step PGD from
    the clean input at l-inf :data:`EVAL_EPS`, on the whole test split.

    Returns ``{"name", "path", "sha256", "clean_acc_test", "pgd50_acc_linf_0.1", ...,
    "wall_s", "steps", "eps", "attack_steps", ...}``. A bad ``eps`` or step count raises
    :class:`ValueError` naming it.
    """
    from attacks.pgd import PGD
    from threat_models.linf import LinfThreat

    eps = _check_eps(eps)
    attack_steps = _check_steps(attack_steps, "attack_steps")
    eval_steps = _check_steps(eval_steps, "eval_steps")
    plan = _plan(dataset=dataset, epochs=epochs, max_steps=max_steps,
                 name=name or f"{dataset}-cnn-at", out_dir=out_dir, device=device,
                 adversarial=True)
    attack = PGD(steps=attack_steps, restarts=1, loss="ce", random_start=True)
    threat = LinfThreat(eps)
    attack_gen = torch.Generator(device=plan.device).manual_seed(seed + 1)

    def adversarial_step_loss(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        # Frozen parameters while attacking: PGD differentiates w.r.t. the perturbation only.
        model.eval().requires_grad_(False)
        x_adv = attack.run(model, xb, yb, threat, generator=attack_gen).x_adv
        model.train().requires_grad_(True)
        return F.cross_entropy(model(x_adv), yb)

    t0 = time.perf_counter()
    model, step = _fit(plan, seed=seed, step_loss=adversarial_step_loss, progress=progress)
    model.requires_grad_(False)
    x_test, y_test = plan.ds.test.x, plan.ds.test.y
    metrics = {"clean_acc_test": evaluate(model, x_test, y_test)}
    for e in EVAL_EPS:
        metrics[f"pgd{eval_steps}_acc_linf_{e:g}"] = robust_accuracy(
            model, x_test, y_test, eps=e, steps=eval_steps, seed=seed)
    wall_s = time.perf_counter() - t0

    path, sha = _save(plan, model, {"seed": seed, "steps": step, "eps": eps,
                                    "attack_steps": attack_steps})
    defaults = {"eps": 0.1, "attack_steps": 10}
    params = {k: v for k, v in {"eps": eps, "attack_steps": attack_steps}.items()
              if v != defaults[k]}
    registered = register and _register(
        plan, path, sha,
        trained_by=_trained_by("cnn-at", plan, seed=seed, epochs=epochs, params=params),
        metrics={**{k: round(v, 6) for k, v in metrics.items()},
                 "train_eps": eps, "train_attack_steps": float(attack_steps)})
    return {"name": plan.name, "path": str(path), "sha256": sha, **metrics,
            "wall_s": round(wall_s, 3), "steps": step, "epochs": plan.n_epochs, "seed": seed,
            "eps": eps, "attack_steps": attack_steps, "dataset": dataset,
            "dataset_version": plan.ds.version, "registered": registered}
