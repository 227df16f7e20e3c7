"""Publish a run as a leaderboard folder: ``genbench publish --run DIR [--dest leaderboard]``
(also ``genbench leaderboard --run DIR --publish [--dest leaderboard]``).

Writes ``DEST/<suite>/``:

* ``leaderboard.csv``: the canonical table, rebuilt from the store, with every validity flag
  (including the store-evidence ones: gradients, black-box vs white-box per sample);
* ``README.md``: per threat model, defenses ranked by worst-case robust accuracy (rank,
  defense, clean, robust with its 95% interval, worst-case attack, NFE per prediction, flags),
  a one-line legend for every flag, and the per-attack tables;
* ``index.html``: the same, self-contained (inline CSS and JS, no external scripts or fonts),
  sortable by any column and filterable by threat model and defense kind; every text is
  HTML-escaped. The page reads ``?sort=COLUMN&dir=asc|desc&tm=THREAT&kind=KIND`` on load;
* ``plots/robust_vs_eps_<threat>.png``: worst-case robust accuracy versus epsilon per defense
  (epsilon 0 is clean accuracy), with 95% intervals; PNGs a run keeps under ``plots/`` or
  ``density/`` (the density metrics' plots) are copied next to them;
* ``plots/efficiency_<threat>.png`` and ``efficiency.csv``: the attack-efficiency curves of the
  attacks that report when each sample first fell (:mod:`benchmark.report.efficiency`).

``DEST/README.md`` lists the published suites.
"""

from __future__ import annotations

import argparse
import html
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.report.cells import all_code_versions, is_number, pct
from benchmark.report.efficiency import efficiency_csv, efficiency_table, write_efficiency_plots
from benchmark.report.evidence import WORST, collect_evidence
from benchmark.report.flags import FLAG_HELP
from benchmark.report.plots import save_percent_plot, slug

DEFAULT_DEST = "leaderboard"


# -- building -----------------------------------------------------------------------------

def load_run(run: str | Path) -> tuple[pd.DataFrame, Any, dict[str, str]]:
    """(leaderboard with all flags, plan, defense id -> kind label) of a run folder. The plan
    comes from the folder's ``plan.json`` (:func:`benchmark.spec.stored.load_plan`): no defense
    is built, except for run folders written before ``plan.json`` recorded the jobs."""
    from benchmark.report.leaderboard import build_leaderboard, flag_frame
    from benchmark.spec.stored import load_plan
    from benchmark.store import Store

    run = Path(run)
    plan = load_plan(run)
    with Store(run / "runs.sqlite") as store:
        frame = build_leaderboard(store, plan)
        evidence = collect_evidence(store, plan)
        kinds = kind_labels(plan, store)
    frame["flags"] = flag_frame(frame, evidence)
    return frame, plan, kinds


def kind_labels(plan: Any, store: Any) -> dict[str, str]:
    """Defense id -> "stochastic classifier", "deterministic classifier" or "density" (a
    classifier with no finished job yet is just "classifier"), from the plan's kinds and the
    stored jobs' ``stochastic`` column."""
    stochastic: dict[str, bool] = {}
    for job in store.jobs([j.key for j in plan.jobs]):
        if job["status"] == "done":
            did = str(job["defense"])
            stochastic[did] = stochastic.get(did, False) or bool(job["stochastic"])
    labels: dict[str, str] = {}
    for d in plan.suite.defenses:
        kind = plan.kinds.get(d.id, "classifier")
        if kind == "classifier" and d.id in stochastic:
            kind = "stochastic classifier" if stochastic[d.id] else "deterministic classifier"
        labels[d.id] = kind
    return labels


#: shown in place of a rank: the worst case misses an errored attack.
NOT_RANKED = "not ranked"
NOT_RANKED_NOTE = ("*not ranked*: the worst case is incomplete (an attack errored on this "
                   "defense, threat model and epsilon; flag `worst_case_incomplete`), so its "
                   "robust accuracy is only an upper bound over the attacks that ran.")


