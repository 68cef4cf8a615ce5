"""The cache simulator on a clock (`cache-sim --clock`): what a hit rate costs in time.

Cost model, stated because every number below rests on it:
- Each MoE layer computes for `compute_s[j]` seconds once all its experts are resident; a layer waiting
  for an expert stalls until the expert's transfer has finished (the wait is the stall).
- One link (Link): a transfer waits for a free queue slot (at most `depth` requests in flight: 1 is
  one request at a time, an NVMe queue is deeper), pays the link's latency (overlapped across the
  requests in flight), then moves its bytes at the link's bandwidth, one transfer at a time. Demand
  misses of a layer are issued when the layer starts (its router ran); prefetches for layers j+1..j+d
  are issued at the same moment, behind them. In FIFO order (the default) a demand miss waits for
  every transfer issued before it; with demand priority it starts before queued prefetches (one that
  is already moving is not interrupted). depth 1, FIFO: latency + bytes / bandwidth, one after another.
- A prefetched expert takes its cache slot when issued (it can evict); it is a hit only if its transfer
  finished by the time its layer starts, else a late hit that stalls for the rest of its transfer.
  Prefetched bytes never used before eviction (or the end) are wasted; they still occupied the link.
- Time per token = the sum of its layers' stall + compute. Non-MoE work is not modelled (fold it
  into compute_s). The free-transfer simulator (simulate.simulate) is the upper bound of hit rate.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace
from ..runtime.policies import PrefetchGate
from .simulate import LINKS, lookahead_targets, parse_policy, replay_setup


@dataclass
class ClockResult:
    policy: str
    capacity: float
    link: str
    tokens: int
    accesses: int
    hits: int              # resident and arrived when the layer started
    late: int              # resident (prefetched) but still in transfer: stalled for the rest
    demand_bytes: float
    prefetch_bytes: float
    wasted_bytes: float    # prefetched, evicted or left unused
    stall_s: float
    compute_s: float
    prefetches: int = 0    # prefetch transfers issued
    refused: int = 0       # guesses the gate did not prefetch (expected gain <= 0)

    def row(self) -> dict:
        n = max(self.tokens, 1)
        return {"policy": self.policy, "capacity": self.capacity, "link": self.link,
                "hit_rate": self.hits / max(self.accesses, 1), "late_rate": self.late / max(self.accesses, 1),
                "ms_per_token": (self.stall_s + self.compute_s) / n * 1e3, "stall_ms_per_token": self.stall_s / n * 1e3,
                "compute_ms_per_token": self.compute_s / n * 1e3,
                "mb_per_token": (self.demand_bytes + self.prefetch_bytes) / n / 1e6,
                "wasted_mb_per_token": self.wasted_bytes / n / 1e6, "prefetches": self.prefetches,
                "refused": self.refused}


def parse_link(spec: str) -> tuple[str, float, float]:
    """A preset name (pcie4x16, nvme, emmc) or `GBps,latency_us` (e.g. a disk the memory-limited bench
    measured): (name, bytes/s, seconds)."""
    if spec in LINKS:
        return (spec, *LINKS[spec])
    try:
        bw, lat = (float(x) for x in spec.split(","))
    except ValueError:
        raise LexiError(f"link {spec!r}: use one of {', '.join(LINKS)} or BANDWIDTH_GBps,LATENCY_us") from None
    if bw <= 0 or lat < 0:
        raise LexiError(f"link {spec!r}: bandwidth must be > 0 and latency >= 0")
    return (f"{bw:g}GB/s+{lat:g}us", bw * 1e9, lat * 1e-6)


class Link:
    """Transfers over one link, simulated lazily in time order (issue times are the layers' starts,
    which only move forward): see the module's cost model."""

    def __init__(self, bw: float, lat: float, depth: int = 1, demand_first: bool = False):
        if depth < 1:
            raise LexiError(f"queue depth {depth}: give at least 1")
        self.bw, self.lat, self.depth, self.demand_first = bw, lat, depth, demand_first
        self.queues = (deque(), deque(), deque())   # (demand, prefetch, polite prefetch); FIFO: all in [1], [2]
        self.queued = 0.0                       # bytes issued, not started
        self.inflight: list[float] = []         # completion times of started transfers (a heap)
        self.data_free = self.last_start = 0.0
        self.done: dict[int, float] = {}        # transfer id -> when its bytes are in fast memory
        self._ids = itertools.count()

    def issue(self, nbytes: float, t: float, demand: bool, polite: bool = False) -> int:
        """A transfer issued at t. polite (a gated prefetch): it starts only once the data channel frees,
        so it never holds bandwidth ahead of a later demand read: a demand read waits behind at most the
        one polite transfer already moving."""
        tid = next(self._ids)
        self.queues[2 if polite and not demand else 0 if demand and self.demand_first else 1].append((tid, nbytes, t))
        self.queued += nbytes
        return tid

    def backlog(self, t: float) -> float:
        """Seconds of data already committed to the link at t (moving or queued)."""
        return max(0.0, self.data_free - t) + self.queued / self.bw

    def _next(self):
        """(queue, start time) of the transfer that starts next, or None."""
        slot = self.inflight[0] if len(self.inflight) >= self.depth else 0.0
        s0 = max(slot, self.last_start)
        cands = [(max(s0, q[0][2], self.data_free - self.lat if i == 2 else 0.0), i)
                 for i, q in enumerate(self.queues) if q]
        if not cands:
            return None
        s, i = min(cands)                 # the earliest start; at a tie, demand (queue 0) first
        return self.queues[i], s

    def _start(self, q, s: float) -> None:
        tid, nbytes, _ = q.popleft()
        self.queued -= nbytes
        if len(self.inflight) >= self.depth:
            heapq.heappop(self.inflight)
        end = max(s + self.lat, self.data_free) + nbytes / self.bw
        self.data_free, self.last_start = end, s
        heapq.heappush(self.inflight, end)
        self.done[tid] = end

    def advance(self, t: float) -> None:
        """Start every transfer that starts before t (call before issuing at t)."""
        while (nxt := self._next()) is not None and nxt[1] < t:
            self._start(*nxt)

    def arrival(self, tid: int) -> float:
        """When transfer tid finishes (simulating forward: nothing new is issued until then)."""
        while tid not in self.done:
            self._start(*self._next())
        return self.done[tid]

    def done_by(self, tid: int, t: float) -> bool:
        return tid in self.done and self.done[tid] <= t


