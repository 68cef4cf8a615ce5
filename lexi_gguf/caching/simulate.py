"""`lexi-gguf cache-sim`: replay a trace through an expert cache, in true order (token by token,
layer by layer), and count what moves over the link.

A cache holds (layer, expert) slots; capacity is a fraction of all routed experts (L x E), shared by
all layers or split into per-layer quotas (equal, or following the k each layer runs). Demand
policies: LRU, LFU, EAMC (MoE-Infinity-style: the current request's activation counts) and Belady
(evicts the expert needed farthest in the future: the offline optimum of any demand policy, the
ceiling shown beside the others). Prefetch policies (LRU eviction) insert
the experts a predictor names for layers l+1..l+d as soon as layer l's router has run; nothing is
inserted for free: every prefetch of a non-resident expert costs its bytes and can evict.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace
from ..runtime.policies import EVICTION, make_pools, split_quota

# (bandwidth bytes/s, latency s) of the link an expert miss is served over
LINKS = {"pcie4x16": (25e9, 10e-6), "nvme": (3.0e9, 80e-6), "emmc": (0.25e9, 300e-6)}
DEMAND_POLICIES = ("lru", "lfu", "eamc", "belady")


DEMAND_POLICIES = ("lru", "lfu", "eamc", "belady", "nextuse")
POLICIES = EVICTION


def parse_policy(policy: str) -> tuple[str, str | None, bool]:
    """(eviction, predictor or None, gated?) of a policy name: a demand policy (lru, lfu, eamc, belady,
    nextuse), `prefetch:PRED` (every guess, LRU eviction), `prefetch:PRED:gated` (guesses that pay on the
    clock, nextuse eviction) or `prefetch:PRED:gated-lru` (the gate over LRU)."""
    if not policy.startswith("prefetch:"):
        if policy not in POLICIES:
            raise LexiError(f"unknown policy {policy!r}: {', '.join(DEMAND_POLICIES)} or a predictor")
        return policy, None, False
    name, _, mode = policy.removeprefix("prefetch:").partition(":")
    if mode not in ("", "gated", "gated-lru"):
        raise LexiError(f"unknown prefetch mode {mode!r} in {policy!r}: PREDICTOR, PREDICTOR:gated or PREDICTOR:gated-lru")
    return ("nextuse" if mode == "gated" else "lru"), name, bool(mode)


@dataclass
class SimResult:
    policy: str
    capacity: float
    slots: int
    accesses: int
    hits: int
    tokens: int
    demand_bytes: float
    prefetch_bytes: float
    prefetches: int
    prefetch_used: int

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.accesses, 1)

    def row(self, links=LINKS) -> dict:
        misses = self.accesses - self.hits
        out = {"policy": self.policy, "capacity": self.capacity, "slots": self.slots, "hit_rate": self.hit_rate,
               "misses_per_token": misses / max(self.tokens, 1),
               "demand_mb_per_token": self.demand_bytes / max(self.tokens, 1) / 1e6,
               "prefetch_mb_per_token": self.prefetch_bytes / max(self.tokens, 1) / 1e6,
               "prefetch_precision": self.prefetch_used / self.prefetches if self.prefetches else None}
        for name, (bw, lat) in links.items():
            # demand misses stall the token; prefetches overlap compute (their link time is reported)
            out[f"stall_ms_{name}"] = (misses * lat + self.demand_bytes / bw) / max(self.tokens, 1) * 1e3
            out[f"prefetch_link_ms_{name}"] = self.prefetch_bytes / bw / max(self.tokens, 1) * 1e3
        return out


def with_counts(trace: Trace, ks, label: str | None = None) -> Trace:
    """The same routing at per-layer k: each MoE layer keeps its k_j recorded experts of highest routing
    weight (selection order among equal weights). `ks`: k per MoE layer, or k per block (0 on dense
    blocks). Weights are kept as recorded, not renormalised (the simulators read only the ids)."""
    moe = [int(b) for b in trace.moe_layers]
    ks = [int(k) for k in ks]
    L = len(moe)
    if len(ks) != L:
        if len(ks) != moe[-1] + 1 or any(ks[b] for b in set(range(len(ks))) - set(moe)):
            raise LexiError(f"--k has {len(ks)} values: give one per MoE layer ({L}) or one per block "
                            f"({moe[-1] + 1}, 0 on the dense blocks)")
        ks = [ks[b] for b in moe]
    for j, k in enumerate(ks):
        if not 1 <= k <= int(trace.counts[j]):
            raise LexiError(f"--k asks for {k} experts in MoE layer {j} (block {moe[j]}); the trace recorded "
                            f"{int(trace.counts[j])}: give 1..{int(trace.counts[j])} there")
    ex, w = trace.experts, trace.weights
    order = np.argsort(np.where(ex >= 0, -w, np.inf), axis=2, kind="stable")
    ex, w = np.take_along_axis(ex, order, 2), np.take_along_axis(w, order, 2)
    keep = np.arange(ex.shape[2])[None, None, :] < np.asarray(ks)[None, :, None]
    kmax = max(ks)
    ex, w = np.where(keep, ex, -1)[:, :, :kmax], np.where(keep, w, 0.0)[:, :, :kmax]
    meta = {**trace.meta, "budget": label or f"k {','.join(map(str, ks))}"}
    return Trace(trace.tokens, trace.generated, trace.seq, trace.moe_layers, np.asarray(ks, np.int32),
                 ex.astype(trace.experts.dtype), w.astype(np.float32), trace.hidden, meta)


def steps(trace: Trace, phase: str = "auto") -> np.ndarray:
    """Token indices replayed, in order: decode = generated tokens only (what decode latency sees);
    all = every token as its own step. auto = decode when the trace has generated tokens."""
    if phase == "auto":
        phase = "decode" if trace.generated.any() else "all"
    if phase == "decode":
        if not trace.generated.any():
            raise LexiError("the trace has no generated tokens; record it with --prompts or use --phase all")
        return np.flatnonzero(trace.generated)
    if phase == "all":
        return np.arange(len(trace.tokens))
    raise LexiError(f"unknown phase {phase!r}: decode, all or auto")


def quotas(trace: Trace, slots: int, mode: str) -> list[int] | None:
    """Per-layer slot quotas: None (one shared cache), equal, or following each layer's k."""
    L = len(trace.moe_layers)
    if mode == "global":
        return None
    w = np.ones(L) if mode == "equal" else trace.counts.astype(float)
    if mode not in ("equal", "k"):
        raise LexiError(f"unknown slot mode {mode!r}: global, equal or k")
    return [max(int(x), 1) for x in split_quota(slots, w)]    # the runtime expert cache's split too


