"""Stage 2: exact DP equals brute force; the evolutionary search finds the same optimum and stays feasible."""
from __future__ import annotations

import itertools
import random

import pytest

from lexi_gguf import LexiError
from lexi_gguf.method.allocate import allocate, make_problem, solve_evolutionary, solve_exact


def _table(n_layer, k_base, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n_layer):
        scale = rng.uniform(0.1, 5.0)
        d = sorted((rng.random() * scale for _ in range(k_base - 1)), reverse=True)
        out.append(d + [0.0])
    return out


def _brute(costs, total, opts):
    best = None
    for ks in itertools.product(opts, repeat=len(costs)):
        if sum(ks) == total:
            v = sum(c[k - 1] for c, k in zip(costs, ks))
            if best is None or v < best[0] - 1e-12:
                best = (v, list(ks))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("allowed", [None, [1, 2, 4, 5, 6, 8]])
def test_exact_equals_brute_force(seed, allowed):
    costs = _table(5, 8, seed)
    opts = sorted(allowed or range(1, 9))
    for total in (6, 13, 20, 27, 33):
        p = make_problem(costs, total, allowed)
        ks = solve_exact(p)
        ref = _brute(costs, total, opts)
        if ref is None:
            continue
        assert sum(ks) == total and all(k in opts for k in ks)
        assert p.cost(ks) == pytest.approx(ref[0])


@pytest.mark.parametrize("seed", range(4))
def test_evolutionary_reaches_optimum_and_respects_bounds(seed):
    costs = _table(8, 8, 100 + seed)
    for total in (20, 32, 50):
        p = make_problem(costs, total, None, min_k=2)
        ks = solve_evolutionary(p, seed=seed)
        assert sum(ks) == total
        assert all(2 <= k <= 8 for k in ks)
        assert p.cost(ks) == pytest.approx(p.cost(solve_exact(p)))


def test_allocate_plan_shape_and_dense_layers():
    sens = {"arch": "deepseek_v2", "k_base": 4, "n_expert": 8,
            "layers": [{"index": 0, "moe": False, "deviation": None}] +
                      [{"index": i, "moe": True, "deviation": c} for i, c in enumerate(_table(3, 4, 9), 1)]}
    plan = allocate(sens, budget=0.75, compare=True)
    assert plan["expert_used_count"][0] == 0
    assert sum(plan["expert_used_count"]) == plan["total"] == 9
    assert plan["solver"] == "exact"
    assert plan["objectives"]["evolutionary"] >= plan["objectives"]["exact"] - 1e-12
    assert allocate(sens, total=9)["expert_used_count"] == plan["expert_used_count"]
    assert allocate(sens, avg_k=3)["expert_used_count"] == plan["expert_used_count"]


def test_same_seed_same_evolutionary_result():
    sens = {"k_base": 8, "layers": [{"index": i, "moe": True, "deviation": c} for i, c in enumerate(_table(6, 8, 3))]}
    a = allocate(sens, avg_k=4, solver="evolutionary", seed=5)
    b = allocate(sens, avg_k=4, solver="evolutionary", seed=5)
    assert a["expert_used_count"] == b["expert_used_count"]


@pytest.mark.parametrize("kw,msg", [
    (dict(total=3), r"outside \[4, 32\]"),
    (dict(total=33), r"outside \[4, 32\]"),
    (dict(budget=1.5), r"fraction of the base budget"),
    (dict(total=8, allowed_k=[16]), "no k is allowed"),
    (dict(budget=0.5, total=4), "exactly one of"),
    (dict(total=9, allowed_k=[2, 4]), "sums exactly to 9"),
])
def test_infeasible_budgets_are_errors(kw, msg):
    sens = {"k_base": 8, "layers": [{"index": i, "moe": True, "deviation": c} for i, c in enumerate(_table(4, 8, 1))]}
    with pytest.raises(LexiError, match=msg):
        allocate(sens, **kw)
