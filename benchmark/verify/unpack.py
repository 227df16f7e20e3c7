"""Unpacking a submission bundle someone else made, and reading its manifest.

Nothing in a bundle is trusted: members that could escape the destination (absolute paths,
``..``, links, devices), an empty path (``./``), duplicates, and archives over the size and
member-count limits (tar bombs) are refused before anything is written, naming the member; a
manifest that is not the expected JSON is refused the same way. Every refusal is a
:class:`BundleError`, which ``genbench verify`` reports as a REJECTED bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "genbench-bundle/1"
MANIFEST = "manifest.json"
MiB = 1 << 20
GiB = 1 << 30


class BundleError(ValueError):
    """A bundle that cannot be trusted (bad member, hash mismatch, missing or malformed file)."""


@dataclass(frozen=True)
class Limits:
    """What a bundle may unpack to. The defaults fit a full CIFAR-10 suite's adversarial examples
    (float32, about 12 KiB an image) with room to spare; ``genbench verify --max-unpacked-mb``
    and ``--max-members`` change them."""

    members: int = 100_000
    member_bytes: int = 2 * GiB
    total_bytes: int = 8 * GiB


DEFAULT_LIMITS = Limits()


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def safe_extract(bundle: str | Path, dest: str | Path, limits: Limits | None = None) -> list[str]:
    """Extract regular files and folders only; refuse anything that could escape ``dest`` or
    exceed ``limits``. Sizes are checked on the members' headers before their data is read."""
    limits = limits or DEFAULT_LIMITS
    dest = Path(dest).resolve()
    names: list[str] = []
    seen: set[str] = set()
    total = 0
    try:
        tar = tarfile.open(bundle, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{bundle} is not a readable bundle: {exc}") from exc
    with tar:
        count = 0
        try:
            for m in tar:  # streamed: a bomb of members is refused at the limit, not listed
                count += 1
                if count > limits.members:
                    raise BundleError(f"refused bundle: more than {limits.members} members "
                                      "(the limit; --max-members raises it)")
                total += _check_member(m, dest, seen, limits, total)
                if m.isdir():
                    (dest / m.name).resolve().mkdir(parents=True, exist_ok=True)
                    continue
                target = (dest / PurePosixPath(m.name)).resolve()
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise BundleError(f"refused member {m.name!r}: unreadable")
                data = src.read(m.size + 1)
                if len(data) != m.size:
                    raise BundleError(f"refused member {m.name!r}: its data does not match "
                                      "its header's size")
                target.write_bytes(data)
                names.append(str(PurePosixPath(m.name)))
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{bundle} is not a readable bundle: {exc}") from exc
    return names


def _check_member(m: tarfile.TarInfo, dest: Path, seen: set[str], limits: Limits,
                  total: int) -> int:
    """Refuse ``m`` unless it is a safe, new, in-limit regular file or folder; its size."""
    path = PurePosixPath(m.name)
    if m.name.startswith(("/", "\\")) or path.is_absolute() or (
            path.parts and ":" in path.parts[0]):
        raise BundleError(f"refused member {m.name!r}: absolute path")
    if ".." in path.parts or "\\" in m.name:
        raise BundleError(f"refused member {m.name!r}: path escapes the bundle folder")
    if not path.parts or str(path) == ".":
        raise BundleError(f"refused member {m.name!r}: empty path (the bundle folder itself; "
                          "genbench submit never writes one)")
    if m.issym() or m.islnk():
        raise BundleError(f"refused member {m.name!r}: links are not allowed "
                          f"(-> {m.linkname!r})")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"refused member {m.name!r}: not a regular file")
    if not (dest / path).resolve().is_relative_to(dest):
        raise BundleError(f"refused member {m.name!r}: path escapes the bundle folder")
    if str(path) in seen:
        raise BundleError(f"refused member {m.name!r}: a second member with the same path "
                          "(which one counts would depend on the unpacker)")
    seen.add(str(path))
    if m.isdir():
        return 0
    if m.size > limits.member_bytes:
        raise BundleError(f"refused member {m.name!r}: {_size(m.size)} unpacked, over the "
                          f"{_size(limits.member_bytes)} limit per member")
    if total + m.size > limits.total_bytes:
        raise BundleError(f"refused member {m.name!r}: the bundle unpacks to more than "
                          f"{_size(limits.total_bytes)} (the limit; --max-unpacked-mb raises it)")
    return int(m.size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def read_json(root: Path, name: str) -> Any:
    """A JSON member of the bundle; BundleError (naming it) when it is not valid JSON."""
    try:
        return json.loads((root / name).read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"bundle has no {name}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{name}: not valid JSON ({exc})") from exc


def check_manifest(root: Path, names: list[str]) -> dict[str, Any]:
    """The bundle's manifest, after checking its form and every file's sha256."""
    if MANIFEST not in names:
        raise BundleError(f"bundle has no {MANIFEST}")
    manifest = read_json(root, MANIFEST)
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
            for k, v in listed.items()):
        raise BundleError(f"{MANIFEST}: 'files' must map each file to its sha256 (64 hex "
                          "digits)")
    if not isinstance(manifest.get("suite"), str):
        raise BundleError(f"{MANIFEST}: 'suite' must be the suite's name")
    for name in sorted(set(names) - set(listed) - {MANIFEST}):
        raise BundleError(f"{name}: file not listed in the manifest")
    for name, digest in sorted(listed.items()):
        if name not in names:
            raise BundleError(f"{name}: listed in the manifest but missing from the bundle")
        actual = sha256((root / name).read_bytes())
        if actual != digest:
            raise BundleError(f"{name}: sha256 mismatch (manifest {digest[:12]}..., file "
                              f"{actual[:12]}...): the file was modified")
    return manifest
