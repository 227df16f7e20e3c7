"""Jobs: the unit of work, resumption and distribution.

A job is (defense spec, attack spec or clean, threat spec, shard of sample ids) plus everything
that determines its outcome (seed, K, batch size, and what the plan resolved in code: plug-in
versions, the attack's resolved config and budget, the defense's defaults, the zoo weights'
sha256; see :mod:`benchmark.spec.fingerprint`). It is a frozen dataclass.

Its key is the sha256 of the canonical JSON of :meth:`JobSpec.key_json`: what determines the
result, and nothing else. A resumed run recognises finished work, and a changed budget, default,
plug-in version or retrained model is new work. Display labels (the suite's name, the ``id`` of
the defense and of the attack) are not in the key: they are stored with the job (``to_json``)
for tables, and renaming them in a suite relabels the stored jobs instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmark.plugins.cache import DefenseCache
from benchmark.spec.fingerprint import KEY_VERSION
from benchmark.spec.suite import NO_PARAMS, PluginSpec, canonical_json, thaw

CLEAN = "clean"


#: ``JobSpec.probe`` of the single-step probe (Carlini et al. 2019: an iterative attack must
#: beat a single-step one).
SINGLE_STEP = "single-step"


@dataclass(frozen=True)
class JobSpec:
    suite: str
    dataset: str
    dataset_params: str  # canonical JSON (benchmark.spec.suite.freeze)
    subset_id: str
    subset_hash: str
    defense: PluginSpec
    defense_params: str  # canonical JSON: the defense's params for this job's threat model
    attack: PluginSpec | None
    threat: str | None
    eps: float | None
    sample_ids: tuple[int, ...]
    seed: int
    k_draws: int
    batch_size: int
    shard: int = 0
    #: canonical JSON of what the plan resolved in code (:func:`benchmark.spec.fingerprint.
    #: resolve`): plug-in versions, attack config and budget, defense defaults, weights sha256.
    resolved: str = NO_PARAMS
    #: an automatic probe (:mod:`benchmark.spec.plan`), evidence for the flags, never a row:
    #: ``True``, the unconstrained probe (``unconstrained_probe``: the attack at an epsilon that
    #: allows any image, on a few samples); :data:`SINGLE_STEP`, the single-step probe
    #: (``single_step_probe``: the cell's first iterative white-box attack with one step).
    probe: bool | str = False

    @property
    def is_clean(self) -> bool:
        return self.attack is None

    @property
    def attack_id(self) -> str:
        return CLEAN if self.attack is None else self.attack.id

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["defense_params"] = thaw(self.defense_params)
        d["dataset_params"] = thaw(self.dataset_params)
        d["defense"] = self.defense.to_json()
        d["attack"] = None if self.attack is None else self.attack.to_json()
        d["sample_ids"] = list(self.sample_ids)
        d["resolved"] = json.loads(self.resolved)
        if not self.probe:  # ordinary jobs keep the stored form they had before probes
            del d["probe"]
        return d

    def key_json(self) -> dict[str, Any]:
        """What the key hashes: everything that determines the result, no display label
        (neither the suite's name nor the defense's or attack's ``id``)."""
        return {
            "key_version": KEY_VERSION,
            "dataset": self.dataset, "dataset_params": thaw(self.dataset_params),
            "subset_hash": self.subset_hash, "sample_ids": list(self.sample_ids),
            "shard": self.shard, "seed": self.seed, "k_draws": self.k_draws,
            "batch_size": self.batch_size,
            "defense": {"name": self.defense.name, "params": thaw(self.defense_params)},
            "attack": None if self.attack is None else {"name": self.attack.name,
                                                        "params": thaw(self.attack.params)},
            "threat": self.threat, "eps": self.eps,
            "resolved": json.loads(self.resolved),
            # only where set: the keys of ordinary jobs are those of key version 2 as before
            **({"probe": self.probe} if self.probe else {}),
        }

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.key_json()).encode()).hexdigest()

    @property
    def run_seed(self) -> int:
        """The seed of this job's randomness, derived from the suite seed and the job's key."""
        digest = hashlib.sha256(f"{self.seed}:{self.key}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def build_defense(self, cache: DefenseCache, device: torch.device) -> nn.Module:
        """This job's defense, from ``cache`` (built on first use)."""
        return cache.get(self.defense.name, thaw(self.defense_params), device,
                         key=self.defense_params)

    def settle_randomness(self, defense: nn.Module, device: torch.device) -> bool:
        """Check a classifier that declares itself deterministic on the dataset's first test
        images (the same images for every job, shard and worker) and, if it is random after
        all, mark it stochastic (:func:`benchmark.api.defense.settle_randomness`); whether it
        was. Runs the defense: the runner calls it inside a job's error handling."""
        from benchmark.api.defense import RANDOMNESS_PROBE, settle_randomness
        from benchmark.data import load_dataset

        if getattr(defense, "_randomness_settled", False):
            return bool(getattr(defense, "undeclared_randomness", False))
        test = load_dataset(self.dataset, **(thaw(self.dataset_params) or {})).test
        return settle_randomness(defense, test.x[:RANDOMNESS_PROBE].to(device))

    def label(self) -> str:
        where = "" if self.threat is None else f" {self.threat} eps={self.eps:g}"
        what = (f"{self.probe} probe" if isinstance(self.probe, str) else
                "unconstrained probe" if self.probe else f"shard {self.shard}")
        return f"{self.defense.id} / {self.attack_id}{where} [{what}]"


@dataclass
class SampleOutcome:
    sample_id: int
    correct: int  # correct draws out of k (0 for a sample whose result was invalid)
    distance: float = float("nan")
    error: str | None = None


@dataclass
class DensityOutcome:
    """Per-sample numbers of a job on a density defense (``kind = "density"``).

    A clean job fills only the ``*_before`` fields (the test image itself). An attack job
    fills "before" for the attack's start (``extras["x_start"]``: the test image, or the point
    the attack drew from its generator) and "after" for its adversarial example; "after" is NaN
    for a sample whose example broke the threat model (that sample is an error outcome). Log p
    in nats (the defense's reporting ``log_prob``), bits/dim by the defense's ``logp_to_bpd``,
    complexity by :func:`benchmark.complexity.png_complexity`. ``curve`` is the sample's attack
    objective at the steps listed in the job's ``extras["curve_steps"]`` (at most
    :data:`CURVE_POINTS` points).
    """

    sample_id: int
    logp_before: float
    bpd_before: float
    complexity_before: float
    logp_after: float = float("nan")
    bpd_after: float = float("nan")
    complexity_after: float = float("nan")
    curve: list[float] | None = None


#: most points of a per-sample attack curve kept in the store (the per-job mean keeps all).
CURVE_POINTS = 50


@dataclass
class JobResult:
    key: str
    status: str  # "done" or "error"
    outcomes: list[SampleOutcome]
    k: int
    wall_s: float
    error: str | None = None
    grad_evals: int = 0
    nfe_per_pred: float = float("nan")
    stochastic: bool = False
    budget: dict[str, Any] = field(default_factory=dict)
    plugin_versions: dict[str, str] = field(default_factory=dict)
    #: adversarial examples (float32, aligned with outcomes), kept for bundles and re-scoring.
    x_adv: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: per-sample density numbers (density defenses only; aligned with outcomes).
    density: list[DensityOutcome] | None = None
