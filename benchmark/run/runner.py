"""Execute one job: build (or reuse) the defense, attack a shard, re-check, score with K draws.

This is the only code that touches plug-ins at run time, and it is shared by every executor, so
a job gives the same result wherever it runs. Anything a plug-in raises (``sys.exit`` included,
and a ``KeyboardInterrupt`` it raises itself; a real Ctrl-C still stops the run), and any output
of the wrong shape or with NaNs on the clean inputs, becomes an error result for that job; the
run goes on. An attack that raises is an error result too.

Scoring the adversarial examples is per sample: a defense that returns non-finite logits for an
adversarial example, or raises while scoring a chunk of them, makes those samples *not robust*,
with the reason recorded (prefixed :data:`DEFENSE_FAILED`) and counted in ``n_errors`` as threat
violations are; the job (and the worst case over attacks) stays complete. Out-of-memory errors
are not a property of the defense and still make the job an error.

The global random generators (``random``, NumPy, torch) are seeded from ``job.run_seed`` at the
start of every job, so a plug-in drawing from them is reproducible per job, whichever executor
or worker runs it.

Jobs on density defenses (``kind = "density"``) are scored by :func:`execute_density`: log p,
bits/dim and PNG complexity of every sample before and after the attack, plus the attack's
objective curve, instead of K-draw correct-counts.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.api.attack import EVIDENCE_KEYS
from benchmark.api.defense import describe
from benchmark.plugins.builtin import ATTACKS, DEFENSES, THREAT_MODELS
from benchmark.plugins.cache import DefenseCache, PluginOutputError
from benchmark.run.diagnostics import safe_diagnostics
from benchmark.spec.jobs import CURVE_POINTS, DensityOutcome, JobResult, JobSpec, SampleOutcome
from benchmark.spec.suite import thaw


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


#: prefix of the per-sample error of an adversarial example the defense failed on (non-finite
#: logits, or an exception while scoring it): scored not robust, like a threat violation.
DEFENSE_FAILED = "defense failed on the adversarial example: "


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError | torch.OutOfMemoryError)


def check_logits(out: Any, batch: int, num_classes: int, who: str, *,
                 finite: bool = True) -> Tensor:
    """``out`` as logits of shape (batch, num_classes); with ``finite`` (the default) they
    must also be finite. Raises :class:`PluginOutputError` otherwise."""
    if not isinstance(out, Tensor):
        raise PluginOutputError(f"{who} returned {type(out).__name__}, expected a logits tensor")
    if out.shape != (batch, num_classes):
        raise PluginOutputError(
            f"{who} returned shape {tuple(out.shape)}, expected logits of shape "
            f"({batch}, {num_classes})")
    if finite and not torch.isfinite(out).all():
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
    diagnostic of :mod:`attacks.fixed_noise`): it is scored with that same pinned draw, on
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


def _failure(exc: BaseException) -> str:
    """The per-sample reason of a chunk that made the defense raise (one line)."""
    message = " ".join(str(exc).split())  # one line, stored once per sample
    message = message if len(message) <= 300 else message[:297] + "..."
    return f"{DEFENSE_FAILED}raised {type(exc).__name__}: {message}"


def majority_draws_left(correct: Tensor, wrong: Tensor, k: int) -> Tensor:
    """Draws each sample still needs before its K-draw majority verdict (correct iff
    ``2 * correct > k``) could be decided: the fewer of the correct draws still missing for a
    majority and the wrong ones still missing to rule it out; 0 once decided. Drawing that many
    never overshoots K, and a decided verdict equals the one all K draws would give."""
    need_correct = k // 2 + 1 - correct
    need_wrong = k - k // 2 - wrong
    return torch.minimum(need_correct, need_wrong).clamp(min=0)


@torch.no_grad()
def sequential_majority(defense: nn.Module, x: Tensor, y: Tensor, k: int, num_classes: int,
                        batch_size: int, who: str) -> tuple[Tensor, list[str | None]]:
    """K-draw majority verdicts drawn sequentially, for the automatic probes (evidence for the
    flags, never rows): each round gives every undecided sample the draws it still needs
    (:func:`majority_draws_left`), batched up to ``batch_size`` rows, until all are decided. A
    sample fooled in its first K/2 draws costs K/2 forwards instead of K. ``counts`` are the
    correct draws seen, so ``2 * count > k`` is exactly the full-K majority; they are not a
    sample of K draws (no mean or worst-of-K from them). Failures as in
    :func:`score_adversarial`."""
    n = len(x)
    correct = torch.zeros(n, dtype=torch.long, device=x.device)
    wrong = torch.zeros_like(correct)
    reasons: list[str | None] = [None] * n
    failed = torch.zeros(n, dtype=torch.bool, device=x.device)
    while True:
        left = torch.where(failed, 0, majority_draws_left(correct, wrong, k))
        if not left.any():
            return torch.where(failed, 0, correct), reasons
        rows = torch.repeat_interleave(torch.arange(n, device=x.device), left)
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            try:
                out = defense(x[idx])
            except Exception as exc:
                if out_of_memory(exc):
                    raise
                why = _failure(exc)
                for i in idx.unique().tolist():
                    failed[i] = True
                    reasons[i] = why
                continue
            logits = check_logits(out, len(idx), num_classes, who, finite=False)
            finite = torch.isfinite(logits).all(dim=1)
            for i in idx[~finite].unique().tolist():
                failed[i] = True
                reasons[i] = f"{DEFENSE_FAILED}non-finite logits in a draw"
            hits = (logits.argmax(dim=1) == y[idx]).long()
            correct.index_add_(0, idx, hits)
            wrong.index_add_(0, idx, 1 - hits)


@torch.no_grad()
def score_adversarial(defense: nn.Module, attack: Any, x_adv: Tensor, y: Tensor, k: int,
                      num_classes: int, batch_size: int, who: str, *,
                      sequential: bool = False) -> tuple[Tensor, list[str | None]]:
    """:func:`adversarial_counts`, tolerant per sample: ``(counts, reasons)`` where a sample
    whose K draws include non-finite logits, or whose chunk made the defense raise, counts 0
    and has a reason (starting with :data:`DEFENSE_FAILED`); other samples have None. Output
    of the wrong type or shape, and out-of-memory errors, still raise. With ``sequential``
    (the automatic probes), a stochastic defense's draws stop once the majority is decided
    (:func:`sequential_majority`)."""
    n = len(x_adv)
    counts = torch.zeros(n, dtype=torch.long, device=x_adv.device)
    reasons: list[str | None] = [None] * n
    seed = getattr(attack, "pinned_seed", None)
    if sequential and seed is None and k > 1:
        return sequential_majority(defense, x_adv, y, k, num_classes, batch_size, who)
    if seed is not None:  # the fixed-noise diagnostic: its pinned draw counts for all K
        reseed = getattr(defense, "reseed", None)
        if not callable(reseed):
            raise PluginOutputError(f"{who} has no reseed(seed); attack {attack!r} pins its "
                                    "noise")
        reseed(seed)
        spans = [(0, n, 1, k)]
    else:
        per_chunk = max(1, batch_size // k)
        spans = [(s, min(n, s + per_chunk), k, 1) for s in range(0, n, per_chunk)]
    for start, stop, draws, weight in spans:
        xb, yb = x_adv[start:stop], y[start:stop]
        rep = xb.repeat_interleave(draws, dim=0) if draws > 1 else xb
        try:
            out = defense(rep)
        except Exception as exc:
            if out_of_memory(exc):
                raise
            reasons[start:stop] = [_failure(exc)] * (stop - start)
            continue
        logits = check_logits(out, len(rep), num_classes, who, finite=False)
        finite = torch.isfinite(logits).all(dim=1).view(len(xb), draws)
        hits = (logits.argmax(dim=1) == yb.repeat_interleave(draws)).view(len(xb), draws)
        counts[start:stop] = (hits & finite).sum(dim=1) * weight
        for i in (~finite.all(dim=1)).nonzero().flatten().tolist():
            bad = int((~finite[i]).sum())
            counts[start + i] = 0
            reasons[start + i] = (f"{DEFENSE_FAILED}non-finite logits in {bad} of {draws} "
                                  f"draw{'s' if draws > 1 else ''}")
    return counts, reasons


def _jsonable(value: Any) -> Any:
    """Per-batch attack extras in a JSON-friendly form (tensors become summary numbers)."""
    if isinstance(value, Tensor):
        return value.float().mean().item() if value.numel() > 1 else value.item()
    if isinstance(value, dict | list | tuple | str | int | float | bool) or value is None:
        return value
    return str(value)


def evidence_lists(evidence: dict[str, Any], sample_ids: Sequence[int],
                   who: str) -> dict[str, list[Any]]:
    """An attack's per-sample evidence (:data:`benchmark.api.attack.EVIDENCE_KEYS`) as JSON
    lists aligned with ``sample_ids`` (stored under the job's ``extras["evidence"]``, one entry
    per batch); non-finite curve values become None. A malformed entry is an error naming it."""
    out: dict[str, list[Any]] = {"sample_ids": [int(s) for s in sample_ids]}
    for name, value in evidence.items():
        if name not in EVIDENCE_KEYS:
            raise PluginOutputError(f"{who} returned evidence {name!r}; known evidence: "
                                    f"{', '.join(EVIDENCE_KEYS)}")
        if not isinstance(value, Tensor) or value.dim() < 1 or len(value) != len(sample_ids):
            raise PluginOutputError(
                f"{who} returned evidence[{name!r}] of shape "
                f"{tuple(getattr(value, 'shape', ()))}, expected one entry per sample "
                f"({len(sample_ids)})")
        if name == "loss_curve":
            curve = value.detach().double().cpu()
            if curve.dim() != 2:
                raise PluginOutputError(f"{who} returned evidence['loss_curve'] of shape "
                                        f"{tuple(curve.shape)}, expected (batch, bins)")
            out[name] = [[v if math.isfinite(v) else None for v in row] for row in
                         curve.tolist()]
        else:
            if value.dim() != 1:
                raise PluginOutputError(f"{who} returned evidence[{name!r}] of shape "
                                        f"{tuple(value.shape)}, expected ({len(sample_ids)},)")
            if name == "first_adversarial":
                out[name] = [int(v) for v in value.detach().long().cpu().tolist()]
            else:
                out[name] = [bool(v) for v in value.detach().cpu().tolist()]
    return out


def check_logp(out: Any, batch: int, who: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise PluginOutputError(f"{who} returned {type(out).__name__}, expected a log-likelihood "
                                "tensor")
    if out.shape != (batch,):
        raise PluginOutputError(f"{who} returned shape {tuple(out.shape)}, expected per-sample "
                                f"log-likelihoods of shape ({batch},)")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise PluginOutputError(f"{who} returned non-finite log-likelihoods for {bad} of "
                                f"{batch} samples")
    return out


def batched_log_prob(defense: nn.Module, x: Tensor, batch_size: int, who: str) -> Tensor:
    """The defense's reporting ``log_prob`` (nats, (B,)) in chunks of ``batch_size``.

    Deliberately not under ``torch.no_grad``: a likelihood by the instantaneous
    change-of-variables formula (the PF-ODE detector) differentiates inside ``log_prob`` to get
    its divergence; nothing here requires grad, so no graph outlives a chunk."""
    log_prob = getattr(defense, "log_prob", defense)
    parts = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        parts.append(check_logp(log_prob(xb), len(xb), who).detach().double())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=x.device)


def _to_bpd(defense: nn.Module, logp: Tensor) -> Tensor:
    return defense.logp_to_bpd(logp)  # type: ignore[operator]


def curve_steps(n_points: int, *, keep: int = CURVE_POINTS) -> np.ndarray:
    """Indices of at most ``keep`` evenly spaced points of a curve of ``n_points`` (first and
    last included)."""
    if n_points <= keep:
        return np.arange(n_points)
    return np.unique(np.linspace(0, n_points - 1, keep).round().astype(np.int64))


def _complexity(x: Tensor) -> Tensor:
    from benchmark.complexity import png_complexity

    return png_complexity(x.clamp(0, 1)).double()


def execute_density(job: JobSpec, defense: nn.Module, x: Tensor, y: Tensor,
                    dev: torch.device) -> dict[str, Any]:
    """Score one job on a density defense; the pieces of its :class:`JobResult`."""
    who = f"defense {job.defense.id!r}"
    extras: dict[str, Any] = {"kind": "density"}
    if job.is_clean:
        logp = batched_log_prob(defense, x, job.batch_size, who)
        bpd, cx = _to_bpd(defense, logp), _complexity(x)
        density = [DensityOutcome(int(s), float(lp), float(b), float(c))
                   for s, lp, b, c in zip(job.sample_ids, logp.tolist(), bpd.tolist(),
                                          cx.tolist(), strict=True)]
        outcomes = [SampleOutcome(int(s), 0) for s in job.sample_ids]
        # the bits/dim convention as an affine map of log p, for thresholds computed later
        ends = _to_bpd(defense, torch.tensor([0.0, 1.0], dtype=torch.float64, device=x.device))
        extras["bpd_affine"] = [float(ends[0]), float(ends[1] - ends[0])]
        return dict(outcomes=outcomes, density=density, extras=extras, grad_evals=0,
                    x_adv=None, budget={})
    assert job.attack is not None and job.threat is not None and job.eps is not None
    threat = THREAT_MODELS.get(job.threat)(job.eps)
    attack = ATTACKS.get(job.attack.name)(**job.attack.kwargs())
    generator = torch.Generator(device=dev)
    generator.manual_seed(job.run_seed + 1)
    outcomes, density, advs = [], [], []
    curves: list[Tensor] = []
    grad_evals = 0
    direction = getattr(attack, "direction", None)
    aname = f"attack {job.attack.id!r}"
    for start in range(0, len(x), job.batch_size):
        xb, yb = x[start:start + job.batch_size], y[start:start + job.batch_size]
        ids = job.sample_ids[start:start + job.batch_size]
        result = attack.run(defense, xb, yb, threat, generator=generator)
        grad_evals += int(getattr(result, "grad_evals", 0))
        x_adv = result.x_adv.detach() if isinstance(result.x_adv, Tensor) else result.x_adv
        if not isinstance(x_adv, Tensor) or x_adv.shape != xb.shape:
            raise PluginOutputError(f"{aname} returned x_adv of shape "
                                    f"{tuple(getattr(x_adv, 'shape', ()))}, expected "
                                    f"{tuple(xb.shape)}")
        x_start = result.extras.get("x_start", xb)
        if not isinstance(x_start, Tensor) or x_start.shape != xb.shape:
            raise PluginOutputError(f"{aname} returned extras['x_start'] of shape "
                                    f"{tuple(getattr(x_start, 'shape', ()))}, expected "
                                    f"{tuple(xb.shape)}")
        x_start = x_start.detach()
        direction = result.extras.get("direction", direction)
        if direction not in ("lower", "raise"):
            raise PluginOutputError(f"{aname} declares direction {direction!r}, expected "
                                    "'lower' (in-distribution) or 'raise' (out-of-distribution)")
        params = result.params.detach() if result.params is not None else None
        # the threat model is checked against the attack's start (a generated point for
        # out-of-distribution attacks), which is also what "before" scores
        viol = threat.violations(x_start, x_adv, params)
        dist = threat.distance(x_start, x_adv, params)
        bad = viol.mask.view(-1, *[1] * (xb.dim() - 1))
        safe = torch.nan_to_num(torch.where(bad, x_start, x_adv)).clamp(0, 1)
        lp0 = batched_log_prob(defense, x_start, job.batch_size, who)
        lp1 = batched_log_prob(defense, safe, job.batch_size, who)
        b0, b1 = _to_bpd(defense, lp0), _to_bpd(defense, lp1)
        c0, c1 = _complexity(x_start), _complexity(safe)
        curve = result.extras.get("curve")
        if curve is not None:
            if not isinstance(curve, Tensor) or curve.dim() != 2 or curve.shape[1] != len(xb):
                raise PluginOutputError(f"{aname} returned extras['curve'] of shape "
                                        f"{tuple(getattr(curve, 'shape', ()))}, expected "
                                        f"(steps + 1, {len(xb)})")
            curves.append(curve.detach().double().cpu())
        for i, (sid, why, d) in enumerate(zip(ids, viol.per_sample, dist.tolist(), strict=True)):
            outcomes.append(SampleOutcome(int(sid), 0, d, why))
            nan = float("nan")
            density.append(DensityOutcome(
                int(sid), float(lp0[i]), float(b0[i]), float(c0[i]),
                nan if why else float(lp1[i]), nan if why else float(b1[i]),
                nan if why else float(c1[i])))
        advs.append(x_adv.float().cpu().numpy())
    extras.update(direction=direction, start=getattr(attack, "start", None))
    if curves and len({c.shape[0] for c in curves}) == 1:
        full = torch.cat(curves, dim=1)  # (steps + 1, n)
        steps = curve_steps(full.shape[0])
        extras.update(curve_steps=steps.tolist(), curve_mean=full.mean(dim=1).tolist())
        for j, d in enumerate(density):
            d.curve = full[steps, j].tolist()
    elif curves:
        raise PluginOutputError(f"{aname} returned curves of different lengths across batches")
    budget = vars(attack.budget).copy() if hasattr(attack, "budget") else {}
    return dict(outcomes=outcomes, density=density, extras=extras, grad_evals=grad_evals,
                x_adv=np.concatenate(advs) if advs else None, budget=budget)


class _Sigint:
    """Whether a real SIGINT (Ctrl-C) arrived while a job ran."""

    fired = False


@contextmanager
def _watch_sigint() -> Iterator[_Sigint]:
    """Record real SIGINTs (then behave as before) so that :func:`execute` can tell a Ctrl-C
    from a ``KeyboardInterrupt`` a plug-in raised itself. Signals reach only the main thread,
    and only a callable handler raises ``KeyboardInterrupt``: elsewhere nothing is installed
    and any ``KeyboardInterrupt`` comes from a plug-in."""
    watch = _Sigint()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield watch
        return

    def handler(signum: int, frame: Any) -> None:
        watch.fired = True
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield watch
    finally:
        signal.signal(signal.SIGINT, previous)


def _error_result(job: JobSpec, t0: float, versions: dict[str, str], exc: BaseException,
                  what: str | None = None) -> JobResult:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return JobResult(key=job.key, status="error", outcomes=[], k=job.k_draws,
                     wall_s=time.perf_counter() - t0,
                     error=f"{what or f'{type(exc).__name__}: {exc}'}{where}",
                     plugin_versions=versions)


def execute(job: JobSpec, device: str | None = None,
            cache: DefenseCache | None = None) -> JobResult:
    """Run one job; never raises for plug-in failures (they become an error result), including
    ``sys.exit`` and a ``KeyboardInterrupt`` raised by a plug-in. A real Ctrl-C (SIGINT while
    the job runs) propagates."""
    t0 = time.perf_counter()
    versions: dict[str, str] = {}
    with _watch_sigint() as sigint:
        try:
            return _execute(job, device, cache, versions, t0)
        except KeyboardInterrupt as exc:
            if sigint.fired:
                raise
            return _error_result(job, t0, versions, exc,
                                 "KeyboardInterrupt raised by a plug-in (not a Ctrl-C)")
        except SystemExit as exc:
            return _error_result(job, t0, versions, exc,
                                 f"SystemExit: a plug-in called sys.exit({exc.code!r})")
        except Exception as exc:  # a failing plug-in is an error row; the run goes on
            return _error_result(job, t0, versions, exc)


def _execute(job: JobSpec, device: str | None, cache: DefenseCache | None,
             versions: dict[str, str], t0: float) -> JobResult:
    dev = resolve_device(device)
    seed_globals(job.run_seed)  # a defense built here draws the same, cached or not
    versions["defense"] = str(DEFENSES.provenance(job.defense.name))
    defense = job.build_defense(cache if cache is not None else DefenseCache(), dev)
    t_check = time.perf_counter()
    job.settle_randomness(defense, dev)  # declared deterministic but random: K draws below
    t_check = time.perf_counter() - t_check  # automatic-probe cost (once per defense, process)
    seed_globals(job.run_seed)  # ... and the job's plug-ins as well
    kind, stochastic, nfe = describe(defense)
    k = job.k_draws if stochastic else 1
    reseed = getattr(defense, "reseed", None)
    if callable(reseed):
        reseed(job.run_seed)
    x, y, num_classes = shard_data(job, dev)
    if kind == "density":
        if job.attack is not None:
            versions["attack"] = str(ATTACKS.provenance(job.attack.name))
            versions["threat_model"] = str(THREAT_MODELS.provenance(str(job.threat)))
        parts = execute_density(job, defense, x, y, dev)
        # one reported log p per sample: K-draw voting is a classifier protocol
        return JobResult(key=job.key, status="done", k=1, wall_s=time.perf_counter() - t0,
                         nfe_per_pred=float(nfe), stochastic=stochastic,
                         plugin_versions=versions, **parts)
    who = f"defense {job.defense.id!r}"
    budget: dict[str, Any] = {}
    extras: dict[str, list[Any]] = {}
    grad_evals = 0
    x_adv_np: np.ndarray | None = None
    if job.is_clean:
        counts = correct_counts(defense, x, y, k, num_classes, job.batch_size, who)
        outcomes = [SampleOutcome(int(i), int(c)) for i, c in zip(job.sample_ids,
                                                                counts.tolist(), strict=True)]
        if job.shard == 0:  # validity-flag evidence, after scoring (benchmark.run.diagnostics)
            t_diag = time.perf_counter()
            diag = safe_diagnostics(defense, x, y, stochastic=stochastic)
            diag["wall_s"] = time.perf_counter() - t_diag  # the probes' cost, reported
            # declared deterministic, found random when built: scored with K draws (above)
            diag["undeclared_randomness"] = bool(getattr(defense, "undeclared_randomness",
                                                         False))
            extras["grad_diagnostics"] = [diag]
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
            counts, failed = score_adversarial(defense, attack, safe, yb, k, num_classes,
                                               job.batch_size, who, sequential=bool(job.probe))
            for sid, c, why, fail, d in zip(ids, counts.tolist(), viol.per_sample, failed,
                                            dist.tolist(), strict=True):
                reason = why or fail  # a threat violation was not scored at all
                outcomes.append(SampleOutcome(int(sid), 0 if reason else int(c), d, reason))
            for key, value in result.extras.items():
                extras.setdefault(key, []).append(_jsonable(value))
            if result.evidence:
                extras.setdefault("evidence", []).append(
                    evidence_lists(result.evidence, ids, f"attack {job.attack.id!r}"))
            advs.append(x_adv.float().cpu().numpy())
        x_adv_np = np.concatenate(advs) if advs else None
        # read after running: some attacks resolve their budget per defense (AutoAttack
        # "auto" picks standard or rand)
        budget = vars(attack.budget).copy() if hasattr(attack, "budget") else {}
    if t_check >= 1e-3:  # the determinism check ran in this job
        extras["randomness_check_s"] = [t_check]
    return JobResult(
        key=job.key, status="done", outcomes=outcomes, k=k,
        wall_s=time.perf_counter() - t0, grad_evals=grad_evals,
        nfe_per_pred=float(nfe * k), stochastic=stochastic, budget=budget,
        plugin_versions=versions, x_adv=x_adv_np, extras=extras,
    )
