"""DiffPure (Nie et al. 2022): diffuse the input to t* with the VP forward process, reverse the
VP-SDE (beta(t) = 0.1 + 19.9 t) with Euler-Maruyama steps of dt = 1e-3 back to t = 0, then
classify with a zoo classifier. t* = 0.1 (l-inf), 0.075 (l2), 0.125 (StAdv) as in DiffPure
(``run_scripts``: t = 100 / 75 / 125 of 1000), set per threat model by the suites through
``params_by_threat``. Reported on CIFAR-10 (WRN-28-10, AutoAttack rand through the adjoint):
89.02% clean, 70.64% l-inf 8/255, 78.58% l2 0.5; exact-gradient PGD-EOT (Lee & Kim 2023)
brings the l-inf number to about 47%.

Exact gradients: the reverse chain is differentiable end to end. With ``checkpoint=True`` each
Euler-Maruyama step is recomputed in the backward pass from its stored input and its noise,
so memory grows with steps x state size instead of steps x network activations. The noise of
one call (one *draw*) is a function of a per-draw seed: drawn from the harness-seeded stream
of the defense, or given as ``purify(x, seed=...)`` to replay a draw exactly. Within one call
every row of the batch has its own noise, so EOT copies stacked along the batch are
independent draws.

:func:`reverse_vp_sde` is the loop shared with ScoreAG's guided purification
(:mod:`defenses.scoreag`), which only changes the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from benchmark.api.defense import Defense
from benchmark.plugins import register_defense
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import VPSDE
from defenses.rdc import _load_denoiser

#: score(x_t, t, *context) -> grad log p_t(x_t) (possibly guided), in model space [-1, 1].
ScoreFn = Callable[..., Tensor]


def _load_classifier(classifier: str | nn.Module) -> nn.Module:
    if isinstance(classifier, nn.Module):
        return classifier
    if not isinstance(classifier, str):
        raise TypeError(f"classifier must be a zoo model name or an nn.Module, "
                        f"got {classifier!r}")
    from benchmark.zoo import load_model

    return load_model(classifier)


def euler_maruyama_steps(t_star: float, dt: float) -> int:
    """Number of reverse steps; ``dt`` must divide ``t_star``."""
    for name, v in (("t_star", t_star), ("dt", dt)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{name} must be a number, got {v!r}")
    if not 0 < t_star <= 1:
        raise ValueError(f"t_star must lie in (0, 1], got {t_star!r}")
    if not 0 < dt <= t_star:
        raise ValueError(f"dt must lie in (0, t_star={t_star}], got {dt!r}")
    n = round(t_star / dt)
    if abs(n * dt - t_star) > 1e-9 * max(1.0, t_star / dt):
        raise ValueError(f"dt={dt!r} does not divide t_star={t_star!r} "
                         f"(t_star / dt = {t_star / dt:.6g})")
    return n


def draw_noise(shape: tuple[int, ...], steps: int, seed: int, device: torch.device,
               dtype: torch.dtype) -> Tensor:
    """The noise of one draw: (steps + 1, *shape) standard normals from ``seed`` alone
    (index 0 diffuses the input to t*, index i + 1 drives reverse step i)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return torch.randn((steps + 1, *shape), generator=g, device=device, dtype=dtype)


def reverse_vp_sde(x: Tensor, noise: Tensor, *, score: ScoreFn, sde: VPSDE, t_star: float,
                   dt: float, context: tuple[Tensor, ...] = (), checkpoint: bool = True
                   ) -> Tensor:
    """Diffuse images ``x`` in [0, 1] to ``t_star`` and integrate the reverse VP-SDE to 0.

    Step i (t = t* - i dt): x <- x - (f(t) x - g(t)^2 score(x, t, *context)) dt
    + g(t) sqrt(dt) z_i, with z_i = ``noise[i + 1]``. Returns the end state mapped back to
    [0, 1] and clipped. With ``checkpoint`` and a graph to build, each step is recomputed in the
    backward pass from its input and its (replayed) noise; ``context`` tensors (ScoreAG's
    reference image) are step inputs, so gradients reach them too.
    """
    steps = noise.shape[0] - 1
    a, s = sde.alpha_sigma(torch.tensor(float(t_star), dtype=torch.float64))
    state = float(a) * (2 * x - 1) + float(s) * noise[0]
    grad_path = torch.is_grad_enabled() and (
        x.requires_grad or any(c.requires_grad for c in context))
    sqrt_dt = math.sqrt(dt)

    def step(xt: Tensor, t: Tensor, z: Tensor, *ctx: Tensor) -> Tensor:
        tt = t.to(xt.dtype).view(-1, *[1] * (xt.dim() - 1))
        f = sde.drift_coef(t).to(xt.dtype).view_as(tt)
        g2 = sde.diffusion_sq(t).to(xt.dtype).view_as(tt)
        drift = f * xt - g2 * score(xt, t, *ctx)
        return xt - drift * dt + g2.sqrt() * sqrt_dt * z

    for i in range(steps):
        t = torch.full((len(x),), t_star - i * dt, device=x.device, dtype=torch.float64)
        if grad_path and checkpoint:
            state = _checkpoint(step, state, t, noise[i + 1], *context, use_reentrant=False)
        else:
            state = step(state, t, noise[i + 1], *context)
    return ((state + 1) / 2).clamp(0, 1)


