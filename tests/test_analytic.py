import math

import pytest
import torch

from benchmark.zoo.analytic import (
    ClassConditionalGaussianDenoiser,
    GaussianDenoiser,
    LinearGaussianFlow,
    OptimalDenoiser,
    optimal_l2_perturbation,
    spherical_l2_perturbation,
    universal_l2_perturbation,
)
from benchmark.zoo.denoiser import Denoiser, from_model_space, to_model_space
from benchmark.zoo.schedules import SDESchedule, get_schedule

F64 = torch.float64
SCHEDULE_NAMES = ["ddpm", "vp", "subvp", "edm"]
#: two times per schedule, one low-noise and one mid-noise, in each schedule's own units.
TIMES: dict[str, list[float]] = {
    "ddpm": [3, 400], "vp": [0.02, 0.5], "subvp": [0.02, 0.5], "edm": [0.05, 2.0]}
CASES = [(name, t) for name in SCHEDULE_NAMES for t in TIMES[name]]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_cov(d, seed=0, floor=0.1):
    m = torch.randn(d, d, dtype=F64, generator=gen(seed))
    return m @ m.T / d + floor * torch.eye(d, dtype=F64)


def noisy(x0, name, t, seed=1):
    a, s = get_schedule(name).alpha_sigma(torch.tensor(t, dtype=F64))
    noise = torch.randn(x0.shape, dtype=F64, generator=gen(seed))
    return a.to(F64).item() * x0 + s.to(F64).item() * noise


def coefs(name, t):
    a, s = get_schedule(name).alpha_sigma(torch.tensor(t, dtype=F64))
    return a.to(F64).item(), s.to(F64).item()


def normal_pdf(x, mean, var):
    return torch.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


# -- Gaussian data -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, t", CASES)
def test_gaussian_eps_matches_explicit_posterior(name, t):
    d = 4
    mu = torch.randn(d, dtype=F64, generator=gen(2))
    cov = random_cov(d)
    den = GaussianDenoiser(mu, cov)
    x_t = noisy(torch.randn(5, d, dtype=F64, generator=gen(3)), name, t)
    a, s = coefs(name, t)
    c_t = a * a * cov + s * s * torch.eye(d, dtype=F64)
    ref = s * torch.linalg.solve(c_t, (x_t - a * mu).T).T
    torch.testing.assert_close(den.eps(x_t, t, schedule=name), ref, rtol=1e-9, atol=1e-11)
    # Tweedie: x0_hat = mu + a Sigma C^{-1} (x_t - a mu)
    x0_ref = mu + a * (cov @ torch.linalg.solve(c_t, (x_t - a * mu).T)).T
    torch.testing.assert_close(den.x0_hat(x_t, t, schedule=name), x0_ref, rtol=1e-8, atol=1e-9)
    mvn = torch.distributions.MultivariateNormal(a * mu, c_t)
    torch.testing.assert_close(den.log_prob_marginal(x_t, t, schedule=name), mvn.log_prob(x_t))


@pytest.mark.parametrize("name, t", [("ddpm", 150), ("vp", 0.3), ("subvp", 0.3), ("edm", 0.7)])
def test_gaussian_1d_against_grid_integration(name, t):
    m, v = 0.3, 0.25
    den = GaussianDenoiser(torch.tensor([m], dtype=F64), torch.tensor([[v]], dtype=F64))
    a, s = coefs(name, t)
    x_t = torch.tensor([[-1.1], [0.2], [0.9]], dtype=F64)
    x0 = torch.linspace(m - 12 * math.sqrt(v), m + 12 * math.sqrt(v), 100001, dtype=F64)
    w = normal_pdf(x0, m, v)[None] * normal_pdf(x_t, a * x0[None], s * s)  # (3, grid)
    z = torch.trapezoid(w, x0, dim=1)
    eps_ref = torch.trapezoid(w * (x_t - a * x0[None]) / s, x0, dim=1) / z
    torch.testing.assert_close(den.eps(x_t, t, schedule=name)[:, 0], eps_ref, rtol=1e-7,
                               atol=1e-9)
    torch.testing.assert_close(den.log_prob_marginal(x_t, t, schedule=name), torch.log(z),
                               rtol=1e-7, atol=1e-9)


