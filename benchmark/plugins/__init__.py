"""Plug-in registries (:mod:`benchmark.plugins.builtin`) and their machinery.

A plug-in registers where it is defined::

    from benchmark.plugins import register_attack

    @register_attack("my-attack")
    class MyAttack(Attack): ...

Importing this package imports no plug-in: each registry imports its built-in plug-in modules on
its first lookup or listing.
"""

from benchmark.plugins.builtin import (
    ATTACKS,
    DATASETS,
    DEFENSES,
    THREAT_MODELS,
    TRAINERS,
    register_attack,
    register_dataset,
    register_defense,
    register_threat_model,
    register_trainer,
)
from benchmark.plugins.suggest import did_you_mean

__all__ = ["ATTACKS", "DATASETS", "DEFENSES", "THREAT_MODELS", "TRAINERS", "did_you_mean",
           "register_attack", "register_dataset", "register_defense", "register_threat_model",
           "register_trainer"]
