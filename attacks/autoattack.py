"""AutoAttack (Croce & Hein 2020) through the original code on PyPI, ``pyautoattack``.

This is the AutoAttack of record. The adapter pins what the reference protocol needs:

* ``version="auto"`` resolves per defense: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for a
  deterministic defense, ``rand`` (APGD-CE + APGD-DLR with EOT 20) for a stochastic one;
  ``attacks=[...]`` runs a custom subset (``version="custom"``);
* ``eot_draws`` overrides the version's EOT draws per APGD gradient (``rand``: 20), for an
  evaluation at a stated reduced budget;
* ``n_iter`` (APGD, FAB) and ``n_queries`` (Square) override the library's 100 / 5000; APGD's
  step-size checkpoints are rescaled with ``n_iter`` exactly as the library does for a
  fresh ``APGDAttack(n_iter=...)``;
* ``forward`` (a hook, defense -> differentiable forward, as PGD's) is what the library
  attacks: it sees a :class:`DefenseView` over ``forward(defense)`` instead of the defense.
  ``BPDA(attack="autoattack", ...)`` passes :func:`attacks.bpda.bpda_forward` here, which is
  RDC's headline protocol (AutoAttack through BPDA of the likelihood maximization). The
  version, the selection and the scoring draws below still read the *defense* (its
  ``stochastic`` flag, its own forward); the hook is not configuration (``config()`` omits it);
* the seed is drawn from the run's generator, and the library's global ``manual_seed`` calls
  run inside :func:`torch.random.fork_rng`, so the caller's random state is left untouched;
* the library's ``auto-attack`` log warnings (randomized/dynamic defense, zero gradients,
  Square beating the white-box attacks) are returned in ``result.extras["warnings"]``; its log
  and stdout are silent unless ``verbose=True``.

Selection of the returned example (``selection``):

* ``"library"``: ``run_standard_evaluation`` as published. It judges success with *single*
  forward passes: a point misclassified on one pass (of the clean input, or of a sub-attack's
  output) leaves the pool for every later sub-attack, and a point it never fools gets the
  clean input back. On a deterministic defense that is exact. On a stochastic one it
  over-counts robustness under the harness's K-draw majority vote: a point "fooled" on one
  lucky draw by APGD-CE never meets APGD-DLR, and a point never fooled on one draw gets the
  clean image, not its best iterate.
* ``"unfiltered"``: every sub-attack of the version runs on *every* point, with no filtering
  between sub-attacks or APGD restarts. Each APGD sub-attack (APGD-CE, APGD-DLR, APGD-T over
  all its target classes and restarts) offers, per point, its highest-loss iterate (tracked by
  the library's ``attack_single_run``; under EOT the loss tracked is that of the iteration's
  last draw) and its latest iterate misclassified on a draw; FAB and Square offer what their
  ``perturb`` returns (they still filter their own restarts by single passes). The returned
  example is, per point, the candidate (the clean input included) with the fewest correct
  predictions over ``select_draws`` fresh draws of the defense (the harness's K by default),
  ties broken by the higher mean margin loss ``max_{j != y} z_j - z_y``; a draw with
  non-finite logits counts as correct, and a candidate equal to the clean input is not scored
  again. Cost: each sub-attack runs on every point (as many batched gradient calls as the
  library makes when some point survives to every sub-attack, but on full batches), plus
  ``select_draws`` no-gradient forwards per point and candidate (a few percent of the
  attack's forwards at the default budgets).
* ``"auto"`` (default): ``unfiltered`` for a stochastic defense, ``library`` otherwise.

``result.extras`` records the resolved ``version``, ``selection`` and ``attacks`` and the
``seed``; the batched forward calls and images through the attacked view (``forward_calls``,
``forward_samples``), and the images of its gradient calls (``grad_samples``; ``grad_evals``
counts those batched calls, EOT draws included); the library's ``warnings``. The library path
adds the library's own single-pass ``aa_robust_accuracy``. The unfiltered path adds, per point,
where the returned example came from (``selected_from``: ``"clean"`` or a sub-attack name;
``selected_iterate``: ``"clean"``, ``"highest-loss"``, ``"misclassified"`` or ``"returned"``)
and its correct count over the selection draws (``select_correct``), their majority-vote
robust accuracy (``select_robust_accuracy``), and the selection's no-gradient cost
(``select_forward_calls``, ``select_forward_samples``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks._ascent import check_bool, check_choice, check_positive_int
from attacks.losses import margin as margin_loss
from attacks.pgd import ForwardHook
from benchmark.api.attack import Attack, AttackResult, AttackTraits, Budget, Forward
from benchmark.api.threat import ThreatModel
from benchmark.plugins import did_you_mean, register_attack

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("auto", "standard", "plus", "rand", "custom")
SELECTIONS = ("auto", "library", "unfiltered")
#: our threat-model name -> pyautoattack's norm
NORMS = {"linf": "Linf", "l2": "L2"}
#: (APGD restarts, EOT draws) that pyautoattack 0.2.0 sets per version ("custom": its defaults);
#: tests/test_autoattack_adapter.py re-reads them from the library.
VERSION_BUDGETS = {"standard": (1, 1), "plus": (5, 1), "rand": (1, 20), "custom": (5, 1)}
_LOGGER = "auto-attack"
#: label of the clean input among the selection's candidates
_CLEAN = ("clean", "clean")


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
    An empty parameter on the input's device lets them infer the device. ``calls`` counts
    batched calls and ``samples`` the images passed; ``grad_calls`` and ``grad_samples`` the
    same for the calls that build a graph.
    """

    _fn: Forward

    def __init__(self, forward: Forward, device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "_fn", forward)  # bypass submodule registration
        self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.calls = 0
        self.grad_calls = 0
        self.samples = 0
        self.grad_samples = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.samples += len(x)
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_calls += 1
            self.grad_samples += len(x)
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


