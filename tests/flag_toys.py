"""Purpose-built toy defenses (and two broken attacks) that trip the validity flags, named in
suites as ``tests.flag_toys:Class``. Each defense wraps the shipped digits CNN."""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.pgd import PGD
from benchmark.api.attack import Attack, AttackResult
from tests.plugins import NoisyDefense, _Wrapped


class Quantized(_Wrapped):
    """Rounds its input to ``levels`` gray levels: gradients are exactly zero, so white-box
    attacks stall (bad_gradients, above chance at the sanity epsilon), while Square and
    BPDA (straight-through the rounding) break it."""

    def __init__(self, model: str = "digits-cnn", levels: int = 4) -> None:
        super().__init__(model)
        self.levels = levels

    def purify(self, x: Tensor) -> Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)

    def head(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.purify(x))


class Detached(_Wrapped):
    """Detaches its input: the output does not depend on it through autograd."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach())


class VeryNoisy(NoisyDefense):
    """Adds large Gaussian noise to its input: every gradient is a different random one."""

    def __init__(self, model: str = "digits-cnn", sigma: float = 0.5) -> None:
        super().__init__(model, sigma)


class Stateful(_Wrapped):
    """A stateful query detector (Blacklight-like): a query within l-inf ``radius`` of an
    earlier query of the same job gets the earlier answer. Small steps (many-step PGD) are
    answered from the cache and never leave the clean prediction, large steps (one-step PGD)
    are answered honestly: more steps, higher accuracy."""

    def __init__(self, model: str = "digits-cnn", radius: float = 0.1) -> None:
        super().__init__(model)
        self.radius = radius
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self._keys, self._values = [], []  # one memory per job

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(len(x), -1)
        out = self.net(x)
        if self._keys:
            keys, values = torch.cat(self._keys), torch.cat(self._values)
            dist = (flat[:, None, :] - keys[None]).abs().amax(dim=2)
            close = dist < self.radius
            hit = close.any(dim=1)
            idx = close.float().argmax(dim=1)  # the earliest close query
            out = torch.where(hit[:, None], values[idx], out)
        else:
            hit = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self._keys.append(flat[~hit])
        self._values.append(out.detach()[~hit])
        return out


class Rounding(_Wrapped):
    """Rounds its input like :class:`Quantized` but declares no purification stage, so no
    BPDA runs: Square is the only attack that gets past the zero gradients."""

    def __init__(self, model: str = "digits-cnn", levels: int = 4) -> None:
        super().__init__(model)
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.round(x * (self.levels - 1)) / (self.levels - 1))


class SecretlyNoisy(_Wrapped):
    """Adds Gaussian noise from the global generator but keeps the default declaration
    ``stochastic = False``: the harness must find the randomness itself (flag
    undeclared_randomness) and score it with K draws, or one lucky draw counts as robust."""

    def __init__(self, model: str = "digits-cnn", sigma: float = 0.3) -> None:
        super().__init__(model)
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class Jittery(_Wrapped):
    """Deterministic up to float jitter (1e-7 relative, like GPU kernels run to run): not
    random, must not be flagged."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out * (1 + 1e-7 * torch.rand_like(out))


class Forgetful(Attack):
    """A broken attack that finds PGD's adversarial iterates (reports them in
    ``evidence["any_adversarial"]``) and then returns the clean images: a silent success."""

    name = "forgetful"

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        found = PGD(steps=10).run(defense, x, y, threat, generator=generator)
        return AttackResult(x_adv=x.clone(), evidence={
            "any_adversarial": found.evidence["any_adversarial"]})


class BadEvidence(Attack):
    """Reports ``evidence`` of the wrong length (``what = "length"``) or under an unknown name
    (``what = "name"``): the runner must refuse it with a message naming it."""

    name = "bad-evidence"

    def __init__(self, what: str = "length") -> None:
        self.what = what

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        if self.what == "name":
            evidence = {"made_up": torch.ones(len(x), dtype=torch.bool)}
        else:
            evidence = {"any_adversarial": torch.ones(len(x) + 1, dtype=torch.bool)}
        return AttackResult(x_adv=x.clone(), evidence=evidence)


class Rough(_Wrapped):
    """Deterministic, with a rough surface: the CNN's logits plus a term that oscillates with
    period about 1/200 of a gray level in every pixel, so 8/255 noise changes the margin by far
    more than the CNN's own (unstable predictions)."""

    def forward(self, x: Tensor) -> Tensor:
        wobble = torch.sin(2000.0 * x).flatten(1).mean(dim=1, keepdim=True)
        logits = self.net(x)
        return logits + 200.0 * wobble * torch.linspace(-1, 1, logits.shape[1], device=x.device)
