"""Submission bundles: `genbench submit` round-trips through `genbench verify`, and tampered or
path-escaping bundles are refused, naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from benchmark.cli import main
from benchmark.verify.bundle import BundleError, safe_extract
from tests.test_harness import suite_text


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bundle")
    suite = tmp / "suite.toml"
    suite.write_text(suite_text('[[defenses]]\nname = "undefended"\n', eps="[0.1]"))
    run = tmp / "run"
    assert main(["run", "--suite", str(suite), "--out", str(run), "--limit", "8",
                 "--progress", "none"]) == 0
    out = tmp / "bundle.tar.gz"
    assert main(["submit", "--run", str(run), "--out", str(out)]) == 0
    return out


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
    manifest = json.loads((root / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_contents_and_round_trip(bundle, tmp_path, capsys):
    capsys.readouterr()
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "PASS  manifest" in out and "every sha256 matches" in out
    assert "PASS  threat models: 8 adversarial examples re-checked" in out
    assert "PASS  undefended / pgd linf eps=0.1: re-scored" in out
    assert "PASS  undefended / worst_case linf eps=0.1" in out
    assert "verified" in out
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
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "leaderboard.csv: sha256 mismatch" in out and "REJECTED" in out


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
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"refused member {name!r}" in out


def test_adversarial_example_outside_the_threat_model_is_caught(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    path = sorted((root / "adv").iterdir())[0]
    t = load_file(str(path))
    x = t["x_adv"].copy()
    x[1] = np.clip(x[1] + 0.5, 0, 1)  # far outside linf eps = 0.1
    save_file({"x_adv": x, "sample_ids": t["sample_ids"]}, str(path))
    _rehash(root)  # a forger fixes the manifest: the threat-model re-check must still catch it
    bad = _repack(root, tmp_path / "bad.tar.gz")
    assert main(["verify", str(bad), "--no-rescore"]) == 1
    out = capsys.readouterr().out
    sid = int(t["sample_ids"][1])
    assert f"adv/{path.name}: sample {sid} of undefended / pgd linf eps=0.1" in out
    assert "breaks the threat model (linf distance" in out


def test_unlisted_extra_file_is_refused(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    (root / "extra.py").write_text("print('hi')\n")
    bad = _repack(root, tmp_path / "bad.tar.gz")
    assert main(["verify", str(bad)]) == 1
    assert "extra.py: file not listed in the manifest" in capsys.readouterr().out


def test_submit_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["submit", "--run", str(tmp_path), "--out", str(tmp_path / "b.tar.gz")]) == 2
    assert "runs.sqlite is missing" in capsys.readouterr().err


def test_inflated_claim_is_caught_by_rescoring(bundle, tmp_path, capsys):
    root = _unpack(bundle, tmp_path / "x")
    from benchmark.report.leaderboard import read_csv, write_csv

    frame = read_csv(root / "leaderboard.csv")
    pgd = frame.attack == "pgd"
    for col in ("robust_acc", "robust_ci_low", "robust_ci_high"):
        frame[col] = frame[col].astype(float)
    frame.loc[pgd, ["robust_acc", "robust_ci_low", "robust_ci_high"]] = [0.75, 0.6, 0.9]
    write_csv(frame, root / "leaderboard.csv")
    _rehash(root)  # consistent hashes: only re-scoring the examples can catch the claim
    bad = _repack(root, tmp_path / "bad.tar.gz")
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  undefended / pgd linf eps=0.1: re-scored robust accuracy 0.0000" in out


def test_verify_can_rebuild_the_defense_from_another_reference(bundle, capsys):
    assert main(["verify", str(bundle), "--defense",
                 "undefended=defenses.baseline:Undefended"]) == 0
    assert "PASS  undefended / pgd linf eps=0.1: re-scored" in capsys.readouterr().out
