"""Building defense plug-ins from job specs, once each."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import nn

from benchmark.plugins.builtin import DEFENSES

__all__ = ["DefenseCache", "PluginOutputError"]


class PluginOutputError(RuntimeError):
    """A defense returned output of the wrong shape, dtype or with non-finite values."""


class DefenseCache:
    """Defenses built from their specs, each once per (name, parameters, device).

    An executor owns one (a worker process one of its own), so a run builds each defense
    once; nothing is module-global."""

    def __init__(self) -> None:
        self.defenses: dict[tuple[Any, ...], nn.Module] = {}

    def get(self, name: str, kwargs: Mapping[str, Any], device: torch.device, *,
            key: Hashable) -> nn.Module:
        """The defense registered as ``name`` built with ``kwargs`` on ``device`` (once per
        ``(name, key, device)``; ``key`` is the hashable form of ``kwargs``), in eval mode with
        its parameters frozen."""
        key = (name, key, str(device))
        if key not in self.defenses:
            factory = DEFENSES.get(name)
            module = factory(**kwargs)
            if not isinstance(module, nn.Module):
                raise PluginOutputError(
                    f"defense {name!r} built a {type(module).__name__}, "
                    "expected a torch.nn.Module")
            module = module.to(device).eval()
            module.requires_grad_(False)
            self.defenses[key] = module
        return self.defenses[key]
