"""DC / RDC (Chen et al., ICML 2024) against exact oracles: the optimal diffusion classifier
(theorem 3.2), a per-class reference loop, and the failure paths."""

from __future__ import annotations

import contextlib

import pytest
import torch

from attacks import PGD
from benchmark.api.defense import Defense
from benchmark.data import load_dataset
from benchmark.zoo.analytic import OptimalDenoiser
from defenses.rdc import (
    DiffusionClassifier,
    OptimalDiffusionClassifier,
    RobustDiffusionClassifier,
    systematic_timesteps,
)
from threat_models.l2 import L2Threat
from threat_models.linf import LinfThreat

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def optimal() -> OptimalDiffusionClassifier:
    dc = OptimalDiffusionClassifier(per_class=3, timesteps=10)
    dc.reseed(0)
    return dc


def train_points(dc: OptimalDiffusionClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits")
    return ds.train.x[dc.train_rows], ds.train.y[dc.train_rows]


def test_systematic_subset_matches_the_paper():
    assert systematic_timesteps(1000, 4).tolist() == [249, 499, 749, 999]  # {iT/T'} 1-based
    assert len(systematic_timesteps(1000, 1000).unique()) == 1000
    with pytest.raises(ValueError, match=r"\[1, T=1000\], got 2000"):
        systematic_timesteps(1000, 2000)
    with pytest.raises(TypeError, match="integer, got 2.5"):
        systematic_timesteps(1000, 2.5)  # type: ignore[arg-type]


def test_batched_rows_equal_a_per_class_reference_loop(optimal):
    """Same noise: chunked (sample, timestep, class) rows == one class / one timestep loop."""
    x, _ = train_points(optimal)
    x = x[:4]
    optimal.reseed(7)
    fast = optimal.class_losses(x)
    optimal.reseed(7)
    eps = torch.randn((4, len(optimal.timesteps), *x.shape[1:]),
                      generator=optimal.generator_for(x))
    a, s = optimal.schedule.alpha_sigma(optimal.timesteps)
    ref = torch.zeros(4, optimal.num_classes)
    for k in range(optimal.num_classes):
        for j, t in enumerate(optimal.timesteps.tolist()):
            xt = a[j] * (2 * x - 1) + s[j] * eps[:, j]
            pred = optimal.denoiser.eps(xt, t, torch.full((4,), k), schedule=optimal.schedule)
            ref[:, k] += (pred - eps[:, j]).pow(2).flatten(1).sum(1) / len(optimal.timesteps)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-3)
    small = DiffusionClassifier(denoiser=optimal.denoiser, timesteps=10, rows_per_batch=7)
    small.reseed(7)
    torch.testing.assert_close(small.class_losses(x), fast, rtol=1e-5, atol=1e-4)


def test_nfe_counts_batches_not_rows(optimal):
    x, _ = train_points(optimal)
    dc = DiffusionClassifier(denoiser=optimal.denoiser, timesteps=10, rows_per_batch=50)
    assert dc.rows_per_batch_for(x) == 50
    dc.reseed(0)
    dc.denoiser.reset_nfe()
    dc(x[:5])  # 5 x 10 timesteps x 10 classes = 500 rows = 10 batches of 50
    assert dc.denoiser.reset_nfe() == 10
    assert dc.nfe_per_call == 100  # denoiser rows per image