def _image_shape(denoiser: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(denoiser, "event_shape", None)
    if shape is not None:
        return tuple(int(v) for v in shape)
    c, s = getattr(denoiser, "in_channels", None), getattr(denoiser, "image_size", None)
    return (int(c), int(s), int(s)) if c is not None and s is not None else None


def probe_classifier(classifier: nn.Module, image_shape: tuple[int, ...] | None,
                     num_classes: int | None) -> int:
    """Check with one forward that ``classifier`` maps images to logits of ``num_classes``
    classes (its own ``num_classes`` attribute when not given); returns the class count."""
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    expected = num_classes or int(getattr(classifier, "num_classes", 0) or 0) or None
    if image_shape is None:
        if expected is None:
            raise ValueError("cannot probe the classifier: the denoiser declares no image shape "
                             "and no num_classes was given")
        return expected
    probe = torch.full((2, *image_shape), 0.5)
    try:
        param = next(classifier.parameters())
        probe = probe.to(param.device)
    except StopIteration:
        pass
    with torch.no_grad():
        out = classifier(probe)
    want = f"(2, {expected})" if expected else "(2, num_classes >= 2)"
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2 or (
            expected is not None and out.shape[1] != expected) or out.shape[1] < 2 or (
            not out.is_floating_point()):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"classifier {type(classifier).__name__} returned {got} on a probe "
                         f"batch of shape {(2, *image_shape)}; expected float logits of shape "
                         f"{want} for the dataset's classes")
    return int(out.shape[1])


@register_defense("diffpure")
class DiffPure(Defense):
    """DiffPure with a zoo denoiser (VP SDE) and a zoo classifier; see the module docstring.

    Keyword arguments: ``denoiser`` and ``classifier`` (zoo names or modules), ``t_star`` in
    (0, 1] (default 0.1, the paper's l-inf setting), ``dt`` dividing ``t_star`` (default 1e-3),
    ``checkpoint`` (per-step gradient checkpointing, default True) and ``num_classes`` (the
    dataset's class count; default the classifier's own ``num_classes``), checked with a probe
    forward at construction.
    """

    kind = "classifier"
    stochastic = True

    def __init__(self, *, denoiser: str | Denoiser = "digits-eps",
                 classifier: str | nn.Module = "digits-cnn", t_star: float = 0.1,
                 dt: float = 1e-3, checkpoint: bool = True, num_classes: int | None = None
                 ) -> None:
        super().__init__()
        self.steps = euler_maruyama_steps(t_star, dt)
        self.t_star, self.dt = float(t_star), float(dt)
        if not isinstance(checkpoint, bool):
            raise TypeError(f"checkpoint must be True or False, got {checkpoint!r}")
        self.denoiser = _load_denoiser(denoiser).eval()
        self.denoiser.requires_grad_(False)
        #: the zoo name of the classifier head (None for a module), so that an attack can
        #: tell which zoo model the defense ends in (ScoreAG GAT's judge must be another one)
        self.classifier_name: str | None = classifier if isinstance(classifier, str) else None
        self.classifier = _load_classifier(classifier).eval()
        self.classifier.requires_grad_(False)
        self.num_classes = probe_classifier(self.classifier, _image_shape(self.denoiser),
                                            num_classes)
        self.sde = VPSDE()
        self.use_checkpoint = checkpoint
        self.nfe_per_call = self.steps + 1  # denoiser steps + one classifier call

    # -- the score the reverse process follows (ScoreAG overrides it) ------------------------
    def score(self, x_t: Tensor, t: Tensor, x_ref: Tensor) -> Tensor:
        """Unconditional score of the denoiser (DiffPure ignores the reference image)."""
        return self.denoiser.score(x_t, t, None, schedule=self.sde)

    def draw_seed(self, x: Tensor) -> int:
        """A fresh per-draw seed from the harness-seeded stream (global RNG before reseed)."""
        g = self.generator_for(x)
        if g is None:
            return int(torch.randint(2**62, (1,)))
        return int(torch.randint(2**62, (1,), generator=g, device=g.device))

    def purify(self, x: Tensor, *, seed: int | Sequence[int] | None = None) -> Tensor:
        """One draw of the purified images; ``seed`` replays a draw (same seed, same noise).
        A sequence of ``len(x)`` seeds gives each image the noise its own seed draws for a
        batch of one, so that draws of single images can be replayed in any batch (DiffHammer
        replays, per sample, the draw it selected)."""
        if isinstance(seed, Sequence):
            if len(seed) != len(x):
                raise ValueError(f"purify got {len(seed)} seeds for a batch of {len(x)}")
            noise = torch.cat([draw_noise((1, *x.shape[1:]), self.steps, int(s), x.device,
                                          x.dtype) for s in seed], dim=1)
        else:
            seed = self.draw_seed(x) if seed is None else int(seed)
            noise = draw_noise(tuple(x.shape), self.steps, seed, x.device, x.dtype)
        return reverse_vp_sde(x, noise, score=self.score, sde=self.sde, t_star=self.t_star,
                              dt=self.dt, context=(2 * x - 1,), checkpoint=self.use_checkpoint)

    def head(self, x: Tensor) -> Tensor:
        return self.classifier(x)

    def surrogate(self) -> nn.Module:
        """BPDA's stand-in for ``purify``: the identity (DiffPure's BPDA+EOT evaluation)."""
        return nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.purify(x))

    def config(self) -> dict[str, Any]:
        return {"t_star": self.t_star, "dt": self.dt, "steps": self.steps,
                "checkpoint": self.use_checkpoint, "num_classes": self.num_classes}

    def extra_repr(self) -> str:
        own = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{own}, " + super().extra_repr()
