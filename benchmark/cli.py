"""The ``genbench`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from benchmark.plugins.registry import PluginLoadError, UnknownNameError

EXIT_BAD_INPUT = 2
COMMAND_MODULES = ("benchmark.report.compare", "benchmark.report.publish",
                   "benchmark.verify.conformance", "benchmark.verify.bundle")
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    pass


def _registries() -> dict[str, Any]:
    from benchmark.plugins.builtin import ATTACKS, DATASETS, DEFENSES, THREAT_MODELS, TRAINERS

    return {"defenses": DEFENSES, "attacks": ATTACKS, "threat-models": THREAT_MODELS,
            "datasets": DATASETS, "trainable": TRAINERS}


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from benchmark.spec.suite import load_suite, shipped_suites

        for name in shipped_suites():
            print(f"{name}\t{load_suite(name).description}")
        return 0
    if args.what == "models":
        from benchmark.zoo import get_entry, list_models

        for name in list_models():
            entry = get_entry(name)
            print(f"{name}\t{entry.dataset}\t{entry.sha256[:12]}")
        return 0
    # one line per plug-in: name, module:qualname, file:line of its definition, dist==version
    reg = _registries()[args.what]
    for name in reg.names():
        where = reg.definition(name)  # never raises for a listed name: a broken one keeps its ref
        try:
            prov = str(reg.provenance(name))
        except Exception as exc:  # a broken plug-in is listed with a warning, not a crash
            print(f"warning: {reg.kind} {name!r} failed to load: {exc}", file=sys.stderr)
            prov = "failed to load"
        print(f"{name}\t{where.ref}\t{where.location}\t{prov}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.report.leaderboard import read_csv, render_markdown
    from benchmark.report.tables import write_tables
    from benchmark.run.harness import default_progress, run_suite
    from benchmark.run.lock import run_lock
    from benchmark.spec.suite import load_suite

    suite = load_suite(args.suite)
    out = Path(args.out) if args.out else Path("results") / suite.name
    progress = args.progress or default_progress()
    with run_lock(out):  # the run and the tables it writes (run_suite takes it again)
        summary = run_suite(suite, out, executor=args.executor, workers=args.workers,
                            device=args.device, limit=args.limit, fresh=args.fresh,
                            retry_errors=args.retry_errors, rerun_stale=args.rerun_stale,
                            progress=progress, ray_address=getattr(args, "ray_address", None))
        tables = write_tables(summary.out, summary.plan)
    print(render_markdown(read_csv(tables.csv)))
    print(f"suite {suite.name}: {summary.total_jobs} jobs ({summary.ran} run, "
          f"{summary.resumed} resumed, {summary.errors} errors) in {summary.wall_s:.1f}s; "
          f"wrote {tables.csv} and {tables.md}", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.report.leaderboard import build_leaderboard, render_markdown
    from benchmark.spec.fingerprint import KEY_VERSION
    from benchmark.spec.plan import plan_suite
    from benchmark.spec.suite import parse_suite
    from benchmark.store import Store

    run = Path(args.run)
    db, suite_file, plan_file = run / "runs.sqlite", run / "suite.toml", run / "plan.json"
    for p in (db, suite_file, plan_file):
        if not p.exists():
            raise CLIError(f"{run} is not a genbench run folder: {p.name} is missing "
                           "(expected the --out folder of `genbench run`)")
    suite = parse_suite(suite_file.read_text(), source=str(suite_file))
    limit = json.loads(plan_file.read_text()).get("limit")
    plan = plan_suite(suite, limit=limit)
    with Store(db) as store:
        frame = build_leaderboard(store, plan)
        keyed = store.get_meta("job_key_version")
        n_stored = len(store.finished_keys())
    if frame.empty and n_stored and keyed != str(KEY_VERSION):
        raise CLIError(f"{run}: its {n_stored} jobs were keyed by job-key version {keyed or 1}, "
                       f"this code keys jobs by version {KEY_VERSION}, so none of them is found "
                       f"(their leaderboard.csv still holds their results); run `genbench run` "
                       f"on it again to recompute them under the current keys")
    if args.format == "csv":
        from benchmark.report.leaderboard import FLOAT_FORMAT, csv_frame

        csv_frame(frame).to_csv(sys.stdout, index=False, float_format=FLOAT_FORMAT)
    else:
        print(render_markdown(frame, plan))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from benchmark.plugins.builtin import TRAINERS

    model = args.model
    prefix = f"{args.dataset}-"
    if model not in TRAINERS and model.startswith(prefix) and model[len(prefix):] in TRAINERS:
        model = model[len(prefix):]  # `genbench train digits-eps` is `genbench train eps`
    trainer = TRAINERS.get(model)
    kwargs: dict[str, Any] = dict(dataset=args.dataset, seed=args.seed,
                                  progress=(args.progress != "none"))
    if args.regime is not None:
        kwargs["regime"] = args.regime
    if args.device is not None:
        kwargs["device"] = args.device
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.max_steps is not None:
        kwargs["max_steps"] = args.max_steps
    if args.out is not None:
        kwargs["out_dir"] = args.out
        kwargs["register"] = False
    for item in args.param or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word is a string: --param arch=glow
        kwargs[key.strip()] = value
    info = trainer(**kwargs)
    print(json.dumps(info, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genbench", description=(
        "Adversarial-robustness benchmark for generative-model defenses."))
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list registered plug-ins, suites or zoo models")
    ls.add_argument("what", choices=["defenses", "attacks", "threat-models", "suites", "models",
                                     "datasets", "trainable"])
    ls.set_defaults(func=cmd_list)

    run = sub.add_parser("run", help="run (or resume) a suite")
    run.add_argument("--suite", required=True, help="shipped suite name or path to a .toml")
    run.add_argument("--out", help="run folder (default: results/<suite>)")
    run.add_argument("--executor", choices=["local", "process", "ray"], default="local")
    run.add_argument("--workers", type=int, help="workers for process/ray executors")
    run.add_argument("--ray-address", dest="ray_address", help="Ray cluster address")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    run.add_argument("--limit", type=int, help="evaluate only the first N samples of the subset")
    run.add_argument("--fresh", action="store_true",
                     help="start over (the previous store is moved aside, not deleted)")
    run.add_argument("--retry-errors", action="store_true", help="re-run jobs that errored")
    run.add_argument("--rerun-stale", action="store_true", dest="rerun_stale",
                     help="re-run stored jobs whose code version differs from the current one "
                          "(rows mixing versions are flagged mixed_code_versions)")
    run.add_argument("--progress", choices=["bar", "plain", "none"],
                     help="progress display (default: bar on a terminal, plain otherwise)")
    run.set_defaults(func=cmd_run)

    lb = sub.add_parser("leaderboard", help="print a run's leaderboard from its store")
    lb.add_argument("--run", required=True, help="run folder (the --out of genbench run)")
    lb.add_argument("--format", choices=["csv", "md"], default="md")
    lb.set_defaults(func=cmd_leaderboard)

    tr = sub.add_parser("train", help="train a zoo model on a bundled dataset")
    tr.add_argument("model", help="what to train (see `genbench list trainable`)")
    tr.add_argument("--dataset", default="digits")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--max-steps", type=int, dest="max_steps")
    tr.add_argument("--out", help="write weights here instead of the shipped zoo")
    tr.add_argument("--regime", choices=["clean", "adv", "hybrid"],
                    help="flow training regime (Pope et al.)")
    tr.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    tr.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="extra trainer option, e.g. --param arch=glow --param regime=hybrid")
    tr.add_argument("--progress", choices=["bar", "plain", "none"], default="bar")
    tr.set_defaults(func=cmd_train)

    # Commands that live in their own modules (compare, publish, check-defense, submit, ...)
    # add themselves through an ``add_commands(subparsers)`` function.
    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from benchmark.spec.suite import SuiteError
    from benchmark.store import StoreError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("genbench: interrupted; finished jobs are stored, run again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, SuiteError, UnknownNameError, PluginLoadError, StoreError, ValueError,
            TypeError, FileNotFoundError, KeyError, OSError) as exc:
        if os.environ.get("GENBENCH_DEBUG") == "1":
            raise
        msg = str(exc)
        if isinstance(exc, KeyError) and not isinstance(exc, UnknownNameError):
            msg = str(exc.args[0]) if exc.args else msg
        print(f"genbench: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
