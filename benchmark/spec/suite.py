"""Suite files (TOML): what to evaluate, on which samples, with which budgets.

A suite names a dataset and a versioned evaluation subset, a seed, the defenses, the attacks and
the threat models with their epsilons::

    [suite]
    name = "quick"
    dataset = "digits"
    subset = "test100-v1"
    seed = 0
    k_draws = 10           # draws per scored input for stochastic defenses
    batch_size = 100       # samples per attack call
    shard_size = 100       # samples per job (the unit of resumption and of distribution)
    num_cpus = 1           # resources of one job under the ray executor (fractions allowed)
    num_gpus = 0
    # job_timeout_s = 600  # stop a job after this long (process and ray executors; not local)
    # unconstrained_probe = 4  # samples of the automatic unconstrained-attack probe (0: off)
    # single_step_probe = 4    # samples of the automatic single-step probe (0: off)

    [[defenses]]
    name = "undefended"                 # registry name or "package.module:Class"
    params = { model = "digits-cnn" }
    # id = "cnn"                         # label in the leaderboard (default: name)
    # params_by_threat = { l2 = { t_star = 0.075 } }
    # limit = 10                         # a defense only: its first 10 samples of the subset

    [[attacks]]
    name = "pgd"
    id = "pgd-ce"
    params = { steps = 50, loss = "ce" }
    # threat_models = ["linf", "l2"]     # restrict (default: all compatible)
    # when = "masking"                   # a fallback: run on a defense only where masking shows
    # defenses = ["diffpure"]            # restrict to these defense ids (a defense entry
    #                                    # takes attacks = [...] the same way)
    # eps = [0.03]                       # an attack only: restrict to these epsilons (each
    #                                    # must be listed by one of its threat models)

    [[threat_models]]
    name = "linf"
    eps = [0.05, 0.1]

Errors name the file, the key and (where it can be found) the line.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from benchmark.api.threat import validate_eps
from benchmark.plugins.suggest import did_you_mean


class SuiteError(ValueError):
    """A malformed suite file; the message names the file, the key and the line."""


def freeze(value: Any) -> str:
    """The canonical JSON of a TOML value (sorted keys, no spaces): hashable, and exact.

    :func:`thaw` gives the value back with every type intact (tables stay tables, empty or
    not; lists stay lists, of lists too; ints stay ints, floats floats, bools bools), so a
    plug-in receives exactly what its suite says. TOML dates and times have no JSON form:
    they raise TypeError (the suite parser reports them as an error of the key)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def thaw(value: str) -> Any:
    """Inverse of :func:`freeze`."""
    if not isinstance(value, str):
        raise TypeError(f"thaw expects the canonical JSON made by freeze(), got "
                        f"{type(value).__name__} {value!r}")
    return json.loads(value)


#: the frozen form of an empty table (no parameters).
NO_PARAMS = freeze({})


@dataclass(frozen=True)
class PluginSpec:
    """A plug-in reference with its configuration; ``id`` labels it in tables."""

    id: str
    name: str
    #: the ``params`` table as canonical JSON (:func:`freeze`)
    params: str = NO_PARAMS
    threat_models: tuple[str, ...] | None = None
    #: the ``params_by_threat`` table (threat model name -> extra params) as canonical JSON
    params_by_threat: str = NO_PARAMS
    #: ids of the other kind this entry is paired with (an attack's ``defenses``, a defense's
    #: ``attacks``); None pairs it with all of them.
    paired_with: tuple[str, ...] | None = None
    #: an attack's ``eps``: the only epsilons it runs at; None runs every threat model's.
    eps: tuple[float, ...] | None = None
    #: a defense's ``limit``: it is evaluated on the first ``limit`` samples of the subset only
    #: (for defenses too costly for the whole subset in a small suite); None: all of them.
    limit: int | None = None
    #: an attack's ``when``: None (always run) or ``"masking"`` (a fallback, run on a defense
    #: only where the first phase's flags show masking: :mod:`benchmark.report.fallback`).
    when: str | None = None

    def kwargs(self, threat: str | None = None) -> dict[str, Any]:
        out = dict(thaw(self.params))
        if threat is not None:
            out.update(thaw(self.params_by_threat).get(threat) or {})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "params": thaw(self.params)}


