"""The runtime expert cache (issue 30, design (a) in docs/memory.md): bounded routed-expert memory over
llama.cpp's mapping of the GGUF, with the project's eviction policy (runtime.policies), no cgroup and no
C++ beyond the routing hook.

At install: MADV_RANDOM on the expert tensors (no fault read-around bringing in experts nobody chose)
and every expert page dropped. On each MoE layer's ids (runtime.replay.RoutingHooks, after any replay):
the policy sees the experts the layer needs; hits are touched, misses admitted and asked for
(MADV_WILLNEED on their gate/up/down slices) once victims (never an expert this layer needs) have been
dropped (MADV_PAGEOUT, then posix_fadvise DONTNEED for pages not mapped here; MADV_DONTNEED where
PAGEOUT is missing) until the admitted experts' bytes fit SIZE. The matmuls are untouched: outputs are
those of a run without the cache. A ubatch needing more than SIZE at one layer (a long prefill) reads
the rest on demand and drops it at the next layer."""
from __future__ import annotations

import atexit
import weakref
import sys
import time

import numpy as np

from .. import LexiError
from . import expertmap as xm
from .expertio import ExpertIO
from .policies import LayerPools, make_pools, split_quota
from .hooks import ORDER_CACHE, RoutingHooks

from .cacheopts import CACHE_POLICIES, DEFAULT_POLICY, auto_size, parse_size  # noqa: F401  (re-exported)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


