"""Exact oracles for the diffusion purifications on Gaussian data (issue 15, "Oracles").

With x0 ~ N(mu, Sigma) every marginal of the VP process is N(a mu, a^2 Sigma + s^2 I), so the
score is linear, -C_t^{-1} (x - a mu), and so are x0_hat and its Jacobian. Then:

* DiffPure's Euler-Maruyama chain from a fixed input is linear-Gaussian: its output mean and
  covariance follow a matrix recursion at the same dt (:func:`diffpure_moments`), which the
  Monte Carlo moments of many purifications must match within their standard errors, and which
  a flipped drift sign or a wrong noise scale misses by far;
* GAP's guidance term s_x grad(-||x0_hat - x_ref||^2) is -2 s_x J^T (x0_hat - x_ref) with J the
  affine map's matrix, and GAT's classifier term on a linear classifier is
  s_y J^T (W_y~ - W^T p) / 2 (the image is (x0_hat + 1) / 2).

The VP schedule is written out here (beta(t) = 0.1 + 19.9 t), independently of
:mod:`benchmark.zoo.schedules`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import defenses.diffpure as diffpure_module
from benchmark.zoo.analytic import ClassConditionalGaussianDenoiser, GaussianDenoiser
from benchmark.zoo.schedules import VPSDE
from defenses.diffpure import DiffPure
from defenses.scoreag import guided_score

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SHAPE = (1, 2, 2)  # image-shaped, D = 4
D = 4


def vp(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a, s, f, g^2) of the VP SDE with beta(t) = 0.1 + 19.9 t, by hand."""
    beta = 0.1 + 19.9 * t
    big_b = 0.1 * t + 0.5 * 19.9 * t * t
    return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b)), -0.5 * beta, beta


def gaussian_data() -> tuple[Tensor, Tensor]:
    """mu, Sigma in model space: small spread so that purified images stay inside (0, 1)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.tensor([0.1, -0.2, 0.05, 0.15], dtype=F64)
    root = 0.08 * torch.randn(D, D, generator=g, dtype=F64)
    return mu, root @ root.T + 0.01 * torch.eye(D, dtype=F64)


def diffpure_moments(x_img: Tensor, mu: Tensor, sigma: Tensor, t_star: float, dt: float, *,
                     score_sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact mean and covariance (image space) of DiffPure's output for the input image
    ``x_img`` (D,): x_{t*} = a* (2 x - 1) + s* z, then per step (t = t* - i dt)
    x <- A x + b + g sqrt(dt) z with A = (1 - f dt) I - g^2 dt K, b = g^2 dt a K mu,
    K = (a^2 Sigma + s^2 I)^{-1}; m <- A m + b, P <- A P A^T + g^2 dt I."""
    eye = torch.eye(D, dtype=F64)
    steps = round(t_star / dt)
    a0, s0, _, _ = vp(torch.tensor(t_star, dtype=F64))
    m, p = a0 * (2 * x_img - 1), s0**2 * eye
    for i in range(steps):  # the chain itself is sequential
        a, s, f, g2 = vp(torch.tensor(t_star - i * dt, dtype=F64))
        k = torch.linalg.inv(a * a * sigma + s * s * eye)
        big_a = (1 - f * dt) * eye - score_sign * g2 * dt * k
        m = big_a @ m + score_sign * g2 * dt * a * (k @ mu)
        p = big_a @ p @ big_a.T + g2 * dt * eye
    return (m + 1) / 2, p / 4


