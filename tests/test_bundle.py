"""Submission bundles: `genbench submit` round-trips through `genbench verify`, and tampered,
forged or path-escaping bundles are REJECTED with a one-line reason, naming the file.

The forged bundles are made the way a forger would: from a real tiny run, by editing the bundle's
files (and fixing the manifest's hashes, which are the submitter's own), or by editing the run's
store and submitting again."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from benchmark.cli import main
from benchmark.report.leaderboard import read_csv, write_csv
from benchmark.verify.bundle import BundleError, safe_extract
from tests.test_harness import suite_text

EPS_A, EPS_B = 8 / 255, 26 / 255  # "%.6g" wrote them as 0.0313725 and 0.101961
NOISY = "tests.plugins:NoisyDefense"
RICH = f"""
[suite]
name = "t"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 3
batch_size = 50
shard_size = 4

[[defenses]]
name = "undefended"

[[defenses]]
id = "noisy"
name = "{NOISY}"
params = {{ sigma = 0.3 }}

[[attacks]]
name = "pgd"
params = {{ steps = 5, restarts = 1 }}

[[attacks]]
id = "pgd-1"
name = "pgd"
params = {{ steps = 1, restarts = 1 }}

[[attacks]]
name = "fixed-noise"
params = {{ steps = 10 }}
defenses = ["noisy"]

[[threat_models]]
name = "linf"
eps = [{EPS_A!r}, {EPS_B!r}]
"""


def _make(tmp: Path, text: str) -> Path:
    suite = tmp / "suite.toml"
    suite.write_text(text)
    run = tmp / "run"
    assert main(["run", "--suite", str(suite), "--out", str(run), "--limit", "8",
                 "--progress", "none"]) == 0
    out = tmp / "bundle.tar.gz"
    assert main(["submit", "--run", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """undefended, PGD at l-inf 0.1, 8 samples in shards of 4 (suite.toml and run/ beside it)."""
    return _make(tmp_path_factory.mktemp("bundle"),
                 suite_text('[[defenses]]\nname = "undefended"\n', eps="[0.1]"))


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> Path:
    """undefended and a stochastic defense (K = 3, code outside the registry), PGD, a weaker
    PGD and the fixed-noise diagnostic (stochastic defense only), at 8/255 and 26/255."""
    return _make(tmp_path_factory.mktemp("rich"), RICH)


def _suite(bundle: Path) -> str:
    return str(bundle.parent / "suite.toml")


def verify(capsys, bundle: Path, trusted: Path, *extra: str) -> tuple[int, str]:
    """``genbench verify`` with the suite ``trusted`` was made from; (exit code, output)."""
    capsys.readouterr()
    rc = main(["verify", str(bundle), "--suite", _suite(trusted), *extra])
    return rc, capsys.readouterr().out


def verdict(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("bundle ")]
    assert len(lines) == 1, out
    return lines[0]


def rejected(rc: int, out: str, reason: str) -> str:
    """Assert a REJECTED verdict on one line that gives ``reason``; the verdict line."""
    line = verdict(out)
    assert rc == 1, out
    assert " REJECTED: " in line and reason in line, out
    return line


def _unpack(bundle: Path, dest: Path) -> Path:
    safe_extract(bundle, dest)
    return dest


def _repack(root: Path, out: Path, extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(root)))
        for info in extra:
            data = b"x" * info.size
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def _rehash(root: Path) -> None:
    """A forger's manifest: the sha256 of every file now in the bundle."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _forge(bundle: Path, tmp: Path, edit: Callable[[Path], None], name: str = "bad") -> Path:
    """Unpack ``bundle``, let ``edit`` change its files, fix the manifest, pack it again."""
    root = _unpack(bundle, tmp / f"{name}-files")
    edit(root)
    _rehash(root)
    return _repack(root, tmp / f"{name}.tar.gz")


def _resubmit(bundle: Path, tmp: Path, sql: str) -> Path:
    """A forger who edits the run's store (``sql``), rebuilds its leaderboard and submits
    again: every file of the bundle is then consistent with the forged outcomes."""
    from benchmark.report.tables import write_tables
    from benchmark.verify.bundle import _load_run

    run = tmp / "forged-run"
    shutil.copytree(bundle.parent / "run", run)
    with sqlite3.connect(run / "runs.sqlite") as conn:
        conn.executescript(sql)
    write_tables(run, _load_run(run)[1])
    out = tmp / "forged.tar.gz"
    assert main(["submit", "--run", str(run), "--out", str(out)]) == 0
    return out


