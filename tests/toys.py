"""Tiny models and defenses with known behaviour, shared by the attack and threat-model tests."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.api.defense import Defense


class Linear(nn.Module):
    """``logits = W flatten(x) + b``: a plain module with closed-form attack optima."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        c = weight.shape[0]
        self.bias = nn.Parameter(torch.zeros(c) if bias is None else bias.detach().clone(),
                                 requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1) @ self.weight.T + self.bias


class TinyCNN(nn.Module):
    """A random two-layer CNN (fixed seed); labels are taken from its own predictions."""

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 16, seed: int = 0
                 ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8 * (size // 2) ** 2, classes)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x * 2 - 1))
        h = F.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def smooth_images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> Tensor:
    """Images in [0, 1] with structure at every scale (upsampled noise), so warps move pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, generator=g)
    fine = torch.rand(n, channels, size, size, generator=g)
    up = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * up + 0.3 * fine).clamp(0, 1)


class NoisyLinear(Defense):
    """A stochastic defense: a linear classifier on ``x + sigma * noise``. Records the batch
    size of every forward call."""

    stochastic = True

    def __init__(self, weight: Tensor, bias: Tensor | None = None, sigma: float = 0.1) -> None:
        super().__init__()
        self.net = Linear(weight, bias)
        self.sigma = sigma
        self.num_classes = weight.shape[0]
        self.batch_sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batch_sizes.append(len(x))
        noise = torch.randn(x.shape, generator=self.generator_for(x), device=x.device)
        return self.net(x + self.sigma * noise)


class Quantized(Defense):
    """``head(purify(x))`` with ``purify`` rounding to multiples of 1/8: zero gradient
    almost everywhere, so only BPDA (identity surrogate) sees the head's gradient."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, levels: int = 8) -> None:
        super().__init__()
        self.net = Linear(weight, bias)
        self.levels = levels
        self.num_classes = weight.shape[0]

    def purify(self, x: Tensor) -> Tensor:
        return torch.round(x * self.levels) / self.levels

    def head(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.purify(x))


class Recorder(nn.Module):
    """Wraps a module and keeps a copy of every input it sees (for keep-best tests)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def load_script(name: str) -> ModuleType:
    """The module ``scripts/<name>.py`` (the scripts are not a package), loaded afresh."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread for tiny tensors (thread-pool overhead dominates on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
