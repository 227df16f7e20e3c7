"""The one "did you mean" helper behind every unknown-name error of genbench.

>>> did_you_mean("pgdd", ["pgd", "eot", "stadv"])
"; did you mean 'pgd'?"
>>> did_you_mean("zzz", ["pgd", "eot"])
''
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

__all__ = ["close_matches", "did_you_mean"]


def close_matches(name: object, candidates: Iterable[str], *, n: int = 3,
                  cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``candidates`` close to ``name`` (best first; ``difflib`` similarity of at
    least ``cutoff``). ``name`` may be any object: a suite's typo need not be a string."""
    return difflib.get_close_matches(str(name), list(candidates), n=n, cutoff=cutoff)


def did_you_mean(name: object, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.5,
                 show: Callable[[str], str] | None = None) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the candidates close to ``name``, or ``""`` when none
    is; meant to follow ``f"unknown thing {name!r}"`` in an error message. ``show`` maps a
    matching candidate to the text suggested (e.g. without a prefix the user does not type)."""
    hint = close_matches(name, candidates, n=n, cutoff=cutoff)
    if not hint:
        return ""
    shown = hint if show is None else [show(h) for h in hint]
    return f"; did you mean {' or '.join(repr(h) for h in shown)}?"
