"""pytest-benchmark timings of the PF-ODE likelihood (``defenses.pfode``) on the shipped
``digits-eps`` denoiser, 4 test digits (16 x 16, D = 256), one CPU thread.

* ``test_fast_logp_with_gradient``: the attack objective, fast solver (3/8-rule RK4, 20
  steps, 80 NFE) plus its input gradient, with and without per-step checkpointing;
  ``extra_info`` holds the NFE and the peak memory of one such call, measured in a fresh
  subprocess (after loading and one no-grad evaluation) as its peak RSS during the call minus
  its RSS before it: Linux's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``
  (tracemalloc does not see torch's CPU allocator, and ``ru_maxrss`` keeps the forking
  parent's peak); Linux only;
* ``test_accurate_logp`` (minutes): the reported log p, accurate solver (1000 steps,
  4000 NFE) for the batch;
* ``test_real_model_figures`` (~10 min alone, 30+ on a shared machine): mean bits/dim of 16
  test digits, 16 uniform-noise images, 16 constant gray (0.5) and 16 black (0) images with
  the accurate solver, and the Pearson correlation of fast and accurate log p, in
  ``extra_info`` (run with ``-s`` to print them).

    python -m pytest tests/test_bench_pfode.py -m '' --benchmark-enable -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark.data import load_dataset
from defenses.pfode import PFODEDensity

# 20-90 s each on a busy 2-core CPU
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.benchmark, pytest.mark.slow]

BATCH = 4

_MEMORY_CHILD = """
import json, re, sys, torch
torch.set_num_threads(1)
from benchmark.data import load_dataset
from defenses.pfode import PFODEDensity
def mib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
d = PFODEDensity(checkpoint=sys.argv[1] == "1")
d.reseed(0)
x = load_dataset("digits").test.x[:int(sys.argv[2])]
with torch.no_grad():
    d.attack_log_prob(x)
x = x.clone().requires_grad_(True)
before = mib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
torch.autograd.grad(d.attack_log_prob(x).sum(), x)
print(json.dumps({"peak_increase_mib": round(mib("VmHWM") - before, 1),
                  "rss_before_mib": round(before, 1)}))
"""


def _peak_mib(checkpoint: bool, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, "1" if checkpoint else "0",
                          str(n)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("digits").test.x[:BATCH]


@pytest.fixture(scope="module")
def defense() -> PFODEDensity:
    d = PFODEDensity()
    d.reseed(0)
    return d


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
def test_fast_logp_with_gradient(benchmark, images, checkpoint):
    defense = PFODEDensity(checkpoint=checkpoint)
    defense.reseed(0)

    def run() -> torch.Tensor:
        x = images.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(defense.attack_log_prob(x).sum(), x)
        return g

    g = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert g.shape == images.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    benchmark.extra_info["nfe_forward"] = defense.last_nfe
    benchmark.extra_info["nfe_backward_recompute"] = defense.last_nfe if checkpoint else 0
    benchmark.extra_info["batch"] = BATCH
    if os.path.exists("/proc/self/clear_refs"):
        benchmark.extra_info.update(_peak_mib(checkpoint, BATCH))


def test_accurate_logp(benchmark, defense, images):
    logp = benchmark.pedantic(lambda: defense.log_prob(images), rounds=1, iterations=1)
    assert logp.shape == (BATCH,) and torch.isfinite(logp).all()
    benchmark.extra_info["nfe"] = defense.last_nfe
    benchmark.extra_info["batch"] = BATCH
    benchmark.extra_info["bpd"] = [round(v, 4) for v in defense.logp_to_bpd(logp).tolist()]


def test_real_model_figures(benchmark):
    n = 16
    g = torch.Generator().manual_seed(0)
    sets = {
        "test": load_dataset("digits").test.x[:n],
        "uniform_noise": torch.rand(n, 1, 16, 16, generator=g),
        "gray_0.5": torch.full((n, 1, 16, 16), 0.5),
        "black_0": torch.zeros(n, 1, 16, 16),
    }
    x = torch.cat(list(sets.values()))
    defense = PFODEDensity(chunk_size=len(x))
    defense.reseed(0)
    accurate = benchmark.pedantic(lambda: defense.log_prob(x), rounds=1, iterations=1)
    nfe_accurate = defense.last_nfe
    with torch.no_grad():
        fast = defense.attack_log_prob(x)
    bpd = defense.logp_to_bpd(accurate)
    info = {f"mean_bpd_{k}": round(float(b.mean()), 4)
            for k, b in zip(sets, bpd.split(n), strict=True)}
    info.update({f"std_bpd_{k}": round(float(b.std()), 4)
                 for k, b in zip(sets, bpd.split(n), strict=True)})
    info["pearson_fast_accurate_all"] = round(float(torch.corrcoef(
        torch.stack([fast, accurate]))[0, 1]), 4)
    info["pearson_fast_accurate_test"] = round(float(torch.corrcoef(
        torch.stack([fast[:n], accurate[:n]]))[0, 1]), 4)
    info["mean_abs_bpd_fast_minus_accurate"] = round(float(
        (defense.logp_to_bpd(fast) - bpd).abs().mean()), 4)
    info["nfe_accurate"] = nfe_accurate
    benchmark.extra_info.update(info)
    print(json.dumps(info))
    assert torch.isfinite(accurate).all()
    # Arvinte et al. 2023's finding (fig. 7): uniform noise scores far below test images
    assert info["mean_bpd_test"] < info["mean_bpd_uniform_noise"]
