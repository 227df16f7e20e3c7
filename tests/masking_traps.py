"""A gallery of gradient-masking traps (Athalye et al. 2018; Tramer et al. 2020), each wrapping
the honest zoo classifier ``digits-cnn``. Named in suites as ``tests.masking_traps:Class``.

None of them is more robust than the CNN it wraps: every trap classifies (almost) exactly as
the CNN does, it only hides or corrupts the gradient a white-box attack follows. A benchmark
that trusts its white-box attacks reports them as robust; genbench must flag each one and, with
its gradient-free and transfer attacks in the worst case, report about the honest CNN's
accuracy (``tests/test_masking_gallery.py``; the n = 100 table: ``scripts/masking_gallery.py``).

=====================  ===========================================================  ==========
trap                   what it does                                                  from
=====================  ===========================================================  ==========
``Quantize``           non-differentiable preprocessing: rounds to 16 gray levels   Athalye 4.1
``Reattached``         detached graph, re-attached by a zero term (no error, zero   Athalye 4.1
                       gradient)
``Shattered``          value of the CNN, gradient of a high-frequency wobble        Athalye 4.1
``Saturated``          logits x 1e4: softmax saturates, float32 cross-entropy       Carlini 2017,
                       gradients vanish on confident samples                        Tramer 2020
``SecretNoise``        Gaussian input noise, declared deterministic                  Athalye 4.2
``Squashed``           gradient scaled by 1e-45: underflows to 0 in float32          Tramer 2020
``ConfidentSwitch``    input-dependent threshold: no gradient while the CNN is       Tramer 2020
                       confident (margin above a threshold)
=====================  ===========================================================  ==========
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tests.plugins import _Wrapped

#: the honest classifier every trap wraps
HONEST = "digits-cnn"


class Quantize(_Wrapped):
    """Rounds the input to ``levels`` gray levels before the CNN (bit-depth reduction, a
    non-differentiable preprocessing step): every input gradient is exactly zero."""

    def __init__(self, model: str = HONEST, levels: int = 16) -> None:
        super().__init__(model)
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        q = self.levels - 1
        return self.net(torch.round(x * q) / q)


class Reattached(_Wrapped):
    """The CNN on a detached input, with ``0 * x`` added so that autograd does not raise:
    attacks run and see a zero gradient everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach()) + 0.0 * x.sum()


class Shattered(_Wrapped):
    """The CNN's value with the gradient of ``x + a sin(w x)`` (a, w = 0.01, 1e4): the input
    gradient is the CNN's times ``1 + 100 cos(1e4 x)``, a different sign every 3e-4."""

    def forward(self, x: Tensor) -> Tensor:
        wobble = x + 0.01 * torch.sin(1e4 * x)
        return self.net(x.detach() + (wobble - wobble.detach()))


class Saturated(_Wrapped):
    """Logits scaled by 1e4 (predictions unchanged): the softmax saturates and float32
    cross-entropy gradients vanish on every confidently classified sample."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 1e4


class SecretNoise(_Wrapped):
    """Gaussian input noise of ``sigma`` from the global generator, with the default
    declaration ``stochastic = False``."""

    def __init__(self, model: str = HONEST, sigma: float = 0.05) -> None:
        super().__init__(model)
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class _Squash(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        return grad * 1e-45  # below float32's smallest subnormal: zero


class Squashed(_Wrapped):
    """The CNN, with the gradient into its input scaled by 1e-45 (zero in float32)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(_Squash.apply(x))


class ConfidentSwitch(_Wrapped):
    """An input-dependent threshold: where the CNN's logit margin exceeds ``threshold`` the
    output is detached (no gradient), elsewhere it is the CNN's. Clean test images are
    confident, so an attack starting there sees no gradient at all."""

    def __init__(self, model: str = HONEST, threshold: float = 2.0) -> None:
        super().__init__(model)
        self.threshold = threshold

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        top2 = out.topk(2, dim=1).values
        confident = (top2[:, 0] - top2[:, 1] > self.threshold)[:, None]
        return torch.where(confident, out.detach() + 0.0 * out, out)


TRAPS = ("Quantize", "Reattached", "Shattered", "Saturated", "SecretNoise", "Squashed",
         "ConfidentSwitch")


def gallery_suite(*, eps: tuple[float, ...] = (0.1, 0.3), pgd_steps: int = 20,
                  square_queries: int = 1000, k_draws: int = 5, shard_size: int = 100,
                  extra_attacks: str = "") -> str:
    """The gallery as a suite: the honest CNN and every trap, under PGD, APGD-DLR (AutoAttack's
    scale-invariant loss), Square and a transfer attack from the honest CNN, at l-inf ``eps``."""
    defenses = [f'[[defenses]]\nid = "honest"\nname = "undefended"\n'
                f'params = {{ model = "{HONEST}" }}\n']
    defenses += [f'[[defenses]]\nid = "{t.lower()}"\nname = "tests.masking_traps:{t}"\n'
                 for t in TRAPS]
    return f"""
[suite]
name = "masking-gallery"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = {k_draws}
batch_size = 100
shard_size = {shard_size}

{chr(10).join(defenses)}
[[attacks]]
id = "pgd"
name = "pgd"
params = {{ steps = {pgd_steps}, random_start = false }}

[[attacks]]
id = "apgd-dlr"
name = "autoattack"
params = {{ attacks = ["apgd-dlr"], n_iter = {pgd_steps} }}

[[attacks]]
id = "square"
name = "autoattack"
params = {{ attacks = ["square"], n_queries = {square_queries} }}

[[attacks]]
id = "transfer"
name = "transfer"
params = {{ source = "{HONEST}", attack = "pgd", steps = {pgd_steps}, random_start = false }}
{extra_attacks}
[[threat_models]]
name = "linf"
eps = [{", ".join(f"{e:g}" for e in eps)}]
"""
