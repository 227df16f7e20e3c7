import dataclasses
import math

import pytest
import torch

from benchmark.plugins.registry import UnknownNameError
from benchmark.zoo.schedules import (
    DDPM,
    EDM,
    SCHEDULES,
    VPSDE,
    SDESchedule,
    SubVPSDE,
    get_schedule,
)

F64 = torch.float64


def grid(sched, n=41):
    """Times spanning the schedule's range, ascending in noise."""
    if isinstance(sched, DDPM):
        return torch.arange(0, sched.T, 25)
    if isinstance(sched, EDM):
        return torch.logspace(math.log10(sched.t0), math.log10(sched.t1), n, dtype=F64)
    return torch.linspace(sched.t0, sched.t1, n, dtype=F64)


# -- values against hand-computed numbers -----------------------------------------------------
# B(t) = 0.1 t + 19.9 t^2 / 2: B(0.1) = 0.1095, B(0.5) = 2.5375, B(1) = 10.05.
@pytest.mark.parametrize("t, big_b", [(0.1, 0.1095), (0.5, 2.5375), (1.0, 10.05)])
def test_vp_and_subvp_values(t, big_b):
    a_ref = math.exp(-big_b / 2)
    a, s = VPSDE().alpha_sigma(torch.tensor(t, dtype=F64))
    assert a.item() == pytest.approx(a_ref, rel=1e-12)
    assert s.item() == pytest.approx(math.sqrt(1 - math.exp(-big_b)), rel=1e-12)
    a2, s2 = SubVPSDE().alpha_sigma(torch.tensor(t, dtype=F64))
    assert a2.item() == pytest.approx(a_ref, rel=1e-12)
    assert s2.item() == pytest.approx(1 - math.exp(-big_b), rel=1e-12)


