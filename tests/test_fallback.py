"""Evidence-driven fallbacks (issue 18, item 4): attacks with ``when = "masking"`` run only on
the defenses whose first-phase rows show masking, enter their worst case, resume, and verify."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main
from benchmark.report.evidence import collect_evidence
from benchmark.report.leaderboard import build_leaderboard, flag_frame
from benchmark.spec.plan import plan_suite
from benchmark.spec.stored import load_plan
from benchmark.spec.suite import SuiteError, parse_suite
from benchmark.store import Store
from tests.toys import single_thread

SUITE = """
[suite]
name = "fallbacks"
dataset = "digits"
subset = "test100-v1"
seed = 0
batch_size = 8
shard_size = 8
unconstrained_probe = 2
single_step_probe = 0

[[defenses]]
name = "undefended"
params = { model = "digits-cnn-at" }

[[defenses]]
id = "quantize"
name = "tests.masking_traps:Quantize"
params = { model = "digits-cnn-at" }

[[attacks]]
name = "pgd"
params = { steps = 10 }

[[attacks]]
name = "spsa"
params = { steps = 20, samples = 64, delta = 0.05, lr = 0.05 }
when = "masking"

[[attacks]]
id = "transfer"
name = "transfer"
params = { source = "digits-cnn", attack = "pgd", steps = 10 }
when = "masking"

[[threat_models]]
name = "linf"
eps = [0.2]
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fallback")
    (tmp / "suite.toml").write_text(SUITE)
    with single_thread():
        assert main(["run", "--suite", str(tmp / "suite.toml"), "--out", str(tmp / "run"),
                     "--limit", "8", "--progress", "plain"]) == 0
    return tmp


def _frame(run):
    plan = load_plan(run)
    with Store(run / "runs.sqlite") as store:
        frame = build_leaderboard(store, plan)
        frame["flags"] = flag_frame(frame, collect_evidence(store, plan))
    return frame, plan


def test_fallbacks_are_planned_aside():
    plan = plan_suite(parse_suite(SUITE, "fallbacks.toml"), limit=8)
    assert {j.attack_id for j in plan.jobs} == {"clean", "pgd"}
    assert sorted((j.defense.id, j.attack_id) for j in plan.fallback) == [
        ("quantize", "spsa"), ("quantize", "transfer"), ("undefended", "spsa"),
        ("undefended", "transfer")]
    with pytest.raises(SuiteError, match="when.*'masking'"):
        parse_suite(SUITE.replace('when = "masking"', 'when = "always"', 1), "bad.toml")


def test_fallbacks_run_where_masking_shows_and_enter_the_worst_case(ran, capfd):
    frame, plan = _frame(ran / "run")
    q = frame[frame.defense == "quantize"].set_index("attack")
    u = frame[frame.defense == "undefended"].set_index("attack")
    # the trap's zero gradients: PGD is stuck, and says so
    assert "bad_gradients" in q.loc["pgd", "flags"]
    assert {"spsa", "transfer"} <= set(q.index)  # its fallbacks ran ...
    assert not {"spsa", "transfer"} & set(u.index)  # ... and not on the honest classifier
    assert "bad_gradients" not in str(u.loc["pgd", "flags"])
    worst = q.loc["worst_case", "robust_acc"]
    assert worst <= min(q.loc[["pgd", "spsa", "transfer"], "robust_acc"])  # per-sample minimum
    assert worst < q.loc["pgd", "robust_acc"]  # the fallbacks broke what PGD could not
    # plan.json records them, so every later table and bundle sees the same plan
    record = json.loads((ran / "run" / "plan.json").read_text())
    assert len(record["jobs"]) == len(plan.jobs) and any(
        j.attack_id == "spsa" for j in plan.jobs)


def test_rerunning_resumes_the_fallbacks(ran, capsys):
    with single_thread():
        assert main(["run", "--suite", str(ran / "suite.toml"), "--out", str(ran / "run"),
                     "--limit", "8", "--progress", "plain"]) == 0
    err = capsys.readouterr().err
    assert "(0 run," in err and "fallback attacks spsa, transfer" in err


def test_a_bundle_with_fallbacks_verifies(ran, capsys):
    out = ran / "bundle.tar.gz"
    assert main(["submit", "--run", str(ran / "run"), "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["verify", str(out), "--suite", str(ran / "suite.toml"), "--trust-code"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "of them fallbacks run on masking evidence" in text
    assert "fallbacks: every defense that shows masking (quantize) has the trusted plan's" in text


def test_a_bundle_that_omits_owed_fallbacks_is_refused(ran, tmp_path, capsys):
    """A run whose harness skipped the fallbacks (an old genbench, or a submitter who dropped
    them to keep a higher worst case): its own table is consistent, but its outcomes show
    masking and the trusted plan owes fallback jobs on that defense, so verify refuses it."""
    import shutil
    import sqlite3

    from benchmark.report.tables import write_tables

    run = tmp_path / "run"
    shutil.copytree(ran / "run", run)
    with sqlite3.connect(run / "runs.sqlite") as db:
        keys = [k for (k,) in db.execute(
            "select key from jobs where attack in ('spsa', 'transfer')")]
        assert keys
        db.executemany("delete from samples where job = ?", [(k,) for k in keys])
        db.executemany("delete from jobs where key = ?", [(k,) for k in keys])
    record = json.loads((run / "plan.json").read_text())
    record["jobs"] = [k for k in record["jobs"] if k not in keys]
    (run / "plan.json").write_text(json.dumps(record))
    write_tables(run, load_plan(run))  # the run's own table, without the fallbacks
    out = tmp_path / "bundle.tar.gz"
    assert main(["submit", "--run", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["verify", str(out), "--suite", str(ran / "suite.toml"), "--trust-code"])
    text = capsys.readouterr().out
    assert rc != 0, text
    assert "fallbacks: defense 'quantize' shows masking (bad_gradients" in text
    assert "2 fallback jobs of the trusted plan on it are missing" in text
