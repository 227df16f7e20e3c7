"""Exact models: drop-in :class:`~benchmark.zoo.denoiser.Denoiser` s with closed-form answers.

* :class:`GaussianDenoiser` / :class:`ClassConditionalGaussianDenoiser`: x0 ~ N(mu, Sigma)
  (or a uniform mixture over classes of N(mu_y, Sigma_y)). The marginal at time t is
  N(a mu, C_t) with C_t = a^2 Sigma + s^2 I, so E[eps | x_t] = s C_t^{-1} (x_t - a mu), the
  score is -C_t^{-1} (x_t - a mu) and :meth:`~GaussianDenoiser.log_prob_marginal` is the exact
  density the PF-ODE likelihood must reproduce.
* :class:`OptimalDenoiser`: the optimal denoiser of a finite training set (RDC, Chen et al.
  2024, theorem 3.2), i.e. the exact E[eps | x_t, y] when x0 is uniform over the training
  points of class y; plugged into the diffusion classifier it gives the optimal diffusion
  classifier.
* :class:`LinearGaussianFlow`: the linear flow x = A z + b, z ~ N(0, I) of Pope, Balaji and
  Feizi (AISTATS 2020, section 3), with the closed-form l2 likelihood attacks of their
  theorem 3.1 (:func:`optimal_l2_perturbation`) and its special cases
  (:func:`spherical_l2_perturbation`, :func:`universal_l2_perturbation`).

All models work on flattened samples: a mean of shape (C, H, W) gives D = C H W and inputs of
shape (B, C, H, W). Buffers keep the dtype they were built with; inputs are computed in their
own dtype (use float64 for tight oracle tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmark.zoo.denoiser import Denoiser, LabelLike, ScheduleLike
from benchmark.zoo.schedules import TimeLike

__all__ = [
    "ClassConditionalGaussianDenoiser",
    "GaussianDenoiser",
    "LinearGaussianFlow",
    "OptimalDenoiser",
    "optimal_l2_perturbation",
    "spherical_l2_perturbation",
    "universal_l2_perturbation",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _normalized_coefs(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(a', s') of the variance-normalized input z = a' x0 + s' eps, a'^2 + s'^2 = 1."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def _flat(x: Tensor, d: int, what: str) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] != d:
        raise ValueError(f"{what}: expected samples of {d} values, got shape {tuple(x.shape)}")
    return flat


def _eigh_psd(cov: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a batch of symmetric PSD matrices (tiny negative eigs -> 0)."""
    if not torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-6, atol=1e-8):
        raise ValueError(f"{what} must be symmetric")
    lam, vec = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    scale = lam.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    if bool((lam < -1e-6 * scale).any()):
        raise ValueError(f"{what} must be positive semi-definite; smallest eigenvalue "
                         f"{lam.min().item():.3g}")
    return lam.clamp_min(0.0), vec


