"""Typed plug-in registries.

One :class:`Registry` per kind (defense, attack, threat model, dataset, trainable model). A
plug-in registers where it is defined, with the registry's decorator::

    @ATTACKS.register("pgd")          # or @register_attack("pgd")
    class PGD(Attack): ...

A registry built with ``modules=`` (the built-in plug-in modules, see
:mod:`benchmark.plugins.builtin`) imports those modules on its first lookup or listing
(``names()``, ``get()``, ``in``, ...), not before: importing the registry is cheap, and the
decorators in those modules fill it. Entries may also be lazy ``"package.module:attr"`` strings
(imported on first use), or be discovered from the Python entry-point groups
``genbench.defenses``, ``genbench.attacks`` and ``genbench.threat_models`` so that a third-party
distribution registers without touching this repository. A suite file may also name a plug-in
directly as ``package.module:ClassName``.

Every resolved entry knows where it is defined (:meth:`Registry.definition`: ``module:qualname``
and ``file:line``) and the distribution (name and version) it came from
(:meth:`Registry.provenance`); result rows record the latter in ``plugin_versions``.

Inside :func:`registered_only` (what ``genbench verify`` runs under), direct references are
refused unless the user named them: a name read from someone else's file must not import code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import inspect
import linecache
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from benchmark.plugins.suggest import close_matches, did_you_mean

__all__ = ["ENTRY_POINT_GROUPS", "Definition", "PluginLoadError", "Provenance", "Registry",
           "UnknownNameError", "import_ref", "safe_discover"]

T = TypeVar("T")
#: whatever a decorator is applied to; it gets it back unchanged (its own type, not ``T``)
D = TypeVar("D")

ENTRY_POINT_GROUPS = {
    "defense": "genbench.defenses",
    "attack": "genbench.attacks",
    "threat model": "genbench.threat_models",
}

#: the repository (or installed tree) holding ``benchmark/``: definition sites are shown
#: relative to it when they lie inside it
_ROOT = Path(__file__).resolve().parents[2]
_OWN_PACKAGES = frozenset({"benchmark", "defenses", "attacks", "threat_models"})
_DEF_LINE = re.compile(r"\s*(?:async\s+def|def|class)\s+(\w+)")
#: how far below a decorator line its ``class``/``def`` line may be (stacked decorators)
_MAX_DECORATOR_LINES = 40


class UnknownNameError(KeyError):
    """An unknown registry name; the message carries "did you mean" suggestions."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


class PluginLoadError(ImportError):
    """A lazy entry or a ``module:attr`` reference that could not be imported."""


class UntrustedCodeError(PluginLoadError):
    """A direct ``module:attr`` reference refused under :func:`registered_only`."""


#: the direct references allowed in this context; None: any (the default outside verify).
_ALLOWED_REFS: ContextVar[frozenset[str] | None] = ContextVar("genbench_allowed_refs",
                                                              default=None)


