"""``genbench check-defense``: the conformance checker a submitter runs on a defense first.

In the spirit of scikit-learn's ``check_estimator``: the defense is built from a
``module:Class`` reference (or a registry name) and put through a list of checks, each of which
passes, fails (with the reason) or is skipped (with the reason):

* ``build``: the factory returns an ``nn.Module`` with a known ``kind``;
* ``output_shape``: logits (B, C) for classifiers, log-likelihoods (B,) for density models;
* ``range_edges``: all-0 and all-1 images give finite output;
* ``determinism``: a deterministic defense gives identical outputs twice; a stochastic one is
  reproducible after ``reseed`` (and its draws actually vary);
* ``independent_draws`` (stochastic classifiers): the same image repeated in one batch gives
  different outputs. The harness stacks a sample's K draws along the batch dimension, so a
  defense that draws one noise tensor of shape (1, ...) and broadcasts it over the batch would
  score K copies of a single draw;
* ``gradients``: finite, non-zero input gradients, or (``differentiable = False``) a
  ``purify`` / ``head`` pair whose BPDA view has them;
* ``batch_independence``: a sample's output does not depend on its batch mates (tolerance
  over draws for stochastic defenses);
* ``device``: the defense moves with ``.to`` (skipped without CUDA);
* ``nfe``: declared ``nfe_per_call`` versus network evaluations counted per image (batch rows
  of every forward and vector-Jacobian product of a parameterized submodule);
* ``smoke_pgd`` / ``smoke_autoattack``: small-budget attacks on a few images, with the
  threat model re-checked on what they return.

The command exits 1 when any check fails. :func:`run_check` runs one named check (the names
are :data:`CHECKS`); :mod:`benchmark.verify.checks` turns them into pytest cases for plug-in
authors (``parametrize_with_checks``, as scikit-learn's).
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: images of the attack smoke runs: a smoke test checks the plumbing, not robustness, and a
#: purification defense costs a full reverse SDE per gradient (about 30 s in all for DiffPure
#: with 100 steps on a 2-core CPU).
SMOKE_IMAGES = 4
EXIT_FAILED = 1
#: the small-budget attack runs of the smoke checks: (registry name, parameters). APGD-CE
#: alone, 2 iterations (x its 5 restarts): a smoke test of the AutoAttack path, not an
#: evaluation ("rand" would multiply the cost by 20 EOT draws).
SMOKE_ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "smoke_pgd": ("pgd", {"steps": 5, "restarts": 1}),
    "smoke_autoattack": ("autoattack", {"attacks": ["apgd-ce"], "n_iter": 2}),
}
#: the checks after ``build``, in the order :func:`check_defense` runs and prints them.
CHECKS: tuple[str, ...] = ("output_shape", "range_edges", "determinism", "independent_draws",
                           "gradients", "batch_independence", "device", "nfe", *SMOKE_ATTACKS)
#: copies of one image in the batch of the ``independent_draws`` check.
DRAW_COPIES = 8


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # PASS, FAIL or SKIP
    why: str

    def __str__(self) -> str:
        return f"{self.status:4}  {self.name:20} {self.why}"


@dataclass(frozen=True)
class _Data:
    x: Tensor
    y: Tensor
    num_classes: int


def build_defense(ref: str, params: dict[str, Any] | None = None) -> nn.Module:
    """Build a defense from a registry name or a ``module:Class`` reference."""
    from benchmark.plugins.builtin import DEFENSES

    factory = DEFENSES.get(ref)
    return factory(**(params or {}))


def _load(dataset: str, n: int, device: torch.device) -> _Data:
    from benchmark.data import load_dataset

    ds = load_dataset(dataset)
    return _Data(ds.test.x[:n].to(device), ds.test.y[:n].to(device), ds.num_classes)


def _reseed(defense: nn.Module, seed: int) -> bool:
    fn = getattr(defense, "reseed", None)
    if callable(fn):
        fn(seed)
        return True
    return False


def _in_backward() -> bool:
    """Whether autograd is running a backward pass right now (checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return bool(task is not None and task() != -1)


class _Checker:
    def __init__(self, defense: nn.Module, data: _Data, device: torch.device) -> None:
        self.defense = defense
        self.data = data
        self.device = device
        self.kind = str(getattr(defense, "kind", "classifier"))
        self.stochastic = bool(getattr(defense, "stochastic", False))
        self.differentiable = bool(getattr(defense, "differentiable", True))
        self.results: list[CheckResult] = []
        self.shape_ok = False

    # -- helpers ----------------------------------------------------------------------------
    def expected_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.data.num_classes) if self.kind == "classifier" else (batch,)

    @torch.no_grad()
    def out(self, x: Tensor, seed: int | None = 0) -> Tensor:
        if seed is not None:
            _reseed(self.defense, seed)
        return self.defense(x)

    def add(self, name: str, status: str, why: str) -> None:
        self.results.append(CheckResult(name, status, why))

    def check_fn(self, name: str) -> Callable[[], tuple[str, str]]:
        """The check called ``name`` (one of :data:`CHECKS`) as a zero-argument callable."""
        table: dict[str, Callable[[], tuple[str, str]]] = {
            "output_shape": self.output_shape,
            "range_edges": self.range_edges,
            "determinism": self.determinism,
            "independent_draws": self.independent_draws,
            "gradients": self.gradients,
            "batch_independence": self.batch_independence,
            "device": self.device_handling,
            "nfe": self.nfe,
        }
        if name in SMOKE_ATTACKS:
            attack, params = SMOKE_ATTACKS[name]
            return lambda: self.smoke(attack, dict(params))
        if name not in table:
            raise ValueError(f"unknown conformance check {name!r} (known: {', '.join(CHECKS)})")
        return table[name]

    def run_named(self, name: str) -> None:
        """Run the check ``name``, appending its result (it needs a passing output_shape)."""
        self.run(name, self.check_fn(name), needs_shape=name != "output_shape")

    def run(self, name: str, fn: Callable[[], tuple[str, str]], *, needs_shape: bool = True
            ) -> None:
        if needs_shape and not self.shape_ok:
            self.add(name, SKIP, "needs a passing output_shape check")
            return
        try:
            status, why = fn()
        except Exception as exc:  # a check that crashes is a failed check, with the error
            status, why = FAIL, f"raised {type(exc).__name__}: {exc}"
        self.add(name, status, why)

    # -- checks -----------------------------------------------------------------------------
    def output_shape(self) -> tuple[str, str]:
        if self.kind not in ("classifier", "density"):
            return FAIL, f"kind is {self.kind!r}, expected 'classifier' or 'density'"
        declared = getattr(self.defense, "num_classes", 0)
        if self.kind == "classifier" and declared and declared != self.data.num_classes:
            return FAIL, (f"declares num_classes={declared}, the dataset has "
                          f"{self.data.num_classes}")
        for batch in (1, len(self.data.x)):
            out = self.out(self.data.x[:batch])
            if not isinstance(out, Tensor):
                return FAIL, f"forward returned {type(out).__name__}, expected a tensor"
            want = self.expected_shape(batch)
            if tuple(out.shape) != want:
                what = "logits" if self.kind == "classifier" else "log-likelihoods"
                return FAIL, (f"{self.kind} returned shape {tuple(out.shape)} for a batch of "
                              f"{batch}, expected {what} of shape {want}")
            if not out.is_floating_point():
                return FAIL, f"output dtype is {out.dtype}, expected a floating-point tensor"
        self.shape_ok = True
        return PASS, f"kind={self.kind}, output shape {self.expected_shape(len(self.data.x))}"

    def range_edges(self) -> tuple[str, str]:
        shape = self.data.x.shape[1:]
        bad = []
        for value in (0.0, 1.0):
            x = torch.full((2, *shape), value, device=self.device)
            out = self.out(x)
            if tuple(out.shape) != self.expected_shape(2):
                bad.append(f"shape {tuple(out.shape)} on all-{value:g} images")
            elif not torch.isfinite(out).all():
                bad.append(f"non-finite output on all-{value:g} images")
        lo, hi = float(self.data.x.min()), float(self.data.x.max())
        if bad:
            return FAIL, "; ".join(bad)
        return PASS, f"finite on all-0 and all-1 images (data range [{lo:g}, {hi:g}])"

    def determinism(self) -> tuple[str, str]:
        x = self.data.x
        if not self.stochastic:
            a, b = self.out(x, seed=None), self.out(x, seed=None)
            diff = float((a - b).abs().max())
            if diff > 1e-5:
                return FAIL, (f"declares stochastic=False but two calls on the same input differ "
                              f"by {diff:.3g}; declare stochastic=True and draw noise from "
                              "generator_for(x)")
            return PASS, "deterministic as declared (two calls agree)"
        if not callable(getattr(self.defense, "reseed", None)):
            return FAIL, "declares stochastic=True but has no reseed(seed): runs not reproducible"
        a, b = self.out(x, seed=123), self.out(x, seed=123)
        diff = float((a - b).abs().max())
        if diff > 1e-5:
            return FAIL, (f"stochastic, but reseed(123) twice gives outputs differing by "
                          f"{diff:.3g}: draw noise from generator_for(x)")
        c = self.out(x, seed=456)
        varies = float((a - c).abs().max()) > 0
        note = "" if varies else "; note: different seeds gave identical outputs"
        return PASS, f"stochastic and reproducible after reseed{note}"

    def independent_draws(self) -> tuple[str, str]:
        if not self.stochastic:
            return SKIP, "deterministic: a batch has no draws to compare"
        if self.kind != "classifier":
            return SKIP, (f"kind {self.kind!r}: one reported value per sample, no K draws "
                          "stacked along the batch")
        copies = DRAW_COPIES
        x = self.data.x[:1].expand(copies, *self.data.x.shape[1:]).contiguous()
        out = self.out(x, seed=7).reshape(copies, -1)
        if not torch.isfinite(out).all():
            return FAIL, f"non-finite output on {copies} copies of one image"
        distinct = int(torch.unique(out, dim=0).shape[0])
        if distinct == 1:
            return FAIL, (f"{copies} copies of one image in one batch gave {copies} identical "
                          "outputs: the rows of a batch share one noise draw (noise of shape "
                          "(1, ...) broadcast over the batch?). The harness stacks a sample's "
                          "K draws along the batch, so all K would be the same draw; draw noise "
                          "of the batch's full shape from generator_for(x)")
        note = "" if distinct == copies else f" (note: only {distinct} distinct)"
        return PASS, (f"{copies} copies of one image in one batch gave {distinct} different "
                      f"outputs{note}: rows draw independently")

    def _loss(self, out: Tensor) -> Tensor:
        if self.kind == "classifier":
            return nn.functional.cross_entropy(out, self.data.y, reduction="sum")
        return out.sum()

    def _input_grad(self, forward: Callable[[Tensor], Tensor]) -> Tensor:
        _reseed(self.defense, 0)
        x = self.data.x.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._loss(forward(x)), x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    def gradients(self) -> tuple[str, str]:
        from benchmark.api.defense import has_capability

        def verdict(grad: Tensor, how: str) -> tuple[str, str]:
            flat = grad.reshape(len(grad), -1)
            if not torch.isfinite(flat).all():
                return FAIL, f"{how}: non-finite input gradients"
            zero = int((flat.abs().amax(dim=1) == 0).sum())
            if zero:
                return FAIL, (f"{how}: input gradient is exactly zero for {zero} of "
                              f"{len(flat)} samples (gradient masking?)")
            return PASS, f"{how}: finite, non-zero input gradients"

        if self.differentiable:
            status, why = verdict(self._input_grad(self.defense), "end to end")
            if status == FAIL and has_capability(self.defense, "purify"):
                why += "; if purify is not differentiable, declare differentiable = False"
            return status, why
        if not (has_capability(self.defense, "purify") and has_capability(self.defense, "head")):
            return FAIL, ("declares differentiable=False but has no purify/head pair for BPDA "
                          "(and no surrogate to differentiate)")
        from attacks.bpda import bpda_forward

        return verdict(self._input_grad(bpda_forward(self.defense)), "BPDA surrogate")

    def batch_independence(self) -> tuple[str, str]:
        x = self.data.x
        n = len(x)
        perm = torch.arange(n - 1, -1, -1, device=x.device)
        if not self.stochastic:
            whole = self.out(x)
            alone = torch.cat([self.out(x[i:i + 1]) for i in range(n)])
            shuffled = self.out(x[perm])[perm.argsort()]
            diff = max(float((whole - alone).abs().max()), float((whole - shuffled).abs().max()))
            scale = float(whole.abs().max()) + 1.0
            if diff > 1e-4 * scale:
                return FAIL, (f"a sample's output depends on its batch mates (max difference "
                              f"{diff:.3g} between batched, single and reordered calls; "
                              "BatchNorm in train mode or batch statistics?)")
            return PASS, f"batched, single and reordered calls agree (max difference {diff:.2g})"
        draws = 16
        with torch.no_grad():
            _reseed(self.defense, 1)
            whole = self._summary(torch.stack([self.defense(x) for _ in range(draws)]))
            _reseed(self.defense, 2)
            shuffled = self._summary(torch.stack([self.defense(x[perm])
                                                  for _ in range(draws)]))[perm.argsort()]
        diff = float((whole - shuffled).abs().max())
        if diff > 0.35:
            return FAIL, (f"a sample's average output over {draws} draws changes by {diff:.3g} "
                          "when its batch mates are reordered")
        return PASS, (f"average output over {draws} draws agrees under reordering "
                      f"(max difference {diff:.2g}, tolerance 0.35)")

    def _summary(self, outs: Tensor) -> Tensor:
        """Mean softmax over draws (classifiers), or mean output scaled to unit spread."""
        if self.kind == "classifier":
            return outs.softmax(dim=-1).mean(dim=0)
        mean = outs.mean(dim=0)
        return mean / (mean.abs().max() + 1e-12)

    def device_handling(self) -> tuple[str, str]:
        if not torch.cuda.is_available():
            return SKIP, "CUDA not available: moving between devices was not checked"
        other = torch.device("cuda") if self.device.type == "cpu" else torch.device("cpu")
        ref = self.out(self.data.x)
        try:
            self.defense.to(other)
            out = self.out(self.data.x.to(other))
        finally:
            self.defense.to(self.device)
        if out.device.type != other.type:
            return FAIL, f"after .to({other}) the output is on {out.device}"
        if not self.stochastic:
            diff = float((out.to(self.device) - ref).abs().max())
            if diff > 1e-3 * (float(ref.abs().max()) + 1.0):
                return FAIL, f"output on {other} differs from {self.device} by {diff:.3g}"
        return PASS, f"moves to {other} with .to and computes there"

    def nfe(self) -> tuple[str, str]:  # noqa: C901 - one hook set, read in one place
        """Declared ``nfe_per_call`` against network evaluations counted per image: every
        forward (and every vector-Jacobian product, as guidance computes) of a parameterized
        submodule adds its batch rows divided by the number of input images, so a defense that
        batches T' timesteps x K classes into one call counts T' x K. A network whose
        ``forward`` is bypassed (a flow's ``log_prob``) is counted by its most-called
        parameterized submodule."""
        declared = int(getattr(self.defense, "nfe_per_call", 1))
        images = len(self.data.x)
        counts: dict[str, float] = {}
        vjps: dict[str, float] = {}  # vector-Jacobian products (guidance), counted apart
        hooks = []

        def rows(value: Any) -> int:
            while isinstance(value, tuple | list) and value:
                value = value[0]
            return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() else images

        def watch(name: str, module: nn.Module, *, backward: bool) -> None:
            counts[name] = 0.0

            def fwd(_m: nn.Module, inputs: Any, _o: Any) -> None:
                if _in_backward():  # a checkpointed forward recomputed for its backward
                    return
                counts[name] += rows(inputs) / images

            def bwd(_m: nn.Module, _gi: Any, grad_out: Any) -> None:
                vjps[name] = vjps.get(name, 0.0) + rows(grad_out) / images

            hooks.append(module.register_forward_hook(fwd))
            if backward:
                hooks.append(module.register_full_backward_hook(bwd))

        def parameterized(m: nn.Module) -> list[tuple[str, nn.Module]]:
            return [(n, c) for n, c in m.named_children()
                    if any(True for _ in c.parameters())]

        top = parameterized(self.defense)
        for name, child in top:
            watch(name, child, backward=True)
            for sub, inner in child.named_modules():
                if sub and any(True for _ in inner.parameters(recurse=False)):
                    watch(f"{name}.{sub}", inner, backward=False)
        if not counts:
            return SKIP, (f"declares nfe_per_call={declared}; not checkable (no parameterized "
                          "submodules to count)")
        try:
            with torch.enable_grad():
                self.out(self.data.x)
        finally:
            for h in hooks:
                h.remove()
        per_net: dict[str, float] = {}
        for name, _ in top:
            own = counts[name]
            subs = [v for k, v in counts.items() if k.startswith(name + ".")]
            per_net[name] = own if own or not subs else max(subs)
        # conventions differ on whether a VJP through a network is an evaluation (ScoreAG
        # counts its guidance's, the PF-ODE detector its Hutchinson VJPs not): accept either
        with_vjp = {k: v + vjps.get(k, 0.0) for k, v in per_net.items()}
        candidates = {sum(per_net.values()), max(per_net.values()),
                      sum(with_vjp.values()), max(with_vjp.values())}
        seen = ", ".join(f"{k}: {v:g}" + (f" (+{vjps[k]:g} VJP)" if vjps.get(k) else "")
                         for k, v in per_net.items())
        if any(abs(declared - c) < 1e-6 for c in candidates):
            return PASS, (f"declared nfe_per_call={declared} matches the evaluations counted "
                          f"per image ({seen})")
        return FAIL, (f"declared nfe_per_call={declared}, but one forward evaluated the networks "
                      f"{seen} times per image (expected the largest count or the total)")

    def smoke(self, attack_name: str, params: dict[str, Any]) -> tuple[str, str]:
        if self.kind != "classifier":
            return SKIP, f"{attack_name} attacks classifiers; this is a {self.kind} model"
        from benchmark.plugins.builtin import ATTACKS, THREAT_MODELS

        threat = THREAT_MODELS.get("linf")(0.1)
        attack = ATTACKS.get(attack_name)(**params)
        why = attack.incompatibility(self.defense, threat)
        if why:
            return SKIP, why
        t0 = time.perf_counter()
        _reseed(self.defense, 0)
        gen = torch.Generator(device=self.device).manual_seed(0)
        x, y = self.data.x[:SMOKE_IMAGES], self.data.y[:SMOKE_IMAGES]
        result = attack.run(self.defense, x, y, threat, generator=gen)
        viol = threat.check(x, result.x_adv.detach(), result.params)
        if viol is not None:
            return FAIL, f"{attack_name} returned examples outside linf eps=0.1: {viol}"
        with torch.no_grad():
            clean = float((self.out(x).argmax(1) == y).float().mean())
            robust = float((self.out(result.x_adv.detach()).argmax(1) == y).float().mean())
        return PASS, (f"linf eps=0.1 on {len(x)} images: clean {clean:.2f}, robust "
                      f"{robust:.2f} ({time.perf_counter() - t0:.1f}s)")