@pytest.mark.parametrize("checkpoint", [True, False])
def test_first_order_gradients_chunk_by_chunk_equal_the_full_graph(optimal, checkpoint):
    """First-order gradients are computed chunk by chunk as the rows are evaluated (no stored
    graph, no recomputation): DC's cross-entropy gradient, DC's likelihood objective (Lagrange's
    penalty) and RDC's likelihood-maximization step equal the gradient of the whole graph kept
    at once, with 7-row chunks (the last one ragged), and each row is evaluated once (NFE)."""
    x, y = train_points(optimal)
    x = (x[:4] + 0.05 * torch.randn(x[:4].shape, generator=torch.Generator().manual_seed(3))
         ).clamp(0, 1)
    dc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=5, steps=2,
                                   rows_per_batch=7, checkpoint=checkpoint)

    def grads(second_order: bool) -> list[torch.Tensor]:
        out = []
        with dc._second_order_graph() if second_order else contextlib.nullcontext():
            for f in (lambda v: torch.nn.functional.cross_entropy(dc.head(v), y[:4]),
                      lambda v: dc.likelihood_objective(v).sum(),
                      lambda v: dc.lm_objective(v).sum()):
                dc.reseed(11)
                xr = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(f(xr), xr)
                out.append(g)
        return out

    dc.denoiser.reset_nfe()
    eager = grads(False)
    # rows: 4 x 5 x 10 = 200 (29 chunks), 4 x 5 = 20 (3), 4 x lm_timesteps (5) = 20 (3)
    assert dc.denoiser.reset_nfe() == 29 + 3 + 3
    for got, want in zip(eager, grads(True), strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_chunked_gradients_keep_second_derivatives_exact(optimal):
    """A gradient taken with ``create_graph=True`` through the chunk-by-chunk path recomputes
    the chunks with their graph, so a second derivative (here with a second path to the input
    beside DC's) equals the one of the whole graph kept at once."""
    x, y = train_points(optimal)
    dc = DiffusionClassifier(denoiser=optimal.denoiser, timesteps=3, rows_per_batch=7)

    def second(second_order: bool) -> torch.Tensor:
        dc.reseed(0)
        xr = x[:2].clone().requires_grad_(True)
        with dc._second_order_graph() if second_order else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(dc(xr), y[:2]) + xr.pow(3).sum()
            (g,) = torch.autograd.grad(loss, xr, create_graph=True)
            (h,) = torch.autograd.grad(g.square().sum(), xr)
        return h

    want = second(True)
    torch.testing.assert_close(second(False), want, rtol=1e-4,
                               atol=1e-5 * float(want.abs().max()))
    xr = x[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(dc(xr), y[:2]), xr,
                               create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), xr)  # DC's own curvature reaches the input
    assert h.abs().sum() > 0


def test_optimal_dc_is_exact_on_its_training_set(optimal):
    x, y = train_points(optimal)
    optimal.reseed(1)
    assert (optimal(x).argmax(1) == y).all()


@pytest.mark.parametrize("threat", [LinfThreat(8 / 255), L2Threat(0.5)], ids=["linf", "l2"])
def test_optimal_dc_is_robust_on_training_points(optimal, threat):
    """Theorem 3.2 / sec. 3.3: the optimal diffusion classifier keeps 100% robust accuracy at
    l-inf 8/255 and l2 0.5 on its training points, against PGD with EOT."""
    x, y = train_points(optimal)
    x, y = x[::3], y[::3]
    optimal.reseed(2)
    attack = PGD(steps=10, loss="margin", eot_draws=2)
    result = attack.run(optimal, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert threat.check(x, result.x_adv, result.params) is None
    with torch.no_grad():
        assert (optimal(result.x_adv).argmax(1) == y).all()


def test_rdc_purification_stays_in_its_ball_and_lowers_the_loss(optimal):
    x, _ = train_points(optimal)
    x = (x[:4] + 0.1 * torch.randn(x[:4].shape, generator=torch.Generator().manual_seed(0))
         ).clamp(0, 1)
    rdc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=10, steps=5)
    rdc.reseed(3)
    before = rdc.likelihood_objective(x)
    rdc.reseed(4)
    x_hat = rdc.purify(x)
    assert (x_hat - x).abs().max() <= 8 / 255 + 1e-6
    rdc.reseed(3)
    assert rdc.likelihood_objective(x_hat).mean() < before.mean()
    l2 = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=10, steps=3, norm="l2")
    l2.reseed(3)
    assert (l2.purify(x) - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


@pytest.mark.parametrize("variant", ["v1", "t1"])
def test_rdc_exact_gradient_flows_through_purification(optimal, variant):
    x, y = train_points(optimal)
    rdc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=5, steps=1,
                                    variant=variant)
    rdc.reseed(5)
    xr = x[:2].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(rdc(xr), y[:2])
    (g,) = torch.autograd.grad(loss, xr)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert {"purify", "head", "likelihood_objective"} <= rdc.capabilities()


@pytest.mark.parametrize(("variant", "norm", "tau"),
                         [("v1", "linf", None), ("v1", "l2", None), ("t1", "linf", None),
                          ("v1", "linf", 0.5), ("t1", "linf", 0.5)])