def make_caches(trace: Trace, slots: int, base: str, slot_mode: str, model=None):
    """(caches, cache_of(layer j)): one shared cache, or one per layer with its quota."""
    q = quotas(trace, slots, slot_mode)
    caches = make_pools(q, slots, base, len(trace.moe_layers), trace.n_expert, trace.counts, model)
    return caches, ((lambda j: caches[j]) if q else (lambda j: caches[0]))


def request_stream(trace: Trace, toks: np.ndarray, belady: bool = False):
    """The requests (step, layer j, expert) in true order, and each one's next use of the same
    (layer, expert) (Belady needs it; max int when never again or not asked for)."""
    L, E = len(trace.moe_layers), trace.n_expert
    reqs = [(s, j, int(e)) for s, t in enumerate(toks) for j in range(L) for e in trace.experts[t, j] if e >= 0]
    next_use = np.full(len(reqs), np.iinfo(np.int64).max, dtype=np.int64)
    if belady:
        last: dict[int, int] = {}
        for i in range(len(reqs) - 1, -1, -1):
            key = reqs[i][1] * E + reqs[i][2]
            next_use[i] = last.get(key, np.iinfo(np.int64).max)
            last[key] = i
    return reqs, next_use


def lookahead_targets(trace: Trace, toks: np.ndarray, s: int, j: int, depth: int):
    """(distance d, token, layer) a prefetch issued at step s, layer j can aim at: layers j+1..j+depth,
    past the last layer the next token's first ones when it follows in the same sequence."""
    L, t = len(trace.moe_layers), int(toks[s])
    for d in range(1, depth + 1):
        tt, jj = t, j + d
        if jj >= L:
            if s + 1 >= len(toks) or int(toks[s + 1]) != t + 1 or trace.seq[t + 1] != trace.seq[t]:
                return
            tt, jj = t + 1, jj - L
        yield d, tt, jj