def moment_zscores(samples: Tensor, mean: Tensor, cov: Tensor) -> tuple[float, float]:
    """Largest |z| of the sample mean and of the sample covariance entries against the exact
    moments: se(mean_i) = sqrt(P_ii / N), se(S_ij) = sqrt((P_ij^2 + P_ii P_jj) / N)."""
    n = samples.shape[0]
    z_mean = (samples.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    se_cov = ((cov * cov + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    z_cov = (torch.cov(samples.T) - cov) / se_cov
    return float(z_mean.abs().max()), float(z_cov.abs().max())


N_DRAWS = 4000
T_STAR, DT = 0.1, 1e-3  # DiffPure's l-inf setting: 100 Euler-Maruyama steps


def _purify(variant: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Tensor, Tensor]:
    mu, sigma = gaussian_data()
    model = DiffPure(denoiser=GaussianDenoiser(mu.reshape(SHAPE), sigma),
                     classifier=nn.Sequential(nn.Flatten(), nn.Linear(D, 3)),
                     t_star=T_STAR, dt=DT)
    if variant in ("score-sign-flipped", "drift-sign-flipped"):
        exact_score = model.score
        monkeypatch.setattr(model, "score", lambda *args: -exact_score(*args))
    if variant == "drift-sign-flipped":  # and f: the whole reverse drift f x - g^2 score

        class FlippedF(VPSDE):
            def drift_coef(self, t: object) -> Tensor:
                return -super().drift_coef(t)  # type: ignore[arg-type]

        model.sde = FlippedF()
    if variant == "reverse-noise-halved":
        draw = diffpure_module.draw_noise

        def halved(*args: object, **kwargs: object) -> Tensor:
            noise = draw(*args, **kwargs)  # type: ignore[arg-type]
            return torch.cat([noise[:1], 0.5 * noise[1:]])

        monkeypatch.setattr(diffpure_module, "draw_noise", halved)
    x_img = torch.tensor([0.6, 0.4, 0.55, 0.45], dtype=F64)
    out = model.purify(x_img.reshape(1, *SHAPE).expand(N_DRAWS, *SHAPE), seed=2024)
    return x_img, out.reshape(N_DRAWS, D)


def test_diffpure_output_moments_match_the_exact_linear_gaussian_chain(monkeypatch):
    """4000 purifications of one input (each row of the batch its own draw): mean and
    covariance within 5 standard errors of the exact recursion at the same dt."""
    x_img, out = _purify("exact", monkeypatch)
    assert bool(((out > 0) & (out < 1)).all()), "the clip to [0, 1] must not act here"
    mu, sigma = gaussian_data()
    mean, cov = diffpure_moments(x_img, mu, sigma, T_STAR, DT)
    z_mean, z_cov = moment_zscores(out, mean, cov)
    assert z_mean < 5 and z_cov < 5, (z_mean, z_cov)
    # the oracle is not trivially wide: the output moved from the input toward the data
    assert float((mean - x_img).abs().max()) > 20 * float((cov.diagonal() / N_DRAWS).sqrt().max())


@pytest.mark.parametrize("variant", ["score-sign-flipped", "drift-sign-flipped",
                                     "reverse-noise-halved"])
def test_the_diffpure_oracle_rejects_a_broken_reverse_process(variant, monkeypatch):
    """The same check fails by far when the reverse drift's sign is flipped (the score term
    alone, or the whole f x - g^2 score) or the reverse noise is halved (mean right, covariance
    wrong: only the covariance check sees it)."""
    x_img, out = _purify(variant, monkeypatch)
    mu, sigma = gaussian_data()
    z_mean, z_cov = moment_zscores(out, *diffpure_moments(x_img, mu, sigma, T_STAR, DT))
    assert max(z_mean, z_cov) > 20, (z_mean, z_cov)
    if variant == "reverse-noise-halved":
        assert z_mean < 5 < z_cov, (z_mean, z_cov)


def test_the_flipped_chain_in_closed_form_is_far_from_the_exact_one():
    """The oracle itself: flipping the score's sign in the recursion moves the exact mean by
    many standard errors of a 4000-draw estimate."""
    x_img = torch.tensor([0.6, 0.4, 0.55, 0.45], dtype=F64)
    mu, sigma = gaussian_data()
    mean, cov = diffpure_moments(x_img, mu, sigma, T_STAR, DT)
    flipped, _ = diffpure_moments(x_img, mu, sigma, T_STAR, DT, score_sign=-1.0)
    se = (cov.diagonal() / N_DRAWS).sqrt()
    assert float(((flipped - mean).abs() / se).max()) > 100


# -- guidance gradients in closed form ----------------------------------------------------------
def _affine_x0_hat(x: Tensor, t: Tensor, mu: Tensor, sigma: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: the exact score -K (x - a mu), x0_hat = (x - s^2 K (x - a mu)) / a and its
    Jacobian J = (I - s^2 K) / a (symmetric), K = (a^2 Sigma + s^2 I)^{-1}. ``mu``, ``sigma``
    are per sample ((B, D), (B, D, D))."""
    a, s, _, _ = vp(t)
    a, s = a[:, None, None], s[:, None, None]
    eye = torch.eye(D, dtype=F64)
    k = torch.linalg.inv(a * a * sigma + s * s * eye)
    r = torch.einsum("bij,bj->bi", k, x - a[:, :, 0] * mu)
    x0 = (x - (s * s)[:, :, 0] * r) / a[:, :, 0]
    jac = (eye - s * s * k) / a
    return -r, x0, jac


def _points(b: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_t = 0.3 * torch.randn(b, D, generator=g, dtype=F64)
    x_ref = 0.3 * torch.randn(b, D, generator=g, dtype=F64)
    t = torch.linspace(0.05, 0.4, b, dtype=F64)
    return x_t, x_ref, t


def test_gap_guidance_equals_its_closed_form_on_gaussian_data():
    """GAP: guided - plain score = -2 s_x J^T (x0_hat - x_ref), and the total is exact."""
    mu, sigma = gaussian_data()
    den = GaussianDenoiser(mu.reshape(SHAPE), sigma)
    x_t, x_ref, t = _points(5, 0)
    s_x = 2.5
    shaped = (-1, *SHAPE)
    guided = guided_score(den, VPSDE(), x_t.reshape(shaped), t, x_ref=x_ref.reshape(shaped),
                          s_x=s_x).reshape(-1, D)
    plain = den.score(x_t.reshape(shaped), t, schedule=VPSDE()).reshape(-1, D)
    score, x0, jac = _affine_x0_hat(x_t, t, mu.expand(5, D), sigma.expand(5, D, D))
    term = -2 * s_x * torch.einsum("bji,bj->bi", jac, x0 - x_ref)
    assert float(term.abs().min()) > 1e-3  # a real term, not zero against zero
    torch.testing.assert_close(guided - plain, term, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(guided, score + term, rtol=1e-9, atol=1e-10)


def test_gat_guided_score_equals_its_closed_form_with_the_true_class():
    """GAT on class-conditional Gaussian data and a linear classifier f(img) = W img + c:
    score(x | y) - 2 s_x J_y^T (x0_hat_y - x_ref) + s_y J_y^T (W_y~ - W^T p) / 2, with the
    class y's score and affine map (J_y, x0_hat_y), not the mixture's."""
    g = torch.Generator().manual_seed(1)
    classes = 3
    means = 0.2 * torch.randn(classes, D, generator=g, dtype=F64)
    roots = 0.1 * torch.randn(classes, D, D, generator=g, dtype=F64)
    covs = roots @ roots.transpose(1, 2) + 0.01 * torch.eye(D, dtype=F64)
    den = ClassConditionalGaussianDenoiser(means.reshape(classes, *SHAPE), covs)
    w = torch.randn(classes, D, generator=g, dtype=F64)
    c = torch.randn(classes, generator=g, dtype=F64)
    head = nn.Sequential(nn.Flatten(), nn.Linear(D, classes)).to(F64)
    with torch.no_grad():
        head[1].weight.copy_(w)
        head[1].bias.copy_(c)
    x_t, x_ref, t = _points(6, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    target = torch.tensor([1, 2, 0, 2, 0, 1])

    def log_prob_target(images: Tensor) -> Tensor:
        return head(images).log_softmax(1).gather(1, target[:, None]).squeeze(1)

    s_x, s_y = 1.5, 3.0
    shaped = (-1, *SHAPE)
    guided = guided_score(den, VPSDE(), x_t.reshape(shaped), t, x_ref=x_ref.reshape(shaped),
                          s_x=s_x, log_prob_target=log_prob_target, s_y=s_y,
                          y=y).reshape(-1, D)
    score, x0, jac = _affine_x0_hat(x_t, t, means[y], covs[y])
    assert bool((x0.abs() < 1).all()), "x0_hat must stay inside the image box (no clamp)"
    p = torch.softmax(((x0 + 1) / 2) @ w.T + c, dim=1)
    dlogp = w[target] - p @ w
    expected = (score - 2 * s_x * torch.einsum("bji,bj->bi", jac, x0 - x_ref)
                + s_y * torch.einsum("bji,bj->bi", jac, dlogp) / 2)
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-10)
    # the unconditional (mixture) path is a different score: y is really used
    mixture = guided_score(den, VPSDE(), x_t.reshape(shaped), t, x_ref=x_ref.reshape(shaped),
                           s_x=s_x, log_prob_target=log_prob_target, s_y=s_y).reshape(-1, D)
    assert float((mixture - expected).abs().max()) > 1e-2
    assert math.isfinite(float(guided.abs().max()))
