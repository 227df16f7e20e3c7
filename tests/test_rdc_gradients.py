"""RDC's exact gradient (issue 15, hole 2), in float64 on the optimal denoiser of 20 digits.

* finite differences with frozen noise (the defense reseeded before every evaluation) check
  the second-order gradient of the smooth variants (t1, v1 under l2);
* v1 under l-inf: the exact gradient through the sign steps is the identity masked where the
  box clip binds (BPDA with holes); :meth:`RobustDiffusionClassifier.smooth_sign` keeps the
  forward pass bit for bit and gives the sign steps a second-order backward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from benchmark.data import load_dataset
from benchmark.zoo.analytic import OptimalDenoiser
from defenses.rdc import (
    RobustDiffusionClassifier,
    check_sign_tau,
    smooth_adam_ratio,
    smooth_sign,
)

pytestmark = pytest.mark.usefixtures("one_thread")

Loss = Callable[[Tensor], Tensor]


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, OptimalDenoiser]:
    """Two test digits (float64) and the optimal denoiser of 2 training digits per class."""
    ds = load_dataset("digits")
    rows = torch.cat([(ds.train.y == c).nonzero().flatten()[:2] for c in range(10)])
    den = OptimalDenoiser((2 * ds.train.x[rows] - 1).double(), ds.train.y[rows], 10)
    return ds.test.x[:2].double(), ds.test.y[:2], den


def make(den: OptimalDenoiser, **kw: object) -> RobustDiffusionClassifier:
    return RobustDiffusionClassifier(denoiser=den, timesteps=3, lm_timesteps=3,
                                     rows_per_batch=64, **kw)  # type: ignore[arg-type]


def exact_grad(rdc: RobustDiffusionClassifier, x: Tensor, loss: Loss, seed: int) -> Tensor:
    rdc.reseed(seed)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(rdc(xr)), xr)
    return g


def head_grad_at_purified(rdc: RobustDiffusionClassifier, x: Tensor, loss: Loss,
                          seed: int) -> Tensor:
    """BPDA's gradient with the same noise: the head's gradient at purify(x)."""
    rdc.reseed(seed)
    with torch.no_grad():
        x_hat = rdc.purify(x)
    x_hat.requires_grad_(True)
    (g,) = torch.autograd.grad(loss(rdc.head(x_hat)), x_hat)
    return g


def smallest_lm_grad(rdc: RobustDiffusionClassifier, x: Tensor, seed: int) -> float:
    """The smallest |g| (gradient of the likelihood objective) over purify's steps at x."""
    seen: list[float] = []
    lm_grad = rdc._lm_grad

    def record(*args: object) -> Tensor:
        g = lm_grad(*args)  # type: ignore[arg-type]
        seen.append(float(g.abs().min()))
        return g

    rdc._lm_grad = record  # type: ignore[method-assign, assignment]
    try:
        rdc.reseed(seed)
        with torch.no_grad():
            rdc.purify(x)
    finally:
        del rdc._lm_grad
    return min(seen)


def _weighted(y: Tensor) -> Loss:
    w = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return lambda logits: (w * logits).sum()


def _ce(y: Tensor) -> Loss:
    return lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="sum")