def replay_setup(trace: Trace, capacity: float, policy: str, predictions, phase: str, slot_mode: str, model=None):
    """What both simulators start from: (slots, prefetching?, caches, cache_of, bytes per expert of each
    layer, replayed tokens, the request stream, each request's next use)."""
    L, E = len(trace.moe_layers), trace.n_expert
    slots = max(1, int(round(capacity * L * E)))
    base, pred, _ = parse_policy(policy)
    prefetch = pred is not None
    if prefetch and predictions is None:
        raise LexiError(f"policy {policy} needs predictions")
    caches, cache_of = make_caches(trace, slots, base, slot_mode, model)
    nbytes = np.asarray(trace.meta.get("expert_bytes") or [1.0] * L, dtype=float)
    toks = steps(trace, phase)
    reqs, next_use = request_stream(trace, toks, belady=base == "belady")
    return slots, prefetch, caches, cache_of, nbytes, toks, reqs, next_use


def simulate(trace: Trace, capacity: float, policy: str, *, predictions: dict | None = None,
             depth: int = 1, phase: str = "auto", slot_mode: str = "global") -> SimResult:
    """Replay the trace. policy: lru | lfu | eamc | belady, or "prefetch:<name>" with predictions
    {d: {(token, moe layer j): experts}}: what is known of layer j at layer j - d, for d in 1..depth
    (LRU eviction). A predictor without a depth d is not used at that distance."""
    E = trace.n_expert
    r = replay_setup(trace, capacity, policy, predictions, phase, slot_mode)
    slots, prefetch, caches, cache_of, expert_bytes, toks, reqs, next_use = r
    hits = 0
    demand_b = prefetch_b = 0.0
    n_pref = used_pref = 0
    pending: set[int] = set()        # prefetched, not yet used
    by_layer = itertools.groupby(range(len(reqs)), key=lambda i: (reqs[i][0], reqs[i][1]))
    seq_now = None
    for (s, j), idx in by_layer:
        if j == 0 and trace.seq[toks[s]] != seq_now:      # a new request: EAMC restarts its counts
            seq_now = trace.seq[toks[s]]
            for c in caches:
                c.new_sequence()
        idx = list(idx)
        needed = [j * E + reqs[i][2] for i in idx]
        for c in caches:
            c.on_layer(s, j, needed)
        c = cache_of(j)
        for i in idx:
            key = j * E + reqs[i][2]
            if key in c:
                hits += 1
                c.touch(key, i, next_use[i])
                if key in pending:
                    used_pref += 1
                    pending.discard(key)
            else:
                demand_b += expert_bytes[j]
                ev = c.insert(key, i, next_use[i])
                pending.discard(ev)
        if prefetch:
            for d, tt, jj in lookahead_targets(trace, toks, s, j, depth):
                cj = cache_of(jj)
                for e in predictions.get(d, {}).get((tt, jj), ()):
                    key = jj * E + int(e)
                    if key in cj:          # already resident: keep it from being evicted before its use
                        cj.promote(key, i)
                        continue
                    n_pref += 1
                    prefetch_b += expert_bytes[jj]
                    ev = cj.prefetched(key, i)
                    pending.discard(ev)
                    pending.add(key)
    return SimResult(policy, capacity, slots, len(reqs), hits, len(toks), demand_b, prefetch_b, n_pref, used_pref)