def test_checkpointed_steps_give_the_exact_gradient(optimal, variant, norm, tau):
    """Per-step checkpointing of the likelihood maximization recomputes each step with the noise
    drawn before it (t1: a sigma per row): the same exact (second-order) gradient as keeping the
    whole graph, with the true derivative of the sign-like steps or the smooth one."""
    x, y = train_points(optimal)
    x = (x[:3] + 0.05 * torch.randn(x[:3].shape, generator=torch.Generator().manual_seed(1))
         ).clamp(0, 1)
    grads = []
    for ckpt in (False, True):
        rdc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=5, steps=3,
                                        variant=variant, norm=norm, checkpoint=ckpt)
        rdc.reseed(7)
        xr = x.clone().requires_grad_(True)
        with rdc.smooth_sign(tau) if tau is not None else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(rdc(xr), y[:3])
            (g,) = torch.autograd.grad(loss, xr)
        grads.append(g)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_rdc_config_reports_the_resolved_settings(optimal):
    """eta (and the rest) resolved in config(), so a record never says only 'default'."""
    den = optimal.denoiser
    cfg = RobustDiffusionClassifier(denoiser=den, timesteps=5).config()
    assert cfg["eta"] == 8 / 255 and cfg["norm"] == "linf" and cfg["steps"] == 10
    assert {"variant", "norm", "steps", "eta", "momentum", "lr", "sigma_range",
            "lm_timesteps", "timesteps"} <= cfg.keys()
    assert cfg["lm_timesteps"] == cfg["timesteps"] == 5
    l2 = RobustDiffusionClassifier(denoiser=den, timesteps=5, norm="l2", lm_timesteps=3)
    assert l2.config()["eta"] == 0.5 and l2.config()["lm_timesteps"] == 3
    t1 = RobustDiffusionClassifier(denoiser=den, timesteps=5, variant="t1", eta=0.1)
    assert t1.config()["eta"] == 0.1 and t1.config()["steps"] == 5
    assert t1.config()["sigma_range"] == [0.4, 0.6]
    assert "eta=0.1" in repr(t1)
    assert DiffusionClassifier(denoiser=den, timesteps=5).config()["timesteps"] == 5


def test_t1_draws_one_sigma_per_row(optimal):
    """EOT copies stacked along the batch (identical rows) get their own noise level, and the
    EDM loss of each row uses its own sigma."""
    x, _ = train_points(optimal)
    rdc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=5, variant="t1")
    twins = x[:1].expand(4, *x.shape[1:])
    rdc.reseed(0)
    sigma, eps = rdc._lm_noise(twins)
    assert sigma is not None and sigma.shape == (4,)
    assert len(sigma.unique()) == 4 and ((sigma >= 0.4) & (sigma <= 0.6)).all()
    rows = rdc._lm_loss(twins, sigma, eps)
    for i in range(4):
        one = rdc._lm_loss(twins[i:i + 1], sigma[i:i + 1], eps[i:i + 1])
        torch.testing.assert_close(rows[i:i + 1], one)


@pytest.mark.parametrize("variant", ["t1", "v1"])
def test_lagrange_penalty_is_the_likelihood_maximizations_objective(optimal, variant):
    """Eq. 10's penalty is what purify minimizes: t1's EDM loss at sigma ~ U[0.4, 0.6] (one per
    row), v1's DDPM loss over lm_timesteps; not DC's DDPM loss over the classifier's T'. Read
    off the attack's own objective: objective(weight 0) - objective(weight 1), same noise."""
    from attacks.lagrange import Lagrange, _head_forward, likelihood_penalty
    from attacks.losses import get_loss
    from benchmark.zoo.schedules import EDM

    x, y = train_points(optimal)
    x, y = x[:3], y[:3]
    den = optimal.denoiser
    rdc = RobustDiffusionClassifier(denoiser=den, timesteps=5, lm_timesteps=2, steps=1,
                                    variant=variant)
    plain, weighted = Lagrange(weights=[0.0, 1.0], steps=1)._runs
    forward, ce = _head_forward(rdc), get_loss("ce")
    rdc.reseed(5)
    l0, _ = plain.objective(rdc, forward, x, y, ce, 1)
    rdc.reseed(5)
    l1, _ = weighted.objective(rdc, forward, x, y, ce, 1)
    penalty = l0 - l1

    rdc.reseed(5)
    forward(x)  # the classifier term's draws come first
    g = rdc.generator_for(x)
    if variant == "t1":
        sigma = 0.4 + 0.2 * torch.rand(3, generator=g)
        eps = torch.randn(x.shape, generator=g)
        xt = (2 * x - 1) + sigma.view(-1, 1, 1, 1) * eps
        ref = (den.eps(xt, sigma, None, schedule=EDM()) - eps).pow(2).flatten(1).sum(1)
    else:
        ts = systematic_timesteps(1000, 2)
        eps = torch.randn((3, 2, *x.shape[1:]), generator=g)
        a, s = rdc.schedule.alpha_sigma(ts)
        ref = torch.stack([(den.eps(a[j] * (2 * x - 1) + s[j] * eps[:, j], int(t), None,
                                    schedule=rdc.schedule) - eps[:, j]).pow(2).flatten(1).sum(1)
                           for j, t in enumerate(ts.tolist())], 1).mean(1)
    torch.testing.assert_close(penalty, ref, rtol=1e-4, atol=1e-3)
    rdc.reseed(5)
    forward(x)
    ddpm = rdc.likelihood_objective(x)  # the classifier's T' = 5: another objective
    assert (penalty - ddpm).abs().max() > 1e-2 * ddpm.abs().max()
    assert likelihood_penalty(rdc) == rdc.lm_objective
    dc = DiffusionClassifier(denoiser=den, timesteps=2)
    assert likelihood_penalty(dc) == dc.likelihood_objective


