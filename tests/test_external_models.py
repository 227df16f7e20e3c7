"""Published checkpoints as genbench models (issue 20): diffusers UNet folders, state dicts,
the time conventions, the user registry, refusals, and DiffPure on them end to end.

Every model here is tiny and random, saved in the format its public counterpart uses."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark.zoo import (
    ZooError,
    ZooHashError,
    get_entry,
    list_models,
    load_model,
)
from benchmark.zoo.denoiser import Denoiser
from benchmark.zoo.external import (
    EpsAdapter,
    ExternalModelError,
    Normalized,
    UnsafeCheckpointError,
)
from benchmark.zoo.schedules import DDPM, EDM, VPSDE, SubVPSDE
from benchmark.zoo.user import add_user_model, remove_user_model, user_entries
from benchmark.zoo.wideresnet import DMWideResNet, WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

#: the optional dependency: the tests of diffusers folders need it; the time-convention oracles
#: run on a stand-in with diffusers' calling convention where it is absent (CI installs
#: genbench[dev], which leaves it out: with it pip's resolver gives up on this index)
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS,
                                     reason="needs the optional dependency genbench[diffusers]")


class _StandIn(torch.nn.Module):
    """diffusers' ``UNet2DModel`` calling convention (``net(x, t, class_labels=...).sample``)
    without diffusers: a convolution whose output depends on the time and the label, so the
    oracles below can tell a wrong time or label from the right one."""

    def __init__(self, num_class_embeds: int | None = None, **_: object) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.embed = (torch.nn.Embedding(num_class_embeds, 3) if num_class_embeds else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> Any:
        from types import SimpleNamespace

        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        out = self.conv(x) * (1 + torch.sin(t / 37.0)).view(-1, 1, 1, 1)
        if self.embed is not None and class_labels is not None:
            out = out + self.embed(class_labels).view(-1, 3, 1, 1)
        return SimpleNamespace(sample=out)

#: a UNet2DModel of the DDPM CIFAR-10 layout, shrunk: 2 levels, attention at the second
TINY_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                 attention_head_dim=8)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user registry of this test's own (the user's real one is never read)."""
    path = tmp_path / "models.json"
    monkeypatch.setenv("GENBENCH_MODELS", str(path))
    monkeypatch.setenv("GENBENCH_NO_PLUGINS", "1")
    return path


def _unet(seed: int = 0, **kw: object) -> Any:
    torch.manual_seed(seed)
    if not HAVE_DIFFUSERS:
        return _StandIn(**kw).eval()
    from benchmark.zoo.external import unet2d_class

    net = unet2d_class()(**{**TINY_UNET, **kw})
    with torch.no_grad():  # diffusers zero-initialises the output conv: make eps non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _save_unet(folder: Path, seed: int = 0, **kw: object) -> Any:
    net = _unet(seed, **kw)
    net.save_pretrained(folder, safe_serialization=True)
    return net


def _tiny_wrn(seed: int = 0) -> WideResNet:
    torch.manual_seed(seed)
    net = WideResNet(depth=10, widen_factor=1, num_classes=10)
    for m in net.modules():  # non-trivial running statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


# -- schedules: the inverse maps -----------------------------------------------------------------
def test_time_from_log_snr_inverts_every_schedule() -> None:
    ddpm = DDPM()
    idx = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(ddpm.time_from_log_snr(ddpm.log_snr(idx)), idx.double())
    mid = ddpm.time_from_log_snr(0.5 * (ddpm.log_snr(torch.tensor(10.0, dtype=torch.float64))
                                        + ddpm.log_snr(torch.tensor(11.0, dtype=torch.float64))))
    assert 10 < float(mid) < 11
    assert ddpm.time_from_log_snr(torch.tensor([50.0, -50.0])).tolist() == [0.0, 999.0]
    t = torch.linspace(1e-4, 1, 50, dtype=torch.float64)
    for sched in (VPSDE(eps_t=0), SubVPSDE(eps_t=0)):
        torch.testing.assert_close(sched.time_from_log_snr(sched.log_snr(t)), t)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(EDM().time_from_log_snr(EDM().log_snr(sigma)), sigma)