def demand_misses(trace: Trace, slots: int, policy: str = "belady", count_from: int = 0) -> int:
    """Misses of a demand policy with `slots` (layer, expert) slots over every token, counted from token
    `count_from` on: what a warm cache misses on the tokens after a prompt and warm-up."""
    reqs, next_use = request_stream(trace, np.arange(len(trace.tokens)), belady=policy == "belady")
    cache = make_pools(None, slots, policy, len(trace.moe_layers), trace.n_expert, trace.counts)[0]
    misses = 0
    for i, (step, j, e) in enumerate(reqs):
        cache.on_layer(step, j, [j * trace.n_expert + int(x) for x in trace.experts[step, j] if x >= 0])
        key = j * trace.n_expert + e
        if key in cache:
            cache.touch(key, i, next_use[i])
        else:
            cache.insert(key, i, next_use[i])
            misses += step >= count_from
    return misses


def oracle_predictions(trace: Trace, depth: int = 3) -> dict[int, dict]:
    """The experts each (token, layer) really used, known at every depth: a perfect predictor."""
    truth = {(t, j): [int(e) for e in trace.experts[t, j] if e >= 0]
             for t in range(len(trace.tokens)) for j in range(len(trace.moe_layers))}
    return {d: truth for d in range(1, depth + 1)}


def run(trace: Trace, capacities: list[float], policies: list[str], *, predictors: dict | None = None,
        depth: int = 1, phase: str = "auto", slot_mode: str = "global") -> dict:
    """Every policy at every capacity: the rows of the cache-sim table."""
    predictors = predictors or {}
    rows = []
    for cap in capacities:
        for pol in policies:
            if pol in DEMAND_POLICIES:
                r = simulate(trace, cap, pol, phase=phase, slot_mode=slot_mode)
            elif ":" in pol and pol.split(":")[0] in predictors:
                continue            # gated prefetch decides on the clock: clock.py only
            elif pol in predictors:
                r = simulate(trace, cap, f"prefetch:{pol}", predictions=predictors[pol], depth=depth, phase=phase,
                             slot_mode=slot_mode)
            else:
                raise LexiError(f"unknown policy {pol!r}: {', '.join([*DEMAND_POLICIES, *predictors]) }")
            rows.append(r.row())
    return {"trace": trace.meta, "phase": phase, "slot_mode": slot_mode, "depth": depth,
            "n_expert": trace.n_expert, "moe_layers": len(trace.moe_layers), "counts": trace.counts.tolist(),
            "rows": rows}


def table(res: dict, link: str = "nvme") -> str:
    lines = [f"| capacity | policy | slots | hit rate | misses/token | MB/token demand | MB/token prefetch | "
             f"prefetch precision | stall ms/token ({link}) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pp = f"{r['prefetch_precision']:.2f}" if r["prefetch_precision"] is not None else "-"
        lines.append(f"| {r['capacity']:g} | {r['policy']} | {r['slots']} | {r['hit_rate']:.3f} | "
                     f"{r['misses_per_token']:.2f} | {r['demand_mb_per_token']:.3f} | {r['prefetch_mb_per_token']:.3f} | "
                     f"{pp} | {r[f'stall_ms_{link}']:.3f} |")
    return "\n".join(lines)


def draw_hit_rates(ax, rows: list[dict]) -> None:
    """Hit rate against capacity, one line per policy (Belady, the demand ceiling, dashed)."""
    for pol in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == pol]
        ax.plot([r["capacity"] for r in rs], [r["hit_rate"] for r in rs], "k--" if pol == "belady" else "o-", label=pol)
    ax.set_xlabel("cache capacity (fraction of all routed experts)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def plot(res: dict, out) -> str:
    from ..measure.plots import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    draw_hit_rates(ax, res["rows"])
    ax.set_ylabel("expert hit rate")
    ax.legend(fontsize=8)
    ax.set_title(f"{res['trace'].get('budget', '')} budget, {res['moe_layers']} MoE layers x {res['n_expert']} experts",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)
