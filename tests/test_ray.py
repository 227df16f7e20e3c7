"""The ``ray`` executor (extra ``genbench[ray]``; skipped when Ray is not installed): the same
leaderboard as ``local``, and a clear, bounded error for an address where nothing answers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
from torch import Tensor

from benchmark.cli import main
from benchmark.report.leaderboard import read_csv
from benchmark.report.tables import write_tables
from benchmark.run.harness import run_suite
from benchmark.spec.plan import plan_suite
from benchmark.spec.suite import parse_suite
from tests.plugins import _Wrapped
from tests.test_harness import stable, suite_text

pytest.importorskip("ray")

from benchmark.run.ray import RayExecutor  # noqa: E402

DEFENSES = ('[[defenses]]\nname = "undefended"\n\n'
            '[[defenses]]\nname = "tests.plugins:NoisyDefense"\nid = "noisy"\n')


class CrashOnce(_Wrapped):
    """Kills its worker process on the first forward call (marker file absent): worker loss."""

    def __init__(self, model: str = "digits-cnn", marker: str = "") -> None:
        super().__init__(model)
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        if self.marker and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed once\n")
            os._exit(1)
        return self.net(x)


@pytest.mark.slow
def test_ray_gives_the_same_leaderboard_as_local_and_retries_lost_workers(tmp_path):
    marker = tmp_path / "crashed"
    crash = (f'[[defenses]]\nname = "tests.test_ray:CrashOnce"\nid = "crash"\n'
             f'params = {{ marker = "{marker}" }}\n')
    suite = parse_suite(suite_text(DEFENSES, eps="[0.1]", k=3), source="t.toml")
    local = run_suite(suite, tmp_path / "local", limit=8, progress="none", log=lambda m: None)
    # one Ray run: the shared defenses, plus one whose worker dies once (retried, not an error)
    suite_ray = parse_suite(suite_text(DEFENSES + crash, eps="[0.1]", k=3), source="t.toml")
    ray = run_suite(suite_ray, tmp_path / "ray", executor="ray", workers=2, limit=8,
                    progress="none", log=lambda m: None)
    assert ray.errors == 0 and local.ran == 8 and ray.ran == 12
    assert marker.exists()
    a = read_csv(write_tables(local.out, local.plan).csv)
    b = read_csv(write_tables(ray.out, ray.plan).csv)
    assert a.error.isna().all() and b.error.isna().all()
    shared = b[b.defense != "crash"]
    pd.testing.assert_frame_equal(stable(a), stable(shared))
    assert (b[b.defense == "crash"].robust_acc.to_numpy()
            == a[a.defense == "undefended"].robust_acc.to_numpy()).all()


def test_address_where_nothing_answers_is_a_quick_clear_error(tmp_path, capsys):
    path = tmp_path / "suite.toml"
    path.write_text(suite_text('[[defenses]]\nname = "undefended"\n', eps="[0.1]"))
    t0 = time.perf_counter()
    assert main(["run", "--suite", str(path), "--out", str(tmp_path / "run"), "--limit", "4",
                 "--executor", "ray", "--ray-address", "127.0.0.1:9", "--progress",
                 "none"]) == 2
    err = capsys.readouterr().err
    assert "no Ray cluster answers at '127.0.0.1:9'" in err
    assert time.perf_counter() - t0 < 60  # planning included; the connect itself is instant


def test_unroutable_address_times_out_within_the_stated_timeout():
    suite = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n', eps="[0.1]"),
                        source="t.toml")
    jobs = plan_suite(suite, limit=4).jobs
    ex = RayExecutor(address="10.255.255.1:6379", connect_timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="10.255.255.1:6379"):
        list(ex.map(jobs))
    assert time.perf_counter() - t0 < 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="workers"):
        RayExecutor(workers=0)
    with pytest.raises(ValueError, match="num_cpus"):
        RayExecutor(num_cpus=0)