# -- the surrogates themselves ---------------------------------------------------------------
def test_surrogates_have_sign_values_and_the_smooth_functions_derivatives():
    """Forward: sign / Adam's ratio bit for bit. First and second derivatives: exactly those
    of the smooth functions (tanh(m / (tau mean|m|)); Adam with epsilon tau mean sqrt(v))."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 1e-2
    c = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 1e-5
    u, w = (torch.randn(m.shape, generator=g, dtype=torch.float64) for _ in range(2))
    tau, tiny = 0.5, 1e-8

    def tanh_ref(m: Tensor) -> Tensor:
        return torch.tanh(m / (tau * m.abs().flatten(1).mean(1).view(-1, 1, 1, 1)))

    def adam_ref(m: Tensor) -> Tensor:  # m_hat = m, v_hat = m^2 + c (Adam's first steps)
        v = m * m + c
        scale = (v + tiny * tiny).sqrt().flatten(1).mean(1).view(-1, 1, 1, 1)
        return m / (v + (tau * scale) ** 2 + tiny * tiny).sqrt()

    cases = [(lambda m: smooth_sign(m, tau), tanh_ref, m.sign()),
             (lambda m: smooth_adam_ratio(m, m * m + c, tiny, tau), adam_ref,
              m / (m * m + c + tiny * tiny).sqrt())]
    for f, ref, value in cases:
        mr = m.clone().requires_grad_(True)
        out = f(mr)
        assert torch.equal(out, value)
        derivs = []
        for fn in (f, ref):
            mr = m.clone().requires_grad_(True)
            (d1,) = torch.autograd.grad((w * fn(mr)).sum(), mr, create_graph=True)
            (d2,) = torch.autograd.grad((u * d1).sum(), mr)
            derivs.append((d1.detach(), d2))
        torch.testing.assert_close(derivs[0][0], derivs[1][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(derivs[0][1], derivs[1][1], rtol=1e-12, atol=0)
        assert derivs[0][1].abs().sum() > 0  # a genuine second derivative
    # tau=None: sign's true derivative (zero) and Adam's own
    mr = m.clone().requires_grad_(True)
    (d,) = torch.autograd.grad((w * smooth_sign(mr, None)).sum(), mr)
    assert torch.equal(d, torch.zeros_like(m))
    for bad, error in [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                       (float("inf"), ValueError), ("0.5", TypeError), (True, TypeError)]:
        with pytest.raises(error, match=f"sign_tau must be a finite number > 0.*got {bad!r}"):
            check_sign_tau(bad)


# -- finite differences: the exact gradient is the gradient ----------------------------------
@pytest.mark.parametrize(("variant", "norm"), [("t1", "linf"), ("v1", "l2")])
def test_exact_gradient_matches_finite_differences_with_frozen_noise(digits, variant, norm):
    """Autograd's second-order gradient of a scalar of the logits equals central differences
    along random directions, the defense reseeded before every evaluation (same noise). Inputs
    in [0.3, 0.7]: the box clip never binds, so the function is smooth at the point. t1's
    first Adam step g / sqrt(g^2 + 1e-16) has a spike of slope up to 1e8 where |g| < ~1e-5;
    the noise seed is one whose gradients stay far from 0 (checked), else central
    differences would straddle it. The head's gradient at purify(x) (BPDA, no second-order
    terms) misses by far more than the tolerance, so the check can tell them apart."""
    x, y, den = digits
    x = 0.3 + 0.4 * x
    rdc = make(den, variant=variant, norm=norm, steps=3)
    seed = 5
    if variant == "t1":  # (v1's l2 steps normalize whole images: no per-pixel spike)
        assert smallest_lm_grad(rdc, x, seed) > 1e-3
    loss = _weighted(y)
    grad = exact_grad(rdc, x, loss, seed=seed)
    bpda = head_grad_at_purified(rdc, x, loss, seed=seed)
    g = torch.Generator().manual_seed(2)
    h = 1e-6
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d /= d.norm()
        with torch.no_grad():
            rdc.reseed(seed)
            up = loss(rdc(x + h * d))
            rdc.reseed(seed)
            down = loss(rdc(x - h * d))
        fd = float((up - down) / (2 * h))
        auto, first_order = float((grad * d).sum()), float((bpda * d).sum())
        assert abs(fd - auto) <= 1e-5 * abs(fd) + 1e-8, (fd, auto)
        assert abs(fd - first_order) > 1e-3 * abs(fd), (fd, first_order)


# -- v1 under l-inf: the holes, and the smooth sign that fills them -----------------------------
def test_exact_v1_linf_gradient_is_bpda_with_holes(digits):
    """sign has zero derivative: the exact gradient is the head's gradient at purify(x) on every
    pixel (exactly), or exactly 0 where the box clip has bound (backgrounds at 0)."""
    x, y, den = digits
    rdc = make(den, steps=3)
    exact = exact_grad(rdc, x, _ce(y), seed=1)
    bpda = head_grad_at_purified(rdc, x, _ce(y), seed=1)
    holes = (exact == 0) & (bpda != 0)
    assert holes.sum() >= 20  # 108 of 512 here
    assert torch.equal(exact[exact != 0], bpda[exact != 0])
    # the holes are dark pixels pushed below 0 (bright ones above 1 would count too)
    assert ((x[holes] <= rdc.eta) | (x[holes] >= 1 - rdc.eta)).all()


def test_smooth_sign_keeps_the_forward_and_fills_the_holes(digits):
    x, y, den = digits
    rdc = make(den, steps=3)
    exact = exact_grad(rdc, x, _ce(y), seed=1)
    bpda = head_grad_at_purified(rdc, x, _ce(y), seed=1)
    holes = (exact == 0) & (bpda != 0)
    with rdc.smooth_sign(0.5):
        smooth = exact_grad(rdc, x, _ce(y), seed=1)
        rdc.reseed(1)
        xr = x.clone().requires_grad_(True)
        out_smooth, purified_smooth = rdc(xr), None
        rdc.reseed(1)
        purified_smooth = rdc.purify(xr)
    assert rdc._sign_tau is None  # restored
    rdc.reseed(1)
    xr = x.clone().requires_grad_(True)
    out_exact = rdc(xr)
    rdc.reseed(1)
    assert torch.equal(rdc.purify(xr), purified_smooth)
    assert torch.equal(out_exact, out_smooth)
    assert holes.any() and (smooth[holes] != 0).all()  # second-order terms reach the holes
    assert (smooth - exact).norm() > 0.1 * exact.norm()  # 0.28 here
    with rdc.smooth_sign(1e-9):  # tau -> 0: the exact gradient again
        torch.testing.assert_close(exact_grad(rdc, x, _ce(y), seed=1), exact, rtol=1e-12,
                                   atol=1e-15)


def test_smooth_adam_ratio_on_t1s_first_step(digits):
    """t1's first Adam step is sign(g) too: where no |g| is near 0 (checked) its exact
    gradient is the head's at purify(x) (the clip does not bind in [0.3, 0.7]); the smooth
    backward adds second-order terms, and keeps the forward bit for bit."""
    x, y, den = digits
    x = 0.3 + 0.4 * x
    rdc = make(den, variant="t1", steps=1)
    seed = 5
    assert smallest_lm_grad(rdc, x, seed) > 1e-3
    exact = exact_grad(rdc, x, _ce(y), seed=seed)
    torch.testing.assert_close(exact, head_grad_at_purified(rdc, x, _ce(y), seed=seed),
                               rtol=1e-6, atol=1e-12)
    with rdc.smooth_sign(0.5):
        smooth = exact_grad(rdc, x, _ce(y), seed=seed)
        rdc.reseed(seed)
        out_smooth = rdc(x.clone().requires_grad_(True))
    rdc.reseed(seed)
    assert torch.equal(rdc(x.clone().requires_grad_(True)), out_smooth)
    assert (smooth - exact).norm() > 0.1 * exact.norm()


def test_smooth_tau_is_captured_for_checkpoint_recomputation(digits):
    """The backward of checkpointed steps recomputes them; the tau in force when the forward
    ran is used even when the backward runs after the context has exited."""
    x, y, den = digits
    rdc = make(den, steps=2, checkpoint=True)
    with rdc.smooth_sign(0.5):
        inside = exact_grad(rdc, x, _ce(y), seed=4)
        rdc.reseed(4)
        xr = x.clone().requires_grad_(True)
        loss = _ce(y)(rdc(xr))
    (after,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(after, inside, rtol=0, atol=0)
    assert not torch.equal(inside, exact_grad(rdc, x, _ce(y), seed=4))


def test_smooth_sign_refuses_what_has_no_sign(digits):
    _, _, den = digits
    cases = [(make(den, norm="l2"), 0.5, "no sign-like step"),  # m / ||m||: smooth already
             (make(den, steps=0), 0.5, "no sign-like step"),
             (make(den), -0.5, "sign_tau must be a finite number > 0.*got -0.5")]
    for rdc, tau, match in cases:
        with pytest.raises(ValueError, match=match), rdc.smooth_sign(tau):
            pass
    assert make(den).sign_steps and make(den, variant="t1").sign_steps
