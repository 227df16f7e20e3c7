"""A module whose import, and whose class, leave a marker file (``$GENBENCH_MARKER``): forged
bundles name it to prove that ``genbench verify`` never imports or runs code a bundle names."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def _mark(what: str) -> None:
    target = os.environ.get("GENBENCH_MARKER")
    if target:
        with Path(target).open("a") as fh:
            fh.write(what + "\n")


_mark("imported")


class Boom(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        _mark("built")