def simulate_clocked(trace: Trace, capacity: float, policy: str, *, link: str = "nvme",
                     compute_s: list[float] | float, predictions: dict | None = None, depth: int = 1,
                     phase: str = "auto", slot_mode: str = "global", queue_depth: int = 1,
                     demand_first: bool = False, gate: PrefetchGate | None = None, reuse_model=None) -> ClockResult:
    """Replay on the clock (module docstring). A gated policy (`prefetch:PRED:gated`) decides with `gate`
    (a fresh PrefetchGate when none is given: pass one to read its decisions afterwards); nextuse
    eviction estimates with `reuse_model` (policies.ReuseModel; a fresh one when none is given)."""
    L, E = len(trace.moe_layers), trace.n_expert
    name, bw, lat = parse_link(link)
    if queue_depth > 1 or demand_first:
        name += f" q{queue_depth}" + (" demand-first" if demand_first else "")
    comp = np.broadcast_to(np.asarray(compute_s, dtype=float), (L,))
    _, prefetch, caches, cache_of, nbytes, toks, reqs, next_use = replay_setup(trace, capacity, policy, predictions,
                                                                              phase, slot_mode, reuse_model)
    wire = Link(bw, lat, queue_depth, demand_first)
    gated = parse_policy(policy)[2]
    gate = (gate or PrefetchGate(depth, int(trace.counts.max()))) if gated else None
    pending: dict[int, int] = {}         # key -> its last transfer (absent: resident since long ago)
    unused: dict[int, float] = {}        # prefetched, not used yet -> bytes
    now = 0.0
    hits = late = n_pref = 0
    demand_b = prefetch_b = wasted_b = stall = computed = 0.0
    seq_now = None

    def evicted(ev) -> None:
        nonlocal wasted_b
        if ev is not None:
            pending.pop(ev, None)
            wasted_b += unused.pop(ev, 0.0)

    for (s, j), idx in itertools.groupby(range(len(reqs)), key=lambda i: (reqs[i][0], reqs[i][1])):
        if j == 0 and trace.seq[toks[s]] != seq_now:
            seq_now = trace.seq[toks[s]]
            for c in caches:
                c.new_sequence()
        idx = list(idx)
        needed = [j * E + reqs[i][2] for i in idx]
        for c in caches:
            c.on_layer(s, j, needed)
        if gate:             # layer j ran: score the guesses made for it
            for d in range(1, depth + 1):
                if (g := predictions.get(d, {}).get((int(toks[s]), j))) is not None:
                    gate.learn(d, g, [reqs[i][2] for i in idx])
        c, start = cache_of(j), now
        wire.advance(start)
        waits: list[int] = []            # transfers this layer waits for
        for i in idx:
            key = j * E + reqs[i][2]
            if key in c:
                c.touch(key, i, next_use[i])
                tid = pending.get(key)
                if tid is None or wire.done_by(tid, start):
                    hits += 1
                else:
                    late += 1
                    waits.append(tid)
                unused.pop(key, None)
            else:
                demand_b += nbytes[j]
                evicted(c.admit(key, i, next_use[i]))
                pending[key] = wire.issue(nbytes[j], start, demand=True)
                waits.append(pending[key])
        if prefetch:
            for d, tt, jj in lookahead_targets(trace, toks, s, j, depth):
                cj = cache_of(jj)
                lead = float(sum(comp[(j + x) % L] for x in range(d)))     # compute before layer jj starts
                for rank, e in enumerate(predictions.get(d, {}).get((tt, jj), ())):
                    key = jj * E + int(e)
                    conf = gate.confidence(d, rank) if gate else 1.0
                    if key in cj:       # gated over LRU: only a likely guess moves up (it displaces reuse)
                        if not gate or conf >= 0.5 or cj.reuse(key) is not None:
                            cj.promote(key, i, conf)
                        continue
                    if gate and not gate.decide(conf, lead, wire.backlog(start), lat + nbytes[jj] / bw,
                                                nbytes[jj] / bw, _displaced(cj, trace, lat, bw, nbytes)):
                        continue
                    evicted(cj.prefetched(key, i, conf))
                    pending[key] = wire.issue(nbytes[jj], start, demand=False, polite=gated)
                    unused[key] = nbytes[jj]
                    prefetch_b += nbytes[jj]
                    n_pref += 1
        ready = max([start, *(wire.arrival(t) for t in waits)])
        stall += ready - start
        computed += comp[j]
        now = ready + comp[j]
    wasted_b += sum(unused.values())
    return ClockResult(policy, capacity, name, len(toks), len(reqs), hits, late, demand_b, prefetch_b, wasted_b,
                       stall, computed, n_pref, gate.refused if gate else 0)


