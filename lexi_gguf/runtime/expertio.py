"""The expert cache's work (runtime.expertcache), off the decode's critical path: the routing callback
only queues each MoE layer's experts; one worker thread takes the layers in order and for each asks for
the misses first (MADV_WILLNEED: the layer's matmul is about to read them), then runs the policy (admits,
victims: ExpertCache.decide), drops the victims and scrubs the layer's expert tensors. The callback waits
only when the worker is more than BACKLOG layers behind, which bounds what a late drop leaves above SIZE.

Drops are whole pages: a victim's slice that does not start or end on a page shares that page with its
neighbour, and the page goes with it when the neighbour is not admitted either. MADV_DONTNEED unmaps
(the file's pages are clean: a read after it faults them back, same bytes) and posix_fadvise(DONTNEED)
then drops them from the page cache; experts still in the large folios llama.cpp's MAP_POPULATE load
read (2 MiB) are dropped with MADV_PAGEOUT first, which splits a folio a victim shares with a neighbour.

The scrub: pages of a layer's expert tensors in memory that no admitted expert covers (the kernel's
read-ahead from the non-expert weights around them reaches into the expert tensors; a large folio an
unmapped victim shared with a neighbour) are found (cachestat, then mincore when the count is above what
the admitted experts hold) and dropped; a large folio that a drop cannot split is dropped whole (its
2 MiB window) and the admitted bytes in it asked for again."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from . import expertmap as xm

BACKLOG = 2                   # layers the worker may be behind before the callback waits
FOLIO = 2 << 20               # the largest page-cache folio (PMD order on x86-64): the refolio window


class ExpertIO:
    def __init__(self, cache, background: bool = True):
        self.c = cache
        self.seconds = 0.0    # worker time
        self.stats = dict(scrubs=0, stray_bytes=0, refolios=0)
        self.q: queue.Queue | None = None
        if background:
            self.q = queue.Queue()
            self._t = threading.Thread(target=self._run, name="lexi-expert-io", daemon=True)
            self._t.start()

    # ------------------------------------------------------------------ queue
    def submit(self, j: int, keys: list[int], n_tokens: int, t_cb: float = 0.0) -> None:
        if self.q is None:
            self._batch(j, keys, n_tokens, t_cb)
            return
        if self.q.qsize() > BACKLOG:
            self.q.join()
        self.q.put((j, keys, n_tokens, t_cb))

    def flush(self) -> None:
        if self.q is not None:
            self.q.join()

    def close(self) -> None:
        if self.q is not None:
            self.q.put(None)
            self._t.join()
            self.q = None

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                self._batch(*item)
            except Exception as e:      # noqa: BLE001
                self.c.error = self.c.error or e
            finally:
                self.q.task_done()

    def _batch(self, j: int, keys: list[int], n_tokens: int, t_cb: float = 0.0) -> None:
        t0 = time.perf_counter()
        c = self.c
        drops = c.decide(j, keys, n_tokens, self.ask)
        if c.look is not None:          # guesses for the next layers, asked after this layer's misses
            drops += c.look.after_layer(c.step, j, keys, c.last_asked, n_tokens, t_cb)
        drops = [k for k in drops if k not in c.pol and k not in c.overflow_set]   # re-admitted since: keep
        warm = [k for k in drops if k in c.warm]
        c.warm.difference_update(warm)
        self.drop(self.key_pages(warm), pageout=True)
        self.drop(self.key_pages([k for k in drops if k not in warm]), pageout=False)
        for t in c.lay_tensors[j]:
            self.scrub(t)
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ pages
    def ask(self, keys) -> None:
        """MADV_WILLNEED on these experts' slices, tensor by tensor in the order the layer's matmuls read
        them (every miss's up slice, then gate, then down), so the reads finish in the order they are used."""
        c, E = self.c, self.c.lay.n_expert
        for i in range(max((len(c.lay.slices[k // E]) for k in keys), default=0)):
            for k in keys:
                off, stride = c.lay.slices[k // E][i]
                xm.madvise(*xm.page_in(c.addr(off + (k % E) * stride), stride), xm.MADV_WILLNEED)

    def key_pages(self, keys) -> list[tuple[int, int]]:
        """The whole pages of these experts' slices, with an edge page shared with a neighbour that is not
        admitted: (address, length) runs, merged."""
        c, P, E = self.c, xm.PAGE, self.c.lay.n_expert
        spans = []
        for key in keys:
            j, e = divmod(key, E)
            left = e > 0 and key - 1 not in c.pol
            right = e < E - 1 and key + 1 not in c.pol
            for off, stride in c.lay.slices[j]:
                lo = c.addr(off + e * stride)
                hi = lo + stride
                a = lo - lo % P if left else -(-lo // P) * P
                b = -(-hi // P) * P if right else hi - hi % P
                if b > a:
                    spans.append((a, b))
        spans.sort()
        out: list[list[int]] = []
        for a, b in spans:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b - a) for a, b in out]

    def drop(self, runs, pageout: bool, window: bool = False) -> None:
        c = self.c
        for a, m in runs:
            if pageout and c.evict_call == "pageout" and xm.madvise(a, m, xm.MADV_PAGEOUT) != 0 and not window:
                c.evict_call = "dontneed"      # Linux < 5.4, or a file this process may not write
            xm.madvise(a, m, xm.MADV_DONTNEED)
            c.files.fadvise_dontneed(a, m)

    # ------------------------------------------------------------------ scrub
    def covered(self, t: int, a: int, npages: int) -> np.ndarray:
        """Pages of expert tensor t (mapped at a, npages) that an admitted (or overflowing) expert touches."""
        c, P, E = self.c, xm.PAGE, self.c.lay.n_expert
        off, n = c.lay.ranges[t]
        j, stride = c.tensor_layer[t], n // E
        keys = np.arange(j * E, (j + 1) * E)
        held = np.fromiter((k in c.pol or k in c.overflow_set for k in keys.tolist()), bool, E)
        lo = c.addr(off) + np.flatnonzero(held) * stride - a
        d = np.zeros(npages + 1, np.int32)
        np.add.at(d, lo // P, 1)
        np.add.at(d, (lo + stride - 1) // P + 1, -1)
        return np.cumsum(d[:-1]) > 0

    def scrub(self, t: int, force: bool = False) -> int:
        """Drop tensor t's pages in memory that no admitted expert covers; the bytes dropped."""
        c, P, E = self.c, xm.PAGE, self.c.lay.n_expert
        off, n = c.lay.ranges[t]
        if not force:
            cached = c.files.cachestat(off, n)
            j = c.tensor_layer[t]
            held = sum(1 for k in range(j * E, (j + 1) * E) if k in c.pol or k in c.overflow_set)
            if cached is not None and cached <= held * (-(-(n // E) // P) + 1) + 16:
                return 0
        self.stats["scrubs"] += 1
        a, m = xm.page_in(c.addr(off), n)
        stray = xm.resident_pages(a, m) & ~self.covered(t, a, m // P)
        n_stray = int(stray.sum())
        if not n_stray:
            return 0
        self.drop([(a + s * P, (e - s) * P) for s, e in runs(stray)], pageout=True)
        left = np.flatnonzero(xm.resident_pages(a, m) & stray)
        if len(left):            # large folios shared with an admitted expert: drop each whole, ask again
            base = c.files.bases[c.lay.file_of(off)]      # folios are aligned in the file, not in the set
            self._refolio(t, a, m, base, sorted({(a + int(i) * P - base) // FOLIO for i in left}))
        self.stats["stray_bytes"] += n_stray * P
        return n_stray * P

    def _refolio(self, t: int, a: int, m: int, base: int, windows) -> None:
        P = xm.PAGE
        cov = self.covered(t, a, m // P)
        for w in windows:
            lo, hi = base + w * FOLIO, base + (w + 1) * FOLIO
            self.drop([(lo, FOLIO)], pageout=True, window=True)
            i0, i1 = max(0, (lo - a) // P), min(m // P, (hi - a) // P)
            for s, e in runs(cov[i0:i1]):
                xm.madvise(a + (i0 + s) * P, (e - s) * P, xm.MADV_WILLNEED)
            self.stats["refolios"] += 1


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
