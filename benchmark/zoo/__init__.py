"""The model zoo: small models trained by ``genbench train``, shipped as safetensors, and the
user's own checkpoints registered beside them.

``manifest.json`` (next to this file) maps a model name to its architecture (a
``module:Class`` reference plus keyword arguments), its weights file (relative to this folder),
the file's sha256, how it was trained and its metrics. :func:`load_model` checks the sha256
before reading a single tensor and never unpickles anything.

User models (published checkpoints: diffusers UNet folders, RobustBench state dicts) go through
the same lookup, so every defense that takes ``denoiser="..."`` or ``classifier="..."`` takes
them by name. They come from registry files in the manifest's schema plus a few fields
(:mod:`benchmark.zoo.user`: ``$GENBENCH_MODELS``, default ``~/.config/genbench/models.json``,
written by ``genbench models add``) and from the entry-point group ``genbench.models``. A user
model may not take a shipped model's name, nor another user model's (both are refused, naming
the files). The extra entry fields:

* ``format``: ``"safetensors"`` (the default: ``arch`` + ``arch_kwargs``, as the zoo),
  ``"state-dict"`` (a ``torch.save`` file read with ``weights_only=True``, or safetensors; see
  ``state_dict_key`` and ``strip_prefix``) or ``"diffusers"`` (``file`` is a ``UNet2DModel``
  folder; ``sha256`` is its safetensors weights', ``config_sha256`` its config.json's);
* ``denoiser``: wrap the network as a Denoiser: :class:`benchmark.zoo.external.EpsAdapter`'s
  keyword arguments (``time`` convention, ``num_classes``, ``null_class``, ...);
* ``normalization``: ``{"mean": [...], "std": [...]}`` applied inside the classifier.

>>> net = load_model("digits-cnn")          # eval mode, parameters frozen
>>> get_entry("digits-cnn").metrics["clean_acc_test"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.plugins.registry import UnknownNameError, import_ref
from benchmark.plugins.suggest import did_you_mean

__all__ = [
    "ARCH_ALIASES",
    "FORMATS",
    "ZOO_DIR",
    "UnknownModelError",
    "ZooEntry",
    "ZooError",
    "ZooHashError",
    "file_sha256",
    "get_entry",
    "list_models",
    "load_entry",
    "load_model",
    "register_model",
]

#: the folder holding manifest.json and weights/ (inside the installed package).
ZOO_DIR = Path(__file__).resolve().parent
_MANIFEST = ZOO_DIR / "manifest.json"


class ZooError(RuntimeError):
    """A zoo model that cannot be loaded (missing file, bad manifest entry)."""


class ZooHashError(ZooError):
    """A weights file whose sha256 differs from the manifest; nothing was loaded from it."""


class UnknownModelError(UnknownNameError):
    """No zoo model of that name; the message carries "did you mean" suggestions."""


@dataclass(frozen=True)
class ZooEntry:
    """One manifest entry. ``file`` is relative to the manifest's folder (or absolute)."""

    name: str
    arch: str
    dataset: str
    file: str
    sha256: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    trained_by: str = ""
    metrics: dict[str, float] = field(default_factory=dict, hash=False)
    created: str = ""
    dataset_version: str = ""
    #: how the weights are stored: "safetensors", "state-dict" or "diffusers" (a folder)
    format: str = "safetensors"
    #: diffusers: the sha256 of the folder's config.json
    config_sha256: str = ""
    #: EpsAdapter keyword arguments: wrap the network as a Denoiser (time convention, classes)
    denoiser: dict[str, Any] = field(default_factory=dict, hash=False)
    #: {"mean": [...], "std": [...]}: normalization applied inside the (classifier) model
    normalization: dict[str, Any] = field(default_factory=dict, hash=False)
    #: state-dict: the checkpoint entry holding the weights ("state_dict"), a prefix to strip
    state_dict_key: str = ""
    strip_prefix: str = ""
    #: where a user model was registered (registry file or entry point); "" for the zoo's own
    source: str = field(default="", compare=False)

    def path(self, *, weights_dir: str | os.PathLike[str] | None = None,
             base: Path = ZOO_DIR) -> Path:
        """Where the weights are: ``weights_dir/<file name>`` if given, else ``base/file``."""
        if weights_dir is not None:
            return Path(weights_dir) / Path(self.file).name
        p = Path(self.file)
        return p if p.is_absolute() else base / p

    @property
    def is_user(self) -> bool:
        """A user model (registered from a file or an entry point), not a shipped one."""
        return bool(self.source)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["name"], d["source"]
        for key in _USER_FIELDS:  # left out at their defaults: the shipped manifest is unchanged
            if d[key] == _FIELD_DEFAULTS[key]:
                del d[key]
        return d

    def loading_spec(self) -> dict[str, Any]:
        """What, besides the weights' sha256, decides the network a user entry builds (result
        rows record it: :mod:`benchmark.spec.fingerprint`)."""
        return {"format": self.format, "arch": self.arch, "arch_kwargs": self.arch_kwargs,
                "config_sha256": self.config_sha256, "denoiser": self.denoiser,
                "normalization": self.normalization, "state_dict_key": self.state_dict_key,
                "strip_prefix": self.strip_prefix}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any], *, source: str = "") -> ZooEntry:
        where = f" (in {source})" if source else ""
        if not isinstance(d, dict):
            raise ZooError(f"model entry {name!r}{where}: expected a JSON object, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"name", "source"}
        required = {"dataset", "file", "sha256"} | (
            set() if d.get("format") == "diffusers" else {"arch"})
        missing = required - d.keys()
        if missing:
            raise ZooError(f"model entry {name!r}{where} lacks {', '.join(sorted(missing))}")
        unknown = sorted(set(d) - known)
        if unknown and source:
            raise ZooError(f"model entry {name!r}{where}: unknown field(s) {unknown} (expected "
                           f"some of {sorted(known)})"
                           f"{did_you_mean(unknown[0], sorted(known), n=1, cutoff=0.6)}")
        fmt = d.get("format", "safetensors")
        if fmt not in FORMATS:
            raise ZooError(f"model entry {name!r}{where}: unknown format {fmt!r} (expected one "
                           f"of {', '.join(FORMATS)})"
                           f"{did_you_mean(str(fmt), list(FORMATS), n=1, cutoff=0.5)}")
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("arch", "")
        return cls(name=name, source=source, **kw)


#: how a model's weights may be stored (see the module docstring).
FORMATS = ("safetensors", "state-dict", "diffusers")
#: entry fields only user models use; left out of the JSON at their defaults.
_USER_FIELDS = ("format", "config_sha256", "denoiser", "normalization", "state_dict_key",
                "strip_prefix")
_FIELD_DEFAULTS: dict[str, Any] = {"format": "safetensors", "config_sha256": "", "denoiser": {},
                                   "normalization": {}, "state_dict_key": "",
                                   "strip_prefix": ""}
#: short names for the shipped architectures of published classifiers.
ARCH_ALIASES = {
    "wrn-28-10": "benchmark.zoo.wideresnet:wrn_28_10",
    "wrn-70-16": "benchmark.zoo.wideresnet:wrn_70_16",
    "wideresnet": "benchmark.zoo.wideresnet:WideResNet",
    "dm-wideresnet": "benchmark.zoo.wideresnet:DMWideResNet",
}


def _manifest_path(manifest: str | os.PathLike[str] | None) -> Path:
    return Path(manifest) if manifest is not None else _MANIFEST


def _read(manifest: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    path = _manifest_path(manifest)
    if not path.exists():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ZooError(f"{path}: expected a JSON object mapping model names to entries")
    return raw


def _user(manifest: str | os.PathLike[str] | None, shipped: dict[str, Any]) -> dict[str, Any]:
    """User models (name -> ZooEntry) beside the shipped manifest; none beside another one."""
    if manifest is not None:
        return {}
    from benchmark.zoo.user import user_entries

    return user_entries(shipped=set(shipped))


def list_models(*, manifest: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the models in the zoo and (beside the shipped manifest) the user's, sorted."""
    shipped = _read(manifest)
    return sorted([*shipped, *_user(manifest, shipped)])


def get_entry(name: str, *, manifest: str | os.PathLike[str] | None = None) -> ZooEntry:
    """The manifest entry of ``name`` (a zoo or a user model); :class:`UnknownModelError` with
    suggestions if absent."""
    models = _read(manifest)
    if name in models:
        return ZooEntry.from_json(name, models[name])
    user = _user(manifest, models)
    if name in user:
        entry: ZooEntry = user[name]
        return entry
    names = sorted([*models, *user])
    msg = f"unknown zoo model {name!r}{did_you_mean(name, names, n=3, cutoff=0.5)}"
    msg += f" (known: {', '.join(names) or 'none'})"
    if manifest is None:
        from benchmark.zoo.user import registry_paths

        where = ", ".join(str(p) for p in registry_paths()) or "none ($GENBENCH_MODELS is empty)"
        msg += f"; user model registries read: {where}"
    raise UnknownModelError(msg)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified_bytes(entry: ZooEntry, path: Path, expected: str, what: str) -> bytes:
    """The bytes of ``path`` after checking their sha256 (hash and parse the same bytes, so the
    file cannot change between check and load)."""
    kind = "user model" if entry.is_user else "zoo model"
    if not path.is_file():
        how = f" (produce it with `{entry.trained_by}`)" if entry.trained_by else ""
        where = f"; registered in {entry.source}" if entry.is_user else ""
        raise ZooError(f"{what} of {kind} {entry.name!r} not found at {path}{how}{where}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        again = (f"; if you replaced it on purpose, register it again (`genbench models add "
                 f"{entry.name} ...`)") if entry.is_user else ""
        raise ZooHashError(
            f"sha256 mismatch for {kind} {entry.name!r} {what} {path}: "
            f"expected {expected}, got {actual}; the file is corrupt or was replaced{again}")
    return data


def _build_arch(entry: ZooEntry) -> nn.Module:
    ref = ARCH_ALIASES.get(entry.arch, entry.arch)
    if not ref:
        raise ZooError(f"model {entry.name!r} names no arch (a 'module:Class' or one of "
                       f"{', '.join(sorted(ARCH_ALIASES))})")
    arch = import_ref(ref)
    model = arch(**entry.arch_kwargs)
    if not isinstance(model, nn.Module):
        raise ZooError(f"zoo arch {entry.arch!r} built a {type(model).__name__}, not an nn.Module")
    return model


def load_entry(entry: ZooEntry, *, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike[str] | None = None,
               base: Path = ZOO_DIR) -> nn.Module:
    """Build ``entry``'s architecture and load its verified weights (see :func:`load_model`)."""
    from safetensors.torch import load as load_safetensors

    from benchmark.zoo import external

    path = entry.path(weights_dir=weights_dir, base=base)
    model: nn.Module
    try:
        if entry.format == "diffusers":
            if not path.is_dir():
                raise ZooError(f"user model {entry.name!r}: diffusers folder {path} not found "
                               f"(registered in {entry.source or 'the manifest'})")
            config_path = path / external.DIFFUSERS_CONFIG
            config_bytes = (_verified_bytes(entry, config_path, entry.config_sha256, "config")
                            if entry.config_sha256 else external.read_diffusers_config(path))
            config = external.parse_diffusers_config(config_bytes, config_path)
            weights = _verified_bytes(entry, external.diffusers_weights_path(path), entry.sha256,
                                      "weights file")
            net = external.load_diffusers_folder(path, weights, config)
            kw = external.diffusers_adapter_kwargs(config)
            embeds = kw.pop("num_class_embeds", 0)
            opts = {"time": "ddpm", **kw, **entry.denoiser}
            if embeds and "num_classes" not in entry.denoiser:
                opts["num_classes"] = embeds - (opts.get("null_class") is not None)
            model = external.EpsAdapter(net, **opts)
        else:
            data = _verified_bytes(entry, path, entry.sha256, "weights file")
            if entry.format == "state-dict":
                state = external.select_state_dict(
                    external.load_state_dict_bytes(data, path), path,
                    key=entry.state_dict_key, strip_prefix=entry.strip_prefix)
            else:
                state = load_safetensors(data)
            model = _build_arch(entry)
            try:
                external.load_into(model, state, f"weights in {path}")
            except external.ExternalModelError as exc:
                raise ZooError(f"{exc} (arch {entry.arch}({entry.arch_kwargs}))") from None
            if entry.normalization:
                norm = entry.normalization
                if set(norm) != {"mean", "std"}:
                    raise ZooError(f"model {entry.name!r}: normalization must be "
                                   f"{{'mean': [...], 'std': [...]}}, got {norm!r}")
                model = external.Normalized(model, norm["mean"], norm["std"])
            if entry.denoiser:
                from benchmark.zoo.denoiser import Denoiser

                if isinstance(model, Denoiser):
                    raise ZooError(f"model {entry.name!r}: {entry.arch} is already a Denoiser; "
                                   f"leave out the denoiser options")
                model = external.EpsAdapter(model, **entry.denoiser)
    except external.ExternalModelError as exc:
        raise type(exc)(f"model {entry.name!r}: {exc}") from None
    except (TypeError, ValueError) as exc:  # bad adapter or architecture options
        raise ZooError(f"model {entry.name!r} (registered in {entry.source or 'the manifest'}): "
                       f"{exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def load_model(name: str, *, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike[str] | None = None,
               manifest: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load zoo (or user) model ``name`` in eval mode with frozen parameters.

    The weights file's sha256 is checked against the manifest (the user registry) before
    loading (:class:`ZooHashError` on mismatch). ``weights_dir`` reads the file of the same name
    from another folder (still hash-checked); ``manifest`` reads another manifest (and no user
    registry).
    """
    man = _manifest_path(manifest)
    return load_entry(get_entry(name, manifest=manifest), device=device,
                      weights_dir=weights_dir, base=man.resolve().parent)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An advisory lock on the manifest's folder, so concurrent trainings do not clobber it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the write itself stays atomic
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def register_model(entry: ZooEntry, path: str | os.PathLike[str], *,
                   manifest: str | os.PathLike[str] | None = None) -> ZooEntry:
    """Add or replace ``entry`` in the manifest, for the weights at ``path``.

    The sha256 is recomputed from ``path`` and ``file`` is stored relative to the manifest's
    folder when ``path`` lies inside it. The manifest is rewritten atomically (write to a
    temporary file, then rename) under an advisory lock. Returns the entry as stored.
    """
    man = _manifest_path(manifest).resolve()
    weights = Path(path).resolve()
    try:
        rel = weights.relative_to(man.parent).as_posix()
    except ValueError:
        rel = str(weights)
    stored = dataclasses.replace(entry, file=rel, sha256=file_sha256(weights))
    with _locked(man.parent):
        models = _read(man)
        models[stored.name] = stored.to_json()
        text = json.dumps(dict(sorted(models.items())), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=man.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, man)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return stored
