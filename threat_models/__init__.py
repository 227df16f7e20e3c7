"""Threat models: l-inf, l2, low-frequency l-inf, StAdv (spatial flow) and unrestricted (pixel
box only)."""

from threat_models.l2 import L2Threat
from threat_models.linf import LinfThreat
from threat_models.lowfreq import LowFreqThreat
from threat_models.stadv import StAdvThreat
from threat_models.unrestricted import UnrestrictedThreat

__all__ = ["LinfThreat", "L2Threat", "LowFreqThreat", "StAdvThreat", "UnrestrictedThreat"]