@contextmanager
def registered_only(allow: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, every registry resolves registered names (built-in, lazy and
    entry-point entries) and only the direct ``module:attr`` references listed in ``allow``;
    any other raises :class:`UntrustedCodeError` before anything is imported."""
    token = _ALLOWED_REFS.set(frozenset(allow))
    try:
        yield
    finally:
        _ALLOWED_REFS.reset(token)


def _check_direct(kind: str, ref: str) -> None:
    allowed = _ALLOWED_REFS.get()
    if allowed is not None and ref not in allowed:
        raise UntrustedCodeError(
            f"{kind} {ref!r} is not a registered name, and code that is not registered is only "
            "imported when you name it (genbench verify: --defense ID=module:Class, or "
            "--trust-code)")


@dataclass(frozen=True)
class Provenance:
    """Which distribution a plug-in came from (recorded in every result row)."""

    dist: str
    version: str

    def __str__(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class Definition:
    """Where a plug-in is defined: ``ref`` is ``"module:qualname"`` (or, for an entry that could
    not be loaded, the reference it was registered under); ``file`` is relative to the
    repository when it lies inside it; ``line`` is that of its ``class``/``def`` statement."""

    ref: str
    file: str | None = None
    line: int | None = None

    @property
    def location(self) -> str:
        """``"file:line"``, ``"file"``, or ``"-"`` when unknown."""
        if self.file is None:
            return "-"
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        return self.ref if self.file is None else f"{self.ref} ({self.location})"


@functools.lru_cache(maxsize=1)
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
    if top in _OWN_PACKAGES:
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


# -- definition sites ---------------------------------------------------------------------------
def _defined_object(obj: object) -> Any:
    """The class or function that defines ``obj`` (an instance is defined by its class)."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return inspect.unwrap(obj) if inspect.isroutine(obj) else obj
    return type(obj)


def _qualified_name(obj: object) -> str | None:
    """``"module:qualname"`` of a class or function, or None for anything else."""
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    return f"{module}:{qualname}"


def _display_path(file: str) -> str:
    path = Path(file)
    try:
        return path.resolve().relative_to(_ROOT).as_posix()
    except (ValueError, OSError):
        return str(path)


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _statement_line(file: str, start: int, name: str) -> int | None:
    """The line (from ``start`` on, skipping decorators) of the ``class name``/``def name``
    statement in ``file``, or None when the first such statement found defines another name."""
    for line in range(start, start + _MAX_DECORATOR_LINES):
        text = linecache.getline(file, line)
        if not text:
            return None
        m = _DEF_LINE.match(text)
        if m:
            return line if m.group(1) == name else None
    return None


def _definition_of(obj: object, site: tuple[str, int] | None) -> Definition:
    """Where ``obj`` is defined; ``site`` is the (file, line) of its registering decorator."""
    target = _defined_object(obj)
    ref = _qualified_name(target) or f"{type(obj).__module__}:{type(obj).__qualname__}"
    name = getattr(target, "__name__", "")
    try:
        file: str | None = inspect.getsourcefile(target) or inspect.getfile(target)
    except (TypeError, OSError):  # built-in, or defined in an interactive session
        file = None
    if file is None:
        return Definition(ref)
    line = None
    if site is not None and _same_file(site[0], file):
        line = _statement_line(file, site[1], name)
    if line is None:  # registered away from its definition: ask inspect (parses the file)
        try:
            start = inspect.getsourcelines(target)[1]
        except (TypeError, OSError):
            start = 0
        if start:
            line = _statement_line(file, start, name) or start
    return Definition(ref, _display_path(file), line)


# -- the registry ---------------------------------------------------------------------------------
@dataclass
class _Entry(Generic[T]):
    name: str
    obj: T | None = None
    ref: str | None = None
    provenance: Provenance | None = None
    #: (file, line) of the decorator that registered ``obj``, when it was one
    site: tuple[str, int] | None = None
    #: resolved from a direct ``module:attr`` reference, not registered
    direct: bool = False


class Registry(Generic[T]):
    """A name -> plug-in table for one kind of plug-in.

    ``kind`` names the kind in error messages ("defense", "attack", ...). Entries may be objects
    (registered by the decorator) or lazy ``module:attr`` strings. ``get`` resolves either, and
    also accepts a direct ``module:attr`` reference that was never registered.

    ``modules`` are the modules that register this kind's built-in plug-ins (with the
    decorator) when imported: the registry imports them on its first lookup or listing, so that
    importing it imports none of them. A module that fails to import is a warning (and named in
    unknown-name errors), not a crash.
    """

    def __init__(self, kind: str, *, entry_point_group: str | None = None,
                 modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.modules: tuple[str, ...] = tuple(modules)
        self._entries: dict[str, _Entry[T]] = {}
        self._discovered = False
        self._modules_loaded = False
        self._loading = False
        self._lock = threading.RLock()
        #: built-in modules that failed to import -> the error
        self.module_errors: dict[str, str] = {}

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, *, override: bool = False) -> Callable[[D], D]:
        """Decorator: ``@DEFENSES.register("undefended")`` above the plug-in's definition.

        Records the definition site (see :meth:`definition`); the decorated object is returned
        unchanged."""
        caller = sys._getframe(1)
        site = (caller.f_code.co_filename, caller.f_lineno)

        def deco(obj: D) -> D:
            # the decorated class or function is taken to be a T (a type checker cannot relate
            # D to T); returning it as D keeps its own type for its module's users
            self._add(name, cast(T, obj), override=override, provenance=None, site=site)
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
        self._add(name, obj, override=override, provenance=provenance, site=None)

    def _add(self, name: str, obj: T | str, *, override: bool,
             provenance: Provenance | None, site: tuple[str, int] | None) -> None:
        # no lock here: a decorator runs while its module is being imported, possibly under
        # ``_load_modules`` in another thread (which holds the lock and waits for that import)
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and not override and not _same_entry(existing, obj):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(obj, str):
            self._entries[name] = _Entry(name, ref=obj, provenance=provenance)
        else:
            self._entries[name] = _Entry(name, obj=obj, provenance=provenance, site=site)

    # -- lazy loading -------------------------------------------------------------------------
    def _load_modules(self) -> None:
        """Import the built-in plug-in modules, once (their decorators fill the registry)."""
        if self._modules_loaded:
            return
        with self._lock:
            if self._modules_loaded or self._loading:  # done, or a module's import asks again
                return
            self._loading = True
            try:
                for module in self.modules:
                    try:
                        importlib.import_module(module)
                    except Exception as exc:  # listing must not fail on one broken module
                        self.module_errors[module] = f"{type(exc).__name__}: {exc}"
                        warnings.warn(f"built-in {self.kind} module {module!r} failed to "
                                      f"import: {exc}", stacklevel=3)
                self._modules_loaded = True
            finally:
                self._loading = False

    def _discover(self) -> None:
        self._load_modules()
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
        return close_matches(name, self.names(), n=3, cutoff=0.5)

    def _unknown(self, name: str) -> UnknownNameError:
        msg = f"unknown {self.kind} {name!r}{did_you_mean(name, self.names(), n=3, cutoff=0.5)}"
        msg += f" (known: {', '.join(self.names()) or 'none'})"
        for module, error in self.module_errors.items():
            msg += f"; built-in module {module!r} failed to import: {error}"
        return UnknownNameError(msg)

    def get(self, name: str) -> T:
        """Resolve a registered name or a direct ``module:attr`` reference."""
        self._discover()
        entry = self._entries.get(name)
        if entry is not None and entry.direct:
            _check_direct(self.kind, name)  # resolved before, outside registered_only
        if entry is None:
            if ":" in name:
                _check_direct(self.kind, name)
                direct: T = import_ref(name)
                self._entries[name] = _Entry(name, obj=direct, ref=name, direct=True)
                return direct
            raise self._unknown(name)
        obj = entry.obj
        if obj is None:
            assert entry.ref is not None
            try:
                loaded: T = import_ref(entry.ref)
            except PluginLoadError as exc:
                raise PluginLoadError(f"{self.kind} {name!r} failed to load: {exc}") from exc
            entry.obj = obj = loaded
        return obj

    def provenance(self, name: str) -> Provenance:
        """The distribution (and version) the plug-in ``name`` comes from (loads it)."""
        obj = self.get(name)
        entry = self._entries[name]
        if entry.provenance is None:
            module = (entry.ref.partition(":")[0] if entry.ref
                      else getattr(obj, "__module__", None) or "")
            entry.provenance = _provenance_of_module(module)
        return entry.provenance

    def definition(self, name: str) -> Definition:
        """Where the plug-in ``name`` is defined: ``module:qualname``, and the ``file:line`` of
        its ``class``/``def`` statement (relative to the repository when inside it).

        An entry that fails to load is not an error here: its registered reference is returned,
        with no file (:meth:`get` or :meth:`provenance` say why it fails)."""
        self._discover()
        entry = self._entries.get(name)
        if entry is None and ":" not in name:
            raise self._unknown(name)
        try:
            obj = self.get(name)
        except Exception:  # a broken plug-in still has a name to show
            return Definition(entry.ref if entry is not None and entry.ref else name)
        return _definition_of(obj, self._entries[name].site)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _same_entry(existing: _Entry[Any], obj: object) -> bool:
    """Whether registering ``obj`` again under an existing entry's name is harmless: the same
    object or reference, or the same ``module:qualname`` (its module imported again)."""
    if existing.obj is not None and existing.obj is obj:
        return True
    if isinstance(obj, str):
        return existing.ref == obj
    qualified = _qualified_name(obj)
    if qualified is None:
        return False
    return existing.ref == qualified or (
        existing.obj is not None and _qualified_name(existing.obj) == qualified)


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