def ranked(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """One row per (threat model, eps, defense): the worst case over attacks, ranked by robust
    accuracy within (threat model, eps); flags are the union over the cell's rows. A cell whose
    worst case is incomplete (an attack errored) is never ranked (``complete`` False, ``rank``
    missing): it would rank on the attacks that happened to run."""
    from benchmark.report.leaderboard import is_density

    rows = []
    # density rows have no accuracy to rank; they appear in the per-attack tables
    for (tm, eps, defense), cell in frame[~is_density(frame)].groupby(
            ["threat_model", "eps", "defense"], sort=True):
        worst = cell[cell["attack"] == WORST]
        base = worst.iloc[0] if len(worst) else cell.iloc[0]
        flags = sorted({f for v in cell["flags"] if isinstance(v, str) for f in v.split(";")
                        if f})
        attacks = cell[cell["attack"] != WORST]
        errored = attacks["error"].map(lambda e: isinstance(e, str) and e != "")
        rows.append(dict(threat_model=tm, eps=float(eps), defense=defense,
                         kind=kinds.get(str(defense), ""), n=base["n"],
                         clean=base["clean_acc"], robust=base["robust_acc"],
                         robust_low=base["robust_ci_low"], robust_high=base["robust_ci_high"],
                         robust_mean=base.get("robust_acc_mean"),
                         robust_worst_k=base.get("robust_acc_worst_of_k"),
                         worst_attack=(base["strongest_attack"] if len(worst)
                                       else base["attack"]),
                         attacks=int(len(attacks)),
                         nfe_per_pred=base["nfe_per_pred"], flags=";".join(flags),
                         error=base["error"] if isinstance(base["error"], str) else "",
                         complete=not bool(errored.any())
                         and "worst_case_incomplete" not in flags))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    complete = out[out["complete"]]
    out["rank"] = (complete.groupby(["threat_model", "eps"])["robust"]
                   .rank(method="min", ascending=False)
                   .reindex(out.index).astype("Int64"))
    return out.sort_values(["threat_model", "eps", "rank", "defense"],
                           na_position="last").reset_index(drop=True)


def _rank_cell(r: Any) -> str:
    if not pd.isna(r["rank"]):
        return str(int(r["rank"]))
    return NOT_RANKED if not r.get("complete", True) else ""


# -- Markdown -------------------------------------------------------------------------------

def md_escape(text: Any) -> str:
    """Text for a Markdown table cell: no HTML, no cell breaks, no code spans."""
    s = html.escape(str(text), quote=False)
    return s.replace("|", "\\|").replace("`", "\\`").replace("\n", " ").replace("\r", " ")


def _robust_cell(r: Any) -> str:
    if not is_number(r["robust"]):
        return "error"
    return f"{pct(r['robust'])} [{pct(r['robust_low'])}, {pct(r['robust_high'])}]"


#: rows on fewer samples than this are smoke checks, and the README says so at the top.
FINDING_N = 16


#: a hand-written file in a published folder that ``genbench publish`` quotes at the top of
#: README.md on every (re)publication: budgets, provenance, findings the table cannot say.
NOTES_FILE = "NOTES.md"


def render_readme(frame: pd.DataFrame, table: pd.DataFrame, plan: Any,
                  plots: list[str], progress: Any = None, notes: str | None = None) -> str:
    from benchmark.report.leaderboard import render_markdown

    suite = plan.suite
    first = frame.iloc[0] if len(frame) else None
    parts = [f"# genbench leaderboard: `{md_escape(suite.name)}`\n"]
    if progress is not None and progress.partial:
        parts.append(f"**partial: {progress.done} of {progress.total} jobs done** "
                     f"({progress.pending} pending): the run is not finished.\n")
    small = int((pd.to_numeric(frame["n"], errors="coerce").fillna(0) < FINDING_N).sum()) \
        if "n" in frame.columns else 0
    if small:
        parts.append(f"> **Smoke check, not a finding:** {small} of {len(frame)} rows have "
                     f"n < {FINDING_N} samples; those rows are smoke checks: their intervals "
                     "are wide and no ordering in them is a result.\n")
    if notes and notes.strip():
        parts.append(notes.strip() + "\n")
    if first is not None:
        parts.append(
            f"Dataset `{md_escape(first['dataset'])}`, subset `{md_escape(first['subset_id'])}` "
            f"(hash {md_escape(first['subset_hash'])}, n = {len(plan.sample_ids)}), seed "
            f"{first['seed']}, code {md_escape(all_code_versions(frame))}. Accuracies in %; "
            "robust accuracy is the worst case over all attacks per sample, with its 95% Wilson "
            "interval; stochastic defenses are scored by majority vote over K draws. Ranked "
            "per threat model and epsilon. Generated by `genbench publish` from the run's "
            f"store: do not edit by hand (notes above the table come from {NOTES_FILE}, "
            "hand-written, kept by every republication). Also: [index.html](index.html) (sortable, "
            "filterable), [leaderboard.csv](leaderboard.csv) (canonical), "
            "[suite.toml](suite.toml) (the effective suite: `genbench run --suite suite.toml "
            f"--limit {len(plan.sample_ids)}` reproduces the table).\n")
    headers = ["rank", "defense", "eps", "clean", "robust [95% CI]", "worst-case attack",
               "NFE/pred", "flags"]
    for tm, part in (table.groupby("threat_model", sort=True) if len(table) else []):
        parts.append(f"## {md_escape(tm)}\n")
        rows = [[_rank_cell(r), md_escape(r["defense"]),
                 f"{r['eps']:g}", pct(r["clean"]), _robust_cell(r),
                 md_escape(r["worst_attack"] or ""),
                 f"{r['nfe_per_pred']:g}" if is_number(r["nfe_per_pred"]) else "",
                 md_escape(r["flags"].replace(";", ", "))] for _, r in part.iterrows()]
        parts.append(tabulate(rows, headers=headers, tablefmt="github",
                              disable_numparse=True))
        if not part["complete"].all():
            parts.append(f"\n{NOT_RANKED_NOTE}")
        plot = f"plots/robust_vs_eps_{slug(str(tm))}.png"
        if plot in plots:
            parts.append(f"\n![robust accuracy vs epsilon, {md_escape(tm)}]({plot})")
        parts.append("")
    parts.append("## Flags\n")
    parts.append(tabulate([[f"`{k}`", md_escape(v)] for k, v in FLAG_HELP.items()],
                          headers=["flag", "meaning"], tablefmt="github",
                          disable_numparse=True))
    parts.append("")
    parts.append("## Per attack\n")
    detail = render_markdown(_md_safe_frame(frame), plan)
    start = detail.find("\n## ")
    parts.append(re.sub(r"(?m)^## ", "### ", detail[start + 1:]) if start >= 0 else detail)
    if other := [p for p in plots if not p.startswith("plots/robust_vs_eps_")]:
        parts.append("## Other plots\n")
        parts += [f"![{md_escape(Path(p).stem)}]({p})" for p in other]
    return "\n".join(parts).rstrip() + "\n"


def _md_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    safe = frame.copy()
    for col in ("defense", "attack", "flags"):
        safe[col] = safe[col].map(lambda v: md_escape(v) if isinstance(v, str) else v)
    return safe


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left}
th{background:#f0f0f0;cursor:pointer;user-select:none;white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even){background:#fafafa}
.flag{background:#fde2e1;color:#8a1c14;border-radius:3px;padding:0 .3em;margin-right:.2em;
white-space:nowrap}
.controls{margin:1em 0}.controls label{margin-right:1.2em}
.meta{color:#555;max-width:60em}
.notes{white-space:pre-wrap;max-width:60em;font:inherit;background:#f6f6f6;padding:.5em}
dl.legend dt{font-family:monospace;font-weight:bold}dl.legend dd{margin:0 0 .4em 1.5em}
img{max-width:32em;margin:.5em 1em .5em 0;border:1px solid #ddd}
"""

_JS = """
(function(){
  var params = new URLSearchParams(window.location.search);
  var tm = document.getElementById('filter-tm'), kind = document.getElementById('filter-kind');
  var text = document.getElementById('filter-defense');
  function apply(){
    var rows = document.querySelectorAll('table.lb tbody tr');
    var q = text.value.toLowerCase(), shown = 0;
    rows.forEach(function(r){
      var ok = (!tm.value || r.dataset.tm === tm.value) &&
               (!kind.value || r.dataset.kind === kind.value) &&
               (!q || r.dataset.defense.toLowerCase().indexOf(q) >= 0);
      r.hidden = !ok; if (ok) shown++;
    });
    document.getElementById('shown').textContent = String(shown);
  }
  function value(td){
    var v = td.getAttribute('data-v');
    if (v === null || v === '') return null;
    var f = parseFloat(v);
    return (td.classList.contains('num') && !isNaN(f)) ? f : v.toLowerCase();
  }
  function sortBy(table, key, dir){
    var ths = table.querySelectorAll('thead th'), col = -1;
    ths.forEach(function(th, i){
      th.classList.remove('asc', 'desc');
      if (th.dataset.key === key){ col = i; th.classList.add(dir); }
    });
    if (col < 0) return;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = value(a.cells[col]), y = value(b.cells[col]);
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      var c = x < y ? -1 : 1;
      return dir === 'desc' ? -c : c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  }
  document.querySelectorAll('table.lb').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th){
      th.addEventListener('click', function(){
        var dir = th.classList.contains('asc') ? 'desc' : 'asc';
        sortBy(table, th.dataset.key, dir);
      });
    });
  });
  [tm, kind].forEach(function(el){ el.addEventListener('change', apply); });
  text.addEventListener('input', apply);
  if (params.get('tm') !== null) tm.value = params.get('tm');
  if (params.get('kind') !== null) kind.value = params.get('kind');
  if (params.get('q') !== null) text.value = params.get('q');
  if (params.get('sort')){
    var dir = params.get('dir') === 'desc' ? 'desc' : 'asc';
    document.querySelectorAll('table.lb').forEach(function(t){
      sortBy(t, params.get('sort'), dir);
    });
  }
  apply();
  document.body.setAttribute('data-ready', '1');
})();
"""

_COLUMNS = [  # key, header, numeric
    ("rank", "rank", True), ("defense", "defense", False), ("kind", "kind", False),
    ("threat_model", "threat model", False), ("eps", "eps", True), ("n", "n", True),
    ("clean", "clean %", True), ("robust", "robust % [95% CI]", True),
    ("robust_mean", "mean of K %", True), ("robust_worst_k", "worst of K %", True),
    ("worst_attack", "worst-case attack", False), ("attacks", "attacks", True),
    ("nfe_per_pred", "NFE/pred", True), ("flags", "flags", False),
]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(key: str, r: Any, numeric: bool) -> str:
    v = r[key]
    if key == "robust":
        shown = _robust_cell(r)
        sort = f"{float(v):.6g}" if is_number(v) else ""
    elif key in ("clean", "robust_mean", "robust_worst_k"):
        shown, sort = pct(v), (f"{float(v):.6g}" if is_number(v) else "")
    elif key == "flags":
        names = [f for f in str(v).split(";") if f]
        inner = "".join(f'<span class="flag" title="{_e(FLAG_HELP.get(f, ""))}">{_e(f)}</span>'
                        for f in names)
        return f'<td data-v="{_e(len(names))}">{inner}</td>'
    elif key == "rank" and not is_number(v):
        shown, sort = _rank_cell(r), ""
    elif numeric:
        shown = "" if not is_number(v) else (f"{int(v)}" if key in ("rank", "n", "attacks")
                                        else f"{float(v):g}")
        sort = shown
    else:
        shown = sort = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    cls = ' class="num"' if numeric else ""
    return f'<td{cls} data-v="{_e(sort)}">{_e(shown)}</td>'


def render_html(frame: pd.DataFrame, table: pd.DataFrame, plan: Any,
                plots: list[str], notes: str | None = None) -> str:
    suite = plan.suite
    first = frame.iloc[0] if len(frame) else None
    tms = sorted({str(t) for t in table["threat_model"]}) if len(table) else []
    kinds = sorted({str(k) for k in table["kind"] if k}) if len(table) else []
    opts_tm = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in tms)
    opts_kind = "".join(f'<option value="{_e(k)}">{_e(k)}</option>' for k in kinds)
    head = "".join(f'<th data-key="{_e(k)}">{_e(h)}</th>' for k, h, _ in _COLUMNS)
    body = []
    for _, r in table.iterrows():
        cells = "".join(_cell(k, r, num) for k, _, num in _COLUMNS)
        body.append(f'<tr data-tm="{_e(r["threat_model"])}" data-kind="{_e(r["kind"])}" '
                    f'data-defense="{_e(r["defense"])}">{cells}</tr>')
    meta = ""
    if first is not None:
        meta = (f"Dataset {_e(first['dataset'])}, subset {_e(first['subset_id'])} (hash "
                f"{_e(first['subset_hash'])}, n = {len(plan.sample_ids)}), seed "
                f"{_e(first['seed'])}, code {_e(all_code_versions(frame))}. Robust accuracy is "
                "the worst case over all attacks per sample, with its 95% Wilson interval; "
                "stochastic defenses are scored by majority vote over K draws (beside it: mean "
                "of K, one draw's expected accuracy; worst of K, a sample counts only if every "
                "draw is right). Click a column header to sort. Canonical data: "
                '<a href="leaderboard.csv">leaderboard.csv</a>.')
    legend = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in FLAG_HELP.items())
    imgs = "".join(f'<img src="{_e(p)}" alt="{_e(Path(p).stem)}">' for p in plots)
    from benchmark.report.leaderboard import (
        DENSITY_HEADERS,
        DENSITY_NOTE,
        density_table,
        is_density,
    )

    density = ""
    if is_density(frame).any():
        # tabulate's "html" format escapes every cell
        density = (f"<h2>Density defenses</h2>\n<p>{_e(DENSITY_NOTE)}</p>\n"
                   + tabulate(density_table(frame[is_density(frame)]), headers=DENSITY_HEADERS,
                              tablefmt="html").replace("<table>", '<table class="lb">', 1))
    title = f"genbench leaderboard: {suite.name}"
    # the folder's hand-written notes, as plain text (never markup from the file)
    notes_html = (f'<pre class="notes">{_e(notes.strip())}</pre>\n'
                  if notes and notes.strip() else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{meta}</p>
{notes_html}<div class="controls">
<label>threat model <select id="filter-tm"><option value="">all</option>{opts_tm}</select></label>
<label>defense kind <select id="filter-kind"><option value="">all</option>{opts_kind}</select>
</label>
<label>defense <input id="filter-defense" type="search" placeholder="name contains"></label>
<span><span id="shown">{len(table)}</span> of {len(table)} rows</span>
</div>
<table class="lb" id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
{density}
<h2>Flags</h2>
<dl class="legend">{legend}</dl>
<h2>Plots</h2>
{imgs}
<script>{_JS}</script>
</body></html>
"""


