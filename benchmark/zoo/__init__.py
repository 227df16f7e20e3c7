"""The model zoo: small models trained by ``genbench train``, shipped as safetensors.

``manifest.json`` (next to this file) maps a model name to its architecture (a
``module:Class`` reference plus keyword arguments), its weights file (relative to this folder),
the file's sha256, how it was trained and its metrics. :func:`load_model` checks the sha256
before reading a single tensor and never unpickles anything.

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

    def path(self, *, weights_dir: str | os.PathLike[str] | None = None,
             base: Path = ZOO_DIR) -> Path:
        """Where the weights are: ``weights_dir/<file name>`` if given, else ``base/file``."""
        if weights_dir is not None:
            return Path(weights_dir) / Path(self.file).name
        p = Path(self.file)
        return p if p.is_absolute() else base / p

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["name"]
        return d

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ZooEntry:
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        missing = {"arch", "dataset", "file", "sha256"} - d.keys()
        if missing:
            raise ZooError(f"zoo manifest entry {name!r} lacks {', '.join(sorted(missing))}")
        return cls(name=name, **{k: v for k, v in d.items() if k in known})


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


def list_models(*, manifest: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the models in the zoo, sorted."""
    return sorted(_read(manifest))


def get_entry(name: str, *, manifest: str | os.PathLike[str] | None = None) -> ZooEntry:
    """The manifest entry of ``name``; :class:`UnknownModelError` with suggestions if absent."""
    models = _read(manifest)
    if name not in models:
        msg = f"unknown zoo model {name!r}{did_you_mean(name, sorted(models), n=3, cutoff=0.5)}"
        msg += f" (known: {', '.join(sorted(models)) or 'none'})"
        raise UnknownModelError(msg)
    return ZooEntry.from_json(name, models[name])


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_entry(entry: ZooEntry, *, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike[str] | None = None,
               base: Path = ZOO_DIR) -> nn.Module:
    """Build ``entry``'s architecture and load its verified weights (see :func:`load_model`)."""
    from safetensors.torch import load as load_safetensors

    path = entry.path(weights_dir=weights_dir, base=base)
    if not path.is_file():
        how = f" (produce it with `{entry.trained_by}`)" if entry.trained_by else ""
        raise ZooError(f"weights of zoo model {entry.name!r} not found at {path}{how}")
    # Hash and parse the same bytes, so the file cannot change between check and load.
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise ZooHashError(
            f"sha256 mismatch for zoo model {entry.name!r} weights file {path}: "
            f"expected {entry.sha256}, got {actual}; the file is corrupt or was replaced")
    state = load_safetensors(data)
    arch = import_ref(entry.arch)
    model = arch(**entry.arch_kwargs)
    if not isinstance(model, nn.Module):
        raise ZooError(f"zoo arch {entry.arch!r} built a {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ZooError(f"weights in {path} do not fit {entry.arch}({entry.arch_kwargs}): "
                       f"{exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def load_model(name: str, *, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike[str] | None = None,
               manifest: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load zoo model ``name`` in eval mode with frozen parameters.

    The weights file's sha256 is checked against the manifest before loading
    (:class:`ZooHashError` on mismatch). ``weights_dir`` reads the file of the same name from
    another folder (still hash-checked); ``manifest`` reads another manifest.
    """
    man = _manifest_path(manifest)
    return load_entry(get_entry(name, manifest=man), device=device, weights_dir=weights_dir,
                      base=man.resolve().parent)


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
