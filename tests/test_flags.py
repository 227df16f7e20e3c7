"""Validity flags: each fires on a purpose-built toy defense (tests/flag_toys.py) and stays
silent on the undefended CNN."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from benchmark.report.evidence import collect_evidence
from benchmark.report.flags import FLAG_HELP, ROW_ONLY, compute_flags, is_blackbox
from benchmark.run.diagnostics import gradient_diagnostics
from benchmark.run.harness import run_suite
from benchmark.spec.plan import plan_suite
from benchmark.spec.suite import parse_suite
from benchmark.store import Store
from benchmark.zoo import load_model
from tests import flag_toys
from tests.toys import single_thread

SUITE = """
[suite]
name = "flags"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 3
batch_size = 16
shard_size = 16

[[defenses]]
name = "undefended"
params = { model = "digits-cnn" }

[[defenses]]
id = "quantized"
name = "tests.flag_toys:Quantized"

[[defenses]]
id = "rounding"
name = "tests.flag_toys:Rounding"

[[defenses]]
id = "detached"
name = "tests.flag_toys:Detached"

[[defenses]]
id = "noisy"
name = "tests.flag_toys:VeryNoisy"

[[defenses]]
id = "stateful"
name = "tests.flag_toys:Stateful"

[[attacks]]
id = "pgd"
name = "pgd"
params = { steps = 10, random_start = false }

[[attacks]]
id = "pgd-1"
name = "pgd"
params = { steps = 1, random_start = false }

[[attacks]]
id = "bpda"
name = "bpda"
params = { attack = "pgd", steps = 10, random_start = false }

[[attacks]]
id = "square"
name = "torchattacks"
params = { attack = "Square", n_queries = 100 }

