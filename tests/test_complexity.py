"""Image complexity: PNG ratio (Serra et al.) and the DCT high-frequency proxy of Arvinte et al."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.complexity import dct2, dct_high_freq_energy, dct_matrix, png_complexity
from tests.toys import gen, smooth_images


def test_dct_matrix_is_orthonormal_and_matches_the_formula():
    m = dct_matrix(7, dtype=torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    # DC row is constant 1/sqrt(n); row k at i = 0 is sqrt(2/n) cos(pi k / (2 n))
    assert torch.allclose(m[0], torch.full((7,), 1 / math.sqrt(7), dtype=torch.float64))
    assert m[3, 0].item() == pytest.approx(math.sqrt(2 / 7) * math.cos(math.pi * 3 / 14))


def test_dct2_matches_scipy_dctn_ortho():
    fft = pytest.importorskip("scipy.fft")
    x = torch.randn(2, 3, 6, 5, generator=gen(0), dtype=torch.float64)
    ref = fft.dctn(x.numpy(), axes=(-2, -1), type=2, norm="ortho")
    assert torch.allclose(dct2(x), torch.from_numpy(ref), atol=1e-12)


def test_dct2_is_invertible_and_preserves_energy():
    x = torch.randn(4, 1, 8, 8, generator=gen(1), dtype=torch.float64)
    c = dct2(x)
    mh = dct_matrix(8, dtype=torch.float64)
    assert torch.allclose(mh.T @ c @ mh, x, atol=1e-12)  # inverse = transpose
    assert torch.allclose(c.pow(2).sum((-2, -1)), x.pow(2).sum((-2, -1)))


def test_high_freq_energy_zero_for_constant_and_larger_for_noise():
    const = torch.full((3, 1, 16, 16), 0.7, dtype=torch.float64)
    assert torch.allclose(dct_high_freq_energy(const), torch.zeros(3, dtype=torch.float64),
                          atol=1e-20)
    noise = torch.rand(3, 1, 16, 16, generator=gen(2), dtype=torch.float64)
    smooth = smooth_images(3, size=16).double()
    e_noise, e_smooth = dct_high_freq_energy(noise), dct_high_freq_energy(smooth)
    assert (e_noise > 5 * e_smooth).all()
    # uniform noise on [0, 1]: 64 high-frequency coefficients of variance 1/12 each
    assert e_noise.mean().item() == pytest.approx(64 / 12, rel=0.35)


def test_high_freq_energy_picks_exactly_the_quadrant():
    # a single DCT basis image at (k, l) has unit energy in the quadrant iff k, l >= n/2
    mh = dct_matrix(8, dtype=torch.float64)
    for (k, l), inside in {(5, 6): True, (5, 2): False, (1, 7): False, (4, 4): True}.items():
        img = torch.outer(mh[k], mh[l])[None, None]
        assert dct_high_freq_energy(img).item() == pytest.approx(float(inside), abs=1e-12)
    two = torch.cat([torch.outer(mh[6], mh[6])[None], 2 * torch.outer(mh[7], mh[5])[None]])
    assert dct_high_freq_energy(two[None]).item() == pytest.approx(5.0)  # channels summed
    assert dct_high_freq_energy(two[None], squared=False).item() == pytest.approx(5 ** 0.5)


def test_high_freq_energy_is_differentiable():
    small = torch.rand(1, 2, 4, 4, generator=gen(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dct_high_freq_energy, (small,))
    x = torch.rand(2, 3, 8, 8, generator=gen(3), dtype=torch.float64, requires_grad=True)
    # d/dx ||P DCT(x)||^2 = 2 DCT^T(P DCT(x)): the gradient is the high-pass part of x, times 2
    (g,) = torch.autograd.grad(dct_high_freq_energy(x).sum(), x)
    mh = dct_matrix(8, dtype=torch.float64)
    c = dct2(x.detach())
    c[..., :4, :] = 0
    c[..., :, :4] = 0
    assert torch.allclose(g, 2 * mh.T @ c @ mh)


def test_high_freq_energy_bad_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dct_high_freq_energy(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="at least 2 x 2"):
        dct_high_freq_energy(torch.zeros(1, 1, 1, 8))
    with pytest.raises(ValueError, match="floating"):
        dct2(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positive integer"):
        dct_matrix(0)


def test_png_complexity_orders_constant_smooth_noise():
    const = torch.full((1, 1, 32, 32), 0.5)
    ramp = (torch.arange(32)[:, None] + torch.arange(32)[None, :]).float()[None, None] / 62
    noise = torch.rand(1, 1, 32, 32, generator=gen(4))
    c_const, c_smooth, c_noise = (png_complexity(v).item() for v in (const, ramp, noise))
    assert c_const < c_smooth < c_noise
    assert c_noise > 0.9  # incompressible
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        png_complexity(noise * 2)
    with pytest.raises(ValueError, match="compress_level"):
        png_complexity(noise, compress_level=12)


def _four_kinds() -> dict[str, torch.Tensor]:
    """Constant, smoothed test, test and uniform-noise images (issue 17's figures)."""
    import torch.nn.functional as F

    from benchmark.data import load_dataset

    x = load_dataset("digits").test.x[:32]
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None]) / 256
    smooth = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return {"constant": torch.full_like(x, 0.5), "smoothed": smooth, "test": x, "noise": noise}


