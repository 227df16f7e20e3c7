"""Execute one job: build (or reuse) the defense, attack a shard, re-check, score with K draws.

This is the only code that touches plug-ins at run time, and it is shared by every executor, so
a job gives the same result wherever it runs. Anything a plug-in raises, and any output of the
wrong shape or with NaNs, becomes an error result for that job; the run goes on.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.defense import describe
from benchmark.diagnostics import safe_diagnostics
from benchmark.jobs import JobResult, JobSpec, SampleOutcome
from benchmark.registries import ATTACKS, DEFENSES, THREAT_MODELS
from benchmark.suite import thaw


class PluginOutputError(RuntimeError):
    """A defense returned output of the wrong shape, dtype or with non-finite values."""


class _Cache:
    """Per-process cache of datasets and defenses (workers build each once)."""

    def __init__(self) -> None:
        self.defenses: dict[tuple[Any, ...], nn.Module] = {}

    def defense(self, job: JobSpec, device: torch.device) -> nn.Module:
        key = (job.defense.name, job.defense_params, str(device))
        if key not in self.defenses:
            factory = DEFENSES.get(job.defense.name)
            module = factory(**(thaw(job.defense_params) or {}))
            if not isinstance(module, nn.Module):
                raise PluginOutputError(
                    f"defense {job.defense.name!r} built a {type(module).__name__}, "
                    "expected a torch.nn.Module")
            module = module.to(device).eval()
            module.requires_grad_(False)
            self.defenses[key] = module
        return self.defenses[key]


CACHE = _Cache()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def shard_data(job: JobSpec, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The job's images and labels (in sample-id order) and the dataset's class count."""
    from benchmark.data import load_dataset

    ds = load_dataset(job.dataset, **(thaw(job.dataset_params) or {}))
    split = ds.test
    index = {int(i): r for r, i in enumerate(split.ids.tolist())}
    missing = [i for i in job.sample_ids if i not in index]
    if missing:
        raise KeyError(f"sample ids {missing[:5]} are not in the {job.dataset} test split")
    rows = torch.tensor([index[i] for i in job.sample_ids], dtype=torch.long)
    return split.x[rows].to(device), split.y[rows].to(device), ds.num_classes


def check_logits(out: Any, batch: int, num_classes: int, who: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise PluginOutputError(f"{who} returned {type(out).__name__}, expected a logits tensor")
    if out.shape != (batch, num_classes):
        raise PluginOutputError(
            f"{who} returned shape {tuple(out.shape)}, expected logits of shape "
            f"({batch}, {num_classes})")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(dim=1).sum())
        raise PluginOutputError(f"{who} returned non-finite logits for {bad} of {batch} samples")
    return out