[[threat_models]]
name = "linf"
eps = [0.2, 0.5]
"""


@pytest.fixture(scope="module")
def flagged(tmp_path_factory) -> pd.DataFrame:
    suite = parse_suite(SUITE, source="flags.toml")
    out = tmp_path_factory.mktemp("flags")
    with single_thread():  # tiny toys; restored so that later modules keep every core
        run_suite(suite, out, limit=16, progress="none", log=lambda _: None)
    plan = plan_suite(suite, limit=16)
    from benchmark.report.leaderboard import build_leaderboard

    with Store(out / "runs.sqlite") as store:
        frame = build_leaderboard(store, plan)
        evidence = collect_evidence(store, plan)
    frame["flags"] = compute_flags(frame, evidence)
    return frame


def _flags(frame: pd.DataFrame, defense: str, attack: str | None = None,
           eps: float | None = None) -> set[str]:
    rows = frame[frame.defense == defense]
    if attack is not None:
        rows = rows[rows.attack == attack]
    if eps is not None:
        rows = rows[rows.eps == eps]
    assert len(rows), (defense, attack, eps)
    return {f for v in rows["flags"] for f in str(v).split(";") if f}


def test_every_flag_has_a_one_line_explanation():
    for name, text in FLAG_HELP.items():
        assert name.isidentifier() and text and "\n" not in text


def test_undefended_is_silent(flagged):
    assert _flags(flagged, "undefended") == set(), flagged[flagged.defense == "undefended"][
        ["attack", "eps", "robust_acc", "flags"]]


def test_quantized_input_zero_gradients(flagged):
    assert "bad_gradients" in _flags(flagged, "quantized", "pgd")
    assert "bad_gradients" not in _flags(flagged, "quantized", "square")  # black-box row


def test_rounding_square_beats_whitebox(flagged):
    assert "blackbox_beats_whitebox" in _flags(flagged, "rounding", "square", 0.2)
    # with BPDA among the white-box attacks of the quantized defense, Square wins nothing
    assert "blackbox_beats_whitebox" not in _flags(flagged, "quantized", "square", 0.2)


def test_quantized_bpda_and_exact_disagree(flagged):
    assert "bpda_exact_disagree" in _flags(flagged, "quantized", "bpda", 0.2)
    assert "bpda_exact_disagree" in _flags(flagged, "quantized", "pgd", 0.2)


def test_quantized_above_chance_at_sanity_eps(flagged):
    # l-inf 0.5 turns every image into the same gray one; PGD with zero gradients never moves
    assert "above_chance_at_sanity_eps" in _flags(flagged, "quantized", "pgd", 0.5)
    assert "above_chance_at_sanity_eps" not in _flags(flagged, "quantized", "pgd", 0.2)


def test_detached_gradient(flagged):
    assert "bad_gradients" in _flags(flagged, "detached", "worst_case")
    assert "attack_error" in _flags(flagged, "detached", "pgd")  # PGD cannot differentiate


def test_large_noise_gradient_randomness_without_eot(flagged):
    assert "grad_randomness_no_eot" in _flags(flagged, "noisy", "pgd")
    assert "grad_randomness_no_eot" not in _flags(flagged, "undefended")


def test_stateful_more_steps_raise_accuracy(flagged):
    rows = flagged[(flagged.defense == "stateful") & (flagged.eps == 0.2)].set_index("attack")
    assert rows.loc["pgd", "robust_acc"] > rows.loc["pgd-1", "robust_acc"]
    assert "more_steps_higher_acc" in _flags(flagged, "stateful", "pgd", 0.2)
    assert "more_steps_higher_acc" not in _flags(flagged, "stateful", "pgd-1")


@pytest.mark.usefixtures("one_thread")
def test_gradient_diagnostics_oracles():
    net = load_model("digits-cnn")
    x = torch.rand(4, 1, 16, 16)
    y = torch.arange(4)
    clean = gradient_diagnostics(net, x, y)
    assert clean.cosine == pytest.approx(1.0) and clean.zero_frac == 0 and not clean.detached
    quant = gradient_diagnostics(flag_toys.Quantized(), x, y)
    assert quant.zero_frac == 1.0 and math.isnan(quant.cosine)
    assert gradient_diagnostics(flag_toys.Detached(), x, y).detached
    noisy = flag_toys.VeryNoisy()
    noisy.reseed(0)
    assert gradient_diagnostics(noisy, x, y).cosine < 0.9


@pytest.mark.usefixtures("one_thread")
def test_clean_job_diagnoses_a_budget_of_gradients():
    """The clean job's diagnostics cost DIAG_GRADIENTS gradients of the defense: a
    deterministic defense one per sample on DIAG_SAMPLES samples (its repeated gradients
    would be copies), a stochastic one DIAG_REPEATS per sample on fewer samples, which still
    finds its gradients random; masked and detached gradients are found either way."""
    from benchmark.run.diagnostics import (
        DIAG_GRADIENTS,
        DIAG_REPEATS,
        DIAG_SAMPLES,
        safe_diagnostics,
    )

    x = torch.rand(16, 1, 16, 16)
    y = torch.arange(16) % 10
    seen: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and v.requires_grad:
                seen.append(len(v))  # the rows a gradient is taken of
            return self.inner(v)

    clean = safe_diagnostics(Counting(load_model("digits-cnn")), x, y)
    assert seen == [DIAG_GRADIENTS] and clean["n"] == DIAG_SAMPLES and clean["repeats"] == 1
    assert clean["zero_frac"] == 0 and "instability" in clean
    seen.clear()
    noisy = flag_toys.VeryNoisy()
    noisy.reseed(0)
    diag = safe_diagnostics(Counting(noisy), x, y, stochastic=True)
    assert seen == [DIAG_GRADIENTS] and diag["repeats"] == DIAG_REPEATS
    assert diag["n"] == DIAG_GRADIENTS // DIAG_REPEATS and diag["cosine"] < 0.9
    assert "instability" not in diag
    assert safe_diagnostics(flag_toys.Quantized(), x, y)["zero_frac"] == 1.0
    assert safe_diagnostics(flag_toys.Detached(), x, y, stochastic=True)["detached"]


def test_blackbox_rows_recognised():
    """Black-box rows are known by the plug-in's declared traits, never by name: a registered
    gradient-free attack is one whatever it is called, and an unknown name called "square"
    is not."""
    from benchmark.api.attack import Attack
    from benchmark.plugins import ATTACKS

    def row(name: str, params: dict) -> dict:
        return {"attack_name": name, "attack_params": json.dumps(params)}

    class QueryOnly(Attack):
        name = "query-only-toy"
        gradient = "none"

        def run(self, defense, x, y, threat, *, generator=None):
            raise NotImplementedError

    ATTACKS.add("query-only-toy", QueryOnly, override=True)
    assert is_blackbox(row("torchattacks", {"attack": "Square", "n_queries": 10}))
    assert is_blackbox(row("autoattack", {"version": "custom", "attacks": ["square"]}))
    assert is_blackbox(row("query-only-toy", {}))
    assert not is_blackbox(row("square", {}))  # not registered: nothing is known of it
    assert not is_blackbox(row("autoattack", {"version": "standard"}))
    assert not is_blackbox(row("torchattacks", {"attack": "PGD"}))


def test_rows_alone_support_frame_flags():
    """Without store evidence: the row-level flags still work, gradient ones are off."""
    base = dict(defense="d", defense_params="{}", threat_model="linf", eps=0.1, n=100,
                stochastic=False, n_errors=0, error=None, steps=None, eot_draws=1)
    rows = [dict(base, attack="pgd-10", attack_name="pgd", attack_params='{"steps": 10}',
                 steps=10, robust_acc=0.5, robust_ci_low=0.4, robust_ci_high=0.6),
            dict(base, attack="pgd-100", attack_name="pgd", attack_params='{"steps": 100}',
                 steps=100, robust_acc=0.55, robust_ci_low=0.45, robust_ci_high=0.65),
            dict(base, attack="sq", attack_name="torchattacks",
                 attack_params='{"attack": "Square"}', robust_acc=0.3, robust_ci_low=0.2,
                 robust_ci_high=0.4)]
    flags = compute_flags(pd.DataFrame(rows)).tolist()
    assert flags == ["", "more_steps_higher_acc", "blackbox_beats_whitebox"]


def test_fixed_noise_diagnostic_needs_no_eot() -> None:
    """A diagnostic that pins the defense's noise (fixed-noise) is not flagged for gradient
    randomness without EOT; the same row from a plain PGD is."""
    import pandas as pd

    from benchmark.report.evidence import FlagEvidence
    from benchmark.report.flags import _gradients

    frame = pd.DataFrame([dict(defense="diffpure", attack=a, attack_name=a, threat_model="linf",
                               eps=0.1, eot_draws=1) for a in ("pgd", "fixed-noise")])
    ev = FlagEvidence(diagnostics={"diffpure": {"cosine": 0.4}})
    _, random, _ = _gradients(frame, ev)
    assert random.tolist() == [True, False]


def test_mixed_code_versions_flag_reads_the_rows_code_version():
    base = dict(defense="d", defense_params="{}", threat_model="linf", eps=0.1, n=100,
                stochastic=False, n_errors=0, error=None, steps=None, eot_draws=1,
                attack_name="pgd", attack_params="{}", robust_acc=0.5, robust_ci_low=0.4,
                robust_ci_high=0.6)
    rows = [dict(base, attack="a", code_version="0.1.0+gabc"),
            dict(base, attack="b", code_version="0.1.0+gabc;0.1.0+gdef"),
            dict(base, attack="c", code_version=None)]
    assert compute_flags(pd.DataFrame(rows)).tolist() == ["", "mixed_code_versions", ""]
    assert "mixed_code_versions" in FLAG_HELP


def test_randomness_probe_oracles():
    """Two passes over the same images: the CNN and float jitter are deterministic, noise is
    not; NaN in one pass only is as random as it gets; declared-stochastic defenses are left
    alone; the verdict is settled once per instance."""
    from benchmark.api.defense import RANDOMNESS_RTOL, randomness_gap, settle_randomness

    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    assert randomness_gap(load_model("digits-cnn"), x) == 0.0
    assert randomness_gap(flag_toys.Jittery(), x) < RANDOMNESS_RTOL
    assert randomness_gap(flag_toys.SecretlyNoisy(), x) > 100 * RANDOMNESS_RTOL

    class HalfNaN(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            out = torch.zeros(len(x), 10)
            return out if self.calls % 2 else out.fill_(float("nan"))

    assert randomness_gap(HalfNaN(), x) == math.inf
    secret, jittery = flag_toys.SecretlyNoisy(), flag_toys.Jittery()
    assert settle_randomness(secret, x) and secret.stochastic and secret.undeclared_randomness
    assert "stochastic" in secret.capabilities()
    assert type(secret).stochastic is False  # the class's declaration is untouched
    assert not settle_randomness(jittery, x) and not jittery.stochastic
    declared = flag_toys.VeryNoisy()
    assert not settle_randomness(declared, x)
    assert not getattr(declared, "undeclared_randomness", False)


def test_undeclared_randomness_is_flagged_and_scored_with_k_draws(tmp_path):
    suite = parse_suite("""
