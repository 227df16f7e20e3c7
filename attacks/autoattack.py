"""AutoAttack (Croce & Hein 2020) through the original code on PyPI, ``pyautoattack``.

This is the AutoAttack of record. The adapter pins what the reference protocol needs:

* ``version="auto"`` resolves per defense: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for a
  deterministic defense, ``rand`` (APGD-CE + APGD-DLR with EOT 20) for a stochastic one;
  ``attacks=[...]`` runs a custom subset (``version="custom"``);
* ``n_iter`` (APGD, FAB) and ``n_queries`` (Square) override the library's 100 / 5000; APGD's
  step-size checkpoints are rescaled with ``n_iter`` exactly as the library does for a
  fresh ``APGDAttack(n_iter=...)``;
* ``forward`` (a hook, defense -> differentiable forward, as PGD's) is what the library
  attacks: it sees a :class:`DefenseView` over ``forward(defense)`` instead of the defense.
  ``BPDA(attack="autoattack", ...)`` passes :func:`attacks.bpda.bpda_forward` here, which is
  RDC's headline protocol (AutoAttack through BPDA of the likelihood maximization). The
  version still reads the *defense* (its ``stochastic`` flag); the hook is not configuration
  (``config()`` omits it);
* the seed is drawn from the run's generator, and the library's global ``manual_seed`` calls
  run inside :func:`torch.random.fork_rng`, so the caller's random state is left untouched;
* the library's ``auto-attack`` log warnings (randomized/dynamic defense, zero gradients,
  Square beating the white-box attacks) are returned in ``result.extras["warnings"]``; its log
  and stdout are silent unless ``verbose=True``.

AutoAttack judges success with single forward passes, which overstates the success on
stochastic defenses: the harness re-scores every returned example with K draws.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_bool, check_choice, check_positive_int
from attacks.pgd import ForwardHook
from benchmark.api.attack import Attack, AttackResult, AttackTraits, Budget, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import did_you_mean, register_attack

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("auto", "standard", "plus", "rand", "custom")
#: our threat-model name -> pyautoattack's norm
NORMS = {"linf": "Linf", "l2": "L2"}
#: (APGD restarts, EOT draws) that pyautoattack 0.2.0 sets per version ("custom": its defaults);
#: tests/test_autoattack_adapter.py re-reads them from the library.
VERSION_BUDGETS = {"standard": (1, 1), "plus": (5, 1), "rand": (1, 20), "custom": (5, 1)}
_LOGGER = "auto-attack"


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for a library that seeds itself, drawn from the run's generator."""
    if generator is None:
        return int(torch.randint(2**31 - 1, (1,)))
    return int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))


def rng_devices(x: Tensor) -> list[int]:
    """CUDA devices whose random state a library seeding itself may touch."""
    devices = {torch.cuda.current_device()} if torch.cuda.is_available() else set()
    if x.is_cuda:
        devices.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


class DefenseView(nn.Module):
    """A parameterless module that calls ``forward`` and counts the calls.

    Third-party attack libraries get this view instead of the defense: the defense is *not*
    a submodule, so their ``model.eval()`` / ``model.train()`` calls never change its mode.
    An empty parameter on the input's device lets them infer the device.
    """

    _fn: Forward

    def __init__(self, forward: Forward, device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "_fn", forward)  # bypass submodule registration
        self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.calls = 0
        self.grad_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_calls += 1
        return self._fn(x)


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def _library_output(verbose: bool) -> Iterator[list[str]]:
    """Collect the library's log warnings; silence its log and stdout unless ``verbose``.

    Also restores ``sys.settrace``, which pyautoattack's dynamic-defense check resets to None
    (that would switch off coverage or a debugger for the rest of the thread).
    """
    from pyautoattack import checks

    # The dynamic-defense check counts into a module-global dict that is never reset, so one
    # flagged model would flag every later one in the process.
    for key in checks.funcs:
        checks.funcs[key] = 0
    logger = logging.getLogger(_LOGGER)
    warnings: list[str] = []
    collect = _Collect(warnings)
    saved = (logger.level, logger.propagate, sys.gettrace())
    logger.addHandler(collect)
    echo: logging.Handler | None = None
    if verbose:
        echo = logging.StreamHandler(sys.stdout)
        logger.addHandler(echo)
        logger.setLevel(logging.DEBUG)
    else:
        logger.propagate = False
    stdout = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with stdout:
            yield warnings
    finally:
        logger.removeHandler(collect)
        if echo is not None:
            logger.removeHandler(echo)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        sys.settrace(saved[2])


