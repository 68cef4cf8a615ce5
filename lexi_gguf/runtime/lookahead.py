"""Look-ahead prefetch for the runtime expert cache (`--cache-policy learned`, issue 30): once MoE layer
j's experts are known, guess those of layers j+1..j+D (past the last layer, the next token's first
ones) and ask for a guess only when the clock says it pays: PrefetchGate, the rule caching.clock runs,
fed with what this run measures (the disk's read rate, the time between layers, the bytes already asked).

Predictors read expert ids only (the routing hook gives ids, not router inputs), through one interface
(observe the layer that ran, guess a later one), and `predictions` replays a trace through the same
objects, so the simulators judge the predictor the runtime runs:
* `previous`: a layer's last run (the previous token's experts); nothing to learn.
* `coactivation` (the default): P(expert e' at layer j+d | expert e at layer j), counted online from the
  routing seen so far (warm from a trace when given one: `--cache-predictor TRACE.npz`); a target's
  guesses rank its experts by the summed probabilities over layer j's experts, then by the target
  layer's own counts.
* a `.pt` from `predictor train --kind sequence` (runtime.seqmodel.OnlineSequence).
Decode only: a prefill ubatch (many tokens at once) is neither learned from nor guessed from."""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np

from .. import LexiError
from .gate import PrefetchGate

DEPTH = 2                  # layers ahead the online predictors guess (a .pt keeps its own)
PROMOTE = 0.5              # a resident guess moves up only when at least this likely (clock.py's rule)


class Previous:
    def __init__(self, n_layer: int, n_expert: int):
        self.last: list[list[int]] = [[] for _ in range(n_layer)]

    def new_token(self) -> None:
        pass

    def new_sequence(self) -> None:
        self.last = [[] for _ in self.last]

    def observe(self, j: int, experts) -> None:
        self.last[j] = [int(e) for e in experts]

    def guess(self, j: int, d: int, jj: int, k: int) -> list[int]:
        return self.last[jj][:k]


class Coactivation:
    def __init__(self, n_layer: int, n_expert: int, depth: int = DEPTH):
        L, E = n_layer, n_expert
        self.depth, self.L = depth, L
        self.c = np.zeros((depth, L, E, E), np.float32)      # [d - 1, source layer, e, e']
        self.rows = np.zeros((depth, L, E), np.float32)       # each source row's total
        self.pop = np.zeros((L, E), np.float32)               # each layer's own counts: the tie-break
        self.hist: deque = deque(maxlen=depth)                # the last layers that ran: (j, experts)

    def new_token(self) -> None:
        pass

    def new_sequence(self) -> None:
        self.hist.clear()

    def observe(self, j: int, experts) -> None:
        ex = np.asarray(list(experts), np.int64)
        for d, (js, src) in enumerate(reversed(self.hist), 1):
            self.c[d - 1, js][np.ix_(src, ex)] += 1.0
            self.rows[d - 1, js, src] += len(ex)
        self.pop[j, ex] += 1.0
        self.hist.append((j, ex))

    def guess(self, j: int, d: int, jj: int, k: int) -> list[int]:
        if not self.hist or d > self.depth:
            return []
        src = self.hist[-1][1]
        score = (self.c[d - 1, j][src] / np.maximum(self.rows[d - 1, j, src], 1.0)[:, None]).sum(0)
        score += 1e-3 * self.pop[jj] / max(float(self.pop[jj].sum()), 1.0)
        return np.argsort(-score, kind="stable")[:k].tolist()


def make_predictor(spec: str | None, n_layer: int, n_expert: int):
    """(predictor, depth) for `--cache-predictor`: previous, coactivation, TRACE.npz (coactivation warm
    from that trace), or PRED.pt (`predictor train --kind sequence`)."""
    spec = spec or "coactivation"
    if spec == "previous":
        return Previous(n_layer, n_expert), DEPTH
    if spec == "coactivation":
        return Coactivation(n_layer, n_expert), DEPTH
    p = Path(spec)
    if p.suffix == ".npz" and p.is_file():
        from .tracefile import Trace
        tr = Trace.load(p)
        if (tr.n_expert, len(tr.moe_layers)) != (n_expert, n_layer):
            raise LexiError(f"--cache-predictor {spec}: a trace of {tr.n_expert} experts x {len(tr.moe_layers)} MoE "
                            f"layers, this model has {n_expert} x {n_layer}: give a trace of this model")
        co = Coactivation(n_layer, n_expert)
        replay(tr, co)
        return co, DEPTH
    if p.suffix == ".pt" and p.is_file():
        from .seqmodel import OnlineSequence, load
        m = load(p)
        if (m.E, m.L) != (n_expert, n_layer):
            raise LexiError(f"--cache-predictor {spec}: trained on {m.E} experts x {m.L} MoE layers, this model has "
                            f"{n_expert} x {n_layer}: train it on a trace of this model")
        return OnlineSequence(m), m.depth
    raise LexiError(f"--cache-predictor {spec!r}: use previous, coactivation, a trace TRACE.npz of this model "
                    "(coactivation counted on it first) or PRED.pt from `lexi-gguf predictor train --kind sequence`")


def targets(j: int, depth: int, n_layer: int):
    """(d, target layer, next token?) for layers j+1..j+depth, wrapping into the next token."""
    for d in range(1, depth + 1):
        yield d, (j + d) % n_layer, j + d >= n_layer


