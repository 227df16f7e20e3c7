"""ScoreAG's generative adversarial transformation, GAT (Kollovieh et al., "Assessing Robustness
via Score-Based Adversarial Image Generation", arXiv 2310.04285, 2023, section 3.2): an
*unrestricted* attack that re-generates the test image.

The test image is diffused to t* and the reverse SDE follows the *class-conditional* score of
the true class y*, s_theta(x_t, t, y*) (the paper's grad log p_{t,y*}(x_t), section 3.1), plus
two guidance terms on the one-step estimate x0_hat(x_t | y*)
(:func:`defenses.scoreag.guided_score`):

* semantic, scale ``s_x``: grad ( -||x0_hat - x||^2 ), keeps the image's content;
* classifier, scale ``s_y``: grad log p_f(y~ | x0_hat), the paper's *targeted* form
  (p_t(f(x0) = y~ | x_t)) toward a wrong class y~; here f is the attacked defense's own
  differentiable forward (exact gradients through a purification defense), and y~ is the
  defense's runner-up class on the clean image (``target="runner-up"``) or a uniformly random
  wrong class (``target="random"``). On a stochastic defense the log-probability is averaged
  over ``eot_draws`` draws (EOT, Athalye et al. 2018), the copies stacked along the batch in one
  forward as in :mod:`attacks.eot`; a deterministic defense gets one draw (copies would be
  equal). The runner-up and the ``defense_fooled`` extra use the same draws (mean
  log-probabilities; fooled = strictly more than half of the draws misclassify).

The denoiser must be class-conditional (the zoo's ``digits-eps`` is); an unconditional one is
refused at construction or load unless ``class_conditional=False`` asks, by name, for the
unconditional score (not the paper's GAT; recorded in config and extras).

Success needs both: the defense misclassifies the generated image, and an independent
``judge`` classifier still gives the true class, a stand-in for the paper's human study that
semantics are preserved. The judge is never the defense's own classifier (a judge that is the
attacked head makes success impossible except through purification noise):
``judge="auto"`` (default) takes the first of ``judges`` (zoo names, default ``digits-cnn-at``
then ``digits-cnn``) that is not the defense's head, read from the defense's recorded zoo name
(undefended's ``model_name``, DiffPure's and GAP's ``classifier_name``; a defense that records
none gets the first); an explicit judge (a zoo model, a registered defense such as ``dc``, or
a module) equal to the head is refused in :meth:`ScoreAGGAT.incompatibility`. Where the judge
does *not* keep the true class the attack returns the clean image (the attack failed there), so
the harness can never count such an example as a success; ``extras["judge_agree"]`` records
the judge per sample and ``extras["judge"]`` the judge used. ``extras`` also carry the l2
distance and the SSIM (Wang et al. 2004, Gaussian window) to the original.

Defaults are digits-scale choices (the text available here has no numeric GAT settings and no
code exists): VP SDE from t* = 0.3 with dt = 0.01 (30 steps), s_x = 5, s_y = 5, EOT 4 (see
docs/design.md section 5.3 for a measured run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks._ascent import check_choice, check_positive_int
from benchmark.api.attack import Attack, AttackResult, Budget
from benchmark.api.defense import has_capability
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


#: ``judge="auto"``'s candidates, in order of preference: the adversarially trained CNN is the
#: stricter stand-in for a human, the plain one serves where the defense ends in it.
AUTO_JUDGES = ("digits-cnn-at", "digits-cnn")

#: attributes where a defense records the zoo name of the classifier it ends in.
HEAD_NAME_ATTRS = ("model_name", "classifier_name")


def head_name(defense: nn.Module) -> str | None:
    """The zoo name of the classifier ``defense`` ends in: undefended's ``model_name``,
    DiffPure's (and GAP's) ``classifier_name``; None where the defense records none."""
    for attr in HEAD_NAME_ATTRS:
        name = getattr(defense, attr, None)
        if isinstance(name, str):
            return name
    return None


def _is_head_module(judge: nn.Module, defense: nn.Module) -> bool:
    return any(judge is m for m in (defense, getattr(defense, "classifier", None),
                                    getattr(defense, "net", None)))


def draw_log_probs(defense: nn.Module, images: Tensor, draws: int) -> Tensor:
    """Log-softmax of ``draws`` draws of ``defense`` on every image, shape (B, draws, C): the
    copies are stacked along the batch (``repeat_interleave``) and passed in one forward."""
    b = images.shape[0]
    rep = images.repeat_interleave(draws, dim=0) if draws > 1 else images
    logits = defense(rep)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != b * draws:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise RuntimeError(f"the defense returned {got} for a batch of {b * draws}; expected "
                           f"logits of shape ({b * draws}, num_classes)")
    return F.log_softmax(logits, dim=1).view(b, draws, -1)


def eot_log_prob(defense: nn.Module, target: Tensor, draws: int) -> Callable[[Tensor], Tensor]:
    """images -> log p_f(target | images) averaged over ``draws`` draws of ``defense`` (B,):
    GAT's classifier term, whose gradient is the draw-averaged gradient (EOT)."""
    def log_prob(images: Tensor) -> Tensor:
        lp = draw_log_probs(defense, images, draws)
        return lp.gather(2, target.view(-1, 1, 1).expand(-1, draws, 1)).squeeze(2).mean(dim=1)

    return log_prob


