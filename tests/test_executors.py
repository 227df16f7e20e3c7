"""Executors that survive what plug-ins do: non-finite or raising defenses on adversarial
examples, attacks that raise, ``sys.exit`` and ``KeyboardInterrupt`` from a plug-in, workers
that die or hang, and plug-ins drawing from the global random generators."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
import torch

from benchmark.plugins.cache import DefenseCache
from benchmark.report.leaderboard import read_csv
from benchmark.report.publish import NOT_RANKED, ranked, render_readme
from benchmark.report.tables import write_tables
from benchmark.run.executors import LocalExecutor, ProcessExecutor, check_timeout
from benchmark.run.harness import run_suite
from benchmark.run.runner import DEFENSE_FAILED, execute
from benchmark.spec.plan import plan_suite
from benchmark.spec.suite import parse_suite
from tests.test_harness import suite_text

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT = '[[attacks]]\nname = "tests.plugins:ShiftAttack"\nid = "shift"\n'
RAISING_ATTACK = '[[attacks]]\nname = "tests.plugins:RaisingAttack"\nid = "boom"\n'
UNDEFENDED = '[[defenses]]\nname = "undefended"\n'


def toy(cls: str, ident: str, params: str = "") -> str:
    extra = f"params = {{ {params} }}\n" if params else ""
    return f'[[defenses]]\nname = "tests.plugins:{cls}"\nid = "{ident}"\n{extra}'


def suite_of(defenses: str, attacks: str = SHIFT, **kw):
    return parse_suite(suite_text(defenses, attacks=attacks, eps="[0.1]", shard=8, **kw),
                       "t.toml")


def run_local(tmp_path: Path, suite, name: str = "out"):
    summary = run_suite(suite, tmp_path / name, limit=8, progress="none", log=lambda m: None)
    return summary, read_csv(write_tables(summary.out, summary.plan).csv)


def sample_errors(out: Path, defense: str, attack: str) -> list[str | None]:
    with sqlite3.connect(out / "runs.sqlite") as conn:
        return [r[0] for r in conn.execute(
            "SELECT s.error FROM samples s JOIN jobs j ON s.job = j.key WHERE j.defense = ? "
            "AND j.attack = ? ORDER BY s.sample_id", (defense, attack))]


# -- item 1: failures on adversarial examples are per sample ------------------------------------

def test_nan_or_raising_on_adversarial_examples_is_not_robust_and_keeps_the_worst_case(
        tmp_path):
    defenses = "\n".join([toy("NaNOnAdversarial", "nan-adv"),
                          toy("RaisingOnAdversarial", "raise-adv"), UNDEFENDED])
    summary, frame = run_local(tmp_path, suite_of(defenses))
    assert summary.errors == 0
    rows = frame.set_index(["defense", "attack"])
    for did, words in [("nan-adv", "non-finite logits in 1 of 1 draw"),
                       ("raise-adv", "raised RuntimeError: cannot score perturbed images")]:
        row = rows.loc[(did, "shift")]
        assert pd_isna(row["error"]) and row["n"] == 8 and row["n_errors"] == 8
        assert row["robust_acc"] == 0.0 and row["clean_acc"] > 0.5
        worst = rows.loc[(did, "worst_case")]
        assert pd_isna(worst["error"]) and worst["robust_acc"] == 0.0
        assert "worst_case_incomplete" not in str(worst["flags"])
        reasons = sample_errors(summary.out, did, "shift")
        assert len(reasons) == 8 and all(r.startswith(DEFENSE_FAILED) for r in reasons)
        assert words in reasons[0], reasons[0]
    assert rows.loc[("undefended", "shift"), "n_errors"] == 0
    table = ranked(frame, {})
    assert table["complete"].all() and table["rank"].notna().all()


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_an_attack_that_raises_is_an_error_row_and_its_incomplete_worst_case_is_not_ranked(
        tmp_path):
    defenses = UNDEFENDED + "\n" + toy("NoisyDefense", "noisy")
    summary, frame = run_local(tmp_path, suite_of(defenses, attacks=SHIFT + RAISING_ATTACK))
    rows = frame.set_index(["defense", "attack"])
    assert "this attack always fails" in rows.loc[("undefended", "boom"), "error"]
    worst = rows.loc[("undefended", "worst_case")]
    assert "worst_case_incomplete" in worst["flags"]
    table = ranked(frame, {"undefended": "deterministic classifier"})
    assert not table["complete"].any() and table["rank"].isna().all()
    readme = render_readme(frame, table, summary.plan, [])
    assert f"| {NOT_RANKED} " in readme and "worst case is incomplete" in readme
    md = (summary.out / "leaderboard.md").read_text()
    assert "Incomplete worst cases" in md and "undefended / linf eps=0.1: boom errored" in md
    # without the raising attack the same cells are complete and ranked
    complete = frame[frame.attack != "boom"].copy()
    complete["error"] = None
    complete["flags"] = ""
    table = ranked(complete, {})
    assert table["complete"].all() and table["rank"].notna().all()


# -- item 3: sys.exit / KeyboardInterrupt from a plug-in, a real Ctrl-C -------------------------

def test_sys_exit_and_keyboard_interrupt_from_a_plugin_become_error_rows(tmp_path):
    defenses = "\n".join([toy("ExitingDefense", "exits"), toy("InterruptingDefense", "kbi"),
                          UNDEFENDED])
    summary, frame = run_local(tmp_path, suite_of(defenses))
    rows = frame.set_index(["defense", "attack"])
    assert "SystemExit: a plug-in called sys.exit(3)" in rows.loc[("exits", "shift"), "error"]
    assert "KeyboardInterrupt raised by a plug-in" in rows.loc[("kbi", "shift"), "error"]
    assert pd_isna(rows.loc[("undefended", "shift"), "error"])
    assert summary.errors == 4  # clean and shift jobs of the two


def test_a_real_ctrl_c_still_stops_the_job():
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background by a shell "
                    "without job control), so no Ctrl-C can reach it")
    suite = suite_of(toy("CtrlCDefense", "ctrl-c"))
    job = plan_suite(suite, limit=2).jobs[0]
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        execute(job, "cpu")
    assert signal.getsignal(signal.SIGINT) is before


# -- item 4: the global generators are seeded per job ------------------------------------------

def test_plugins_using_the_global_rng_are_reproducible_per_job():
    suite = suite_of(toy("GlobalNoiseDefense", "global"), k=5)
    job = plan_suite(suite, limit=8).jobs[1]  # an attacked job
    cache = DefenseCache()
    first = execute(job, "cpu", cache)
    torch.randn(1000)  # the caller's generator moves on; a cached defense is reused
    again = execute(job, "cpu", cache)
    fresh = execute(job, "cpu", DefenseCache())
    assert first.status == "done", first.error
    counts = [[o.correct for o in r.outcomes] for r in (first, again, fresh)]
    assert counts[0] == counts[1] == counts[2]
    assert (first.x_adv == fresh.x_adv).all()


# -- items 2 and 3: worker processes that die or hang -------------------------------------------

def test_timeout_settings_are_checked():
    assert check_timeout(None) is None and check_timeout(2) == 2.0
    for bad in (0, -1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="job_timeout_s"):
            check_timeout(bad)
    with pytest.warns(RuntimeWarning, match="not enforced by the local executor"):
        LocalExecutor(job_timeout_s=5)
    with pytest.raises(ValueError, match="max_retries"):
        ProcessExecutor(max_retries=-1)


def _clean_jobs(defenses: str, limit: int = 4):
    suite = suite_of(defenses)
    return [j for j in plan_suite(suite, limit=limit).jobs if j.is_clean]


@pytest.mark.slow
def test_process_workers_that_die_or_hang_become_error_rows_and_the_rest_finishes():
    jobs = _clean_jobs("\n".join([toy("WorkerKiller", "killed", 'how = "kill"'),
                                  toy("HangingDefense", "hangs"), toy("ExitingDefense", "exits"),
                                  UNDEFENDED]))
    ex = ProcessExecutor(workers=2, max_retries=1, job_timeout_s=15)  # loaded CI cores
    results = {job.defense.id: result for job, result in ex.map(jobs)}
    assert sorted(results) == ["exits", "hangs", "killed", "undefended"]
    assert results["undefended"].status == "done" and len(results["undefended"].outcomes) == 4
    assert "worker process died (killed by SIGKILL" in results["killed"].error
    assert "2 times (retried 1 times)" in results["killed"].error
    assert results["hangs"].error.startswith("timed out after 15 s")
    assert "sys.exit(3)" in results["exits"].error


@pytest.mark.slow
def test_a_worker_lost_once_is_retried_and_a_run_goes_on_after_a_lost_job(tmp_path):
    marker = tmp_path / "killed-once"
    defenses = "\n".join([toy("WorkerKiller", "once", f'how = "exit", marker = "{marker}"'),
                          toy("WorkerKiller", "always", 'how = "kill"'), UNDEFENDED])
    suite = suite_of(defenses)
    summary = run_suite(suite, tmp_path / "proc", limit=4, executor="process", workers=2,
                        progress="none", log=lambda m: None)
    frame = read_csv(write_tables(summary.out, summary.plan).csv).set_index(["defense",
                                                                             "attack"])
    assert marker.exists()
    assert pd_isna(frame.loc[("once", "shift"), "error"])  # retried after its worker died
    assert frame.loc[("once", "shift"), "robust_acc"] == frame.loc[("undefended", "shift"),
                                                                   "robust_acc"]
    assert "retried 2 times" in frame.loc[("always", "shift"), "error"]
    assert summary.errors == 2  # the clean and shift jobs of "always"
    assert pd_isna(frame.loc[("undefended", "worst_case"), "error"])


# -- the ray executor's driver loop, on a stand-in for Ray (threads; Ray itself is optional) ----

class _FakeRay:
    """Just what :class:`RayExecutor` calls: a cluster of ``cpus`` CPUs whose tasks run on
    threads (a cancelled task's thread cannot be killed, so there are spare ones)."""

    def __init__(self, cpus: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cpus = cpus
        self.pool = ThreadPoolExecutor(cpus + 2)
        self.cancelled: list = []
        self.most_in_flight = 0

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return {"CPU": float(self.cpus)}

    def remote(self, **options):
        pool = self.pool

        def wrap(fn):
            class Task:
                @staticmethod
                def remote(*args):
                    return pool.submit(fn, *args)

            return Task

        return wrap

    def wait(self, refs, num_returns=1, timeout=None):
        from concurrent.futures import FIRST_COMPLETED, wait

        self.most_in_flight = max(self.most_in_flight, len(refs))
        done, _ = wait(refs, timeout=timeout, return_when=FIRST_COMPLETED)
        done = list(done)[:num_returns]
        return done, [r for r in refs if r not in done]

    def get(self, ref):
        return ref.result()

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)

    def shutdown(self) -> None:
        pass


def test_ray_executor_times_out_jobs_and_keeps_no_more_in_flight_than_fits(monkeypatch):
    import sys
    import threading

    from benchmark.spec.jobs import JobResult

    fake = _FakeRay(cpus=2)
    monkeypatch.setitem(sys.modules, "ray", fake)
    import benchmark.run.ray as ray_module

    release = threading.Event()

    def run_job(job, device, threads):
        if job.defense.id == "hangs":
            release.wait(30)
        if job.defense.id == "lost":
            raise RuntimeError("worker died")
        return JobResult(key=job.key, status="done", outcomes=[], k=1, wall_s=0.0)

    monkeypatch.setattr(ray_module, "_run_job", run_job)
    ids = ["a", "hangs", "b", "lost", "c", "d"]
    jobs = _clean_jobs("\n".join(f'[[defenses]]\nname = "undefended"\nid = "{i}"\n'
                                 for i in ids), limit=2)
    try:
        ex = ray_module.RayExecutor(num_cpus=1, job_timeout_s=1.0)
        results = {job.defense.id: r for job, r in ex.map(jobs)}
    finally:
        release.set()
        fake.pool.shutdown(wait=True)
    assert sorted(results) == sorted(ids)
    assert results["hangs"].error.startswith("timed out after 1 s")
    assert "ray task failed after 2 retries: RuntimeError: worker died" in results["lost"].error
    assert all(results[i].status == "done" for i in "abcd")
    assert len(fake.cancelled) == 1 and fake.most_in_flight == 2
