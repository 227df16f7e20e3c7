"""Evidence-driven fallbacks (Carlini et al. 2019; Tramer et al. 2020): where the first phase
of a run shows gradient masking on a defense, run stronger gradient-free and transfer attacks
on it, so that its worst case does not rest on the misled white-box attacks.

A suite names its fallbacks as ordinary attacks with ``when = "masking"`` (for example Square
with a larger query budget, SPSA, a transfer attack from the suite's reference model). The plan
keeps their jobs aside (:attr:`benchmark.spec.plan.Plan.fallback`); after every ordinary job
has run, the harness computes the leaderboard's flags from the store and adds the fallback jobs
of every defense with a row flagged by one of :data:`MASKING_FLAGS`. They are ordinary jobs
from then on: stored, resumed, scored with K draws, counted in the worst case, recorded in
``plan.json``, bundled and verified (the verifier accepts exactly the trusted plan's fallback
jobs). Rerunning reaches the same decision from the same store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmark.spec.jobs import JobSpec
    from benchmark.spec.plan import Plan
    from benchmark.store import Store

#: flags that are evidence of masking: a defense with one of them on any row gets its
#: fallbacks.
MASKING_FLAGS = ("bad_gradients", "blackbox_beats_whitebox", "unconstrained_attack_failure",
                 "unstable_predictions")


def masked_defenses(store: Store, plan: Plan) -> dict[str, list[str]]:
    """Defense id -> the masking flags on its rows, from the plan's jobs in ``store``."""
    from benchmark.report.evidence import collect_evidence
    from benchmark.report.leaderboard import build_leaderboard, flag_frame

    frame = build_leaderboard(store, plan)
    if frame.empty:
        return {}
    flags = flag_frame(frame, collect_evidence(store, plan))
    out: dict[str, list[str]] = {}
    for defense, names in zip(frame["defense"], flags, strict=True):
        for name in str(names).split(";"):
            if name in MASKING_FLAGS and name not in out.get(str(defense), []):
                out.setdefault(str(defense), []).append(name)
    return out


def fallback_jobs(store: Store, plan: Plan) -> tuple[list[JobSpec], dict[str, list[str]]]:
    """The plan's fallback jobs that the store's evidence calls for, and the evidence."""
    if not plan.fallback:
        return [], {}
    masked = masked_defenses(store, plan)
    return [j for j in plan.fallback if j.defense.id in masked], masked
