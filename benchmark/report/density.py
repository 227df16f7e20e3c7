"""Leaderboard metrics of density defenses (genbench issue 6; docs/design.md 4.6, 5.4, 5.5).

A density defense *accepts* an image when its log-likelihood is at least the threshold that
accepts 95% of the clean test images: the 5% quantile of their log p, by numpy's default
``linear`` interpolation (Hyndman and Fan's type 7). Per (defense, attack, threat model,
epsilon) row:

* ``accepted`` (in-distribution attacks, ``direction = "lower"``): the fraction of attacked
  test images still accepted; ``rejected`` (out-of-distribution attacks, ``direction =
  "raise"``): the fraction of attacked points (e.g. uniform noise made likely) still rejected.
  Both with 95% Wilson intervals, conditional on the threshold. A sample whose adversarial
  example broke the threat model counts as a success of the attack (never as a robust point);
  the row's ``n_errors`` counts them;
* ``nll_bpd_before`` / ``nll_bpd_after``: mean negative log-likelihood in bits/dim of the
  attack's start and of its adversarial examples (the latter over the samples within the
  threat model), with 95% percentile-bootstrap intervals (2000 resamples, fixed seed 0);
* ``threshold_logp`` (and ``threshold_bpd``), with a distribution-free 95% interval from the
  order statistics of the clean log p (exact binomial; an end is infinite when n is too small);
* ``complexity_before`` / ``complexity_after``: mean PNG complexity.

The clean row of a defense (``attack = "clean"``) carries the threshold, the NLL of the test
images and the fraction of them accepted (about 95% by construction).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from benchmark.report.cells import code_versions, mixed_code, plugin_versions
from benchmark.report.stats import binom_cdf, wilson_interval
from benchmark.spec.jobs import CLEAN

if TYPE_CHECKING:
    from benchmark.spec.plan import Plan
    from benchmark.store import Store

__all__ = [
    "ACCEPT_FRACTION", "DENSITY_COLUMNS", "DensityData", "acceptance_threshold",
    "bootstrap_mean_interval", "density_flags", "density_rows", "load_density",
    "quantile_interval",
]

#: fraction of the clean test images the threshold accepts.
ACCEPT_FRACTION = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

#: leaderboard columns of density rows (empty on classifier rows, and vice versa).
DENSITY_COLUMNS = [
    "defense_kind", "direction", "start", "threshold_logp", "threshold_ci_low",
    "threshold_ci_high", "threshold_bpd", "accepted", "accepted_ci_low", "accepted_ci_high",
    "rejected", "rejected_ci_low", "rejected_ci_high", "nll_bpd_before", "nll_bpd_before_ci_low",
    "nll_bpd_before_ci_high", "nll_bpd_after", "nll_bpd_after_ci_low", "nll_bpd_after_ci_high",
    "nll_bpd_change", "nll_bpd_change_ci_low", "nll_bpd_change_ci_high",
    "complexity_before", "complexity_after",
]

DIRECTIONS = ("lower", "raise")


def _finite_1d(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite, got {int((~np.isfinite(arr)).sum())} "
                         "non-finite values")
    return arr


def acceptance_threshold(logp: Any, *, accept: float = ACCEPT_FRACTION) -> float:
    """The log p that accepts the fraction ``accept`` of ``logp``: its ``1 - accept`` quantile
    with linear interpolation (numpy's default). ``nan`` for no values."""
    if not 0 < accept < 1:
        raise ValueError(f"accept must be in (0, 1), got {accept!r}")
    arr = _finite_1d(logp, "logp")
    if arr.size == 0:
        return math.nan
    return float(np.quantile(arr, 1 - accept, method="linear"))


def quantile_interval(values: Any, q: float, *, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval [x_(l), x_(u)] for the ``q`` quantile from order statistics:
    the largest ``l`` with P(B < l) <= (1 - level) / 2 and the smallest ``u`` with
    P(B >= u) <= (1 - level) / 2, B ~ Binomial(n, q). An end with no such order statistic is
    infinite (too few samples for that tail)."""
    if not 0 < q < 1 or not 0 < level < 1:
        raise ValueError(f"q and level must be in (0, 1), got q={q!r}, level={level!r}")
    x = np.sort(_finite_1d(values, "values"))
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2
    cdf = binom_cdf(n, q)  # cdf[k] = P(B <= k)
    # x_(r) (1-based) lies below the quantile with probability P(B >= r) = 1 - cdf[r - 1]
    lows = [r for r in range(1, n + 1) if cdf[r - 1] <= tail]
    highs = [r for r in range(1, n + 1) if 1 - cdf[r - 1] <= tail]
    lo = x[max(lows) - 1] if lows else -math.inf
    hi = x[min(highs) - 1] if highs else math.inf
    return (float(lo), float(hi))


def bootstrap_mean_interval(values: Any, *, level: float = 0.95,
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                            ) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval (``resamples``
    resamples from ``numpy.random.default_rng(seed)``, so tables are reproducible). NaN values
    are dropped; fewer than two values give a NaN interval."""
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size < 2:
        return (mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // arr.size)  # bounded memory for large n
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (mean, float(min(lo, mean)), float(max(hi, mean)))


# -- from the store ----------------------------------------------------------------------

DefenseKey = tuple[str, str]  # (defense id, canonical JSON of its parameters)
RowKey = tuple[str, str, str, str, float]  # (defense id, params, attack id, threat, eps)


@dataclass
class Samples:
    """Per-sample arrays of one leaderboard row, aligned and ordered by sample id."""

    sample_ids: np.ndarray
    logp_before: np.ndarray
    bpd_before: np.ndarray
    complexity_before: np.ndarray
    logp_after: np.ndarray
    bpd_after: np.ndarray
    complexity_after: np.ndarray
    #: subsampled attack curves (n, points) or None; ``curve_steps`` their curve indices.
    curves: np.ndarray | None = None
    curve_steps: np.ndarray | None = None


@dataclass
class DensityData:
    """Density numbers of a run's density jobs, grouped by leaderboard row."""

    clean: dict[DefenseKey, Samples] = field(default_factory=dict)
    cells: dict[RowKey, Samples] = field(default_factory=dict)
    #: row -> its jobs (store dicts, with spec, budget, extras ...)
    jobs: dict[RowKey, list[dict[str, Any]]] = field(default_factory=dict)
    clean_jobs: dict[DefenseKey, list[dict[str, Any]]] = field(default_factory=dict)
    #: row -> "lower" / "raise"
    direction: dict[RowKey, str | None] = field(default_factory=dict)
    start: dict[RowKey, str | None] = field(default_factory=dict)


def _dkey(job: dict[str, Any]) -> DefenseKey:
    import json

    return job["spec"]["defense"]["id"], json.dumps(job["spec"]["defense_params"],
                                                     sort_keys=True)


def _stack(rows: list[dict[str, Any]], steps: np.ndarray | None) -> Samples:
    rows = sorted(rows, key=lambda r: r["sample_id"])

    def col(name: str) -> np.ndarray:
        return np.array([r[name] for r in rows], dtype=np.float64)

    curves = None
    if steps is not None and rows and all(r["curve"] is not None and len(r["curve"]) == len(steps)
                                          for r in rows):
        curves = np.stack([r["curve"] for r in rows])
    return Samples(np.array([r["sample_id"] for r in rows], dtype=np.int64), col("logp_before"),
                   col("bpd_before"), col("complexity_before"), col("logp_after"),
                   col("bpd_after"), col("complexity_after"), curves,
                   steps if curves is not None else None)


def load_density(store: Store, plan: Plan) -> DensityData:
    """The density jobs of ``plan`` (defenses whose kind is "density") from ``store``."""
    dens = {d for d, k in plan.kinds.items() if k == "density"}
    jobs = store.jobs_of(j for j in plan.jobs if j.defense.id in dens)
    per_job = store.density(j["key"] for j in jobs if j["status"] == "done")
    data = DensityData()
    clean_rows: dict[DefenseKey, list[dict[str, Any]]] = defaultdict(list)
    cell_rows: dict[RowKey, list[dict[str, Any]]] = defaultdict(list)
    steps_of: dict[RowKey, np.ndarray | None] = {}
    for job in jobs:
        dkey = _dkey(job)
        rows = per_job.get(job["key"], [])
        if job["attack"] == CLEAN:
            data.clean_jobs.setdefault(dkey, []).append(job)
            clean_rows[dkey] += rows
            continue
        rkey: RowKey = (*dkey, job["attack"], job["threat"], float(job["eps"]))
        data.jobs.setdefault(rkey, []).append(job)
        cell_rows[rkey] += rows
        info = plan.attack_info.get(job["attack"], {})
        extras = job["extras"]
        data.direction.setdefault(rkey, info.get("direction"))
        data.start.setdefault(rkey, info.get("start"))
        if job["status"] == "done":
            data.direction[rkey] = extras.get("direction", data.direction[rkey])
            data.start[rkey] = extras.get("start", data.start[rkey])
            steps = extras.get("curve_steps")
            arr = np.asarray(steps, dtype=np.int64) if steps is not None else None
            prev = steps_of.get(rkey, arr)
            same = prev is not None and arr is not None and np.array_equal(prev, arr)
            steps_of[rkey] = arr if same or rkey not in steps_of else None
    for dkey, rows in clean_rows.items():
        data.clean[dkey] = _stack(rows, None)
    for rkey, rows in cell_rows.items():
        data.cells[rkey] = _stack(rows, steps_of.get(rkey))
    for rkey in data.jobs:
        data.cells.setdefault(rkey, _stack([], None))
    return data


# -- leaderboard rows --------------------------------------------------------------------

def _errors(jobs: list[dict[str, Any]]) -> list[str]:
    return [str(j["error"]) for j in jobs if j["status"] != "done"]


def _fill_nll(row: dict[str, Any], prefix: str, bpd: np.ndarray) -> None:
    m, lo, hi = bootstrap_mean_interval(bpd)
    row.update({prefix: m, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def _fill_rate(row: dict[str, Any], name: str, hits: int, n: int) -> None:
    lo, hi = wilson_interval(hits, n)
    row.update({name: hits / n if n else math.nan, f"{name}_ci_low": lo,
                f"{name}_ci_high": hi})


def _mean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def density_rows(data: DensityData, base_row: Callable[[dict[str, Any]], dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Leaderboard rows of the density jobs: one clean row per defense configuration and one
    row per (attack, threat model, epsilon). ``base_row(spec)`` gives a row's common columns."""
    rows: list[dict[str, Any]] = []
    thresholds: dict[DefenseKey, tuple[float, str | None]] = {}
    for dkey, jobs in sorted(data.clean_jobs.items()):
        row = base_row(jobs[0]["spec"])
        s = data.clean[dkey]
        errors = _errors(jobs)
        row.update(defense=dkey[0], attack=CLEAN, defense_kind="density", n=len(s.sample_ids),
                   wall_s=sum(j["wall_s"] for j in jobs), nfe_per_pred=jobs[0]["nfe_per_pred"],
                   stochastic=bool(jobs[0]["stochastic"]), k_draws=1,
                   plugin_versions=plugin_versions(jobs), code_version=code_versions(jobs))
        if errors:
            row["error"] = "; ".join(sorted(set(errors)))
            thresholds[dkey] = (math.nan, f"clean scoring failed: {row['error']}")
        else:
            tau = acceptance_threshold(s.logp_before)
            lo, hi = quantile_interval(s.logp_before, 1 - ACCEPT_FRACTION)
            thresholds[dkey] = (tau, None)
            row.update(threshold_logp=tau, threshold_ci_low=lo, threshold_ci_high=hi,
                       threshold_bpd=_bpd_of(jobs, tau),
                       complexity_before=_mean(s.complexity_before))
            _fill_rate(row, "accepted", int((s.logp_before >= tau).sum()), len(s.logp_before))
            _fill_nll(row, "nll_bpd_before", s.bpd_before)
        rows.append(row)
    for rkey, jobs in sorted(data.jobs.items(), key=lambda kv: str(kv[0])):
        did, dparams, aid, threat, eps = rkey
        first = jobs[0]
        spec = first["spec"]
        row = base_row(spec)
        s = data.cells[rkey]
        direction = data.direction.get(rkey)
        row.update(defense=did, attack=aid, threat_model=threat, eps=eps,
                   defense_kind="density", direction=direction, start=data.start.get(rkey),
                   stochastic=bool(first["stochastic"]), k_draws=1,
                   steps=first["budget"].get("steps"), restarts=first["budget"].get("restarts"),
                   eot_draws=first["budget"].get("eot_draws"),
                   nfe_per_pred=first["nfe_per_pred"],
                   grad_evals=sum(j["grad_evals"] for j in jobs),
                   wall_s=sum(j["wall_s"] for j in jobs),
                   attack_name=spec["attack"]["name"],
                   attack_params=_json(spec["attack"]["params"]),
                   plugin_versions=plugin_versions(jobs),
                   code_version=code_versions([*jobs,
                                               *data.clean_jobs.get((did, dparams), [])]))
        errors = _errors(jobs)
        tau, clean_error = thresholds.get((did, dparams), (math.nan, "no clean job in the store"))
        if clean_error:
            errors.append(clean_error)
        if direction not in DIRECTIONS:
            errors.append(f"attack direction {direction!r} is not 'lower' or 'raise'")
        if errors:
            row["error"] = "; ".join(sorted(set(errors)))
            rows.append(row)
            continue
        n = len(s.sample_ids)
        within = ~np.isnan(s.logp_after)  # NaN after: the example broke the threat model
        row.update(n=n, n_errors=int((~within).sum()), threshold_logp=tau,
                   threshold_bpd=_bpd_of(data.clean_jobs[(did, dparams)], tau),
                   complexity_before=_mean(s.complexity_before),
                   complexity_after=_mean(s.complexity_after))
        if direction == "lower":
            _fill_rate(row, "accepted", int((within & (s.logp_after >= tau)).sum()), n)
        else:
            _fill_rate(row, "rejected", int((within & (s.logp_after < tau)).sum()), n)
        _fill_nll(row, "nll_bpd_before", s.bpd_before)
        _fill_nll(row, "nll_bpd_after", s.bpd_after)
        # paired per sample: the reporting solver's own noise (a PF-ODE's Hutchinson probes)
        # is in the spread, so a change within it is not read as a move
        _fill_nll(row, "nll_bpd_change", s.bpd_after - s.bpd_before)
        rows.append(row)
    return rows


def _bpd_of(jobs: list[dict[str, Any]], logp: float) -> float:
    """Bits/dim of a log p by the defense's convention (recorded by its clean jobs as the
    affine map ``bpd = a + b log p``)."""
    affine = jobs[0]["extras"].get("bpd_affine") if jobs else None
    if not affine or math.isnan(logp):
        return math.nan
    return float(affine[0] + affine[1] * logp)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


# -- flags -------------------------------------------------------------------------------

def survival(row: Any) -> tuple[float, float]:
    """(fraction of samples the detector still gets right, its upper interval bound)."""
    name = "accepted" if row["direction"] == "lower" else "rejected"
    return float(row[name]), float(row[f"{name}_ci_high"])


def moved_against(row: Any) -> bool:
    """Whether a density row's *reported* NLL (bits/dim, the reporting solver's) moved against
    its attack's direction from the start to the result (up for an attack that raises the
    likelihood, down for one that lowers it): the 95% interval of the paired per-sample change
    lies entirely on the wrong side of 0. A reporting solver with noise of its own (the
    PF-ODE's fresh Hutchinson probes: about 0.05 bits/dim per digit) moves the mean of an
    attack that changed nothing either way; only a move beyond that noise is flagged. Rows
    without the paired interval (fewer than two samples, or written before it existed) fall
    back to the sign of the change of the means."""
    lo, hi = row.get("nll_bpd_change_ci_low"), row.get("nll_bpd_change_ci_high")
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        return float(lo) > 0 if row["direction"] == "raise" else float(hi) < 0
    before, after = row.get("nll_bpd_before"), row.get("nll_bpd_after")
    if before is None or after is None or pd.isna(before) or pd.isna(after):
        return False
    change = float(after) - float(before)
    return change > 0 if row["direction"] == "raise" else change < 0


def density_flags(frame: pd.DataFrame) -> pd.Series:
    """Validity flags of density rows, with the classifier flags' names: ``threat_violation``,
    ``attack_error``, ``mixed_code_versions`` and ``nonmonotone_eps`` (the detector's survival
    fraction at a larger epsilon exceeds the upper Wilson bound of a smaller epsilon's; starts
    may differ between epsilons, so the test is by interval); and ``no_transfer``
    (:func:`moved_against`: the attack's objective did not transfer to the reported
    likelihood)."""
    names: dict[Any, list[str]] = {i: [] for i in frame.index}
    for i, r in frame.iterrows():
        if not pd.isna(r["n_errors"]) and r["n_errors"] > 0:
            names[i].append("threat_violation")
        if isinstance(r["error"], str) and r["error"] and r["attack"] != CLEAN:
            names[i].append("attack_error")
        if mixed_code(r):
            names[i].append("mixed_code_versions")
    ok = frame[(frame["attack"] != CLEAN) & frame["direction"].isin(DIRECTIONS)
               & (frame["accepted"].notna() | frame["rejected"].notna())]
    for idx, r in ok.iterrows():
        if moved_against(r):
            names[idx].append("no_transfer")
    for _, part in ok.groupby(["defense", "defense_params", "attack", "threat_model"],
                              dropna=False):
        lowest_upper = math.inf
        for idx, r in part.sort_values("eps").iterrows():
            value, upper = survival(r)
            if value > lowest_upper + 1e-12:
                names[idx].append("nonmonotone_eps")
            lowest_upper = min(lowest_upper, upper)
    return pd.Series({i: ";".join(v) for i, v in names.items()}, dtype=object)
