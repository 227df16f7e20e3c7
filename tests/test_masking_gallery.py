"""The masking-trap gallery (tests/masking_traps.py): every trap raises at least one flag on
its worst-case row, and with the gradient-free and transfer attacks in the worst case it is
reported no more robust than the honest CNN it wraps, on the same samples; the honest CNN
raises no flag. The n = 100 table is scripts/masking_gallery.py."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from benchmark.report.evidence import collect_evidence
from benchmark.report.flags import compute_flags
from benchmark.report.leaderboard import build_leaderboard
from benchmark.run.harness import run_suite
from benchmark.spec.suite import parse_suite
from benchmark.store import Store
from tests import masking_traps
from tests.masking_traps import TRAPS, gallery_suite

N = 16
EPS = (0.1, 0.3)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> pd.DataFrame:
    suite = parse_suite(gallery_suite(eps=EPS, pgd_steps=10, square_queries=100, k_draws=3),
                        source="gallery.toml")
    out = tmp_path_factory.mktemp("gallery")
    summary = run_suite(suite, out, limit=N, progress="none", log=lambda _: None)
    assert summary.errors == 0
    with Store(out / "runs.sqlite") as store:
        frame = build_leaderboard(store, summary.plan)
        frame["flags"] = compute_flags(frame, collect_evidence(store, summary.plan))
    return frame


def _worst(frame: pd.DataFrame, defense: str, eps: float) -> pd.Series:
    rows = frame[(frame.defense == defense) & (frame.attack == "worst_case")
                 & ((frame.eps - eps).abs() < 1e-9)]
    assert len(rows) == 1, (defense, eps)
    return rows.iloc[0]


def test_traps_classify_as_the_honest_cnn_does():
    """The traps hide gradients, not accuracy: on clean digits they agree with the CNN."""
    from benchmark.data import load_dataset
    from benchmark.zoo import load_model

    test = load_dataset("digits").test
    x = test.x[:64]
    honest = load_model(masking_traps.HONEST)(x).argmax(1)
    torch.manual_seed(0)
    for trap in TRAPS:
        with torch.no_grad():
            agree = (getattr(masking_traps, trap)()(x).argmax(1) == honest).float().mean()
        assert agree >= 0.95, (trap, float(agree))


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("trap", [t.lower() for t in TRAPS])
def test_every_trap_is_flagged_and_not_ranked_above_the_honest_cnn(gallery, trap, eps):
    worst, honest = _worst(gallery, trap, eps), _worst(gallery, "honest", eps)
    assert worst["flags"], f"{trap} at eps {eps}: no flag on its worst case"
    assert worst["n"] == honest["n"] == N
    # within 5 points at n = 100 (scripts/masking_gallery.py); here, one sample in 16
    assert worst["robust_acc"] <= honest["robust_acc"] + 1 / N + 1e-9, (
        trap, eps, worst["robust_acc"], honest["robust_acc"])


def test_the_honest_cnn_raises_no_false_alarm(gallery):
    rows = gallery[gallery.defense == "honest"]
    assert not rows["flags"].astype(bool).any(), rows[["attack", "eps", "flags"]]


def test_the_white_box_attacks_alone_would_have_been_fooled(gallery):
    """Without the gradient-free and transfer rows, most traps look robust: the gallery tests
    what it claims to (a trap that PGD breaks anyway proves nothing about the fallbacks)."""
    fooled = 0
    for trap in TRAPS:
        rows = gallery[(gallery.defense == trap.lower()) & (gallery.eps == 0.1)
                       & gallery.attack.isin(["pgd", "apgd-dlr"])]
        fooled += bool(rows["robust_acc"].min() >= 0.5)
    assert fooled >= 4, fooled