class _NoiselessDC(DiffusionClassifier):
    """DC with eps = 0: deterministic, so the attack's success can be recomputed."""

    def _noise(self, shape, like):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


def test_lagrange_runs_on_a_diffusion_classifier(optimal):
    """DC declares no head and no purify: Lagrange's classifier term is DC itself (a
    Defense's undeclared head is not called), and the success is the defense's decision on
    x_adv (test digits: some fall, some do not)."""
    from attacks.lagrange import Lagrange

    dc = _NoiselessDC(denoiser=optimal.denoiser, timesteps=2)
    ds = load_dataset("digits")
    x, y = ds.test.x[:8], ds.test.y[:8]
    threat = LinfThreat(0.05)
    res = Lagrange(weights=[0.0, 1.0], steps=3).run(dc, x, y, threat,
                                                     generator=torch.Generator().manual_seed(0))
    assert threat.check(x, res.x_adv, res.params) is None
    with torch.no_grad():
        fell = (dc(res.x_adv).argmax(1) != y).tolist()
    assert res.extras["success"] == fell
    assert any(fell) and not all(fell)


def test_exact_attack_sign_tau(optimal):
    """sign_tau: validated, in config (and so the job key) only when set, refused where the
    defense has no smooth sign, run inside the defense's smooth_sign, recorded in extras."""
    from attacks.exact import Exact

    for bad, error in [(0, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                       (float("inf"), ValueError), ("0.5", TypeError), (True, TypeError)]:
        with pytest.raises(error, match=f"sign_tau must be .*got {bad!r}"):
            Exact(sign_tau=bad)
    assert "sign_tau" not in Exact(steps=1).config()  # plain exact jobs keep their keys
    assert Exact(steps=1, sign_tau=0.25).config()["sign_tau"] == 0.25

    seen = []

    class Spy(RobustDiffusionClassifier):
        def purify(self, x):
            if x.requires_grad:
                seen.append(self._sign_tau)
            return super().purify(x)

    den = optimal.denoiser
    rdc = Spy(denoiser=den, timesteps=2, steps=1)
    x, y = train_points(optimal)
    x, y = x[:2], y[:2]
    threat = LinfThreat(8 / 255)
    assert Exact(steps=1, sign_tau=0.5).incompatibility(rdc, threat) is None
    res = Exact(steps=1, sign_tau=0.5).run(rdc, x, y, threat)
    assert seen == [0.5] and rdc._sign_tau is None
    assert res.extras["gradient"] == "exact-smooth(tau=0.5)"
    seen.clear()
    res = Exact(steps=1).run(rdc, x, y, threat)
    assert seen == [None] and res.extras["gradient"] == "exact"
    l2 = RobustDiffusionClassifier(denoiser=den, timesteps=2, steps=1, norm="l2")
    why = Exact(steps=1, sign_tau=0.5).incompatibility(l2, L2Threat(0.5))
    assert why is not None and "no sign-like step" in why
    assert Exact(steps=1).incompatibility(l2, L2Threat(0.5)) is None

    class PurifyOnly(Defense):
        def purify(self, x):
            return x

        def head(self, x):
            return x.flatten(1)[:, :10]

        def forward(self, x):
            return self.head(self.purify(x))

    why = Exact(steps=1, sign_tau=0.5).incompatibility(PurifyOnly(), threat)
    assert why is not None and "smooth_sign(tau)" in why and "PurifyOnly" in why


def test_bad_inputs_name_the_value(optimal):
    den = optimal.denoiser
    with pytest.raises(ValueError, match="got 5000"):
        DiffusionClassifier(denoiser=den, timesteps=5000)
    with pytest.raises(ValueError, match=r"non-empty list of labels, got \[\]"):
        DiffusionClassifier(denoiser=den, classes=[])
    uncond = OptimalDenoiser(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="class-conditional denoiser"):
        DiffusionClassifier(denoiser=uncond)
    with pytest.raises(TypeError, match="steps must be an integer >= 0, got '10'"):
        RobustDiffusionClassifier(denoiser=den, steps="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eta must be a number > 0, got -0.1"):
        RobustDiffusionClassifier(denoiser=den, eta=-0.1)
    with pytest.raises(ValueError, match="variant must be"):
        RobustDiffusionClassifier(denoiser=den, variant="v2")


class _LinearWithLikelihood(torch.nn.Module):
    """A deterministic linear classifier with a quadratic 'likelihood objective'."""

    kind = "classifier"
    stochastic = False

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(10, 256, generator=g)

    def forward(self, x):
        return x.flatten(1) @ self.w.T

    def likelihood_objective(self, x):
        return 50 * (x - 0.5).pow(2).flatten(1).sum(1)


def test_lagrange_falls_if_any_weight_succeeds():
    from attacks.lagrange import Lagrange
    from benchmark.plugins.builtin import ATTACKS

    assert ATTACKS.get("lagrange") is Lagrange
    model = _LinearWithLikelihood()
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = LinfThreat(0.02)
    attack = Lagrange(weights=[0.0, 1.0, 10.0], steps=10, random_start=False)
    res = attack.run(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert threat.check(x, res.x_adv, res.params) is None
    single = []
    for w in (0.0, 1.0, 10.0):
        r = Lagrange(weights=[w], steps=10, random_start=False).run(model, x, y, threat)
        single.append(torch.tensor(r.extras["success"]))
    assert res.extras["success"] == (single[0] | single[1] | single[2]).tolist()
    fooled = model(res.x_adv).argmax(1) != y
    assert fooled.tolist() == res.extras["success"]
    with pytest.raises(ValueError, match="weights must be"):
        Lagrange(weights=[-1.0])


class _PurifyThenLinear(_LinearWithLikelihood):
    """A toy 'RDC': purify flips the image (x -> 1 - x), head is the linear classifier. Records
    whether purify was ever called on an input that requires grad."""

    def __init__(self) -> None:
        super().__init__()
        self.purify_grad_calls = 0

    def purify(self, x):
        self.purify_grad_calls += int(x.requires_grad and torch.is_grad_enabled())
        return 1 - x

    def head(self, x):
        return x.flatten(1) @ self.w.T

    def forward(self, x):
        return self.head(self.purify(x))


def test_lagrange_paper_form_attacks_the_head_and_scores_the_defense():
    from attacks.lagrange import Lagrange

    model = _PurifyThenLinear()
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = LinfThreat(0.05)
    res = Lagrange(weights=[0.0, 1.0], steps=10, random_start=False).run(model, x, y, threat)
    assert model.purify_grad_calls == 0  # eq. 10: p(y|x) of the head on x, no purification
    # success is decided on the whole defense, not on the head the gradient came from
    assert res.extras["success"] == (model(res.x_adv).argmax(1) != y).tolist()
    exact = Lagrange(weights=[0.0], steps=10, random_start=False, through="defense")
    exact.run(model, x, y, threat)
    assert model.purify_grad_calls > 0
    with pytest.raises(ValueError, match="through must be one of"):
        Lagrange(through="purify")
    with pytest.raises(TypeError, match="through='head' sets the forward"):
        Lagrange(forward=lambda d: d)


def test_exact_attack_requires_purification(optimal):
    from attacks.exact import Exact

    assert "purify" in (Exact(steps=1).incompatibility(optimal, LinfThreat(0.1)) or "")
    rdc = RobustDiffusionClassifier(denoiser=optimal.denoiser, timesteps=5, steps=1)
    rdc.reseed(0)
    x, y = train_points(optimal)
    assert Exact(steps=1).incompatibility(rdc, LinfThreat(0.1)) is None
    res = Exact(steps=2, random_start=False).run(rdc, x[:2], y[:2], LinfThreat(8 / 255))
    assert res.extras["zero_grad_frac"] < 1.0


def test_auto_batch_size_is_one_of_the_probed_sizes(optimal):
    dc = DiffusionClassifier(denoiser=optimal.denoiser, timesteps=2)
    x, _ = train_points(optimal)
    nfe = dc.denoiser.nfe
    rows = dc.rows_per_batch_for(x)
    assert rows in (16, 32, 64, 128, 256, 512, 1024)
    assert dc.denoiser.nfe == nfe  # probing is not counted
    with pytest.raises(ValueError, match="'auto' or an integer >= 1, got 0"):
        DiffusionClassifier(denoiser=optimal.denoiser, rows_per_batch=0)


def test_an_empty_batch_gets_empty_logits(optimal):
    """Attack libraries query an empty batch when every point is already fooled."""
    assert optimal(torch.zeros(0, 1, 16, 16)).shape == (0, 10)
