"""`genbench publish`: README, self-contained HTML (escaping, sort, filter in headless
Chromium), CSV and plots."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.report.flags import FLAG_HELP
from benchmark.report.leaderboard import read_csv
from tests.toys import single_thread

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
SCRIPT = "<script>alert(1)</script>"
FORMULA = "=cmd|' /C calc'!A0"

SUITE = f"""
[suite]
name = "hostile"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 3
batch_size = 8
shard_size = 8

[[defenses]]
name = "undefended"
params = {{ model = "digits-cnn" }}

[[defenses]]
id = "{SCRIPT}"
name = "undefended"
params = {{ model = "digits-cnn" }}

[[defenses]]
id = "{FORMULA}"
name = "tests.plugins:NoisyDefense"
params = {{ sigma = 0.3 }}

[[attacks]]
name = "pgd"
params = {{ steps = 2, random_start = false }}

[[threat_models]]
name = "linf"
eps = [0.05, 0.1]

[[threat_models]]
name = "l2"
eps = [0.5]
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("publish")
    suite = tmp / "hostile.toml"
    suite.write_text(SUITE)
    run = tmp / "run"
    with single_thread():  # tiny toys; restored so that later modules keep every core
        assert main(["run", "--suite", str(suite), "--out", str(run), "--limit", "8",
                     "--progress", "none"]) == 0
    assert main(["leaderboard", "--run", str(run), "--publish", "--dest",
                 str(tmp / "lb")]) == 0
    return tmp / "lb" / "hostile"


def test_publish_writes_every_artifact(published):
    for name in ("leaderboard.csv", "README.md", "index.html", "plots/robust_vs_eps_linf.png",
                 "plots/robust_vs_eps_l2.png"):
        assert (published / name).is_file(), name
    for png in (published / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[hostile](hostile/README.md)" in (published.parent / "README.md").read_text()
    readme = (published / "README.md").read_text()
    assert "| rank" in readme and "robust [95% CI]" in readme and "worst-case attack" in readme
    assert "NFE/pred" in readme and "## linf" in readme and "## l2" in readme
    for flag, text in FLAG_HELP.items():  # the legend: every flag, one line
        assert f"| `{flag}`" in readme and text in readme


def test_html_is_self_contained(published):
    page = (published / "index.html").read_text()
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_hostile_names_are_escaped(published):
    page = (published / "index.html").read_text()
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own script
    readme = (published / "README.md").read_text()
    assert SCRIPT not in readme and "&lt;script&gt;" in readme
    assert "=cmd\\|" in readme  # the pipe cannot split the Markdown cell
    raw = (published / "leaderboard.csv").read_text()
    assert ",'=cmd|" in raw  # the defense cell is neutralized
    assert not any(line.split(",")[4].startswith("=") for line in raw.splitlines()[1:])
    frame = read_csv(published / "leaderboard.csv")
    assert set(frame.defense) == {"undefended", SCRIPT, "'" + FORMULA}


# -- headless Chromium ----------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


needs_chromium = pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium; .ci/run "
           "installs it)")


