"""Stage 2 of LExI: choose k_j per MoE layer minimising sum_j D_j(k_j) subject to sum_j k_j = B.

The objective is separable, so this is a multiple-choice knapsack: `exact` solves it by dynamic
programming in O(L * |T| * B). `evolutionary` is the paper's search (tournament selection, uniform
crossover, zero-sum +-1 mutation, repair to feasibility), kept for comparison.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .. import LexiError, __version__

SOLVERS = ("exact", "evolutionary")
TABLE_FIX = "give a sensitivity.json from `lexi-gguf profile`"


@dataclass
class Problem:
    costs: list[list[float]]     # per MoE layer: D(1)..D(k_base)
    choices: list[list[int]]     # per MoE layer: allowed k values, ascending
    total: int

    def cost(self, ks: list[int]) -> float:
        return sum(c[k - 1] for c, k in zip(self.costs, ks))


def make_problem(costs: list[list[float]], total: int, allowed: list[int] | None = None,
                 min_k: int = 1) -> Problem:
    if not costs:
        raise LexiError("the sensitivity table has no MoE layers")
    k_base = len(costs[0])
    opts = sorted({k for k in (allowed or range(1, k_base + 1)) if min_k <= k <= k_base})
    if not opts:
        raise LexiError(f"no k is allowed: --allowed-k {allowed} with --min-k {min_k} and base k {k_base}")
    lo, hi = len(costs) * opts[0], len(costs) * opts[-1]
    if not lo <= total <= hi:
        raise LexiError(f"budget of {total} active experts is outside [{lo}, {hi}] for {len(costs)} MoE layers "
                        f"with k in {opts}; choose a budget in that range")
    return Problem([list(map(float, c)) for c in costs], [opts] * len(costs), total)


def solve_exact(p: Problem) -> list[int]:
    """Dynamic programming over (layer, budget used)."""
    inf = math.inf
    best = [0.0] + [inf] * p.total          # best[b]: min cost of the layers so far using b experts
    back: list[list[int]] = []
    for c, opts in zip(p.costs, p.choices):
        nxt = [inf] * (p.total + 1)
        arg = [0] * (p.total + 1)
        for b in range(p.total + 1):
            if best[b] == inf:
                continue
            for k in opts:
                if b + k > p.total:
                    break
                v = best[b] + c[k - 1]
                if v < nxt[b + k]:
                    nxt[b + k], arg[b + k] = v, k
        best = nxt
        back.append(arg)
    if best[p.total] == inf:
        raise LexiError(f"no allocation of the allowed k values sums exactly to {p.total}; "
                        "pick another budget or widen --allowed-k")
    ks, b = [], p.total
    for arg in reversed(back):
        ks.append(arg[b])
        b -= arg[b]
    return ks[::-1]


def _repair(ks: list[int], p: Problem, rng: random.Random) -> list[int] | None:
    """Step random layers up or down through their allowed values until the sum equals the budget."""
    ks = list(ks)
    for _ in range(50 * len(ks) * max(len(o) for o in p.choices)):
        s = sum(ks)
        if s == p.total:
            return ks
        movable = [j for j, (k, o) in enumerate(zip(ks, p.choices)) if (k > o[0] if s > p.total else k < o[-1])]
        if not movable:
            return None
        j = rng.choice(movable)
        o = p.choices[j]
        pos = o.index(ks[j])
        ks[j] = o[pos - 1] if s > p.total else o[pos + 1]
    return None


def solve_evolutionary(p: Problem, seed: int = 0, population: int = 96, generations: int = 400,
                       tournament: int = 3, mutation: float = 0.9) -> list[int]:
    rng = random.Random(seed)
    n = len(p.costs)
    pop: list[list[int]] = []
    for _ in range(population * 20):
        cand = _repair([rng.choice(o) for o in p.choices], p, rng)
        if cand is not None:
            pop.append(cand)
        if len(pop) == population:
            break
    if not pop:
        raise LexiError(f"the evolutionary solver found no allocation summing to {p.total}; use --solver exact")

    memo: dict[tuple, float] = {}

    def cost(ks: list[int]) -> float:
        key = tuple(ks)
        if key not in memo:
            memo[key] = p.cost(ks)
        return memo[key]

    def pick() -> list[int]:
        return min(rng.sample(pop, min(tournament, len(pop))), key=cost)

    def mutate(child: list[int]) -> None:
        """Zero-sum +-1 moves: one layer up a step, another down a step (the budget is kept)."""
        while True:
            up, dn = rng.sample(range(n), 2)
            ou, od = p.choices[up], p.choices[dn]
            if child[up] < ou[-1] and child[dn] > od[0]:
                child[up] = ou[ou.index(child[up]) + 1]
                child[dn] = od[od.index(child[dn]) - 1]
            if rng.random() < 0.5:
                return

    for _ in range(generations):
        pop.sort(key=cost)
        children = pop[:2]                                                   # elitism
        while len(children) < population:
            a, b = pick(), pick()
            child = [a[j] if rng.random() < 0.5 else b[j] for j in range(n)]  # uniform crossover
            if rng.random() < mutation and n > 1:
                mutate(child)
            child = _repair(child, p, rng)
            if child is not None:
                children.append(child)
        pop = children
    return _polish(min(pop, key=cost), p)


def _polish(ks: list[int], p: Problem) -> list[int]:
    """Pairwise exchange: re-split the experts of every two layers optimally until nothing improves.
    Every exchange keeps the budget; the EA's best becomes a pairwise optimum."""
    ks = list(ks)
    improved = True
    while improved:
        improved = False
        for a in range(len(ks)):
            for b in range(a + 1, len(ks)):
                pair = ks[a] + ks[b]
                now = p.costs[a][ks[a] - 1] + p.costs[b][ks[b] - 1]
                for ka in p.choices[a]:
                    kb = pair - ka
                    if kb in p.choices[b] and p.costs[a][ka - 1] + p.costs[b][kb - 1] < now - 1e-15:
                        ks[a], ks[b] = ka, kb
                        now = p.costs[a][ka - 1] + p.costs[b][kb - 1]
                        improved = True
    return ks


