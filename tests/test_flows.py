"""RealNVP and Glow: exact inverses, exact log-determinants, the shipped zoo flows, the trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark.data import load_dataset
from benchmark.data.subsets import get_subset, select
from benchmark.plugins.builtin import TRAINERS
from benchmark.train.flow import pgd_nll, train, train_glow, train_realnvp
from benchmark.zoo import ZooEntry, file_sha256, get_entry, load_entry, load_model
from benchmark.zoo.flows import Flow, Glow, RealNVP, _GlowStep, dequantize

ARCHS = {"realnvp": RealNVP, "glow": Glow}
REGIMES = ("clean", "adv", "hybrid")


def _randomized(flow: Flow, scale: float = 0.05, seed: int = 0) -> Flow:
    """Perturb every parameter: fresh couplings start as the identity (zero last layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow.eval()


@pytest.fixture(scope="module")
def test20() -> torch.Tensor:
    x, _, _ = select(load_dataset("digits"), get_subset("digits", "test100-v1"))
    return dequantize(x[:20], torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# The bijection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_inverse_is_exact(arch: str) -> None:
    torch.manual_seed(0)
    flow = _randomized(ARCHS[arch]())
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    z, logdet = flow.encode(x)
    assert z.shape == (8, 256) and logdet.shape == (8,)
    assert torch.allclose(flow.inverse(z), x, atol=1e-5, rtol=0)
    assert torch.allclose(flow.encode(flow.inverse(z))[0], z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_scales", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_logdet_matches_brute_force_jacobian(arch: str, num_scales: int) -> None:
    torch.manual_seed(0)
    flow = _randomized(ARCHS[arch](in_channels=1, image_size=4, num_scales=num_scales,
                                   steps_per_scale=2, hidden=8).double(), scale=0.3)
    x = 0.05 + 0.9 * torch.rand(3, 1, 4, 4, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(2))
    _, logdet = flow.encode(x)
    for xi, ld in zip(x, logdet, strict=True):
        jac = torch.autograd.functional.jacobian(
            lambda v: flow.encode(v.reshape(1, 1, 4, 4))[0][0], xi.reshape(-1))
        sign, brute = torch.linalg.slogdet(jac)
        assert sign != 0
        assert torch.allclose(ld, brute, atol=1e-9, rtol=1e-9)
    # log_prob is the change of variables with the N(0, I) prior; bpd adds 8 bits per dim.
    z, logdet = flow.encode(x)
    expected = -0.5 * (z * z).sum(1) - 8 * math.log(2 * math.pi) + logdet
    assert torch.allclose(flow.log_prob(x), expected)
    assert torch.allclose(flow.bits_per_dim(x), -expected / (16 * math.log(2)) + 8)


def test_glow_actnorm_initializes_on_first_training_batch() -> None:
    torch.manual_seed(0)
    flow = Glow(in_channels=1, image_size=4, num_scales=1, steps_per_scale=1, hidden=4)
    step = flow.level_list()[0].post_steps()[0]
    assert isinstance(step, _GlowStep)
    first = step.actnorm
    flow.eval()(torch.rand(4, 1, 4, 4))
    assert not bool(first.initialized)  # eval never initializes
    flow.train()(torch.rand(16, 1, 4, 4))
    assert bool(first.initialized) and first.log_scale.abs().sum() > 0
    state = flow.state_dict()
    assert "levels.0.post.0.actnorm.initialized" in state


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_is_deterministic_and_samples(arch: str) -> None:
    torch.manual_seed(0)
    flow = _randomized(ARCHS[arch]())
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(flow(x), flow(x)) and flow.kind == "density"
    s1 = flow.sample(3, generator=torch.Generator().manual_seed(5))
    s2 = flow.sample(3, generator=torch.Generator().manual_seed(5))
    assert s1.shape == (3, 1, 16, 16) and torch.equal(s1, s2)
    assert float(s1.min()) >= 0.0 and float(s1.max()) <= 1.0
    with pytest.raises(ValueError, match="expects images of shape"):
        flow(torch.rand(2, 1, 8, 8))


def test_dequantize_stays_in_the_box() -> None:
    x = torch.tensor([0.0, 1.0, 0.5]).reshape(1, 1, 1, 3).expand(1000, 1, 1, 3)
    d = dequantize(x, torch.Generator().manual_seed(0))
    assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
    assert float((d - x).abs().max()) <= 1.0 / 256 + 1e-7


# --------------------------------------------------------------------------------------------
# The shipped models (Pope et al.'s three regimes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_flow_loads_and_scores(arch: str, regime: str, test20: torch.Tensor) -> None:
    name = f"digits-{arch}-{regime}"
    entry = get_entry(name)
    assert file_sha256(entry.path()) == entry.sha256
    assert entry.path().stat().st_size < 2_000_000
    assert entry.trained_by == (f"genbench train {arch} --dataset digits --regime {regime} "
                                "--seed 0")
    assert math.isfinite(entry.metrics["test_bpd"])
    flow = load_model(name)  # hash-checked
    assert isinstance(flow, ARCHS[arch]) and not flow.training
    with torch.no_grad():
        bpd = flow.bits_per_dim(test20)
    assert bool(torch.isfinite(bpd).all()) and 0.0 < float(bpd.mean()) < 10.0


@pytest.fixture(scope="module")
def attacked_bpd(test20: torch.Tensor) -> dict[tuple[str, str], tuple[float, float]]:
    """(clean, 10-step PGD at eps 0.05) mean bits/dim of the 20 images, per shipped model."""
    out = {}
    for arch in ARCHS:
        for regime in REGIMES:
            flow = load_model(f"digits-{arch}-{regime}")
            assert isinstance(flow, Flow)
            adv = pgd_nll(flow, test20, eps=0.05, steps=10,
                          generator=torch.Generator().manual_seed(0))
            assert float((adv - test20).abs().max()) <= 0.05 + 1e-6
            with torch.no_grad():
                out[arch, regime] = (float(flow.bits_per_dim(test20).mean()),
                                     float(flow.bits_per_dim(adv).mean()))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_adversarial_training_makes_flows_robust(
        arch: str, attacked_bpd: dict[tuple[str, str], tuple[float, float]]) -> None:
    clean0, clean_att = attacked_bpd[arch, "clean"]
    assert clean_att > clean0 + 5.0  # the clean model degrades sharply
    for regime in ("adv", "hybrid"):
        nat, att = attacked_bpd[arch, regime]
        assert att >= nat - 1e-3
        assert att - nat < 0.25 * (clean_att - clean0)
        assert att < clean_att


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
_CHEAP_EVAL: dict[str, Any] = {"eval_eps": [0.0, 0.05], "eval_steps": 1}


@pytest.mark.parametrize(("arch", "regime"), [("realnvp", "hybrid"), ("glow", "adv")])
def test_train_smoke(arch: str, regime: str, tmp_path: Path) -> None:
    before = get_entry(f"digits-{arch}-{regime}")
    info = train(arch=arch, regime=regime, max_steps=2, out_dir=tmp_path, register=False,
                 progress=False, **_CHEAP_EVAL)
    assert info["steps"] == 2 and info["name"] == f"digits-{arch}-{regime}"
    assert not info["registered"]
    path = Path(info["path"])
    assert path.parent == tmp_path and info["sha256"] == file_sha256(path)
    assert get_entry(f"digits-{arch}-{regime}") == before  # the shipped zoo is untouched
    assert set(info["metrics"]) == {"test_bpd", "test100_bpd", "test100_bpd_pgd1_eps0.05",
                                    "uniform_noise_bpd"}
    entry = ZooEntry(name="smoke", arch=info["arch_ref"], arch_kwargs=info["arch_kwargs"],
                     dataset="digits", file=str(path), sha256=info["sha256"])
    flow = load_entry(entry)
    assert isinstance(flow, ARCHS[arch])
    assert bool(torch.isfinite(flow.bits_per_dim(torch.rand(2, 1, 16, 16))).all())


def test_train_is_seeded(tmp_path: Path) -> None:
    runs = [train(arch="glow", regime="hybrid", max_steps=1, out_dir=tmp_path / d,
                  register=False, progress=False, eval_eps=[0.0]) for d in "ab"]
    assert runs[0]["sha256"] == runs[1]["sha256"]


def test_train_rejects_bad_choices(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"max_steps": 1, "out_dir": tmp_path, "register": False, "progress": False}
    with pytest.raises(ValueError, match=r"regime 'robust'.*'clean', 'adv', 'hybrid'"):
        train(arch="glow", regime="robust", **kw)
    with pytest.raises(ValueError, match=r"arch 'maf'.*'realnvp', 'glow'"):
        train(arch="maf", **kw)
    with pytest.raises(ValueError, match="unknown flow training option.*'hiden'"):
        train(arch="realnvp", hiden=8, **kw)
    assert not list(tmp_path.iterdir())


def test_trainers_registered() -> None:
    assert TRAINERS.get("realnvp") is train_realnvp
    assert TRAINERS.get("glow") is train_glow
