"""Train the zoo's learned denoiser (``genbench train eps``) and evaluate it as a classifier.

:func:`train` fits :class:`~benchmark.zoo.unet.EpsUNet` by epsilon prediction (plain MSE) at
noise levels drawn in log-SNR over the range of every schedule genbench uses
(:func:`training_log_snr_range`), with 10% of the labels replaced by the null label so one
network is both conditional and unconditional. The shipped weights are an exponential moving
average of the trained ones. Seeded end to end like :mod:`benchmark.train.classifier`:
``torch.manual_seed(seed)`` for the initial weights, a separate ``torch.Generator`` for data
order, augmentation, labels dropped and noise.

:func:`dc_accuracy` scores the trained network with the ``dc`` defense itself
(:mod:`defenses.rdc`), so the manifest's accuracy is what the benchmark measures.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.plugins import register_trainer
from benchmark.train.classifier import random_shift
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import DDPM, EDM, VPSDE, SubVPSDE

__all__ = [
    "DenoiserTrainConfig",
    "config_for",
    "dc_accuracy",
    "loss_by_log_snr",
    "sample_log_snr",
    "train",
    "training_log_snr_range",
]

ARCH = "benchmark.zoo.unet:EpsUNet"


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """Per-dataset defaults; any field can be overridden with ``train(**{field: value})``
    (``genbench train eps --param field=value``)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-3
    #: linear warm-up over this fraction of the steps, then cosine decay to zero.
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    #: EMA decay of the shipped weights (ramped up as min(decay, (1 + k) / (10 + k))).
    ema_decay: float = 0.999
    #: probability of replacing a label by the null label (classifier-free style).
    label_dropout: float = 0.1
    #: fraction of noise levels drawn uniformly in log-SNR; the rest as VP with t ~ U[t0, 1].
    uniform_frac: float = 0.5
    max_shift: int = 1
    hflip: bool = False
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    #: timestep counts tried, in order, for the diffusion-classifier accuracy reported in the
    #: manifest; the first reaching ``dc_target`` is kept (else the last).
    dc_timesteps: tuple[int, ...] = (10, 20)
    dc_target: float = 0.95
    #: log-SNR buckets of the reported test loss (equal widths over the training range).
    loss_buckets: int = 6


_CONFIGS = {
    "digits": DenoiserTrainConfig(),
    "cifar10": DenoiserTrainConfig(epochs=200, batch_size=128, lr=2e-4, max_shift=2, hflip=True,
                                   base_channels=64, channel_mults=(1, 2, 2, 2),
                                   num_res_blocks=2, dc_timesteps=(50,)),
}


def config_for(dataset: str) -> DenoiserTrainConfig:
    """The training defaults for ``dataset``; ``ValueError`` naming an unknown one."""
    try:
        return _CONFIGS[dataset]
    except KeyError:
        raise ValueError(f"no denoiser training config for dataset {dataset!r} "
                         f"(known: {', '.join(sorted(_CONFIGS))})") from None


# --------------------------------------------------------------------------------------------
# Noise levels
# --------------------------------------------------------------------------------------------
def training_log_snr_range() -> tuple[float, float]:
    """(min, max) log-SNR over genbench's schedules at their default settings.

    DDPM (T = 1000, linear betas) over all indices, VP and subVP over [t0 = 1e-5, 1] and EDM
    over [sigma_min, sigma_max] = [0.002, 80]: about (-10.1, 27.6), the top end being subVP at
    t0 (s = 1 - a^2 ~ 1e-6).
    """
    ddpm = DDPM()
    ends = [ddpm.log_snr(torch.tensor([0, ddpm.T - 1]))]
    for sched in (VPSDE(), SubVPSDE(), EDM()):
        ends.append(sched.log_snr(torch.tensor([sched.t0, sched.t1], dtype=torch.float64)))
    both = torch.cat([e.double() for e in ends])
    return float(both.min()), float(both.max())