def replay(trace, predictor, depth: int = 0) -> dict[int, dict]:
    """Run `predictor` over a trace's rows in order, as the runtime would ({d: {(token, layer): guesses}}
    for the simulators and predict.score; depth 0: only learn)."""
    L = len(trace.moe_layers)
    out: dict[int, dict] = {d: {} for d in range(1, depth + 1)}
    for t in range(len(trace.tokens)):
        if t and trace.seq[t] != trace.seq[t - 1]:
            predictor.new_sequence()
        elif t:
            predictor.new_token()
        nxt = t + 1 < len(trace.tokens) and trace.seq[t + 1] == trace.seq[t]
        for j in range(L):
            predictor.observe(j, [int(e) for e in trace.experts[t, j] if e >= 0])
            for d, jj, wraps in targets(j, depth, L):
                if (not wraps or nxt) and (g := predictor.guess(j, d, jj, int(trace.counts[jj]))):
                    out[d][(t + wraps, jj)] = g
    return out


def probe_rate(files, spans, limit: int = 48 << 20) -> float:
    """Bytes per second reading these (set offset, bytes) spans of the set's files (expertmap.MappedSet)
    with pread (pages not in memory: the cache has just dropped them), then dropped again."""
    t0, n = time.perf_counter(), 0
    for off, m in spans:
        if n >= limit:
            break
        n += files.read_and_drop(off, m)
    dt = time.perf_counter() - t0
    return n / dt if n and dt > 0 else float("inf")


class Lookahead:
    """The cache's look-ahead (runs on its worker thread, after the layer's own misses were asked for)."""

    def __init__(self, cache, predictor, depth: int, rate: float):
        self.c, self.p, self.depth, self.rate = cache, predictor, depth, rate
        self.L, self.E = len(cache.lay.moe_layers), cache.lay.n_expert
        self.gate = PrefetchGate(depth, int(max(cache.counts)))
        self.made: dict[tuple[int, int], dict[int, list[int]]] = {}   # (step, layer) -> {d: guesses}
        self.interval, self.t_last = None, None                          # seconds between MoE layers (EMA)
        self.seen = False                                                # a decode token observed
        self.unused: set[int] = set()                                    # prefetched, not requested yet
        self.stats = dict(prefetches=0, prefetch_bytes=0, prefetch_used=0, prefetch_wasted=0, refused=0, promoted=0)

    def requested(self, keys) -> None:
        """A layer asked for these keys: a prefetched one among them was a useful prefetch."""
        used = self.unused.intersection(keys)
        self.stats["prefetch_used"] += len(used)
        self.unused.difference_update(used)

    def after_layer(self, step: int, j: int, keys: list[int], asked_bytes: int, n_tokens: int, t_cb: float) -> list[int]:
        """Layer j of decode step `step` ran `keys` (asked_bytes of them were misses): learn, guess layers
        j+1..j+depth, prefetch what pays; returns the victims to drop."""
        if n_tokens != 1:
            self.t_last = None
            return []
        if j == 0 and self.seen:
            self.p.new_token()
        self.seen = True
        if self.t_last is not None and t_cb > self.t_last:
            dt = t_cb - self.t_last
            self.interval = dt if self.interval is None else 0.8 * self.interval + 0.2 * dt
        self.t_last = t_cb
        experts = [k - j * self.E for k in keys]
        for d, g in self.made.pop((step, j), {}).items():
            self.gate.learn(d, g, experts)
        self.p.observe(j, experts)
        if self.interval is None:
            return []
        drops: list[int] = []
        running = set(keys)
        backlog = asked_bytes / self.rate
        for d, jj, wraps in targets(j, self.depth, self.L):
            k = int(self.c.counts[jj])
            g = self.p.guess(j, d, jj, k)
            self.made.setdefault((step + wraps, jj), {})[d] = g
            lead = d * self.interval
            for rank, e in enumerate(g):
                key = jj * self.E + int(e)
                conf = self.gate.confidence(d, rank)
                pol = self.c.pool_of(jj)
                if key in pol:
                    if conf >= PROMOTE:
                        pol.promote(key, self.c.now, conf)
                        self.stats["promoted"] += 1
                    continue
                b = self.c.key_bytes(key)
                transfer = b / self.rate
                v = pol.victim() if self.c.room(jj) < b else None
                if v in running:
                    self.stats["refused"] += 1          # room only by dropping what this layer runs
                    continue
                p_v = pol.reuse(v) if v is not None else None
                displaced = 0.0 if v is None else ((self.c.counts[v // self.E] / self.E if p_v is None else p_v)
                                                   * self.c.key_bytes(v) / self.rate)
                if not self.gate.decide(conf, lead, backlog, transfer, transfer, displaced):
                    self.stats["refused"] += 1
                    continue
                admitted = self.c.prefetch(key, conf, drops)
                if admitted:
                    backlog += transfer
                    self.unused.add(key)
                    self.stats["prefetches"] += 1
                    self.stats["prefetch_bytes"] += b
        return drops

    def summary(self) -> dict:
        return {"predictor": type(self.p).__name__.lower(), "depth": self.depth,
                "read_rate_mb_s": round(self.rate / 1e6, 1),
                "layer_interval_ms": None if self.interval is None else round(self.interval * 1e3, 3), **self.stats}
