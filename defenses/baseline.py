"""The undefended baseline: a zoo classifier with no defense around it."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.api.defense import Defense
from benchmark.plugins import register_defense
from benchmark.zoo import get_entry, load_model

__all__ = ["Undefended"]


@register_defense("undefended")
class Undefended(Defense):
    """Zoo model ``model`` as is: deterministic, one network evaluation per call.

    Every robustness number of a defense is read against this row.
    """

    kind = "classifier"
    stochastic = False
    differentiable = True

    def __init__(self, *, model: str = "digits-cnn") -> None:
        super().__init__()
        entry = get_entry(model)
        self.model_name = model
        self.net = load_model(model)
        self.nfe_per_call = 1
        num_classes = entry.arch_kwargs.get("num_classes")
        if num_classes is None:  # the network's own (the published WideResNets store it)
            num_classes = getattr(self.net, "num_classes", None)
        if num_classes is None:  # loads the dataset: a user's may live where only a suite's
            num_classes = self._probe_num_classes(entry.dataset)  # dataset_params say
        self.num_classes = int(num_classes)

    def _probe_num_classes(self, dataset: str) -> int:
        """Class count from one forward on a blank image of the model's dataset."""
        from benchmark.data import load_dataset

        shape = load_dataset(dataset).image_shape
        with torch.no_grad():
            return int(self.net(torch.zeros(1, *shape)).shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, " + super().extra_repr()