@torch.no_grad()
def correct_counts(defense: nn.Module, x: Tensor, y: Tensor, k: int, num_classes: int,
                   batch_size: int, who: str) -> Tensor:
    """Correct predictions out of ``k`` independent draws per sample (one batched forward per
    chunk: the k draws of a sample are stacked along the batch dimension)."""
    counts = torch.zeros(len(x), dtype=torch.long, device=x.device)
    per_chunk = max(1, batch_size // k)
    for start in range(0, len(x), per_chunk):
        xb, yb = x[start:start + per_chunk], y[start:start + per_chunk]
        rep = xb.repeat_interleave(k, dim=0)
        logits = check_logits(defense(rep), len(rep), num_classes, who)
        hits = (logits.argmax(dim=1) == yb.repeat_interleave(k)).view(len(xb), k)
        counts[start:start + len(xb)] = hits.sum(dim=1)
    return counts


@torch.no_grad()
def adversarial_counts(defense: nn.Module, attack: Any, x_adv: Tensor, y: Tensor, k: int,
                       num_classes: int, batch_size: int, who: str) -> Tensor:
    """Correct-counts of adversarial examples: K fresh draws (:func:`correct_counts`), except for
    a diagnostic attack that pins the defense's noise (``attack.pinned_seed``, the fixed-noise
    diagnostic of :mod:`attacks.purification`): it is scored with that same pinned draw, on
    the same batch the attack saw, and the one outcome counts for all K."""
    seed = getattr(attack, "pinned_seed", None)
    if seed is None:
        return correct_counts(defense, x_adv, y, k, num_classes, batch_size, who)
    reseed = getattr(defense, "reseed", None)
    if not callable(reseed):
        raise PluginOutputError(f"{who} has no reseed(seed); attack {attack!r} pins its noise")
    reseed(seed)
    logits = check_logits(defense(x_adv), len(x_adv), num_classes, who)
    return (logits.argmax(dim=1) == y).long() * k


def _jsonable(value: Any) -> Any:
    """Per-batch attack extras in a JSON-friendly form (tensors become summary numbers)."""
    if isinstance(value, Tensor):
        return value.float().mean().item() if value.numel() > 1 else value.item()
    if isinstance(value, dict | list | tuple | str | int | float | bool) or value is None:
        return value
    return str(value)


def execute(job: JobSpec, device: str | None = None) -> JobResult:
    """Run one job; never raises for plug-in failures (they become an error result)."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    versions: dict[str, str] = {}
    try:
        versions["defense"] = str(DEFENSES.provenance(job.defense.name))
        defense = CACHE.defense(job, dev)
        kind, stochastic, nfe = describe(defense)
        k = job.k_draws if stochastic else 1
        reseed = getattr(defense, "reseed", None)
        if callable(reseed):
            reseed(job.run_seed)
        x, y, num_classes = shard_data(job, dev)
        who = f"defense {job.defense.id!r}"
        budget: dict[str, Any] = {}
        extras: dict[str, list[Any]] = {}
        grad_evals = 0
        x_adv_np: np.ndarray | None = None
        if job.is_clean:
            counts = correct_counts(defense, x, y, k, num_classes, job.batch_size, who)
            outcomes = [SampleOutcome(int(i), int(c)) for i, c in zip(job.sample_ids,
                                                                    counts.tolist(), strict=True)]
            if job.shard == 0:  # validity-flag evidence, after scoring (benchmark.diagnostics)
                extras["grad_diagnostics"] = [safe_diagnostics(defense, x, y)]
        else:
            assert job.attack is not None and job.threat is not None and job.eps is not None
            versions["attack"] = str(ATTACKS.provenance(job.attack.name))
            versions["threat_model"] = str(THREAT_MODELS.provenance(job.threat))
            with torch.no_grad():  # a malformed defense fails here, with a clear message
                check_logits(defense(x[:2]), len(x[:2]), num_classes, who)
            threat = THREAT_MODELS.get(job.threat)(job.eps)
            attack = ATTACKS.get(job.attack.name)(**job.attack.kwargs())
            generator = torch.Generator(device=dev)
            generator.manual_seed(job.run_seed + 1)
            outcomes = []
            advs = []
            for start in range(0, len(x), job.batch_size):
                xb, yb = x[start:start + job.batch_size], y[start:start + job.batch_size]
                ids = job.sample_ids[start:start + job.batch_size]
                result = attack.run(defense, xb, yb, threat, generator=generator)
                grad_evals += int(getattr(result, "grad_evals", 0))
                x_adv = result.x_adv.detach()
                if not isinstance(x_adv, Tensor) or x_adv.shape != xb.shape:
                    raise PluginOutputError(
                        f"attack {job.attack.id!r} returned x_adv of shape "
                        f"{tuple(getattr(x_adv, 'shape', ()))}, expected {tuple(xb.shape)}")
                params = result.params.detach() if result.params is not None else None
                viol = threat.violations(xb, x_adv, params)
                dist = threat.distance(xb, x_adv, params)
                safe = torch.where(viol.mask.view(-1, *[1] * (xb.dim() - 1)), xb, x_adv)
                safe = torch.nan_to_num(safe)
                counts = adversarial_counts(defense, attack, safe, yb, k, num_classes,
                                            job.batch_size, who)
                for sid, c, why, d in zip(ids, counts.tolist(), viol.per_sample,
                                          dist.tolist(), strict=True):
                    outcomes.append(SampleOutcome(int(sid), 0 if why else int(c), d, why))
                for key, value in result.extras.items():
                    extras.setdefault(key, []).append(_jsonable(value))
                advs.append(x_adv.float().cpu().numpy())
            x_adv_np = np.concatenate(advs) if advs else None
            # read after running: some attacks resolve their budget per defense (AutoAttack
            # "auto" picks standard or rand)
            budget = vars(attack.budget).copy() if hasattr(attack, "budget") else {}
        return JobResult(
            key=job.key, status="done", outcomes=outcomes, k=k,
            wall_s=time.perf_counter() - t0, grad_evals=grad_evals,
            nfe_per_pred=float(nfe * k), stochastic=stochastic, budget=budget,
            plugin_versions=versions, x_adv=x_adv_np, extras=extras,
        )
    except Exception as exc:  # a failing plug-in is an error row; the run goes on
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
        return JobResult(key=job.key, status="error", outcomes=[], k=job.k_draws,
                         wall_s=time.perf_counter() - t0,
                         error=f"{type(exc).__name__}: {exc}{where}", plugin_versions=versions)
