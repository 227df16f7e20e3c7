"""Expectation over Transformation (Athalye et al. 2018) for stochastic defenses.

Gradient attacks here take an ``eot_draws`` parameter: each sample is repeated ``eot_draws``
times along the batch dimension and passed through the defense in *one* forward, and the
per-sample loss is the mean over the draws. :class:`EOT` is the registry-facing wrapper that
builds any such attack by name with a given number of draws:

    EOT(attack="pgd", draws=20, steps=200, loss="margin")

A draw-averaged iterate counts as a success only if the *majority* of its draws misclassify,
never on one lucky draw.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attacks._ascent import check_positive_int
from attacks.losses import Loss
from benchmark.api.attack import Attack, AttackResult, AttackTraits, Budget, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import register_attack


def accepts(cls: Callable[..., Any], param: str) -> bool:
    """Whether ``cls(...)`` accepts the keyword ``param`` (explicitly or through ``**kwargs``)."""
    sig = inspect.signature(cls)
    return param in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def evaluate_draws(forward: Forward, x_adv: Tensor, y: Tensor, loss: Loss, draws: int
                   ) -> tuple[Tensor, Tensor]:
    """One batched forward of ``draws`` copies of every sample.

    Returns the per-sample loss averaged over the draws (B,) and the per-sample success
    (B,) bool: strictly more than half of the draws misclassify (any draw when ``draws == 1``).
    Non-finite losses never count as successes.
    """
    b = x_adv.shape[0]
    rep = x_adv.repeat_interleave(draws, dim=0) if draws > 1 else x_adv
    y_rep = y.repeat_interleave(draws) if draws > 1 else y
    logits = forward(rep)
    if logits.dim() != 2 or logits.shape[0] != b * draws:
        raise RuntimeError(f"the defense returned shape {tuple(logits.shape)} for a batch of "
                           f"{b * draws}; expected logits of shape ({b * draws}, num_classes)")
    losses = loss(logits, y_rep).view(b, draws).mean(dim=1)
    wrong = (logits.argmax(dim=1) != y_rep).view(b, draws).float().mean(dim=1) > 0.5
    return losses, wrong & torch.isfinite(losses)


class WrappedAttack(Attack):
    """An attack that runs a registered inner attack built with one extra keyword (EOT's
    ``eot_draws``, BPDA's ``forward`` hook); budget and requirements are the inner attack's."""

    _inner: Attack

    def _build_inner(self, attack: str, keyword: str, value: Any,
                     inner_params: dict[str, Any]) -> Attack:
        from benchmark.plugins.builtin import ATTACKS

        cls: Callable[..., Attack] = ATTACKS.get(attack)
        if not accepts(cls, keyword):
            raise TypeError(f"attack {attack!r} ({getattr(cls, '__name__', cls)}) takes no "
                            f"{keyword} parameter, so {type(self).__name__} cannot wrap it")
        self.attack = attack
        self.inner_params = dict(inner_params)
        self._inner = cls(**{keyword: value}, **inner_params)
        return self._inner

    @property
    def inner(self) -> Attack:
        return self._inner

    @classmethod
    def traits(cls, params: Mapping[str, Any]) -> AttackTraits:
        """The inner attack's gradient kind (this wrapper's own, if it declares one)."""
        from benchmark.plugins.traits import attack_traits

        inner = str(params.get("attack", "pgd"))
        rest = {k: v for k, v in params.items() if k != "attack"}
        gradient = cls.gradient if "gradient" in vars(cls) else attack_traits(inner, rest).gradient
        return AttackTraits(gradient=gradient, diagnostic=cls.diagnostic, wraps=inner)

    @property
    def budget(self) -> Budget:
        return self._inner.budget


@register_attack("eot")
class EOT(WrappedAttack):
    """Any gradient attack with an ``eot_draws`` parameter, run with ``draws`` draws per step.

    ``EOT(attack="pgd", draws=20, **inner_params)`` builds ``ATTACKS[attack](eot_draws=draws,
    **inner_params)``; the requirements, threat models and budget are the inner attack's.
    """

    name = "eot"

    def __init__(self, *, attack: str = "pgd", draws: int = 20, **inner_params: Any) -> None:
        self.draws = check_positive_int(draws, "draws")
        if "eot_draws" in inner_params:
            raise TypeError("EOT takes the number of draws as draws=, not eot_draws=")
        self._build_inner(attack, "eot_draws", self.draws, inner_params)

    def config(self) -> dict[str, Any]:
        # Flat, so that EOT(**config()) rebuilds the attack; hooks (callables) are not config.
        extra = {k: v for k, v in self.inner_params.items() if not callable(v)}
        return {"attack": self.attack, "draws": self.draws, **extra}

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        return self._inner.incompatibility(defense, threat)

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        return self._inner.run(defense, x, y, threat, generator=generator)
