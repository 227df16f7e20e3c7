"""Any ``torchattacks`` attack by class name, as an extra baseline.

**Never the AutoAttack of record**: torchattacks' own ``AutoAttack`` runs its APGD/FAB with
10 iterations instead of 100 and Square with ``resc_schedule=True``; leaderboard AutoAttack
numbers come from :class:`attacks.autoattack.AutoAttack` (``pyautoattack``).

``TorchAttacks(attack="PGD", steps=40, alpha=0.01)`` builds
``torchattacks.PGD(model, eps=threat.eps, steps=40, alpha=0.01)`` at run time:

* ``alpha_scale=2.5`` instead of ``alpha`` sets ``alpha = 2.5 * eps / steps`` per threat model,
  the step rule of our PGD, for cross-checks at equal budgets;

* ``eps`` (``max_epsilon`` for PIFGSM/PIFGSMPP) comes from the threat model unless given;
* ``n_classes`` (APGDT, FAB, AutoAttack) comes from the defense's logits unless given, and
  ``seed`` from the run's generator; library code drawing from torch's global generator runs
  inside :func:`torch.random.fork_rng`, seeded from the run's generator;
* the attack sees a thin view of the defense, so its ``model.eval()`` / ``train()`` toggles
  never change the defense's mode;
* the output is projected onto the threat model (a no-op up to round-off for bounded attacks).

A norm table refuses mismatches it can detect: l-inf attacks (PGD, FGSM, ...) need ``linf``,
l2 attacks (PGDL2, ...) ``l2``, ``norm=``-switched ones (APGD, FAB, Square, ...) the matching
threat model, and minimum-norm or unbounded attacks (CW, DeepFool, ...) ``unrestricted``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_real
from attacks.autoattack import DefenseView, draw_seed, rng_devices
from benchmark.api.attack import Attack, AttackResult, AttackTraits, Budget
from benchmark.api.threat import AdditiveThreatModel, ThreatModel
from benchmark.plugins import did_you_mean, register_attack

LINF_ATTACKS = frozenset({
    "FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "DIFGSM",
    "TIFGSM", "Jitter", "NIFGSM", "PGDRS", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA", "PIFGSM",
    "PIFGSMPP"})
L2_ATTACKS = frozenset({"PGDL2", "PGDRSL2"})
#: attacks whose norm is chosen by their ``norm=`` argument (default "Linf")
NORM_ARG_ATTACKS = frozenset({"APGD", "APGDT", "FAB", "Square", "AutoAttack"})
#: attacks with no budget argument (minimum-norm, l0/l1, noise): only "unrestricted" holds them
UNBOUNDED_ATTACKS = frozenset({
    "VANILA", "GN", "CW", "DeepFool", "EADL1", "EADEN", "SparseFool", "OnePixel", "Pixle",
    "JSMA"})
#: wrappers that need other attacks or data loaders, which a suite cannot pass
_WRAPPERS = frozenset({"MultiAttack", "LGV"})
_EPS_KEY = {"PIFGSM": "max_epsilon", "PIFGSMPP": "max_epsilon"}
_NORM_NAMES = {"Linf": "linf", "L2": "l2", "L1": "l1"}


def _attack_names() -> list[str]:
    import torchattacks

    return [n for n in torchattacks.__all__ if n not in _WRAPPERS]


@register_attack("torchattacks")
class TorchAttacks(Attack):
    """A torchattacks attack by name (an extra baseline; see the module docstring)."""

    name: ClassVar[str] = "torchattacks"

    @classmethod
    def traits(cls, params: Mapping[str, Any]) -> AttackTraits:
        square = str(params.get("attack", "PGD")).lower() == "square"
        return AttackTraits(gradient="none" if square else "exact")

    def __init__(self, *, attack: str = "PGD", alpha_scale: float | None = None,
                 **kwargs: Any) -> None:
        import torchattacks

        names = _attack_names()
        if attack not in names:
            tip = did_you_mean(str(attack), names, n=3, cutoff=0.5)
            raise ValueError(f"unknown torchattacks attack {attack!r}{tip} "
                             f"(known: {', '.join(sorted(names))})")
        if "model" in kwargs:
            raise TypeError("the model is the defense; do not pass model=")
        cls = getattr(torchattacks, attack)
        try:
            inspect.signature(cls).bind(None, **kwargs)
        except TypeError as exc:
            raise TypeError(f"torchattacks.{attack}: {exc}") from None
        if alpha_scale is not None:
            if "alpha" in kwargs or "alpha" not in inspect.signature(cls).parameters:
                raise TypeError(f"alpha_scale sets torchattacks.{attack}'s alpha from the "
                                "threat model; it needs an attack with an 'alpha' parameter "
                                "and no explicit alpha")
            check_real(alpha_scale, "alpha_scale", low=0.0, low_open=True,
                       expected="a number > 0")
        self.attack = attack
        self.alpha_scale = None if alpha_scale is None else float(alpha_scale)
        self.kwargs = dict(kwargs)

    def _signature(self) -> inspect.Signature:
        import torchattacks

        return inspect.signature(getattr(torchattacks, self.attack))

    def _value(self, *names: str, default: int = 1) -> int:
        params = self._signature().parameters
        for n in names:
            if n in self.kwargs:
                return int(self.kwargs[n])
            if n in params and params[n].default is not inspect.Parameter.empty:
                return int(params[n].default)
        return default

    @property
    def budget(self) -> Budget:
        return Budget(
            steps=self._value("steps", "nb_iter", "num_iter_set", "max_iterations", "n_queries"),
            restarts=self._value("n_restarts", "restarts"),
            eot_draws=self._value("eot_iter"))

    def config(self) -> dict[str, Any]:
        extra = {} if self.alpha_scale is None else {"alpha_scale": self.alpha_scale}
        return {"attack": self.attack, **extra, **self.kwargs}

    def norm(self) -> str | None:
        """Our threat-model name this attack bounds (``"unbounded"`` for none, ``None`` if
        unknown)."""
        if self.attack in LINF_ATTACKS:
            return "linf"
        if self.attack in L2_ATTACKS:
            return "l2"
        if self.attack in UNBOUNDED_ATTACKS:
            return "unbounded"
        if self.attack in NORM_ARG_ATTACKS:
            norm = str(self.kwargs.get("norm", self._signature().parameters["norm"].default))
            return _NORM_NAMES.get(norm, norm)
        return None

    def _eps_key(self) -> str | None:
        key = _EPS_KEY.get(self.attack, "eps")
        return key if key in self._signature().parameters else None

    def incompatibility(self, defense: nn.Module, threat: ThreatModel) -> str | None:
        own = super().incompatibility(defense, threat)
        if own is not None:
            return own
        if threat.needs_params:
            return (f"torchattacks attacks perturb pixels; they cannot produce the parameter "
                    f"that a {threat.name!r} result carries (a flow field, DCT coefficients)")
        norm = self.norm()
        if threat.name == "unrestricted" or norm is None:
            return None
        if norm == "unbounded":
            return (f"torchattacks.{self.attack} has no perturbation budget; it can only run "
                    f"under the 'unrestricted' threat model, not {threat.name!r}")
        if norm != threat.name:
            return f"torchattacks.{self.attack} is an {norm} attack, not {threat.name!r}"
        key = self._eps_key()
        if key is not None and key in self.kwargs and float(self.kwargs[key]) > threat.eps:
            return (f"{key}={self.kwargs[key]} exceeds the threat model's eps {threat.eps:g}")
        return None

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        import torchattacks

        x, y = x.detach(), y.detach()
        view = DefenseView(defense, x.device)
        params = self._signature().parameters
        kwargs = dict(self.kwargs)
        key = self._eps_key()
        if key is not None and key not in kwargs and threat.name != "unrestricted":
            kwargs[key] = threat.eps
        if self.alpha_scale is not None:
            # the same step rule as our PGD (Madry et al.: 2.5 * eps / steps for scale 2.5)
            kwargs["alpha"] = self.alpha_scale * threat.eps / self.budget.steps
        if "n_classes" in params and "n_classes" not in kwargs:
            with torch.no_grad():
                kwargs["n_classes"] = int(defense(x[:1]).shape[1])
        seed = draw_seed(generator)
        if "seed" in params and "seed" not in kwargs:
            kwargs["seed"] = seed
        with torch.random.fork_rng(devices=rng_devices(x)):
            torch.manual_seed(seed)
            atk = getattr(torchattacks, self.attack)(view, **kwargs)
            x_adv = atk(x, y).detach().to(x.dtype)
        with torch.no_grad():
            if isinstance(threat, AdditiveThreatModel):
                x_adv = threat.apply(x, threat.project(x, x_adv - x))
            else:
                x_adv = x_adv.clamp(0.0, 1.0)
        extras = {"library": f"torchattacks=={torchattacks.__version__}", "seed": seed,
                  "kwargs": {k: v for k, v in kwargs.items() if k != "seed"}}
        return AttackResult(x_adv, params=None, grad_evals=view.grad_calls, extras=extras)