def _prepare(defense: Any, dev: torch.device) -> nn.Module:
    """The defense on ``dev`` in eval mode with frozen parameters; TypeError if not a module."""
    if not isinstance(defense, nn.Module):
        raise TypeError(f"built a {type(defense).__name__}, expected a torch.nn.Module")
    defense = defense.to(dev).eval()
    defense.requires_grad_(False)
    return defense


def _build_result(defense: nn.Module) -> CheckResult:
    kind = getattr(defense, "kind", "classifier")
    return CheckResult("build", PASS, (
        f"{type(defense).__name__}: kind={kind}, "
        f"stochastic={bool(getattr(defense, 'stochastic', False))}, "
        f"differentiable={bool(getattr(defense, 'differentiable', True))}, "
        f"nfe_per_call={getattr(defense, 'nfe_per_call', 1)}"))


def check_defense(ref: str, params: dict[str, Any] | None = None, *, dataset: str = "digits",
                  n: int = 8, device: str | None = None, smoke: bool = True
                  ) -> list[CheckResult]:
    """Run every check on the defense ``ref`` built with ``params``; see the module docstring."""
    from benchmark.run.runner import resolve_device

    torch.manual_seed(0)
    dev = resolve_device(device)
    try:
        defense = _prepare(build_defense(ref, params), dev)
    except Exception as exc:
        return [CheckResult("build", FAIL, f"{type(exc).__name__}: {exc}")]
    built = _build_result(defense)
    c = _Checker(defense, _load(dataset, n, dev), dev)
    for name in CHECKS:
        if name in SMOKE_ATTACKS and not smoke:
            c.add(name, SKIP, "--no-smoke")
        else:
            c.run_named(name)
    return [built, *c.results]


