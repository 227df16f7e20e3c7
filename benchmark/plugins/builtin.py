"""The registries of genbench, with the built-in plug-ins as lazy entries.

Third-party packages add to ``DEFENSES``, ``ATTACKS`` and ``THREAT_MODELS`` through the
entry-point groups ``genbench.defenses``, ``genbench.attacks`` and ``genbench.threat_models``
(their names then appear as ``dist/name``). Suites may also name any ``module:Class`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from benchmark.api.attack import Attack
from benchmark.api.threat import ThreatModel
from benchmark.plugins.registry import ENTRY_POINT_GROUPS, Registry

DefenseFactory = Callable[..., nn.Module]

DEFENSES: Registry[DefenseFactory] = Registry(
    "defense", entry_point_group=ENTRY_POINT_GROUPS["defense"])
ATTACKS: Registry[type[Attack]] = Registry(
    "attack", entry_point_group=ENTRY_POINT_GROUPS["attack"])
THREAT_MODELS: Registry[type[ThreatModel]] = Registry(
    "threat model", entry_point_group=ENTRY_POINT_GROUPS["threat model"])
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
TRAINERS: Registry[Callable[..., Any]] = Registry("trainable model")

for _name, _ref in {
    "linf": "threat_models.linf:LinfThreat",
    "l2": "threat_models.l2:L2Threat",
    "stadv": "threat_models.stadv:StAdvThreat",
    "unrestricted": "threat_models.unrestricted:UnrestrictedThreat",
}.items():
    THREAT_MODELS.add(_name, _ref)

for _name, _ref in {
    "pgd": "attacks.pgd:PGD",
    "eot": "attacks.eot:EOT",
    "bpda": "attacks.bpda:BPDA",
    "stadv": "attacks.stadv:StAdv",
    "autoattack": "attacks.autoattack:AutoAttack",
    "torchattacks": "attacks.torchattacks_adapter:TorchAttacks",
    "exact": "attacks.exact:Exact",
    "lagrange": "attacks.lagrange:Lagrange",
    "ll-near-sample": "attacks.likelihood:NearSampleAttack",
    "ll-random-region": "attacks.likelihood:RandomRegionAttack",
    "ll-high-complexity": "attacks.likelihood:HighComplexityAttack",
    "ll-reverse": "attacks.likelihood:ReverseIntegrationAttack",
    "ll-prior-only": "attacks.likelihood:PriorOnlyAttack",
    "ll-unrestricted": "attacks.likelihood:UnrestrictedLikelihoodAttack",
    "flow-pgd-in": "attacks.flow_pgd:FlowPGDIn",
    "flow-pgd-ood": "attacks.flow_pgd:FlowPGDOOD",
    "pgd-eot": "attacks.pgd_eot:PGDEOT",
    "fixed-noise": "attacks.fixed_noise:FixedNoise",
    "scoreag-gat": "attacks.scoreag_gat:ScoreAGGAT",
}.items():
    ATTACKS.add(_name, _ref)

for _name, _ref in {
    "undefended": "defenses.baseline:Undefended",
    "dc": "defenses.rdc:DiffusionClassifier",
    "rdc": "defenses.rdc:RobustDiffusionClassifier",
    "dc-optimal": "defenses.rdc:OptimalDiffusionClassifier",
    "diffpure": "defenses.diffpure:DiffPure",
    "scoreag-gap": "defenses.scoreag:ScoreAGPurification",
    "flow": "defenses.flow:FlowDensity",
    "pfode": "defenses.pfode:PFODEDensity",
}.items():
    DEFENSES.add(_name, _ref)

for _name, _ref in {
    "digits": "benchmark.data.digits:load_digits",
    "cifar10": "benchmark.data.cifar10:load_cifar10",
}.items():
    DATASETS.add(_name, _ref)

for _name, _ref in {
    "classifier": "benchmark.train.classifier:train",
    "cnn-at": "benchmark.train.classifier:train_adversarial",
    "eps": "benchmark.train.denoiser:train",
    "realnvp": "benchmark.train.flow:train_realnvp",
    "glow": "benchmark.train.flow:train_glow",
}.items():
    TRAINERS.add(_name, _ref)