# -- plots ----------------------------------------------------------------------------------

def write_plots(table: pd.DataFrame, out: Path) -> list[str]:
    """Worst-case robust accuracy vs epsilon per defense, one PNG per threat model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for tm, part in table.groupby("threat_model", sort=True):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for defense, rows in part.groupby("defense", sort=True):
            rows = rows[rows["robust"].notna()].sort_values("eps")
            if rows.empty:
                continue
            clean = float(rows["clean"].iloc[0])
            eps = np.concatenate([[0.0], rows["eps"].to_numpy(float)])
            acc = 100 * np.concatenate([[clean], rows["robust"].to_numpy(float)])
            low = 100 * np.concatenate([[clean], rows["robust_low"].to_numpy(float)])
            high = 100 * np.concatenate([[clean], rows["robust_high"].to_numpy(float)])
            line, = ax.plot(eps, acc, marker="o", label=str(defense))
            ax.fill_between(eps, low, high, alpha=0.15, color=line.get_color())
        written.append(save_percent_plot(
            fig, ax, out, f"robust_vs_eps_{slug(str(tm))}.png", xlabel=f"epsilon ({tm})",
            ylabel="robust accuracy, worst case (%)", title=f"robust accuracy vs epsilon: {tm}"))
    return written


# -- publishing ---------------------------------------------------------------------------

def publish(run: str | Path, dest: str | Path = DEFAULT_DEST) -> Path:
    """Publish ``run`` into ``dest/<suite>/``; returns that folder."""
    from benchmark.report.leaderboard import write_csv

    run = Path(run)
    from benchmark.report.tables import run_progress
    from benchmark.store import Store

    frame, plan, kinds = load_run(run)
    with Store(run / "runs.sqlite") as store:
        progress = run_progress(store, plan)
        efficiency = efficiency_table(frame, collect_evidence(store, plan))
    out = Path(dest) / slug(plan.suite.name)
    out.mkdir(parents=True, exist_ok=True)
    table = ranked(frame, kinds)
    # object dtype, so that write_csv neutralizes formulas also in pandas 3 string columns
    write_csv(frame.astype({c: object for c in frame.columns
                            if pd.api.types.is_string_dtype(frame[c])}),
              out / "leaderboard.csv")
    plots = write_plots(table, out / "plots") if len(table) else []
    plots += write_efficiency_plots(efficiency, out / "plots")
    efficiency_csv(efficiency, out / "efficiency.csv")
    for sub in ("plots", "density"):  # plots the run itself produced (density metrics)
        if (run / sub).is_dir():
            (out / "plots").mkdir(exist_ok=True)
        for png in sorted((run / sub).glob("*.png")) if (run / sub).is_dir() else []:
            shutil.copy2(png, out / "plots" / png.name)
            plots.append(f"plots/{png.name}")
    if (run / "suite.toml").is_file():  # the effective suite: what reproduces this table
        shutil.copy2(run / "suite.toml", out / "suite.toml")
    notes_file = out / NOTES_FILE  # hand-written: quoted on top, never overwritten
    notes = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else None
    (out / "README.md").write_text(render_readme(frame, table, plan, plots, progress, notes))
    (out / "index.html").write_text(render_html(frame, table, plan, plots, notes))
    _write_index(Path(dest))
    return out


def _write_index(dest: Path) -> None:
    suites = sorted(p.parent.name for p in dest.glob("*/leaderboard.csv"))
    lines = ["# genbench leaderboards\n",
             "Generated by `genbench publish --run DIR`; every number is derived from a run's "
             "per-sample store. Each folder has `README.md` (ranked tables and the flag legend), "
             "`index.html` (sortable, filterable, works offline), `leaderboard.csv` (canonical) "
             "and `plots/`.\n"]
    lines += [f"* [{s}]({s}/README.md) ([html]({s}/index.html))" for s in suites]
    # tables a script made (figure 7, the masking gallery): a README, no leaderboard.csv
    scripted = sorted(p.parent.name for p in dest.glob("*/README.md")
                      if not (p.parent / "leaderboard.csv").exists())
    if scripted:
        lines += ["\nTables made by a script (the command is in each README):\n"]
        lines += [f"* [{s}]({s}/README.md)" for s in scripted]
    (dest / "README.md").write_text("\n".join(lines) + "\n")


def cmd_publish(args: argparse.Namespace) -> int:
    out = publish(args.run, args.dest or DEFAULT_DEST)
    print(f"published {args.run} to {out}/ (README.md, index.html, leaderboard.csv, plots/)")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("publish", help="publish a run as a leaderboard folder "
                                       "(README.md, index.html, CSV, plots)")
    p.add_argument("--run", required=True, help="run folder (the --out of genbench run)")
    p.add_argument("--dest", help=f"leaderboard root (default: {DEFAULT_DEST}/); the run goes "
                                  "to DEST/<suite>/")
    p.set_defaults(func=cmd_publish)
    # `genbench leaderboard --run DIR --publish [--dest DIR]`, the same command
    lb = sub.choices.get("leaderboard")
    if lb is not None:
        lb.add_argument("--publish", action="store_true",
                        help="publish the run (see `genbench publish`) instead of printing")
        lb.add_argument("--dest", help=f"with --publish: leaderboard root (default: "
                                       f"{DEFAULT_DEST}/)")
        show = lb.get_default("func")

        def leaderboard(args: argparse.Namespace) -> int:
            return cmd_publish(args) if args.publish else int(show(args))

        lb.set_defaults(func=leaderboard)
