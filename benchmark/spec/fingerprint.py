"""What a job's key holds besides the suite's numbers: what the plan resolves in code.

A suite names plug-ins and parameters; what a job computes also depends on things the suite
does not spell out. :func:`resolve` collects them, once per (defense, threat model, attack), into
the ``resolved`` field of a :class:`benchmark.spec.jobs.JobSpec`, which its key hashes:

* ``defense``: the plug-in's provenance (``dist==version``, from its registry) and the keyword
  defaults of its factory that the suite does not set (a changed default is new work);
* ``attack``: provenance, the attack's ``config()`` and ``budget`` read after construction
  (defaults included: a new default step count changes the key);
* ``threat_model``: provenance;
* ``weights``: the sha256 (from the zoo manifest) of every zoo model named by a string anywhere
  in the defense's parameters and defaults or the attack's parameters and config (a retrained
  model is new work); user models (:mod:`benchmark.zoo.user`) are recorded the same way, by the
  sha256 of their weights file taken at registration (and checked at load);
* ``user_models``: for the user models among them (only when there are any, so zoo-only keys
  are unchanged), what else decides the network: format, architecture, a diffusers config's
  sha256, the time convention and normalization (re-registering with another time convention
  is new work).

Display labels (the suite's name, the ``id`` of a defense or an attack) are not resolved here
and not hashed: renaming them relabels stored results instead of recomputing them.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from typing import Any

from benchmark.plugins.builtin import ATTACKS, DEFENSES, THREAT_MODELS

#: bump when what the key hashes changes shape (the store records it; see the harness).
KEY_VERSION = 2

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable(value: Any) -> Any:
    """``value`` as JSON data that is the same in every process: containers recursed (tuples
    become lists, mapping keys strings), numbers, strings, bools and None kept, dataclasses as
    dicts, classes and functions as ``module:qualname``, anything else by its ``repr`` unless
    that carries a memory address (then by its type)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): stable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [stable(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    if is_dataclass(value) and not isinstance(value, type):
        return stable(asdict(value))
    if (inspect.isclass(value) or inspect.isfunction(value)) and hasattr(value, "__qualname__"):
        return f"{value.__module__}:{value.__qualname__}"
    text = repr(value)
    if _ADDRESS.search(text):
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return text


def factory_defaults(factory: Callable[..., Any], given: dict[str, Any]) -> dict[str, Any]:
    """Keyword defaults of ``factory`` (a class or a function) for the parameters not in
    ``given``, as :func:`stable` data."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    return {name: stable(p.default) for name, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and name not in given
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


class ZooHashes(dict[str, str]):
    """Model name -> weights sha256, plus ``user_specs``: each user model's loading spec
    (:meth:`benchmark.zoo.ZooEntry.loading_spec`), read once with the hashes."""

    def __init__(self, hashes: dict[str, str], user_specs: dict[str, Any]) -> None:
        super().__init__(hashes)
        self.user_specs = user_specs


def zoo_hashes() -> ZooHashes:
    """Model name -> weights sha256, from the zoo manifest and the user's registries."""
    from benchmark.zoo import get_entry, list_models

    entries = [get_entry(name) for name in list_models()]
    return ZooHashes({e.name: e.sha256 for e in entries},
                     {e.name: stable(e.loading_spec()) for e in entries if e.is_user})


def weights_named(zoo: dict[str, str], *values: Any) -> dict[str, str]:
    """The sha256 of every zoo model named by a string anywhere in ``values``."""
    return {s: zoo[s] for v in values for s in _strings(v) if s in zoo}


def defense_part(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The resolved defense: provenance and the factory's unset keyword defaults."""
    return {"version": str(DEFENSES.provenance(name)),
            "defaults": factory_defaults(DEFENSES.get(name), kwargs)}


def attack_part(name: str, attack: Any) -> dict[str, Any]:
    """The resolved attack: provenance, ``config()`` and ``budget`` after construction."""
    config = attack.config() if callable(getattr(attack, "config", None)) else {}
    budget = getattr(attack, "budget", None)
    return {"version": str(ATTACKS.provenance(name)), "config": stable(config),
            "budget": stable(budget) if budget is not None else None}


def threat_part(name: str) -> dict[str, Any]:
    return {"version": str(THREAT_MODELS.provenance(name))}


def resolve(defense: dict[str, Any], defense_kwargs: dict[str, Any],
            attack: dict[str, Any] | None, attack_kwargs: dict[str, Any] | None,
            threat: dict[str, Any] | None, zoo: dict[str, str]) -> dict[str, Any]:
    """A job's ``resolved`` data from the parts above (``attack`` and ``threat`` are None for
    clean jobs)."""
    named = weights_named(zoo, defense_kwargs, defense["defaults"],
                          attack_kwargs or {}, (attack or {}).get("config", {}))
    out = {"defense": defense, "attack": attack, "threat_model": threat,
           "weights": dict(sorted(named.items()))}
    specs = getattr(zoo, "user_specs", {})
    user = {name: specs[name] for name in sorted(named) if name in specs}
    if user:
        out["user_models"] = user
    return out