@register_attack("scoreag-gat")
class ScoreAGGAT(Attack):
    """GAT under the ``unrestricted`` threat model; see the module docstring.

    Keywords: ``denoiser`` (a class-conditional zoo denoiser or module), ``judge`` ("auto", a
    zoo model or defense name, or a module), ``judges`` (auto's ordered zoo candidates),
    ``t_star``, ``dt``, ``s_x``, ``s_y``, ``target``, ``eot_draws`` (draws per guidance
    gradient on a stochastic defense; >= 1) and ``class_conditional`` (False: the unconditional
    score, a named deviation from the paper).
    """

    name: ClassVar[str] = "scoreag-gat"
    requires: ClassVar[frozenset[str]] = frozenset({"kind:classifier", "differentiable"})
    threat_models: ClassVar[frozenset[str] | None] = frozenset({"unrestricted"})

    def __init__(self, *, denoiser: str | Denoiser = "digits-eps",
                 judge: str | nn.Module = "auto", judges: Sequence[str] = AUTO_JUDGES,
                 t_star: float = 0.3, dt: float = 0.01, s_x: float = 5.0, s_y: float = 5.0,
                 target: str = "runner-up", eot_draws: int = 4,
                 class_conditional: bool = True) -> None:
        self.steps = euler_maruyama_steps(t_star, dt)
        self.t_star, self.dt = float(t_star), float(dt)
        self.s_x = check_scale(s_x, "s_x")
        self.s_y = check_scale(s_y, "s_y")
        self.target = check_choice(target, "target", TARGETS)
        self.eot_draws = check_positive_int(eot_draws, "eot_draws")
        if not isinstance(class_conditional, bool):
            raise TypeError(f"class_conditional must be True or False, got "
                            f"{class_conditional!r}")
        self.class_conditional = class_conditional
        if not isinstance(denoiser, str | Denoiser):
            raise TypeError(f"denoiser must be a zoo model name, got {denoiser!r}")
        if isinstance(denoiser, Denoiser):
            self._check_conditional(denoiser)
        self.denoiser = denoiser
        if not isinstance(judge, str | nn.Module):
            raise TypeError(f"judge must be 'auto', a zoo model or defense name, or an "
                            f"nn.Module, got {judge!r}")
        self.judge = judge
        if isinstance(judges, str) or not isinstance(judges, Sequence) or not judges or any(
                not isinstance(j, str) or not j or j == "auto" for j in judges):
            raise ValueError(f"judges must be a non-empty list of zoo model names (the "
                             f"candidates of judge='auto', in order), got {judges!r}")
        self.judges = tuple(judges)
        self._denoiser: Denoiser | None = None
        self._judge_models: dict[str, nn.Module] = {}
        self._last_draws: int | None = None

    def config(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        for key in ("denoiser", "judge"):
            if not isinstance(out[key], str):
                out[key] = type(out[key]).__name__
        out["judges"] = list(self.judges)
        return out

    @property
    def budget(self) -> Budget:
        """``steps`` guided steps; the draws of the latest run (``eot_draws`` before any)."""
        draws = self.eot_draws if self._last_draws is None else self._last_draws
        return Budget(steps=self.steps, eot_draws=draws)

    def _check_conditional(self, den: Denoiser) -> None:
        if self.class_conditional and not den.conditional:
            raise ValueError(
                f"ScoreAG GAT follows the class-conditional score of the true class "
                f"(s_theta(x_t, t, y*)), but the denoiser {type(den).__name__} is not "
                f"class-conditional; use a conditional one (the zoo's digits-eps), or pass "
                f"class_conditional=False for the unconditional score (not the paper's GAT)")

    # -- the judge ---------------------------------------------------------------------------
    def pick_judge(self, defense: nn.Module) -> str | nn.Module:
        """The judge for ``defense``: never its own classifier (``ValueError`` saying why)."""
        head = head_name(defense)
        if isinstance(self.judge, nn.Module):
            if _is_head_module(self.judge, defense):
                raise ValueError("the judge module is the attacked defense's own classifier; "
                                 "the judge must be independent (use judge='auto')")
            return self.judge
        if self.judge == "auto":
            for name in self.judges:
                if name != head:
                    return name
            raise ValueError(f"judge='auto' has no candidate other than the defense's own "
                             f"classifier {head!r} among judges={list(self.judges)}; add "
                             f"another zoo classifier to judges")
        if head is not None and self.judge == head:
            raise ValueError(f"judge {self.judge!r} is the attacked defense's own classifier "
                             f"{head!r}, so a success could only come from the defense's noise; "
                             f"use judge='auto' or another zoo classifier")
        return self.judge

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        reason = super().incompatibility(defense, threat)
        if reason is not None:
            return reason
        try:
            self.pick_judge(defense)
        except ValueError as exc:
            return f"{self.name}: {exc}"
        return None

    def _load(self, judge: str | nn.Module, device: torch.device
              ) -> tuple[Denoiser, nn.Module]:
        if self._denoiser is None:
            den = _load_denoiser(self.denoiser).eval()
            self._check_conditional(den)
            den.requires_grad_(False)
            self._denoiser = den
        if isinstance(judge, nn.Module):
            model = judge.eval()
        else:
            if judge not in self._judge_models:
                self._judge_models[judge] = load_judge(judge).requires_grad_(False)
            model = self._judge_models[judge]
        return self._denoiser.to(device), model.to(device)

    def choose_target(self, log_probs: Tensor, y: Tensor, generator: torch.Generator | None
                      ) -> Tensor:
        """The wrong class y~ each sample is guided toward (``log_probs``: (B, C), the
        defense's draw-averaged log-probabilities on the clean images)."""
        if self.target == "runner-up":
            return log_probs.scatter(1, y[:, None], -math.inf).argmax(dim=1)
        classes = log_probs.shape[1]
        offset = torch.randint(1, classes, y.shape, generator=generator, device=y.device)
        return (y + offset) % classes

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        judge_spec = self.pick_judge(defense)
        den, judge = self._load(judge_spec, x.device)
        x, y = x.detach(), y.detach()
        draws = self.eot_draws if has_capability(defense, "stochastic") else 1
        self._last_draws = draws
        with torch.no_grad():
            target = self.choose_target(draw_log_probs(defense, x, draws).mean(dim=1), y,
                                        generator)
        log_prob_target = eot_log_prob(defense, target, draws)
        labels = y if self.class_conditional else None
        sde = VPSDE()

        def score(x_t: Tensor, t: Tensor, x_ref: Tensor) -> Tensor:
            return guided_score(den, sde, x_t, t, x_ref=x_ref, s_x=self.s_x,
                                log_prob_target=log_prob_target, s_y=self.s_y, y=labels)

        seed = int(torch.randint(2**62, (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        noise = draw_noise(tuple(x.shape), self.steps, seed, x.device, x.dtype)
        with torch.no_grad():
            x_gen = reverse_vp_sde(x, noise, score=score, sde=sde, t_star=self.t_star,
                                   dt=self.dt, context=(2 * x - 1,), checkpoint=False)
            wrong = draw_log_probs(defense, x_gen, draws).argmax(dim=2) != y[:, None]
            fooled = wrong.float().mean(dim=1) > 0.5
            agree = judge(x_gen).argmax(dim=1) == y
        x_adv = torch.where(agree.view(-1, 1, 1, 1), x_gen, x)
        success = fooled & agree
        extras: dict[str, Any] = {
            "success": success.tolist(),
            "defense_fooled": fooled.tolist(),
            "judge_agree": agree.tolist(),
            "judge": judge_spec if isinstance(judge_spec, str) else type(judge_spec).__name__,
            "defense_head": head_name(defense),
            "eot_draws": draws,
            "class_conditional": self.class_conditional,
            "target_class": target.tolist(),
            "l2": (x_gen - x).flatten(1).norm(dim=1).tolist(),
            "ssim": ssim(x_gen, x, window=ssim_window(x)).tolist(),
        }
        # one guided step = one denoiser evaluation plus one defense forward+backward per draw
        return AttackResult(x_adv.detach(), params=None, grad_evals=self.steps * draws,
                            extras=extras)
