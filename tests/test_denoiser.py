"""The learned denoiser: the shipped ``digits-eps``, its trainer and the diffusion classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark.data import load_dataset
from benchmark.plugins.builtin import TRAINERS
from benchmark.train.denoiser import (
    config_for,
    dc_accuracy,
    loss_by_log_snr,
    sample_log_snr,
    train,
    training_log_snr_range,
)
from benchmark.zoo import ZooEntry, file_sha256, get_entry, load_entry, load_model
from benchmark.zoo.analytic import GaussianDenoiser
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.schedules import get_schedule
from benchmark.zoo.unet import EpsUNet
from defenses.rdc import DiffusionClassifier

#: one time per schedule, all at moderate noise.
TIMES = {"ddpm": 150, "vp": 0.3, "subvp": 0.4, "edm": 0.8}


@pytest.fixture(scope="module")
def net() -> EpsUNet:
    model = load_model("digits-eps")
    assert isinstance(model, EpsUNet)
    return model


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("eps-a")
    return train(dataset="digits", max_steps=3, out_dir=out, register=False, progress=False)


def test_shipped_entry(net: EpsUNet) -> None:
    entry = get_entry("digits-eps")
    assert entry.arch == "benchmark.zoo.unet:EpsUNet" and entry.dataset == "digits"
    assert entry.trained_by == "genbench train eps --dataset digits --seed 0"
    path = entry.path()
    assert path.stat().st_size < 8_000_000 and file_sha256(path) == entry.sha256
    assert entry.metrics["dc_clean_acc_test"] >= 0.9 and entry.metrics["dc_timesteps"] >= 1
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    assert net.conditional and net.num_classes == 10
    assert TRAINERS.get("eps") is train


@pytest.mark.parametrize("schedule", sorted(TIMES))
def test_eps_interchangeable_with_gaussian(net: EpsUNet, schedule: str) -> None:
    """Same call, same output shape as the analytic GaussianDenoiser, under every schedule."""
    gauss = GaussianDenoiser(torch.zeros(1, 16, 16), 0.25 * torch.eye(256))
    x_t = torch.randn(3, 1, 16, 16)
    t = TIMES[schedule]
    t_vec = torch.full((3,), float(t))
    with torch.no_grad():
        for model in (net, gauss):
            assert isinstance(model, Denoiser)
            assert model.eps(x_t, t, schedule=schedule).shape == x_t.shape
            assert model.eps(x_t, t_vec, None, schedule=schedule).shape == x_t.shape
            assert model.x0_hat(x_t, t, schedule=schedule).shape == x_t.shape
        out = net.eps(x_t, t, torch.tensor([0, 5, 9]), schedule=schedule)
        assert out.shape == x_t.shape and torch.isfinite(out).all()
        assert net.eps(x_t, t, 3, schedule=schedule).shape == x_t.shape


def test_one_network_serves_every_schedule(net: EpsUNet) -> None:
    """At equal log-SNR, VP and EDM inputs differ by a scale only, so the outputs agree."""
    x0 = load_dataset("digits").test.x[:4] * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    vp, edm = get_schedule("vp"), get_schedule("edm")
    t = torch.tensor(0.25)
    a, s = vp.alpha_sigma(t)
    sigma = float(s / a)  # EDM's sigma with the same log-SNR
    with torch.no_grad():
        e_vp = net.eps(a * x0 + s * noise, t, schedule="vp")
        e_edm = net.eps(x0 + sigma * noise, sigma, schedule=edm)
    torch.testing.assert_close(e_vp, e_edm, atol=1e-4, rtol=1e-4)


def test_null_label_path(net: EpsUNet) -> None:
    x_t = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        uncond = net.eps(x_t, 200, schedule="ddpm")
        z, lam = x_t, get_schedule("ddpm").log_snr(torch.tensor([200, 200]))
        a, s = get_schedule("ddpm").alpha_sigma(torch.tensor(200))
        z = x_t / torch.sqrt(a * a + s * s)
        null = net(z, lam, torch.full((2,), net.num_classes))
        cond = net.eps(x_t, 200, torch.tensor([1, 1]), schedule="ddpm")
    torch.testing.assert_close(uncond, null)
    assert not torch.allclose(uncond, cond)
    with pytest.raises(ValueError, match="outside"):
        net.eps(x_t, 200, torch.tensor([0, 10]), schedule="ddpm")  # the null index is internal


def test_unconditional_unet_rejects_labels() -> None:
    model = EpsUNet(num_classes=0, base_channels=8, channel_mults=(1, 2))
    x = torch.randn(2, 1, 16, 16)
    assert not model.conditional
    assert model.eps(x, 0.5, schedule="vp").shape == x.shape
    with pytest.raises(ValueError, match="not class-conditional"):
        model.eps(x, 0.5, torch.tensor([0, 1]), schedule="vp")
    with pytest.raises(ValueError, match="class-conditional"):
        DiffusionClassifier(denoiser=model, timesteps=2)


def test_cifar_config_builds() -> None:
    cfg = config_for("cifar10")
    model = EpsUNet(in_channels=3, image_size=32, num_classes=10,
                    base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
                    num_res_blocks=cfg.num_res_blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.eps(x, 0.1, torch.tensor([0, 9]), schedule="vp").shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        EpsUNet(image_size=18, channel_mults=(1, 2, 2))


def test_train_smoke(smoke_run: dict[str, Any]) -> None:
    before = get_entry("digits-eps")
    info = smoke_run
    path = Path(info["path"])
    assert info["steps"] == 3 and not info["registered"] and path.is_file()
    assert info["sha256"] == file_sha256(path)
    assert info["trained_by"] == "genbench train eps --dataset digits --seed 0 --max-steps 3"
    assert get_entry("digits-eps") == before  # the shipped zoo is untouched
    entry = ZooEntry(name="smoke", arch="benchmark.zoo.unet:EpsUNet",
                     arch_kwargs=dict(before.arch_kwargs), dataset="digits", file=str(path),
                     sha256=info["sha256"])
    model = load_entry(entry)
    assert isinstance(model, EpsUNet)
    assert model.eps(torch.zeros(1, 1, 16, 16), 0.5, 3, schedule="vp").shape == (1, 1, 16, 16)


def test_train_is_seeded(smoke_run: dict[str, Any], tmp_path: Path) -> None:
    again = train(dataset="digits", max_steps=3, out_dir=tmp_path, register=False,
                  progress=False)
    assert Path(again["path"]).read_bytes() == Path(smoke_run["path"]).read_bytes()


def test_train_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'nope'"):
        train(dataset="nope", out_dir=tmp_path, register=False, progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        train(epochs=0, out_dir=tmp_path, register=False, progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        train(max_steps=0, out_dir=tmp_path, register=False, progress=False)
    with pytest.raises(ValueError, match="'lr_typo'"):
        train(max_steps=1, out_dir=tmp_path, register=False, progress=False, lr_typo=1.0)


def test_training_range_covers_every_schedule() -> None:
    lo, hi = training_log_snr_range()
    for name in ("ddpm", "vp", "subvp", "edm"):
        sched = get_schedule(name)
        ends = sched.log_snr(torch.tensor([sched.t0, sched.t1], dtype=torch.float64))
        assert lo - 1e-4 <= float(ends.min()) and float(ends.max()) <= hi + 1e-4
    lam = sample_log_snr(4096, torch.Generator().manual_seed(0), lo=lo, hi=hi)
    assert lam.min() >= lo and lam.max() <= hi and lam.max() > 20 and lam.min() < -9


def test_dc_classifies_shipped_model(net: EpsUNet) -> None:
    ds = load_dataset("digits")
    x, y = ds.test.x[:100], ds.test.y[:100]
    dc = DiffusionClassifier(denoiser=net, timesteps=10, rows_per_batch=256)
    dc.reseed(0)
    with torch.no_grad():
        logits = dc(x)
    assert logits.shape == (100, 10)
    # the manifest's dc_clean_acc_test is over all 360 test images; 100 keep the noise small
    assert (logits.argmax(1) == y).float().mean() >= 0.9
    assert dc_accuracy(net, x[:8], y[:8], timesteps=10) == pytest.approx(
        float((logits[:8].argmax(1) == y[:8]).float().mean()))


def test_trained_denoiser_beats_trivial_predictor(net: EpsUNet) -> None:
    ds = load_dataset("digits")
    x, y = ds.test.x[:64], ds.test.y[:64]
    cond, = loss_by_log_snr(net, x, y, [-2.0, 2.0])
    uncond, = loss_by_log_snr(net, x, None, [-2.0, 2.0])
    assert cond < 0.5 and uncond < 0.5  # predicting eps = 0 scores 1
    assert cond <= uncond + 0.02  # the label helps (or at least does not hurt)