def mixture_1d():
    means = torch.tensor([[-0.6], [0.1], [0.7]], dtype=F64)
    variances = torch.tensor([0.02, 0.1, 0.05], dtype=F64)
    return means, variances, ClassConditionalGaussianDenoiser(means, variances[:, None, None])


@pytest.mark.parametrize("name, t", [("ddpm", 150), ("vp", 0.3), ("subvp", 0.3), ("edm", 0.4)])
def test_mixture_1d_against_grid_integration(name, t):
    means, variances, den = mixture_1d()
    a, s = coefs(name, t)
    x_t = torch.tensor([[-0.8], [0.0], [0.35], [1.2]], dtype=F64)
    x0 = torch.linspace(-3.0, 3.0, 200001, dtype=F64)
    like = normal_pdf(x_t, a * x0[None], s * s)  # (4, grid)
    resid = (x_t - a * x0[None]) / s
    comps = [normal_pdf(x0, means[k, 0], variances[k]) for k in range(3)]
    for y, prior in [(None, sum(comps) / 3), (0, comps[0]), (2, comps[2])]:
        w = prior[None] * like
        z = torch.trapezoid(w, x0, dim=1)
        eps_ref = torch.trapezoid(w * resid, x0, dim=1) / z
        torch.testing.assert_close(den.eps(x_t, t, y, schedule=name)[:, 0], eps_ref,
                                   rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(den.log_prob_marginal(x_t, t, y, schedule=name),
                                   torch.log(z), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, t", CASES)
@pytest.mark.parametrize("which", ["gaussian", "mixture", "mixture-y"])
def test_score_is_the_gradient_of_the_marginal(name, t, which):
    d = 3
    den: Denoiser
    if which == "gaussian":
        den = GaussianDenoiser(torch.randn(1, 1, d, dtype=F64, generator=gen(4)), random_cov(d))
        y = None
    else:
        means = torch.randn(2, 1, 1, d, dtype=F64, generator=gen(5))
        covs = torch.stack([random_cov(d, 6), random_cov(d, 7, floor=0.0)])
        den = ClassConditionalGaussianDenoiser(means, covs)
        y = torch.tensor([1, 0, 1, 1]) if which == "mixture-y" else None
    x_t = noisy(torch.randn(4, 1, 1, d, dtype=F64, generator=gen(8)), name, t)
    x_t.requires_grad_(True)
    (grad,) = torch.autograd.grad(den.log_prob_marginal(x_t, t, y, schedule=name).sum(), x_t)
    torch.testing.assert_close(den.score(x_t, t, y, schedule=name), grad, rtol=1e-8,
                               atol=1e-10)


def test_gaussian_validation_and_sampling():
    with pytest.raises(ValueError, match="symmetric"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianDenoiser(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match=r"shape \(1, 3, 3\)"):
        GaussianDenoiser(torch.zeros(3), torch.eye(2))
    mu = torch.tensor([[0.5, -0.5]], dtype=F64)
    den = GaussianDenoiser(mu, random_cov(2))
    x = den.sample(20000, generator=gen(9))
    assert x.shape == (20000, 1, 2)
    torch.testing.assert_close(x.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.reshape(-1, 2).T), den.Sigma, atol=0.03, rtol=0)


# -- the optimal denoiser of a finite set (RDC theorem 3.2) ---------------------------------
def train_set():
    x = torch.tensor([[0.9, -0.2, 0.1], [0.5, 0.4, -0.7], [-0.3, 0.8, 0.2],
                      [-0.9, -0.6, 0.5], [0.2, 0.1, 0.9], [0.0, -0.8, -0.4]], dtype=F64)
    return x, torch.tensor([0, 1, 0, 1, 1, 0])


def brute_force_eps(x_t, a, s, xs, ys, y):
    """RDC eq. (7), one sample and one training point at a time."""
    out = []
    for b in range(len(x_t)):
        pts = [i for i in range(len(xs)) if y is None or ys[i] == y[b]]
        logits = [-sum((x_t[b][j] - a * xs[i][j]) ** 2 for j in range(len(xs[i])))
                  / (2 * s * s) for i in pts]
        top = max(logits)
        w = [math.exp(v - top) for v in logits]
        total = sum(w)
        out.append([sum(w[k] * (x_t[b][j] - a * xs[i][j]) / s for k, i in enumerate(pts)) / total
                    for j in range(len(xs[0]))])
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("name, t", CASES)
def test_optimal_denoiser_matches_brute_force(name, t):
    xs, ys = train_set()
    den = OptimalDenoiser(xs, ys, 2)
    tiny_chunks = OptimalDenoiser(xs, ys, 2, chunk_elems=1)  # one training point per chunk
    x_t = noisy(torch.randn(4, 3, dtype=F64, generator=gen(10)) * 0.7, name, t)
    a, s = coefs(name, t)
    for y in (None, torch.tensor([0, 1, 1, 0])):
        ref = brute_force_eps(x_t.tolist(), a, s, xs.tolist(), ys.tolist(),
                              None if y is None else y.tolist())
        torch.testing.assert_close(den.eps(x_t, t, y, schedule=name), ref, rtol=1e-9,
                                   atol=1e-10)
        torch.testing.assert_close(tiny_chunks.eps(x_t, t, y, schedule=name), ref, rtol=1e-9,
                                   atol=1e-10)


def test_optimal_denoiser_is_a_mixture_of_point_masses():
    """y=None equals the Gaussian-mixture posterior with zero covariances (uniform weights)."""
    xs, _ = train_set()
    den = OptimalDenoiser(xs)
    mixture = ClassConditionalGaussianDenoiser(xs, torch.zeros(6, 3, 3, dtype=F64))
    x_t = noisy(torch.randn(5, 3, dtype=F64, generator=gen(11)), "vp", 0.3)
    torch.testing.assert_close(den.eps(x_t, 0.3, schedule="vp"),
                               mixture.eps(x_t, 0.3, schedule="vp"))
    # and its score is the gradient of that mixture's exact marginal
    x_t.requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_prob_marginal(x_t, 0.3, schedule="vp").sum(), x_t)
    torch.testing.assert_close(den.score(x_t, 0.3, schedule="vp"), grad)


def test_optimal_denoiser_at_tiny_noise_returns_the_nearest_point():
    xs, ys = train_set()
    den = OptimalDenoiser(xs, ys)
    assert den.num_classes == 2 and den.conditional
    x_t = xs + 0.05 * torch.randn(6, 3, dtype=F64, generator=gen(12))
    sigma = 1e-3
    torch.testing.assert_close(den.x0_hat(x_t, sigma, schedule="edm"), xs)
    # restricted to class 1, each point maps to the nearest class-1 point
    y = torch.ones(6, dtype=torch.long)
    near = torch.cdist(x_t, xs[ys == 1]).argmin(1)
    torch.testing.assert_close(den.x0_hat(x_t, sigma, y, schedule="edm"), xs[ys == 1][near])


def test_optimal_denoiser_validation():
    xs, ys = train_set()
    with pytest.raises(ValueError, match=r"classes \[2\] have no training points"):
        OptimalDenoiser(xs, ys, 3)
    with pytest.raises(ValueError, match="is not class-conditional"):
        OptimalDenoiser(xs).eps(xs, 0.5, torch.zeros(6, dtype=torch.long), schedule="vp")
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\): \[5\]"):
        OptimalDenoiser(xs, ys).eps(xs, 0.5, torch.tensor([0, 1, 5, 0, 0, 0]), schedule="vp")


