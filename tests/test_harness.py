"""End-to-end tests of the harness: suites, resumption, error rows, executors, the CLI."""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.report.leaderboard import read_csv
from benchmark.report.tables import write_tables
from benchmark.run.harness import run_suite
from benchmark.spec.suite import load_suite, parse_suite

ROOT = Path(__file__).resolve().parent.parent

REQUIRED_COLUMNS = [
    "suite", "dataset", "subset_id", "defense", "attack", "threat_model", "eps", "n", "clean_acc",
    "robust_acc", "robust_ci_low", "robust_ci_high", "stochastic", "k_draws", "eot_draws",
    "steps", "restarts", "nfe_per_pred", "wall_s", "seed", "code_version", "plugin_versions",
    "flags",
]
#: columns that legitimately differ between two runs of the same suite
VOLATILE = ["wall_s", "code_version"]


def suite_text(defenses: str, *, attacks: str | None = None, eps: str = "[0.05, 0.1]",
               shard: int = 4, k: int = 3, extra_threats: str = "", probe: int = 0) -> str:
    """A small suite; the unconstrained and single-step probes are off unless ``probe``
    samples are asked for (the tests that count jobs count the suite's own)."""
    attacks = attacks or '[[attacks]]\nname = "pgd"\nparams = { steps = 5, restarts = 1 }\n'
    return f"""
[suite]
name = "t"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = {k}
batch_size = 50
shard_size = {shard}
unconstrained_probe = {probe}
single_step_probe = {probe}

{defenses}

{attacks}

[[threat_models]]
name = "linf"
eps = {eps}
{extra_threats}
"""


def write_suite(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def stable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=VOLATILE).reset_index(drop=True)


