"""A bundle's claimed leaderboard rows against the rows its trusted plan produces.

The verifier rebuilds the leaderboard with the leaderboard's own code
(:func:`benchmark.report.leaderboard.build_leaderboard`) twice: from the bundle's recorded
per-sample outcomes, and from the re-scored ones. The worst case (without diagnostic attacks),
the clean accuracy and K thus follow the published rules. Each claimed row is matched to a
rebuilt one (epsilons up to the rounding of a ``%.6g`` CSV): a claim with no jobs behind it, a
row the plan produces that is not claimed, and a duplicate are failures. A matched row must then

* follow from ``outcomes.csv``: n, K, stochastic, accuracies and their 95% intervals equal those
  the recorded outcomes give (an inflated number, or an interval widened to [0, 1], does not);
* for a deterministic defense, equal the re-scored accuracies (robust and clean). A stochastic
  defense's re-scoring draws afresh: its recorded draws are tested against the fresh ones
  instead (:func:`benchmark.report.stats.exchangeable_draws`, in ``genbench verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from benchmark.report.cells import is_number
from benchmark.report.compare import RowIndex
from benchmark.report.evidence import RowKey, row_key

#: absolute tolerance on accuracies and interval ends: a leaderboard CSV writes them with
#: "%.6g" (at most 5e-7 off for numbers in [0, 1]).
TOL = 1e-6
#: the columns a claimed leaderboard must have
REQUIRED = ("defense", "attack", "threat_model", "eps", "n", "clean_acc", "clean_ci_low",
            "clean_ci_high", "robust_acc", "robust_ci_low", "robust_ci_high", "stochastic",
            "k_draws", "error")


@dataclass
class Matching:
    """Claimed rows matched to the rows the trusted plan produces."""

    pairs: list[tuple[RowKey, Any, Any]] = field(default_factory=list)  # (key, claim, row)
    fabricated: list[Any] = field(default_factory=list)  # claims with no jobs behind them
    dropped: list[RowKey] = field(default_factory=list)  # rows produced but not claimed
    duplicates: list[Any] = field(default_factory=list)


def label(key: RowKey) -> str:
    did, aid, threat, eps = key
    return f"{did} / {aid}" + (f" {threat} eps={eps:g}" if threat else "")


def match(claims: pd.DataFrame, expected: dict[RowKey, Any]) -> Matching:
    """Match every claimed row to an expected row (``expected``: key -> recomputed row, or None
    for rows whose numbers are not recomputed, e.g. a density defense's)."""
    index = RowIndex(expected)
    out = Matching()
    seen: set[RowKey] = set()
    for _, claim in claims.iterrows():
        found = index.find(row_key(claim))
        if found is None:
            out.fabricated.append(claim)
        elif found in seen:
            out.duplicates.append(claim)
        else:
            seen.add(found)
            out.pairs.append((found, claim, expected[found]))
    out.dropped = [k for k in expected if k not in seen]
    return out


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _flag(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    return {"true": True, "1": True, "1.0": True, "false": False, "0": False,
            "0.0": False}.get(text)


#: the columns of a classifier row that follow from the per-sample outcomes
CONSISTENT = ("n", "k_draws", "stochastic", "clean_acc", "clean_ci_low", "clean_ci_high",
              "robust_acc", "robust_ci_low", "robust_ci_high")


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool | np.bool_):
        return _flag(a) is bool(b)
    if not is_number(a) or not is_number(b):
        return not is_number(a) and not is_number(b)
    return abs(float(a) - float(b)) <= TOL


def _show(v: Any) -> str:
    return f"{float(v):.4g}" if is_number(v) and not isinstance(v, bool) else str(v)


def check_row(key: RowKey, claim: Any, recorded: Any, rescored: Any = None) -> tuple[bool, str]:
    """(ok, message) for a claimed row. ``recorded``: the row the bundle's own per-sample
    outcomes give (by the leaderboard's code); ``rescored``: the row of the re-scored outcomes,
    or None where the defense was not re-scored."""
    name = label(key)
    if _text(recorded["error"]) and not is_number(recorded["robust_acc"]):
        if _text(claim["error"]) and not is_number(claim["robust_acc"]):
            return True, f"{name}: errored in the submission, as the row says (no numbers)"
        return False, f"{name}: its jobs errored, but the row claims numbers"
    if not is_number(claim["robust_acc"]) or not is_number(claim["n"]):
        return False, (f"{name}: the row claims no numbers, but its jobs give robust accuracy "
                       f"{recorded['robust_acc']:.4f}")
    problems: list[str] = []
    exact = rescored is not None and not bool(rescored["stochastic"])
    if exact:
        for what, col in (("robust", "robust_acc"), ("clean", "clean_acc")):
            got, claimed = float(rescored[col]), float(claim[col])
            if not abs(got - claimed) <= TOL:
                problems.append(f"re-scored {what} accuracy {got:.4f}, claimed {claimed:.4f} "
                                "(deterministic defense: must match exactly)")
    differ = [c for c in CONSISTENT if not _same(claim[c], recorded[c])]
    if differ:
        problems.append("the row does not follow from outcomes.csv: " + ", ".join(
            f"{c} claimed {_show(claim[c])}, outcomes give {_show(recorded[c])}"
            for c in differ))
    if problems:
        return False, f"{name}: " + "; ".join(problems)
    shown = (f"robust {float(claim['robust_acc']):.4f} [{float(claim['robust_ci_low']):.4f}, "
             f"{float(claim['robust_ci_high']):.4f}], clean {float(claim['clean_acc']):.4f}")
    if rescored is None:
        return True, f"{name}: claimed {shown} follow from outcomes.csv (not re-scored)"
    if exact:
        return True, (f"{name}: re-scored robust {float(rescored['robust_acc']):.4f}, clean "
                      f"{float(rescored['clean_acc']):.4f}; claimed {shown} (exact: a "
                      "deterministic defense)")
    return True, (f"{name}: claimed {shown} follow from outcomes.csv (a stochastic defense: "
                  f"fresh draws re-score robust {float(rescored['robust_acc']):.4f}, clean "
                  f"{float(rescored['clean_acc']):.4f}; its draws are tested above)")