# -- the adapter's time conventions: the oracle ---------------------------------------------------
def test_ddpm_adapter_equals_the_network_at_the_mapped_timestep() -> None:
    net = _unet()
    den = EpsAdapter(net, time="ddpm", call="diffusers")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # integer DDPM timesteps: exactly the network at that index
        for i in (0, 57, 999):
            torch.testing.assert_close(den.eps(x, i, schedule="ddpm"),
                                       net(x, torch.full((3,), float(i))).sample)
        # a VP time: the network at the fractional index of the same log-SNR
        t = torch.tensor([0.1, 0.3, 0.75])
        idx = DDPM().time_from_log_snr(VPSDE().log_snr(t)).float()
        assert 98 < idx[0] < 101  # the VP time 0.1 sits near DDPM step 100
        torch.testing.assert_close(den.eps(x, t, schedule="vp"), net(x, idx).sample)
        # EDM sigma: the input is x / sqrt(1 + sigma^2) (VP-normalized), same index map
        sigma = torch.tensor([0.5, 1.0, 2.0])
        idx = DDPM().time_from_log_snr(EDM().log_snr(sigma)).float()
        z = x / torch.sqrt(1 + sigma ** 2).view(-1, 1, 1, 1)
        torch.testing.assert_close(den.eps(x, sigma, schedule="edm"), net(z, idx).sample)
    assert den.nfe == 5  # one per eps call


def test_other_time_conventions_feed_their_own_time_and_input() -> None:
    net = _unet()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.1, 0.42])
    lam_vp = VPSDE().log_snr(t)
    with torch.no_grad():
        diffpure = EpsAdapter(net, time="ddpm-diffpure", call="diffusers")
        # DiffPure's RevVPSDE: (t * N).long()
        torch.testing.assert_close(diffpure.eps(x, t, schedule="vp"),
                                   net(x, (t * 1000).long().float()).sample)
        rounded = EpsAdapter(net, time="ddpm-round", call="diffusers")
        idx = torch.round(DDPM().time_from_log_snr(lam_vp)).float()
        torch.testing.assert_close(rounded.eps(x, t, schedule="vp"), net(x, idx).sample)
        vp = EpsAdapter(net, time="vp", call="diffusers")  # score_sde: labels = 999 t
        torch.testing.assert_close(vp.eps(x, t, schedule="vp"), net(x, 999 * t).sample,
                                   rtol=1e-4, atol=1e-5)
        sub = EpsAdapter(net, time="subvp", call="diffusers")
        # a subVP x_t goes in as is (the adapter undoes its own variance normalization)
        torch.testing.assert_close(sub.eps(x, t, schedule="subvp"), net(x, 999 * t).sample,
                                   rtol=1e-4, atol=1e-5)
        edm = EpsAdapter(net, time="edm", call="diffusers")
        sigma = torch.tensor([0.3, 3.0])
        torch.testing.assert_close(edm.eps(x, sigma, schedule="edm"), net(x, sigma).sample,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown time convention 'dpm'.*did you mean 'ddpm'"):
        EpsAdapter(net, time="dpm")


def test_class_conditional_unet_and_its_null_class() -> None:
    net = _unet(num_class_embeds=11)  # 10 classes + the null label 10
    den = EpsAdapter(net, call="diffusers", num_classes=10, null_class=10)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x, 50, y, schedule="ddpm"),
                                   net(x, torch.full((2,), 50.0), class_labels=y).sample)
        torch.testing.assert_close(den.eps(x, 50, None, schedule="ddpm"),
                                   net(x, torch.full((2,), 50.0),
                                       class_labels=torch.full((2,), 10)).sample)
    no_null = EpsAdapter(net, call="diffusers", num_classes=11)
    with pytest.raises(ValueError, match="no null class"):
        no_null.eps(x, 50, None, schedule="ddpm")
    with pytest.raises(ValueError, match="outside"):
        den.eps(x, 50, torch.tensor([10, 0]), schedule="ddpm")


# -- WideResNets as RobustBench names them ---------------------------------------------------------
def test_wideresnet_keys_are_robustbench_s() -> None:
    keys = set(WideResNet(depth=10, widen_factor=1).state_dict())
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight",
            "block2.layer.0.convShortcut.weight", "bn1.running_mean", "fc.weight",
            "fc.bias"} <= keys
    assert "mean" not in keys and "std" not in keys  # normalization is not in the state dict
    dm = set(DMWideResNet(depth=10, width=1, activation="swish").state_dict())
    assert {"init_conv.weight", "layer.0.block.0.batchnorm_0.weight",
            "layer.1.block.0.shortcut.weight", "batchnorm.running_var", "logits.weight"} <= dm
    with pytest.raises(ValueError, match="6 n \\+ 4"):
        WideResNet(depth=12)


