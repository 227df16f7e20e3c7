"""Train the zoo's normalizing flows (``genbench train realnvp|glow --regime clean|adv|hybrid``).

The three regimes of Pope, Balaji and Feizi (AISTATS 2020, section 5):

* ``clean``: maximum likelihood on uniformly dequantized training images;
* ``adv``: maximum likelihood on in-distribution adversarial examples only: each dequantized
  batch is replaced by its PGD l-inf attack that *lowers* the likelihood (:func:`pgd_nll`);
* ``hybrid``: every batch is half clean, half adversarial (1:1): the second half of the batch
  is attacked, the first half is kept, and the loss is the mean NLL over both halves.

The attack during training is PGD l-inf with ``attack_steps`` (m = 10, the paper's value)
signed-gradient steps of size 2.5 eps / m from a uniform random start, projected onto the eps
ball around the dequantized image and onto [0, 1]. The evaluation after training reports the
mean test bits/dim (fixed dequantization noise, the same for every model) clean and under a
20-step PGD (keeping each sample's worst iterate) at each of ``eval_eps``.

Seeded end to end: initial weights (including Glow's random 1x1 rotations) from
``torch.manual_seed(seed)``; data order, dequantization noise and attack starts from a CPU
``torch.Generator`` seeded with ``seed``, so a seed gives the same weights on every device up to
floating point. The weights are written as safetensors and, when written into the zoo's own
folder, registered in the manifest with their sha256 and metrics.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.plugins import register_trainer
from benchmark.zoo.flows import Flow, dequantize

__all__ = ["ARCHS", "REGIMES", "FlowTrainConfig", "config_for", "evaluate_robustness",
           "pgd_nll", "train", "train_glow", "train_realnvp"]

ARCHS = {"realnvp": "benchmark.zoo.flows:RealNVP", "glow": "benchmark.zoo.flows:Glow"}
REGIMES = ("clean", "adv", "hybrid")
#: the dequantization noise of the test images in every evaluation (the same for all models).
EVAL_SEED = 0
#: training l-inf budget: the smallest l-inf epsilon of the digits suite (0.05, about 13/255).
#: Pope et al. train CIFAR-10 at 8/255; the digits are 17-level images upsampled to 16x16, so a
#: slightly larger budget that the leaderboard actually evaluates is the useful one here.
DEFAULT_EPS = 0.05


@dataclass(frozen=True)
class FlowTrainConfig:
    """Per-(dataset, arch) defaults; any field can be overridden through ``train(**extra)``."""

    arch_kwargs: dict[str, int]
    #: the same for every regime, so that the regimes compare at equal training (an ``adv``
    #: step costs m + 1 forward-backward passes, a ``hybrid`` step about m / 2 + 1).
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_frac: float = 0.05
    grad_clip: float = 50.0
    eval_eps: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1)
    eval_steps: int = 20
    #: the shipped evaluation subset the PGD curve runs on (None: the whole test split).
    eval_subset: str | None = "test100-v1"
    eval_batch_size: int = 100


_CONFIGS: dict[tuple[str, str], FlowTrainConfig] = {
    ("digits", "realnvp"): FlowTrainConfig(
        arch_kwargs={"num_scales": 2, "steps_per_scale": 3, "hidden": 32}),
    ("digits", "glow"): FlowTrainConfig(
        arch_kwargs={"num_scales": 2, "steps_per_scale": 4, "hidden": 48}),
    ("cifar10", "realnvp"): FlowTrainConfig(
        arch_kwargs={"num_scales": 3, "steps_per_scale": 3, "hidden": 64},
        epochs=30, batch_size=64),
    ("cifar10", "glow"): FlowTrainConfig(
        arch_kwargs={"num_scales": 3, "steps_per_scale": 8, "hidden": 128},
        epochs=30, batch_size=64),
}


def config_for(dataset: str, arch: str) -> FlowTrainConfig:
    """The defaults for ``arch`` on ``dataset`` (the digits configuration if none is listed)."""
    _check_choice("arch", arch, tuple(ARCHS))
    return _CONFIGS.get((dataset, arch), _CONFIGS[("digits", arch)])


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown flow {what} {value!r}; choose one of "
                         f"{', '.join(repr(c) for c in choices)}")


# --------------------------------------------------------------------------------------------
# The in-distribution attack (Pope et al.): PGD l-inf raising the NLL
# --------------------------------------------------------------------------------------------
def pgd_nll(model: Flow, x: Tensor, *, eps: float, steps: int, step_size: float | None = None,
            random_start: bool = True, generator: torch.Generator | None = None,
            keep_best: bool = False) -> Tensor:
    """PGD l-inf that *lowers* the likelihood of ``x`` (images in [0, 1]); returns x_adv.

    Maximizes -log p(x_adv) by ``steps`` signed-gradient steps of ``step_size`` (default
    2.5 eps / steps), from a uniform start in the eps ball (``random_start``) or from ``x``,
    projecting onto the ball and the [0, 1] box after every step. With ``keep_best`` each
    sample's iterate of highest NLL is returned (the evaluation's choice); otherwise the last
    iterate (the training attack). Only the input gets gradients, never the model's parameters.
    """
    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = (x + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
    else:
        x_adv = x.clone()
    best = x_adv.clone()
    best_nll = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for i in range(steps + 1):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            nll = -model.log_prob(x_adv)
            grad = torch.autograd.grad(nll.sum(), x_adv)[0] if i < steps else None
        x_adv = x_adv.detach()
        if keep_best:
            better = nll.detach() > best_nll
            best_nll = torch.where(better, nll.detach(), best_nll)
            best[better] = x_adv[better]
        if grad is None:
            break
        x_adv = x_adv + alpha * torch.nan_to_num(grad).sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return best if keep_best else x_adv


@torch.no_grad()
def _mean_bpd(model: Flow, x: Tensor, batch_size: int) -> float:
    return float(torch.cat([model.bits_per_dim(x[i:i + batch_size])
                            for i in range(0, x.shape[0], batch_size)]).mean())


def evaluate_robustness(model: Flow, x01: Tensor, *, eps: Sequence[float],
                        steps: int = 20, batch_size: int = 120,
                        seed: int = EVAL_SEED) -> dict[float, float]:
    """Mean bits/dim of the dequantized ``x01`` under a ``steps``-step :func:`pgd_nll` per eps.

    Dequantization noise and attack starts come from ``seed``; eps 0 is the clean value. The
    attack keeps each sample's worst iterate. Returns {eps: mean bits/dim}.
    """
    gen = torch.Generator().manual_seed(seed)
    x = dequantize(x01, gen)
    out: dict[float, float] = {}
    for e in eps:
        if e <= 0:
            out[float(e)] = _mean_bpd(model, x, batch_size)
            continue
        adv = torch.cat([pgd_nll(model, x[i:i + batch_size], eps=float(e), steps=steps,
                                 generator=gen, keep_best=True)
                         for i in range(0, x.shape[0], batch_size)])
        out[float(e)] = _mean_bpd(model, adv, batch_size)
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _resolve_config(dataset: str, arch: str,
                    extra: dict[str, Any]) -> tuple[FlowTrainConfig, dict[str, Any]]:
    """Apply ``extra`` overrides (config fields or architecture keyword arguments)."""
    cfg = config_for(dataset, arch)
    fields = {f.name for f in dataclasses.fields(FlowTrainConfig)} - {"arch_kwargs"}
    arch_keys = {"num_scales", "steps_per_scale", "hidden"}
    unknown = sorted(set(extra) - fields - arch_keys)
    if unknown:
        raise ValueError(f"unknown flow training option(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(sorted(fields | arch_keys))}")
    arch_kwargs = dict(cfg.arch_kwargs)
    arch_kwargs.update({k: int(v) for k, v in extra.items() if k in arch_keys})
    over = {k: v for k, v in extra.items() if k in fields}
    if over.get("eval_subset") in ("", "none", "None"):
        over["eval_subset"] = None
    if "eval_eps" in over:
        over["eval_eps"] = tuple(float(e) for e in over["eval_eps"])
    return dataclasses.replace(cfg, arch_kwargs=arch_kwargs, **over), over


def _evaluate(model: Flow, ds: Any, cfg: FlowTrainConfig, dev: torch.device) -> dict[str, float]:
    """The manifest metrics: ``test_bpd`` (whole test split, clean), ``<subset>_bpd`` and
    ``<subset>_bpd_pgd<k>_eps<e>`` (the PGD curve), ``uniform_noise_bpd``."""
    from benchmark.data.subsets import get_subset, select

    x_all = ds.test.x.to(dev)
    metrics = {"test_bpd": round(evaluate_robustness(model, x_all, eps=[0.0],
                                                     batch_size=cfg.eval_batch_size)[0.0], 4)}
    if cfg.eval_subset is None:
        tag, x_eval = "test", x_all
    else:
        tag = cfg.eval_subset.rsplit("-v", 1)[0]
        x_eval = select(ds, get_subset(ds.name, cfg.eval_subset))[0].to(dev)
    curve = evaluate_robustness(model, x_eval, eps=cfg.eval_eps, steps=cfg.eval_steps,
                                batch_size=cfg.eval_batch_size)
    for e, bpd in curve.items():
        key = f"{tag}_bpd" if e == 0 else f"{tag}_bpd_pgd{cfg.eval_steps}_eps{e:g}"
        metrics[key] = round(bpd, 4)
    noise = torch.rand(x_eval.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    metrics["uniform_noise_bpd"] = round(_mean_bpd(model, noise.to(dev), cfg.eval_batch_size), 4)
    return metrics


def train(*, arch: str, dataset: str = "digits", regime: str = "clean", seed: int = 0,
          epochs: int | None = None, max_steps: int | None = None, name: str | None = None,
          out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
          register: bool = True, device: str | torch.device = "cpu",
          eps: float = DEFAULT_EPS, attack_steps: int = 10, **extra: Any) -> dict[str, Any]:
    """Train a :class:`~benchmark.zoo.flows.RealNVP` or :class:`~benchmark.zoo.flows.Glow`.

    ``arch``: ``"realnvp"`` or ``"glow"``; ``regime``: ``"clean"``, ``"adv"`` or ``"hybrid"``
    (module docstring). ``eps``/``attack_steps``: the training attack's l-inf budget and m.
    ``epochs`` defaults per dataset, arch and regime (:func:`config_for`); ``max_steps`` stops
    earlier (smoke tests). ``extra`` overrides :class:`FlowTrainConfig` fields or the
    architecture's ``num_scales``, ``steps_per_scale``, ``hidden``. The weights go to
    ``out_dir/<name>.safetensors`` (default: the zoo's ``weights/`` folder, name
    ``f"{dataset}-{arch}-{regime}"``); ``register`` adds them to the zoo manifest (only when
    writing into the zoo's own folder).

    Returns ``{"name", "path", "sha256", "metrics", "wall_s", "train_s", "steps", ...}`` where
    ``metrics`` holds ``test_bpd`` and ``test_bpd_pgd<k>_eps<e>`` per evaluation epsilon.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from benchmark.data import load_dataset
    from benchmark.plugins.registry import import_ref
    from benchmark.zoo import ZOO_DIR, ZooEntry, file_sha256, register_model

    _check_choice("arch", arch, tuple(ARCHS))
    _check_choice("regime", regime, REGIMES)
    cfg, overrides = _resolve_config(dataset, arch, extra)
    n_epochs = cfg.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if regime != "clean" and (eps <= 0 or attack_steps < 1):
        raise ValueError(f"regime {regime!r} needs eps > 0 and attack_steps >= 1, got "
                         f"eps={eps}, attack_steps={attack_steps}")
    name = name or f"{dataset}-{arch}-{regime}"
    zoo_weights = ZOO_DIR / "weights"
    out = Path(out_dir) if out_dir is not None else zoo_weights
    into_zoo = out.resolve() == zoo_weights.resolve()
    dev = torch.device(device)

    ds = load_dataset(dataset)
    c, h, w = ds.image_shape
    if h != w:
        raise ValueError(f"{dataset}: flows need square images, got {h}x{w}")
    arch_kwargs = {"in_channels": c, "image_size": h, **cfg.arch_kwargs}

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model: Flow = import_ref(ARCHS[arch])(**arch_kwargs)
    model.to(dev).train()
    x_train = ds.train.x
    n = x_train.shape[0]
    steps_per_epoch = -(-n // cfg.batch_size)
    total = n_epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = max(1, int(cfg.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5
                                              * (1.0 + math.cos(math.pi * min(s, total) / total)))

    step = 0
    last_loss = math.nan
    bar = tqdm(total=total, desc=f"train {name}", disable=not progress, leave=False)
    try:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                xb = dequantize(x_train[perm[i:i + cfg.batch_size]], gen).to(dev)
                if step == 0:
                    with torch.no_grad():  # Glow's actnorm: data-dependent init on clean data
                        model.log_prob(xb)
                if regime == "adv":
                    xb = pgd_nll(model, xb, eps=eps, steps=attack_steps, generator=gen)
                elif regime == "hybrid":
                    half = xb.shape[0] // 2
                    xb = torch.cat([xb[:half], pgd_nll(model, xb[half:], eps=eps,
                                                       steps=attack_steps, generator=gen)])
                loss = model.bits_per_dim(xb).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                last_loss = float(loss.detach())
                bar.update(1)
                bar.set_postfix(bpd=f"{last_loss:.3f}", refresh=False)
    finally:
        bar.close()
    if not math.isfinite(last_loss):
        raise RuntimeError(f"training {name} diverged (loss {last_loss}) at step {step}")
    train_s = time.perf_counter() - t0

    model.eval()
    metrics = _evaluate(model, ds, cfg, dev)
    wall_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON and no timestamp: same seed, same platform, same bytes.
    info = {"arch": ARCHS[arch], "arch_kwargs": arch_kwargs, "dataset": ds.version,
            "seed": seed, "steps": step, "regime": regime,
            "eps": eps if regime != "clean" else None,
            "attack_steps": attack_steps if regime != "clean" else None}
    save_file(state, str(path), metadata={"genbench": json.dumps(info, sort_keys=True)})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; the zoo ships this one
    sha = file_sha256(path)

    trained_by = f"genbench train {arch} --dataset {dataset} --regime {regime} --seed {seed}"
    if epochs is not None:
        trained_by += f" --epochs {n_epochs}"
    if max_steps is not None:
        trained_by += f" --max-steps {max_steps}"
    if regime != "clean" and eps != DEFAULT_EPS:
        trained_by += f" --param eps={eps}"
    if regime != "clean" and attack_steps != 10:
        trained_by += f" --param attack_steps={attack_steps}"
    for k, v in sorted(extra.items()):
        trained_by += f" --param {k}={json.dumps(v, separators=(',', ':'))}"
    registered = False
    if register and into_zoo:
        register_model(ZooEntry(
            name=name, arch=ARCHS[arch], arch_kwargs=arch_kwargs, dataset=dataset, file="",
            sha256=sha, trained_by=trained_by, metrics=metrics,
            created=_dt.date.today().isoformat(), dataset_version=ds.version,
        ), path)
        registered = True
    return {"name": name, "path": str(path), "sha256": sha, "metrics": metrics,
            "wall_s": round(wall_s, 3), "train_s": round(train_s, 3), "steps": step,
            "epochs": n_epochs, "seed": seed, "arch": arch, "arch_ref": ARCHS[arch],
            "arch_kwargs": arch_kwargs, "regime": regime,
            "eps": eps, "attack_steps": attack_steps, "dataset": dataset,
            "dataset_version": ds.version, "eval_subset": cfg.eval_subset,
            "overrides": overrides, "registered": registered}


@register_trainer("realnvp")
def train_realnvp(**kwargs: Any) -> dict[str, Any]:
    """:func:`train` with ``arch="realnvp"`` (``genbench train realnvp``)."""
    return train(arch="realnvp", **kwargs)


@register_trainer("glow")
def train_glow(**kwargs: Any) -> dict[str, Any]:
    """:func:`train` with ``arch="glow"`` (``genbench train glow``)."""
    return train(arch="glow", **kwargs)