@dataclass(frozen=True)
class ThreatSpec:
    name: str
    eps: tuple[float, ...]


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: str
    subset: str
    seed: int
    defenses: tuple[PluginSpec, ...]
    attacks: tuple[PluginSpec, ...]
    threat_models: tuple[ThreatSpec, ...]
    k_draws: int = 10
    batch_size: int = 100
    shard_size: int = 100
    #: resources of one job as a Ray task (``--executor ray``); other executors ignore them.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: seconds after which the process and ray executors stop a job and store it as an error
    #: result (None: no limit). Not part of a job's key: changing it does not invalidate results.
    job_timeout_s: float | None = None
    #: samples of the automatic unconstrained-attack probe of every (defense, white-box attack,
    #: threat model) (:func:`benchmark.spec.plan.plan_suite`); 0 switches it off.
    unconstrained_probe: int = 4
    #: samples of the automatic single-step probe of every (defense, threat model, epsilon)
    #: with an iterative white-box attack (Carlini et al. 2019); 0 switches it off.
    single_step_probe: int = 4
    #: the ``dataset_params`` table as canonical JSON (:func:`freeze`)
    dataset_params: str = NO_PARAMS
    description: str = ""
    source: str = field(default="", compare=False)
    text: str = field(default="", compare=False, repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


_SUITE_KEYS = {"name", "dataset", "subset", "seed", "k_draws", "batch_size", "shard_size",
               "dataset_params", "description", "num_cpus", "num_gpus", "job_timeout_s",
               "unconstrained_probe", "single_step_probe"}
_PLUGIN_KEYS = {"name", "id", "params", "threat_models", "params_by_threat"}
#: an attack's ``when`` values: ``"masking"``, a fallback run where masking shows.
WHEN = ("masking",)
#: per section, the key that restricts an entry to some ids of the other section
_PAIRING_KEY = {"defenses": "attacks", "attacks": "defenses"}
_THREAT_KEYS = {"name", "eps"}
_TOP_KEYS = {"suite", "defenses", "attacks", "threat_models"}


class _Ctx:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = text.splitlines()

    def line_of(self, key: str, after: int = 0) -> int | None:
        pattern = re.compile(rf"^\s*(\[\[?\s*)?{re.escape(key)}\b")
        for i, line in enumerate(self.lines[after:], start=after + 1):
            if pattern.search(line):
                return i
        return None

    def locate(self, path: str) -> int | None:
        """Best-effort line of a key path such as ``threat_models[1].eps``."""
        m = re.match(r"^(\w+)\[(\d+)\](?:\.(\w+))?", path)
        if m:
            section, index, key = m.group(1), int(m.group(2)), m.group(3)
            header = re.compile(rf"^\s*\[\[\s*{re.escape(section)}\s*\]\]")
            starts = [i for i, line in enumerate(self.lines) if header.search(line)]
            if index < len(starts):
                return self.line_of(key, after=starts[index]) if key else starts[index] + 1
        return self.line_of(path.split(".")[-1].split("[")[0])

    def error(self, path: str, message: str) -> SuiteError:
        line = self.locate(path)
        where = f"{self.source}" + (f", line {line}" if line else "")
        return SuiteError(f"{where}: key {path!r}: {message}")

    def unknown_keys(self, table: dict[str, Any], allowed: set[str], path: str) -> None:
        for key in table:
            if key not in allowed:
                msg = (f"unknown key (expected one of {sorted(allowed)})"
                       f"{did_you_mean(key, sorted(allowed), n=1, cutoff=0.6)}")
                raise self.error(f"{path}.{key}" if path else key, msg)


def _typed(ctx: _Ctx, table: dict[str, Any], key: str, path: str, typ: type, default: Any) -> Any:
    if key not in table:
        if default is _REQUIRED:
            raise ctx.error(f"{path}.{key}", "is required")
        return default
    value = table[key]
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ctx.error(f"{path}.{key}", f"expected an integer, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ctx.error(f"{path}.{key}", f"expected a string, got {value!r}")
    if typ is dict and not isinstance(value, dict):
        raise ctx.error(f"{path}.{key}", f"expected a table, got {value!r}")
    return value


_REQUIRED = object()


def _frozen(ctx: _Ctx, table: dict[str, Any], path: str) -> str:
    try:
        return freeze(table)
    except (TypeError, ValueError) as exc:
        raise ctx.error(path, f"dates and times are not supported in parameters (write them as "
                              f"strings): {exc}") from None


def _plugins(ctx: _Ctx, doc: dict[str, Any], section: str) -> tuple[PluginSpec, ...]:
    items = doc.get(section, [])
    if not isinstance(items, list) or not items:
        raise ctx.error(section, f"expected at least one [[{section}]] table")
    specs: list[PluginSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        path = f"{section}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error(path, f"expected a table, got {item!r}")
        extra = {_PAIRING_KEY.get(section, "threat_models")} | (
            {"eps", "when"} if section == "attacks" else {"limit"} if section == "defenses"
            else set())
        ctx.unknown_keys(item, _PLUGIN_KEYS | extra, path)
        name = _typed(ctx, item, "name", path, str, _REQUIRED)
        ident = _typed(ctx, item, "id", path, str, name)
        if ident in seen:
            raise ctx.error(f"{path}.id", f"duplicate id {ident!r}; give each entry a unique id")
        seen.add(ident)
        params = _typed(ctx, item, "params", path, dict, {})
        by_threat = _typed(ctx, item, "params_by_threat", path, dict, {})
        tms = item.get("threat_models")
        if tms is not None and (not isinstance(tms, list) or
                                not all(isinstance(t, str) for t in tms)):
            raise ctx.error(f"{path}.threat_models", f"expected a list of names, got {tms!r}")
        pair_key = _PAIRING_KEY.get(section)
        paired = item.get(pair_key) if pair_key else None
        if paired is not None and (not isinstance(paired, list) or not paired or
                                   not all(isinstance(p, str) for p in paired)):
            raise ctx.error(f"{path}.{pair_key}", f"expected a non-empty list of ids, "
                                                  f"got {paired!r}")
        limit = item.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ctx.error(f"{path}.limit", f"expected an integer >= 1 (the number of samples "
                                             f"this defense is evaluated on), got {limit!r}")
        when = item.get("when")
        if when is not None and when not in WHEN:
            raise ctx.error(f"{path}.when", f"expected one of {', '.join(map(repr, WHEN))} (run "
                                            f"only where masking shows), got {when!r}")
        specs.append(PluginSpec(ident, name, _frozen(ctx, params, f"{path}.params"),
                                tuple(tms) if tms is not None else None,
                                _frozen(ctx, by_threat, f"{path}.params_by_threat"),
                                tuple(paired) if paired is not None else None,
                                _attack_eps(ctx, item, path) if section == "attacks" else None,
                                limit, when))
    return tuple(specs)


def _attack_eps(ctx: _Ctx, item: dict[str, Any], path: str) -> tuple[float, ...] | None:
    if "eps" not in item:
        return None
    raw = item["eps"]
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise ctx.error(f"{path}.eps", "expected a non-empty list of positive numbers")
    try:
        return tuple(validate_eps(e, name=f"eps of {path}") for e in values)
    except (TypeError, ValueError) as exc:
        raise ctx.error(f"{path}.eps", str(exc)) from None


def _check_cross_references(ctx: _Ctx, defenses: tuple[PluginSpec, ...],
                            attacks: tuple[PluginSpec, ...],
                            threats: tuple[ThreatSpec, ...]) -> None:
    """Pairing keys must name ids of the suite, and an attack's eps must be offered by one of
    its threat models: a typo would otherwise silently skip every job."""
    for section, specs, other in (("defenses", defenses, attacks),
                                  ("attacks", attacks, defenses)):
        ids = [o.id for o in other]
        for i, spec in enumerate(specs):
            for ref in spec.paired_with or ():
                if ref not in ids:
                    raise ctx.error(f"{section}[{i}].{_PAIRING_KEY[section]}",
                                    f"{ref!r} is not the id of one of the suite's "
                                    f"{_PAIRING_KEY[section]} ({', '.join(ids)})"
                                    + did_you_mean(ref, ids, n=1, cutoff=0.6))
    for i, spec in enumerate(attacks):
        offered = {e for t in threats
                   if spec.threat_models is None or t.name in spec.threat_models for e in t.eps}
        for e in spec.eps or ():
            if e not in offered:
                raise ctx.error(f"attacks[{i}].eps", f"{e!r} is not an epsilon of its threat "
                                                    f"models (offered: {sorted(offered)})")


def _threats(ctx: _Ctx, doc: dict[str, Any]) -> tuple[ThreatSpec, ...]:
    items = doc.get("threat_models", [])
    if not isinstance(items, list) or not items:
        raise ctx.error("threat_models", "expected at least one [[threat_models]] table")
    out = []
    for i, item in enumerate(items):
        path = f"threat_models[{i}]"
        ctx.unknown_keys(item, _THREAT_KEYS, path)
        name = _typed(ctx, item, "name", path, str, _REQUIRED)
        eps = item.get("eps", _REQUIRED)
        if eps is _REQUIRED:
            raise ctx.error(f"{path}.eps", "is required (a list of positive numbers)")
        eps_list = eps if isinstance(eps, list) else [eps]
        if not eps_list:
            raise ctx.error(f"{path}.eps", "expected a non-empty list of positive numbers")
        values = []
        for e in eps_list:
            try:
                values.append(validate_eps(e, name=f"eps of threat model {name!r}"))
            except (TypeError, ValueError) as exc:
                raise ctx.error(f"{path}.eps", str(exc)) from None
        out.append(ThreatSpec(name, tuple(values)))
    return tuple(out)


def parse_suite(text: str, source: str = "<string>") -> Suite:
    """Parse and validate a suite's TOML text."""
    ctx = _Ctx(source, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{source}: malformed TOML: {exc}") from None
    ctx.unknown_keys(doc, _TOP_KEYS, "")
    head = doc.get("suite")
    if not isinstance(head, dict):
        raise ctx.error("suite", "a [suite] table is required")
    ctx.unknown_keys(head, _SUITE_KEYS, "suite")
    positive = {}
    for key, default in (("k_draws", 10), ("batch_size", 100), ("shard_size", 100)):
        value = _typed(ctx, head, key, "suite", int, default)
        if value < 1:
            raise ctx.error(f"suite.{key}", f"must be >= 1, got {value!r}")
        positive[key] = value
    resources: dict[str, float] = {}
    for res_key, res_default, zero_ok in (("num_cpus", 1.0, False), ("num_gpus", 0.0, True)):
        raw = head.get(res_key, res_default)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ctx.error(f"suite.{res_key}", f"expected a number, got {raw!r}")
        if raw < 0 or (raw == 0 and not zero_ok):
            raise ctx.error(f"suite.{res_key}", f"must be {'>= 0' if zero_ok else '> 0'}, "
                                            f"got {raw!r}")
        resources[res_key] = float(raw)
    timeout = head.get("job_timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout < float("inf")):
        raise ctx.error("suite.job_timeout_s", f"expected a positive number of seconds, got "
                                               f"{timeout!r}")
    probes = {}
    for key in ("unconstrained_probe", "single_step_probe"):
        probes[key] = _typed(ctx, head, key, "suite", int, 4)
        if probes[key] < 0:
            raise ctx.error(f"suite.{key}", f"must be >= 0 (0 switches the probe off), "
                                            f"got {probes[key]!r}")
    defenses = _plugins(ctx, doc, "defenses")
    attacks = _plugins(ctx, doc, "attacks")
    threat_models = _threats(ctx, doc)
    _check_cross_references(ctx, defenses, attacks, threat_models)
    return Suite(
        num_cpus=resources["num_cpus"],
        num_gpus=resources["num_gpus"],
        job_timeout_s=None if timeout is None else float(timeout),
        unconstrained_probe=probes["unconstrained_probe"],
        single_step_probe=probes["single_step_probe"],
        name=_typed(ctx, head, "name", "suite", str, _REQUIRED),
        dataset=_typed(ctx, head, "dataset", "suite", str, _REQUIRED),
        subset=_typed(ctx, head, "subset", "suite", str, _REQUIRED),
        seed=_typed(ctx, head, "seed", "suite", int, 0),
        defenses=defenses,
        attacks=attacks,
        threat_models=threat_models,
        dataset_params=_frozen(ctx, _typed(ctx, head, "dataset_params", "suite", dict, {}),
                               "suite.dataset_params"),
        description=_typed(ctx, head, "description", "suite", str, ""),
        source=source,
        text=text,
        **positive,
    )


def shipped_suites() -> list[str]:
    root = resources.files("benchmark.spec") / "suites"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a shipped suite by name (``quick``) or a suite file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SuiteError(f"suite file {str(path)!r} does not exist")
        return parse_suite(path.read_text(), source=str(path))
    names = shipped_suites()
    if str(name_or_path) not in names:
        msg = (f"unknown suite {str(name_or_path)!r}"
               f"{did_you_mean(str(name_or_path), names, n=2, cutoff=0.6)}")
        raise SuiteError(msg + f" (shipped: {', '.join(names)}; or pass a path to a .toml file)")
    res = resources.files("benchmark.spec") / "suites" / f"{name_or_path}.toml"
    return parse_suite(res.read_text(), source=f"suites/{name_or_path}.toml")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