def _browse(page: Path, query: str, *extra: str) -> str:
    chrome = _chromium()
    assert chrome is not None
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             *extra, page.resolve().as_uri() + query],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, HOME=profile))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Rows(HTMLParser):
    """Rows of the leaderboard table: (attributes, cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self._in_body = False
        self._cell: list[str] | None = None
        self.ready = False

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        if tag == "body" and a.get("data-ready") == "1":
            self.ready = True
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append((a, []))
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self._cell is not None:
            self._cell.append(data)


def _rows(dom: str) -> tuple[bool, list[tuple[dict[str, str | None], list[str]]]]:
    parser = _Rows()
    parser.feed(dom)
    return parser.ready, parser.rows


@needs_chromium
def test_browser_sort_filter_and_screenshot(published):
    page = published / "index.html"
    ready, rows = _rows(_browse(page, "", "--dump-dom"))
    assert ready and len(rows) == 9  # 3 defenses x (2 linf + 1 l2) epsilons
    assert not any("hidden" in attrs for attrs, _ in rows)

    # sort by defense (descending) and filter to linf, through the page's own script
    ready, rows = _rows(_browse(page, "?sort=defense&dir=desc&tm=linf", "--dump-dom"))
    assert ready
    visible = [(a, cells) for a, cells in rows if "hidden" not in a]
    assert {a["data-tm"] for a, _ in visible} == {"linf"} and len(visible) == 6
    assert all("hidden" in a for a, _ in rows if a["data-tm"] == "l2")
    names = [cells[1] for _, cells in rows]
    assert names == sorted(names, reverse=True)
    assert SCRIPT in names  # shown as text, never run

    # numeric sort, ascending robust accuracy, and the kind filter
    ready, rows = _rows(_browse(page, "?sort=robust&dir=asc&kind=stochastic%20classifier",
                                "--dump-dom"))
    visible = [(a, cells) for a, cells in rows if "hidden" not in a]
    assert visible and all(a["data-kind"] == "stochastic classifier" for a, _ in visible)
    robust = [float(c[7].split()[0]) for _, c in rows if c[7] not in ("", "error")]
    assert robust == sorted(robust)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "leaderboard-hostile.png"
    shot.unlink(missing_ok=True)
    _browse(page, "?sort=robust&dir=desc", f"--screenshot={shot}", "--window-size=1400,1000",
            "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
@pytest.mark.skipif(not (ROOT / "leaderboard" / "quick" / "index.html").exists(),
                    reason="leaderboard/quick not published")
def test_browser_screenshot_of_published_quick():
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "leaderboard-quick.png"
    shot.unlink(missing_ok=True)
    _browse(ROOT / "leaderboard" / "quick" / "index.html", "?sort=robust&dir=desc",
            f"--screenshot={shot}", "--window-size=1400,1400", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_index_lists_script_tables_beside_published_runs(tmp_path):
    from benchmark.report.publish import _write_index

    (tmp_path / "suite-a").mkdir()
    (tmp_path / "suite-a" / "leaderboard.csv").write_text("defense\n")
    (tmp_path / "suite-a" / "README.md").write_text("# a\n")
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "README.md").write_text("# made by a script\n")
    (tmp_path / "empty").mkdir()
    _write_index(tmp_path)
    index = (tmp_path / "README.md").read_text()
    assert "* [suite-a](suite-a/README.md) ([html](suite-a/index.html))" in index
    assert "* [gallery](gallery/README.md)\n" in index and "empty" not in index
    assert index.index("suite-a") < index.index("made by a script") < index.index("gallery")


def test_hand_written_notes_survive_republishing(published):
    """NOTES.md in a published folder is quoted above the table on every republication (a
    banner edited into README.md would be lost), and left as it is."""
    notes = published / "NOTES.md"
    text = "> **Reduced budgets:** a banner <b>with markup</b> kept verbatim.\n"
    notes.write_text(text)
    try:
        for _ in range(2):
            assert main(["publish", "--run", str(published.parent.parent / "run"), "--dest",
                         str(published.parent)]) == 0
            readme = (published / "README.md").read_text()
            head = readme.split("\n## ")[0]
            assert text.strip() in head and head.index(text.strip()) < head.index("Dataset `")
            assert notes.read_text() == text
            page = (published / "index.html").read_text()  # as text, its markup escaped
            assert "&lt;b&gt;with markup&lt;/b&gt;" in page and "<b>with" not in page
    finally:
        notes.unlink()
    assert main(["publish", "--run", str(published.parent.parent / "run"), "--dest",
                 str(published.parent)]) == 0
    assert "Reduced budgets" not in (published / "README.md").read_text()


def test_rows_under_16_samples_are_labelled_smoke_checks(published):
    from benchmark.report.publish import load_run, ranked, render_readme

    assert "**Smoke check, not a finding:**" in (published / "README.md").read_text()
    frame, plan, kinds = load_run(published.parent.parent / "run")  # n = 8 rows
    frame["n"] = 16
    readme = render_readme(frame, ranked(frame, kinds), plan, [])
    assert "Smoke check" not in readme
    frame.loc[frame.index[0], "n"] = 15
    assert "1 of" in render_readme(frame, ranked(frame, kinds), plan, []).split("\n## ")[0]
