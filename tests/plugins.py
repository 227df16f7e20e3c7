"""Toy defenses used by the harness tests, named in suites as ``tests.plugins:Class``."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmark.api.attack import Attack, AttackResult
from benchmark.api.defense import Defense
from benchmark.zoo import load_model


class _Wrapped(Defense):
    def __init__(self, model: str = "digits-cnn") -> None:
        super().__init__()
        self.net = load_model(model)
        self.num_classes = 10

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SlowDefense(_Wrapped):
    """The shipped CNN, slowed down so that a run can be killed in the middle."""

    def __init__(self, model: str = "digits-cnn", delay: float = 0.02) -> None:
        super().__init__(model)
        self.delay = delay

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.delay)
        return self.net(x)


class WrongShapeDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, :3]


class NaNDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("nan"))


class RaisingDefense(_Wrapped):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this plug-in always fails")


class NoisyDefense(_Wrapped):
    """A stochastic defense: Gaussian input noise from the seeded generator."""

    stochastic = True

    def __init__(self, model: str = "digits-cnn", sigma: float = 0.3) -> None:
        super().__init__(model)
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator_for(x), device=x.device)
        return self.net((x + self.sigma * noise).clamp(0, 1))


class OverBudget(Attack):
    """A cheating attack: perturbs by twice the budget (the harness must refuse it)."""

    name = "over-budget"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        return AttackResult(x_adv=(x + self.factor * threat.eps).clamp(0, 1))


# -- plug-ins that misbehave on purpose (tests/test_executors.py) --------------------------

def off_grid(x: Tensor) -> Tensor:
    """Per sample: whether the image left the 1/256 grid of the digits test images (an
    adversarial example does; a test image does not)."""
    q = x.reshape(len(x), -1) * 256
    return (q - q.round()).abs().amax(dim=1) > 1e-3


def in_worker() -> bool:
    """Whether this is a spawned worker process (never the test's own process)."""
    import multiprocessing as mp

    return mp.parent_process() is not None


class NaNOnAdversarial(_Wrapped):
    """Finite logits on test images, NaN on every image off their grid (adversarial ones)."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.masked_fill(off_grid(x)[:, None], float("nan"))


class RaisingOnAdversarial(_Wrapped):
    """Raises on a batch that holds an image off the test images' grid."""

    def forward(self, x: Tensor) -> Tensor:
        if off_grid(x).any():
            raise RuntimeError("cannot score perturbed images")
        return self.net(x)


class ExitingDefense(_Wrapped):
    """Calls ``sys.exit`` in forward."""

    def forward(self, x: Tensor) -> Tensor:
        import sys

        sys.exit(3)


class InterruptingDefense(_Wrapped):
    """Raises ``KeyboardInterrupt`` itself (no signal): a plug-in bug, not a Ctrl-C."""

    def forward(self, x: Tensor) -> Tensor:
        raise KeyboardInterrupt


class CtrlCDefense(_Wrapped):
    """Sends this process a real SIGINT in forward, as a Ctrl-C during the job would."""

    def forward(self, x: Tensor) -> Tensor:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here, in the main thread
        return self.net(x)


class WorkerKiller(_Wrapped):
    """Kills its worker process in forward (``how``: "exit" = ``os._exit(1)``, "kill" = SIGKILL),
    never the test's own process. With ``marker``, only while that file does not exist (it is
    created first): the worker dies once and the retry succeeds."""

    def __init__(self, model: str = "digits-cnn", how: str = "kill", marker: str = "") -> None:
        super().__init__(model)
        self.how = how
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        import os
        import signal
        from pathlib import Path

        if in_worker() and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                Path(self.marker).write_text("killed once\n")
            if self.how == "exit":
                os._exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


class HangingDefense(_Wrapped):
    """Hangs in forward (in a worker process; in the test's own process it just works)."""

    def forward(self, x: Tensor) -> Tensor:
        if in_worker():
            time.sleep(3600)
        return self.net(x)


class GlobalNoiseDefense(_Wrapped):
    """A stochastic defense that draws its noise from torch's global generator (not from
    ``generator_for``): reproducible only because the harness seeds it per job."""

    stochastic = True

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x + 0.3 * torch.randn(x.shape)).clamp(0, 1))


class BroadcastNoiseDefense(_Wrapped):
    """Draws one noise image of shape (1, ...) and broadcasts it over the batch: every row
    (and so every one of a sample's K stacked draws) sees the same noise."""

    stochastic = True

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn((1, *x.shape[1:]), generator=self.generator_for(x), device=x.device)
        return self.net((x + 0.3 * noise).clamp(0, 1))


class ShiftAttack(Attack):
    """Adds eps / 2 to every pixel without querying the defense (a valid l-inf example)."""

    name = "shift"

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        return AttackResult(x_adv=(x + threat.eps / 2).clamp(0, 1))


class RaisingAttack(Attack):
    """An attack that always raises."""

    name = "raising-attack"

    def run(self, defense, x, y, threat, *, generator=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("this attack always fails")


class SlowNoisyDefense(NoisyDefense):
    """:class:`NoisyDefense`, slowed down so that a run can be killed in the middle."""

    def __init__(self, model: str = "digits-cnn", sigma: float = 0.3, delay: float = 0.1
                 ) -> None:
        super().__init__(model, sigma)
        self.delay = delay

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.delay)
        return super().forward(x)
