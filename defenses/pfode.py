"""PF-ODE likelihood detector (Arvinte, Cornelius, Martin & Himayat, "Investigating the
Adversarial Robustness of Density Estimation Using the Probability Flow ODE", arXiv 2310.07084,
2023; Song et al. 2021's likelihood computation; docs/design.md section 5.4).

A diffusion denoiser eps(x_t, t) under an SDE schedule (default: subVP, beta_0 = 0.1,
beta_1 = 20, as in the paper's ``cifar10_ddpmpp_deep_continuous`` checkpoint) defines the
probability-flow ODE

    dx/dt = f(t) x - g(t)^2 score(x, t) / 2,   score = -eps(x, t) / std(t),

whose solution carries the data density at t0 = 1e-5 to the N(0, I) prior at t = 1. With the
instantaneous change of variables (Chen et al. 2018),

    log p_{t0}(x) = log N(x(1); 0, I) + int_{t0}^{1} div f(x(t), t) dt,

both integrated jointly with the state by ``torchdiffeq.odeint`` on a fixed grid. The
divergence is Hutchinson's estimate z^T (d f / d x) z with one Rademacher z (a vector-Jacobian
product), or, for small D, the exact trace (``divergence="exact"``, for tests).

The named solvers (:data:`SOLVERS`; a :class:`Solver` may be passed wherever a name is):

* ``fast`` (attacks, :meth:`PFODEDensity.attack_log_prob`): torchdiffeq's ``"rk4"``, which is
  the **3/8-rule** fourth-order Runge-Kutta (``rk4_alt_step_func``; the paper used torchdiffeq's
  fixed-grid RK4), step 0.05 on [t0, 1] (21 grid points, 20 steps, 80 network evaluations),
  ONE Rademacher z for the whole integration, the same on every call (drawn from a generator
  seeded with the defense's seed), so the attack objective is deterministic; differentiable
  (the divergence's VJP is taken with ``create_graph=True``) with per-step gradient
  checkpointing (:class:`_CheckpointedStep`: each step keeps only its input and is recomputed
  in the backward pass, so memory grows with steps x state size, not with activations);
* ``accurate`` (reported, :meth:`PFODEDensity.log_prob`): the same 3/8-rule RK4, step 0.001
  (1001 grid points, 1000 steps, 4000 network evaluations per chunk), a fresh z at every step
  and for every sample (the paper's appendix A.2), drawn from :meth:`Defense.generator_for`;
  no gradient, batched and chunked (``chunk_size`` images at a time);
* ``accurate-100``: ``accurate`` at step 0.01 (100 steps), a named reduced reporting solver for
  CPU-sized runs (its agreement with ``accurate`` is measured beside its definition).

Grid: a step h must divide the schedule's interval up to the start offset t0 (0.05 divides
[0, 1]); the grid is ``linspace(t0, t1, n + 1)`` with n = round((t1 - t0) / h), so the actual
step is (1 - 1e-5) / n. Each grid interval is one call of ``odeint`` on that 2-point grid
(which is what lets each step be checkpointed and given its own z).

Coordinates: the denoiser works on [-1, 1]; the defense takes images in [0, 1] and reports
log-densities in [0, 1]^D coordinates, i.e. adds D ln 2 (the log-Jacobian of x -> 2 x - 1).
Bits/dim are therefore ``-log p / (D ln 2) + 8`` (``bpd_offset = 8``), which equals the
paper's [-1, 1] convention ``-log p' / (D ln 2) + 7`` with log p' = log p - D ln 2. The paper
reports log p' / D (nats per dimension on [-1, 1]), e.g. 3.65 for a CIFAR-10 attack outcome.

Terms (:meth:`PFODEDensity.log_prob_terms`, paper eq. 5): ``prior`` = log N(x(1); 0, I) and
``integral`` = int div f dt + D ln 2 (the volume change of the whole map from [0, 1] images to
the latent), so ``logp = prior + integral``.

NFE: a network evaluation is one batched denoiser call (``Denoiser.nfe``); each also carries
one vector-Jacobian product (D of them for the exact trace), not counted. ``nfe_per_call`` is
the reporting solver's count per chunk; ``last_nfe`` records the count of the latest call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from benchmark.api.density import DensityDefense, check_images
from benchmark.plugins import register_defense
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import Schedule, SDESchedule, SubVPSDE, get_schedule

__all__ = ["SOLVERS", "PFODEDensity", "Solver", "get_solver", "solver_grid"]

_LN2 = math.log(2.0)

#: network evaluations per step of torchdiffeq's fixed-grid methods.
_EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}

Divergence = Literal["hutchinson", "exact"]


@dataclass(frozen=True)
class Solver:
    """A fixed-grid ODE solver setting.

    ``method``: a torchdiffeq fixed-grid method (``"rk4"`` is torchdiffeq's 3/8-rule RK4,
    ``"midpoint"``, ``"euler"``); ``step``: the grid step; ``fresh_noise``: draw a new
    Hutchinson z at every step (and per sample) instead of one fixed z for the integration;
    ``differentiable``: keep the graph (attack objectives) or integrate without gradient, in
    chunks (reporting); default: differentiable exactly when the z is fixed.
    """

    name: str
    step: float
    fresh_noise: bool
    method: str = "rk4"
    differentiable: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in _EVALS_PER_STEP:
            raise ValueError(f"unknown fixed-grid method {self.method!r} for solver "
                             f"{self.name!r} (known: {', '.join(sorted(_EVALS_PER_STEP))})")
        if (isinstance(self.step, bool) or not isinstance(self.step, int | float)
                or not math.isfinite(self.step) or self.step <= 0):
            raise ValueError(f"solver {self.name!r} needs a finite step > 0, got {self.step!r}")
        if self.differentiable is None:  # frozen: set the resolved default once
            object.__setattr__(self, "differentiable", not self.fresh_noise)

    @property
    def evals_per_step(self) -> int:
        return _EVALS_PER_STEP[self.method]


#: the paper's two solvers (appendix A.2), and ``fast-fresh``: the fast grid with a fresh
#: Hutchinson z at every step and for every sample of every call, differentiable (an attack
#: objective that cannot over-fit one fixed probe; see ``attacks/likelihood.py``).
SOLVERS: dict[str, Solver] = {
    "fast": Solver("fast", step=0.05, fresh_noise=False),
    "accurate": Solver("accurate", step=0.001, fresh_noise=True),
    "fast-fresh": Solver("fast-fresh", step=0.05, fresh_noise=True, differentiable=True),
    # the reporting solver at a tenth of the cost (100 steps, 400 network evaluations), for
    # CPU runs that name it. Measured against ``accurate`` under ``digits-eps`` (bits/dim):
    # 8 test digits -0.02 on average (RMS 0.08, per image -0.15 to +0.09); but constant images
    # -0.37 (black), -0.25 (gray), +0.05 (white), 2 evaluations each: it is biased towards
    # higher likelihood where the ODE is stiff near t0, so a table that compares kinds of
    # images must use ``accurate``. 2.4 s instead of 25 s per image on one core
    "accurate-100": Solver("accurate-100", step=0.01, fresh_noise=True),
}


def get_solver(solver: str | Solver) -> Solver:
    """The registered solver ``solver`` (a :class:`Solver` passes through)."""
    if isinstance(solver, Solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown PF-ODE solver {solver!r} (known: {', '.join(SOLVERS)})")
    return SOLVERS[solver]


def solver_grid(step: float, t0: float, t1: float) -> int:
    """Number of steps n of the grid ``linspace(t0, t1, n + 1)`` for a nominal ``step``.

    ``step`` must divide the interval [t0, t1] up to the start offset t0 (the paper's 0.05
    divides [0, 1] and the grid starts at t0 = 1e-5); otherwise ``ValueError`` naming both.
    """
    span = t1 - t0
    if not 0 < step <= span + t0:
        raise ValueError(f"step {step!r} must lie in (0, {span + t0:g}] for the interval "
                         f"[t0={t0:g}, t1={t1:g}]")
    n = max(1, round(span / step))
    if abs(n * step - span) > t0 + 1e-9 * max(1.0, span):
        raise ValueError(f"step {step!r} does not divide the integration interval "
                         f"[t0={t0:g}, t1={t1:g}] of length {span:g} "
                         f"(length / step = {span / step:.6g})")
    return n


def _event_shape(denoiser: Denoiser) -> tuple[int, ...] | None:
    shape = getattr(denoiser, "event_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    size, chans = getattr(denoiser, "image_size", None), getattr(denoiser, "in_channels", None)
    if isinstance(size, int) and isinstance(chans, int):
        return (chans, size, size)
    return None


def _rademacher(shape: tuple[int, ...], *, like: Tensor,
                generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


class _Drift:
    """The augmented PF-ODE right-hand side (x, I) -> (drift, div drift) for torchdiffeq.

    ``z`` is the Hutchinson probe of the current step (broadcast against x), or None for the
    exact trace. With ``graph=True`` the divergence stays differentiable in x (create_graph).
    A plain callable, not a module, so the denoiser is registered once (on the defense).
    """

    def __init__(self, denoiser: Denoiser, sde: SDESchedule, divergence: Divergence) -> None:
        self.denoiser = denoiser
        self.sde = sde
        self.divergence = divergence
        self.z: Tensor | None = None
        self.graph = False

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        graph = self.graph and torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if (graph and x.requires_grad) else x.detach().requires_grad_(True)
            drift = self.denoiser.pf_ode_drift(xg, t, None, schedule=self.sde)
            div = self._div(drift, xg, graph)
        if not graph:
            drift, div = drift.detach(), div.detach()
        return drift, div

    def _div(self, drift: Tensor, x: Tensor, graph: bool) -> Tensor:
        if self.divergence == "hutchinson":
            if self.z is None:
                raise RuntimeError("no Hutchinson probe z set for this step")
            z = self.z.expand_as(x)
            (vjp,) = torch.autograd.grad(drift, x, z, create_graph=graph)
            return (vjp * z).flatten(1).sum(1)
        # exact trace: D VJPs with the basis vectors, batched through vmap (small D only)
        flat = drift.flatten(1)
        d = flat.shape[1]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        basis = eye[:, None, :].expand(d, *flat.shape)
        (rows,) = torch.autograd.grad(flat, x, basis, create_graph=graph, is_grads_batched=True)
        return torch.einsum("ibi->b", rows.flatten(2))


StepFn = Callable[[Tensor, Tensor, "Tensor | None", Tensor, bool], tuple[Tensor, Tensor]]


class _CheckpointedStep(torch.autograd.Function):
    """One solver step that keeps only its inputs: the forward runs without a graph, the
    backward recomputes the step with one (create_graph VJPs) and back-propagates through it.

    ``torch.utils.checkpoint`` does not fit here because the step itself calls
    ``torch.autograd.grad`` (the Hutchinson VJP): the non-reentrant variant then unpacks the
    step's own saved tensors during the forward and recomputes the step once per network
    evaluation (3.5x the NFE, measured), and the reentrant variant forbids
    ``torch.autograd.grad`` on its outputs, which attacks use.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, run: StepFn,
                x: Tensor, acc: Tensor, z: Tensor | None, ts: Tensor
                ) -> tuple[Tensor, Tensor]:
        ctx.run = run  # type: ignore[attr-defined]
        ctx.z = z  # type: ignore[attr-defined]  # a constant probe (no grad), or None
        ctx.save_for_backward(x, acc, ts)
        return run(x, acc, z, ts, False)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 gx: Tensor, gacc: Tensor) -> tuple[None, Tensor, Tensor, None, None]:
        x, acc, ts = ctx.saved_tensors  # type: ignore[attr-defined]
        with torch.enable_grad():
            xi, ai = x.detach().requires_grad_(True), acc.detach().requires_grad_(True)
            x1, a1 = ctx.run(xi, ai, ctx.z, ts, True)  # type: ignore[attr-defined]
            grads = torch.autograd.grad((x1, a1), (xi, ai), (gx, gacc), allow_unused=True)
        gxi = torch.zeros_like(x) if grads[0] is None else grads[0]
        gai = torch.zeros_like(acc) if grads[1] is None else grads[1]
        return None, gxi, gai, None, None