[suite]
name = "secret"
dataset = "digits"
subset = "test100-v1"
seed = 0
k_draws = 5
batch_size = 8
shard_size = 8

[[defenses]]
name = "undefended"

[[defenses]]
id = "secret"
name = "tests.flag_toys:SecretlyNoisy"

[[attacks]]
name = "pgd"
params = { steps = 3 }

[[threat_models]]
name = "linf"
eps = [0.1]
""", source="secret.toml")
    summary = run_suite(suite, tmp_path / "out", limit=8, progress="none", log=lambda _: None)
    from benchmark.report.leaderboard import build_leaderboard

    with Store(tmp_path / "out" / "runs.sqlite") as store:
        frame = build_leaderboard(store, summary.plan)
        frame["flags"] = compute_flags(frame, collect_evidence(store, summary.plan))
    secret = frame[frame.defense == "secret"]
    assert len(secret) == 2 and set(secret.k_draws) == {5} and secret.stochastic.all()
    assert all("undeclared_randomness" in f.split(";") for f in secret["flags"])
    honest = frame[frame.defense == "undefended"]
    assert set(honest.k_draws) == {1} and not honest.stochastic.any()
    assert _flags(frame, "undefended") == set()


def test_worst_case_carries_every_flag_of_its_attack_rows(flagged):
    """The ranked tables show only the worst case: a masked attack's flags must be on it."""
    assert "blackbox_beats_whitebox" in _flags(flagged, "rounding", "worst_case", 0.2)
    assert "bpda_exact_disagree" in _flags(flagged, "quantized", "worst_case", 0.2)
    for (defense, eps), cell in flagged.groupby(["defense", "eps"]):
        below = {f for v in cell[cell.attack != "worst_case"]["flags"] for f in str(v).split(";")
                 if f and f not in ROW_ONLY}
        worst = _flags(flagged, defense, "worst_case", eps)
        assert below <= worst, (defense, eps, below - worst)


