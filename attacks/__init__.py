"""Attack plug-ins: PGD (any threat model, any loss, EOT), EOT and BPDA wrappers, StAdv, and
adapters over AutoAttack (``pyautoattack``, the AutoAttack of record) and torchattacks.

All attacks follow :class:`benchmark.api.attack.Attack`; they are registered lazily in
:data:`benchmark.plugins.builtin.ATTACKS`, so importing this package is only needed for direct use.
"""

from attacks.autoattack import AutoAttack
from attacks.bpda import BPDA
from attacks.eot import EOT
from attacks.losses import LOSSES, get_loss
from attacks.pgd import PGD
from attacks.stadv import StAdv
from attacks.torchattacks_adapter import TorchAttacks

__all__ = ["BPDA", "EOT", "LOSSES", "PGD", "AutoAttack", "StAdv", "TorchAttacks", "get_loss"]