def test_state_dict_classifier_registers_loads_and_normalizes(registry: Path,
                                                              tmp_path: Path) -> None:
    net = _tiny_wrn()
    ckpt = tmp_path / "wrn.pt"
    # RobustBench's checkpoints: {"state_dict": {"module.<name>": tensor}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    entry = add_user_model("tiny-wrn", path=ckpt, fmt="state-dict", dataset="cifar10",
                           arch="benchmark.zoo.wideresnet:WideResNet",
                           arch_kwargs={"depth": 10, "widen_factor": 1, "num_classes": 10},
                           normalization={"mean": mean, "std": std},
                           state_dict_key="state_dict", strip_prefix="module.")
    assert json.loads(registry.read_text())["tiny-wrn"]["sha256"] == entry.sha256
    assert "tiny-wrn" in list_models() and get_entry("tiny-wrn").is_user
    loaded = load_model("tiny-wrn")
    assert isinstance(loaded, Normalized) and not loaded.training
    x = torch.rand(4, 3, 32, 32)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net((x - m) / s))
    # the same through the architecture's own normalization (and an alias)
    remove_user_model("tiny-wrn")
    torch.save(net.state_dict(), ckpt)
    add_user_model("tiny-wrn", path=ckpt, fmt="state-dict", dataset="cifar10", arch="wideresnet",
                   arch_kwargs={"depth": 10, "widen_factor": 1, "mean": mean, "std": std})
    with torch.no_grad():
        torch.testing.assert_close(load_model("tiny-wrn")(x), net((x - m) / s))


@needs_diffusers
def test_diffusers_folder_registers_as_a_denoiser(registry: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ddpm"
    net = _save_unet(folder)
    entry = add_user_model("tiny-ddpm", path=folder, fmt="diffusers", dataset="cifar10",
                           denoiser={"time": "ddpm"})
    assert entry.config_sha256 and entry.sha256
    den = load_model("tiny-ddpm")
    assert isinstance(den, EpsAdapter) and isinstance(den, Denoiser)
    assert (den.in_channels, den.image_size, den.conditional) == (3, 32, False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x, 10, schedule="ddpm"),
                                   net(x, torch.full((2,), 10.0)).sample)
    assert "tiny-ddpm" in user_entries()