# -- linear flow and Pope et al.'s l2 attacks --------------------------------------------------
def flow(d=4, seed=13, event_shape=None):
    A = torch.randn(d, d, dtype=F64, generator=gen(seed)) + 2 * torch.eye(d, dtype=F64)
    b = torch.randn(d, dtype=F64, generator=gen(seed + 1))
    return LinearGaussianFlow(A, b if event_shape is None else b.reshape(event_shape))


def nll_increase(fl, x, delta):
    return fl.log_prob(x) - fl.log_prob(x + delta)


def test_linear_flow_log_prob_inverse_forward():
    fl = flow(event_shape=(1, 2, 2))
    mvn = torch.distributions.MultivariateNormal(fl.b, fl.covariance)
    x = fl.sample(7, generator=gen(14))
    assert x.shape == (7, 1, 2, 2)
    torch.testing.assert_close(fl.log_prob(x), mvn.log_prob(x.reshape(7, -1)))
    z = torch.randn(5, 4, dtype=F64, generator=gen(15))
    torch.testing.assert_close(fl.inverse(fl(z)), z)
    with pytest.raises(ValueError, match="invertible"):
        LinearGaussianFlow(torch.ones(2, 2), torch.zeros(2))


def test_optimal_l2_perturbation_beats_random_sphere_perturbations():
    fl = flow()
    x = fl.sample(6, generator=gen(16))
    eps = 0.5
    delta = fl.optimal_l2_perturbation(x, eps)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((6,), eps, dtype=F64))
    best = nll_increase(fl, x, delta)
    u = torch.randn(1000, 4, dtype=F64, generator=gen(17))
    u = eps * u / u.norm(dim=1, keepdim=True)
    rand = nll_increase(fl, x.repeat_interleave(1000, 0), u.repeat(6, 1)).reshape(6, 1000)
    assert bool((best[:, None] >= rand - 1e-12).all())
    assert bool((best > rand.max(1).values).all())
    # the spherical formula is not optimal for this anisotropic K
    assert bool((best >= nll_increase(fl, x, fl.spherical_l2_perturbation(x, eps)) - 1e-12).all())