# --------------------------------------------------------------------------------------------
# Gaussian data
# --------------------------------------------------------------------------------------------
class _GaussianMixtureDenoiser(Denoiser):
    """x0 ~ sum_k w_k N(mu_k, Sigma_k); exact posterior quantities under any schedule."""

    means: Tensor
    covs: Tensor
    eigvals: Tensor
    eigvecs: Tensor
    log_weights: Tensor

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None) -> None:
        super().__init__()
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means.shape)}")
        k = means.shape[0]
        self.event_shape = tuple(means.shape[1:])
        d = math.prod(self.event_shape)
        if covs.shape != (k, d, d):
            raise ValueError(f"covariances must have shape ({k}, {d}, {d}) for means of shape "
                             f"{tuple(means.shape)}, got {tuple(covs.shape)}")
        lam, vec = _eigh_psd(covs, "covariance")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=means.dtype)
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers, got {weights}")
        self.register_buffer("means", means.reshape(k, d).clone())
        self.register_buffer("covs", covs.clone())
        self.register_buffer("eigvals", lam)
        self.register_buffer("eigvecs", vec)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()).to(means.dtype))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _terms(self, x: Tensor, a: Tensor, s: Tensor,
               y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Eigenbasis residual r = V^T (x - a mu), variances v = a^2 lam + s^2, and V.

        Shapes (B, K', D), (B, K', D), (B or 1, K', D, D), with K' = 1 when ``y`` picks the
        component, else K.
        """
        mu, lam, vec = (b.to(x.dtype) for b in (self.means, self.eigvals, self.eigvecs))
        if y is not None:
            mu, lam, vec = mu[y][:, None], lam[y][:, None], vec[y][:, None]  # (B, 1, ...)
        else:
            mu, lam, vec = mu[None], lam[None], vec[None]
        a, s = a[:, None, None], s[:, None, None]
        diff = x[:, None, :] - a * mu
        r = torch.einsum("bkd,bkde->bke", diff, vec.expand(x.shape[0], -1, -1, -1))
        v = a * a * lam + s * s
        return r, v, vec

    @staticmethod
    def _log_normal(r: Tensor, v: Tensor) -> Tensor:
        return -0.5 * (r.shape[-1] * _LOG_2PI + torch.log(v).sum(-1) + (r * r / v).sum(-1))

    def eps_normalized(self, z: Tensor, log_snr: Tensor, y: Tensor | None) -> Tensor:
        x = _flat(z, self.dim, type(self).__name__)
        a, s = _normalized_coefs(log_snr.to(x.dtype))
        r, v, vec = self._terms(x, a, s, y)
        # E[eps | z, k] = s C_k^{-1} (z - a mu_k), computed in the eigenbasis of Sigma_k.
        eps_k = torch.einsum("bke,bkde->bkd", s[:, None, None] * r / v,
                             vec.expand(x.shape[0], -1, -1, -1))
        if y is not None or eps_k.shape[1] == 1:
            eps = eps_k[:, 0]
        else:
            logw = self.log_weights.to(x.dtype) + self._log_normal(r, v)
            eps = (torch.softmax(logw, dim=1)[..., None] * eps_k).sum(1)
        return eps.reshape(z.shape)

    def log_prob_marginal(self, x_t: Tensor, t: TimeLike, y: LabelLike = None, *,
                          schedule: ScheduleLike) -> Tensor:
        """Exact log p_t(x_t | y) = log N(x_t; a mu, a^2 Sigma + s^2 I) (mixture for y=None).

        Shape (B,); differentiable in ``x_t``. Its gradient is :meth:`score`.
        """
        a, s, _ = self.coefficients(x_t, t, schedule=schedule)
        labels = self.check_labels(y, x_t.shape[0], x_t.device)
        x = _flat(x_t, self.dim, type(self).__name__)
        r, v, _ = self._terms(x, a, s, labels)
        logp = self._log_normal(r, v)
        if labels is not None or logp.shape[1] == 1:
            return logp[:, 0]
        return torch.logsumexp(self.log_weights.to(x.dtype) + logp, dim=1)

    def sample(self, n: int, y: LabelLike = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of x0 (shape (n, *event_shape)); from class ``y`` if given."""
        labels = self.check_labels(y, n, self.means.device)
        if labels is None:
            labels = torch.multinomial(self.log_weights.exp(), n, replacement=True,
                                       generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, device=self.means.device,
                            generator=generator)
        root = self.eigvecs[labels] * self.eigvals[labels].sqrt()[:, None, :]  # V diag(sqrt lam)
        x = self.means[labels] + torch.einsum("nde,ne->nd", root, noise)
        return x.reshape(n, *self.event_shape)


class GaussianDenoiser(_GaussianMixtureDenoiser):
    """Exact denoiser for x0 ~ N(mu, Sigma): eps_hat = s (a^2 Sigma + s^2 I)^{-1} (x_t - a mu).

    ``mu`` has shape (D,) or any event shape (e.g. (C, H, W)); ``Sigma`` is (D, D), symmetric
    positive semi-definite (a^2 Sigma + s^2 I is invertible for s > 0). Unconditional.
    """

    num_classes = 0
    conditional = False

    def __init__(self, mu: Tensor, Sigma: Tensor) -> None:  # noqa: N803 (the usual name)
        super().__init__(mu[None], Sigma[None])

    @property
    def mu(self) -> Tensor:
        return self.means[0].reshape(self.event_shape)

    @property
    def Sigma(self) -> Tensor:  # noqa: N802 (the conventional name)
        return self.covs[0]


class ClassConditionalGaussianDenoiser(_GaussianMixtureDenoiser):
    """x0 | y ~ N(mu_y, Sigma_y), y uniform over ``K`` classes (or over ``weights``).

    ``means``: (K, *event_shape), ``covs``: (K, D, D). With ``y`` the denoiser is the exact
    Gaussian posterior of class y; with ``y=None`` it is the exact posterior of the mixture:
    sum_y p(y | x_t) E[eps | x_t, y], p(y | x_t) proportional to w_y N(x_t; a mu_y, C_{y,t}).
    """

    conditional = True

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None) -> None:
        super().__init__(means, covs, weights)
        self.num_classes = means.shape[0]


# --------------------------------------------------------------------------------------------
# Finite training set (RDC theorem 3.2)
# --------------------------------------------------------------------------------------------
class OptimalDenoiser(Denoiser):
    """The optimal denoiser of a finite training set (RDC, Chen et al. 2024, theorem 3.2).

    With x0 uniform over the training points of class y (over all points for ``y=None``),
        E[x0 | x_t, y] = sum_i softmax_i(-||x_t - a x_i||^2 / (2 s^2)) x_i,
        eps_hat = (x_t - a E[x0 | x_t, y]) / s,
    the sum running over the points of class y. This is the minimizer of the diffusion loss on
    the training set; in the diffusion classifier it gives the optimal diffusion classifier.

    ``x_train``: (N, *event_shape) in model space; ``y_train``: (N,) int labels, or None for an
    unconditional denoiser. ``num_classes`` defaults to ``max(y_train) + 1``; every class must
    have a point. The softmax is streamed over chunks of training points (a running
    logsumexp), so memory stays at about ``chunk_elems`` numbers whatever N.
    """

    x_train: Tensor
    y_train: Tensor | None

    def __init__(self, x_train: Tensor, y_train: Tensor | None = None,
                 num_classes: int | None = None, *, chunk_elems: int = 1 << 22) -> None:
        super().__init__()
        if x_train.ndim < 2 or x_train.shape[0] == 0:
            raise ValueError(f"x_train must have shape (N, *event_shape) with N > 0, "
                             f"got {tuple(x_train.shape)}")
        n = x_train.shape[0]
        self.event_shape = tuple(x_train.shape[1:])
        self.chunk_elems = int(chunk_elems)
        self.register_buffer("x_train", x_train.reshape(n, -1).clone())
        if y_train is None:
            if num_classes:
                raise ValueError("num_classes given without y_train")
            self.conditional = False
            self.num_classes = 0
            self.register_buffer("y_train", None)
            return
        y_train = torch.as_tensor(y_train).long()
        if y_train.shape != (n,):
            raise ValueError(f"y_train must have shape ({n},), got {tuple(y_train.shape)}")
        k = int(y_train.max()) + 1 if num_classes is None else int(num_classes)
        counts = torch.bincount(y_train.clamp_min(0), minlength=k)
        if bool((y_train < 0).any()) or bool((y_train >= k).any()):
            raise ValueError(f"y_train has labels outside [0, {k})")
        empty = (counts[:k] == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no training points")
        self.conditional = True
        self.num_classes = k
        self.register_buffer("y_train", y_train.clone())

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    def _labels(self) -> Tensor:
        if self.y_train is None:
            raise RuntimeError("this OptimalDenoiser has no labels")
        return self.y_train

    def posterior_mean(self, z: Tensor, a: Tensor, s: Tensor, y: Tensor | None) -> Tensor:
        """E[x0 | z] for z = a x0 + s eps (a, s of shape (B,)), x0 uniform over the points."""
        x = _flat(z, self.dim, type(self).__name__)
        b = x.shape[0]
        pts = self.x_train.to(x.dtype)
        a, inv2s2 = a[:, None], (0.5 / (s * s))[:, None]
        # Streamed softmax: running max m, normalizer S and weighted sum W over chunks.
        m = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        total = torch.zeros(b, dtype=x.dtype, device=x.device)
        acc = torch.zeros_like(x)
        step = max(1, self.chunk_elems // max(1, b * self.dim))
        for lo in range(0, pts.shape[0], step):
            chunk = pts[lo:lo + step]
            diff = x[:, None, :] - a[:, :, None] * chunk[None]
            logits = -(diff * diff).sum(-1) * inv2s2
            if y is not None:
                keep = self._labels()[lo:lo + step][None, :] == y[:, None]
                logits = logits.masked_fill(~keep, -math.inf)
            # The shift cancels exactly in W / S, so it carries no gradient.
            new_m = torch.maximum(m, logits.amax(1)).detach()
            shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            p = torch.exp(logits - shift[:, None])
            scale = torch.exp(m - shift)
            total = total * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ chunk
            m = new_m
        return (acc / total[:, None]).reshape(z.shape)

    def eps_normalized(self, z: Tensor, log_snr: Tensor, y: Tensor | None) -> Tensor:
        a, s = _normalized_coefs(log_snr.to(z.dtype))
        x0 = self.posterior_mean(z, a, s, y)
        shape = (-1, *([1] * (z.ndim - 1)))
        return (z - a.reshape(shape) * x0) / s.reshape(shape)


# --------------------------------------------------------------------------------------------
# Linear flow and Pope et al.'s likelihood attacks
# --------------------------------------------------------------------------------------------
def optimal_l2_perturbation(x: Tensor, mean: Tensor, cov: Tensor, eps: float | Tensor, *,
                            iters: int = 100) -> Tensor:
    """The l2 perturbation ||delta|| <= eps that lowers log N(x + delta; mean, cov) the most.

    Pope, Balaji and Feizi (2020), theorem 3.1. With K = U diag(lam) U^T and r = U^T (x - mu)
    (the paper's "c = U^T K" is a typo for this), the maximizer of
    (r + delta)^T K^{-1} (r + delta) over the ball lies on the sphere and is
        delta* = (2 eta I - K^{-1})^{-1} K^{-1} (x - mu),   i.e. delta_i = r_i / (2 eta lam_i - 1),
    with eta solving sum_i r_i^2 / (1 - 2 eta lam_i)^2 = eps^2 and 2 eta lam_i >= 1 for all i
    (their eq. 2). We solve the secular equation for rho = 1 / (2 eta) in (0, lam_min], where
    ||delta(rho)||^2 = sum_i r_i^2 rho^2 / (lam_i - rho)^2 increases from 0, by batched
    bisection in float64. In the "hard case" (r has no component along u_min(K), e.g.
    x = mu: their section 3.1.2) the remaining norm goes along u_min(K), which recovers
    delta* = eps u_min(K). Special cases: :func:`spherical_l2_perturbation` (K = c I),
    :func:`universal_l2_perturbation`.

    ``x``: (B, *event_shape) or (B, D); ``mean``: D values; ``cov``: (D, D) positive definite;
    ``eps``: a number or (B,) tensor >= 0. Returns delta shaped like ``x`` (no gradient).
    """
    b = x.shape[0]
    with torch.no_grad():
        mu = mean.reshape(-1).to(torch.float64)
        d = mu.shape[0]
        flat = _flat(x, d, "optimal_l2_perturbation").to(torch.float64)
        radius = torch.as_tensor(eps, dtype=torch.float64, device=x.device).reshape(-1)
        radius = radius.expand(b) if radius.numel() == 1 else radius
        if radius.shape != (b,) or bool((radius < 0).any()) or not bool(radius.isfinite().all()):
            raise ValueError(f"eps must be a finite number >= 0 or {b} of them, got {eps}")
        lam, vec = torch.linalg.eigh(cov.to(torch.float64))  # ascending
        if cov.shape != (d, d) or not bool(lam[0] > 0):
            raise ValueError(f"cov must be a ({d}, {d}) positive definite matrix")
        r = (flat - mu) @ vec
        r2, target = r * r, radius * radius

        def norm2(rho: Tensor) -> Tensor:
            ratio = rho[:, None] / (lam - rho[:, None]).clamp_min(1e-300)
            return (r2 * ratio * ratio).sum(1)

        lo = torch.zeros(b, dtype=torch.float64, device=x.device)
        hi = lam[0].expand(b).clone()
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            over = norm2(mid) > target
            hi, lo = torch.where(over, mid, hi), torch.where(over, lo, mid)
        # lo keeps ||delta|| <= eps; top it up along u_min (exact in the hard case, a
        # rounding-level correction otherwise).
        delta = r * (lo[:, None] / (lam - lo[:, None]).clamp_min(1e-300))
        deficit = (target - (delta * delta).sum(1)).clamp_min(0.0)
        sign = torch.where(r[:, 0] < 0, -1.0, 1.0).to(torch.float64)
        delta[:, 0] = sign * torch.sqrt(delta[:, 0] ** 2 + deficit)
        return (delta @ vec.T).to(x.dtype).reshape(x.shape)


def spherical_l2_perturbation(x: Tensor, mean: Tensor, eps: float | Tensor) -> Tensor:
    """delta* = eps (x - mu) / ||x - mu||: the optimum when K = c I (Pope et al. eq. 3).

    At x = mu every direction is optimal; the first coordinate axis is returned there.
    """
    b = x.shape[0]
    flat = _flat(x, mean.numel(), "spherical_l2_perturbation")
    r = flat - mean.reshape(1, -1).to(flat)
    norm = r.norm(dim=1, keepdim=True)
    axis = torch.zeros_like(r)
    axis[:, 0] = 1.0
    unit = torch.where(norm > 0, r / norm.clamp_min(torch.finfo(r.dtype).tiny), axis)
    radius = torch.as_tensor(eps, dtype=r.dtype, device=r.device).reshape(-1, 1)
    return (radius * unit).reshape(b, *x.shape[1:])


def universal_l2_perturbation(cov: Tensor, eps: float) -> Tensor:
    """delta* = eps u_min(K): the universal perturbation of Pope et al. (section 3.3).

    It maximizes the expected NLL increase E_x[L(x) - L(x + delta)] over ||delta|| = eps for
    x ~ N(mu, K) (a Rayleigh quotient of K^{-1}); it is also the sample-specific optimum at
    x = mu (section 3.1.2). Returns a flat (D,) tensor; the sign is fixed so that the
    largest-magnitude component is positive.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _, vec = torch.linalg.eigh(cov)
    u = vec[:, 0]
    if u[u.abs().argmax()] < 0:
        u = -u
    return eps * u


class LinearGaussianFlow(torch.nn.Module):
    """The linear flow x = A z + b, z ~ N(0, I) (Pope et al. section 3): x ~ N(b, A A^T).

    ``A``: (D, D) invertible; ``b``: D values, of shape (D,) or an event shape such as
    (C, H, W). ``forward`` maps latents to data, ``inverse`` data to latents; ``log_prob`` is
    exact. The l2 attack helpers call the module-level functions with mu = b and K = A A^T.
    """

    A: Tensor
    b: Tensor
    log_abs_det: Tensor

    def __init__(self, A: Tensor, b: Tensor) -> None:  # noqa: N803 (the paper's names)
        super().__init__()
        d = b.numel()
        if A.shape != (d, d):
            raise ValueError(f"A must be ({d}, {d}) for b with {d} values, got {tuple(A.shape)}")
        sign, logabsdet = torch.linalg.slogdet(A)
        if sign == 0 or not torch.isfinite(logabsdet):
            raise ValueError("A must be invertible")
        self.event_shape = tuple(b.shape)
        self.register_buffer("A", A.clone())
        self.register_buffer("b", b.reshape(-1).clone())
        self.register_buffer("log_abs_det", logabsdet.clone())

    @property
    def dim(self) -> int:
        return self.b.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.b.reshape(self.event_shape)

    @property
    def covariance(self) -> Tensor:
        """K = A A^T."""
        return self.A @ self.A.T

    def forward(self, z: Tensor) -> Tensor:
        """x = A z + b, shaped (B, *event_shape)."""
        flat = _flat(z, self.dim, "LinearGaussianFlow.forward")
        return (flat @ self.A.to(flat).T + self.b.to(flat)).reshape(z.shape[0], *self.event_shape)

    def inverse(self, x: Tensor) -> Tensor:
        """z = A^{-1} (x - b), shaped (B, D)."""
        flat = _flat(x, self.dim, "LinearGaussianFlow.inverse")
        return torch.linalg.solve(self.A.to(flat), (flat - self.b.to(flat)).T).T

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; b, A A^T) = log N(A^{-1}(x - b); 0, I) - log|det A|, shape (B,)."""
        z = self.inverse(x)
        return -0.5 * (self.dim * _LOG_2PI + (z * z).sum(1)) - self.log_abs_det.to(z)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, dtype=self.b.dtype, device=self.b.device,
                        generator=generator)
        return self.forward(z)

    def optimal_l2_perturbation(self, x: Tensor, eps: float | Tensor) -> Tensor:
        """Theorem 3.1's optimal l2 attack on ``log_prob`` (see :func:`optimal_l2_perturbation`)."""
        return optimal_l2_perturbation(x, self.b, self.covariance, eps)

    def spherical_l2_perturbation(self, x: Tensor, eps: float | Tensor) -> Tensor:
        """eps (x - b) / ||x - b||: optimal when A A^T = c I (see the module function)."""
        return spherical_l2_perturbation(x, self.b, eps)

    def universal_l2_perturbation(self, eps: float) -> Tensor:
        """eps u_min(A A^T), shaped like one sample (see the module function)."""
        return universal_l2_perturbation(self.covariance, eps).reshape(self.event_shape)

    def as_denoiser(self) -> GaussianDenoiser:
        """The exact diffusion denoiser for this flow's data distribution N(b, A A^T)."""
        return GaussianDenoiser(self.mean, self.covariance)
