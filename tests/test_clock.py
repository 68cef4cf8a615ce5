"""The clocked cache simulator: transfers take latency + bytes / bandwidth on one FIFO link, a layer
waits for its experts, a prefetch helps only if it arrives in time, wrong prefetches cost link time."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.caching.clock import parse_link, simulate_clocked
from lexi_gguf.caching.simulate import oracle_predictions
from lexi_gguf.runtime.trace import Trace

MB = 1e6


def trace(experts: list[list[list[int]]], n_expert: int = 8, nbytes: float = 1 * MB) -> Trace:
    """experts[token][layer] = ids; one sequence, every token 'generated' (decode)."""
    T, L, k = len(experts), len(experts[0]), len(experts[0][0])
    ex = np.array(experts, np.int16).reshape(T, L, k)
    return Trace(np.arange(T, dtype=np.int32), np.ones(T, bool), np.zeros(T, np.int32), np.arange(L, dtype=np.int32),
                 np.full(L, k, np.int32), ex, np.ones(ex.shape, np.float32) / k, None,
                 {"n_expert": n_expert, "expert_bytes": [nbytes] * L, "seconds": 1.0, "callback_seconds": 0.0})


LINK = "1,100"       # 1 GB/s, 100 us: one 1 MB expert = 1.1 ms


def test_a_miss_stalls_for_its_transfer_and_misses_queue():
    tr = trace([[[0, 1]], [[0, 1]], [[0, 1]]])            # 1 layer, k 2, the same two experts thrice
    r = simulate_clocked(tr, 1.0, "lru", link=LINK, compute_s=0.5e-3).row()
    one = 100e-6 + 1 * MB / 1e9
    # token 0 waits for both transfers, one after the other on the link; tokens 1, 2 hit
    assert r["stall_ms_per_token"] == pytest.approx(2 * one / 3 * 1e3)
    assert r["ms_per_token"] == pytest.approx((2 * one + 3 * 0.5e-3) / 3 * 1e3)
    assert r["hit_rate"] == pytest.approx(4 / 6) and r["mb_per_token"] == pytest.approx(2 / 3)


def test_prefetch_must_arrive_in_time():
    rng = np.random.default_rng(0)
    ex = [[rng.choice(8, 2, replace=False).tolist() for _ in range(4)] for _ in range(30)]   # 4 layers
    tr = trace(ex)
    oracle = oracle_predictions(tr, depth=1)
    lru = simulate_clocked(tr, 0.25, "lru", link=LINK, compute_s=0.2e-3).row()
    # compute far shorter than a transfer: the perfect guess is late, it cannot hide the link
    fast = simulate_clocked(tr, 0.25, "prefetch:oracle", link=LINK, compute_s=0.2e-3, predictions=oracle).row()
    assert fast["late_rate"] > 0.5 and fast["stall_ms_per_token"] > 0.5 * lru["stall_ms_per_token"]
    # compute longer than two transfers: the guess for layer j+1 lands while layer j computes
    slow = simulate_clocked(tr, 0.25, "prefetch:oracle", link=LINK, compute_s=5e-3, predictions=oracle).row()
    assert slow["hit_rate"] > 0.9 and slow["stall_ms_per_token"] < 0.1 * lru["stall_ms_per_token"]
    assert slow["wasted_mb_per_token"] == 0


def test_wrong_prefetches_waste_bytes_and_delay_demand():
    ex = [[[0, 1], [2, 3]] for _ in range(10)]
    tr = trace(ex)
    wrong = {1: {(t, j): [6, 7] for t in range(10) for j in range(2)}}
    base = simulate_clocked(tr, 0.25, "lru", link=LINK, compute_s=1e-3).row()
    bad = simulate_clocked(tr, 0.25, "prefetch:wrong", link=LINK, compute_s=1e-3, predictions=wrong).row()
    assert bad["wasted_mb_per_token"] > 0 and bad["mb_per_token"] > base["mb_per_token"]
    assert bad["ms_per_token"] > base["ms_per_token"]


def test_links():
    assert parse_link("nvme")[0] == "nvme"
    assert parse_link("2.5,80")[1:] == pytest.approx((2.5e9, 80e-6))
    with pytest.raises(LexiError, match="BANDWIDTH_GBps,LATENCY_us"):
        parse_link("fast")


def test_a_deeper_queue_overlaps_latency_not_bandwidth():
    tr = trace([[[0, 1, 2, 3]]], nbytes=0.1 * MB)               # one layer, four misses at once
    slow_lat = "100,1000"                                          # 1 ms latency, 1 us per 0.1 MB
    one = simulate_clocked(tr, 1.0, "lru", link=slow_lat, compute_s=0.0).row()
    deep = simulate_clocked(tr, 1.0, "lru", link=slow_lat, compute_s=0.0, queue_depth=4).row()
    assert one["stall_ms_per_token"] == pytest.approx(4 * 1.001)   # four round trips, one after another
    assert deep["stall_ms_per_token"] == pytest.approx(1.0 + 4 * 0.001)   # latencies overlap, bytes do not
    assert deep["link"] == "100GB/s+1000us q4"
    thin = "0.1,1000"                                             # bandwidth-bound: depth does not help
    a = simulate_clocked(tr, 1.0, "lru", link=thin, compute_s=0.0).row()["stall_ms_per_token"]
    b = simulate_clocked(tr, 1.0, "lru", link=thin, compute_s=0.0, queue_depth=4).row()["stall_ms_per_token"]
    assert a == pytest.approx(4 * (1.0 + 1.0)) and b == pytest.approx(1.0 + 4 * 1.0)


def test_demand_first_puts_misses_ahead_of_queued_prefetches():
    """Wrong prefetches for the next layers queue on the link; in FIFO order the next layer's demand
    misses wait behind them, with demand priority they start first (one prefetch already moving is
    not interrupted); the bytes moved are the same."""
    ex = [[[0, 1], [2, 3], [4, 5]] for _ in range(6)]
    tr = trace(ex)
    wrong = {1: {(t, j): [6, 7] for t in range(6) for j in range(3)},
             2: {(t, j): [6, 7] for t in range(6) for j in range(3)}}
    kw = dict(link=LINK, compute_s=0.3e-3, predictions=wrong, depth=2)
    fifo = simulate_clocked(tr, 0.25, "prefetch:wrong", **kw).row()
    first = simulate_clocked(tr, 0.25, "prefetch:wrong", demand_first=True, **kw).row()
    base = simulate_clocked(tr, 0.25, "lru", link=LINK, compute_s=0.3e-3).row()
    assert first["stall_ms_per_token"] < fifo["stall_ms_per_token"]
    assert first["mb_per_token"] == pytest.approx(fifo["mb_per_token"])
    assert first["ms_per_token"] >= base["ms_per_token"]        # wrong guesses never beat no prefetch


def test_no_prefetch_reads_fewer_bytes_than_belady():
    """Belady's MIN needs the fewest transfers of any policy with the same slots, prefetching ones too (a
    prefetch takes a slot; delaying every fetch to its use never adds one), so a prefetch policy that
    reads fewer bytes than Belady means the simulator lost a transfer."""
    from lexi_gguf.caching.predict import random_predictions, sure_guesses
    rng = np.random.default_rng(3)
    hot = [rng.choice(16, 5, replace=False) for _ in range(3)]           # some locality per layer
    ex = [[rng.choice(hot[j], 2, replace=False).tolist() if rng.random() < 0.7 else rng.choice(16, 2, replace=False).tolist()
           for j in range(3)] for _ in range(60)]
    tr = trace(ex, n_expert=16)
    preds = {"oracle": oracle_predictions(tr, 2), "random": random_predictions(tr, 2)}
    preds["oracle top1"] = sure_guesses(preds["oracle"], top=1)
    for cap in (0.1, 0.25, 0.5):
        for slots in ("global", "equal"):
            bel = simulate_clocked(tr, cap, "belady", link=LINK, compute_s=1e-3, slot_mode=slots).row()
            for name, p in preds.items():
                r = simulate_clocked(tr, cap, f"prefetch:{name}", link=LINK, compute_s=1e-3, predictions=p, depth=2,
                                     slot_mode=slots, queue_depth=4, demand_first=True).row()
                assert r["mb_per_token"] >= bel["mb_per_token"] - 1e-9, (cap, slots, name)


def test_sure_guesses_keep_the_first_guesses_of_near_layers():
    from lexi_gguf.caching.predict import sure_guesses
    p = {1: {(0, 1): [5, 3, 7]}, 2: {(0, 2): [1, 2, 4]}}
    assert sure_guesses(p, top=2) == {1: {(0, 1): [5, 3]}, 2: {(0, 2): [1, 2]}}
    assert sure_guesses(p, max_distance=1) == {1: {(0, 1): [5, 3, 7]}}
    with pytest.raises(LexiError, match="at least 1"):
        sure_guesses(p, top=0)
    # wrong guesses cut to one per layer: fewer wasted bytes and less time than all of them
    ex = [[[0, 1], [2, 3]] for _ in range(10)]
    tr = trace(ex)
    wrong = {1: {(t, j): [6, 7] for t in range(10) for j in range(2)}}
    full = simulate_clocked(tr, 0.5, "prefetch:wrong", link=LINK, compute_s=1e-3, predictions=wrong).row()
    one = simulate_clocked(tr, 0.5, "prefetch:wrong", link=LINK, compute_s=1e-3, predictions=sure_guesses(wrong, 1)).row()
    assert one["wasted_mb_per_token"] < full["wasted_mb_per_token"] and one["ms_per_token"] < full["ms_per_token"]


# ---------------------------------------------------------------- transfer >> compute: the policies for it

BIG = 99e6          # a Mixtral-8x7B expert at Q4_K: 33 ms on the nvme preset, against 2 ms of compute
Q32 = dict(link="nvme", compute_s=2e-3, queue_depth=32, demand_first=True)


def test_zero_hits_of_prefetch_are_the_policy_not_the_simulator():
    """Issue 29's Mixtral replay: every prefetcher hit 0.00 at 25 % capacity, LRU 0.34. Pinned on a
    scripted trace with the cache one token's worth: each layer reuses one expert every token (LRU keeps
    it: 4 of 8 hit after the first token), the other is new. Wrong guesses for the next layer evict
    exactly those reusable experts before they return (0 hits, by hand); right guesses cannot arrive in
    2 ms (late, not hits: only the reused half hits). The gate issues none of the wrong ones."""
    ex = [[[j, 4 + (t + j) % 4] for j in range(4)] for t in range(40)]
    tr = trace(ex, n_expert=10, nbytes=BIG)
    wrong = {1: {(t, j): [8, 9] for t in range(40) for j in range(4)}}
    cap = 8 / 40
    lru = simulate_clocked(tr, cap, "lru", **Q32).row()
    assert lru["hit_rate"] == pytest.approx(39 * 4 / 320)
    bad = simulate_clocked(tr, cap, "prefetch:wrong", predictions=wrong, **Q32).row()
    assert bad["hit_rate"] == 0.0 and bad["ms_per_token"] > 2 * lru["ms_per_token"]
    right = simulate_clocked(tr, cap, "prefetch:oracle", predictions=oracle_predictions(tr, 1), **Q32).row()
    assert right["hit_rate"] == pytest.approx(lru["hit_rate"]) and right["late_rate"] > 0.45
    gated = simulate_clocked(tr, cap, "prefetch:wrong:gated", predictions=wrong, **Q32).row()
    assert gated["prefetches"] == 0 and gated["refused"] == 40 * 4 * 2 - 2      # none for token 0's layer 0
    assert gated["hit_rate"] >= lru["hit_rate"] and gated["ms_per_token"] <= lru["ms_per_token"]


def test_demand_first_cannot_pass_prefetches_already_moving_polite_ones_wait():
    """With 8 requests in flight, four prefetches issued together all start at once and hold the data
    channel in turn: a demand read issued after them waits for all four (demand-first reorders only
    what is still queued). A polite prefetch (the gated policy's) starts only as the channel frees, so
    the demand read waits behind the one that is moving."""
    from lexi_gguf.caching.clock import Link
    for polite, done in ((False, 5e-3), (True, 2e-3)):
        wire = Link(1e9, 0.0, depth=8, demand_first=True)      # 1 MB = 1 ms
        for _ in range(4):
            wire.issue(1e6, 0.0, demand=False, polite=polite)
        wire.advance(0.5e-3)
        d = wire.issue(1e6, 0.5e-3, demand=True)
        assert wire.arrival(d) == pytest.approx(done)
        assert wire.backlog(0.5e-3) == pytest.approx(done - 0.5e-3 if not polite else 4.5e-3)


def test_gated_prefetch_never_issues_a_transfer_expected_to_lose():
    from lexi_gguf.runtime.policies import PrefetchGate
    from lexi_gguf.caching.predict import random_predictions
    rng = np.random.default_rng(5)
    hot = [rng.choice(16, 4, replace=False) for _ in range(4)]
    ex = [[rng.choice(hot[j], 2, replace=False).tolist() if rng.random() < 0.8 else rng.choice(16, 2, replace=False).tolist()
           for j in range(4)] for _ in range(80)]
    for nbytes, comp in ((6e6, 2e-3), (BIG, 2e-3)):       # compute ~ transfer, transfer >> compute
        tr = trace(ex, n_expert=16, nbytes=nbytes)
        preds = {"oracle": oracle_predictions(tr, 2), "random": random_predictions(tr, 2)}
        lru = simulate_clocked(tr, 0.25, "lru", **{**Q32, "compute_s": comp}).row()
        for name, p in preds.items():
            gate = PrefetchGate(2, 2)
            r = simulate_clocked(tr, 0.25, f"prefetch:{name}:gated", predictions=p, depth=2, gate=gate,
                                 **{**Q32, "compute_s": comp}).row()
            assert r["prefetches"] == gate.issued == len(gate.gains) and min(gate.gains, default=1) > 0
            assert gate.refused > 0 and r["ms_per_token"] <= lru["ms_per_token"] * 1.001, (nbytes, name)
        if nbytes == BIG:       # 2 ms of lead cannot hide a 33 ms read: a guess pays only if ~sure
            assert simulate_clocked(tr, 0.25, "prefetch:random:gated", predictions=preds["random"], depth=2,
                                    **Q32).row()["prefetches"] == 0
    assert PrefetchGate.gain(0.9, lead=2e-3, backlog=0.0, transfer=33e-3, link=33e-3, displaced=0.0) < 0
    assert PrefetchGate.gain(0.9, lead=4e-3, backlog=0.0, transfer=2e-3, link=2e-3, displaced=0.0) > 0


def test_recommended_policies_are_never_slower_than_lru_on_synthetic_routing():
    from lexi_gguf.caching import synthroute as R
    from lexi_gguf.caching.idpredict import previous_predictions
    tr = R.synth_trace("mixtral-8x7b", seqs=3, tokens=32)
    prev = previous_predictions(tr, 2)
    for nbytes in (BIG, 6e6):
        tr.meta["expert_bytes"] = [nbytes] * 32
        lru = simulate_clocked(tr, 0.25, "lru", **Q32).row()["ms_per_token"]
        for pol in ("nextuse", "prefetch:previous:gated"):
            r = simulate_clocked(tr, 0.25, pol, predictions=prev, depth=2, **Q32).row()
            assert r["ms_per_token"] < lru, (nbytes, pol)


def test_previous_token_prefetch_turns_every_reuse_into_a_late_read():
    """The recording's previous-token 0.00 at 25 %, reproduced on synthetic Mixtral-shaped routing (one
    token's worth of slots, one layer ahead): a guess that is not resident is read in and evicts LRU's
    oldest, the previous token's experts of the next layers, the very ones guessed next; they are read
    again as prefetches, and a 33 ms read cannot land in 2 ms of compute. Every reuse becomes a late
    read (late rate = the free model's hit rate), none a hit; two layers ahead breaks the chain."""
    from lexi_gguf.caching import synthroute as R
    from lexi_gguf.caching.idpredict import previous_predictions
    from lexi_gguf.caching.simulate import simulate
    tr = R.synth_trace("mixtral-8x7b", seqs=3, tokens=32)
    one = simulate_clocked(tr, 0.25, "prefetch:previous", predictions=previous_predictions(tr, 1), depth=1, **Q32).row()
    free = simulate(tr, 0.25, "prefetch:previous", predictions=previous_predictions(tr, 1), depth=1)
    lru = simulate_clocked(tr, 0.25, "lru", **Q32).row()
    assert one["hit_rate"] < 0.001 and one["late_rate"] == pytest.approx(free.hit_rate, abs=0.001)   # "0.00"
    assert one["ms_per_token"] > 2 * lru["ms_per_token"] and lru["hit_rate"] > 0.25
    two = simulate_clocked(tr, 0.25, "prefetch:previous", predictions=previous_predictions(tr, 2), depth=2, **Q32).row()
    assert two["hit_rate"] > 0.25
    gated = simulate_clocked(tr, 0.25, "prefetch:previous:gated", predictions=previous_predictions(tr, 1), **Q32).row()
    assert gated["hit_rate"] > lru["hit_rate"] and gated["ms_per_token"] < lru["ms_per_token"]
