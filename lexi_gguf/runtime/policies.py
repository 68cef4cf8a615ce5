"""Expert-cache policies: one implementation for the simulators (caching.simulate, caching.clock) and the
runtime's expert cache (runtime.expertcache, issue 30); it lives in runtime/ so that the runtime may use it. A cache is a pool of (layer, expert) slots, keyed `layer * n_expert + expert`.

The interface every policy has (class Policy):
  key in cache                          resident?
  on_layer(token, layer, needed)        MoE layer `layer` of `token` starts; `needed`: the keys its router
                                        chose (known before any of them is read); they stay while it runs
  touch(key, now, next_use=None)        a demand hit
  admit(key, now, next_use=None)        a demand miss read in: evicts victim() first when full, returns it
  victim()                              the key admit would evict now (None while there is room)
  evict()                               drop victim() now and return it (a cache that counts bytes, not slots)
  prefetched(key, now, conf) / promote(key, now, conf)   a guess read in / a guess already resident
  reuse(key)                            P(key is used at its layer's next run), None when unknown
`now` is the request counter; `next_use` only Belady (offline) reads.

Eviction: lru, lfu, eamc (MoE-Infinity-style), belady (the offline optimum) and nextuse (learned, below).
Prefetch decision: PrefetchGate (expected gain on the clock > 0).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np


class Policy:
    """The shared interface (defaults for the policies that ignore a call)."""
    cap: int

    def on_layer(self, token: int, layer: int, needed) -> None:
        pass

    def new_sequence(self) -> None:
        pass

    def reuse(self, key):
        return None

    def admit(self, key, now, next_use=None):
        out = self.evict() if len(self) >= self.cap else None
        self._add(key, now, next_use)
        return out

    insert = admit

    def evict(self):
        """Drop the victim now, whatever the room (None when empty)."""
        out = self.victim()
        if out is not None:
            self._drop(out)
        return out

    def prefetched(self, key, now, conf: float = 1.0):
        return self.admit(key, now)

    def promote(self, key, now, conf: float = 1.0) -> None:
        self.touch(key, now)


class LRU(Policy):
    def __init__(self, cap: int):
        self.cap, self.d = cap, OrderedDict()

    def __contains__(self, key):
        return key in self.d

    def __len__(self):
        return len(self.d)

    def touch(self, key, now, next_use=None):
        self.d.move_to_end(key)

    def victim(self):
        return next(iter(self.d)) if self.d else None

    def _drop(self, key):
        del self.d[key]

    def _add(self, key, now, next_use):
        self.d[key] = True


class LFU(Policy):
    """Least frequently used (counts over the whole history), least recently used among ties; the
    experts the running layer needs (on_layer) are never victims."""

    def __init__(self, cap: int):
        self.cap, self.res, self.count, self.heap = cap, {}, {}, []
        self.needed: set = set()

    def on_layer(self, token, layer, needed):
        self.needed = set(needed)

    def __contains__(self, key):
        return key in self.res

    def __len__(self):
        return len(self.res)

    def touch(self, key, now, next_use=None):
        self.count[key] = self.count.get(key, 0) + 1
        self.res[key] = now
        heapq.heappush(self.heap, (self.count[key], now, key))

    def victim(self):
        held, out = [], None
        while self.heap and out is None:
            c, t, k = heapq.heappop(self.heap)
            if k in self.res and self.res[k] == t and self.count[k] == c:      # else stale: dropped
                held.append((c, t, k))
                out = None if k in self.needed else k
        for h in held:
            heapq.heappush(self.heap, h)
        return out if out is not None or not held else held[0][2]   # only needed ones left: the least used goes

    def _drop(self, key):
        del self.res[key]

    def _add(self, key, now, next_use):
        self.touch(key, now)


class EAMC(LFU):
    """MoE-Infinity-style: keep the experts the current request (sequence) has activated most (its
    expert activation matrix), least recently used among ties; the counts restart with each request."""

    def new_sequence(self):
        self.count = {k: 0 for k in self.res}
        self.heap = [(0, t, k) for k, t in self.res.items()]
        heapq.heapify(self.heap)


class Belady(Policy):
    """Evict the resident expert whose next use is farthest away (needs the future: offline only)."""

    def __init__(self, cap: int):
        self.cap, self.res, self.heap = cap, {}, []

    def __contains__(self, key):
        return key in self.res

    def __len__(self):
        return len(self.res)

    def touch(self, key, now, next_use=None):
        self.res[key] = next_use
        heapq.heappush(self.heap, (-next_use, key))

    def victim(self):
        while self.heap:
            nu, k = self.heap[0]
            if k in self.res and self.res[k] == -nu:
                return k
            heapq.heappop(self.heap)
        return None

    def _drop(self, key):
        del self.res[key]

    def _add(self, key, now, next_use):
        self.touch(key, now, next_use)


# ------------------------------------------------------------------ learned next-use eviction

AGE_EDGES = np.array([1, 2, 3, 5, 9, 17, 33, 1 << 30])     # tokens since the last use: 1, 2, 3-4, ... 33+, never
PRIOR_TOKENS = 2.0      # a request's rate starts from the all-requests rate, worth this many tokens
RATE_EDGES = np.array([0.02, 0.05, 0.1, 0.15, 0.22, 0.3, 0.4, 0.55, 0.7, 0.85])   # uses per token in this request


class ReuseModel:
    """P(an expert is used the next time its layer runs | tokens since its last use, its use rate in the
    current request (MoE-Infinity's observation: a request keeps using its experts)), counted online on
    the routing seen so far in one table for all layers (a table per layer learnt slower and did worse);
    a request's rate starts from the expert's rate over all requests, and that from its layer's k / E,
    so LExI's per-layer counts set each layer's base rate. From it, the expected number
    of layer steps until a key's next use: the steps to its layer's next run plus L per token it is
    expected to wait (1/p - 1, geometric). Runtime-cheap: counters and E-wide updates per layer."""

    def __init__(self, n_layer: int, n_expert: int, counts, prior: float = 4.0):
        L, E = n_layer, n_expert
        self.L, self.E = L, E
        self.base = base = np.asarray(counts, float) / E
        shape = (len(AGE_EDGES) + 1, len(RATE_EDGES) + 1)
        self.n = np.full(shape, prior)
        self.u = np.full(shape, prior * base.mean())
        self.last = np.full(L * E, -(1 << 40), np.int64)        # token of the last use
        self.uses = np.zeros(L * E)                              # uses in the current request
        self.total, self.runs = np.zeros(L * E), 0               # uses and layer runs over all requests
        self.t0, self.restart = 0, False                         # the request's first token; a new one began
        self.hint = np.zeros(L * E)                              # a guess's confidence until its layer runs
        self.layer_of = np.arange(L * E) // E
        self.t, self.j, self.needed = 0, -1, np.zeros(L * E, bool)
        self._at = None
        self.ver = 0                                             # bumped whenever a distance may change

    def _buckets(self, keys, t):
        age = t - self.last[keys]
        prior = (self.total[keys] + self.base[self.layer_of[keys]]) / (self.runs / self.L + 1)
        rate = (self.uses[keys] + PRIOR_TOKENS * prior) / (t - self.t0 + PRIOR_TOKENS)
        return np.searchsorted(AGE_EDGES, age, side="right"), np.searchsorted(RATE_EDGES, rate)

    def on_layer(self, token: int, layer: int, needed) -> None:
        if self._at == (token, layer):
            return
        self._at = (token, layer)
        self.ver += 1
        if self.restart:
            self.uses[:], self.t0, self.restart = 0.0, token, False
        keys = np.arange(layer * self.E, (layer + 1) * self.E)
        used = np.zeros(self.E, bool)
        used[np.asarray(list(needed), np.int64) - layer * self.E] = True
        ab, fb = self._buckets(keys, token)
        np.add.at(self.n, (ab, fb), 1.0)
        np.add.at(self.u, (ab, fb), used)
        self.uses[keys] += used
        self.total[keys] += used
        self.runs += 1
        self.last[keys[used]] = token
        self.hint[keys] = 0.0
        self.needed[:] = False
        self.needed[keys[used]] = True
        self.t, self.j = token, layer

    def p_next(self, keys) -> np.ndarray:
        """P(used at its layer's next run) of each key."""
        lay = self.layer_of[keys]
        tn = self.t + (lay <= self.j)
        ab, fb = self._buckets(keys, tn)
        return np.maximum(self.u[ab, fb] / self.n[ab, fb], self.hint[keys])

    def distance(self, keys) -> np.ndarray:
        """Expected layer steps until each key's next use (-inf for a key the running layer needs: never a victim)."""
        lay = self.layer_of[keys]
        o = (lay - self.j) % self.L
        o[o == 0] = self.L
        d = o + self.L * (1.0 / np.maximum(self.p_next(keys), 1e-6) - 1.0)
        return np.where(self.needed[keys], -np.inf, d)


class NextUse(Policy):
    """Evict the resident expert whose next use the ReuseModel puts farthest away (the learned
    counterpart of Belady: recency x frequency x the layer's position, learned online from the routing).
    A guess read in or promoted keeps its confidence until its layer runs."""

    def __init__(self, cap: int, model: ReuseModel):
        self.cap, self.m, self.res = cap, model, {}      # res: key -> last touch (ties: least recent goes)
        self._order, self._ver, self._i = None, None, 0  # victims in order, while no distance changes

    def __contains__(self, key):
        return key in self.res

    def __len__(self):
        return len(self.res)

    def on_layer(self, token, layer, needed):
        self.m.on_layer(token, layer, needed)

    def new_sequence(self):
        self.m.restart = True

    def touch(self, key, now, next_use=None):
        self.res[key] = now
        self._changed(key)

    def _changed(self, key):
        if not self.m.needed[key]:               # a needed key is never ranked before a finite one
            self._order = None

    def victim(self):
        """The farthest next use (ties: least recently touched). Distances change only with the model
        (on_layer, a guess's confidence) or a key touched that the running layer does not need, so the
        ranking is kept between those and each victim is the next one in it (what a fresh ranking gives)."""
        if not self.res:
            return None
        if self._order is None or self._ver != self.m.ver:
            keys = np.fromiter(self.res, np.int64, len(self.res))
            d = self.m.distance(keys)
            t = np.fromiter((self.res[k] for k in keys.tolist()), np.int64, len(keys))
            rank = np.lexsort((t, -d))
            self._order, self._fin, self._ver, self._i = keys[rank].tolist(), np.isfinite(d[rank]).tolist(), self.m.ver, 0
        while self._i < len(self._order) and self._order[self._i] not in self.res:
            self._i += 1
        if self._i == len(self._order) or not self._fin[self._i]:   # smaller than one layer's experts: least recent goes
            return min(self.res, key=self.res.get)
        return self._order[self._i]

    def _drop(self, key):
        del self.res[key]

    def _add(self, key, now, next_use):
        self.res[key] = now
        self._changed(key)

    def reuse(self, key):
        return float(self.m.p_next(np.array([key]))[0])

    def prefetched(self, key, now, conf: float = 1.0):
        out = self.admit(key, now)
        self.promote(key, now, conf)
        return out

    def promote(self, key, now, conf: float = 1.0) -> None:
        self.m.hint[key] = max(self.m.hint[key], conf)
        self.m.ver += 1


EVICTION = {"lru": LRU, "lfu": LFU, "eamc": EAMC, "belady": Belady, "nextuse": NextUse}


def split_quota(total: int, weights) -> list[int]:
    """`total` split in proportion to `weights`, whole units, largest remainders first (the per-layer
    quotas of the simulators, in slots, and of the runtime expert cache, in bytes)."""
    w = np.asarray(weights, float)
    share = total * w / w.sum()
    q = np.floor(share).astype(np.int64)
    q[np.argsort(-(share - q))[: int(total - q.sum())]] += 1
    return q.tolist()


class LayerPools:
    """One pool per MoE layer (quotas), looked up by key: `key in pools`, len, evict() (any pool's victim)."""

    def __init__(self, pools: list[Policy], n_expert: int):
        self.pools, self.E = pools, n_expert

    def __contains__(self, key):
        return key in self.pools[key // self.E]

    def __len__(self):
        return sum(len(p) for p in self.pools)

    def evict(self):
        return next((v for p in self.pools if (v := p.evict()) is not None), None)


def make_pools(quota: list[int] | None, slots: int, kind: str, n_layer: int, n_expert: int, counts,
               model: ReuseModel | None = None) -> list[Policy]:
    """One pool per quota (or one shared pool of `slots`); nextuse pools share one ReuseModel (`model`: one
    made elsewhere, e.g. warm from another trace, or a bound that knows more than a runtime can)."""
    sizes = quota or [slots]
    if kind == "nextuse":
        model = model or ReuseModel(n_layer, n_expert, counts)
        return [NextUse(c, model) for c in sizes]
    return [EVICTION[kind](c) for c in sizes]


from .gate import PrefetchGate  # noqa: E402,F401  (the prefetch decision, re-exported: its home before)