# -- refusals -----------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_holding_code_is_refused_and_not_run(registry: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    state = {k: v for k, v in _tiny_wrn().state_dict().items()}
    with ckpt.open("wb") as f:
        pickle.dump({"state_dict": state, "payload": _Evil(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt: refused.*weights_only=True"):
        add_user_model("evil", path=ckpt, fmt="state-dict", dataset="cifar10", arch="wideresnet",
                       arch_kwargs={"depth": 10, "widen_factor": 1}, state_dict_key="state_dict")
    assert not marker.exists()
    assert "evil" not in list_models()  # nothing was registered


@needs_diffusers
def test_a_diffusers_folder_whose_config_and_weights_disagree(registry: Path,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "ddpm"
    _save_unet(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [8, 24]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExternalModelError, match="config.json and diffusion_pytorch_model"
                                                 ".safetensors disagree.*shape mismatch"):
        add_user_model("bad", path=folder, fmt="diffusers", dataset="cifar10")
    cfg["block_out_channels"] = [8, 16]
    cfg["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExternalModelError, match="missing"):
        add_user_model("bad", path=folder, fmt="diffusers", dataset="cifar10")


@needs_diffusers
def test_missing_files_and_pickle_only_folders(registry: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ddpm"
    _save_unet(folder)
    (folder / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(ExternalModelError, match="no config.json"):
        add_user_model("m", path=folder, fmt="diffusers", dataset="cifar10")
    (tmp_path / "config.json").rename(folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="only diffusion_pytorch_model.bin"):
        add_user_model("m", path=folder, fmt="diffusers", dataset="cifar10")
    with pytest.raises(ZooError, match="weights file .*nope.pt not found"):
        add_user_model("m", path=tmp_path / "nope.pt", fmt="state-dict", dataset="cifar10",
                       arch="wideresnet")


@needs_diffusers
def test_a_replaced_weights_file_is_refused_at_load(registry: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ddpm"
    _save_unet(folder, seed=0)
    add_user_model("m", path=folder, fmt="diffusers", dataset="cifar10")
    _save_unet(folder, seed=1)  # same config, other weights
    with pytest.raises(ZooHashError, match="sha256 mismatch for user model 'm'.*register it "
                                           "again"):
        load_model("m")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ZooError, match="no diffusion_pytorch_model.safetensors"):
        load_model("m")


def test_user_models_never_shadow_zoo_models(registry: Path, tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="'digits-cnn' is a shipped zoo model"):
        add_user_model("digits-cnn", path=tmp_path, fmt="diffusers", dataset="digits")
    registry.write_text(json.dumps({"digits-eps": {"format": "diffusers", "file": "x",
                                                   "sha256": "0", "dataset": "digits"}}))
    with pytest.raises(ZooError, match="has the name of a shipped zoo model"):
        list_models()
    other = tmp_path / "other.json"
    registry.write_text(json.dumps({"m": {"format": "diffusers", "file": "x", "sha256": "0",
                                          "dataset": "cifar10"}}))
    other.write_text(registry.read_text())
    os.environ["GENBENCH_MODELS"] = f"{registry}{os.pathsep}{other}"
    with pytest.raises(ZooError, match="registered twice"):
        get_entry("m")


@needs_diffusers
def test_cli_models_add_and_list(registry: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from benchmark.cli import main

    folder = tmp_path / "ddpm"
    _save_unet(folder)
    assert main(["models", "add", "cli-ddpm", "--format", "diffusers", "--path", str(folder),
                 "--dataset", "cifar10", "--time", "ddpm-diffpure"]) == 0
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("cli-ddpm\t"))
    assert line.split("\t")[3:] == ["diffusers", str(registry)]
    assert load_model("cli-ddpm").time == "ddpm-diffpure"
    assert main(["models", "add", "cli-ddpm", "--format", "diffusers", "--path", str(folder),
                 "--dataset", "cifar10"]) == 2
    assert "already registered" in capsys.readouterr().err


# -- the defenses on these models, and the fingerprint ---------------------------------------------
def _cifar_folder(root: Path, n_test: int) -> Path:
    """A CIFAR-10 folder in the real format with random images (ids up to ``n_test - 1``)."""
    from benchmark.data.cifar10 import write_random_cifar10

    return write_random_cifar10(root, n_test=n_test)


@needs_diffusers
def test_diffpure_end_to_end_on_user_models(registry: Path, tmp_path: Path) -> None:
    from benchmark.report.tables import write_tables
    from benchmark.run.harness import run_suite
    from benchmark.spec.plan import plan_suite
    from benchmark.spec.suite import parse_suite

    folder = tmp_path / "ddpm"
    _save_unet(folder)
    add_user_model("tiny-ddpm", path=folder, fmt="diffusers", dataset="cifar10")
    ckpt = tmp_path / "wrn.pt"
    torch.save(_tiny_wrn().state_dict(), ckpt)
    add_user_model("tiny-wrn", path=ckpt, fmt="state-dict", dataset="cifar10",
                   arch="wideresnet", arch_kwargs={"depth": 10, "widen_factor": 1})
    root = _cifar_folder(tmp_path / "data", n_test=6040)  # the subset's first ids: 6037, 855
    text = f"""
[suite]
name = "ext"
dataset = "cifar10"
dataset_params = {{ root = "{root}" }}
subset = "test512-v1"
k_draws = 2
batch_size = 2
shard_size = 2
unconstrained_probe = 0
single_step_probe = 0

[[defenses]]
name = "diffpure"
params = {{ denoiser = "tiny-ddpm", classifier = "tiny-wrn", t_star = 0.002, dt = 0.001 }}

[[attacks]]
name = "pgd-eot"
params = {{ steps = 1, eot_draws = 1 }}

[[threat_models]]
name = "linf"
eps = [0.03137254901960784]
"""
    suite = parse_suite(text, "ext.toml")
    plan = plan_suite(suite, limit=2)
    weights = json.loads(plan.jobs[0].resolved)["weights"]
    assert weights == {"tiny-ddpm": get_entry("tiny-ddpm").sha256,
                       "tiny-wrn": get_entry("tiny-wrn").sha256}
    spec = json.loads(plan.jobs[0].resolved)["user_models"]["tiny-ddpm"]
    assert spec["format"] == "diffusers" and spec["config_sha256"]
    summary = run_suite(suite, tmp_path / "out", limit=2, progress="none", log=lambda m: None)
    frame = __import__("pandas").read_csv(write_tables(summary.out, summary.plan).csv)
    assert frame.error.isna().all(), frame.error.tolist()
    assert (frame.n == 2).all() and set(frame.defense) == {"diffpure"}


def test_dc_and_the_pfode_detector_take_the_adapter() -> None:
    from defenses.pfode import PFODEDensity, Solver
    from defenses.rdc import DiffusionClassifier

    cond = EpsAdapter(_unet(num_class_embeds=11), call="diffusers", num_classes=10,
                      null_class=10, in_channels=3, image_size=32)
    dc = DiffusionClassifier(denoiser=cond, timesteps=2, rows_per_batch=20)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert dc(x).shape == (1, 10)
    assert cond.nfe == 1  # 2 timesteps x 10 classes in one batch of 20 rows
    coarse = Solver("coarse", step=0.5, fresh_noise=False, method="euler")
    pf = PFODEDensity(denoiser=cond, schedule="vp", attack_solver=coarse, report_solver=coarse)
    with torch.no_grad():
        lp = pf.log_prob(x)
    assert lp.shape == (1,) and torch.isfinite(lp).all()


def _install_entry_points(root: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                          entry_points: str) -> None:
    """A distribution installed on ``sys.path`` for this test only: package ``gb_ep_models``
    (``source`` as its ``__init__.py``) and a dist-info declaring ``entry_points``."""
    package = root / "gb_ep_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    info = root / "gb_ep_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gb-ep-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[genbench.models]\n{entry_points}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("GENBENCH_NO_PLUGINS", raising=False)


def test_a_model_shipped_by_an_installed_package_through_its_entry_point(
        registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _tiny_wrn(seed=3)
    ckpt = tmp_path / "wrn.pt"
    torch.save(net.state_dict(), ckpt)
    # the entry mapping exactly as registration writes it, then shipped as package data
    entry = add_user_model("ep-wrn", path=ckpt, fmt="state-dict", dataset="cifar10",
                           arch="wideresnet", arch_kwargs={"depth": 10, "widen_factor": 1})
    mapping = json.loads(registry.read_text())["ep-wrn"]
    registry.unlink()
    root = tmp_path / "site"
    mapping["file"] = "weights/wrn.pt"  # relative: to the package's folder
    _install_entry_points(root, monkeypatch,
                          f"ENTRY = {mapping!r}\n\ndef broken():\n    return [1, 2]\n",
                          "ep-wrn = gb_ep_models:ENTRY")
    (root / "gb_ep_models" / "weights").mkdir()
    ckpt.rename(root / "gb_ep_models" / "weights" / "wrn.pt")
    got = get_entry("ep-wrn")
    assert got.is_user and got.sha256 == entry.sha256
    assert got.source == "entry point ep-wrn = gb_ep_models:ENTRY"
    assert "ep-wrn" in list_models()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model("ep-wrn")(x), net(x))
    # an entry point that is not a model entry, and one that shadows the zoo: refused, named
    (root / "gb_ep_models-0.1.dist-info" / "entry_points.txt").write_text(
        "[genbench.models]\nep-broken = gb_ep_models:broken\n")
    with pytest.raises(ZooError, match="ep-broken = gb_ep_models:broken: expected an entry "
                                       "mapping, got list"):
        list_models()
    (root / "gb_ep_models-0.1.dist-info" / "entry_points.txt").write_text(
        "[genbench.models]\ndigits-cnn = gb_ep_models:ENTRY\n")
    with pytest.raises(ZooError, match="'digits-cnn' .* has the name of a shipped zoo model"):
        list_models()


def test_undefended_on_a_user_classifier_needs_no_dataset_on_disk(
        registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the CIFAR-10 folder a suite names in dataset_params is not where the defense looks: the
    # class count comes from the network (WideResNet stores it), not from loading the dataset
    from benchmark.data import clear_dataset_cache
    from defenses.baseline import Undefended

    monkeypatch.setenv("GENBENCH_CIFAR10", str(tmp_path / "nowhere"))
    clear_dataset_cache()
    ckpt = tmp_path / "wrn.pt"
    torch.save(WideResNet(depth=10, widen_factor=1).state_dict(), ckpt)
    add_user_model("wrn10", path=ckpt, fmt="state-dict", dataset="cifar10", arch="wideresnet",
                   arch_kwargs={"depth": 10, "widen_factor": 1})
    assert Undefended(model="wrn10").num_classes == 10
