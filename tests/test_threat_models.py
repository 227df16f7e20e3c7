"""Threat models: feasible projections, the checks guarding every result, exact distances."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.api.threat import ThreatModel, validate_eps
from benchmark.plugins.builtin import THREAT_MODELS
from benchmark.plugins.registry import UnknownNameError
from threat_models import L2Threat, LinfThreat, LowFreqThreat, StAdvThreat, UnrestrictedThreat
from threat_models.stadv import warp

ALL = [LinfThreat(8 / 255), L2Threat(0.5), LowFreqThreat(8 / 255), StAdvThreat(0.05),
       UnrestrictedThreat()]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _big_params(threat: ThreatModel, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    p = threat.init(x, g, random=True)
    return p + 10 * torch.randn(p.shape, generator=g)  # far outside any budget or box


@pytest.mark.parametrize("threat", ALL, ids=lambda t: t.name)
def test_projection_is_feasible_and_images_stay_in_the_box(threat: ThreatModel) -> None:
    x = _images()
    p = threat.project(x, _big_params(threat, x))
    x_adv = threat.apply(x, p)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert threat.check(x, x_adv, p) is None
    assert torch.allclose(threat.project(x, p), p, atol=1e-6)  # idempotent


@pytest.mark.parametrize("threat", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("random", [False, True])
def test_init_is_feasible(threat: ThreatModel, random: bool) -> None:
    x = _images()
    p = threat.init(x, torch.Generator().manual_seed(2), random=random)
    assert threat.check(x, threat.apply(x, p), p) is None


@pytest.mark.parametrize("threat", ALL, ids=lambda t: t.name)
def test_check_fails_on_nan_and_out_of_box(threat: ThreatModel) -> None:
    x = _images(3)
    p = threat.init(x)
    x_adv = threat.apply(x, p).clone()
    x_adv[0, 0, 0, 0] = float("nan")
    x_adv[2, 1, 2, 3] = 1.5
    v = threat.check(x, x_adv, p)
    assert v is not None
    assert v.mask.tolist() == [True, False, True]
    assert any("non-finite" in r for r in v.reasons)
    assert any("pixel box" in r for r in v.reasons)


def test_linf_check_fails_just_over_eps() -> None:
    threat = LinfThreat(0.1)
    x = torch.full((2, 1, 4, 4), 0.5)
    x_adv = x.clone()
    x_adv[1, 0, 1, 1] += 0.1 + 0.01
    x_adv[0, 0, 2, 2] -= 0.1  # exactly at the budget: allowed
    v = threat.check(x, x_adv)
    assert v is not None and v.mask.tolist() == [False, True]
    assert "0.11" in v.reasons[0]


def test_l2_check_fails_over_the_radius() -> None:
    threat = L2Threat(0.5)
    x = torch.full((2, 1, 4, 4), 0.5)
    d = torch.zeros_like(x)
    d[:, 0, 0, :] = 0.26  # l2 norm 0.52 for sample 1 only
    d[0] = d[0] * (0.5 / 0.52)
    v = threat.check(x, x + d)
    assert v is not None and v.mask.tolist() == [False, True]


def test_distances_on_a_hand_example() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    x_adv = x + torch.tensor([0.1, -0.2, 0.0, 0.0]).view(1, 1, 2, 2)
    assert LinfThreat(1).distance(x, x_adv).item() == pytest.approx(0.2, abs=1e-7)
    assert L2Threat(1).distance(x, x_adv).item() == pytest.approx(math.sqrt(0.05), abs=1e-7)
    assert UnrestrictedThreat().distance(x, x_adv).item() == pytest.approx(math.sqrt(0.05),
                                                                           abs=1e-7)
    flow = torch.zeros(1, 2, 2, 2)
    flow[0, 1, 0, 1] = -0.03
    flow[0, 0, 1, 0] = 0.02
    assert StAdvThreat().distance(x, x_adv, flow).item() == pytest.approx(0.03, abs=1e-7)


def test_stadv_zero_flow_is_the_identity() -> None:
    x = _images()
    assert torch.allclose(warp(x, torch.zeros(4, 8, 8, 2)), x, atol=1e-6)


def test_stadv_check_fails_over_the_bound() -> None:
    threat = StAdvThreat(0.05)
    x = _images(2)
    flow = torch.zeros(2, 8, 8, 2)
    flow[1, 3, 3, 0] = 0.06
    v = threat.check(x, threat.apply(x, flow), flow)
    assert v is not None and v.mask.tolist() == [False, True]
    assert "0.06" in v.reasons[0]


def test_stadv_check_fails_when_x_adv_is_not_the_warp_of_its_flow() -> None:
    threat = StAdvThreat(0.05)
    x = _images(2)
    flow = threat.init(x, torch.Generator().manual_seed(3), random=True)
    x_adv = threat.apply(x, flow)
    assert threat.check(x, x_adv, flow) is None
    tampered = x_adv.clone()
    tampered[0, 0, 4, 4] += 0.01 if tampered[0, 0, 4, 4] < 0.5 else -0.01
    v = threat.check(x, tampered, flow)
    assert v is not None and v.mask.tolist() == [True, False]
    assert "not the warp" in v.reasons[0]


def test_stadv_check_fails_without_params() -> None:
    threat = StAdvThreat()
    x = _images(2)
    v = threat.check(x, x.clone(), None)
    assert v is not None and bool(v.mask.all())


@pytest.mark.parametrize(("bad", "error"), [
    (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (0, ValueError), (True, TypeError), ("8/255", TypeError),
])
def test_validate_eps_rejects_and_names_the_value(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=repr(bad).replace("(", r"\(").replace(")", r"\)")):
        validate_eps(bad)


def test_validate_eps_accepts_numbers() -> None:
    assert validate_eps(1) == 1.0 and isinstance(validate_eps(1), float)
    assert validate_eps(0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="-1"):
        LinfThreat(-1)


def test_registry_suggests_a_misspelled_threat_model() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'linf'"):
        THREAT_MODELS.get("lnf")
    assert THREAT_MODELS.get("stadv") is StAdvThreat


@pytest.mark.parametrize("threat", ALL, ids=lambda t: t.name)
def test_ascent_direction_has_unit_size(threat: ThreatModel) -> None:
    x = _images(2)
    g = torch.randn_like(threat.init(x))
    a = threat.ascent(g).reshape(2, -1)
    if threat.name == "l2":
        assert torch.allclose(a.norm(dim=1), torch.ones(2))
    else:
        assert a.abs().amax(dim=1).tolist() == [1.0, 1.0]
    assert ((a * g.reshape(2, -1)).sum(dim=1) > 0).all()


# -- low-frequency ------------------------------------------------------------------------------

def test_lowfreq_basis_is_the_dct_ii_with_unit_amplitude() -> None:
    from threat_models.lowfreq import cosine_basis, lowfreq_size

    b = cosine_basis(16, 16, dtype=torch.float64)
    gram = b @ b.T  # orthogonal rows: n for the constant, n / 2 for every other cosine
    assert torch.allclose(gram, torch.diag(torch.tensor([16.0] + [8.0] * 15,
                                                        dtype=torch.float64)), atol=1e-10)
    # unit amplitude: the constant is 1, every sampled cosine peaks at most 1
    assert (b[0] == 1).all() and (b.abs().amax(dim=1) <= 1).all()
    assert b.abs().amax(dim=1)[1] == pytest.approx(math.cos(math.pi / 32))
    assert lowfreq_size(16, 16) == (4, 4) and lowfreq_size(32, 32) == (8, 8)
    assert lowfreq_size(3, 5) == (1, 2)


def test_lowfreq_perturbations_hold_no_high_frequency_and_stay_in_linf() -> None:
    from threat_models.lowfreq import cosine_basis

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    threat = LowFreqThreat(0.1)
    g = torch.Generator().manual_seed(1)
    p = threat.project(x, 5 * torch.randn(threat.init(x).shape, generator=g))
    assert p.shape == (4, 1, 4, 4)
    delta = threat.delta(x, p).double()
    # a DC coefficient moves every pixel by itself
    dc = torch.zeros_like(p)
    dc[:, :, 0, 0] = 0.07
    assert torch.allclose(threat.delta(x, dc), torch.full_like(x, 0.07))
    # the full DCT-II of delta: nothing beyond the lowest 4 x 4 coefficients
    full = cosine_basis(16, 16, dtype=torch.float64)
    coef = torch.einsum("bcij,ui,vj->bcuv", delta, full, full)
    tol = 1e-6 * coef.abs().max()  # float32 round-off of delta
    assert coef[..., 4:, :].abs().max() < tol and coef[..., :, 4:].abs().max() < tol
    # the bound is pixel-space l-inf: a low-frequency example is an l-inf one at the same eps
    x_adv = threat.apply(x, p)
    assert threat.check(x, x_adv, p) is None
    assert LinfThreat(0.1).check(x, x_adv) is None
    assert torch.allclose(threat.distance(x, x_adv, p), delta.flatten(1).abs().amax(1).float())
    assert (threat.distance(x, x_adv, p) > 0.099).all()  # projected onto the boundary


def test_lowfreq_check_refuses_high_frequencies_and_forged_coefficients() -> None:
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    threat = LowFreqThreat(0.1)
    p = threat.init(x, torch.Generator().manual_seed(2), random=True)
    x_adv = threat.apply(x, p).clone()
    # a checkerboard within l-inf 0.1: a valid linf example, not a low-frequency one
    board = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 0.05
    x_adv[0] = (x_adv[0] + board).clamp(0, 1)
    big = p.clone()
    big[1] *= 1000  # coefficients over the bound, x_adv reproduced from them
    x_adv[1] = threat.apply(x[1:2], big[1:2])[0]
    v = threat.check(x, x_adv, big)
    assert v is not None and v.mask.tolist() == [True, True, False]
    assert "not x plus the low-frequency perturbation" in v.per_sample[0]
    assert "lowfreq peak" in str(v.per_sample[1])
    assert threat.check(x, x_adv, None) is not None  # no coefficients: nothing verifies
    bad = p.clone()
    bad[2, 0, 0, 0] = float("nan")
    assert "non-finite coefficients" in str(threat.violations(x, threat.apply(x, p), bad)
                                            .per_sample[2])
    with pytest.raises(ValueError, match="kh, kw"):
        threat.apply(x, torch.zeros(3, 1, 16, 16))


def test_pgd_under_lowfreq_is_verified_and_raises_the_loss() -> None:
    from attacks.pgd import PGD
    from tests.toys import TinyCNN

    model = TinyCNN()
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    threat = LowFreqThreat(0.1)
    res = PGD(steps=10, random_start=False).run(model, x, y, threat)
    assert res.params is not None and res.params.shape == (6, 1, 4, 4)
    assert threat.check(x, res.x_adv, res.params) is None
    ce = torch.nn.functional.cross_entropy
    assert ce(model(res.x_adv), y, reduction="none").mean() > ce(model(x), y, reduction="none"
                                                                 ).mean()
