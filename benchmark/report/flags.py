"""Validity flags, computed from the leaderboard rows and stored in the ``flags`` column.

Each flag is a short name; ``FLAG_HELP`` explains it in one line. Flags are evidence that an
evaluation may be unreliable; they are data, not warnings.

Some flags need only the rows (non-monotone epsilon, more steps, BPDA vs exact, a black-box
attack beating the white-box ones by accuracy, jobs of mixed code versions); others need
evidence from the store
(:func:`collect_evidence`): the attacks' ``extras`` (PGD's ``zero_grad_frac``, AutoAttack's
warnings), per-sample outcomes (a black-box attack breaking samples that every white-box attack
failed on) and the clean jobs' gradient diagnostics (:mod:`benchmark.run.diagnostics`).

What a row's attack is (black box, BPDA, diagnostic) is read from its plug-in's declared traits
(:class:`benchmark.api.attack.AttackTraits`), never from its name: ``torchattacks`` with
``attack = "Square"`` and ``autoattack`` with ``attacks = ["square"]`` declare themselves
gradient-free, ``bpda`` declares a surrogate gradient and names the attack it wraps.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import pandas as pd

from benchmark.api.attack import AttackTraits
from benchmark.plugins.traits import attack_traits
from benchmark.report.cells import mixed_code
from benchmark.report.evidence import WORST, FlagEvidence, row_key
from benchmark.report.stats import mcnemar_exact

FLAG_HELP = {
    "threat_violation": "some samples were scored as not robust without a valid attack: the "
                        "returned adversarial example broke the threat model or was non-finite, "
                        "or the defense returned non-finite logits or raised on a valid one "
                        "(each sample's reason is in the store and in a bundle's outcomes.csv)",
    "nonmonotone_eps": "robust accuracy is higher at a larger epsilon than at a smaller one for "
                       "the same defense and attack (the attack is failing to optimize)",
    "attack_error": "the attack raised for this row; see the error column",
    "worst_case_incomplete": "at least one attack errored and is missing from the worst case",
    "blackbox_beats_whitebox": "a black-box attack (Square) broke samples that every white-box "
                               "attack failed on: the gradients mislead the white-box attacks",
    "more_steps_higher_acc": "more steps of the same attack gave a higher robust accuracy "
                             "(the attack is not converging; its budget or step size is off)",
    "bad_gradients": "input gradients are mostly zero, non-finite, exploding or detached "
                     "(gradient masking; white-box numbers are upper bounds at best)",
    "grad_randomness_no_eot": "repeated input gradients of a stochastic defense disagree "
                              "(low pairwise cosine) and this attack used no EOT",
    "bpda_exact_disagree": "BPDA and the exact-gradient attack disagree beyond their 95% "
                           "intervals (one of the two gradients is wrong)",
    "above_chance_at_sanity_eps": "accuracy is above chance at an epsilon that can turn every "
                                  "image into the same gray image: the attack must have failed",
    "unconstrained_attack_failure": "rerun at an epsilon that allows any image (l-inf 1, l2 "
                                    "sqrt(D)) on a few samples, this attack left some of them "
                                    "classified correctly: its optimization fails on this "
                                    "defense, so its bounded rows are upper bounds at best "
                                    "(Pintor et al. 2022)",
    "undeclared_randomness": "the defense declares stochastic = False, but two passes over the "
                             "same images disagreed: it was scored as stochastic (K draws, EOT "
                             "attacks planned), and its own declaration is wrong",
    "mixed_code_versions": "the row's jobs were computed by different code versions (a resumed "
                           "run); genbench run --rerun-stale recomputes the older ones",
    "unstable_predictions": "the deterministic defense's margin changes by more than 10% "
                            "(mean relative change) under uniform noise of width 8/255 on "
                            "clean samples: its loss surface is too rough for gradient "
                            "attacks to follow (Pintor et al. 2022)",
    "single_step_beats_iterative": "the cell's single-step probe (its first iterative "
                                   "white-box attack with one step, on the first samples) broke "
                                   "samples this iterative attack left robust: the iterative "
                                   "attack is failing (Carlini et al. 2019); on a worst case, "
                                   "samples every attack left robust",
    "no_transfer": "density rows: the reported NLL (the reporting solver's) moved against "
                   "the attack's direction from its start to its result, beyond the 95% "
                   "interval of the paired per-sample change: the attack "
                   "optimized an objective (a fast solver, a fixed probe) that does not "
                   "transfer to the number the detector reports",
    "silent_success": "on a deterministic defense, the attack evaluated an adversarial iterate "
                      "for some sample but returned an example the defense classifies "
                      "correctly: it threw away a success (Pintor et al. 2022)",
    "incomplete_optimization": "for at least 10% of the samples this row counts robust, the "
                               "attack's best loss (its curve rescaled to [0, 1]) still rose "
                               "by more than 0.05 over the last tenth of the iterations: more "
                               "iterations would likely break more (Pintor et al. 2022); on a "
                               "worst case, only samples every white-box attack left robust "
                               "while still rising count",
    "transfer_failure": "examples that fooled the surrogate the attack optimized (a transfer "
                        "attack's source model, the Lagrange attack's head) do not fool the "
                        "defense: this row measures the surrogate's transferability, not the "
                        "defense's robustness (Pintor et al. 2022; describes this row only, "
                        "not rolled up to the worst case)",
}

#: Pintor et al.'s incomplete-optimization rule: a sample's loss curve, rescaled to [0, 1] and
#: made monotone by its running best, still rises by more than this over its last tenth.
INCOMPLETE_DELTA = 0.05
#: share of a row's robust samples with an incomplete optimization that flags the row.
INCOMPLETE_FRAC = 0.1
#: mean relative margin change under 8/255 noise (benchmark.run.diagnostics) that flags a
#: deterministic defense's white-box rows (the digits CNNs: 0.011; rounding to 4 levels: 0.05).
UNSTABLE_PRED = 0.1
#: flags that describe one attack row only and are not rolled up to the worst case
#: (silent success, incomplete optimization and the single-step probe are judged on the worst
#: case's own robust samples instead: :func:`_worst_case_path`, :func:`_single_step`).
ROW_ONLY = frozenset({"attack_error", "transfer_failure", "silent_success",
                      "incomplete_optimization", "single_step_beats_iterative"})
#: fraction of zero / non-finite gradients (PGD extras or diagnostics) that flags a row.
BAD_GRAD_FRAC = 0.5
#: mean pairwise cosine of repeated gradients under which a defense's gradients are "random".
RANDOM_COSINE = 0.9
_STEP_KEYS = ("steps", "n_iter", "n_queries")

# -- row predicates -------------------------------------------------------------------------

def _params(r: Any) -> dict[str, Any]:
    raw = r.get("attack_params")
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def traits(r: Any) -> AttackTraits:
    """The row's attack traits, read from its plug-in (:mod:`benchmark.plugins.traits`)."""
    return attack_traits(str(r.get("attack_name") or ""), _params(r))