def test_literal_values():
    a, s = VPSDE().alpha_sigma(torch.tensor([0.5, 1.0], dtype=F64))
    assert a.tolist() == pytest.approx([0.2811829, 0.0065716], abs=1e-7)
    assert s.tolist() == pytest.approx([0.9596542, 0.9999784], abs=1e-7)
    assert VPSDE().log_snr(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(
        -10.05 - math.log1p(-math.exp(-10.05)), rel=1e-12)
    a, s = EDM().alpha_sigma(torch.tensor([0.0, 0.5, 80.0], dtype=F64))
    assert a.tolist() == [1.0, 1.0, 1.0]
    assert s.tolist() == [0.0, 0.5, 80.0]
    assert EDM().log_snr(torch.tensor(0.5, dtype=F64)).item() == pytest.approx(2 * math.log(2))


def test_ddpm_alphabar_against_cumulative_product():
    sched = DDPM()
    abar, prod = [], 1.0
    for i in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
        abar.append(prod)
    t = torch.arange(1000)
    a, s = sched.alpha_sigma(t)
    assert a.dtype == torch.get_default_dtype()
    assert sched.alphabar.tolist() == pytest.approx(abar, rel=1e-12)
    assert sched.alphabar[0].item() == pytest.approx(0.9999, rel=1e-15)
    assert sched.alphabar[1].item() == pytest.approx(0.9999 * (1 - (1e-4 + 0.0199 / 999)))
    assert sched.alphabar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # Ho et al.'s value
    a64, s64 = sched.alpha_sigma(t.to(F64))
    assert (a64 ** 2).tolist() == pytest.approx(abar, rel=1e-12)
    assert (s64 ** 2 + a64 ** 2).tolist() == pytest.approx([1.0] * 1000, abs=1e-12)
    assert sched.alpha_sigma(7)[0].item() == pytest.approx(math.sqrt(abar[7]), rel=1e-6)


def test_vp_preserves_variance_and_subvp_std():
    t = grid(VPSDE())
    a, s = VPSDE().alpha_sigma(t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    a, s = SubVPSDE().alpha_sigma(t)
    torch.testing.assert_close(s, 1 - a ** 2, rtol=1e-12, atol=1e-15)


def test_diffpure_beta_is_the_vp_beta():
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(VPSDE(eps_t=0.0).beta(t), 0.1 + 19.9 * t)
    torch.testing.assert_close(VPSDE().diffusion_sq(t[1:]), 0.1 + 19.9 * t[1:])


# -- SDE consistency ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "subvp", "edm"])
@pytest.mark.parametrize("data_var", [0.0, 1.0])
def test_marginal_variance_solves_the_sde(name, data_var):
    """dVar/dt = 2 f Var + g^2 and da/dt = f a, by central finite differences."""
    sched = get_schedule(name)
    assert isinstance(sched, SDESchedule)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=F64)
    if name == "edm":
        t = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    h = 1e-6 * t

    def var(tt):
        a, s = sched.alpha_sigma(tt)
        return a ** 2 * data_var + s ** 2

    dvar = (var(t + h) - var(t - h)) / (2 * h)
    f, g2 = sched.drift_coef(t), sched.diffusion_sq(t)
    torch.testing.assert_close(dvar, 2 * f * var(t) + g2, rtol=1e-6, atol=1e-8)
    da = (sched.alpha_sigma(t + h)[0] - sched.alpha_sigma(t - h)[0]) / (2 * h)
    torch.testing.assert_close(da, f * sched.alpha_sigma(t)[0], rtol=1e-6, atol=1e-10)


def test_subvp_g2_formula():
    t = torch.tensor([0.1, 0.7], dtype=F64)
    big_b = 0.1 * t + 19.9 * t ** 2 / 2
    torch.testing.assert_close(SubVPSDE().diffusion_sq(t),
                               (0.1 + 19.9 * t) * (1 - torch.exp(-2 * big_b)))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_log_snr_is_decreasing_and_consistent(name):
    sched = get_schedule(name)
    t = grid(sched)
    lam = sched.log_snr(t)
    assert lam.shape == t.shape
    assert bool((lam[1:] < lam[:-1]).all())
    a, s = sched.alpha_sigma(t)
    torch.testing.assert_close(lam.to(F64), torch.log(a.to(F64) ** 2 / s.to(F64) ** 2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "edm"])
def test_prior_logp(name):
    sched = get_schedule(name)
    assert isinstance(sched, SDESchedule)
    z = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Normal(0.0, sched.prior_std).log_prob(z).sum((1, 2, 3))
    torch.testing.assert_close(sched.prior_logp(z), ref)


def test_dtype_and_shape_follow_t():
    a, s = VPSDE().alpha_sigma(torch.tensor([[0.2, 0.3]], dtype=torch.float32))
    assert a.dtype == torch.float32 and a.shape == (1, 2)
    a, s = VPSDE().alpha_sigma(0.5)
    assert a.dtype == torch.get_default_dtype() and a.shape == ()


# -- bad inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("sched, t, shown", [
    (VPSDE(), 1.5, "1.5"),
    (VPSDE(), torch.tensor([0.5, -0.1]), "-0.1"),
    (SubVPSDE(), 0.0, "0.0"),  # below t0 = 1e-5
    (VPSDE(), float("nan"), "nan"),
    (DDPM(), 1000, "1000"),
    (DDPM(), torch.tensor([3, -1]), "-1"),
    (DDPM(), torch.tensor(2.5), "2.5"),
    (EDM(), -0.3, "-0.3"),
    (EDM(), float("inf"), "inf"),
])
def test_bad_times_raise_naming_the_value(sched, t, shown):
    with pytest.raises(ValueError, match=shown):
        sched.alpha_sigma(t)
    with pytest.raises(ValueError, match=shown):
        sched.log_snr(t)


def test_time_range_tolerates_solver_rounding_and_eps_t_zero():
    a, s = VPSDE().alpha_sigma(torch.tensor([1.0 + 1e-9], dtype=F64))
    assert a.item() == pytest.approx(math.exp(-10.05 / 2))
    a, s = VPSDE(eps_t=0.0).alpha_sigma(0.0)
    assert (a.item(), s.item()) == (1.0, 0.0)


def test_get_schedule_did_you_mean_and_options():
    with pytest.raises(ValueError, match="unknown noise schedule 'vpp'; did you mean 'vp'"):
        get_schedule("vpp")
    with pytest.raises(UnknownNameError, match="known: ddpm, edm, subvp, vp"):
        get_schedule("karras")
    assert get_schedule("edm", sigma_max=10.0).t1 == 10.0
    sched = VPSDE(beta_1=10.0)
    assert get_schedule(sched) is sched
    with pytest.raises(ValueError, match="T >= 1"):
        get_schedule("ddpm", T=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDM(sigma_min=1.0, sigma_max=0.5)


def test_schedules_are_frozen_hashable_specs():
    assert DDPM() == DDPM() and hash(VPSDE()) == hash(VPSDE())
    assert VPSDE() != SubVPSDE()
    with pytest.raises(dataclasses.FrozenInstanceError):
        VPSDE().beta_0 = 1.0  # type: ignore[misc]
    assert {name: cls.name for name, cls in SCHEDULES.items()} == {
        "ddpm": "ddpm", "vp": "vp", "subvp": "subvp", "edm": "edm"}
    assert not DDPM.is_sde and DDPM.discrete
    assert all(get_schedule(n).is_sde for n in ("vp", "subvp", "edm"))
