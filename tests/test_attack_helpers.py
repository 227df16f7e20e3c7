"""The attacks' shared machinery (attacks/_ascent.py and benchmark.api.threat.bcast): the
best-iterate tracker, the ascent loop, the per-sample broadcast and the argument checks."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from attacks._ascent import (
    Curve,
    KeepBest,
    ascend,
    check_bool,
    check_choice,
    check_int,
    check_positive_int,
    check_real,
    optimizer_update,
    threat_update,
)
from benchmark.api.threat import bcast
from threat_models.linf import LinfThreat

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
ROOT = Path(__file__).resolve().parent.parent


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _params(*tags: float) -> torch.Tensor:
    """A (B, 1, 2, 2) parameter whose sample i is filled with tags[i]."""
    return _t(*tags).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def _tags(best: KeepBest) -> list[float]:
    flat = best.params.flatten(1)
    assert bool((flat == flat[:, :1]).all())  # every sample kept one whole iterate
    return flat[:, 0].tolist()


# --------------------------------------------------------------------------------------------
# KeepBest
# --------------------------------------------------------------------------------------------
def test_keep_best_maximizes_per_sample():
    best = KeepBest(_params(0, 0, 0))
    assert best.score.dtype == torch.float64 and best.score.tolist() == [-INF] * 3
    best.update(_params(1, 1, 1), _t(1.0, 5.0, -2.0))
    best.update(_params(2, 2, 2), _t(3.0, 4.0, -3.0))
    mask = best.update(_params(3, 3, 3), _t(2.0, 5.0, -1.0))
    assert _tags(best) == [2, 1, 3]
    assert best.score.tolist() == [3.0, 5.0, -1.0]
    assert mask.tolist() == [False, False, True]  # a tie keeps the first


def test_keep_best_minimizes_per_sample():
    best = KeepBest(_params(0, 0), maximize=False)
    assert best.score.tolist() == [INF, INF]
    best.update(_params(1, 1), _t(1.0, 5.0))
    best.update(_params(2, 2), _t(3.0, 4.0))
    best.update(_params(3, 3), _t(0.5, 4.0))
    assert _tags(best) == [3, 2]
    assert best.score.tolist() == [0.5, 4.0]


@pytest.mark.parametrize("maximize", [True, False])
def test_keep_best_ignores_nan_and_infinite_scores(maximize):
    best = KeepBest(_params(0, 0, 0), maximize=maximize)
    best.update(_params(1, 1, 1), _t(NAN, 1.0, INF))
    assert _tags(best) == [0, 1, 0]  # nothing finite yet for samples 0 and 2
    best.update(_params(2, 2, 2), _t(2.0, NAN, -INF))
    best.update(_params(3, 3, 3), _t(NAN, NAN, 7.0))
    assert _tags(best) == [2, 1, 3]
    assert best.score.tolist() == [2.0, 1.0, 7.0]


def test_keep_best_historical_rule_ranks_infinities_like_numbers_but_never_nan():
    # PGD's and StAdv's ranking (finite=False): kept bit for bit by the refactor
    best = KeepBest(_params(0, 0), finite=False, track_success=True)
    no = torch.zeros(2, dtype=torch.bool)
    best.update(_params(1, 1), _t(INF, NAN), no)
    best.update(_params(2, 2), _t(1e30, 1.0), no)
    assert _tags(best) == [1, 2]
    assert best.score.tolist() == [INF, 1.0]


def test_keep_best_success_first_then_score():
    best = KeepBest(_params(0, 0, 0), track_success=True)
    best.update(_params(1, 1, 1), _t(9.0, 9.0, 9.0), torch.tensor([False, True, False]))
    best.update(_params(2, 2, 2), _t(1.0, 10.0, 8.0), torch.tensor([True, False, False]))
    assert _tags(best) == [2, 1, 1]  # a success beats any failure; a failure never a success
    assert best.success.tolist() == [True, True, False]
    best.update(_params(3, 3, 3), _t(2.0, 11.0, 1.0), torch.tensor([True, True, False]))
    assert _tags(best) == [3, 3, 1]  # between successes the higher score wins
    assert best.score.tolist() == [2.0, 11.0, 9.0]


def test_keep_best_tracks_whether_any_iterate_succeeded():
    best = KeepBest(_params(0, 0), track_success=True, maximize=False)
    best.update(_params(1, 1), _t(5.0, 5.0), torch.tensor([True, False]))
    best.update(_params(2, 2), _t(1.0, 1.0), torch.tensor([False, False]))
    assert best.success.tolist() == [True, False]
    assert _tags(best) == [1, 2]


def test_keep_best_success_with_a_non_finite_score_does_not_count():
    best = KeepBest(_params(0, 0), track_success=True)
    best.update(_params(1, 1), _t(NAN, 1.0), torch.tensor([True, True]))
    assert best.success.tolist() == [False, True]
    assert _tags(best) == [0, 1]


def test_keep_best_needs_success_flags_when_tracking_them():
    best = KeepBest(_params(0), track_success=True)
    with pytest.raises(ValueError, match="needs success flags"):
        best.update(_params(1), _t(1.0))


def test_keep_best_copies_and_compares_in_its_dtype():
    p0 = _params(0, 0)
    best = KeepBest(p0, dtype=torch.float32)
    p0.fill_(9)  # the start is copied
    assert _tags(best) == [0, 0] and best.score.dtype == torch.float32
    # 1 + 1e-12 and 1 are equal in float32: the first one stays
    best.update(_params(1, 1), _t(1.0, 1.0))
    best.update(_params(2, 2), _t(1.0 + 1e-12, 0.0))
    assert _tags(best) == [1, 1]


def test_keep_best_works_for_any_parameter_shape():
    best = KeepBest(torch.zeros(3))
    best.update(torch.tensor([1.0, 2.0, 3.0]), _t(1.0, -1.0, NAN))
    assert best.params.tolist() == [1.0, 2.0, 0.0]


# --------------------------------------------------------------------------------------------
# bcast
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("like_shape", "out_shape"), [
    ((4, 3, 8, 8), (4, 1, 1, 1)), ((4, 16), (4, 1)), ((4,), (4,)), ((4, 2, 5), (4, 1, 1)),
])
def test_bcast_shapes(like_shape, out_shape):
    v = torch.arange(4.0)
    like = torch.zeros(like_shape)
    out = bcast(v, like)
    assert out.shape == out_shape
    assert out.data_ptr() == v.data_ptr()  # a view, no copy
    assert torch.equal((like + out).flatten(1)[:, 0] if like.dim() > 1 else like + out, v)


def test_bcast_scales_each_sample():
    x = torch.ones(3, 2, 2)
    torch.testing.assert_close(x * bcast(torch.tensor([1.0, 2.0, 3.0]), x),
                               torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 2, 2))
    mask = torch.tensor([True, False, True])
    picked = torch.where(bcast(mask, x), x, torch.zeros_like(x))
    assert picked.sum(dim=(1, 2)).tolist() == [4.0, 0.0, 4.0]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def test_ascend_matches_a_hand_written_pgd_loop_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 3, 3, generator=g)
    w = torch.randn(9, generator=g)
    threat = LinfThreat(0.1)

    def objective(p):
        return torch.sin(threat.apply(x, p).flatten(1) @ w * 7), None

    p0 = threat.init(x, torch.Generator().manual_seed(1), random=True)
    best = KeepBest(p0)
    curve = Curve(5, 2)
    last = ascend(objective, p0, threat_update(threat, x, 0.03), steps=5, best=best,
                  observe=curve)

    p, ref_best, ref_score, values = p0, p0.clone(), torch.full((4,), -INF, dtype=torch.float64), []
    for i in range(6):
        p = p.detach().requires_grad_(i < 5)
        with torch.set_grad_enabled(i < 5):
            v = objective(p)[0]
            grad = torch.autograd.grad(v.sum(), p)[0] if i < 5 else None
        better = torch.isfinite(v.double()) & (v.double() > ref_score)
        ref_best = torch.where(better.view(-1, 1, 1, 1), p.detach(), ref_best)
        ref_score = torch.where(better, v.double(), ref_score)
        values.append(v.detach())
        if grad is not None:
            with torch.no_grad():
                p = threat.project(x, p.detach() + 0.03 * threat.ascent(grad))
    assert torch.equal(last, p.detach())
    assert torch.equal(best.params, ref_best) and torch.equal(best.score, ref_score)
    assert curve.steps_at == [0, 2, 4, 5]
    assert torch.equal(curve.stack(), torch.stack([values[i] for i in (0, 2, 4, 5)]))


def test_ascend_observes_raw_gradients_and_steps_with_sanitized_ones():
    seen, stepped = [], []

    def objective(p):
        # d/dp of sqrt(p) at 0 is +inf; of sqrt(-p) at 0 is nan (0 * inf)
        return torch.sqrt(p[:, 0]) + 0 * torch.sqrt(-p[:, 1]), None

    def update(p, grad):
        stepped.append(grad.clone())
        return p

    def observe(step, value, grad):
        seen.append(None if grad is None else grad.clone())

    ascend(objective, torch.zeros(1, 2), update, steps=2, best=KeepBest(torch.zeros(1, 2)),
           observe=observe)
    assert len(seen) == 3 and seen[-1] is None
    first = seen[0]
    assert first is not None and not bool(torch.isfinite(first).all())
    assert all(torch.equal(g, torch.zeros(1, 2)) for g in stepped)


def test_ascend_descent_passes_the_gradient_of_minus_the_objective():
    grads = []

    def update(p, grad):
        grads.append(grad)
        return p

    p = torch.tensor([[1.0, 2.0]])
    for descent in (False, True):
        ascend(lambda q: ((q**2).sum(1), None), p, update, steps=1, descent=descent,
               best=KeepBest(p))
    assert torch.equal(grads[0], torch.tensor([[2.0, 4.0]]))
    assert torch.equal(grads[1], -grads[0])


def test_ascend_never_accumulates_into_model_parameters():
    net = torch.nn.Linear(2, 1)

    def objective(p):
        return net(p).squeeze(1), None

    p = torch.zeros(3, 2)
    opt_leaf = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([opt_leaf], lr=0.1)
    ascend(objective, opt_leaf, optimizer_update(opt, opt_leaf, lambda q: q.clamp(-0.15, 0.15)),
           steps=3, best=KeepBest(p), descent=True)
    assert net.weight.grad is None and net.bias.grad is None
    # Adam moved every coordinate along the sign of the weight, clipped at the bound
    assert torch.equal(opt_leaf.detach(), (0.15 * net.weight.detach().sign()).expand(3, 2))


def test_optimizer_update_is_adam_then_projection():
    leaf = torch.zeros(2, 2, requires_grad=True)
    opt = torch.optim.Adam([leaf], lr=0.5)
    update = optimizer_update(opt, leaf, lambda q: q.clamp(-0.2, 0.2))
    with torch.no_grad():
        out = update(leaf, torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    assert out is leaf
    assert torch.equal(leaf.detach(), torch.tensor([[-0.2, 0.2], [0.0, -0.2]]))


def test_curve_records_every_kth_and_the_last_step():
    curve = Curve(steps=7, record_every=3)
    for step in range(8):
        curve(step, torch.full((2,), float(step), dtype=torch.float64))
    assert curve.steps_at == [0, 3, 6, 7]
    out = curve.stack()
    assert out.dtype == torch.float32 and out[:, 0].tolist() == [0.0, 3.0, 6.0, 7.0]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def test_check_positive_int():
    assert check_positive_int(1, "steps") == 1 and check_positive_int(200, "steps") == 200
    for bad in (0, -3, 2.5, 1.0, True, False, "3", None, NAN):
        with pytest.raises(ValueError) as err:
            check_positive_int(bad, "steps")
        assert str(err.value) == f"steps must be an integer >= 1, got {bad!r}"


def test_check_int_with_a_lower_bound():
    assert check_int(0, "seed", low=0) == 0
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        check_int(-1, "seed", low=0)
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got True$"):
        check_int(True, "seed", low=0)


def test_check_real_accepts_and_converts():
    assert check_real(3, "lr", low=0.0, low_open=True) == 3.0
    assert isinstance(check_real(3, "lr"), float)
    assert check_real(0, "lam", low=0.0) == 0.0
    assert check_real(1.0, "eps", low=0.0, high=1.0, low_open=True) == 1.0
    assert check_real(None, "step_size", low=0.0, none_ok=True) is None


@pytest.mark.parametrize(("kwargs", "bad", "message"), [
    ({"low": 0.0, "low_open": True}, 0.0, "lr must be a finite number > 0, got 0.0"),
    ({"low": 0.0, "low_open": True}, -1, "lr must be a finite number > 0, got -1"),
    ({"low": 0.0}, -0.5, "lr must be a finite number >= 0, got -0.5"),
    ({"high": 1.0, "high_open": True}, 1.0, "lr must be a finite number < 1, got 1.0"),
    ({"high": 2.0}, 3, "lr must be a finite number <= 2, got 3"),
    ({"low": 0.0, "high": 1.0, "low_open": True}, 1.5,
     "lr must be a finite number in (0, 1], got 1.5"),
    ({"low": 0.0, "high": 1.0, "high_open": True}, 1,
     "lr must be a finite number in [0, 1), got 1"),
    ({}, NAN, "lr must be a finite number, got nan"),
    ({}, INF, "lr must be a finite number, got inf"),
    ({}, -INF, "lr must be a finite number, got -inf"),
    ({"low": 0.0}, 10**400, f"lr must be a finite number >= 0, got {10**400!r}"),
    ({"low": 0.0, "low_open": True, "none_ok": True}, NAN,
     "lr must be a finite number > 0 or None, got nan"),
    ({"low": 0.0, "expected": "a finite learning rate > 0"}, -1.0,
     "lr must be a finite learning rate > 0, got -1.0"),
])
def test_check_real_refuses_out_of_range_and_non_finite_values(kwargs, bad, message):
    with pytest.raises(ValueError) as err:
        check_real(bad, "lr", **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("bad", [True, False, "0.1", None, [0.1], torch.tensor(0.1)])
def test_check_real_refuses_non_numbers_with_a_type_error(bad):
    with pytest.raises(TypeError) as err:
        check_real(bad, "lr", low=0.0, low_open=True)
    assert str(err.value) == (f"lr must be a real number (a finite number > 0), got {bad!r} "
                              f"({type(bad).__name__})")


def test_check_bool():
    assert check_bool(True, "random_start") is True
    assert check_bool(False, "random_start") is False
    for bad in (1, 0, "true", None, 1.0):
        with pytest.raises(ValueError) as err:
            check_bool(bad, "random_start")
        assert str(err.value) == f"random_start must be True or False, got {bad!r}"


def test_check_choice():
    assert check_choice("head", "through", ("head", "defense")) == "head"
    with pytest.raises(ValueError) as err:
        check_choice("body", "through", ("head", "defense"), note="the classifier term")
    assert str(err.value) == ("through must be one of 'head', 'defense' (the classifier term), "
                              "got 'body'")
    with pytest.raises(ValueError, match=r"^k must be one of 1, 2, got True$"):
        check_choice(True, "k", (1, 2))  # True == 1, but a bool is not the choice 1
    with pytest.raises(ValueError, match=r"got \['head'\]$"):
        check_choice(["head"], "through", ("head", "defense"))  # unhashable: refused cleanly
    with pytest.raises(ValueError, match=r"got nan$"):
        check_choice(math.nan, "x", (1.0,))
    assert check_choice(2, "k", frozenset({1, 2})) == 2


# --------------------------------------------------------------------------------------------
# One copy of each helper
# --------------------------------------------------------------------------------------------
SHARED = {"KeepBest", "bcast", "_bcast", "check_positive_int", "check_int", "check_real",
          "_check_real", "check_bool", "check_choice"}
HOME = {"bcast": "benchmark/api/threat.py"}


def test_each_shared_helper_is_defined_once():
    defined: dict[str, list[str]] = {}
    for pkg in ("attacks", "threat_models", "benchmark/api"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in SHARED:
                    where = defined.setdefault(node.name, [])
                    rel = str(path.relative_to(ROOT))
                    if rel not in where:  # typing overloads are one definition
                        where.append(rel)
    expected = {name: [HOME.get(name, "attacks/_ascent.py")]
                for name in SHARED if not name.startswith("_")}
    assert defined == expected
