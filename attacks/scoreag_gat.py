"""ScoreAG's generative adversarial transformation, GAT (Kollovieh et al., "Assessing Robustness
via Score-Based Adversarial Image Generation", arXiv 2310.04285, 2023, section 3.2): an
*unrestricted* attack that re-generates the test image.

The test image is diffused to t* and the reverse SDE follows the unconditional score plus two
guidance terms on the one-step estimate x0_hat(x_t) (:func:`defenses.scoreag.guided_score`):

* semantic, scale ``s_x``: grad ( -||x0_hat - x||^2 ), keeps the image's content;
* classifier, scale ``s_y``: grad log p_f(y~ | x0_hat), the paper's *targeted* form
  (p_t(f(x0) = y~ | x_t)) toward a wrong class y~; here f is the attacked defense's own
  differentiable forward (exact gradients through a purification defense), and y~ is the
  defense's runner-up class on the clean image (``target="runner-up"``) or a uniformly random
  wrong class (``target="random"``).

Success needs both: the defense misclassifies the generated image, and an independent
``judge`` classifier (default the adversarially trained ``digits-cnn-at``; any zoo model, or a
registered defense such as ``dc``) still gives the true class, a stand-in for the paper's human
study that semantics are preserved. Where the judge does *not* keep the true class the attack
returns the clean image (the attack failed there), so the harness can never count such an
example as a success; ``extras["judge_agree"]`` records the judge per sample. ``extras`` also
carry the l2 distance and the SSIM (Wang et al. 2004, Gaussian window) to the original.

Defaults are digits-scale choices (the text available here has no numeric GAT settings and no
code exists): VP SDE from t* = 0.3 with dt = 0.01 (30 steps), s_x = 5, s_y = 5 (on 16 digits
against digits-cnn: 69% success, judge digits-cnn-at agreeing on 88%, mean SSIM 0.92).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks._ascent import check_choice
from benchmark.api.attack import Attack, AttackResult
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import VPSDE
from defenses.diffpure import draw_noise, euler_maruyama_steps, reverse_vp_sde
from defenses.rdc import _load_denoiser
from defenses.scoreag import check_scale, guided_score

TARGETS = ("runner-up", "random")


def ssim(x: Tensor, y: Tensor, *, window: int = 7, sigma: float = 1.5, data_range: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-sample SSIM (Wang et al. 2004) of image batches (B, C, H, W): a Gaussian-weighted
    ``window`` x ``window`` window (std ``sigma``; Wang et al. use 11 x 11 and 1.5, 7 fits 16 px
    images), population statistics, constants (k1 L)^2 and (k2 L)^2, the map averaged over
    the valid positions and the channels. SSIM(x, x) = 1."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got {window!r}")
    if window > min(x.shape[-2:]):
        raise ValueError(f"window {window} is larger than the images {tuple(x.shape[-2:])}")
    c = x.shape[1]
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    w2 = torch.outer(g, g)
    kernel = (w2 / w2.sum()).expand(c, 1, window, window)

    def filt(v: Tensor) -> Tensor:
        return F.conv2d(v, kernel, groups=c)

    mx, my = filt(x), filt(y)
    vxx, vyy, vxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vxx + vyy + c2))
    return smap.flatten(1).mean(dim=1)


def ssim_window(x: Tensor) -> int:
    """Wang et al.'s window capped at 7 and at the largest odd size the images allow."""
    side = min(x.shape[-2:])
    return max(1, min(7, side if side % 2 else side - 1))


def load_judge(judge: str | nn.Module) -> nn.Module:
    """A zoo classifier by name, a registered defense by name (e.g. ``dc``), or a module."""
    if isinstance(judge, nn.Module):
        return judge.eval()
    if not isinstance(judge, str):
        raise TypeError(f"judge must be a zoo model or defense name, or an nn.Module, "
                        f"got {judge!r}")
    from benchmark.zoo import list_models, load_model

    if judge in list_models():
        return load_model(judge).eval()
    from benchmark.plugins.builtin import DEFENSES

    return DEFENSES.get(judge)().eval()