@register_attack("autoattack")
class AutoAttack(Attack):
    """AutoAttack of record (``pyautoattack``), l-inf and l2; see the module docstring.

    ``result.extras`` records the resolved ``version`` and ``attacks``, the ``seed``, the
    library's own robust accuracy (single-pass) and its ``warnings``. ``grad_evals`` counts the
    batched gradient calls AutoAttack made (EOT draws counted). ``forward`` maps the defense to
    the function the library attacks (BPDA's hook; default: the defense itself).
    """

    name: ClassVar[str] = "autoattack"
    threat_models: ClassVar[frozenset[str] | None] = frozenset(NORMS)

    @classmethod
    def traits(cls, params: Mapping[str, Any]) -> AttackTraits:
        """Gradient-free when every sub-attack is Square."""
        attacks = params.get("attacks")
        square = isinstance(attacks, list) and bool(attacks) and all(
            str(a).lower() == "square" for a in attacks)
        return AttackTraits(gradient="none" if square else "exact")

    def __init__(self, *, version: str = "auto", attacks: list[str] | None = None,
                 n_iter: int = 100, n_queries: int = 5000, batch_size: int = 500,
                 verbose: bool = False, forward: ForwardHook | None = None) -> None:
        check_choice(version, "version", VERSIONS)
        if attacks is not None:
            if version not in ("auto", "custom"):
                raise ValueError(f"attacks={attacks!r} runs version 'custom', not {version!r}")
            if isinstance(attacks, str) or not attacks:
                raise ValueError(f"attacks must be a non-empty list of names, got {attacks!r}")
            for a in attacks:
                if a not in AA_ATTACKS:
                    tip = did_you_mean(str(a), AA_ATTACKS, n=1, cutoff=0.6)
                    raise ValueError(f"unknown AutoAttack attack {a!r}{tip} "
                                     f"(known: {', '.join(AA_ATTACKS)})")
            version = "custom"
            attacks = list(attacks)
        elif version == "custom":
            raise ValueError("version 'custom' needs attacks=[...]")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable defense -> forward function (a hook "
                            f"such as attacks.bpda.bpda_forward) or None, got {forward!r}")
        self.version = version
        self.attacks = attacks
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.n_queries = check_positive_int(n_queries, "n_queries")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.verbose = check_bool(verbose, "verbose")
        self._forward = forward
        self._resolved: str | None = None

    def resolve_version(self, defense: nn.Module) -> str:
        """The version run on ``defense``: ``auto`` becomes ``rand`` or ``standard``."""
        if self.version != "auto":
            return self.version
        return "rand" if bool(getattr(defense, "stochastic", False)) else "standard"

    @property
    def budget(self) -> Budget:
        """Budget of the configured version; for ``auto``, of the version resolved by the
        latest ``run`` (``standard`` before any run)."""
        version = self._resolved or (self.version if self.version != "auto" else "standard")
        restarts, draws = VERSION_BUDGETS[version]
        return Budget(steps=self.n_iter, restarts=restarts, eot_draws=draws)

    def config(self) -> dict[str, Any]:
        # the forward hook is code, not configuration (as PGD's): BPDA records itself
        return {"version": self.version, "attacks": self.attacks, "n_iter": self.n_iter,
                "n_queries": self.n_queries, "batch_size": self.batch_size,
                "verbose": self.verbose}

    def _check_classes(self, version: str, classes: int) -> None:
        attacks = set(self.attacks or ()) if version == "custom" else {
            "standard": {"apgd-t", "fab-t"}, "plus": {"apgd-t", "apgd-dlr"},
            "rand": {"apgd-dlr"}}[version]
        need = 4 if "apgd-t" in attacks else 3 if "apgd-dlr" in attacks else 2
        if classes < need:
            raise ValueError(f"AutoAttack {version} ({', '.join(sorted(attacks))}) needs at "
                             f"least {need} classes (DLR losses), the defense has {classes}; "
                             "choose attacks=[...] without them")

    def _configure(self, aa: Any, view: nn.Module, threat: ThreatModel, classes: int) -> None:
        from pyautoattack.autopgd_base import APGDAttack

        # The targeted attacks try the 9 runner-up classes, i.e. all of them on 10 classes;
        # with fewer classes there are fewer targets (the library would index past the end).
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, classes - 1)

        # APGD derives its step-size checkpoints from n_iter at construction: take them from a
        # fresh instance built by the library with our n_iter.
        ref = APGDAttack(view, n_iter=self.n_iter, eps=threat.eps, norm=NORMS[threat.name])
        for sub in (aa.apgd, aa.apgd_targeted):
            for attr in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
                setattr(sub, attr, getattr(ref, attr))
        aa.fab.n_iter = self.n_iter
        aa.square.n_queries = self.n_queries

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        from pyautoattack import AutoAttack as PyAutoAttack
        from pyautoattack import __version__ as aa_version

        if threat.name not in NORMS:
            raise ValueError(f"AutoAttack supports threat models {sorted(NORMS)}, "
                             f"not {threat.name!r}")
        version = self.resolve_version(defense)
        self._resolved = version
        seed = draw_seed(generator)
        x, y = x.detach(), y.detach()
        forward: Forward = self._forward(defense) if self._forward is not None else defense
        view = DefenseView(forward, x.device)
        with torch.no_grad():
            classes = int(view(x[:1]).shape[1])
        self._check_classes(version, classes)
        with _library_output(self.verbose) as warnings, \
                torch.random.fork_rng(devices=rng_devices(x)):
            aa = PyAutoAttack(view, attacks=self.attacks if version == "custom" else None,
                              device=x.device, eps=threat.eps, norm=NORMS[threat.name],
                              seed=seed, version=version)
            self._configure(aa, view, threat, classes)
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
            attacks = list(aa.attacks_to_run)
        with torch.no_grad():
            # Guard against float round-off beyond the budget (a no-op up to ~1e-7).
            x_adv = threat.apply(x, threat.project(x, x_adv.detach().to(x.dtype) - x))
        extras: dict[str, Any] = {
            "implementation": f"pyautoattack=={aa_version}",
            "version": version,
            "attacks": attacks,
            "n_iter": self.n_iter,
            "n_queries": self.n_queries,
            "seed": seed,
            "aa_robust_accuracy": float((y_adv == y).float().mean()) if len(y) else 0.0,
            "forward_calls": view.calls,
            "warnings": warnings,
        }
        return AttackResult(x_adv, params=None, grad_evals=view.grad_calls, extras=extras)