def test_unconstrained_probe_flags_attacks_that_cannot_succeed_even_unbounded(flagged):
    """Pintor et al.'s unconstrained-attack indicator: on the rounding defense PGD stalls on
    zero gradients even at l-inf 1, where any image is allowed; on the CNN it reaches 0%."""
    assert "unconstrained_attack_failure" in _flags(flagged, "rounding", "pgd")
    assert "unconstrained_attack_failure" in _flags(flagged, "rounding", "worst_case")
    assert "unconstrained_attack_failure" not in _flags(flagged, "undefended")
    assert "unconstrained_attack_failure" not in _flags(flagged, "rounding", "square")
    assert not (flagged["eps"] == 1.0).any()  # probes are evidence, never rows


def test_probes_are_planned_for_white_box_attacks_only():
    suite = parse_suite(SUITE, source="flags.toml")
    plan = plan_suite(suite, limit=16)
    probes = [j for j in plan.jobs if j.probe is True]  # unconstrained (not single-step)
    assert probes and all(j.eps == 1.0 and j.threat == "linf" and len(j.sample_ids) == 4
                          and j.sample_ids == plan.sample_ids[:4] for j in probes)
    assert {j.attack_id for j in probes} == {"pgd", "pgd-1", "bpda"}  # never Square
    assert {j.defense.id for j in probes if j.attack_id == "bpda"} == {"quantized"}
    assert len({j.key for j in probes}) == len(probes)
    assert all("unconstrained probe" in j.label() for j in probes)
    off = parse_suite(SUITE.replace('shard_size = 16', 'shard_size = 16\nunconstrained_probe = 0'
                                    '\nsingle_step_probe = 0'), source="flags.toml")
    plain = plan_suite(off, limit=16)
    assert not any(j.probe for j in plain.jobs)
    # the probe leaves the keys of ordinary jobs alone
    assert [j.key for j in plain.jobs] == [j.key for j in plan.jobs if not j.probe]


def test_unconstrained_probe_setting_is_checked():
    from benchmark.spec.suite import SuiteError

    for bad in ("-1", "2.5", "true", '"4"'):
        text = SUITE.replace('shard_size = 16', f'shard_size = 16\nunconstrained_probe = {bad}')
        with pytest.raises(SuiteError, match="unconstrained_probe"):
            parse_suite(text, source="flags.toml")
