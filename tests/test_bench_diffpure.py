"""pytest-benchmark: the exact DiffPure gradient through 100 Euler-Maruyama steps (t* = 0.1,
dt = 1e-3) on 8 digits with the shipped digits-eps, per-step checkpointed vs plain autograd.

Peak memory on CPU is measured in a fresh subprocess per variant: the rise of the process's
peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux) from just before
the forward to just after the backward, after one untimed warm-up forward of the same batch
(so allocator pools and lazily built kernels are not counted). Targets (issue 5): at least 5x
less memory with checkpointing, and under 2.5x the time of a plain backward.

Run: ``python -m pytest tests/test_bench_diffpure.py -m '' --benchmark-enable``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.data import load_dataset
from defenses.diffpure import DiffPure

pytestmark = pytest.mark.benchmark

BATCH = 8
ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from benchmark.data import load_dataset
from defenses.diffpure import DiffPure
ckpt = sys.argv[1] == "1"
x = load_dataset("digits").test.x[:{batch}]
dp = DiffPure(t_star=0.1, dt=1e-3, checkpoint=ckpt)
dp.reseed(0)
with torch.no_grad():
    dp(x)
dp.reseed(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
xr = x.clone().requires_grad_(True)
(g,) = torch.autograd.grad(dp(xr).logsumexp(1).sum(), xr)
wall = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mib": (after - before) / 1024, "wall_s": wall,
                   "grad_norm": float(g.norm())}}))
"""


def _measure(checkpoint: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(batch=BATCH),
                          "1" if checkpoint else "0"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=600)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_exact_gradient_memory_and_time(benchmark):
    """Checkpointed vs plain: peak-RSS rise and wall time of one forward+backward."""
    plain = _measure(False)
    ckpt = benchmark.pedantic(_measure, args=(True,), rounds=1, iterations=1)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    mem_ratio = plain["peak_mib"] / max(ckpt["peak_mib"], 1e-3)
    time_ratio = ckpt["wall_s"] / plain["wall_s"]
    benchmark.extra_info.update(
        nfe=2 * 100, batch=BATCH, steps=100, plain_peak_mib=round(plain["peak_mib"], 1),
        checkpointed_peak_mib=round(ckpt["peak_mib"], 1), memory_ratio=round(mem_ratio, 2),
        plain_wall_s=round(plain["wall_s"], 3), checkpointed_wall_s=round(ckpt["wall_s"], 3),
        time_ratio=round(time_ratio, 2), memory_method="ru_maxrss rise in a fresh subprocess")
    assert mem_ratio >= 5, benchmark.extra_info
    assert time_ratio < 2.5, benchmark.extra_info


@pytest.mark.usefixtures("one_thread")
def test_exact_gradient_checkpointed_in_process(benchmark):
    """The checkpointed forward+backward itself, timed by pytest-benchmark (2 rounds)."""
    x = load_dataset("digits").test.x[:BATCH]
    dp = DiffPure(t_star=0.1, dt=1e-3, checkpoint=True)

    def grad() -> torch.Tensor:
        dp.reseed(0)
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(dp(xr).logsumexp(1).sum(), xr)
        return g

    g = benchmark.pedantic(grad, rounds=2, iterations=1)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    benchmark.extra_info.update(nfe=dp.nfe_per_call, batch=BATCH)
