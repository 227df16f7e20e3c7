"""Cell-level helpers shared by every table the report writes: percentages, spreadsheet-safe
text, and the plug-in versions of a row."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

#: relative tolerance when matching epsilons: published CSVs wrote them with "%.6g" (8/255
#: reads back as 0.0313725, at most 5e-6 off, relative); a suite's epsilons differ by far more.
EPS_RTOL = 1e-5

#: text cells starting with these would run as formulas in a spreadsheet.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def is_number(v: Any) -> bool:
    """A present, non-NaN number (None, NaN and pandas' NA are missing)."""
    if v is None or isinstance(v, str):
        return False
    try:
        return not (isinstance(v, float) and math.isnan(v)) and not bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal; '' when missing."""
    return f"{100 * float(v):.1f}" if is_number(v) else ""


def csv_safe(value: Any) -> Any:
    """Neutralize spreadsheet formulas in text cells (a name starting with = + - @)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_unsafe(value: Any) -> Any:
    """Undo :func:`csv_safe`."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(
            FORMULA_PREFIXES):
        return value[1:]
    return value


def plugin_versions(jobs: Iterable[Mapping[str, Any]]) -> str:
    """The ``;``-joined, sorted plug-in versions (``dist==version``) of a row's jobs."""
    return ";".join(sorted({v for j in jobs for v in j["plugin_versions"].values()}))


def same_eps(a: Any, b: Any) -> bool:
    """Whether two epsilons are the same up to the rounding of a "%.6g" CSV (both missing counts
    as the same: a density defense's clean row has none)."""
    a_missing, b_missing = not is_number(a), not is_number(b)
    if a_missing or b_missing:
        return a_missing and b_missing
    return math.isclose(float(a), float(b), rel_tol=EPS_RTOL, abs_tol=1e-12)


def eps_text(value: Any) -> str:
    """An epsilon as CSV text that reads back as the same float (``repr``); '' when missing."""
    return repr(float(value)) if is_number(value) else ""


def code_versions(jobs: Iterable[Mapping[str, Any]]) -> str:
    """The ``;``-joined, sorted code versions that computed a row's jobs (more than one: the row
    mixes results of different code, flag ``mixed_code_versions``)."""
    return ";".join(sorted({str(j["code_version"]) for j in jobs}))


def mixed_code(row: Any) -> bool:
    """Whether a row's jobs were computed by more than one code version."""
    value = row.get("code_version")
    return isinstance(value, str) and ";" in value


def all_code_versions(frame: pd.DataFrame) -> str:
    """Every code version behind a table's rows, sorted and comma-separated (for headers)."""
    if "code_version" not in frame.columns:
        return ""
    return ", ".join(sorted({v for cell in frame["code_version"] if isinstance(cell, str)
                             for v in cell.split(";") if v}))