def sample_log_snr(n: int, generator: torch.Generator, *, lo: float, hi: float,
                   uniform_frac: float = 0.5) -> Tensor:
    """``n`` training noise levels (float32 log-SNR).

    A mixture, because neither half alone is right: the uniform part covers every schedule's
    range, including the extremes only EDM and subVP reach; the other part is the log-SNR of
    the VP SDE at t ~ U[t0, 1], the continuous limit of a uniformly drawn DDPM index. That is
    the distribution of the noise levels the diffusion classifier, DDPM sampling and DiffPure
    use, so the capacity goes where the evaluations look (mostly log-SNR in [-10, 5]),
    instead of into log-SNR > 10 where eps is nearly unpredictable anyway.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    pick = torch.rand(n, generator=generator) < uniform_frac
    vp = VPSDE()
    t = vp.t0 + (vp.t1 - vp.t0) * u
    lam = torch.where(pick, lo + (hi - lo) * u, vp.log_snr(t).clamp(lo, hi))
    return lam.float()


def _device(module: torch.nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _normalized_coefs(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(a', s') of z = a' x0 + s' eps with a'^2 + s'^2 = 1 at this log-SNR."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def _noisy(x0: Tensor, noise: Tensor, log_snr: Tensor) -> Tensor:
    a, s = _normalized_coefs(log_snr)
    return a[:, None, None, None] * x0 + s[:, None, None, None] * noise


@torch.no_grad()
def loss_by_log_snr(denoiser: Denoiser, x01: Tensor, y: Tensor | None, edges: list[float], *,
                    draws: int = 1, generator: torch.Generator | None = None,
                    batch_size: int = 256) -> list[float]:
    """Mean squared eps error per dimension in each log-SNR bucket [edges[i], edges[i+1]).

    Each image gets ``draws`` noise levels uniform in every bucket and fresh noise; ``y`` None
    scores the unconditional prediction. Predicting eps = 0 scores 1.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dev = _device(denoiser)
    x0 = (x01 * 2.0 - 1.0).repeat(draws, 1, 1, 1)
    labels = None if y is None else y.repeat(draws)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        lam = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        total = 0.0
        for i in range(0, x0.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            z = _noisy(x0[sl], noise[sl], lam[sl]).to(dev)
            yb = None if labels is None else labels[sl].to(dev)
            pred = denoiser(z, lam[sl].to(dev), yb)
            total += float((pred - noise[sl].to(dev)).pow(2).sum())
        out.append(total / noise.numel())
    return out


# --------------------------------------------------------------------------------------------
# The diffusion classifier (the manifest's accuracy is the ``dc`` defense's, nothing separate)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def dc_accuracy(denoiser: Denoiser, x01: Tensor, y: Tensor, *, timesteps: int,
                batch_size: int = 64, seed: int = 0) -> float:
    """Clean accuracy of the ``dc`` defense (:class:`defenses.rdc.DiffusionClassifier`, the
    paper's systematic subset of ``timesteps`` DDPM steps) over ``denoiser``, its noise stream
    seeded once with ``seed`` as the harness does per job."""
    from defenses.rdc import DiffusionClassifier

    dev = _device(denoiser)
    dc = DiffusionClassifier(denoiser=denoiser, timesteps=timesteps, rows_per_batch=256).to(dev)
    dc.reseed(seed)
    correct = 0
    for i in range(0, x01.shape[0], batch_size):
        logits = dc(x01[i:i + batch_size].to(dev))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, x01.shape[0])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _with_overrides(cfg: DenoiserTrainConfig, extra: dict[str, Any]) -> DenoiserTrainConfig:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(extra) - fields.keys())
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the eps trainer "
                         f"(known: {', '.join(sorted(fields))})")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
    return dataclasses.replace(cfg, **fixed)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@register_trainer("eps")