def is_blackbox(r: Any) -> bool:
    return traits(r).blackbox


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["robust_acc"].notna()]


def _exceeds(r: Any, acc: float, upper: float) -> bool:
    """``r`` is above a reference accuracy: strictly for deterministic rows (same samples,
    same randomness), beyond the reference's interval for stochastic ones."""
    limit = upper if bool(r["stochastic"]) else acc
    return bool(r["robust_acc"] > limit + 1e-12)


def _nonmonotone(frame: pd.DataFrame) -> pd.Series:
    flagged = pd.Series(False, index=frame.index)
    for _, part in _ok(frame).groupby(["defense", "defense_params", "attack", "threat_model"],
                                      dropna=False):
        part = part.sort_values("eps")
        lowest = float("inf")  # lowest robust accuracy at any smaller epsilon
        lowest_upper = float("inf")  # lowest upper interval bound at any smaller epsilon
        for idx, r in part.iterrows():
            if _exceeds(r, lowest, lowest_upper):
                flagged[idx] = True
            lowest = min(lowest, r["robust_acc"])
            lowest_upper = min(lowest_upper, r["robust_ci_high"])
    return flagged


def _more_steps(frame: pd.DataFrame) -> pd.Series:
    flagged = pd.Series(False, index=frame.index)
    ok = _ok(frame)
    ok = ok[ok["attack"] != WORST]
    groups: dict[tuple[Any, ...], list[tuple[float, Any]]] = defaultdict(list)
    for idx, r in ok.iterrows():
        params = _params(r)
        steps = next((params[k] for k in _STEP_KEYS if isinstance(params.get(k), int | float)),
                     r["steps"])
        if steps is None or pd.isna(steps):
            continue
        rest = json.dumps({k: v for k, v in params.items() if k not in _STEP_KEYS},
                          sort_keys=True)
        groups[(r["defense"], r["defense_params"], r["threat_model"], r["eps"],
                r["attack_name"], rest)].append((float(steps), idx))
    for members in groups.values():
        members.sort()
        for i, (steps, idx) in enumerate(members):
            fewer = [frame.loc[j] for s, j in members[:i] if s < steps]
            if fewer and _exceeds(frame.loc[idx], min(f["robust_acc"] for f in fewer),
                                  min(f["robust_ci_high"] for f in fewer)):
                flagged[idx] = True
    return flagged


