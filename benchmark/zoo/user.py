"""User models: published checkpoints registered beside the zoo, and ``genbench models``.

Where they come from (each a name -> entry mapping in the zoo manifest's schema plus the
fields :mod:`benchmark.zoo` lists: ``format``, ``denoiser``, ``normalization``, ...):

* registry files: ``$GENBENCH_MODELS`` (one path, or several separated by ``os.pathsep``; an
  empty value reads none), else ``$XDG_CONFIG_HOME/genbench/models.json`` (default
  ``~/.config/genbench/models.json``). A relative ``file`` is relative to the registry's folder.
  ``genbench models add`` writes them: it hashes the weights (and a diffusers folder's
  config.json) at registration, and loading checks the hashes again before reading a tensor, so
  a replaced file is refused rather than evaluated under the old name;
* the entry-point group ``genbench.models``: the entry point's name is the model's name, its
  object an entry mapping (or a function returning one); a relative ``file`` is relative to the
  folder of the module that defines it (weights shipped as package data).

A user model never shadows a shipped one: a registry entry with a zoo model's name, or two user
entries of the same name, are refused with both places named.

Example (a diffusers DDPM folder as DiffPure's denoiser, a RobustBench WRN-28-10 as its
classifier)::

    genbench models add cifar10-ddpm --format diffusers --path ~/ckpt/ddpm-cifar10-32 \\
        --dataset cifar10 --time ddpm
    genbench models add cifar10-wrn-28-10 --format state-dict --arch wrn-28-10 \\
        --path ~/ckpt/Standard.pt --state-dict-key state_dict --strip-prefix module. \\
        --dataset cifar10 --num-classes 10
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmark.zoo import (
    ARCH_ALIASES,
    FORMATS,
    ZooEntry,
    ZooError,
    file_sha256,
    get_entry,
    list_models,
    load_entry,
)

__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "add_commands", "add_user_model", "registry_paths",
           "remove_user_model", "user_entries"]

ENV_VAR = "GENBENCH_MODELS"
ENTRY_POINT_GROUP = "genbench.models"


def default_registry() -> Path:
    """``$XDG_CONFIG_HOME/genbench/models.json`` (``~/.config/genbench/models.json``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "genbench" / "models.json"


def registry_paths() -> list[Path]:
    """The registry files read, in order (see the module docstring)."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return [default_registry()]
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _read_registry(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZooError(f"user model registry {path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ZooError(f"user model registry {path}: expected a JSON object mapping model names "
                       f"to entries")
    return raw


def _absolute(d: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(d)
    f = out.get("file")
    if isinstance(f, str) and not Path(f).expanduser().is_absolute():
        out["file"] = str((base / f).resolve())
    elif isinstance(f, str):
        out["file"] = str(Path(f).expanduser())
    return out


def _entry_point_items() -> Iterator[tuple[str, dict[str, Any], str]]:
    if os.environ.get("GENBENCH_NO_PLUGINS") == "1":
        return
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
            if callable(obj):
                obj = obj()
        except Exception as exc:
            raise ZooError(f"user model from {where} failed to load: {exc}") from exc
        if not isinstance(obj, dict):
            raise ZooError(f"user model from {where}: expected an entry mapping, got "
                           f"{type(obj).__name__}")
        module = importlib.import_module(ep.value.split(":", 1)[0])
        base = Path(module.__file__).resolve().parent if module.__file__ else Path.cwd()
        yield ep.name, _absolute(obj, base), where


def user_entries(*, shipped: set[str] | None = None) -> dict[str, ZooEntry]:
    """Every user model, name -> entry (with absolute paths and its ``source``). A name that a
    shipped model or another user entry already has is refused (:class:`ZooError`)."""
    shipped = set() if shipped is None else shipped
    out: dict[str, ZooEntry] = {}
    items: list[tuple[str, dict[str, Any], str]] = []
    for path in registry_paths():
        for name, d in _read_registry(path).items():
            base = path.resolve().parent
            items.append((name, _absolute(d, base) if isinstance(d, dict) else d, str(path)))
    items.extend(_entry_point_items())
    for name, d, source in items:
        if name in shipped:
            raise ZooError(f"user model {name!r} (in {source}) has the name of a shipped zoo "
                           f"model; rename it (a user model never replaces a zoo model)")
        if name in out:
            raise ZooError(f"user model {name!r} is registered twice: in {out[name].source} and "
                           f"in {source}; remove one")
        out[name] = ZooEntry.from_json(name, d, source=source)
    return out


# -- registration --------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    from benchmark.zoo import _locked as lock_folder

    with lock_folder(path.parent):
        yield


def _write_registry(path: Path, models: dict[str, Any]) -> None:
    text = json.dumps(dict(sorted(models.items())), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _target_registry(registry: str | os.PathLike[str] | None) -> Path:
    if registry is not None:
        return Path(registry).expanduser()
    paths = registry_paths()
    if not paths:
        raise ZooError(f"${ENV_VAR} is empty, so there is no registry to write to; pass "
                       f"--registry FILE or set ${ENV_VAR}")
    return paths[0]


def add_user_model(name: str, *, path: str | os.PathLike[str], fmt: str, dataset: str,
                   arch: str = "", arch_kwargs: dict[str, Any] | None = None,
                   denoiser: dict[str, Any] | None = None,
                   normalization: dict[str, Any] | None = None, state_dict_key: str = "",
                   strip_prefix: str = "", registry: str | os.PathLike[str] | None = None,
                   replace: bool = False, check: bool = True) -> ZooEntry:
    """Register the checkpoint at ``path`` as ``name`` in a registry file (the first of
    :func:`registry_paths` unless ``registry``), recording the sha256 of its weights (and of a
    diffusers folder's config.json). With ``check`` (the default) the model is loaded once
    first, so a broken registration fails here and not in the middle of a run."""
    from benchmark.zoo import external

    if not name or any(c.isspace() for c in name) or ":" in name:
        raise ValueError(f"model names are non-empty, without spaces or ':', got {name!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    target = _target_registry(registry).resolve()
    shipped = set(list_models(manifest=Path(__file__).resolve().parent / "manifest.json"))
    if name in shipped:
        raise ZooError(f"{name!r} is a shipped zoo model; choose another name for yours")
    where = Path(path).expanduser().resolve()
    d: dict[str, Any] = {"dataset": dataset, "format": fmt, "file": str(where)}
    if fmt == "diffusers":
        if not where.is_dir():
            raise ZooError(f"--format diffusers expects a folder ({external.DIFFUSERS_CONFIG} "
                           f"and {external.DIFFUSERS_WEIGHTS}); {where} is not one")
        cfg = where / external.DIFFUSERS_CONFIG
        external.parse_diffusers_config(external.read_diffusers_config(where), cfg)
        d["sha256"] = file_sha256(external.diffusers_weights_path(where))
        d["config_sha256"] = file_sha256(cfg)
        if arch:
            raise ValueError("--arch does not apply to --format diffusers (the folder's "
                             "config.json is the architecture)")
    else:
        if not where.is_file():
            raise ZooError(f"weights file {where} not found")
        if not arch:
            raise ValueError(f"--format {fmt} needs --arch (a 'module:Class' or one of "
                             f"{', '.join(sorted(ARCH_ALIASES))})")
        d["sha256"] = file_sha256(where)
        d["arch"] = arch
    for key, value in (("arch_kwargs", arch_kwargs), ("denoiser", denoiser),
                       ("normalization", normalization), ("state_dict_key", state_dict_key),
                       ("strip_prefix", strip_prefix)):
        if value:
            d[key] = value
    entry = ZooEntry.from_json(name, d, source=str(target))
    if check:
        load_entry(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        models = _read_registry(target)
        if name in models and not replace:
            raise ZooError(f"{name!r} is already registered in {target}; pass --replace to "
                           f"register it again (e.g. after replacing its weights)")
        models[name] = entry.to_json()
        _write_registry(target, models)
    return entry


def remove_user_model(name: str, *, registry: str | os.PathLike[str] | None = None) -> Path:
    """Remove ``name`` from a registry file; returns the file."""
    target = _target_registry(registry).resolve()
    with _locked(target):
        models = _read_registry(target)
        if name not in models:
            raise ZooError(f"{name!r} is not registered in {target} "
                           f"(registered there: {', '.join(sorted(models)) or 'none'})")
        del models[name]
        _write_registry(target, models)
    return target


# -- the command line ---------------------------------------------------------------------------
def _json_arg(raw: str | None, what: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} must be a JSON object, got {raw!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {raw!r}")
    return value


def _floats(raw: str | None, what: str) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {raw!r}") from None


def cmd_models_add(args: argparse.Namespace) -> int:
    denoiser = _json_arg(args.denoiser_options, "--denoiser-options")
    if args.time is not None:
        denoiser["time"] = args.time
    if args.learned_sigma:
        denoiser["learned_sigma"] = True
    arch_kwargs = _json_arg(args.arch_kwargs, "--arch-kwargs")
    is_denoiser = args.format == "diffusers" or bool(denoiser)
    if args.num_classes is not None:
        (denoiser if is_denoiser else arch_kwargs)["num_classes"] = args.num_classes
    if args.null_class is not None:
        denoiser["null_class"] = args.null_class
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if (mean is None) != (std is None):
        raise ValueError("--mean and --std go together")
    normalization = {"mean": mean, "std": std} if mean is not None else {}
    entry = add_user_model(args.name, path=args.path, fmt=args.format, dataset=args.dataset,
                           arch=args.arch or "", arch_kwargs=arch_kwargs, denoiser=denoiser,
                           normalization=normalization, state_dict_key=args.state_dict_key,
                           strip_prefix=args.strip_prefix, registry=args.registry,
                           replace=args.replace, check=not args.no_check)
    print(f"registered {entry.name} ({entry.format}, sha256 {entry.sha256[:12]}) in "
          f"{entry.source}")
    if args.registry and Path(args.registry).expanduser().resolve() not in [
            p.resolve() for p in registry_paths()]:
        print(f"genbench: note: {args.registry} is not read by default; set "
              f"{ENV_VAR}={args.registry} for runs to find it", file=sys.stderr)
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    where = remove_user_model(args.name, registry=args.registry)
    print(f"removed {args.name} from {where}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    entry = get_entry(args.name)
    print(json.dumps({"name": entry.name, "source": entry.source or "zoo manifest",
                      **entry.to_json()}, indent=1, sort_keys=True))
    return 0


def add_commands(sub: Any) -> None:
    """``genbench models add|remove|show`` (see the module docstring)."""
    from benchmark.zoo.external import TIME_CONVENTIONS

    p = sub.add_parser("models", help="register your own checkpoints (diffusers folders, state "
                                      "dicts) as models the defenses take by name")
    msub = p.add_subparsers(dest="models_command", required=True)
    add = msub.add_parser("add", help="register a checkpoint (records its sha256)")
    add.add_argument("name")
    add.add_argument("--path", required=True, help="weights file, or a diffusers model folder")
    add.add_argument("--format", required=True, choices=list(FORMATS))
    add.add_argument("--dataset", required=True, help="the dataset it was trained on (cifar10)")
    add.add_argument("--arch", help="'module:Class' or one of "
                                    f"{', '.join(sorted(ARCH_ALIASES))} (not for diffusers)")
    add.add_argument("--arch-kwargs", dest="arch_kwargs", help="JSON object of arch arguments")
    add.add_argument("--time", choices=sorted(TIME_CONVENTIONS),
                     help="wrap as a denoiser with this time convention (diffusers: ddpm)")
    add.add_argument("--num-classes", dest="num_classes", type=int,
                     help="classifier: its class count; denoiser: its classes (conditional)")
    add.add_argument("--null-class", dest="null_class", type=int,
                     help="the label index a class-conditional denoiser takes as 'no label'")
    add.add_argument("--learned-sigma", dest="learned_sigma", action="store_true",
                     help="the network also outputs a variance: keep the eps channels")
    add.add_argument("--denoiser-options", dest="denoiser_options",
                     help="JSON object of further EpsAdapter options (call, time_scale, T, ...)")
    add.add_argument("--mean", help="per-channel mean applied inside the model, e.g. "
                                    "0.4914,0.4822,0.4465")
    add.add_argument("--std", help="per-channel std applied inside the model")
    add.add_argument("--state-dict-key", dest="state_dict_key", default="",
                     help="the checkpoint entry holding the weights (e.g. state_dict)")
    add.add_argument("--strip-prefix", dest="strip_prefix", default="",
                     help="a prefix to strip from parameter names (e.g. module.)")
    add.add_argument("--registry", help=f"registry file (default: ${ENV_VAR}, else "
                                        f"{default_registry()})")
    add.add_argument("--replace", action="store_true", help="overwrite an entry of that name")
    add.add_argument("--no-check", dest="no_check", action="store_true",
                     help="do not load the model once before registering it")
    add.set_defaults(func=cmd_models_add)
    rm = msub.add_parser("remove", help="remove a registered checkpoint")
    rm.add_argument("name")
    rm.add_argument("--registry")
    rm.set_defaults(func=cmd_models_remove)
    show = msub.add_parser("show", help="print a model's entry and where it is registered")
    show.add_argument("name")
    show.set_defaults(func=cmd_models_show)