@pytest.mark.parametrize("offset", [(0.8, -0.3), (0.0, 0.1), (0.3, 0.0), (0.0, 0.0)])
def test_optimal_l2_perturbation_against_a_dense_circle_2d(offset):
    """Includes the hard case (x - mu orthogonal to u_min) and x = mu."""
    fl = LinearGaussianFlow(torch.diag(torch.tensor([1.0, 2.0], dtype=F64)),
                            torch.tensor([0.2, -0.1], dtype=F64))
    x = (fl.b + torch.tensor(offset, dtype=F64))[None]
    eps = 0.7
    delta = fl.optimal_l2_perturbation(x, eps)
    theta = torch.linspace(0, 2 * math.pi, 200001, dtype=F64)
    circle = eps * torch.stack([theta.cos(), theta.sin()], 1)
    grid_best = nll_increase(fl, x.expand(len(theta), 2), circle).max()
    assert nll_increase(fl, x, delta).item() == pytest.approx(grid_best.item(), rel=1e-9)
    assert delta.norm().item() == pytest.approx(eps, rel=1e-12)


def test_optimal_matches_spherical_and_universal_special_cases():
    # K = c I: the optimum is eps (x - mu) / ||x - mu|| (Pope et al. eq. 3)
    sph = LinearGaussianFlow(1.7 * torch.eye(3, dtype=F64), torch.tensor([0.1, 0.2, 0.3],
                                                                           dtype=F64))
    x = sph.sample(5, generator=gen(18))
    eps = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(sph.optimal_l2_perturbation(x, eps),
                               sph.spherical_l2_perturbation(x, eps))
    torch.testing.assert_close(spherical_l2_perturbation(x, sph.b, 1.0).norm(dim=1),
                               torch.ones(5, dtype=F64))
    # x = mu: the optimum is eps u_min(K) (section 3.1.2), up to the sign
    fl = flow()
    u = fl.universal_l2_perturbation(0.8)
    delta = fl.optimal_l2_perturbation(fl.b[None], 0.8)[0]
    assert min((delta - u).norm(), (delta + u).norm()).item() < 1e-9
    eigvals, vecs = torch.linalg.eigh(fl.covariance)
    torch.testing.assert_close(u.abs(), 0.8 * vecs[:, 0].abs())
    # universal: maximizes the expected NLL increase E[L(x) - L(x + d)] = d^T K^{-1} d / 2
    k_inv = torch.linalg.inv(fl.covariance)
    r = torch.randn(1000, 4, dtype=F64, generator=gen(19))
    r = 0.8 * r / r.norm(dim=1, keepdim=True)
    expected = 0.5 * torch.einsum("nd,de,ne->n", r, k_inv, r)
    assert (0.5 * u @ k_inv @ u).item() >= expected.max().item()
    assert (0.5 * u @ k_inv @ u).item() == pytest.approx(0.5 * 0.64 / eigvals[0].item())
    torch.testing.assert_close(universal_l2_perturbation(fl.covariance, 0.8), u)


def test_optimal_l2_validation():
    fl = flow()
    x = fl.sample(2, generator=gen(20))
    with pytest.raises(ValueError, match="eps must be"):
        fl.optimal_l2_perturbation(x, -0.1)
    with pytest.raises(ValueError, match="positive definite"):
        optimal_l2_perturbation(x, fl.b, torch.zeros(4, 4, dtype=F64), 0.1)
    assert fl.optimal_l2_perturbation(x, 0.0).abs().max().item() == 0.0


