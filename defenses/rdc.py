"""Diffusion classifier (DC) and Robust Diffusion Classifier (RDC): Chen et al., "Robust
Classification via a Single Diffusion Model" (ICML 2024; docs/design.md section 5.1).

DC (paper eq. 6 and 9): with a class-conditional noise predictor,

    logit_y(x) = - 1/T' sum_{t in T'} || eps(x_t, t, y) - eps_t ||^2,   x_t = a_t x + s_t eps_t,

over a systematic subset T' = {i T / T'} of the T = 1000 DDPM timesteps (paper: all T, and
"uniform" systematic sampling in its ablation, fig. 2a), one eps per timestep (shared across
classes by default, sec. 3.5), w_t = 1, uniform prior. Classes and timesteps are evaluated as
large batches of ``rows_per_batch`` denoiser rows, never in Python loops over classes.

RDC (algorithm 1) first maximizes the likelihood by minimizing the *unconditional* diffusion
loss within an l-inf ball (``v1``: N = 10 momentum sign steps, mu = 1, eta = 8/255, step eta/N;
the l2 variant of appendix C uses eta = 0.5), or with the authors' later public code (``t1``:
Adam, lr 0.1 in [-1, 1] space, 5 steps, one noise level per step and per row with EDM
sigma ~ U[0.4, 0.6]). In both of the paper's settings eta equals the attack's epsilon:
suites set ``eta`` per threat model (see :class:`RobustDiffusionClassifier`).

Paper numbers (CIFAR-10, 512 test images, tables 1 and 3): RDC 73.24% robust under l-inf 8/255,
80.27% under l2 0.5, 91.41% under StAdv; BPDA (N = 10) 73.24, Lagrange 77.54, exact gradient
(N = 1) 69.53, BPDA (N = 1) 69.92. The optimal diffusion classifier (theorem 3.2) is 100%
robust at l-inf 8/255 and l2 0.5.

Both defenses are stochastic (fresh eps on every call, drawn from the harness-seeded generator).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from benchmark.api.defense import Defense
from benchmark.plugins import register_defense
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import DDPM, EDM


def systematic_timesteps(T: int, t_prime: int) -> Tensor:  # noqa: N803 (the paper's T)
    """The paper's "uniform" subset {i T / T'}_{i=1..T'} as 0-based DDPM indices."""
    if isinstance(t_prime, bool) or not isinstance(t_prime, int):
        raise TypeError(f"timesteps (T') must be an integer, got {t_prime!r}")
    if not 1 <= t_prime <= T:
        raise ValueError(f"timesteps (T') must be in [1, T={T}], got {t_prime}")
    i = torch.arange(1, t_prime + 1, dtype=torch.float64)
    return (torch.floor(i * T / t_prime).long() - 1).clamp(0, T - 1)


def _load_denoiser(denoiser: str | Denoiser) -> Denoiser:
    if isinstance(denoiser, Denoiser):
        return denoiser
    if not isinstance(denoiser, str):
        raise TypeError(f"denoiser must be a zoo model name or a Denoiser, got {denoiser!r}")
    from benchmark.zoo import load_model

    model = load_model(denoiser)
    if not isinstance(model, Denoiser):
        raise TypeError(f"zoo model {denoiser!r} is a {type(model).__name__}, not a Denoiser")
    return model


def tune_rows_per_batch(denoiser: Denoiser, event: tuple[int, ...], device: torch.device,
                        dtype: torch.dtype = torch.float32,
                        sizes: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024),
                        budget_s: float = 2.0) -> int:
    """The batch size with the highest denoiser throughput (rows/s) among ``sizes``."""
    import time

    best, best_rate = sizes[0], 0.0
    spent = 0.0
    nfe = denoiser.nfe
    for size in sizes:
        z = torch.zeros((size, *event), device=device, dtype=dtype)
        lam = torch.zeros(size, device=device, dtype=dtype)
        y = torch.zeros(size, dtype=torch.long, device=device) if denoiser.conditional else None
        with torch.no_grad():
            denoiser.eps_normalized(z, lam, y)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            denoiser.eps_normalized(z, lam, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
        spent += 2 * dt
        rate = size / max(dt, 1e-9)
        if rate > best_rate:
            best, best_rate = size, rate
        if spent > budget_s:
            break
    denoiser.nfe = nfe  # probing is not part of any prediction's cost
    return best


class _RowErrorsWithGrad(torch.autograd.Function):
    """Per-row denoising errors ``err_r = f(x_r)`` whose input gradients are computed in the
    forward pass, one chunk at a time: a first-order backward without a stored graph and
    without recomputing the chunk (what :func:`torch.utils.checkpoint.checkpoint` does).

    Valid because each row's error depends on its own row only (the denoiser is in eval mode,
    with frozen weights and no batch statistics): the Jacobian of the errors with respect to
    the rows is block-diagonal, so the vector-Jacobian product of any outer loss is
    ``grad_err[r] * grad f(x_r)``. Memory is one chunk's activations plus one gradient per
    row (the rows' own size). A backward that builds a graph (``create_graph=True``, a second
    derivative to come) recomputes the chunk with its graph instead, so second derivatives
    stay exact; RDC's exact likelihood-maximization steps skip this class altogether
    (:meth:`DiffusionClassifier._second_order_graph`)."""

    @staticmethod
    def forward(ctx: Any, xt: Tensor, t: Tensor, y: Tensor | None, eps: Tensor,
                error: Any) -> Tensor:
        with torch.enable_grad():
            rows = xt.detach().requires_grad_(True)
            err = error(rows, t, y, eps)
            (grad,) = torch.autograd.grad(err.sum(), rows)
        ctx.save_for_backward(xt, grad)
        ctx.rest, ctx.error = (t, y, eps), error
        return err.detach()

    @staticmethod
    def backward(ctx: Any, grad_err: Tensor) -> tuple[Tensor | None, ...]:
        xt, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this gradient is asked for: recompute
            with torch.enable_grad():
                err = ctx.error(xt, *ctx.rest)
                (g,) = torch.autograd.grad(err, xt, grad_err, create_graph=True)
            return g, None, None, None, None
        return grad_err.view(-1, *[1] * (grad.dim() - 1)) * grad, None, None, None, None


@register_defense("dc")
class DiffusionClassifier(Defense):
    """DC: class scores from the conditional noise-prediction error (see module docstring).

    Parameters: ``denoiser`` (zoo name or :class:`Denoiser`, class-conditional),
    ``timesteps`` (T', the systematic subset size; recorded in every row through the params),
    ``classes`` (which labels to score; default all), ``share_noise`` (one eps per timestep for
    all classes), ``rows_per_batch`` (denoiser batch size, or ``"auto"``, which measures the
    denoiser's throughput at a few batch sizes once and keeps the fastest: on a 2-core CPU a
    tiny UNet peaks near 32-256 rows and slows down at thousands), ``checkpoint`` (where a
    graph is kept for a second derivative, RDC's exact likelihood steps: recompute chunks in
    backward so memory does not grow with T' x K activations). First-order gradients (every
    attack on DC, RDC's likelihood maximization) never keep the chunks' graphs: each chunk's
    input gradient is computed as it is evaluated (:class:`_RowErrorsWithGrad`), which needs
    the memory of one chunk and no recomputation.
    """

    kind = "classifier"
    stochastic = True
    timesteps: Tensor  # buffers (declared for type checkers)
    classes: Tensor

    def __init__(self, *, denoiser: str | Denoiser = "digits-eps", timesteps: int = 100,
                 classes: Sequence[int] | None = None, share_noise: bool = True,
                 rows_per_batch: int | str = "auto", checkpoint: bool = True) -> None:
        super().__init__()
        self.denoiser = _load_denoiser(denoiser).eval()
        self.denoiser.requires_grad_(False)
        if not self.denoiser.conditional:
            raise ValueError(f"the diffusion classifier needs a class-conditional denoiser; "
                             f"{type(self.denoiser).__name__} is unconditional")
        self.schedule = DDPM()
        self.register_buffer("timesteps", systematic_timesteps(self.schedule.T, timesteps),
                             persistent=False)
        if classes is None:
            classes = list(range(self.denoiser.num_classes))
        classes = list(classes)
        if not classes:
            raise ValueError("classes must be a non-empty list of labels, got []")
        bad = [c for c in classes if not 0 <= int(c) < self.denoiser.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are outside [0, {self.denoiser.num_classes})")
        self.register_buffer("classes", torch.tensor(classes, dtype=torch.long),
                             persistent=False)
        self.num_classes = len(classes)
        if rows_per_batch != "auto" and (isinstance(rows_per_batch, bool) or
                                         not isinstance(rows_per_batch, int) or
                                         rows_per_batch < 1):
            raise ValueError(f"rows_per_batch must be 'auto' or an integer >= 1, "
                             f"got {rows_per_batch!r}")
        self._rows_setting = rows_per_batch
        self._tuned: dict[tuple[Any, ...], int] = {}
        self.share_noise = bool(share_noise)
        self.use_checkpoint = bool(checkpoint)
        #: set while a second-order graph is being built (RDC's exact likelihood steps)
        self._second_order = False
        self.nfe_per_call = len(self.timesteps) * self.num_classes

    # -- the diffusion loss over (sample, timestep, class) rows ------------------------------
    def _noise(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self.generator_for(like), device=like.device,
                           dtype=like.dtype)

    def rows_per_batch_for(self, like: Tensor) -> int:
        """The denoiser batch size: fixed, or (``"auto"``) the fastest of a few sizes, measured
        once per device and image shape (the largest batch is not the fastest on a CPU)."""
        if self._rows_setting != "auto":
            return int(self._rows_setting)
        key = (like.device.type, like.device.index, tuple(like.shape[1:]), like.dtype)
        if key not in self._tuned:
            self._tuned[key] = tune_rows_per_batch(self.denoiser, tuple(like.shape[1:]),
                                                   like.device, like.dtype)
        return self._tuned[key]

    def _row_errors(self, xt: Tensor, t: Tensor, y: Tensor | None, eps: Tensor) -> Tensor:
        """||eps(x_t, t, y) - eps||^2 per row, in chunks of ``rows_per_batch``. Under autograd
        each chunk's input gradient is computed as the chunk is evaluated
        (:class:`_RowErrorsWithGrad`: one forward and one backward per row, memory of one
        chunk); only a graph meant for a second derivative (:meth:`_second_order_graph`) keeps
        the chunks, checkpointed with ``checkpoint=True``."""
        out = []
        rows = self.rows_per_batch_for(xt)
        graph = torch.is_grad_enabled() and xt.requires_grad
        for start in range(0, len(xt), rows):
            sl = slice(start, start + rows)
            args = (xt[sl], t[sl], None if y is None else y[sl], eps[sl])
            if graph and not self._second_order:  # first order: gradients chunk by chunk
                err = _RowErrorsWithGrad.apply(*args, self._chunk_error)
            elif graph and self.use_checkpoint:
                err = checkpoint(self._chunk_error, *args, use_reentrant=False)
            else:
                err = self._chunk_error(*args)
            out.append(err)
        # an empty batch (attack libraries query one when every point is already fooled)
        return torch.cat(out) if out else xt.new_zeros(0)

    @contextmanager
    def _second_order_graph(self) -> Iterator[None]:
        """Within: the errors keep a graph that can be differentiated twice."""
        saved = self._second_order
        self._second_order = True
        try:
            yield
        finally:
            self._second_order = saved

    def _chunk_error(self, xt: Tensor, t: Tensor, y: Tensor | None, eps: Tensor) -> Tensor:
        pred = self.denoiser.eps(xt, t, y, schedule=self.schedule)
        return (pred - eps).pow(2).flatten(1).sum(1)

    def _perturb(self, x01: Tensor, eps: Tensor, timesteps: Tensor | None = None) -> Tensor:
        """x_t for every (sample, timestep): shapes (B, T', *event) (T' = ``timesteps``,
        default the classifier's)."""
        a, s = self.schedule.alpha_sigma(self.timesteps if timesteps is None else timesteps)
        view = (1, -1) + (1,) * (x01.dim() - 1)
        x0 = (2 * x01 - 1).unsqueeze(1)
        return a.to(x01.dtype).view(view) * x0 + s.to(x01.dtype).view(view) * eps

    def class_losses(self, x01: Tensor) -> Tensor:
        """Mean conditional diffusion loss per (sample, class): shape (B, K)."""
        b, tp, k = len(x01), len(self.timesteps), self.num_classes
        event = tuple(x01.shape[1:])
        if self.share_noise:
            eps = self._noise((b, tp, *event), x01)
            xt = self._perturb(x01, eps)  # (B, T', ...)
            # rows ordered (sample, timestep, class)
            xt_rows = xt.unsqueeze(2).expand(b, tp, k, *event).reshape(b * tp * k, *event)
            eps_rows = eps.unsqueeze(2).expand(b, tp, k, *event).reshape(b * tp * k, *event)
        else:
            eps = self._noise((b, tp, k, *event), x01)
            a, s = self.schedule.alpha_sigma(self.timesteps)
            view = (1, -1, 1) + (1,) * (x01.dim() - 1)
            x0 = (2 * x01 - 1)[:, None, None]
            xt_rows = (a.to(x01.dtype).view(view) * x0 + s.to(x01.dtype).view(view) * eps
                       ).reshape(b * tp * k, *event)
            eps_rows = eps.reshape(b * tp * k, *event)
        t_rows = self.timesteps.view(1, tp, 1).expand(b, tp, k).reshape(-1)
        y_rows = self.classes.view(1, 1, k).expand(b, tp, k).reshape(-1)
        err = self._row_errors(xt_rows, t_rows, y_rows, eps_rows)
        return err.view(b, tp, k).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return -self.class_losses(x)

    def likelihood_objective(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """The unconditional diffusion loss per sample (lower = higher likelihood bound).

        ``eps`` (B, T', *event) fixes the noise; by default it is drawn from the defense's
        generator."""
        return self._uncond_loss(x, self.timesteps, eps)

    def _uncond_loss(self, x: Tensor, timesteps: Tensor, eps: Tensor | None = None) -> Tensor:
        """The unconditional DDPM loss per sample, averaged over ``timesteps``."""
        b, tp = len(x), len(timesteps)
        event = tuple(x.shape[1:])
        if eps is None:
            eps = self._noise((b, tp, *event), x)
        xt = self._perturb(x, eps, timesteps).reshape(b * tp, *event)
        t_rows = timesteps.repeat(b)
        err = self._row_errors(xt, t_rows, None, eps.reshape(b * tp, *event))
        return err.view(b, tp).mean(dim=1)

    def config(self) -> dict[str, Any]:
        """The resolved settings (defaults filled in), for ``repr`` and records."""
        return {"timesteps": len(self.timesteps), "classes": self.classes.tolist(),
                "share_noise": self.share_noise, "rows_per_batch": self._rows_setting,
                "checkpoint": self.use_checkpoint}

    def extra_repr(self) -> str:
        own = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{own}, " + super().extra_repr()


#: default ``tau`` of :meth:`RobustDiffusionClassifier.smooth_sign` (see its docstring).
DEFAULT_SIGN_TAU = 0.5

_TINY = 1e-12  # floor of the scales below (an all-zero momentum)


def check_sign_tau(tau: object) -> float:
    """``tau`` of a smooth sign surrogate as a float: a finite number > 0, else an error that
    names the value."""
    if isinstance(tau, bool) or not isinstance(tau, int | float):
        raise TypeError(f"sign_tau must be a finite number > 0 (the temperature of the smooth "
                        f"sign surrogate), got {tau!r} ({type(tau).__name__})")
    if not (math.isfinite(float(tau)) and tau > 0):
        raise ValueError(f"sign_tau must be a finite number > 0 (the temperature of the "
                         f"smooth sign surrogate), got {tau!r}")
    return float(tau)


def _per_sample_mean(v: Tensor) -> Tensor:
    """The mean of ``v`` over each sample's elements, shaped (B, 1, ..., 1)."""
    return v.flatten(1).mean(1).view(-1, *[1] * (v.dim() - 1))


def smooth_sign(m: Tensor, tau: float | None) -> Tensor:
    """``sign(m)`` in the forward pass, bit for bit. In the backward pass the derivative of
    sign (zero almost everywhere) is replaced, when ``tau`` is set, by that of the
    scale-free surrogate ``tanh(m / (tau * mean|m|))`` (the mean over each sample's elements,
    differentiated too: like sign, the surrogate is unchanged when m is scaled).

    Straight-through form ``sign(m).detach() + (t - t.detach())``: the added term is exactly
    0 in the forward pass, so the values are sign's; its derivatives (of every order) are
    t's; it is ordinary autograd, so it works under ``create_graph`` (double backward) and
    checkpoint recomputation."""
    s = m.sign()
    if tau is None or not m.requires_grad:
        return s
    t = torch.tanh(m / (tau * _per_sample_mean(m.abs()).clamp_min(_TINY)))
    return s.detach() + (t - t.detach())


def smooth_adam_ratio(m_hat: Tensor, v_hat: Tensor, tiny: float, tau: float | None) -> Tensor:
    """Adam's ``m_hat / sqrt(v_hat + tiny^2)`` in the forward pass, bit for bit. At the first
    step it is g / sqrt(g^2 + tiny^2): sign(g) with a true derivative that vanishes, except
    for |g| below ~tiny, where it reaches 1 / tiny = 1e8 (an exact gradient that explodes
    wherever the objective is flat in a pixel; later steps, a ratio of moving averages,
    have slopes ~ 1 / |g|). When ``tau`` is set, the backward pass is that of
    ``m_hat / sqrt(v_hat + (tau * mean sqrt(v_hat))^2)``: Adam with an epsilon at ``tau`` times
    the sample's typical gradient magnitude, which at the first step is the algebraic sigmoid
    g / sqrt(g^2 + (tau mean|g|)^2), the analogue of :func:`smooth_sign`'s tanh."""
    ratio = m_hat / (v_hat + tiny * tiny).sqrt()
    if tau is None or not ratio.requires_grad:
        return ratio
    scale = _per_sample_mean((v_hat + tiny * tiny).sqrt())
    smooth = m_hat / (v_hat + (tau * scale).square() + tiny * tiny).sqrt()
    return ratio.detach() + (smooth - smooth.detach())  # the value of ratio, smooth's slope


@register_defense("rdc")
class RobustDiffusionClassifier(DiffusionClassifier):
    """RDC = likelihood maximization (``purify``) then DC (``head``); see module docstring.

    ``variant``: ``"v1"`` (the paper) or ``"t1"`` (the authors' later code). ``norm`` ("linf" or
    "l2") sets v1's ball; ``steps``, ``eta``, ``momentum`` override v1's N, eta, mu; ``lr``,
    ``sigma_range`` override t1's. ``lm_timesteps`` is the T' of v1's likelihood objective
    (default: the classifier's). :meth:`config` reports all of them resolved.

    **eta.** The paper sets the likelihood-maximization budget eta equal to the attack's
    epsilon in both of its settings (l-inf 8/255, l2 0.5; sec. 4.1 and appendix C); that is
    the rule, and the default here is the paper's epsilon (8/255 for ``norm="linf"``, 0.5 for
    ``"l2"``) whatever the threat. A threat with another epsilon (digits: l-inf 0.1, l2 1.0)
    needs eta set to it: suites set ``eta`` per threat model (``params_by_threat``), which
    records it in each job's defense params. With the default, a larger attack budget faces a
    likelihood maximization that cannot move the input back as far as it was pushed.

    **Exact gradients.** Differentiating ``purify`` (the ``exact`` attack) is second order.
    For v1 under l-inf the step is ``x + gamma sign(m)``, and sign has zero derivative: the
    exact Jacobian of ``purify`` is the identity masked where the box clip [0, 1] binds (digit
    backgrounds sit at 0), i.e. BPDA with holes, at about 2.5 times BPDA's cost. The same holds
    at t1's first Adam step (m_hat / sqrt(v_hat) = g / sqrt(g^2 + 1e-16)), except where |g|
    falls below ~1e-5: there the true slope spikes (up to 1e8). :meth:`smooth_sign` gives these
    steps a smooth backward (forward values unchanged); ``exact(sign_tau=...)`` uses it. v1's
    l2 steps (m / ||m||) are smooth already.
    """

    def __init__(self, *, variant: str = "v1", norm: str = "linf", steps: int | None = None,
                 eta: float | None = None, momentum: float = 1.0, lr: float = 0.1,
                 sigma_range: Sequence[float] = (0.4, 0.6), lm_timesteps: int | None = None,
                 **dc_kwargs: Any) -> None:
        super().__init__(**dc_kwargs)
        if variant not in ("v1", "t1"):
            raise ValueError(f"variant must be 'v1' (paper) or 't1' (later code), "
                             f"got {variant!r}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        default_steps = 10 if variant == "v1" else 5
        steps = default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise TypeError(f"likelihood-maximization steps must be an integer >= 0, "
                            f"got {steps!r}")
        if eta is None:
            eta = 8 / 255 if norm == "linf" else 0.5
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta > 0:
            raise TypeError(f"likelihood-maximization budget eta must be a number > 0, "
                            f"got {eta!r}")
        lo, hi = (float(v) for v in sigma_range)
        if not 0 < lo <= hi:
            raise ValueError(f"sigma_range must satisfy 0 < low <= high, got {sigma_range!r}")
        self.variant, self.norm, self.steps = variant, norm, steps
        self.eta, self.momentum, self.lr = float(eta), float(momentum), float(lr)
        self.sigma_range = (lo, hi)
        self.lm_timesteps: Tensor
        if lm_timesteps is not None:
            self.register_buffer("lm_timesteps",
                                 systematic_timesteps(self.schedule.T, lm_timesteps),
                                 persistent=False)
        else:
            self.lm_timesteps = self.timesteps
        self._sign_tau: float | None = None  # set inside smooth_sign()
        lm_nfe = (len(self.lm_timesteps) if variant == "v1" else 1) * steps
        self.nfe_per_call = lm_nfe + len(self.timesteps) * self.num_classes

    def config(self) -> dict[str, Any]:
        """The resolved settings: DC's plus variant, norm, steps, eta, momentum, lr,
        sigma_range and lm_timesteps (T' of v1's objective)."""
        return {**super().config(), "variant": self.variant, "norm": self.norm,
                "steps": self.steps, "eta": self.eta, "momentum": self.momentum,
                "lr": self.lr, "sigma_range": list(self.sigma_range),
                "lm_timesteps": len(self.lm_timesteps)}

    # -- the likelihood-maximization objective ------------------------------------------------
    def _lm_noise(self, x01: Tensor) -> tuple[Tensor | None, Tensor]:
        """The randomness of one likelihood-maximization step, drawn before the step so that a
        checkpointed step recomputes with the same noise: (EDM sigma per row, shape (B,), then
        eps) for ``t1`` (one noise level per step and per row, so EOT copies stacked along the
        batch do not share it), (None, eps over the T' timesteps) for ``v1``."""
        if self.variant == "t1":
            lo, hi = self.sigma_range
            g = self.generator_for(x01)
            u = torch.rand(len(x01), generator=g, device=x01.device, dtype=x01.dtype)
            return lo + (hi - lo) * u, self._noise(tuple(x01.shape), x01)
        b, tp = len(x01), len(self.lm_timesteps)
        return None, self._noise((b, tp, *x01.shape[1:]), x01)

    def _lm_loss(self, x01: Tensor, sigma: Tensor | None, eps: Tensor) -> Tensor:
        """The per-sample objective one likelihood-maximization step minimizes: t1's EDM
        denoising loss at a per-row sigma, or v1's DDPM loss over ``lm_timesteps``."""
        if self.variant == "t1":
            assert sigma is not None
            xt = (2 * x01 - 1) + sigma.view(-1, *[1] * (x01.dim() - 1)) * eps
            pred = self.denoiser.eps(xt, sigma, None, schedule=EDM())
            return (pred - eps).pow(2).flatten(1).sum(1)
        return self._uncond_loss(x01, self.lm_timesteps, eps)

    def lm_objective(self, x: Tensor) -> Tensor:
        """The per-sample objective ``purify`` minimizes, with fresh noise per row: for ``t1``
        one EDM denoising loss at sigma ~ U(sigma_range) (drawn per row), for ``v1`` the
        unconditional DDPM loss over ``lm_timesteps``. The Lagrange attack's penalty (eq. 10)
        is this, not :meth:`likelihood_objective` (DC's DDPM loss over the classifier's T')."""
        sigma, eps = self._lm_noise(x)
        return self._lm_loss(x, sigma, eps)

    # -- smooth backward for the sign-like steps ----------------------------------------------
    @property
    def sign_steps(self) -> str | None:
        """What in ``purify`` is sign-like (zero derivative), or None where nothing is (v1's
        l2 steps m / ||m|| are smooth; no steps at all)."""
        if self.steps == 0:
            return None
        if self.variant == "t1":
            return "Adam's m_hat / sqrt(v_hat) (sign(g) at the first step)"
        return "sign(m) of the l-inf momentum steps" if self.norm == "linf" else None

    @contextmanager
    def smooth_sign(self, tau: float = DEFAULT_SIGN_TAU) -> Iterator[None]:
        """Inside this context, the exact gradient through ``purify`` replaces the zero
        derivative of its sign-like steps by a smooth one; forward values are unchanged, bit
        for bit. v1 (l-inf): d sign(m) becomes d tanh(m / (tau mean|m|)) (:func:`smooth_sign`);
        t1: Adam's ratio gets the backward of epsilon = tau * mean sqrt(v_hat)
        (:func:`smooth_adam_ratio`). The ``tau`` in force is captured when a step runs, so a
        checkpointed step recomputes with it even if the backward runs after the context.

        The surrogate's scale is set per sample by the typical magnitude of its input: v1's
        momentum is a sum of l1-normalized gradients, so |m| is about n/D per pixel after n
        steps and moves with D, n and mu; tau is relative to mean|m| (t1: to mean|g|), so one
        tau serves every image size and step. tau -> 0 gives back the exact (masked)
        gradient; a large tau makes the step linear in m, its derivative fading as 1/tau.

        The default tau = 0.5 is measured (digits-eps denoiser, 4 test digits, 16 to 64 noise
        draws per digit, each draw its own trajectory): the sign the defense takes is random
        through its noise, and tau is chosen so that the surrogate at the mean momentum,
        tanh(mu / (tau mean|m|)), best matches the sign averaged over the noise, E[sign(m)]
        (mean absolute error per pixel). v1, T' = 100: the per-pixel standard deviation of m
        is 0.40 to 0.53 times mean|m| at steps 1 to 3, and the best tau is 0.5 at each (error
        0.09 to 0.10, against 0.12 to 0.14 at 0.25 and 0.18 to 0.20 at 1). v1, T' = 10: 0.6
        to 0.7 times at step 1 (best tau 0.5 to 0.75), 0.34 at step 10 (best 0.25, with 0.5
        within 0.03). t1's first step (the algebraic sigmoid of g): 0.75 to 0.97 times
        mean|g|, best tau 0.75 (error 0.137; 0.153 at 0.5). At tau = 0.5, 35 to 53% of v1's
        pixels have |m| < tau mean|m|, where the surrogate's slope is at least 0.42 of its
        peak.
        """
        tau = check_sign_tau(tau)
        if self.sign_steps is None:
            raise ValueError(f"smooth_sign: this RDC (variant={self.variant!r}, "
                             f"norm={self.norm!r}, steps={self.steps}) has no sign-like step, "
                             f"so a smooth sign would not change its gradient")
        saved = self._sign_tau
        self._sign_tau = tau
        try:
            yield
        finally:
            self._sign_tau = saved

    # -- likelihood maximization --------------------------------------------------------------
    def purify(self, x: Tensor) -> Tensor:
        """Likelihood maximization. Differentiable end to end (second order) when ``x``
        requires grad; otherwise runs without building a graph.

        On the exact path each step is checkpointed (``checkpoint=True``): its second-order
        graph is recomputed in the backward pass, so memory grows with N times the state
        (image, momentum), not N times the denoiser's activations. See the class docstring for
        what the exact gradient of the sign-like steps is, and :meth:`smooth_sign`."""
        exact = torch.is_grad_enabled() and x.requires_grad
        x0 = x if exact else x.detach()
        x_hat = x0
        m = torch.zeros_like(x0)
        save = exact and self.use_checkpoint
        tau = self._sign_tau if exact else None
        if self.variant == "t1":
            v = torch.zeros_like(x0)
            for n in range(1, self.steps + 1):
                sigma, eps = self._lm_noise(x0)
                if save:
                    x_hat, m, v = checkpoint(self._t1_step, x_hat, m, v, eps, n, sigma, exact,
                                             tau, use_reentrant=False)
                else:
                    x_hat, m, v = self._t1_step(x_hat, m, v, eps, n, sigma, exact, tau)
            return x_hat
        for _ in range(self.steps):
            _, eps = self._lm_noise(x0)
            if save:
                x_hat, m = checkpoint(self._v1_step, x_hat, m, x0, eps, exact, tau,
                                      use_reentrant=False)
            else:
                x_hat, m = self._v1_step(x_hat, m, x0, eps, exact, tau)
        return x_hat

    def _t1_step(self, x_hat: Tensor, m: Tensor, v: Tensor, eps: Tensor, n: int,
                 sigma: Tensor | None, exact: bool, tau: float | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Adam in [-1, 1] space, written functionally so the exact gradient can pass."""
        b1, b2, tiny = 0.9, 0.999, 1e-8
        g = self._lm_grad(x_hat, sigma, eps, exact)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** n), v / (1 - b2 ** n)
        # lr is in [-1, 1] units: halve it for [0, 1] images
        # sqrt(v + tiny^2): sqrt has an infinite derivative at 0 (NaN exact gradients)
        x_hat = (x_hat - 0.5 * self.lr * smooth_adam_ratio(m_hat, v_hat, tiny, tau)).clamp(0, 1)
        return x_hat, m, v

    def _v1_step(self, x_hat: Tensor, m: Tensor, x0: Tensor, eps: Tensor, exact: bool,
                 tau: float | None = None) -> tuple[Tensor, Tensor]:
        """One momentum step of algorithm 1 (sign steps in l-inf, normalized in l2)."""
        step = self.eta / max(self.steps, 1)
        g = self._lm_grad(x_hat, None, eps, exact)
        shape = (-1, *[1] * (g.dim() - 1))
        if self.norm == "linf":
            l1 = g.abs().flatten(1).sum(1).clamp_min(1e-12)
            m = self.momentum * m - g / l1.view(shape)
            x_hat = x_hat + step * smooth_sign(m, tau)
            x_hat = torch.min(torch.max(x_hat, x0 - self.eta), x0 + self.eta).clamp(0, 1)
            return x_hat, m
        l2 = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        m = self.momentum * m - g / l2.view(shape)
        mn = m.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        delta = x_hat + step * m / mn - x0
        dn = delta.flatten(1).norm(dim=1).view(shape)
        delta = delta * torch.clamp(self.eta / dn.clamp_min(1e-12), max=1.0)
        return (x0 + delta).clamp(0, 1), m

    def _lm_grad(self, x_hat: Tensor, sigma: Tensor | None, eps: Tensor, exact: bool) -> Tensor:
        if not exact:
            with torch.enable_grad():
                xh = x_hat.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._lm_loss(xh, sigma, eps).sum(), xh)
            return g
        with torch.enable_grad(), self._second_order_graph():
            loss = self._lm_loss(x_hat, sigma, eps).sum()
            (g,) = torch.autograd.grad(loss, x_hat, create_graph=True)
        return g

    def head(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.purify(x))


@register_defense("dc-optimal")
class OptimalDiffusionClassifier(DiffusionClassifier):
    """``dc-optimal``: DC over the closed-form optimal denoiser of a training subset
    (theorem 3.2): ``per_class`` training images of each class of ``dataset``."""

    def __init__(self, *, dataset: str = "digits", per_class: int = 20, seed: int = 0,
                 **dc_kwargs: Any) -> None:
        from benchmark.data import load_dataset
        from benchmark.zoo.analytic import OptimalDenoiser

        ds = load_dataset(dataset)
        g = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(ds.num_classes):
            idx = (ds.train.y == c).nonzero().flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        rows = torch.cat(picks)
        x_train = 2 * ds.train.x[rows] - 1
        den = OptimalDenoiser(x_train, ds.train.y[rows], ds.num_classes)
        dc_kwargs.setdefault("timesteps", 50)
        super().__init__(denoiser=den, **dc_kwargs)
        self.train_rows = rows


__all__ = ["DEFAULT_SIGN_TAU", "DiffusionClassifier", "OptimalDiffusionClassifier",
           "RobustDiffusionClassifier", "check_sign_tau", "smooth_adam_ratio", "smooth_sign",
           "systematic_timesteps"]
