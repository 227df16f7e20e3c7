"""Normalizing flows as density defenses (Pope, Balaji & Feizi, "Adversarial robustness of
flow-based generative models", AISTATS 2020): a zoo RealNVP or Glow, trained clean,
adversarially or hybrid, scored by its exact log-likelihood under the density contract of
:mod:`benchmark.api.density`."""

from __future__ import annotations

from torch import Tensor

from benchmark.api.density import DensityDefense, check_images
from benchmark.plugins import register_defense

__all__ = ["FlowDensity"]


@register_defense("flow")
class FlowDensity(DensityDefense):
    """A zoo normalizing flow (RealNVP / Glow; clean, adversarial or hybrid training) scored by
    its exact log-likelihood (Pope, Balaji & Feizi 2020). Deterministic: dequantization noise is
    kept outside the model, so attack objectives are not random."""

    stochastic = False
    bpd_offset = 8.0

    def __init__(self, *, model: str = "digits-realnvp-clean") -> None:
        super().__init__()
        from benchmark.zoo import get_entry, load_model
        from benchmark.zoo.flows import Flow

        entry = get_entry(model)
        net = load_model(model)
        if not isinstance(net, Flow):
            raise ValueError(f"model {model!r} is a {type(net).__name__}, not a normalizing "
                             f"flow (expected one of the zoo's RealNVP / Glow entries)")
        self.model_name = model
        self.dataset = entry.dataset
        self.flow = net.eval()
        self.dim = int(net.dim)
        self.nfe_per_call = 1

    def log_prob(self, x: Tensor) -> Tensor:
        check_images(x)
        return self.flow.log_prob(x)

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, " + super().extra_repr()
