"""One run at a time per run folder: an advisory lock on ``<out>/.lock``.

Two ``genbench run`` on one ``--out`` would compute every pending job twice, and ``--fresh``
would move the store from under a live writer. :func:`run_lock` takes ``fcntl.flock`` on
``<out>/.lock`` (never waiting) and writes the holder into it: pid, host, start time and command
line. A second run fails at once with :class:`RunLockedError`, naming the holder. The kernel
releases the lock when its holder exits, however it exits, so a lock left by a process that died
is stale and the next run takes it over (the file is rewritten).

The lock is reentrant within a thread (``genbench run`` holds it around the run and the tables
it writes afterwards; the harness takes it again inside), never across threads or processes.

Where ``fcntl`` is missing (Windows) or the file system refuses locks, runs are not locked; a
warning says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmark.store import StoreError

LOCK_NAME = ".lock"
_held = threading.local()


class RunLockedError(StoreError):
    """Another live process holds the run folder's lock."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": time.time(),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}


def read_holder(out: str | Path) -> dict[str, Any] | None:
    """What ``out/.lock`` says about its (last) holder; None if there is nothing readable."""
    try:
        info = json.loads((Path(out) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(out: Path, info: dict[str, Any] | None) -> str:
    if info is None:
        who = "another process (its details are not readable yet)"
    else:
        who = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
               f"{info.get('started', '?')}")
        if info.get("command"):
            who += f" ({info['command']})"
    return (f"run folder {out} is in use by another genbench run: {who}. Wait for it to "
            f"finish, or stop it, or use another --out (the lock is {out / LOCK_NAME}; it is "
            "released when its holder exits)")


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold the run folder ``out``'s lock for the ``with`` block (``out`` is created if
    missing, and removed again if nothing but the lock was written into it). Raises
    :class:`RunLockedError` at once when a live process holds it."""
    out = Path(out)
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    me = out.resolve()
    if me in held:  # this thread holds it already
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    held.add(me)
    try:
        yield from _locked(out)
    finally:
        held.discard(me)
        if created:  # a run that failed before writing anything leaves no folder behind
            _remove_if_only_lock(out)


def _remove_if_only_lock(out: Path) -> None:
    try:
        if [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink()
            out.rmdir()
    except OSError:
        pass


def _locked(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        warnings.warn("no fcntl: the run folder is not locked against concurrent runs",
                      stacklevel=3)
        yield
        return
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(_describe(out, read_holder(out))) from None
        except OSError as exc:  # e.g. ENOLCK on a file system without locks
            warnings.warn(f"cannot lock {path} ({exc}); the run folder is not locked against "
                          "concurrent runs", stacklevel=3)
            yield
            return
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder(), indent=1) + "\n").encode())
        os.fsync(fd)
        try:
            yield
        finally:
            # say that nobody holds it any more, then let go (closing releases the lock)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)
