"""pytest-benchmark timings of the harness hot paths (``make bench`` enables the timing).

The resume benchmark measures what a re-run of a finished suite costs: it must be a small
fraction of the first run (the issue's target: under 5%).
"""

from __future__ import annotations

import time

import pytest

from benchmark.run.harness import run_suite
from benchmark.spec.suite import parse_suite
from tests.test_harness import suite_text

pytestmark = pytest.mark.benchmark


def test_resume_of_finished_suite(benchmark, tmp_path):
    attacks = ('[[attacks]]\nname = "pgd"\nparams = { steps = 20 }\n'
               '[[attacks]]\nname = "stadv"\nparams = { steps = 20 }\n')
    suite = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n', attacks=attacks,
                                   shard=25, extra_threats='[[threat_models]]\nname = "stadv"\n'
                                                           "eps = [0.05]\n"), "b.toml")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    first = run_suite(suite, out, progress="none", log=lambda m: None)
    first_s = time.perf_counter() - t0
    assert first.ran == first.total_jobs

    def resume():
        return run_suite(suite, out, progress="none", log=lambda m: None)

    again = benchmark.pedantic(resume, rounds=3, iterations=1)
    assert again.ran == 0 and again.resumed == first.total_jobs
    benchmark.extra_info["first_run_s"] = first_s
    benchmark.extra_info["jobs"] = first.total_jobs