@register_defense("pfode")
class PFODEDensity(DensityDefense):
    """Probability-flow ODE log-likelihood of a diffusion denoiser (see the module docstring).

    Keyword arguments:

    * ``denoiser``: a zoo model name (default ``"digits-eps"``, used unconditionally through
      its null label) or any :class:`~benchmark.zoo.denoiser.Denoiser` (e.g. the analytic
      ``GaussianDenoiser``);
    * ``schedule``: an SDE schedule name or object (default subVP, beta_0 = 0.1, beta_1 = 20,
      t0 = 1e-5); discrete schedules (``ddpm``) are rejected;
    * ``divergence``: ``"hutchinson"`` (one Rademacher z, the paper's) or ``"exact"`` (D VJPs);
    * ``attack_solver`` / ``report_solver``: solver names or :class:`Solver` objects
      (``"fast"`` / ``"accurate"``);
    * ``checkpoint``: per-step gradient checkpointing of the differentiable solver;
    * ``chunk_size``: images integrated together by :meth:`log_prob`;
    * ``prior``: log-density of the latent x(1) in model space (default: the schedule's
      N(0, prior_std^2 I)); tests pass the exact marginal at t1 of an analytic model;
    * ``event_shape``: (C, H, W) when the denoiser does not tell it.
    """

    stochastic = True  # log_prob draws a fresh Hutchinson z at every step
    bpd_offset = 8.0

    def __init__(self, *, denoiser: str | Denoiser = "digits-eps",
                 schedule: str | Schedule | None = None,
                 divergence: Divergence = "hutchinson",
                 attack_solver: str | Solver = "fast",
                 report_solver: str | Solver = "accurate",
                 checkpoint: bool = True, chunk_size: int = 64,
                 prior: Callable[[Tensor], Tensor] | None = None,
                 event_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.denoiser = self._load(denoiser).eval()
        self.denoiser.requires_grad_(False)
        sched = SubVPSDE() if schedule is None else get_schedule(schedule)
        if not isinstance(sched, SDESchedule):
            raise ValueError(f"the PF-ODE needs an SDE schedule (vp, subvp, edm), got "
                             f"{sched.name!r}, which is discrete")
        self.sde: SDESchedule = sched
        if divergence not in ("hutchinson", "exact"):
            raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {divergence!r}")
        self.divergence: Divergence = divergence
        self.attack_solver = get_solver(attack_solver)
        self.report_solver = get_solver(report_solver)
        self._steps: dict[Solver, int] = {}
        for s in (self.attack_solver, self.report_solver):
            self._n_steps(s)  # fail at construction on a bad grid
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.use_checkpoint = bool(checkpoint)
        self.prior = prior
        shape = tuple(event_shape) if event_shape is not None else _event_shape(self.denoiser)
        if shape is None:
            raise ValueError(f"cannot tell the image shape of {type(self.denoiser).__name__}; "
                             f"pass event_shape=(C, H, W)")
        self.event_shape = shape
        self.dim = math.prod(shape)
        self._drift = _Drift(self.denoiser, self.sde, divergence)
        self.nfe_per_call = self.nfe_of(self.report_solver)
        #: denoiser evaluations of the latest call (all chunks).
        self.last_nfe = 0

    @staticmethod
    def _load(denoiser: str | Denoiser) -> Denoiser:
        if isinstance(denoiser, Denoiser):
            return denoiser
        if not isinstance(denoiser, str):
            raise TypeError(f"denoiser must be a zoo model name or a Denoiser (eps network "
                            f"conditioned on log-SNR), got {type(denoiser).__name__}")
        from benchmark.zoo import load_model

        model = load_model(denoiser)
        if not isinstance(model, Denoiser):
            raise TypeError(f"zoo model {denoiser!r} is a {type(model).__name__}, "
                            f"not a Denoiser")
        return model

    # -- solver bookkeeping ------------------------------------------------------------------
    def _n_steps(self, solver: Solver) -> int:
        if solver not in self._steps:
            self._steps[solver] = solver_grid(float(solver.step), self.sde.t0, self.sde.t1)
        return self._steps[solver]

    def _solver(self, solver: str | Solver | None, default: Solver) -> Solver:
        s = default if solver is None else get_solver(solver)
        self._n_steps(s)
        return s

    def nfe_of(self, solver: str | Solver) -> int:
        """Denoiser evaluations of one integration (one chunk) with ``solver``."""
        s = get_solver(solver)
        return self._n_steps(s) * s.evals_per_step

    def _grid(self, solver: Solver, like: Tensor, *, reverse: bool) -> Tensor:
        grid = torch.linspace(self.sde.t0, self.sde.t1, self._n_steps(solver) + 1,
                              dtype=torch.float64)
        grid = grid.flip(0) if reverse else grid
        return grid.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))

    def _fixed_z(self, like: Tensor) -> Tensor:
        """The fast solver's one z: the same for every call and sample (seeded by ``reseed``)."""
        g = torch.Generator(device=like.device)
        g.manual_seed(self._seed if self._seed is not None else 0)
        return _rademacher((1, *like.shape[1:]), like=like, generator=g)

    # -- the integration ---------------------------------------------------------------------
    def _stepper(self, method: str) -> StepFn:
        """One ``odeint`` call over a 2-point grid ``ts`` with probe ``z``."""
        from torchdiffeq import odeint

        def step(x: Tensor, acc: Tensor, z: Tensor | None, ts: Tensor,
                 graph: bool) -> tuple[Tensor, Tensor]:
            self._drift.z, self._drift.graph = z, graph
            xs, accs = odeint(self._drift, (x, acc), ts, method=method)
            return xs[-1], accs[-1]

        return step

    def _integrate(self, x: Tensor, solver: Solver, *, reverse: bool, graph: bool
                   ) -> tuple[Tensor, Tensor]:
        """Integrate (x, 0) over the grid (t0 -> t1, or t1 -> t0 with ``reverse``): the end
        state and the accumulated int div f dt along the way (signed by direction)."""
        grid = self._grid(solver, x, reverse=reverse)
        acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        fixed = None
        if self.divergence == "hutchinson" and not solver.fresh_noise:
            fixed = self._fixed_z(x)
        gen = self.generator_for(x)
        ckpt = graph and self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad
        step = self._stepper(solver.method)
        for i in range(len(grid) - 1):
            z = fixed
            if self.divergence == "hutchinson" and solver.fresh_noise:
                z = _rademacher(tuple(x.shape), like=x, generator=gen)
            ts = grid[i:i + 2]
            if ckpt:
                x, acc = _CheckpointedStep.apply(step, x, acc, z, ts)
            else:
                x, acc = step(x, acc, z, ts, graph)
        return x, acc

    def _prior_logp(self, x1: Tensor) -> Tensor:
        return self.sde.prior_logp(x1) if self.prior is None else self.prior(x1)

    def _encode(self, x01: Tensor, solver: Solver, *, graph: bool
                ) -> tuple[Tensor, dict[str, Tensor]]:
        self._check(x01)
        nfe0 = self.denoiser.nfe
        x1, integral = self._integrate(2 * x01 - 1, solver, reverse=False, graph=graph)
        self.last_nfe = self.denoiser.nfe - nfe0
        prior = self._prior_logp(x1)
        integral = integral + self.dim * _LN2
        return x1, {"logp": prior + integral, "integral": integral, "prior": prior}

    def _terms(self, x01: Tensor, solver: Solver, *, graph: bool) -> dict[str, Tensor]:
        return self._encode(x01, solver, graph=graph)[1]

    def encode(self, x: Tensor, *, solver: str | Solver | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
        """The latent x(t1) (model space) of images ``x`` in [0, 1] and the terms of
        :meth:`log_prob_terms` (default: the attack solver, differentiable; the reverse
        integration attack starts from the latent of a test image)."""
        s = self._solver(solver, self.attack_solver)
        if s.differentiable:
            return self._encode(x, s, graph=True)
        with torch.no_grad():
            return self._encode(x, s, graph=False)

    def _check(self, x: Tensor) -> None:
        check_images(x.detach() if isinstance(x, Tensor) else x)
        if tuple(x.shape[1:]) != self.event_shape:
            shape = ", ".join(map(str, self.event_shape))
            raise ValueError(f"expected images of shape (B, {shape}), got {tuple(x.shape)}")

    # -- the density contract ----------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """Reported log p(x) (nats, [0, 1]^D coordinates) with the reporting solver: no
        gradient, ``chunk_size`` images integrated at a time."""
        return self.log_prob_terms(x, solver=self.report_solver)["logp"]

    def attack_log_prob(self, x: Tensor) -> Tensor:
        """Differentiable log p(x) with the attack solver (fixed z, checkpointed steps)."""
        return self._terms(x, self.attack_solver, graph=True)["logp"]

    def log_prob_terms(self, x: Tensor, *, solver: str | Solver | None = None
                       ) -> dict[str, Tensor]:
        """``{"logp", "integral", "prior"}``, each (B,), with ``logp = prior + integral``.

        The reporting solver (default) runs without gradient, in chunks; a solver with a fixed
        z (``fast``) or a differentiable one (``fast-fresh``) keeps the graph, so attacks can
        use any term (the prior-only attack).
        """
        s = self._solver(solver, self.report_solver)
        if s.differentiable:
            return self._terms(x, s, graph=True)
        self._check(x)
        parts: list[dict[str, Tensor]] = []
        nfe = 0
        with torch.no_grad():
            for chunk in x.split(self.chunk_size):
                parts.append(self._terms(chunk, s, graph=False))
                nfe += self.last_nfe
        self.last_nfe = nfe
        return {k: torch.cat([p[k] for p in parts]) for k in ("logp", "integral", "prior")}

    def sample_from_latent(self, x1: Tensor, *, solver: str | Solver | None = None
                           ) -> tuple[Tensor, Tensor]:
        """Integrate a latent x1 (model space, shape (B, *event_shape)) backwards from t1 to
        t0: the image in [0, 1] coordinates (not clamped) and its log p (paper eq. 6),
        ``log p1(x1) + int_{t0}^{t1} div f dt + D ln 2``. Differentiable in x1 with the attack
        solver (the default; the reverse-integration attack optimizes x1)."""
        s = self._solver(solver, self.attack_solver)
        if not isinstance(x1, Tensor) or tuple(x1.shape[1:]) != self.event_shape:
            raise ValueError(f"x1 must be a tensor of shape (B, "
                             f"{', '.join(map(str, self.event_shape))}), got "
                             f"{tuple(x1.shape) if isinstance(x1, Tensor) else type(x1)}")
        if not torch.isfinite(x1).all():
            raise ValueError("x1 has non-finite values")
        nfe0 = self.denoiser.nfe
        graph = bool(s.differentiable)
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            x0, acc = self._integrate(x1, s, reverse=True, graph=graph)
            # integrating from t1 down to t0 accumulates -int_{t0}^{t1} div f dt
            logp = self._prior_logp(x1) - acc + self.dim * _LN2
        self.last_nfe = self.denoiser.nfe - nfe0
        return (x0 + 1) / 2, logp

    def extra_repr(self) -> str:
        return (f"schedule={self.sde!r}, divergence={self.divergence!r}, "
                f"attack_solver={self.attack_solver.name!r} "
                f"(step={self.attack_solver.step}), report_solver="
                f"{self.report_solver.name!r} (step={self.report_solver.step}), "
                f"checkpoint={self.use_checkpoint}, chunk_size={self.chunk_size}, "
                + super().extra_repr())
