"""Exact-gradient attack on purification defenses: PGD differentiating *through* ``purify``.

For RDC this is the "exact gradient" attack (Chen et al., ICML 2024, table 3): the gradient of the
classifier loss is taken through the likelihood-maximization steps, which needs second-order
derivatives (the defense builds the graph with ``create_graph=True`` when its input requires
grad). The paper could only afford N = 1 step on CIFAR-10 (69.53%); BPDA (N = 1) gave 69.92%.
"""

from __future__ import annotations

from typing import ClassVar

from attacks.pgd import PGD
from benchmark.plugins import register_attack


@register_attack("exact")
class Exact(PGD):
    """PGD with the exact gradient of the whole defense (``purify`` included)."""

    name: ClassVar[str] = "exact"
    requires = frozenset({"kind:classifier", "purify", "differentiable"})