class ExpertCache:
    """Installed on a loaded model by runtime.llama.load (LoadOptions.expert_cache) or by hand with
    `ExpertCache(llm, path, size, policy, base).install()` (base: the address of file offset 0 of each of the
    set's files as llama.cpp mapped them, an int for one file; None: found in /proc/self/maps)."""

    def __init__(self, llm, path, size, policy: str = DEFAULT_POLICY, base: int | list[int] | None = None,
                 counts: list[int] | None = None, *, quiet: bool = False, background: bool = True,
                 predictor: str | None = None):
        if policy not in CACHE_POLICIES:
            raise LexiError(f"--cache-policy {policy!r}: use one of {', '.join(CACHE_POLICIES)}")
        self.llm, self.path, self.policy_name, self.quiet = llm, str(path), policy, quiet
        self.lay = lay = xm.layout(path)
        self.j_of = {il: j for j, il in enumerate(lay.moe_layers)}
        self.files = xm.MappedSet(lay, base)
        self.addr, self.base, self.evict_call = self.files.addr, self.files.bases[0], "pageout"
        size = parse_size(size)
        self.auto = size == "auto"
        total = sum(b * lay.n_expert for b in lay.expert_bytes)
        if self.auto:             # the file's expert pages count as available: drop them before asking
            self._drop_spans(lay.ranges)
            size = min(auto_size(lay.other_bytes), total)
        self.counts = counts or [lay.n_expert] * len(lay.moe_layers)
        one_token = sum(k * b for k, b in zip(self.counts, lay.expert_bytes))
        if size < one_token:
            self.files.close()
            raise LexiError(f"--expert-cache {_gib(size)} is below one token's experts ({_gib(one_token)} at these "
                            f"counts{', what MemAvailable leaves' if self.auto else ''}): give at least "
                            f"{-(-one_token * 100 // 2**30) / 100:.2f}G, or run without --expert-cache (stock mmap)")
        self.size, self.total, self.one_token = int(size), total, one_token
        mean = float(np.mean(lay.expert_bytes))
        self.slots = int(size // mean)
        L, E = len(lay.moe_layers), lay.n_expert
        kind, _, quota = policy.partition(":")       # room is counted in bytes here: budgets, not slots
        self.look, self.look_pred, self.pol_needed, self.last_asked = None, None, set(), 0
        if predictor is not None and kind != "learned":
            raise LexiError(f"--cache-predictor guesses for --cache-policy learned, not {policy}: add "
                            "--cache-policy learned (nextuse eviction plus look-ahead prefetch)")
        if kind == "learned":
            from .lookahead import make_predictor
            self.look_pred = make_predictor(predictor, len(lay.moe_layers), lay.n_expert)
            kind = "nextuse"
        w = [k * b for k, b in zip(self.counts, lay.expert_bytes)] if quota else [1]
        self.budget = [int(x) for x in split_quota(self.size, w)]
        pools = make_pools([1 << 62] * len(w) if quota else None, 1 << 62, kind, L, E, self.counts)
        self.pol = pools[0] if len(pools) == 1 else LayerPools(pools, E)
        self.used_by = [0] * len(pools)
        self.step = self.now = 0
        self.overflow: list[int] = []
        self.overflow_set: set[int] = set()
        self.warm: set[int] = set()        # admitted from the load's pages: maybe in large folios (PAGEOUT splits)
        at = {off: t for t, (off, _) in enumerate(lay.ranges)}
        self.lay_tensors = [[at[off] for off, _ in sl] for sl in lay.slices]
        self.tensor_layer = {t: j for j, ts in enumerate(self.lay_tensors) for t in ts}
        self.stats = dict(tokens=0, requests=0, hits=0, admits=0, evictions=0, overflow=0, asked_bytes=0)
        self.seconds = 0.0
        self.error: Exception | None = None
        self._done = False
        self.io = ExpertIO(self, background)

    # ------------------------------------------------------------------ bytes
    def _drop_spans(self, spans) -> None:
        for off, n in spans:
            a, m = xm.page_within(self.addr(off), n)
            if m == 0:
                continue
            if self.evict_call == "pageout" and xm.madvise(a, m, xm.MADV_PAGEOUT) != 0:
                self.evict_call = "dontneed"        # Linux < 5.4, or a file this process may not write
            if self.evict_call == "dontneed":
                xm.madvise(a, m, xm.MADV_DONTNEED)
            self.files.fadvise_dontneed(a, m)

    def key_bytes(self, key: int) -> int:
        return self.lay.expert_bytes[key // self.lay.n_expert]

    @property
    def used(self) -> int:
        return sum(self.used_by)

    # ------------------------------------------------------------------ the hook
    def _cb(self, il, n_tokens, n_used, ids, weights) -> None:
        if not ids:
            return
        t0 = time.perf_counter()
        try:
            j = self.j_of.get(il)
            if j is None:
                return
            ids = np.ctypeslib.as_array(ids, shape=(n_tokens, n_used))
            E = self.lay.n_expert
            self.io.submit(j, (j * E + np.unique(ids[(ids >= 0) & (ids < E)])).tolist(), n_tokens, t0)
        except Exception as e:      # noqa: BLE001
            self.error = self.error or e
        finally:
            self.seconds += time.perf_counter() - t0

    def decide(self, j: int, keys: list[int], n_tokens: int, ask) -> list[int]:
        """MoE layer j is about to run `keys` (layer * n_expert + expert): the misses are asked for first
        (ask), then the policy admits them and picks victims; returns the keys to drop. Runs on the
        worker thread (runtime.expertio), the only one that changes the policy."""
        st, p, pol = self.stats, self._pool(j), self.pool_of(j)
        if j == 0:
            self.step += 1
            st["tokens"] += n_tokens
        drops = self.overflow                # read on demand by the layer before: out again
        self.overflow = []
        need = self.pol_needed = set(keys)
        asks = [k for k in keys if k not in pol]
        ask(asks)
        self.last_asked = sum(self.key_bytes(k) for k in asks)
        pol.on_layer(self.step, j, keys)
        st["requests"] += len(keys)
        st["hits"] += len(keys) - len(asks)
        for k in keys:
            if k in pol:
                pol.touch(k, self.now)
                self.now += 1
        if self.look is not None:
            self.look.requested(keys)
        for k in asks:
            b = self.key_bytes(k)
            st["asked_bytes"] += b
            if not self._make_room(j, b, need, drops):    # this layer's experts alone fill the cache: a demand read
                self.overflow.append(k)
                st["overflow"] += 1
                continue
            pol.admit(k, self.now)
            self.now += 1
            self.used_by[p] += b
            st["admits"] += 1
        self.overflow_set = set(self.overflow)
        return drops

    def _pool(self, j: int) -> int:
        """The budget (index into budget / used_by) MoE layer j's experts count against."""
        return j if len(self.used_by) > 1 else 0

    def pool_of(self, j: int):
        """The policy holding MoE layer j's experts (the one pool, or layer j's with POLICY:k)."""
        return self.pol if len(self.used_by) == 1 else self.pol.pools[j]

    def room(self, j: int) -> int:
        p = self._pool(j)
        return self.budget[p] - self.used_by[p]

    def _make_room(self, j: int, b: int, need, drops: list[int]) -> bool:
        """Evict from layer j's pool (never a key in `need`) until b more bytes fit; False if they cannot."""
        p, pol = self._pool(j), self.pool_of(j)
        while self.used_by[p] + b > self.budget[p]:
            v = pol.victim()
            if v is None or v in need:
                return False
            pol.evict()
            self.used_by[p] -= self.key_bytes(v)
            drops.append(v)
            self.stats["evictions"] += 1
            if self.look is not None and v in self.look.unused:
                self.look.unused.discard(v)
                self.look.stats["prefetch_wasted"] += 1
        return True

    def prefetch(self, key: int, conf: float, drops: list[int]) -> bool:
        """A guess the look-ahead decided to read: room made (victims into drops), admitted as a guess
        with its confidence, asked for. False when it does not fit without dropping what runs now."""
        j = key // self.lay.n_expert
        p, b = self._pool(j), self.key_bytes(key)
        if not self._make_room(j, b, self.pol_needed, drops):
            return False
        self.pool_of(j).prefetched(key, self.now, conf)
        self.now += 1
        self.used_by[p] += b
        self.io.ask([key])
        return True

    # ------------------------------------------------------------------ life
    def install(self) -> "ExpertCache":
        for off, n in self.lay.ranges:
            xm.madvise(*xm.page_in(self.addr(off), n), xm.MADV_RANDOM)
        self._warm()
        if self.look_pred is not None:
            from .lookahead import Lookahead, probe_rate
            E, pol = self.lay.n_expert, self.pol
            cold = [s for k in range(len(self.lay.moe_layers) * E) if k not in pol
                    for s in self.lay.spans(k // E, k % E)][::7]
            self.look = Lookahead(self, *self.look_pred, probe_rate(self.files, cold))
        RoutingHooks.of(self.llm).add(self._cb, ORDER_CACHE)
        if not self.quiet:
            print(self.load_line(), file=sys.stderr, flush=True)
        llm_close = self.llm.close

        def close():                 # the exit line while the mapping is still there to count
            self.close()
            llm_close()
        self.llm.close = close
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())
        return self

    def _warm(self) -> None:
        """A warm start: the experts the load left in memory (llama.cpp maps the file in: MAP_POPULATE) are
        admitted, layer by layer, up to SIZE; every other expert page is dropped (a scrub of every tensor)."""
        E, PAGE = self.lay.n_expert, xm.PAGE
        for j, sl in enumerate(self.lay.slices):
            frac = np.zeros(E)
            for off, stride in sl:
                a, m = xm.page_in(self.addr(off), stride * E)
                cs = np.concatenate([[0], np.cumsum(xm.resident_pages(a, m))])
                lo = self.addr(off) + np.arange(E) * stride - a
                first, last = lo // PAGE, (lo + stride - 1) // PAGE + 1
                frac += (cs[last] - cs[first]) / (last - first) / len(sl)
            b, p = self.lay.expert_bytes[j], self._pool(j)
            for e in np.flatnonzero(frac > 0.9):
                if self.used_by[p] + b > self.budget[p]:
                    break
                self.pool_of(j).admit(j * E + int(e), self.now)
                self.warm.add(j * E + int(e))
                self.now, self.used_by[p] = self.now + 1, self.used_by[p] + b
        for t in range(len(self.lay.ranges)):
            self.io.scrub(t, force=True)

    def clear(self) -> None:
        """Drop every admitted expert: an empty cache, as at a cold start."""
        self.io.flush()
        out = []
        while (v := self.pol.evict()) is not None:
            out.append(v)
        self.used_by = [0] * len(self.used_by)
        self.io.drop(self.io.key_pages(out), pageout=True)
        self.warm.clear()

    def load_line(self) -> str:
        sizes = sorted(set(self.lay.expert_bytes))
        per = (f"{self.slots} slots of {sizes[0] / 2**20:.2f} MiB" if len(sizes) == 1 else
               f"~{self.slots} slots (experts of {sizes[0] / 2**20:.2f}-{sizes[-1] / 2**20:.2f} MiB by layer; bytes counted)")
        return (f"lexi-gguf: expert cache: madvise manager over the mapped file, {_gib(self.size)}"
                f"{' (auto)' if self.auto else ''} = {per}, one pool over {len(self.lay.moe_layers)} MoE layers, "
                f"policy {self.policy_name}{self._look_line()}; experts {_gib(self.total)} in all, one token's {_gib(self.one_token)}")

    def _look_line(self) -> str:
        if self.look is None:
            return ""
        return (f" (look-ahead {self.look.depth} layers, {type(self.look.p).__name__.lower()} predictor, "
                f"read rate {self.look.rate / 1e6:.0f} MB/s probed)")

    def resident_expert_bytes(self) -> int | None:
        """Expert bytes in memory now (mincore over every expert tensor); None once the model is freed."""
        if self.llm.ctx is None or not self.files.still_mapped():
            return None
        self.io.flush()
        return xm.resident_total(0, [(self.addr(off), n) for off, n in self.lay.ranges])

    def check(self) -> None:
        self.io.flush()
        if self.error is not None:
            raise LexiError(f"expert cache failed inside the routing callback: {self.error!r}")

    def summary(self) -> dict:
        st = self.stats
        return {"mode": "madvise", "size_bytes": self.size, "auto": self.auto, "slots": self.slots,
                "policy": self.policy_name, "evict_call": self.evict_call, **st,
                "hit_rate": st["hits"] / st["requests"] if st["requests"] else None,
                "mb_asked_per_token": st["asked_bytes"] / 1e6 / st["tokens"] if st["tokens"] else None,
                "admitted_bytes": self.used, "resident_expert_bytes": self.resident_expert_bytes(),
                "callback_seconds": round(self.seconds, 4), "io_seconds": round(self.io.seconds, 4),
                **self.io.stats, **({} if self.look is None else {"lookahead": self.look.summary()})}

    def exit_line(self) -> str:
        s = self.summary()
        hr = "n/a" if s["hit_rate"] is None else f"{s['hit_rate']:.3f}"
        mb = "n/a" if s["mb_asked_per_token"] is None else f"{s['mb_asked_per_token']:.1f}"
        res = s["resident_expert_bytes"]
        return (f"lexi-gguf: expert cache: {s['tokens']} tokens, hit rate {hr}, {mb} MB asked for per token, "
                f"{s['evictions']} evictions ({s['evict_call']}), resident experts "
                f"{'n/a' if res is None else _gib(res)} of {_gib(self.size)}"
                + ("" if self.look is None else
                   f"; look-ahead: {s['lookahead']['prefetches']} guesses read ({s['lookahead']['prefetch_used']} used), "
                   f"{s['lookahead']['refused']} refused by the clock"))

    def close(self) -> None:
        """Say how it went (once), leave the hook and close the file."""
        if self._done:
            return
        self._done = True
        if not self.quiet:
            print(self.exit_line(), file=sys.stderr, flush=True)
        if self.llm.ctx is not None:
            RoutingHooks.of(self.llm).remove(self._cb)
        self.io.close()
        self.files.close()


def install(llm, path, size, policy: str | None, bases_before: dict[str, set[int]], counts: list[int], *,
            quiet: bool = False, predictor: str | None = None) -> ExpertCache:
    """The cache on a model just loaded: each file's mapping is the one that was not there before the load
    (bases_before: file -> its bases then, gguf.reader.set_files); counts: what each block runs
    (runtime.llama.n_expert_active)."""
    bases = []
    for f, before in bases_before.items():
        new = xm.mapping_bases(f) - before
        if len(new) != 1:
            raise LexiError(f"--expert-cache: llama.cpp did not mmap {f} (or mapped it twice); load it with mmap")
        bases.append(new.pop())
    moe = xm.layout(path).moe_layers
    cache = ExpertCache(llm, path, size, policy or DEFAULT_POLICY, bases, [counts[il] for il in moe], quiet=quiet,
                         predictor=predictor)
    llm._lexi_expert_cache = cache
    return cache.install()