# -- the Denoiser interface ----------------------------------------------------------------
def analytic_models():
    d = 4  # images (B, 1, 2, 2)
    xs, _ = train_set()
    pts = torch.cat([xs, -xs], 1)[:, :d].reshape(6, 1, 2, 2)
    ys = torch.tensor([0, 1, 0, 1, 1, 0])
    means = torch.randn(2, 1, 2, 2, dtype=F64, generator=gen(21))
    covs = torch.stack([random_cov(d, 22), random_cov(d, 23)])
    return {
        "gaussian": GaussianDenoiser(means[0], covs[0]),
        "class-gaussian": ClassConditionalGaussianDenoiser(means, covs),
        "optimal": OptimalDenoiser(pts, ys, 2),
        "flow": flow(event_shape=(1, 2, 2)).as_denoiser(),
    }


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_analytic_models_are_interchangeable_denoisers(name):
    sched = get_schedule(name)
    x_t = torch.randn(3, 1, 2, 2, dtype=F64, generator=gen(24))
    t = TIMES[name][1]
    per_sample_t = torch.tensor([TIMES[name][0], t, t])
    for key, den in analytic_models().items():
        assert isinstance(den, Denoiser), key
        y = torch.tensor([0, 1, 1]) if den.conditional else None
        den.reset_nfe()
        eps = den.eps(x_t, t, y, schedule=name)
        assert eps.shape == x_t.shape and eps.dtype == F64
        torch.testing.assert_close(den.eps(x_t, t, y, schedule=sched), eps)
        a, s = coefs(name, t)
        torch.testing.assert_close(den.x0_hat(x_t, t, y, schedule=name), (x_t - s * eps) / a)
        torch.testing.assert_close(den.score(x_t, t, y, schedule=name), -eps / s)
        assert den.nfe == 4  # one per batched call, whatever the batch size
        # a per-sample t agrees with scalar calls
        mixed = den.eps(x_t, per_sample_t, y, schedule=name)
        torch.testing.assert_close(mixed[1:], eps[1:])
        # unconditional calls always work; float32 inputs come back float32
        assert den.eps(x_t.float(), t, schedule=name).dtype == torch.float32
        if not den.conditional:
            with pytest.raises(ValueError, match="not class-conditional"):
                den.eps(x_t, t, torch.tensor([0, 0, 0]), schedule=name)


def test_pf_ode_drift_and_its_refusal_of_ddpm():
    den = analytic_models()["gaussian"]
    x = torch.randn(2, 1, 2, 2, dtype=F64, generator=gen(25))
    for name, t in [("vp", 0.4), ("subvp", 0.4), ("edm", 1.5)]:
        sched = get_schedule(name)
        assert isinstance(sched, SDESchedule)
        tt = torch.tensor(t, dtype=F64)
        f, g2 = sched.drift_coef(tt).item(), sched.diffusion_sq(tt).item()
        score = den.score(x, t, schedule=name)
        torch.testing.assert_close(den.pf_ode_drift(x, t, schedule=name), f * x - g2 * score / 2)
        torch.testing.assert_close(den.reverse_sde_drift(x, t, schedule=name), f * x - g2 * score)
    # EDM's PF-ODE is Karras' dx/dsigma = eps_hat
    torch.testing.assert_close(den.pf_ode_drift(x, 1.5, schedule="edm"),
                               den.eps(x, 1.5, schedule="edm"))
    with pytest.raises(ValueError, match="'ddpm'"):
        den.pf_ode_drift(x, 10, schedule="ddpm")
    with pytest.raises(ValueError, match="did you mean 'vp'"):
        den.eps(x, 0.4, schedule="vpp")
    with pytest.raises(ValueError, match="1.5"):
        den.eps(x, 1.5, schedule="vp")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        den.eps(x, torch.tensor([0.1, 0.2, 0.3]), schedule="vp")


def test_model_space_helpers():
    img = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(to_model_space(img), torch.tensor([-1.0, -0.5, 1.0]))
    torch.testing.assert_close(from_model_space(to_model_space(img)), img)
    assert Denoiser.data_range == (-1.0, 1.0)