@torch.no_grad()
def draw_scores(forward: Forward, x: Tensor, y: Tensor, draws: int, batch_size: int
                ) -> tuple[Tensor, Tensor]:
    """Correct predictions out of ``draws`` fresh draws per sample (B,) long, and the mean
    margin loss over them (B,), ``-inf`` where a draw has non-finite logits (such a draw counts
    as correct). The draws of a sample are stacked along the batch dimension, ``batch_size //
    draws`` samples per forward, as the harness scores."""
    correct = torch.zeros(len(x), dtype=torch.long, device=x.device)
    margins = torch.zeros(len(x), dtype=torch.float32, device=x.device)
    per_chunk = max(1, batch_size // draws)
    for start in range(0, len(x), per_chunk):
        xb, yb = x[start:start + per_chunk], y[start:start + per_chunk]
        rep = xb.repeat_interleave(draws, dim=0)
        y_rep = yb.repeat_interleave(draws)
        logits = forward(rep)
        if logits.dim() != 2 or logits.shape[0] != len(rep):
            raise RuntimeError(f"the defense returned shape {tuple(logits.shape)} for a batch "
                               f"of {len(rep)}; expected logits of shape ({len(rep)}, "
                               "num_classes)")
        finite = torch.isfinite(logits).all(dim=1)
        hits = (logits.argmax(dim=1) == y_rep) | ~finite
        m = torch.where(finite, margin_loss(logits, y_rep).float(),
                        torch.full_like(y_rep, -math.inf, dtype=torch.float32))
        correct[start:start + len(xb)] = hits.view(len(xb), draws).sum(dim=1)
        margins[start:start + len(xb)] = m.view(len(xb), draws).mean(dim=1)
    return correct, margins


class _Selection:
    """Per point, the candidate with the fewest correct predictions over ``draws`` fresh draws
    of the defense (ties: the higher mean margin; exact ties keep the earlier candidate, the
    clean input first)."""

    def __init__(self, defense: nn.Module, x: Tensor, y: Tensor, draws: int,
                 batch_size: int) -> None:
        self.view = DefenseView(defense, x.device)
        self.x_clean, self.y = x, y
        self.draws, self.batch_size = draws, batch_size
        self.x = x.clone()
        self.correct, self.margin = draw_scores(self.view, x, y, draws, batch_size)
        self.labels: list[tuple[str, str]] = [_CLEAN]
        self.source = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def offer(self, idx: Tensor, cand: Tensor, label: tuple[str, str]) -> None:
        """Candidates ``cand`` for the points ``idx`` (a candidate equal to the clean input is
        skipped: the clean input is already scored)."""
        cand = cand.detach().to(self.x.dtype)
        moved = (cand != self.x_clean[idx]).flatten(1).any(dim=1)
        idx, cand = idx[moved], cand[moved]
        if not len(idx):
            return
        if label not in self.labels:
            self.labels.append(label)
        correct, margin = draw_scores(self.view, cand, self.y[idx], self.draws,
                                      self.batch_size)
        old_c, old_m = self.correct[idx], self.margin[idx]
        better = (correct < old_c) | ((correct == old_c) & (margin > old_m))
        win = idx[better]
        self.x[win] = cand[better]
        self.correct[win] = correct[better]
        self.margin[win] = margin[better]
        self.source[win] = self.labels.index(label)

    def extras(self) -> dict[str, Any]:
        chosen = [self.labels[i] for i in self.source.tolist()]
        n = len(self.x)
        return {
            "selected_from": [c[0] for c in chosen],
            "selected_iterate": [c[1] for c in chosen],
            "select_correct": self.correct.tolist(),
            "select_robust_accuracy": float((2 * self.correct > self.draws).float().mean())
            if n else 0.0,
            "select_forward_calls": self.view.calls,
            "select_forward_samples": self.view.samples,
        }


class _BestIterates:
    """Per point, over APGD runs: the highest-loss iterate and the latest iterate misclassified
    on a draw (the clean input where none was)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.best = x.clone()
        self.loss = torch.full((len(x),), -math.inf, device=x.device)
        self.fooled = x.clone()

    def add(self, run: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        x_best, acc, loss_best, x_best_adv = run
        up = loss_best.float() > self.loss  # NaN never improves
        self.best[up] = x_best[up].detach()
        self.loss[up] = loss_best[up].float()
        hit = ~acc.bool()
        self.fooled[hit] = x_best_adv[hit].detach()

    def candidates(self) -> list[tuple[str, Tensor]]:
        return [("highest-loss", self.best), ("misclassified", self.fooled)]


@register_attack("autoattack")
class AutoAttack(Attack):
    """AutoAttack of record (``pyautoattack``), l-inf and l2; see the module docstring.

    ``selection="auto"`` (default) runs the library's filtered ``run_standard_evaluation`` on
    a deterministic defense and, on a stochastic one, every sub-attack on every point with the
    returned example chosen by ``select_draws`` fresh draws of the defense
    (``selection="library"`` reproduces the library there too). ``forward`` maps the defense
    to the function the library attacks (BPDA's hook; default: the defense itself).
    ``grad_evals`` counts the batched gradient calls AutoAttack made (EOT draws counted);
    ``result.extras`` is described in the module docstring.
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
                 selection: str = "auto", select_draws: int = 10, verbose: bool = False,
                 eot_draws: int | None = None, forward: ForwardHook | None = None) -> None:
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
        check_choice(selection, "selection", SELECTIONS,
                     note="'library' keeps the library's single-pass filtering, 'unfiltered' runs "
                          "every sub-attack on every point and picks by select_draws draws, "
                          "'auto' is 'unfiltered' on a stochastic defense")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable defense -> forward function (a hook "
                            f"such as attacks.bpda.bpda_forward) or None, got {forward!r}")
        self.version = version
        self.attacks = attacks
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.n_queries = check_positive_int(n_queries, "n_queries")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.selection = selection
        self.select_draws = check_positive_int(select_draws, "select_draws")
        self.eot_draws = None if eot_draws is None else check_positive_int(eot_draws,
                                                                            "eot_draws")
        self.verbose = check_bool(verbose, "verbose")
        self._forward = forward
        self._resolved: str | None = None

    def resolve_version(self, defense: nn.Module) -> str:
        """The version run on ``defense``: ``auto`` becomes ``rand`` or ``standard``."""
        if self.version != "auto":
            return self.version
        return "rand" if bool(getattr(defense, "stochastic", False)) else "standard"

    def resolve_selection(self, defense: nn.Module) -> str:
        """The selection run on ``defense``: ``auto`` becomes ``unfiltered`` on a stochastic
        defense and ``library`` on a deterministic one."""
        if self.selection != "auto":
            return self.selection
        return "unfiltered" if bool(getattr(defense, "stochastic", False)) else "library"

    @property
    def budget(self) -> Budget:
        """Budget of the configured version; for ``auto``, of the version resolved by the
        latest ``run`` (``standard`` before any run)."""
        version = self._resolved or (self.version if self.version != "auto" else "standard")
        restarts, draws = VERSION_BUDGETS[version]
        draws = draws if self.eot_draws is None else self.eot_draws
        return Budget(steps=self.n_iter, restarts=restarts, eot_draws=draws)

    def config(self) -> dict[str, Any]:
        # the forward hook is code, not configuration (as PGD's): BPDA records itself
        return {"version": self.version, "attacks": self.attacks, "n_iter": self.n_iter,
                "n_queries": self.n_queries, "batch_size": self.batch_size,
                "selection": self.selection, "select_draws": self.select_draws,
                "eot_draws": self.eot_draws, "verbose": self.verbose}

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
        if self.eot_draws is not None:  # the version's EOT (rand: 20) at a reduced budget
            aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = self.eot_draws

    def run(self, defense: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None = None) -> AttackResult:
        from pyautoattack import AutoAttack as PyAutoAttack
        from pyautoattack import __version__ as aa_version

        if threat.name not in NORMS:
            raise ValueError(f"AutoAttack supports threat models {sorted(NORMS)}, "
                             f"not {threat.name!r}")
        version = self.resolve_version(defense)
        selection = self.resolve_selection(defense)
        self._resolved = version
        seed = draw_seed(generator)
        x, y = x.detach(), y.detach()
        forward: Forward = self._forward(defense) if self._forward is not None else defense
        view = DefenseView(forward, x.device)
        with torch.no_grad():
            classes = int(view(x[:1]).shape[1])
        self._check_classes(version, classes)
        picked: dict[str, Any] = {}
        with _library_output(self.verbose) as warnings, \
                torch.random.fork_rng(devices=rng_devices(x)):
            aa = PyAutoAttack(view, attacks=self.attacks if version == "custom" else None,
                              device=x.device, eps=threat.eps, norm=NORMS[threat.name],
                              seed=seed, version=version)
            self._configure(aa, view, threat, classes)
            attacks = list(aa.attacks_to_run)
            if selection == "library":
                x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
                picked["aa_robust_accuracy"] = (float((y_adv == y).float().mean())
                                                if len(y) else 0.0)
            else:
                chosen = _Selection(defense, x, y, self.select_draws, self.batch_size)
                self._run_unfiltered(aa, x, y, seed, chosen)
                x_adv = chosen.x
                picked.update(chosen.extras())
        with torch.no_grad():
            # Guard against float round-off beyond the budget (a no-op up to ~1e-7).
            x_adv = threat.apply(x, threat.project(x, x_adv.detach().to(x.dtype) - x))
        extras: dict[str, Any] = {
            "implementation": f"pyautoattack=={aa_version}",
            "version": version,
            "selection": selection,
            "attacks": attacks,
            "n_iter": self.n_iter,
            "n_queries": self.n_queries,
            "eot_draws": int(aa.apgd.eot_iter),
            "seed": seed,
            **picked,
            "forward_calls": view.calls,
            "forward_samples": view.samples,
            "grad_samples": view.grad_samples,
            "warnings": warnings,
        }
        return AttackResult(x_adv, params=None, grad_evals=view.grad_calls, extras=extras)

    # -- the unfiltered path ----------------------------------------------------------------

    def _run_unfiltered(self, aa: Any, x: Tensor, y: Tensor, seed: int,
                        chosen: _Selection) -> None:
        """Every sub-attack on every point, batch by batch, each candidate offered to
        ``chosen``; the library's pre-run checks first (their warnings are reported)."""
        from pyautoattack import checks

        xb, yb = x[:self.batch_size], y[:self.batch_size]
        if aa.version != "rand":
            checks.check_randomized(aa.get_logits, xb, yb, bs=self.batch_size,
                                    logger=aa.logger)
        n_cls = checks.check_range_output(aa.get_logits, xb, logger=aa.logger)
        checks.check_dynamic(aa.model, xb, False, logger=aa.logger)
        checks.check_n_classes(n_cls, aa.attacks_to_run, aa.apgd_targeted.n_target_classes,
                               aa.fab.n_target_classes, logger=aa.logger)
        for attack in aa.attacks_to_run:
            for start in range(0, len(x), self.batch_size):
                idx = torch.arange(start, min(len(x), start + self.batch_size), device=x.device)
                for kind, cand in self._candidates(aa, attack, x[idx].float(), y[idx], seed):
                    chosen.offer(idx, cand, (attack, kind))

    @staticmethod
    def _candidates(aa: Any, attack: str, x: Tensor, y: Tensor, seed: int
                    ) -> list[tuple[str, Tensor]]:
        """One sub-attack on every point of ``x``, seeded as the library seeds it: APGD's
        highest-loss and latest misclassified iterates, or what FAB / Square return."""

        def seed_all() -> None:
            torch.random.manual_seed(seed)
            torch.cuda.random.manual_seed(seed)

        if attack in ("apgd-ce", "apgd-dlr"):
            apgd = aa.apgd
            apgd.loss, apgd.seed = attack.removeprefix("apgd-"), seed
            apgd.init_hyperparam(x)
            seed_all()
            runs = _BestIterates(x)
            for _ in range(apgd.n_restarts):
                runs.add(apgd.attack_single_run(x, y))
            return runs.candidates()
        if attack == "apgd-t":
            apgd_t = aa.apgd_targeted
            apgd_t.seed = seed
            apgd_t.init_hyperparam(x)
            seed_all()
            runs = _BestIterates(x)
            for target_class in range(2, apgd_t.n_target_classes + 2):
                for _ in range(apgd_t.n_restarts):
                    with torch.no_grad():
                        output = apgd_t.model(x)
                    apgd_t.y_target = output.sort(dim=1)[1][:, -target_class]
                    runs.add(apgd_t.attack_single_run(x, y))
            return runs.candidates()
        if attack in ("fab", "fab-t"):
            aa.fab.targeted = attack == "fab-t"
            if aa.fab.targeted:
                aa.fab.n_restarts = 1  # as run_standard_evaluation sets it
            aa.fab.seed = seed
            return [("returned", aa.fab.perturb(x, y))]
        if attack == "square":
            aa.square.seed = seed
            try:
                return [("returned", aa.square.perturb(x, y))]
            except RuntimeError as exc:
                # pyautoattack's Square can be left with an empty working set while it still
                # loops (seen on a stochastic defense whose logits tie, where its single-pass
                # bookkeeping goes out of step): its l2 norm then reshapes 0 elements. It
                # found nothing more: the clean input is its candidate, the selection by K
                # draws decides as for any candidate.
                if "0 elements" not in str(exc):
                    raise
                return [("returned", x.clone())]
        raise ValueError(f"unknown AutoAttack attack {attack!r} (known: {', '.join(AA_ATTACKS)})")