def test_bundle_contents_and_round_trip(bundle, tmp_path, capsys):
    rc, out = verify(capsys, bundle, bundle)
    assert rc == 0, out
    assert "PASS  manifest" in out and "every sha256 matches" in out
    assert "PASS  plan: the 4 jobs of the trusted plan" in out
    assert "PASS  threat models: 8 adversarial examples re-checked" in out
    assert "PASS  per-sample outcomes: 16 deterministic scores" in out and "0 near-ties" in out
    assert "PASS  leaderboard.csv: 2 rows, one for each row the trusted plan produces" in out
    assert "PASS  undefended / pgd linf eps=0.1: re-scored" in out
    assert "PASS  undefended / worst_case linf eps=0.1" in out
    assert "FAIL" not in out and "verified" in verdict(out)
    root = _unpack(bundle, tmp_path / "x")
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert {"suite.toml", "plan.json", "leaderboard.csv", "outcomes.csv", "jobs.json",
            "environment.json", "manifest.json"} <= names
    advs = sorted(n for n in names if n.startswith("adv/"))
    assert len(advs) == 2  # one per attack job (two shards of 4)
    t = load_file(str(root / advs[0]))
    assert t["x_adv"].dtype == np.float32 and t["x_adv"].shape == (4, 1, 16, 16)
    assert t["sample_ids"].shape == (4,)
    env = json.loads((root / "environment.json").read_text())
    assert {"python", "torch", "platform", "packages"} <= set(env)
    assert "genbench" in env["packages"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["plugin_versions"] == [f"genbench=={env['packages']['genbench']}"]


def test_tampered_file_is_refused_naming_it(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    csv = root / "leaderboard.csv"
    csv.write_text(csv.read_text().replace(",0,", ",1,", 1))
    bad = _repack(root, tmp_path / "bad.tar.gz")
    rejected(*verify(capsys, bad, bundle), "leaderboard.csv: sha256 mismatch")


@pytest.mark.parametrize("name, kind, words", [
    ("../escape.txt", tarfile.REGTYPE, "path escapes the bundle folder"),
    ("adv/../../escape.txt", tarfile.REGTYPE, "path escapes the bundle folder"),
    ("/tmp/absolute.txt", tarfile.REGTYPE, "absolute path"),
    ("link.txt", tarfile.SYMTYPE, "links are not allowed"),
    ("hard.txt", tarfile.LNKTYPE, "links are not allowed"),
])
def test_escaping_member_is_refused_naming_it(bundle, tmp_path, capsys, name, kind, words):
    root = _unpack(bundle, tmp_path / "x")
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.REGTYPE:
        info.size = 4
    else:
        info.linkname = "/etc/passwd"
    bad = _repack(root, tmp_path / "bad.tar.gz", [info])
    with pytest.raises(BundleError, match=words):
        safe_extract(bad, tmp_path / "y")
    assert not (tmp_path / "escape.txt").exists()
    rejected(*verify(capsys, bad, bundle), f"refused member {name!r}")


def test_adversarial_example_outside_the_threat_model_is_caught(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    path = sorted((root / "adv").iterdir())[0]
    t = load_file(str(path))
    x = t["x_adv"].copy()
    x[1] = np.clip(x[1] + 0.5, 0, 1)  # far outside linf eps = 0.1
    save_file({"x_adv": x, "sample_ids": t["sample_ids"]}, str(path))
    _rehash(root)  # a forger fixes the manifest: the threat-model re-check must still catch it
    bad = _repack(root, tmp_path / "bad.tar.gz")
    rc, out = verify(capsys, bad, bundle, "--no-rescore")
    rejected(rc, out, "breaks the threat model")
    sid = int(t["sample_ids"][1])
    assert f"adv/{path.name}: sample {sid} of undefended / pgd linf eps=0.1" in out
    assert "breaks the threat model (linf distance" in out


def test_unlisted_extra_file_is_refused(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    (root / "extra.py").write_text("print('hi')\n")
    bad = _repack(root, tmp_path / "bad.tar.gz")
    rejected(*verify(capsys, bad, bundle), "extra.py: file not listed in the manifest")


def test_submit_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["submit", "--run", str(tmp_path), "--out", str(tmp_path / "b.tar.gz")]) == 2
    assert "runs.sqlite is missing" in capsys.readouterr().err


def test_inflated_claim_is_caught_by_rescoring(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    frame = read_csv(root / "leaderboard.csv")
    pgd = frame.attack == "pgd"
    for col in ("robust_acc", "robust_ci_low", "robust_ci_high"):
        frame[col] = frame[col].astype(float)
    frame.loc[pgd, ["robust_acc", "robust_ci_low", "robust_ci_high"]] = [0.75, 0.6, 0.9]
    write_csv(frame, root / "leaderboard.csv")
    _rehash(root)  # consistent hashes: only re-scoring the examples can catch the claim
    bad = _repack(root, tmp_path / "bad.tar.gz")
    rc, out = verify(capsys, bad, bundle)
    rejected(rc, out, "undefended / pgd linf eps=0.1: re-scored robust accuracy 0.0000")
    assert "FAIL  undefended / pgd linf eps=0.1: re-scored robust accuracy 0.0000" in out


def test_verify_can_rebuild_the_defense_from_another_reference(bundle, capsys):
    rc, out = verify(capsys, bundle, bundle, "--defense",
                     "undefended=defenses.baseline:Undefended")
    assert rc == 0, out
    assert "PASS  undefended / pgd linf eps=0.1: re-scored" in out


# -- code named by a bundle never runs --------------------------------------------------------

def _canonical_key(spec: dict) -> str:
    from benchmark.spec.suite import canonical_json

    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def _rename_defense(root: Path, name: str, params: dict) -> None:
    """A forger's bundle whose defense is ``name`` (a ``module:attr``) built with ``params``:
    every job spec, key, outcome row, adversarial file, the plan and the suite consistent."""
    jobs = json.loads((root / "jobs.json").read_text())
    renames = {}
    for job in jobs:
        job["spec"]["defense"]["name"] = name
        job["spec"]["defense"]["params"] = params
        job["spec"]["defense_params"] = params
        renames[job["key"]] = job["key"] = _canonical_key(job["spec"])
    (root / "jobs.json").write_text(json.dumps(jobs))
    for path in [root / "outcomes.csv", root / "plan.json"]:
        text = path.read_text()
        for old, new in renames.items():
            text = text.replace(old, new)
        path.write_text(text)
    for old, new in renames.items():
        if (root / "adv" / f"{old}.safetensors").exists():
            (root / "adv" / f"{old}.safetensors").rename(root / "adv" / f"{new}.safetensors")
    text = (root / "suite.toml").read_text()
    (root / "suite.toml").write_text(text.replace('name = "undefended"',
                                                  f'id = "undefended"\nname = "{name}"'))


@pytest.mark.parametrize("name, params", [
    ("subprocess:run", {"args": "touch {marker}", "shell": True}),
    ("os:system", {"command": "touch {marker}"}),
    ("tests.code_marker:Boom", {}),
])
def test_bundle_naming_code_is_rejected_and_the_code_never_runs(
        bundle, tmp_path, capsys, monkeypatch, name, params):
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("GENBENCH_MARKER", str(marker))
    monkeypatch.delitem(sys.modules, "tests.code_marker", raising=False)
    params = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in params.items()}
    bad = _forge(bundle, tmp_path, lambda root: _rename_defense(root, name, params))
    # the plan is rebuilt from the trusted suite: the forged jobs are not in it
    rc, out = verify(capsys, bad, bundle)
    rejected(rc, out, "plan: 4 jobs of the bundle are not in the trusted plan")
    assert f"(first: defense 'undefended' = {name!r} / attack" in verdict(out)
    assert "FAIL  plan: 4 of the 4 jobs of the trusted plan" in out
    # a reviewer who trusts the bundle's own suite still runs nothing: names resolve to
    # registered plug-ins only
    own = _unpack(bad, tmp_path / "own")
    capsys.readouterr()
    rc = main(["verify", str(bad), "--suite", str(own / "suite.toml")])
    rejected(rc, capsys.readouterr().out, f"defense {name!r} is not a registered name")
    assert not marker.exists()
    assert "tests.code_marker" not in sys.modules


def test_registries_refuse_unnamed_code_inside_registered_only(monkeypatch, tmp_path):
    from benchmark.plugins.builtin import DEFENSES
    from benchmark.plugins.registry import UntrustedCodeError, registered_only

    monkeypatch.setenv("GENBENCH_MARKER", str(tmp_path / "MARKER"))
    monkeypatch.delitem(sys.modules, "tests.code_marker", raising=False)
    with registered_only():
        assert DEFENSES.get("undefended").__name__ == "Undefended"  # registered: fine
        with pytest.raises(UntrustedCodeError, match="not a registered name"):
            DEFENSES.get("tests.code_marker:Boom")
    assert not (tmp_path / "MARKER").exists()
    with registered_only(allow={"tests.plugins:NoisyDefense"}):
        assert DEFENSES.get("tests.plugins:NoisyDefense").__name__ == "NoisyDefense"
    assert DEFENSES.get("os:path")  # outside the block, direct references resolve as before
    with registered_only(), pytest.raises(UntrustedCodeError):
        DEFENSES.get("os:path")  # resolved (and cached) before: still refused inside


def test_code_outside_the_registry_runs_only_when_the_reviewer_names_it(rich, capsys):
    rc, out = verify(capsys, rich, rich)
    rejected(rc, out, f"defense {NOISY!r} is not a registered name")
    rc, out = verify(capsys, rich, rich, "--trust-code")
    assert rc == 0, out
    rc, out = verify(capsys, rich, rich, "--defense", f"noisy={NOISY}", "--defense",
                     "undefended")
    assert rc == 0, out
    assert "verified" in verdict(out)


def test_a_suite_that_is_not_shipped_needs_a_trusted_copy(bundle, capsys):
    capsys.readouterr()
    rc = main(["verify", str(bundle)])
    rejected(rc, capsys.readouterr().out, "the bundle's suite 't' is not a shipped suite")


def test_a_bundle_naming_a_shipped_suite_is_checked_against_it(bundle, tmp_path, capsys):
    def rename(root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["suite"] = "quick"
        (root / "manifest.json").write_text(json.dumps(manifest))

    bad = _forge(bundle, tmp_path, rename)
    capsys.readouterr()
    rc = main(["verify", str(bad)])
    out = capsys.readouterr().out
    rejected(rc, out, "plan: 4 jobs of the bundle are not in the trusted plan (shipped suite "
                      "'quick', limit 8)")
    assert "FAIL  plan: 75 of the 75 jobs of the trusted plan" in out


# -- correctness: every claimed row has jobs behind it, and every row is claimed -------------

def test_genuine_stochastic_bundle_verifies(rich, capsys):
    """Fixed-noise rows are re-scored with their pinned draw (sample by sample), the worst case
    leaves the diagnostic out as the leaderboard does, and epsilons such as 8/255 match."""
    rc, out = verify(capsys, rich, rich, "--trust-code")
    assert rc == 0, out
    # 8 of them probes: 4 unconstrained, 4 single-step
    assert "PASS  plan: the 32 jobs of the trusted plan" in out
    # undefended's 8 clean + 32 attacked + 8 unconstrained-probe + 8 single-step-probe samples,
    # the 16 of fixed-noise on the noisy defense
    assert "PASS  per-sample outcomes: 72 deterministic scores" in out, out
    assert "PASS  draws: noisy / clean: " in out and "PASS  draws: noisy / pgd linf" in out
    assert "draws: noisy / fixed-noise" not in out  # pinned: compared sample by sample
    assert "PASS  noisy / fixed-noise linf eps=0.101961: claimed" in out
    assert "PASS  noisy / worst_case linf eps=0.0313725: claimed" in out
    frame = read_csv(rich.parent / "run" / "leaderboard.csv")
    cell = frame[(frame.defense == "noisy") & (frame.eps == EPS_B)].set_index("attack")
    # the diagnostic is stronger than any attack: counting it would change the worst case
    assert cell.loc["fixed-noise", "robust_acc"] < cell.loc["worst_case", "robust_acc"]
    assert cell.loc["worst_case", "robust_acc"] == min(cell.loc["pgd", "robust_acc"],
                                                       cell.loc["pgd-1", "robust_acc"])
    assert frame["eps"].isin([EPS_A, EPS_B]).all()  # written in full


def test_fabricated_row_is_rejected(bundle, tmp_path, capsys):
    def add_row(root: Path) -> None:
        frame = read_csv(root / "leaderboard.csv")
        row = frame[frame.attack == "pgd"].copy()
        row["attack"] = "autoattack"
        row[["robust_acc", "robust_ci_low", "robust_ci_high"]] = [0.0, 0.0, 0.3244]
        write_csv(__import__("pandas").concat([frame, row]), root / "leaderboard.csv")

    bad = _forge(bundle, tmp_path, add_row)
    rejected(*verify(capsys, bad, bundle),
             "the row undefended / autoattack linf eps=0.1 has no jobs behind it")


def test_dropped_attack_is_rejected(rich, tmp_path, capsys):
    """The strongest attack's jobs, examples, outcomes and rows removed, suite and plan edited
    to match: the trusted plan still has them."""
    def drop(root: Path) -> None:
        jobs = json.loads((root / "jobs.json").read_text())
        gone = {j["key"] for j in jobs if j["attack"] == "pgd"}
        (root / "jobs.json").write_text(json.dumps([j for j in jobs if j["key"] not in gone]))
        plan = json.loads((root / "plan.json").read_text())
        plan["jobs"] = [k for k in plan["jobs"] if k not in gone]
        (root / "plan.json").write_text(json.dumps(plan))
        lines = (root / "outcomes.csv").read_text().splitlines(keepends=True)
        (root / "outcomes.csv").write_text("".join(
            line for line in lines if line.split(",")[0] not in gone))
        for key in gone:
            (root / "adv" / f"{key}.safetensors").unlink()
        frame = read_csv(root / "leaderboard.csv")
        write_csv(frame[frame.attack != "pgd"], root / "leaderboard.csv")

    bad = _forge(rich, tmp_path, drop)
    rejected(*verify(capsys, bad, rich, "--trust-code"),
             "plan: 10 of the 32 jobs of the trusted plan")  # 8 + their 2 probes


def test_dropped_row_is_rejected(bundle, tmp_path, capsys):
    def drop(root: Path) -> None:
        frame = read_csv(root / "leaderboard.csv")
        write_csv(frame[frame.attack != "pgd"], root / "leaderboard.csv")

    bad = _forge(bundle, tmp_path, drop)
    rejected(*verify(capsys, bad, bundle),
             "no row for undefended / pgd linf eps=0.1, which the trusted plan's jobs produce")


def _as_published(root: Path) -> None:
    """The leaderboard as published CSVs were written: every number with "%.6g"."""
    frame = read_csv(root / "leaderboard.csv")
    frame.to_csv(root / "leaderboard.csv", index=False, float_format="%.6g")


def test_rounded_epsilons_still_match_and_an_inflated_claim_fails(rich, tmp_path, capsys):
    ok = _forge(rich, tmp_path, _as_published, "published")
    assert "0.101961," in (tmp_path / "published-files" / "leaderboard.csv").read_text()
    rc, out = verify(capsys, ok, rich, "--trust-code")
    assert rc == 0, out

    def inflate(root: Path) -> None:  # the claim the old verifier skipped: 88% for 0%
        _as_published(root)
        frame = read_csv(root / "leaderboard.csv")
        row = (frame.defense == "undefended") & (frame.attack == "pgd") & (frame.eps > 0.1)
        frame.loc[row, ["robust_acc", "robust_ci_low", "robust_ci_high"]] = [
            0.875, 0.529088, 0.977646]
        frame.to_csv(root / "leaderboard.csv", index=False, float_format="%.6g")

    bad = _forge(rich, tmp_path, inflate)
    rejected(*verify(capsys, bad, rich, "--trust-code"),
             "undefended / pgd linf eps=0.101961: re-scored robust accuracy 0.0000, claimed "
             "0.8750")


def test_a_changed_epsilon_matches_no_job(rich, tmp_path, capsys):
    def move(root: Path) -> None:
        frame = read_csv(root / "leaderboard.csv")
        frame.loc[frame.eps == EPS_A, "eps"] = 0.031  # not a rounding of 8/255
        write_csv(frame, root / "leaderboard.csv")

    bad = _forge(rich, tmp_path, move)
    rc, out = verify(capsys, bad, rich, "--trust-code")
    rejected(rc, out, "linf eps=0.031 has no jobs behind it")
    assert "FAIL  leaderboard.csv: no row for noisy / pgd linf eps=0.0313725" in out


def test_clean_accuracy_is_checked(bundle, tmp_path, capsys):
    def lower(root: Path) -> None:
        frame = read_csv(root / "leaderboard.csv")
        frame["clean_acc"] = 0.875
        write_csv(frame, root / "leaderboard.csv")

    bad = _forge(bundle, tmp_path, lower)
    rejected(*verify(capsys, bad, bundle),
             "re-scored clean accuracy 1.0000, claimed 0.8750")


def test_claimed_interval_must_be_the_one_the_outcomes_give(rich, tmp_path, capsys):
    """A stochastic row is not compared exactly: an interval widened to [0, 1] would hold any
    re-scored number, so the row must follow from outcomes.csv."""
    def widen(root: Path) -> None:
        frame = read_csv(root / "leaderboard.csv")
        row = (frame.defense == "noisy") & (frame.attack == "pgd") & (frame.eps == EPS_B)
        frame.loc[row, ["robust_acc", "robust_ci_low", "robust_ci_high"]] = [1.0, 0.0, 1.0]
        write_csv(frame, root / "leaderboard.csv")

    bad = _forge(rich, tmp_path, widen)
    rejected(*verify(capsys, bad, rich, "--trust-code"),
             "noisy / pgd linf eps=0.101961: the row does not follow from outcomes.csv")


def test_stochasticity_and_k_come_from_the_rebuilt_defense(bundle, tmp_path, capsys):
    """jobs.json and the rows say undefended is stochastic with K = 3 (so that its numbers
    would only be held to an interval); the rebuilt defense is deterministic."""
    def claim_stochastic(root: Path) -> None:
        jobs = json.loads((root / "jobs.json").read_text())
        for job in jobs:
            job["stochastic"], job["k"] = True, 3
        (root / "jobs.json").write_text(json.dumps(jobs))
        frame = read_csv(root / "leaderboard.csv")
        frame["stochastic"], frame["k_draws"] = True, 3
        write_csv(frame, root / "leaderboard.csv")

    bad = _forge(bundle, tmp_path, claim_stochastic)
    rejected(*verify(capsys, bad, bundle),
             "jobs.json: defense undefended claims stochastic=True, K=3; the rebuilt defense "
             "is deterministic (K=1)")


def test_forged_deterministic_outcomes_are_caught_sample_by_sample(bundle, tmp_path, capsys):
    bad = _resubmit(bundle, tmp_path, "UPDATE samples SET correct = 1 WHERE job IN "
                                      "(SELECT key FROM jobs WHERE attack = 'pgd');")
    rejected(*verify(capsys, bad, bundle),
             "outcomes.csv: 4 of 4 samples of undefended / pgd linf eps=0.1 [shard 0] re-score "
             "differently")


def test_forged_stochastic_draws_are_caught(rich, tmp_path, capsys):
    """Every draw of the stochastic defense under PGD at 26/255 recorded as correct, and the
    leaderboard rebuilt from that: consistent files, but not the defense's draws."""
    bad = _resubmit(rich, tmp_path, "UPDATE samples SET correct = 3 WHERE job IN (SELECT key "
                                    "FROM jobs WHERE defense = 'noisy' AND attack = 'pgd' "
                                    "AND eps > 0.1);")
    rejected(*verify(capsys, bad, rich, "--trust-code"),
             "draws: noisy / pgd linf eps=0.101961: 24 recorded and")


def test_fixed_noise_is_rescored_with_its_pinned_draw(rich, tmp_path, capsys):
    """Scored with fresh draws, a pinned-noise row could only be held to an interval; with its
    pinned draw it is reproduced sample by sample, so a forged outcome is caught."""
    bad = _resubmit(rich, tmp_path, "UPDATE samples SET correct = 3 WHERE job IN (SELECT key "
                                    "FROM jobs WHERE attack = 'fixed-noise' AND eps > 0.1);")
    rejected(*verify(capsys, bad, rich, "--trust-code"),
             "samples of noisy / fixed-noise linf eps=0.101961 [shard 0] re-score differently")


def test_an_errored_attack_is_rejected_unless_allowed(bundle, tmp_path, capsys):
    """Marking the strongest attack as errored drops it from the worst case."""
    bad = _resubmit(bundle, tmp_path, """
        UPDATE jobs SET status = 'error', error = 'RuntimeError: out of memory'
            WHERE attack = 'pgd';
        DELETE FROM samples WHERE job IN (SELECT key FROM jobs WHERE attack = 'pgd');""")
    rejected(*verify(capsys, bad, bundle), "2 jobs errored in the submission")
    rc, out = verify(capsys, bad, bundle, "--allow-errors")
    assert rc == 0, out
    assert "PASS  undefended / pgd linf eps=0.1: errored in the submission, as the row says" \
        in out


# -- near-ties of deterministic defenses -------------------------------------------------------

def test_near_ties_are_allowed_and_counted(bundle, tmp_path, capsys):
    """One recorded outcome differs from the re-scored one: a failure at the default tolerance,
    a counted near-tie when the tolerance makes every sample one."""
    bad = _resubmit(bundle, tmp_path, "UPDATE samples SET correct = 1 WHERE sample_id = (SELECT "
                                      "MIN(sample_id) FROM samples) AND job IN (SELECT key FROM "
                                      "jobs WHERE attack = 'pgd');")
    rejected(*verify(capsys, bad, bundle), "re-score differently")
    rc, out = verify(capsys, bad, bundle, "--tie-tol", "1e9")
    assert rc == 0, out
    assert "1 near-ties (|logit margin| <= 1e+09 x scale) kept as recorded" in out


def test_exact_counts_flag_near_ties():
    import torch
    from torch import nn

    from benchmark.verify.bundle import _exact_counts

    class Fixed(nn.Module):
        def forward(self, x):  # sample 0: a tie up to float noise; sample 1: a clear margin
            return torch.tensor([[1.0, 1.0 + 1e-7, 0.0], [3.0, 1.0, 0.0]])[: len(x)]

    counts, ties = _exact_counts(Fixed(), torch.zeros(2, 1), torch.tensor([0, 0]), 1, 3, 10,
                                 "toy", None, 1e-3)
    assert counts.tolist() == [0, 1] and ties.tolist() == [True, False]


# -- extraction -------------------------------------------------------------------------------

def _with_members(bundle: Path, tmp: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    root = _unpack(bundle, tmp / "m")
    out = tmp / "members.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(root)))
    return out


def _member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo,
                                                                              bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size if kind == tarfile.REGTYPE else 0
    return info, bytes(info.size)


@pytest.mark.parametrize("members, flags, reason", [
    ([_member("adv/bomb.bin", 3 << 20)], ["--max-unpacked-mb", "2"],
     "refused member 'adv/bomb.bin': 3.0 MiB unpacked, over the 2.0 MiB limit per member"),
    ([_member(f"adv/part{i}.bin", 1 << 20) for i in range(3)], ["--max-unpacked-mb", "2"],
     "the bundle unpacks to more than 2.0 MiB"),
    ([_member(f"adv/{i}.bin") for i in range(20)], ["--max-members", "15"],
     "refused bundle: more than 15 members"),
    # what `tar -C folder .` writes first; tarfile names it "."
    ([_member("./", kind=tarfile.DIRTYPE)], [], "refused member '.': empty path"),
    ([_member(".", 4)], [], "refused member '.': empty path"),
    ([_member("suite.toml", 4)], [], "refused member 'suite.toml': a second member"),
])
def test_tar_bombs_and_odd_members_are_refused(bundle, tmp_path, capsys, members, flags,
                                               reason):
    bad = _with_members(bundle, tmp_path, members)
    rejected(*verify(capsys, bad, bundle, *flags), reason)


def test_a_bomb_is_refused_before_its_data_is_written(bundle, tmp_path):
    from benchmark.verify.bundle import Limits

    bad = _with_members(bundle, tmp_path, [_member("adv/bomb.bin", 3 << 20)])
    with pytest.raises(BundleError, match="over the 1.0 MiB limit per member"):
        safe_extract(bad, tmp_path / "y", Limits(member_bytes=1 << 20))
    assert not (tmp_path / "y" / "adv" / "bomb.bin").exists()


@pytest.mark.parametrize("text, reason", [
    ("{not json", "manifest.json: not valid JSON"),
    ("[1, 2]", "manifest.json: expected a JSON object, got list"),
    ('{"format": "genbench-bundle/1", "suite": "t", "files": ["suite.toml"]}',
     "manifest.json: 'files' must map each file to its sha256"),
])
def test_malformed_manifest_is_rejected_not_an_error(bundle, tmp_path, capsys, text, reason):
    root = _unpack(bundle, tmp_path / "x")
    (root / "manifest.json").write_text(text)
    bad = _repack(root, tmp_path / "bad.tar.gz")
    rejected(*verify(capsys, bad, bundle), reason)


@pytest.mark.parametrize("name, text, reason", [
    ("jobs.json", "{}", "jobs.json: expected a list of jobs"),
    ("jobs.json", '[{"key": 1}]', "jobs.json: job 0: 'key' must be a str"),
    ("outcomes.csv", "job,sample_id\nx,1\n", "outcomes.csv, line 2: job 'x' is not in"),
    ("plan.json", '{"jobs": [], "limit": "all"}', "plan.json: 'limit' must be a positive"),
])
def test_malformed_files_are_rejected(bundle, tmp_path, capsys, name, text, reason):
    bad = _forge(bundle, tmp_path, lambda root: (root / name).write_text(text))
    rejected(*verify(capsys, bad, bundle), reason)


def test_compare_pairs_the_worst_case_without_the_diagnostic(rich):
    """`genbench compare`'s per-sample worst case (its paired test) is the leaderboard's:
    without fixed-noise, which here is stronger than every attack."""
    from benchmark.report.compare import per_sample_outcomes

    run = rich.parent / "run"
    frame = read_csv(run / "leaderboard.csv").set_index(["defense", "attack", "eps"])
    outcomes = per_sample_outcomes(run)
    for eps in (EPS_A, EPS_B):
        worst = outcomes[("noisy", "worst_case", "linf", eps)]["robust"]
        assert sum(worst.values()) / len(worst) == frame.loc[("noisy", "worst_case", eps),
                                                             "robust_acc"]
    fn = outcomes[("noisy", "fixed-noise", "linf", EPS_B)]["robust"]
    assert sum(fn.values()) < sum(outcomes[("noisy", "worst_case", "linf", EPS_B)]["robust"]
                                  .values())


def test_defense_failing_on_adversarial_examples_verifies_and_cannot_be_forged(
        tmp_path_factory, tmp_path, capsys):
    """A defense that returns NaN on adversarial examples has those samples scored not robust
    with a DEFENSE_FAILED reason: verify does not mistake them for claimed threat violations,
    re-scores them the same way, and catches a forger who marks them robust."""
    defenses = '[[defenses]]\nid = "nan"\nname = "tests.plugins:NaNOnAdversarial"\n'
    made = _make(tmp_path_factory.mktemp("failing"), suite_text(defenses, eps="[0.1]"))
    with sqlite3.connect(made.parent / "run" / "runs.sqlite") as conn:
        reasons = {r for (r,) in conn.execute("SELECT error FROM samples WHERE error != ''")}
    assert reasons and all(r.startswith("defense failed on the adversarial example") for r in
                           reasons), reasons
    rc, out = verify(capsys, made, made, "--trust-code")
    assert rc == 0, out
    assert "verified" in verdict(out) and "FAIL" not in out
    bad = _resubmit(made, tmp_path, "UPDATE samples SET correct = 1, error = NULL WHERE job IN "
                                    "(SELECT key FROM jobs WHERE attack = 'pgd' AND "
                                    "defense = 'nan');")
    rejected(*verify(capsys, bad, made, "--trust-code"),
             "samples of nan / pgd linf eps=0.1 [shard 0] re-score differently")