def _bpda_disagree(frame: pd.DataFrame) -> pd.Series:
    """A BPDA row (``gradient = "bpda"``) against the row of the attack it wraps, run with the
    defense's own gradient, in the same cell."""
    flagged = pd.Series(False, index=frame.index)
    ok = _ok(frame)
    for _, cell in ok.groupby(["defense", "defense_params", "threat_model", "eps"],
                              dropna=False):
        for i, b in cell.iterrows():
            t = traits(b)
            if t.gradient != "bpda" or t.wraps is None:
                continue
            for j, e in cell[cell["attack_name"] == t.wraps].iterrows():
                if (b["robust_ci_low"] > e["robust_ci_high"]
                        or e["robust_ci_low"] > b["robust_ci_high"]):
                    flagged[i] = flagged[j] = True
    return flagged


def _blackbox(frame: pd.DataFrame, ev: FlagEvidence | None) -> pd.Series:
    flagged = pd.Series(False, index=frame.index)
    ok = _ok(frame)
    for _, cell in ok.groupby(["defense", "defense_params", "threat_model", "eps"],
                              dropna=False):
        rows = cell[cell["attack"] != WORST]
        black = [i for i, r in rows.iterrows() if is_blackbox(r)]
        white = [i for i in rows.index if i not in black]
        if not black or not white:
            continue
        for i in black:
            b = frame.loc[i]
            bkey = row_key(b)
            wkeys = [row_key(frame.loc[j]) for j in white]
            if ev is not None and bkey in ev.robust and all(w in ev.robust for w in wkeys):
                bo = ev.robust[bkey]
                wo = {s: min(ev.robust[w].get(s, 1) for w in wkeys) for s in bo}
                only_black = sum(1 for s in bo if not bo[s] and wo[s])
                only_white = sum(1 for s in bo if bo[s] and not wo[s])
                hit = (only_black > 0 if not bool(b["stochastic"]) else
                       only_black > only_white and mcnemar_exact(only_black, only_white) < 0.05)
            else:
                hit = all(_exceeds(frame.loc[j], b["robust_acc"], b["robust_ci_high"])
                          for j in white)
            if hit:
                flagged[i] = True
    if ev is not None:  # AutoAttack's own check: Square broke points APGD/FAB left robust
        for idx, r in ok.iterrows():
            for extras in ev.extras.get(row_key(r), []):
                if any("Square Attack has decreased" in str(w)
                       for w in extras.get("warnings", []) or []):
                    flagged[idx] = True
    return flagged


def _gradients(frame: pd.DataFrame, ev: FlagEvidence
               ) -> tuple[pd.Series, pd.Series, pd.Series]:
    bad = pd.Series(False, index=frame.index)
    random = pd.Series(False, index=frame.index)
    unstable = pd.Series(False, index=frame.index)
    for idx, r in frame.iterrows():
        if is_blackbox(r):
            continue
        diag = ev.diagnostics.get(str(r["defense"]))
        instability = (diag or {}).get("instability")
        if isinstance(instability, int | float) and instability > UNSTABLE_PRED:
            unstable[idx] = True
        fracs = [f for extras in ev.extras.get(row_key(r), [])
                 for f in _flatten(extras.get("zero_grad_frac"))]
        if fracs and sum(fracs) / len(fracs) > BAD_GRAD_FRAC:
            bad[idx] = True
        if diag is not None:
            masked = (diag.get("zero_frac", 0) + diag.get("nonfinite_frac", 0)
                      + diag.get("exploding_frac", 0))
            if diag.get("detached") or masked > BAD_GRAD_FRAC:
                bad[idx] = True
            cosine = diag.get("cosine")
            eot = r.get("eot_draws")
            no_eot = eot is None or pd.isna(eot) or int(eot) <= 1
            if no_eot and _pins_randomness(r):
                no_eot = False  # a diagnostic that fixes the defense's noise (fixed-noise)
            if (isinstance(cosine, int | float) and not math.isnan(cosine)
                    and cosine < RANDOM_COSINE and no_eot):
                random[idx] = True
    return bad, random, unstable


def _pins_randomness(row: Any) -> bool:
    """Whether the row's attack is a diagnostic (``diagnostic = True``, e.g. ``fixed-noise``,
    which differentiates one pinned draw of the defense and needs no EOT)."""
    return traits(row).diagnostic