def test_quick_suite_end_to_end_with_limit(tmp_path, capsys):
    # 4 samples: the automatic probes use 4 either way, and RDC/DC's fixed-size probes and
    # diagnostics already make this the slowest test of the default run
    limit = 4
    out = tmp_path / "quick"
    assert main(["run", "--suite", "quick", "--out", str(out), "--limit", str(limit),
                 "--progress", "none"]) == 0
    full = frame = read_csv(out / "leaderboard.csv")
    assert list(frame.columns[: len(REQUIRED_COLUMNS)]) != []  # header present
    for col in REQUIRED_COLUMNS:
        assert col in frame.columns, col
    density = frame[frame.defense_kind == "density"]
    assert set(density.attack) == {"clean", "flow-pgd-in", "flow-pgd-ood"}
    assert density.threshold_logp.notna().all() and (density.n == limit).all()
    attacked = density[density.attack != "clean"]
    assert set(attacked.threat_model) == {"linf"} and set(attacked.eps) == {0.05, 0.1}
    # PGD lowers the flow's likelihood of test images and raises that of noise
    lower = attacked.direction == "lower"
    assert (attacked.nll_bpd_after > attacked.nll_bpd_before)[lower].all()
    assert (attacked.nll_bpd_after < attacked.nll_bpd_before)[~lower].all()
    frame = frame[frame.defense_kind == "classifier"]
    assert set(frame.threat_model) == {"linf", "l2", "stadv"}
    assert {"pgd", "autoattack", "stadv", "torchattacks-pgd", "worst_case"} <= set(frame.attack)
    ok = frame[frame.error.isna()]
    assert len(ok) == len(frame), frame[frame.error.notna()][["attack", "error"]]
    assert ((ok.robust_acc >= 0) & (ok.robust_acc <= ok.clean_acc)).all()
    assert (ok.n == limit).all()
    # the worst case is no better than any single attack on the same cell
    for _, cell in ok.groupby(["defense", "threat_model", "eps"]):
        worst = cell[cell.attack == "worst_case"].robust_acc.iloc[0]
        assert worst <= cell[cell.attack != "worst_case"].robust_acc.min() + 1e-12
    assert (out / "leaderboard.md").read_text().startswith("# genbench leaderboard")
    plan = (out / "plan.json").read_text()
    assert "torchattacks-pgd" in plan  # skipped under l2/stadv, with the reason
    assert (out / "suite.toml").read_text() == load_suite("quick").text
    # a second run resumes everything and recomputes nothing
    t0 = time.perf_counter()
    assert main(["run", "--suite", "quick", "--out", str(out), "--limit", str(limit),
                 "--progress", "none"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20
    again = read_csv(out / "leaderboard.csv")
    pd.testing.assert_frame_equal(stable(full), stable(again))


def _run_cli(args: list[str], **kw) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GENBENCH_PROGRESS="plain")
    return subprocess.Popen([sys.executable, "-m", "benchmark.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _job_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    defenses = ('[[defenses]]\nname = "tests.plugins:SlowDefense"\nid = "slow"\n'
                "params = { delay = 0.05 }\n")
    suite = write_suite(tmp_path, suite_text(defenses))
    args = ["run", "--suite", str(suite), "--limit", "16"]
    total = 4 + 2 * 4  # clean + 2 eps x 4 shards

    killed = tmp_path / "killed"
    proc = _run_cli([*args, "--out", str(killed)])
    deadline = time.time() + 120
    while _job_count(killed / "runs.sqlite") < 3 and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _job_count(killed / "runs.sqlite")
    assert 3 <= done_before < total
    with sqlite3.connect(killed / "runs.sqlite") as conn:
        stamps = dict(conn.execute("SELECT key, finished_at FROM jobs").fetchall())

    resumed = _run_cli([*args, "--out", str(killed)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming: {done_before} of {total}" in err

    clean = _run_cli([*args, "--out", str(tmp_path / "clean")])
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err

    a = read_csv(killed / "leaderboard.csv")
    b = read_csv(tmp_path / "clean" / "leaderboard.csv")
    pd.testing.assert_frame_equal(stable(a), stable(b))
    with sqlite3.connect(killed / "runs.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == total
        per_job = conn.execute("SELECT job, COUNT(*), COUNT(DISTINCT sample_id) FROM samples "
                               "GROUP BY job").fetchall()
        assert len(per_job) == total
        assert all(n == 4 and d == 4 for _, n, d in per_job)  # no sample counted twice
        after = dict(conn.execute("SELECT key, finished_at FROM jobs").fetchall())
    assert all(after[k] == v for k, v in stamps.items())  # finished jobs were not recomputed


def test_plugin_failures_become_error_rows_and_the_run_goes_on(tmp_path):
    defenses = "\n".join(
        f'[[defenses]]\nname = "tests.plugins:{cls}"\nid = "{ident}"\n'
        for cls, ident in [("WrongShapeDefense", "wrong-shape"), ("NaNDefense", "nan"),
                           ("RaisingDefense", "raises")]
    ) + '\n[[defenses]]\nname = "undefended"\n'
    suite = parse_suite(suite_text(defenses, eps="[0.1]"), "t.toml")
    summary = run_suite(suite, tmp_path / "out", limit=8, progress="none", log=lambda m: None)
    frame = read_csv(write_tables(summary.out, summary.plan).csv)
    rows = frame.set_index("defense")
    assert re.search(r"returned shape \(\d+, 3\), expected logits of shape \(\d+, 10\)",
                     rows.loc["wrong-shape", "error"])
    assert "Target 3 is out of bounds" not in rows.loc["wrong-shape", "error"]
    assert "non-finite logits" in rows.loc["nan", "error"]
    assert "always fails" in rows.loc["raises", "error"]
    assert (frame[frame.defense != "undefended"]["flags"].str.contains("attack_error")).all()
    good = frame[frame.defense == "undefended"]
    assert good.error.isna().all() and (good.n == 8).all()


def test_threat_violation_is_scored_not_robust(tmp_path):
    attacks = '[[attacks]]\nname = "tests.plugins:OverBudget"\nid = "cheat"\n'
    suite = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n', attacks=attacks,
                                   eps="[0.01]"), "t.toml")
    summary = run_suite(suite, tmp_path / "out", limit=8, progress="none", log=lambda m: None)
    row = read_csv(write_tables(summary.out, summary.plan).csv).query("attack == 'cheat'").iloc[0]
    assert row.n_errors == 8
    assert row.robust_acc == 0.0
    assert "threat_violation" in row["flags"]


def test_stochastic_defense_scored_with_k_draws_and_reproducible(tmp_path):
    defenses = '[[defenses]]\nname = "tests.plugins:NoisyDefense"\nid = "noisy"\n'
    suite = parse_suite(suite_text(defenses, eps="[0.1]", k=5), "t.toml")
    a = run_suite(suite, tmp_path / "a", limit=8, progress="none", log=lambda m: None)
    b = run_suite(suite, tmp_path / "b", limit=8, progress="none", log=lambda m: None)
    fa, fb = read_csv(write_tables(a.out, a.plan).csv), read_csv(write_tables(b.out, b.plan).csv)
    pd.testing.assert_frame_equal(stable(fa), stable(fb))  # same seed, same table
    assert fa.stochastic.all() and (fa.k_draws == 5).all()
    assert (fa.robust_acc_worst_of_k <= fa.robust_acc + 1e-12).all()
    assert (fa.nfe_per_pred == 5).all()


def test_process_executor_gives_the_same_leaderboard(tmp_path):
    suite = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n', shard=4), "t.toml")
    local = run_suite(suite, tmp_path / "local", limit=8, progress="none", log=lambda m: None)
    proc = run_suite(suite, tmp_path / "proc", limit=8, progress="none", executor="process",
                     workers=2, log=lambda m: None)
    pd.testing.assert_frame_equal(stable(read_csv(write_tables(local.out, local.plan).csv)),
                                  stable(read_csv(write_tables(proc.out, proc.plan).csv)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('name = "undefended"', 'name = "undefnded"'), "did you mean 'undefended'"),
        (('name = "pgd"', 'name = "pgdd"'), "did you mean 'pgd'"),
        (('name = "linf"', 'name = "lnif"'), "did you mean 'linf'"),
        (("eps = [0.05, 0.1]", "eps = [-0.05]"), "-0.05"),
        (("eps = [0.05, 0.1]", 'eps = ["big"]'), "'big'"),
        (("steps = 5", "steps = 0"), "steps"),
        (('subset = "test100-v1"', 'subset = "test10-v1"'), "test100-v1"),
        (("seed = 0", "seed = = 0"), "malformed TOML"),
    ],
)
def test_bad_input_is_one_clear_error_and_keeps_the_store(tmp_path, capsys, edit, message):
    good = suite_text('[[defenses]]\nname = "undefended"\n')
    out = tmp_path / "out"
    assert main(["run", "--suite", str(write_suite(tmp_path, good)), "--out", str(out),
                 "--limit", "4", "--progress", "none"]) == 0
    before = (out / "runs.sqlite").read_bytes()
    bad = write_suite(tmp_path, good.replace(*edit), "bad.toml")
    capsys.readouterr()
    code = main(["run", "--suite", str(bad), "--out", str(out), "--limit", "4",
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("genbench: error:") and message in err, err
    assert "Traceback" not in err
    assert (out / "runs.sqlite").read_bytes() == before  # nothing stored is lost


def test_leaderboard_command_and_list(tmp_path, capsys):
    suite = write_suite(tmp_path, suite_text('[[defenses]]\nname = "undefended"\n',
                                             eps=repr([8 / 255])))
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "r"), "--limit", "4",
                 "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--run", str(tmp_path / "r"), "--format", "csv"]) == 0
    csv_text = capsys.readouterr().out
    assert csv_text.startswith("suite,dataset,subset_id")
    # the same text as leaderboard.csv: 8/255 at full precision (not "%.6g"'s 0.0313725)
    assert csv_text == (tmp_path / "r" / "leaderboard.csv").read_text()
    assert set(read_csv(io.StringIO(csv_text)).eps) == {8 / 255}
    assert main(["leaderboard", "--run", str(tmp_path / "nowhere")]) == 2
    assert "not a genbench run folder" in capsys.readouterr().err
    for what, expected in [("defenses", "undefended"), ("attacks", "pgd"),
                           ("threat-models", "stadv"), ("suites", "quick")]:
        assert main(["list", what]) == 0
        names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
        assert expected in names


_ORPHAN_SCRIPT = """
import multiprocessing as mp, os, sys, time
sys.path.insert(0, {root!r})

def child(driver):
    from benchmark.run.executors import watch_parent
    watch_parent(driver, interval=0.1)
    time.sleep(60)

if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    with open(sys.argv[1], "w") as f:
        f.write(str(p.pid))
    os._exit(0)    # the driver dies at once, without cleaning up (as under SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc (Linux)")
def test_process_workers_exit_when_the_driver_dies(tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "driver.py"
    script.write_text(_ORPHAN_SCRIPT.format(root=str(Path(__file__).parents[1])))
    pid_file = tmp_path / "child.pid"
    subprocess.run([sys.executable, str(script), str(pid_file)], timeout=60, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    deadline = time.time() + 30  # the child imports torch before its watch starts
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the orphaned worker is still running"


def test_renamed_ids_resume_under_the_new_labels_and_twins_run_once(tmp_path):
    """Job keys hold no display label: renaming a suite, a defense or an attack resumes the
    stored jobs and relabels them; two entries that differ only by id are computed once and
    reported under both ids."""
    attacks = ('[[attacks]]\nname = "pgd"\nid = "pgd-a"\nparams = { steps = 2 }\n'
               '[[attacks]]\nname = "pgd"\nid = "pgd-b"\nparams = { steps = 2 }\n')
    text = suite_text('[[defenses]]\nname = "undefended"\nid = "cnn"\n', attacks=attacks,
                      eps="[0.1]")
    out = tmp_path / "out"
    first = run_suite(parse_suite(text, "a.toml"), out, limit=4, progress="none",
                      log=lambda m: None)
    assert first.total_jobs == 3 and first.ran == 2  # clean + one pgd job for both ids
    frame = read_csv(write_tables(first.out, first.plan).csv).set_index("attack")
    assert frame.loc["pgd-a", "robust_acc"] == frame.loc["pgd-b", "robust_acc"]
    assert frame.loc["pgd-a", "n"] == 4 and set(frame.defense) == {"cnn"}

    renamed = (text.replace('name = "t"', 'name = "renamed"')
               .replace('id = "cnn"', 'id = "the-cnn"').replace('id = "pgd-a"', 'id = "pgd-x"'))
    said: list[str] = []
    again = run_suite(parse_suite(renamed, "b.toml"), out, limit=4, progress="none",
                      log=said.append)
    assert again.ran == 0 and again.resumed == 3
    assert any("relabelled" in m for m in said), said
    table = read_csv(write_tables(again.out, again.plan).csv)
    assert set(table.defense) == {"the-cnn"} and set(table.suite) == {"renamed"}
    assert {"pgd-x", "pgd-b", "worst_case"} <= set(table.attack)
    before = frame.reset_index()
    for attack, old in (("pgd-x", "pgd-a"), ("pgd-b", "pgd-b")):
        assert table.set_index("attack").loc[attack, "robust_acc"] == \
            before.set_index("attack").loc[old, "robust_acc"]
    with sqlite3.connect(out / "runs.sqlite") as conn:
        assert {d for (d,) in conn.execute("SELECT defense FROM jobs")} == {"the-cnn"}
        assert conn.execute("SELECT value FROM meta WHERE key='job_key_version'").fetchone() \
            == ("2",)


def test_rows_report_their_jobs_code_versions_and_rerun_stale(tmp_path, monkeypatch):
    """A resumed run mixes jobs of two code versions: each row names the versions of its own
    jobs (flag mixed_code_versions); --rerun-stale recomputes the older jobs."""
    import benchmark.run.harness as harness

    suite = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n', eps="[0.1]"), "t.toml")
    out = tmp_path / "out"
    quiet = dict(limit=8, progress="none", log=lambda m: None)
    monkeypatch.setattr(harness, "code_version", lambda: "0.1.0+gold")
    first = run_suite(suite, out, **quiet)
    assert first.ran == 4  # clean and pgd on 2 shards of 4
    # newer code resumes the run after one job was lost
    pgd = [j.key for j in first.plan.jobs if j.attack is not None]
    with sqlite3.connect(out / "runs.sqlite") as conn:
        conn.execute("DELETE FROM samples WHERE job=?", (pgd[1],))
        conn.execute("DELETE FROM jobs WHERE key=?", (pgd[1],))
    monkeypatch.setattr(harness, "code_version", lambda: "0.1.0+gnew")
    second = run_suite(suite, out, **quiet)
    assert second.ran == 1
    frame = read_csv(write_tables(second.out, second.plan).csv).set_index("attack")
    assert frame.loc["pgd", "code_version"] == "0.1.0+gnew;0.1.0+gold"
    assert frame.loc["worst_case", "code_version"] == "0.1.0+gnew;0.1.0+gold"
    assert "mixed_code_versions" in frame.loc["pgd", "flags"].split(";")
    assert "0.1.0+gnew, 0.1.0+gold" in (out / "leaderboard.md").read_text()
    # --rerun-stale: the old jobs are recomputed, the rows are of one version again
    said: list[str] = []
    third = run_suite(suite, out, rerun_stale=True, **{**quiet, "log": said.append})
    assert third.ran == 3 and third.resumed == 1
    assert any("--rerun-stale: 3 stored jobs of code 0.1.0+gold" in m for m in said), said
    frame = read_csv(write_tables(third.out, third.plan).csv)
    assert set(frame.code_version) == {"0.1.0+gnew"}
    assert not frame["flags"].astype(str).str.contains("mixed_code_versions").any()
    assert run_suite(suite, out, rerun_stale=True, **quiet).ran == 0


def test_rerun_stale_is_a_cli_option():
    from benchmark.cli import build_parser

    args = build_parser().parse_args(["run", "--suite", "quick", "--rerun-stale"])
    assert args.rerun_stale is True
    assert build_parser().parse_args(["run", "--suite", "quick"]).rerun_stale is False


def _wait_for_holder(out: Path, pid: int, timeout: float = 120) -> dict:
    from benchmark.run.lock import read_holder

    deadline = time.time() + timeout
    while time.time() < deadline:
        info = read_holder(out)
        if info and info.get("pid") == pid:
            return info
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never took the lock of {out}")


def test_a_second_run_on_a_locked_folder_fails_at_once_and_fresh_waits_for_the_lock(tmp_path):
    import socket
    import threading

    from benchmark.run.lock import RunLockedError

    defenses = ('[[defenses]]\nname = "tests.plugins:SlowDefense"\nid = "slow"\n'
                "params = { delay = 0.1 }\n")
    suite = parse_suite(suite_text(defenses, eps="[0.1]"), "slow.toml")
    out = tmp_path / "out"
    quiet = dict(limit=16, progress="none", log=lambda m: None)
    result: dict = {}

    def first() -> None:
        try:
            result["summary"] = run_suite(suite, out, **quiet)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        info = _wait_for_holder(out, os.getpid())
        assert info["host"] == socket.gethostname() and info["started"]
        deadline = time.time() + 120
        while _job_count(out / "runs.sqlite") < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert thread.is_alive(), "the first run finished before the second could start"
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as err:
            run_suite(suite, out, **quiet)
        assert time.perf_counter() - t0 < 5  # at once, before planning anything
        message = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()} since {info['started']}" \
            in message and "in use by another genbench run" in message
        # --fresh takes the lock before it moves the store: the live writer keeps its store
        with pytest.raises(RunLockedError):
            run_suite(suite, out, fresh=True, **quiet)
        assert (out / "runs.sqlite").exists() and not list(out.glob("*.bak"))
        assert thread.is_alive()
    finally:
        thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert result["summary"].ran == 8  # 4 shards x (clean, pgd), each computed once
    again = run_suite(suite, out, **quiet)  # released on exit: the next run takes it
    assert again.ran == 0 and again.resumed == 8


def test_a_second_cli_run_names_the_holder_and_a_dead_holders_lock_is_stale(tmp_path):
    from benchmark.run.lock import run_lock

    suite = write_suite(tmp_path, suite_text('[[defenses]]\nname = "undefended"\n',
                                             eps="[0.1]"))
    out = tmp_path / "out"
    args = ["run", "--suite", str(suite), "--out", str(out), "--limit", "4"]
    with run_lock(out):  # this process holds it
        proc = _run_cli(args)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.startswith("genbench: error: run folder") and f"pid {os.getpid()}" in err, err
    assert "Traceback" not in err and not (out / "runs.sqlite").exists()
    # a holder that dies (SIGKILL: no clean-up at all) leaves a stale lock the next run takes
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom benchmark.run.lock import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(600)\n"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert _wait_for_holder(out, holder.pid)["pid"] == holder.pid
        assert main(args + ["--progress", "none"]) == 2  # alive: refused
    finally:
        holder.kill()
        holder.wait()
    assert main(args + ["--progress", "none"]) == 0
    assert (out / "leaderboard.csv").exists()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    bad = parse_suite(suite_text('[[defenses]]\nname = "undefended"\n',
                                 attacks='[[attacks]]\nname = "pgd"\nparams = { steps = 0 }\n'),
                      "bad.toml")
    with pytest.raises(ValueError, match="steps"):
        run_suite(bad, tmp_path / "new", limit=4, progress="none", log=lambda m: None)
    assert not (tmp_path / "new").exists()

# -- exit codes, status, flags, partial tables, plans read back (tests/test_executors.py has the
# -- executors themselves) ----------------------------------------------------------------------

def _only_undefended_pgd(db: Path) -> None:
    """Forget the undefended / pgd job, as if the run had been killed before it."""
    with sqlite3.connect(db) as conn:
        (key,) = conn.execute("SELECT key FROM jobs WHERE defense = 'undefended' AND "
                              "attack = 'pgd'").fetchone()
        conn.execute("DELETE FROM samples WHERE job = ?", (key,))
        conn.execute("DELETE FROM jobs WHERE key = ?", (key,))


def test_run_exits_1_on_errored_jobs_and_status_and_partial_tables_say_where_it_stands(
        tmp_path, capsys, monkeypatch):
    import json

    from benchmark.plugins.cache import DefenseCache
    from benchmark.spec.stored import load_plan, plan_record

    defenses = ('[[defenses]]\nname = "tests.plugins:RaisingDefense"\nid = "raises"\n\n'
                '[[defenses]]\nname = "undefended"\n')
    text = suite_text(defenses, eps="[0.1]").replace("shard_size = 4",
                                                     "shard_size = 4\njob_timeout_s = 600")
    out = tmp_path / "r"
    code = main(["run", "--suite", str(write_suite(tmp_path, text)), "--out", str(out),
                 "--limit", "4", "--workers", "2", "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "2 of 4 jobs errored" in captured.err and "--retry-errors" in captured.err
    assert "--workers is ignored by --executor local" in captured.err
    assert "job_timeout_s = 600 is not enforced by --executor local" in captured.err
    assert (out / "leaderboard.csv").exists() and "| undefended" in captured.out

    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "done     undefended / clean [shard 0]" in lines
    assert any(line.startswith("error    raises / pgd linf eps=0.1 [shard 0]: RuntimeError: "
                               "this plug-in always fails") for line in lines), lines
    assert lines[-1] == "t: 4 jobs: 2 done, 0 pending, 2 errored"

    # plan.json with the plan's kinds, attack info and job specs (what the harness records):
    # leaderboard, status and publish then build no defense at all
    plan = load_plan(out)
    record = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps({**record, **plan_record(plan)}))

    def no_build(*args, **kw):
        raise AssertionError("a defense was built")

    monkeypatch.setattr(DefenseCache, "get", no_build)
    again = load_plan(out)
    assert [j.key for j in again.jobs] == [j.key for j in plan.jobs]
    assert (again.kinds, again.attack_info, again.skipped) == (plan.kinds, plan.attack_info,
                                                               plan.skipped)
    assert again.sample_ids == plan.sample_ids and again.suite == plan.suite

    _only_undefended_pgd(out / "runs.sqlite")
    assert main(["status", str(out), "--only", "pending"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["pending  undefended / pgd linf eps=0.1 [shard 0]",
                     "t: 4 jobs: 1 done, 1 pending, 2 errored"]
    assert main(["leaderboard", "--run", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# genbench leaderboard")
    assert "**partial: 1 of 4 jobs done** (1 pending, 2 errored)" in md.split("\n## ")[0]
    tables = write_tables(out, again)
    assert "partial: 1 of 4 jobs done" in tables.md.read_text()
    assert main(["publish", "--run", str(out), "--dest", str(tmp_path / "lb")]) == 0
    assert "partial: 1 of 4 jobs done" in (tmp_path / "lb" / "t" / "README.md").read_text()


def test_run_refuses_a_device_it_cannot_use(tmp_path, capsys):
    import torch

    suite = str(write_suite(tmp_path, suite_text('[[defenses]]\nname = "undefended"\n')))
    args = ["run", "--suite", suite, "--out", str(tmp_path / "r"), "--progress", "none"]
    assert main([*args, "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert main([*args, "--device", "cuda:1", "--executor", "process"]) == 2
    assert "--device cuda:1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_list_flags_prints_each_flag_with_its_meaning(capsys):
    from benchmark.report.flags import FLAG_HELP

    assert main(["list", "flags"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name}\t{meaning}" for name, meaning in FLAG_HELP.items()]
    assert any(line.startswith("worst_case_incomplete\t") for line in lines)


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    import random

    defenses = ('[[defenses]]\nname = "tests.plugins:SlowDefense"\nid = "slow"\n'
                "params = { delay = 0.1 }\n\n"
                '[[defenses]]\nname = "tests.plugins:SlowNoisyDefense"\nid = "noisy"\n'
                "params = { delay = 0.1 }\n")
    suite = write_suite(tmp_path, suite_text(defenses, eps="[0.1]", k=3))
    args = ["run", "--suite", str(suite), "--limit", "12"]
    total = 2 * (3 + 3)  # 2 defenses x (clean + pgd) x 3 shards
    seed = int(os.environ.get("GENBENCH_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)  # a failure names its seed: GENBENCH_KILL_SEED reproduces it
    # at least 3 jobs (about a second of work) are left after each point
    points = sorted(rng.sample(range(1, total - 2), 3))
    killed = tmp_path / "killed"
    db = killed / "runs.sqlite"
    for i, point in enumerate(points):
        # the second run uses the process executor: its workers must not outlive the driver
        extra = ["--executor", "process", "--workers", "2"] if i == 1 else []
        proc = _run_cli([*args, *extra, "--out", str(killed)])
        target = max(point, _job_count(db) + 1)
        deadline = time.time() + 180
        while _job_count(db) < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.1))  # somewhere inside the next job
        assert proc.poll() is None, (f"seed {seed}, points {points}: run finished before it "
                                     "could be killed: " + proc.stderr.read())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _job_count(db) < total, f"seed {seed}, points {points}"
    resumed = _run_cli([*args, "--out", str(killed)])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resuming:" in err

    clean = _run_cli([*args, "--out", str(tmp_path / "clean")])
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err
    a = read_csv(killed / "leaderboard.csv")
    b = read_csv(tmp_path / "clean" / "leaderboard.csv")
    pd.testing.assert_frame_equal(stable(a), stable(b), obj=f"seed {seed}, points {points}")
    with sqlite3.connect(db) as conn:
        per_job = conn.execute("SELECT job, COUNT(*), COUNT(DISTINCT sample_id) FROM samples "
                               "GROUP BY job").fetchall()
    assert len(per_job) == total and all(n == 4 and d == 4 for _, n, d in per_job)
