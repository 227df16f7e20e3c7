"""Typed plug-in registries.

One :class:`Registry` per kind (defense, attack, threat model, dataset, zoo model). Entries are
registered with a decorator, or lazily as ``"package.module:attr"`` strings (imported on first
use), or discovered from the Python entry-point groups ``genbench.defenses``,
``genbench.attacks`` and ``genbench.threat_models`` so that a third-party distribution registers
without touching this repository. A suite file may also name a plug-in directly as
``package.module:ClassName``.

Every resolved entry knows the distribution (name and version) it came from; result rows record
it in ``plugin_versions``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUPS = {
    "defense": "genbench.defenses",
    "attack": "genbench.attacks",
    "threat model": "genbench.threat_models",
}


class UnknownNameError(KeyError):
    """An unknown registry name; the message carries "did you mean" suggestions."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


class PluginLoadError(ImportError):
    """A lazy entry or a ``module:attr`` reference that could not be imported."""


@dataclass(frozen=True)
class Provenance:
    """Which distribution a plug-in came from (recorded in every result row)."""

    dist: str
    version: str

    def __str__(self) -> str:
        return f"{self.dist}=={self.version}"


def _own_version() -> str:
    """genbench's version: the installed distribution's, else the source tree's (job keys
    hash plug-in versions, so a checkout that is not installed keys jobs the same way)."""
    try:
        return md.version("genbench")
    except md.PackageNotFoundError:
        from benchmark.version import __version__

        return __version__


def _provenance_of_module(module: str) -> Provenance:
    top = module.split(".")[0]
    if top in {"benchmark", "defenses", "attacks", "threat_models"}:
        return Provenance("genbench", _own_version())
    dists = md.packages_distributions().get(top, [])
    if dists:
        try:
            return Provenance(dists[0], md.version(dists[0]))
        except md.PackageNotFoundError:
            pass
    return Provenance(top, "unknown")


def import_ref(ref: str) -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted) and return the attribute."""
    if ":" not in ref:
        raise PluginLoadError(f"{ref!r} is not a 'package.module:attr' reference")
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginLoadError(f"cannot import module {module_name!r} for {ref!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginLoadError(
                f"module {module_name!r} has no attribute {attr!r} (from {ref!r})"
            ) from exc
    return obj


@dataclass
class _Entry:
    name: str
    obj: Any = None
    ref: str | None = None
    provenance: Provenance | None = None


class Registry(Generic[T]):
    """A name -> plug-in table for one kind of plug-in.

    ``kind`` names the kind in error messages ("defense", "attack", ...). Entries may be objects
    (registered by the decorator) or lazy ``module:attr`` strings. ``get`` resolves either, and
    also accepts a direct ``module:attr`` reference that was never registered.
    """

    def __init__(self, kind: str, *, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, _Entry] = {}
        self._discovered = False

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator: ``@DEFENSES.register("undefended")``."""

        def deco(obj: T) -> T:
            self.add(name, obj, override=override)
            return obj

        return deco

    def add(
        self,
        name: str,
        obj: T | str,
        *,
        override: bool = False,
        provenance: Provenance | None = None,
    ) -> None:
        """Register an object, or a lazy ``"module:attr"`` string."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not override:
            existing = self._entries[name]
            same = (existing.obj is obj) or (isinstance(obj, str) and existing.ref == obj)
            if not same:
                raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(obj, str):
            self._entries[name] = _Entry(name, ref=obj, provenance=provenance)
        else:
            module = getattr(obj, "__module__", "") or ""
            self._entries[name] = _Entry(
                name, obj=obj, provenance=provenance or _provenance_of_module(module)
            )

    # -- discovery ----------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if not self.entry_point_group or os.environ.get("GENBENCH_NO_PLUGINS") == "1":
            return
        for ep in md.entry_points(group=self.entry_point_group):
            dist = ep.dist
            prov = (
                Provenance(dist.metadata["Name"], dist.version) if dist is not None else None
            )
            name = ep.name
            if prov is not None and prov.dist != "genbench":
                name = f"{prov.dist}/{ep.name}"
            if name in self._entries:
                continue
            self._entries[name] = _Entry(name, ref=ep.value, provenance=prov)

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def suggest(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)

    def _unknown(self, name: str) -> UnknownNameError:
        hint = self.suggest(name)
        msg = f"unknown {self.kind} {name!r}"
        if hint:
            msg += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
        msg += f" (known: {', '.join(self.names()) or 'none'})"
        return UnknownNameError(msg)

    def get(self, name: str) -> T:
        """Resolve a registered name or a direct ``module:attr`` reference."""
        self._discover()
        entry = self._entries.get(name)
        if entry is None:
            if ":" in name:
                obj = import_ref(name)
                self._entries[name] = _Entry(
                    name, obj=obj, provenance=_provenance_of_module(name.partition(":")[0])
                )
                return obj
            raise self._unknown(name)
        if entry.obj is None:
            assert entry.ref is not None
            try:
                entry.obj = import_ref(entry.ref)
            except PluginLoadError as exc:
                raise PluginLoadError(f"{self.kind} {name!r} failed to load: {exc}") from exc
            if entry.provenance is None:
                entry.provenance = _provenance_of_module(entry.ref.partition(":")[0])
        return entry.obj

    def provenance(self, name: str) -> Provenance:
        self.get(name)
        prov = self._entries[name].provenance
        return prov if prov is not None else Provenance("unknown", "unknown")

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def safe_discover(reg: Registry[Any]) -> list[str]:
    """Resolve every entry, turning plug-ins that fail to import into warnings (not crashes)."""
    ok = []
    for name in reg.names():
        try:
            reg.get(name)
            ok.append(name)
        except Exception as exc:  # a broken third-party plug-in must not take the CLI down
            warnings.warn(f"{reg.kind} plug-in {name!r} failed to load: {exc}", stacklevel=2)
    return ok