def train(*, dataset: str = "digits", seed: int = 0, epochs: int | None = None,
          max_steps: int | None = None, name: str | None = None,
          out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
          register: bool = True, device: str | torch.device = "cpu",
          evaluate: bool | None = None, **extra: Any) -> dict[str, Any]:
    """Train :class:`~benchmark.zoo.unet.EpsUNet` by eps prediction on ``dataset``'s train split.

    ``epochs`` defaults per dataset (:func:`config_for`); ``max_steps`` stops earlier (smoke
    runs). ``extra`` overrides fields of :class:`DenoiserTrainConfig`. The EMA weights go to
    ``out_dir/<name>.safetensors`` (default: the zoo's ``weights/`` folder, name
    ``f"{dataset}-eps"``); ``register`` adds them to the zoo manifest, only when written into
    the zoo's own folder. ``evaluate`` (default: only when ``max_steps`` is None) computes the
    test loss per log-SNR bucket and the diffusion-classifier accuracy (``dc_clean_acc_test`` at
    ``dc_timesteps`` DDPM steps, the fewest of ``config.dc_timesteps`` reaching
    ``config.dc_target``).

    Returns ``{"name", "path", "sha256", "metrics", "wall_s", "train_s", "steps", ...}``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from benchmark.data import load_dataset
    from benchmark.zoo import ZOO_DIR, ZooEntry, file_sha256, register_model
    from benchmark.zoo.unet import EpsUNet

    cfg = _with_overrides(config_for(dataset), extra)
    n_epochs = cfg.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    do_eval = (max_steps is None) if evaluate is None else bool(evaluate)
    name = name or f"{dataset}-eps"
    zoo_weights = ZOO_DIR / "weights"
    out = Path(out_dir) if out_dir is not None else zoo_weights
    into_zoo = out.resolve() == zoo_weights.resolve()
    dev = torch.device(device)

    ds = load_dataset(dataset)
    c, h, w = ds.image_shape
    if h != w:
        raise ValueError(f"{dataset}: EpsUNet needs square images, got {h}x{w}")
    arch_kwargs: dict[str, Any] = {
        "in_channels": c, "image_size": h, "num_classes": ds.num_classes,
        "base_channels": cfg.base_channels, "channel_mults": list(cfg.channel_mults),
        "num_res_blocks": cfg.num_res_blocks}
    lo, hi = training_log_snr_range()

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = EpsUNet(**arch_kwargs).to(dev)
    model.train()
    ema = [p.detach().clone() for p in model.parameters()]
    x_train, y_train = ds.train.x, ds.train.y
    n = x_train.shape[0]
    total = n_epochs * -(-n // cfg.batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = max(1, round(cfg.warmup_frac * total))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(k, total, warmup))

    step = 0
    bar = tqdm(total=total, desc=f"train {name}", disable=not progress, leave=False)
    try:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                idx = perm[i:i + cfg.batch_size]
                b = idx.shape[0]
                xb = random_shift(x_train[idx], cfg.max_shift, gen)
                if cfg.hflip:
                    flip = torch.rand(b, generator=gen) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                x0 = xb * 2.0 - 1.0
                drop = torch.rand(b, generator=gen) < cfg.label_dropout
                yb = torch.where(drop, ds.num_classes, y_train[idx])  # null label index
                lam = sample_log_snr(b, gen, lo=lo, hi=hi, uniform_frac=cfg.uniform_frac)
                noise = torch.randn(x0.shape, generator=gen)
                z = _noisy(x0, noise, lam)
                pred = model(z.to(dev), lam.to(dev), yb.to(dev))
                loss = (pred - noise.to(dev)).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters(), strict=True):
                        e.lerp_(p.detach(), 1.0 - decay)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        bar.close()
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            p.copy_(e)
    model.eval()
    train_s = time.perf_counter() - t0

    metrics: dict[str, float] = {}
    if do_eval:
        edges = torch.linspace(lo, hi, cfg.loss_buckets + 1).tolist()
        losses = loss_by_log_snr(model, ds.test.x, ds.test.y, edges,
                                 generator=torch.Generator().manual_seed(0))
        for (a, b_), v in zip(zip(edges[:-1], edges[1:], strict=True), losses, strict=True):
            metrics[f"test_mse_lsnr_{a:+.1f}_{b_:+.1f}"] = round(v, 6)
        acc, n_t = 0.0, 0
        for n_t in cfg.dc_timesteps:
            acc = dc_accuracy(model, ds.test.x, ds.test.y, timesteps=n_t)
            metrics[f"dc_clean_acc_test_t{n_t}"] = round(acc, 6)
            if acc >= cfg.dc_target:
                break
        metrics["dc_clean_acc_test"] = round(acc, 6)
        metrics["dc_timesteps"] = n_t
    wall_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON and no timestamp: a retrain with the same seed on
    # the same platform gives the same bytes (see benchmark.train.classifier).
    info = {"arch": ARCH, "arch_kwargs": arch_kwargs, "dataset": ds.version, "seed": seed,
            "steps": step, "ema_decay": cfg.ema_decay}
    save_file(state, str(path), metadata={"genbench": json.dumps(info, sort_keys=True)})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; the zoo ships this one
    sha = file_sha256(path)

    trained_by = f"genbench train eps --dataset {dataset} --seed {seed}"
    if epochs is not None:
        trained_by += f" --epochs {n_epochs}"
    if max_steps is not None:
        trained_by += f" --max-steps {max_steps}"
    for key in sorted(extra):
        trained_by += f" --param {key}={json.dumps(extra[key])}"
    registered = False
    if register and into_zoo:
        register_model(ZooEntry(
            name=name, arch=ARCH, arch_kwargs=arch_kwargs, dataset=dataset, file="", sha256=sha,
            trained_by=trained_by, metrics=metrics, created=_dt.date.today().isoformat(),
            dataset_version=ds.version,
        ), path)
        registered = True
    return {"name": name, "path": str(path), "sha256": sha, "metrics": metrics,
            "wall_s": round(wall_s, 3), "train_s": round(train_s, 3), "steps": step,
            "epochs": n_epochs, "seed": seed, "dataset": dataset,
            "dataset_version": ds.version, "registered": registered,
            "trained_by": trained_by}
