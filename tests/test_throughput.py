"""The throughput table of scripts/gpu_check.sh (benchmark/verify/throughput.py) at tiny sizes
on the CPU, and the script's refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.verify.throughput import DDPM_CIFAR10_CONFIG, main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_throughput_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "tp.json"
    assert main(["--quick", "--batches", "2", "--dtypes", "fp32", "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["model", "params_M", "device", "dtype", "batch", "NFE/s"]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["digits", "cifar-ddpm"]
    assert all(r["nfe_per_s"] > 0 and r["batch"] == 2 and r["load_s"] > 0 for r in rows)


def test_the_cifar_config_is_ddpm_s_35_7m_unet() -> None:
    from benchmark.zoo.external import unet2d_class

    pytest.importorskip("diffusers")
    with torch.device("meta"):  # counts parameters without allocating them
        net = unet2d_class().from_config(DDPM_CIFAR10_CONFIG)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 35.7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_to_run_without_cuda() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--device cpu --quick" in done.stderr


def test_rows_are_reported_as_they_are_measured(capsys: pytest.CaptureFixture[str]) -> None:
    # a long bf16 run on a CPU must not look hung: every row reaches stderr when measured
    assert main(["--quick", "--models", "digits", "--batches", "1,2", "--dtypes",
                 "fp32,bf16"]) == 0
    err = capsys.readouterr().err
    assert "bf16 autocast on a CPU" in err
    assert [ln.split(":")[0] for ln in err.splitlines() if ln.startswith("measured")] == [
        "measured digits fp32 batch 1", "measured digits fp32 batch 2",
        "measured digits bf16 batch 1", "measured digits bf16 batch 2"]
