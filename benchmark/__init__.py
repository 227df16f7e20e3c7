"""genbench: an adversarial-robustness benchmark for generative-model defenses."""

from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.defense import Defense
from benchmark.api.threat import ThreatModel, Violation

__all__ = ["Attack", "AttackResult", "Budget", "Defense", "ThreatModel", "Violation"]
__version__ = "0.1.0"
