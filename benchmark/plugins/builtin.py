"""The registries of genbench; the built-in plug-ins register themselves where they are defined.

Each plug-in module decorates its plug-ins (``@register_attack("pgd")`` above ``class PGD``).
Importing this module imports none of them: each registry knows its built-in plug-in *modules*
(:data:`BUILTIN_MODULES`) and imports them on its first lookup or listing (``names()``,
``get()``, ``in``, ...).

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

__all__ = ["ATTACKS", "BUILTIN_MODULES", "DATASETS", "DEFENSES", "THREAT_MODELS", "TRAINERS",
           "DefenseFactory", "register_attack", "register_dataset", "register_defense",
           "register_threat_model", "register_trainer"]

DefenseFactory = Callable[..., nn.Module]

#: the modules whose decorators register the built-in plug-ins of each kind (imported lazily)
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "defense": ("defenses.baseline", "defenses.rdc", "defenses.diffpure", "defenses.scoreag",
                "defenses.flow", "defenses.pfode"),
    "attack": ("attacks.pgd", "attacks.eot", "attacks.bpda", "attacks.stadv",
               "attacks.autoattack", "attacks.torchattacks_adapter", "attacks.exact",
               "attacks.lagrange", "attacks.likelihood", "attacks.flow_pgd", "attacks.pgd_eot",
               "attacks.fixed_noise", "attacks.scoreag_gat", "attacks.transfer",
               "attacks.spsa", "attacks.diffhammer"),
    "threat model": ("threat_models.linf", "threat_models.l2", "threat_models.lowfreq",
                     "threat_models.stadv", "threat_models.unrestricted"),
    "dataset": ("benchmark.data.digits", "benchmark.data.cifar10"),
    "trainable model": ("benchmark.train.classifier", "benchmark.train.denoiser",
                        "benchmark.train.flow"),
}

DEFENSES: Registry[DefenseFactory] = Registry(
    "defense", entry_point_group=ENTRY_POINT_GROUPS["defense"],
    modules=BUILTIN_MODULES["defense"])
ATTACKS: Registry[type[Attack]] = Registry(
    "attack", entry_point_group=ENTRY_POINT_GROUPS["attack"],
    modules=BUILTIN_MODULES["attack"])
THREAT_MODELS: Registry[type[ThreatModel]] = Registry(
    "threat model", entry_point_group=ENTRY_POINT_GROUPS["threat model"],
    modules=BUILTIN_MODULES["threat model"])
DATASETS: Registry[Callable[..., Any]] = Registry(
    "dataset", modules=BUILTIN_MODULES["dataset"])
TRAINERS: Registry[Callable[..., Any]] = Registry(
    "trainable model", modules=BUILTIN_MODULES["trainable model"])

#: decorators for plug-in modules: ``@register_attack("pgd")`` is ``@ATTACKS.register("pgd")``
register_defense = DEFENSES.register
register_attack = ATTACKS.register
register_threat_model = THREAT_MODELS.register
register_dataset = DATASETS.register
register_trainer = TRAINERS.register
