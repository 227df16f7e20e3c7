"""A third-party plug-in from its own distribution: built and installed into a temporary
environment (no network), listed as ``dist/name`` with its version, run through a suite with its
version recorded in every row; ``GENBENCH_NO_PLUGINS=1`` hides it, and an entry point naming a
missing attribute is a warning naming it, not a crash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from benchmark.report.leaderboard import read_csv
from tests.test_harness import suite_text

ROOT = Path(__file__).resolve().parent.parent
DIST = "genbench-example-plugin"
NAME = f"{DIST}/blur"


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv that sees this environment's packages and has the example plug-in installed."""
    tmp = tmp_path_factory.mktemp("plugin")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = _site_packages(env)
    parent = sysconfig.get_paths()["purelib"]
    # addsitedir (not a bare path) so that the parent's .pth files (editable genbench) apply
    (site / "_genbench_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    src = tmp / "src"
    shutil.copytree(ROOT / "tests" / "example_plugin", src)  # builds write into the source
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(src)], check=True,
                   env=_env())
    # a second, broken distribution whose entry point names a missing attribute
    info = site / "genbench_broken_plugin-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genbench-broken-plugin\n"
                                   "Version: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[genbench.defenses]\nmissing = genbench_example_plugin:DoesNotExist\n")
    return env


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GENBENCH_NO_PLUGINS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), GENBENCH_PROGRESS="none", **extra)
    return env


def _genbench(env: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env / "bin" / "python"), "-m", "benchmark.cli", *args], cwd=ROOT,
                          env=_env(**extra), capture_output=True, text=True, timeout=300)


def test_plugin_is_listed_with_its_version_and_broken_one_warns(venv):
    res = _genbench(venv, "list", "defenses")
    assert res.returncode == 0, res.stderr
    # name, module:qualname, file:line of its definition, dist==version
    rows = {line.split("\t")[0]: line.split("\t") for line in res.stdout.splitlines()}
    _, ref, location, prov = rows[NAME]
    assert (ref, prov) == ("genbench_example_plugin:Blurred", f"{DIST}==0.1.0")
    assert "genbench_example_plugin" in location and location.rpartition(":")[2].isdigit()
    _, ref, location, prov = rows["undefended"]
    assert ref == "defenses.baseline:Undefended" and location.startswith("defenses/baseline.py:")
    assert prov.startswith("genbench==")
    # the broken entry point: listed as failed, with a warning naming it, not a crash
    assert rows["genbench-broken-plugin/missing"][1:] == [
        "genbench_example_plugin:DoesNotExist", "-", "failed to load"]
    assert "warning: defense 'genbench-broken-plugin/missing' failed to load" in res.stderr
    assert "'DoesNotExist'" in res.stderr


def test_no_plugins_switch_hides_them(venv):
    res = _genbench(venv, "list", "defenses", GENBENCH_NO_PLUGINS="1")
    assert res.returncode == 0, res.stderr
    assert DIST not in res.stdout and "broken" not in res.stdout + res.stderr
    assert "undefended" in res.stdout


def test_safe_discover_turns_the_broken_plugin_into_a_warning(venv):
    code = ("import warnings; from benchmark.plugins.builtin import DEFENSES; "
            "from benchmark.plugins.registry import safe_discover; "
            "warnings.simplefilter('always'); print(safe_discover(DEFENSES))")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert NAME in res.stdout and "genbench-broken-plugin/missing" not in res.stdout
    assert "defense plug-in 'genbench-broken-plugin/missing' failed to load" in res.stderr


def test_suite_naming_the_plugin_records_its_version(venv, tmp_path):
    suite = tmp_path / "suite.toml"
    suite.write_text(suite_text(f'[[defenses]]\nname = "{NAME}"\nid = "blur"\n'
                                "params = { size = 3 }\n",
                                attacks='[[attacks]]\nname = "pgd"\nparams = { steps = 2 }\n',
                                eps="[0.1]"))
    out = tmp_path / "run"
    res = _genbench(venv, "run", "--suite", str(suite), "--out", str(out), "--limit", "4")
    assert res.returncode == 0, res.stderr
    frame = read_csv(out / "leaderboard.csv")
    assert set(frame.defense) == {"blur"} and frame.error.isna().all()
    assert (frame.defense_name == NAME).all()
    for versions in frame.plugin_versions:
        assert f"{DIST}==0.1.0" in versions.split(";"), versions