def budget_total(n_moe: int, k_base: int, budget: float | None = None, total: int | None = None,
                 avg_k: float | None = None) -> int:
    """The total number of active experts from exactly one of: fraction of base, total, average k."""
    given = [x is not None for x in (budget, total, avg_k)]
    if sum(given) != 1:
        raise LexiError("give exactly one of --budget FRACTION, --total N, --avg-k X")
    if budget is not None:
        if not 0 < budget <= 1:
            raise LexiError(f"--budget {budget} must be a fraction of the base budget in (0, 1]")
        return round(budget * n_moe * k_base)
    if avg_k is not None:
        return round(avg_k * n_moe)
    return int(total)


def allocate(sens: dict, *, budget: float | None = None, total: int | None = None, avg_k: float | None = None,
             solver: str = "exact", allowed_k: list[int] | None = None, min_k: int = 1, seed: int = 0,
             compare: bool = False) -> dict:
    """Allocate per-layer k from a sensitivity dict; returns the plan dict (JSON shape in docs)."""
    if solver not in SOLVERS:
        raise LexiError(f"unknown solver {solver!r}: choose {' or '.join(SOLVERS)}")
    moe = [L for L in sens["layers"] if L["moe"]]
    k_base = int(sens["k_base"])
    t = budget_total(len(moe), k_base, budget, total, avg_k)
    prob = make_problem([L["deviation"] for L in moe], t, allowed_k, min_k)
    ks = solve_exact(prob) if solver == "exact" else solve_evolutionary(prob, seed)
    it = iter(ks)
    counts = [next(it) if L["moe"] else 0 for L in sens["layers"]]
    plan = {
        "format": "lexi-plan/1", "lexi_gguf_version": __version__,
        "arch": sens.get("arch"), "k_base": k_base, "n_expert": sens.get("n_expert"),
        "expert_used_count": counts, "total": t, "budget": t / (len(moe) * k_base),
        "avg_k": t / len(moe), "objective": prob.cost(ks), "solver": solver,
        "uniform_objective": (prob.cost([t // len(moe)] * len(moe)) if t % len(moe) == 0 else None),
        "constraints": {"allowed_k": prob.choices[0], "min_k": min_k},
    }
    if compare:
        other = solve_evolutionary(prob, seed) if solver == "exact" else solve_exact(prob)
        plan["objectives"] = {solver: prob.cost(ks),
                              ("evolutionary" if solver == "exact" else "exact"): prob.cost(other)}
    return plan