def test_spectral_complexity_orders_constant_smooth_test_noise():
    from benchmark.complexity import spectral_complexity

    c = {k: spectral_complexity(v).mean().item() for k, v in _four_kinds().items()}
    assert c["constant"] == 0.0
    assert c["smoothed"] < c["test"] < c["noise"]
    assert c["noise"] == pytest.approx(0.75, abs=0.05)  # white noise: 3/4 of the AC energy
    # oracle: one cosine inside the low quarter, one outside
    img = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    m = dct_matrix(8, dtype=torch.float64)
    img[0, 0] = 0.3 * torch.outer(m[1], m[2]) + 0.1 * torch.outer(m[6], m[0]) + 0.5
    assert spectral_complexity(img).item() == pytest.approx(0.01 / (0.09 + 0.01))
    with pytest.raises(ValueError, match="floating images"):
        spectral_complexity(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_zlib_complexity_has_no_png_floor():
    from benchmark.complexity import zlib_complexity

    kinds = _four_kinds()
    z = {k: zlib_complexity(v).mean().item() for k, v in kinds.items()}
    p = {k: png_complexity(v).mean().item() for k, v in kinds.items()}
    assert z["constant"] < 0.1 < 0.28 < p["constant"]  # PNG's header floor, gone
    assert z["constant"] < z["test"] < z["noise"]
    assert z["smoothed"] > z["test"]  # at 16 x 16, blurring adds gray levels to code
    with pytest.raises(ValueError, match="level"):
        zlib_complexity(kinds["test"], level=10)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        zlib_complexity(kinds["test"] + 2)


def test_the_attack_and_the_module_share_one_high_frequency_norm():
    from attacks.likelihood import dct_highfreq_norm

    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dct_highfreq_norm(x), 2 * dct_high_freq_energy(x, squared=False))
    const = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(dct_high_freq_energy(const, squared=False).sum(), const)
    assert torch.isfinite(g).all()  # zero-safe at a constant image


def test_figure7_script_tables_likelihood_against_complexity(tmp_path):
    """scripts/figure7.py (seed 000's figure 7 as a table) on one zoo flow at n = 2: every kind
    is measured, constant images have zero spectral complexity and noise the highest."""
    from tests.toys import load_script, single_thread

    mod = load_script("figure7")

    with single_thread():  # the script sets one thread; the context restores the session's
        mod.main(["--n", "2", "--models", "digits-realnvp-clean", "--out", str(tmp_path)])
    import csv

    with open(tmp_path / "table.csv", newline="") as f:
        rows = {r["kind"]: r for r in csv.DictReader(f)}
    assert list(rows) == mod.KINDS
    for kind in ("black", "gray", "white"):
        assert float(rows[kind]["spectral"]) == 0.0
    assert float(rows["uniform noise"]["spectral"]) == max(float(r["spectral"])
                                                           for r in rows.values())
    assert all(math.isfinite(float(r["digits-realnvp-clean"])) for r in rows.values())
    assert (tmp_path / "figure7.png").stat().st_size > 0
    assert "| digits-realnvp-clean |" in (tmp_path / "table.md").read_text()


def test_figure7_script_refuses_an_unknown_pfode_solver(tmp_path):
    from tests.toys import load_script, single_thread

    mod = load_script("figure7")

    with single_thread(), pytest.raises(SystemExit, match=r"--pfode-solver.*'rk45'.*accurate-100"):
        mod.main(["--n", "1", "--models", "pfode", "--pfode-solver", "rk45",
                  "--out", str(tmp_path)])
    assert not (tmp_path / "table.md").exists()