def _flatten(value: Any) -> list[float]:
    if isinstance(value, list):
        return [f for v in value for f in _flatten(v)]
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return [float(value)]
    return []


def _above_chance(frame: pd.DataFrame, ev: FlagEvidence) -> pd.Series:
    flagged = pd.Series(False, index=frame.index)
    if ev.chance is None:
        return flagged
    for idx, r in _ok(frame).iterrows():
        sanity = ev.sanity_eps.get(str(r["threat_model"]))
        if sanity is not None and r["eps"] >= sanity - 1e-9 and r["robust_ci_low"] > ev.chance:
            flagged[idx] = True
    return flagged


def _unconstrained(frame: pd.DataFrame, ev: FlagEvidence) -> pd.Series:
    """Rows of an attack whose unconstrained probe (same defense and threat model) left a
    sample classified correctly by majority vote."""
    return pd.Series({i: ev.probes.get((str(r["defense"]), str(r["attack"]),
                                        str(r["threat_model"])), (0, 0))[0] > 0
                      for i, r in frame.iterrows()}, dtype=bool)


def still_rising(curve: list[Any], delta: float = INCOMPLETE_DELTA) -> bool:
    """Pintor et al.'s incomplete-optimization indicator for one sample's loss curve (a
    maximized objective; non-finite points, stored as None, dropped): rescaled to [0, 1] by its
    range and replaced by its running maximum, the curve rises by more than ``delta`` over its
    last tenth (the last ceil(R / 10) points and the one before them). A flat curve, or one of
    fewer than 3 points, is not incomplete."""
    vals = [float(v) for v in curve if isinstance(v, int | float) and math.isfinite(v)]
    if len(vals) < 3:
        return False
    lo, hi = min(vals), max(vals)
    if not hi > lo:
        return False
    best, running = [], -math.inf
    for v in vals:
        running = max(running, (v - lo) / (hi - lo))
        best.append(running)
    tail = math.ceil(len(best) / 10)
    return best[-1] - best[-(tail + 1)] > delta


def _path_indicators(frame: pd.DataFrame, ev: FlagEvidence) -> dict[str, pd.Series]:
    """Silent success, incomplete optimization and transfer failure, from the attacks'
    per-sample evidence and the rows' per-sample majority verdicts."""
    out = {name: pd.Series(False, index=frame.index)
           for name in ("silent_success", "incomplete_optimization", "transfer_failure")}
    for idx, r in _ok(frame).iterrows():
        if r["attack"] == WORST:
            continue
        key = row_key(r)
        per, robust = ev.per_sample.get(key, {}), ev.robust.get(key, {})
        held = [s for s, ok in robust.items() if ok]
        if not held:
            continue
        if not bool(r["stochastic"]):  # one draw decides a deterministic defense
            found = per.get("any_adversarial", {})
            out["silent_success"][idx] = any(found.get(s) is True for s in held)
        curves = per.get("loss_curve", {})
        rising = [s for s in held if isinstance(curves.get(s), list) and still_rising(curves[s])]
        out["incomplete_optimization"][idx] = len(rising) >= max(1.0, INCOMPLETE_FRAC * len(held))
        fooled = per.get("source_adversarial", {})
        out["transfer_failure"][idx] = any(fooled.get(s) is True for s in held)
    _worst_case_path(frame, ev, out)
    return out


def _worst_case_path(frame: pd.DataFrame, ev: FlagEvidence, out: dict[str, pd.Series]
                     ) -> None:
    """Silent success and incomplete optimization on ``worst_case`` rows, judged on the samples
    the worst case counts robust (not rolled up blindly: a sample another attack broke is not in
    doubt). Silent success: an attack of the cell found an adversarial iterate for such a
    sample (deterministic defenses). Incomplete optimization: every white-box attack of the
    cell that left the sample robust reports a loss curve, and each is still rising on it (an
    attack without a curve, e.g. AutoAttack, that agrees is evidence of convergence); flagged
    on at least 10% of the worst case's robust samples."""
    cell = ["defense", "defense_params", "threat_model", "eps"]
    for _, part in _ok(frame).groupby([c for c in cell if c in frame.columns], dropna=False,
                                      sort=False):
        for idx in part.index[part["attack"] == WORST]:
            held = [s for s, ok in ev.robust.get(row_key(frame.loc[idx]), {}).items() if ok]
            rows = [r for _, r in part.iterrows() if r["attack"] != WORST
                    and not is_blackbox(r) and not _pins_randomness(r)]
            if not held or not rows:
                continue
            pers = [ev.per_sample.get(row_key(r), {}) for r in rows]
            if not bool(frame.at[idx, "stochastic"]):
                out["silent_success"][idx] = any(
                    p.get("any_adversarial", {}).get(s) is True for p in pers for s in held)
            doubtful = [s for s in held if all(
                isinstance(p.get("loss_curve", {}).get(s), list)
                and still_rising(p["loss_curve"][s]) for p in pers)]
            out["incomplete_optimization"][idx] = (
                len(doubtful) >= max(1.0, INCOMPLETE_FRAC * len(held)))