def _displaced(cache, trace: Trace, lat: float, bw: float, nbytes) -> float:
    """Expected transfer time lost if a prefetch into `cache` evicts its victim: P(victim used at its
    layer's next run) (the policy's estimate, else its layer's k / E) x the victim's transfer."""
    v = cache.victim() if len(cache) >= cache.cap else None
    if v is None:
        return 0.0
    jv = v // trace.n_expert
    p = cache.reuse(v)
    return (trace.counts[jv] / trace.n_expert if p is None else p) * (lat + nbytes[jv] / bw)


def compute_from_trace(trace: Trace) -> float:
    """Seconds per MoE layer the runtime took while tracing (wall time less the callback's, per token
    and MoE layer): measured, but low for decode when prompts ran as batches."""
    m = trace.meta
    secs = float(m.get("seconds") or 0) - float(m.get("callback_seconds") or 0)
    if secs <= 0:
        raise LexiError("the trace carries no timing (imported?); give --compute-ms per MoE layer")
    return secs / max(len(trace.tokens), 1) / len(trace.moe_layers)


def table(rows: list[dict]) -> str:
    lines = ["| capacity | link | policy | hit rate | late | ms/token | stall ms/token | MB/token | wasted MB/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['capacity']:g} | {r['link']} | {r['policy']} | {r['hit_rate']:.3f} | {r['late_rate']:.3f} | "
                     f"{r['ms_per_token']:.3f} | {r['stall_ms_per_token']:.3f} | {r['mb_per_token']:.3f} | "
                     f"{r['wasted_mb_per_token']:.3f} |")
    return "\n".join(lines)
