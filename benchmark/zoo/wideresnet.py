"""WideResNets as RobustBench defines them, so that its public CIFAR-10 state dicts load as is.

Two architectures, each with the parameter names of its RobustBench source, so a checkpoint's
keys match without renaming (``robustbench/model_zoo/architectures/``):

* :class:`WideResNet` (``wide_resnet.py``, after TRADES): pre-activation BasicBlocks
  (BN-ReLU-conv, BN-ReLU-conv), keys ``conv1.weight``, ``block1.layer.0.bn1.weight``,
  ``block1.layer.0.convShortcut.weight``, ..., ``bn1.*``, ``fc.weight``/``fc.bias``. WRN-28-10
  (``depth=28, widen_factor=10``) is RobustBench's ``Standard`` CIFAR-10 model and most 28-10
  entries. ``sub_block1=True`` adds RobustBench's unused ``sub_block1`` (some checkpoints carry
  its weights). dropRate is 0 (evaluation: dropout is off anyway).
* :class:`DMWideResNet` (``dm_wide_resnet.py``, DeepMind's): keys ``init_conv.weight``,
  ``layer.0.block.0.batchnorm_0.weight``, ..., ``batchnorm.*``, ``logits.*``; ``activation``
  ``"swish"`` for the 70-16 models (Gowal et al. 2020, Rebuffi et al. 2021), ``"relu"`` else.

Both take images in [0, 1] and normalize inside: ``(x - mean) / std``, with mean and std
non-persistent buffers (not in the state dict, as in RobustBench). :class:`WideResNet`'s default
is no normalization (mean 0, std 1: what ``Standard`` expects); :class:`DMWideResNet`'s default
is CIFAR-10's mean and std, as in RobustBench. ``num_classes`` is stored, so defenses read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DMWideResNet", "WideResNet", "wrn_28_10",
           "wrn_70_16"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _stats(value: float | Sequence[float], channels: int, what: str) -> Tensor:
    v = torch.as_tensor(value, dtype=torch.float32).flatten()
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise ValueError(f"{what} must be one number or {channels} (one per channel), "
                         f"got {list(v.tolist())}")
    if what == "std" and bool((v <= 0).any()):
        raise ValueError(f"std must be > 0, got {list(v.tolist())}")
    return v.reshape(channels, 1, 1).clone()


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, 34, "
                         f"70, ...), got {depth!r}")
    return (depth - 4) // 6


class BasicBlock(nn.Module):
    """RobustBench's pre-activation block (names kept: bn1, conv1, bn2, conv2, convShortcut)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes  # noqa: N815 (RobustBench's name)
        self.convShortcut = (None if self.equalInOut  # noqa: N815
                             else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(act) + out  # the shortcut sees the activated input


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """RobustBench's ``WideResNet`` (``depth``, ``widen_factor``) with normalization inside.

    Images (B, 3, 32, 32) in [0, 1] -> logits (B, num_classes). See the module docstring.
    """

    mean: Tensor  # buffers (declared for type checkers)
    std: Tensor

    def __init__(self, *, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 sub_block1: bool = False, bias_last: bool = True,
                 mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = _check_depth(depth)
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = int(num_classes)
        self.register_buffer("mean", _stats(mean, in_channels, "mean"), persistent=False)
        self.register_buffer("std", _stats(std, in_channels, "std"), persistent=False)
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes, bias=bias_last)
        self.nChannels = ch[3]  # noqa: N815

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1((x - self.mean) / self.std)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(8) at 32x32
        return self.fc(out)


class _Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "swish": _Swish}


class _DMBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 act: type[nn.Module]) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if self.has_shortcut else None)
        self._stride = stride

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        # TensorFlow's "SAME" padding, as DeepMind's original
        v = F.pad(act, (1, 1, 1, 1) if self._stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(act) if self.shortcut is not None else x) + out


class _DMBlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int,
                 act: type[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            _DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                     act) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """RobustBench's ``DMWideResNet`` (``depth``, ``width``, ``activation``): see the module
    docstring. Images in [0, 1] -> logits; normalization by ``mean``/``std`` inside."""

    mean: Tensor  # buffers (declared for type checkers)
    std: Tensor

    def __init__(self, *, depth: int = 28, width: int = 10, num_classes: int = 10,
                 activation: str = "relu", mean: float | Sequence[float] = CIFAR10_MEAN,
                 std: float | Sequence[float] = CIFAR10_STD, padding: int = 0,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = _check_depth(depth)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {activation!r}")
        act = _ACTIVATIONS[activation]
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes = int(num_classes)
        self.padding = int(padding)
        self.register_buffer("mean", _stats(mean, in_channels, "mean"), persistent=False)
        self.register_buffer("std", _stats(std, in_channels, "std"), persistent=False)
        self.init_conv = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(_DMBlockGroup(n, ch[0], ch[1], 1, act),
                                   _DMBlockGroup(n, ch[1], ch[2], 2, act),
                                   _DMBlockGroup(n, ch[2], ch[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = act()
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]

    def forward(self, x: Tensor) -> Tensor:
        if self.padding > 0:
            x = F.pad(x, (self.padding,) * 4)
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = self.relu(self.batchnorm(out))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn_28_10(**kwargs: object) -> WideResNet:
    """WRN-28-10 as RobustBench's ``Standard`` (no normalization unless ``mean``/``std``)."""
    return WideResNet(**{"depth": 28, "widen_factor": 10, **kwargs})  # type: ignore[arg-type]


def wrn_70_16(**kwargs: object) -> DMWideResNet:
    """WRN-70-16 as RobustBench's DeepMind models (Swish, CIFAR-10 normalization inside)."""
    return DMWideResNet(**{"depth": 70, "width": 16, "activation": "swish",  # type: ignore[arg-type]
                           **kwargs})
