"""Validity flags, computed from the leaderboard rows and stored in the ``flags`` column.

Each flag is a short name; ``FLAG_HELP`` explains it. Flags are evidence that an evaluation may
be unreliable; they are data, not warnings.
"""

from __future__ import annotations

import pandas as pd

FLAG_HELP = {
    "threat_violation": "some returned adversarial examples broke the threat model or were "
                        "non-finite; they were scored as not robust",
    "nonmonotone_eps": "robust accuracy is higher at a larger epsilon than at a smaller one for "
                       "the same defense and attack (the attack is failing to optimize)",
    "attack_error": "the attack raised for this row; see the error column",
    "worst_case_incomplete": "at least one attack errored and is missing from the worst case",
}


def _nonmonotone(frame: pd.DataFrame) -> pd.Series:
    flagged = pd.Series(False, index=frame.index)
    ok = frame[frame["robust_acc"].notna()]
    for _, part in ok.groupby(["defense", "defense_params", "attack", "threat_model"]):
        part = part.sort_values("eps")
        lowest = float("inf")  # lowest robust accuracy at any smaller epsilon
        lowest_upper = float("inf")  # lowest upper interval bound at any smaller epsilon
        for idx, r in part.iterrows():
            # Deterministic: any increase is a failure (same samples, same budget);
            # stochastic: only an increase beyond the smaller epsilon's interval.
            limit = lowest_upper if r["stochastic"] else lowest
            if r["robust_acc"] > limit + 1e-12:
                flagged[idx] = True
            lowest = min(lowest, r["robust_acc"])
            lowest_upper = min(lowest_upper, r["robust_ci_high"])
    return flagged


def compute_flags(frame: pd.DataFrame) -> pd.Series:
    """A ``;``-joined string of flag names per row ('' when none fired)."""
    if frame.empty:
        return pd.Series([], dtype=object)
    names: dict[int, list[str]] = {i: [] for i in frame.index}
    for i, r in frame.iterrows():
        if (r["n_errors"] or 0) > 0:
            names[i].append("threat_violation")
        if isinstance(r["error"], str) and r["error"]:
            names[i].append("worst_case_incomplete" if r["attack"] == "worst_case"
                            else "attack_error")
    for i, hit in _nonmonotone(frame).items():
        if hit:
            names[i].append("nonmonotone_eps")
    return pd.Series({i: ";".join(v) for i, v in names.items()}, dtype=object)