def _single_step(frame: pd.DataFrame, ev: FlagEvidence) -> pd.Series:
    """Iterative white-box rows that left robust a sample the cell's single-step probe broke
    (deterministic rows: one such sample; stochastic ones: two, as a majority vote over K
    draws can flip one borderline sample by chance). A ``worst_case`` row is judged the same
    way on its own robust samples, not rolled up: a sample the probe broke that another attack
    also broke is not in doubt."""
    flagged = pd.Series(False, index=frame.index)
    for idx, r in _ok(frame).iterrows():
        if is_blackbox(r) or _pins_randomness(r):
            continue
        steps = r.get("steps")
        if r["attack"] != WORST and (steps is None or pd.isna(steps) or int(steps) <= 1):
            continue
        probe = ev.single_step.get((str(r["defense"]), str(r["threat_model"]), float(r["eps"])))
        robust = ev.robust.get(row_key(r), {})
        if not probe or not robust:
            continue
        broke = sum(1 for s, ok in probe.items() if not ok and robust.get(s) == 1)
        flagged[idx] = broke >= (2 if bool(r["stochastic"]) else 1)
    return flagged


def compute_flags(frame: pd.DataFrame, evidence: FlagEvidence | None = None) -> pd.Series:
    """A ``;``-joined string of flag names per row ('' when none fired). Without
    ``evidence`` only the flags that the rows alone support are computed."""
    if frame.empty:
        return pd.Series([], dtype=object)
    names: dict[Any, list[str]] = {i: [] for i in frame.index}
    for i, r in frame.iterrows():
        if (r["n_errors"] or 0) > 0:
            names[i].append("threat_violation")
        if isinstance(r["error"], str) and r["error"]:
            names[i].append("worst_case_incomplete" if r["attack"] == WORST
                            else "attack_error")
        if mixed_code(r):
            names[i].append("mixed_code_versions")
    checks = {"nonmonotone_eps": _nonmonotone(frame),
              "more_steps_higher_acc": _more_steps(frame),
              "bpda_exact_disagree": _bpda_disagree(frame),
              "blackbox_beats_whitebox": _blackbox(frame, evidence)}
    if evidence is not None:
        (checks["bad_gradients"], checks["grad_randomness_no_eot"],
         checks["unstable_predictions"]) = _gradients(frame, evidence)
        checks["above_chance_at_sanity_eps"] = _above_chance(frame, evidence)
        checks["unconstrained_attack_failure"] = _unconstrained(frame, evidence)
        checks.update(_path_indicators(frame, evidence))
        checks["single_step_beats_iterative"] = _single_step(frame, evidence)
        checks["undeclared_randomness"] = frame["defense"].map(
            lambda d: bool(evidence.diagnostics.get(str(d), {}).get("undeclared_randomness")))
    for name, hits in checks.items():
        for i, hit in hits.items():
            if hit:
                names[i].append(name)
    _roll_up(frame, names)
    return pd.Series({i: ";".join(v) for i, v in names.items()}, dtype=object)


def _roll_up(frame: pd.DataFrame, names: dict[Any, list[str]]) -> None:
    """Every flag of an attack row also on the ``worst_case`` row of its (defense, threat
    model, epsilon): the ranked tables show only that row, and a worst case over a masked
    attack is as doubtful as the attack. In place, each flag once, the row's own first
    (:data:`ROW_ONLY` excepted: the worst case carries ``worst_case_incomplete`` for an
    ``attack_error``, and a transfer failure says that one row's surrogate did not transfer,
    which the white-box rows beside it do not depend on)."""
    cell = ["defense", "defense_params", "threat_model", "eps"]
    keys = [c for c in cell if c in frame.columns]
    for _, part in frame.groupby(keys, dropna=False, sort=False):
        worst = [i for i in part.index if part.at[i, "attack"] == WORST]
        if not worst:
            continue
        below = [n for i in part.index if i not in worst for n in names[i]
                 if n not in ROW_ONLY]
        for i in worst:
            names[i] = list(dict.fromkeys(names[i] + below))


def legend() -> list[tuple[str, str]]:
    """(flag, one-line explanation) for every flag, for README legends."""
    return list(FLAG_HELP.items())