@register_attack("scoreag-gat")
class ScoreAGGAT(Attack):
    """GAT under the ``unrestricted`` threat model; see the module docstring."""

    name: ClassVar[str] = "scoreag-gat"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier", "differentiable"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"unrestricted"})

    def __init__(self, *, denoiser: str | Denoiser = "digits-eps",
                 judge: str | nn.Module = "digits-cnn-at",
                 t_star: float = 0.3, dt: float = 0.01, s_x: float = 5.0, s_y: float = 5.0,
                 target: str = "runner-up") -> None:
        self.steps = euler_maruyama_steps(t_star, dt)
        self.t_star, self.dt = float(t_star), float(dt)
        self.s_x = check_scale(s_x, "s_x")
        self.s_y = check_scale(s_y, "s_y")
        self.target = check_choice(target, "target", TARGETS)
        if not isinstance(denoiser, str | Denoiser):
            raise TypeError(f"denoiser must be a zoo model name, got {denoiser!r}")
        self.denoiser = denoiser
        if not isinstance(judge, str | nn.Module):
            raise TypeError(f"judge must be a zoo model or defense name, got {judge!r}")
        self.judge = judge
        self._models: tuple[Denoiser, nn.Module] | None = None

    def config(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        for key in ("denoiser", "judge"):
            if not isinstance(out[key], str):
                out[key] = type(out[key]).__name__
        return out

    def _load(self, device: torch.device) -> tuple[Denoiser, nn.Module]:
        if self._models is None:
            den = _load_denoiser(self.denoiser).eval()
            den.requires_grad_(False)
            judge = load_judge(self.judge)
            judge.requires_grad_(False)
            self._models = (den, judge)
        den, judge = self._models
        return den.to(device), judge.to(device)

    def choose_target(self, logits: Tensor, y: Tensor, generator: torch.Generator | None
                      ) -> Tensor:
        """The wrong class y~ each sample is guided toward."""
        if self.target == "runner-up":
            return logits.scatter(1, y[:, None], -math.inf).argmax(dim=1)
        classes = logits.shape[1]
        offset = torch.randint(1, classes, y.shape, generator=generator, device=y.device)
        return (y + offset) % classes

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        den, judge = self._load(x.device)
        x, y = x.detach(), y.detach()
        with torch.no_grad():
            target = self.choose_target(defense(x), y, generator)

        def log_prob_target(images: Tensor) -> Tensor:
            return F.log_softmax(defense(images), dim=1).gather(1, target[:, None]).squeeze(1)

        sde = VPSDE()

        def score(x_t: Tensor, t: Tensor, x_ref: Tensor) -> Tensor:
            return guided_score(den, sde, x_t, t, x_ref=x_ref, s_x=self.s_x,
                                log_prob_target=log_prob_target, s_y=self.s_y)

        seed = int(torch.randint(2**62, (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        noise = draw_noise(tuple(x.shape), self.steps, seed, x.device, x.dtype)
        with torch.no_grad():
            x_gen = reverse_vp_sde(x, noise, score=score, sde=sde, t_star=self.t_star,
                                   dt=self.dt, context=(2 * x - 1,), checkpoint=False)
            fooled = defense(x_gen).argmax(dim=1) != y
            agree = judge(x_gen).argmax(dim=1) == y
        x_adv = torch.where(agree.view(-1, 1, 1, 1), x_gen, x)
        success = fooled & agree
        extras: dict[str, Any] = {
            "success": success.tolist(),
            "defense_fooled": fooled.tolist(),
            "judge_agree": agree.tolist(),
            "judge": self.config()["judge"],
            "target_class": target.tolist(),
            "l2": (x_gen - x).flatten(1).norm(dim=1).tolist(),
            "ssim": ssim(x_gen, x, window=ssim_window(x)).tolist(),
        }
        # one guided step = one denoiser evaluation plus one defense forward+backward
        return AttackResult(x_adv.detach(), params=None, grad_evals=self.steps, extras=extras)