def run_check(defense: nn.Module | Callable[[], nn.Module], name: str, *,
              dataset: str = "digits", n: int = 8, device: str | None = None) -> CheckResult:
    """Run the one conformance check ``name`` (``"build"`` or one of :data:`CHECKS`) on
    ``defense``, a module or a zero-argument factory, as :func:`check_defense` would.

    The module is moved to the device, put in eval mode and frozen in place. A check that
    needs a passing ``output_shape`` runs it first (silently) and is skipped when it fails;
    every check but ``build`` is skipped when the factory fails.
    """
    from benchmark.run.runner import resolve_device

    if name != "build" and name not in CHECKS:
        raise ValueError(f"unknown conformance check {name!r} (known: build, "
                         f"{', '.join(CHECKS)})")
    torch.manual_seed(0)
    dev = resolve_device(device)
    try:
        module = defense if isinstance(defense, nn.Module) else defense()
        module = _prepare(module, dev)
    except Exception as exc:
        if name == "build":
            return CheckResult("build", FAIL, f"{type(exc).__name__}: {exc}")
        return CheckResult(name, SKIP, f"needs a passing build check ({type(exc).__name__}: "
                                       f"{exc})")
    if name == "build":
        return _build_result(module)
    c = _Checker(module, _load(dataset, n, dev), dev)
    if name != "output_shape":
        c.run_named("output_shape")
        c.results.clear()
    c.run_named(name)
    return c.results[-1]


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are TOML (``5``, ``0.1``, ``true``, ``"x"``) or bare words."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def importable_cwd() -> None:
    """Let ``module:Class`` name code in the current folder, as ``python -m`` would (the
    ``genbench`` console script does not put it on ``sys.path``)."""
    import os

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def cmd_check_defense(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    importable_cwd()
    t0 = time.perf_counter()
    results = check_defense(args.defense, parse_params(args.param), dataset=args.dataset,
                            n=args.n, device=args.device, smoke=not args.no_smoke)
    print(f"genbench check-defense {args.defense}")
    for r in results:
        print(r)
    failed = [r.name for r in results if r.status == FAIL]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    print(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in "
          f"{time.perf_counter() - t0:.1f}s" + (f"; failed: {', '.join(failed)}" if failed
                                               else ""))
    sys.stdout.flush()
    return EXIT_FAILED if failed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("check-defense", help="conformance checks for a defense plug-in",
                       description="Run the conformance checks on a defense; exit 1 if any "
                                   "fails.")
    p.add_argument("defense", help="module:Class (or a registered defense name)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="constructor argument, e.g. --param model=digits-cnn")
    p.add_argument("--dataset", default="digits", help="dataset of the probe images")
    p.add_argument("-n", type=int, default=8, help="probe images (default 8)")
    p.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    p.add_argument("--no-smoke", action="store_true", help="skip the PGD/AutoAttack smoke run")
    p.set_defaults(func=cmd_check_defense)

