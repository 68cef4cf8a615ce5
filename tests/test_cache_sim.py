"""The cache simulator against hand-worked cases: LRU and Belady on a known request stream, Belady
never below LRU/LFU, prefetch costs bytes and is only as good as its predictions, quotas follow k."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.caching import predict, simulate as S
from lexi_gguf.runtime.trace import Trace


def _trace(experts: list[list[list[int]]], n_expert: int, generated=True) -> Trace:
    e = np.array(experts, dtype=np.int16)             # [T, L, k]
    T, L, k = e.shape
    return Trace(np.arange(T, dtype=np.int32), np.full(T, generated), np.zeros(T, np.int32),
                 np.arange(L, dtype=np.int32), np.full(L, k, np.int32), e, np.ones(e.shape, np.float32),
                 meta={"n_expert": n_expert, "expert_bytes": [100.0] * L, "budget": "test"})


def test_lru_and_belady_by_hand():
    # one layer, 4 experts, k 1: requests 0 1 2 0 1 3 0 with 2 slots (capacity 0.5)
    tr = _trace([[[e]] for e in [0, 1, 2, 0, 1, 3, 0]], 4)
    lru = S.simulate(tr, 0.5, "lru")
    assert (lru.slots, lru.accesses, lru.hits) == (2, 7, 0)          # LRU thrashes on this loop
    bel = S.simulate(tr, 0.5, "belady")
    # Belady: 0,1 miss; 2 miss evicts 1? no: next uses 0@3, 1@4 -> evict 1 (farther)... hand count:
    # [0,1] 2 miss evict 1 -> [0,2]; 0 hit; 1 miss evict 2 (never again) -> [0,1]; 1 hit? no, 1 was
    # just loaded at index 4; 3 miss evict 1 (never again) -> [0,3]; 0 hit. Hits: 2
    assert bel.hits == 2
    assert bel.row()["demand_mb_per_token"] == pytest.approx(5 * 100 / 7 / 1e6)


def test_demand_misses_counts_a_warm_cache_from_a_token_on():
    tr = _trace([[[e]] for e in [0, 1, 2, 0, 1, 3, 0]], 4)          # the hand-counted loop above
    assert S.demand_misses(tr, 2, "belady") == 5 and S.demand_misses(tr, 2, "lru") == 7
    # from token 3 on the cache is warm with what tokens 0-2 left: Belady misses only 1 and 3 there
    assert S.demand_misses(tr, 2, "belady", count_from=3) == 2
    assert S.demand_misses(tr, 4, "belady", count_from=3) == 1       # all fit: only 3, never seen before


def test_belady_is_the_ceiling_of_demand_policies():
    rng = np.random.default_rng(0)
    # 3 layers, 16 experts, k 2, skewed popularity
    p = np.arange(16, 0, -1) / np.arange(16, 0, -1).sum()
    ex = [[rng.choice(16, 2, replace=False, p=p).tolist() for _ in range(3)] for _ in range(300)]
    tr = _trace(ex, 16)
    for cap in (0.1, 0.25, 0.5):
        bel = S.simulate(tr, cap, "belady").hits
        assert bel >= max(S.simulate(tr, cap, p).hits for p in ("lru", "lfu", "eamc"))
    assert S.simulate(tr, 1.0, "lru").hits == S.simulate(tr, 1.0, "belady").hits   # all fits: only cold misses


def test_prefetch_pays_for_what_it_loads():
    rng = np.random.default_rng(1)
    ex = [[rng.choice(32, 2, replace=False).tolist() for _ in range(4)] for _ in range(200)]
    tr = _trace(ex, 32)
    lru = S.simulate(tr, 0.1, "lru")
    oracle = S.simulate(tr, 0.1, "prefetch:oracle", predictions=S.oracle_predictions(tr))
    rand = S.simulate(tr, 0.1, "prefetch:random", predictions=predict.random_predictions(tr))
    assert oracle.hit_rate > lru.hit_rate + 0.3
    assert oracle.prefetch_bytes > 0 and oracle.prefetch_used == oracle.prefetches    # every oracle guess is used
    # a perfect predictor one layer ahead (the next token's layer 0 from this token's last layer)
    # misses little more than the first token's first layer (2 of 1600 requests)
    assert 2 <= oracle.accesses - oracle.hits <= 4
    one_token_only = _trace(ex, 32)
    one_token_only.seq = np.arange(200, dtype=np.int32)           # every token its own sequence
    o2 = S.simulate(one_token_only, 0.1, "prefetch:oracle", predictions=S.oracle_predictions(one_token_only))
    assert o2.accesses - o2.hits > 300         # no look-ahead across sequences: layer 0 mostly misses
    assert rand.prefetch_used < rand.prefetches
    with pytest.raises(LexiError, match="needs predictions"):
        S.simulate(tr, 0.1, "prefetch:x")


def test_eamc_restarts_with_each_request():
    # request 0 uses expert 0 a lot, request 1 uses 1 and 2 alternately with one slot... two slots:
    # LFU keeps the globally hot expert 0 and thrashes on 1/2; EAMC forgets request 0's counts
    ex = [[[0]]] * 20 + [[[1]], [[2]]] * 10
    tr = _trace(ex, 4)
    tr.seq = np.array([0] * 20 + [1] * 20, np.int32)
    lfu, eamc = S.simulate(tr, 0.5, "lfu"), S.simulate(tr, 0.5, "eamc")
    assert eamc.hits == 19 + 18 and lfu.hits == 19 + 0


def test_quotas_and_phases():
    tr = _trace([[[0, 1], [2, 3]]] * 4, 8)
    tr.counts = np.array([4, 1], np.int32)
    assert S.quotas(tr, 10, "k") == [8, 2] and S.quotas(tr, 10, "equal") == [5, 5] and S.quotas(tr, 10, "global") is None
    prompt_only = _trace([[[0]]] * 3, 4, generated=False)
    with pytest.raises(LexiError, match="no generated tokens"):
        S.steps(prompt_only, "decode")
    assert S.steps(prompt_only, "auto").tolist() == [0, 1, 2]


def test_predictor_scores_are_honest():
    tr = _trace([[[0, 1]]] * 10, 8)
    perfect = predict.score(tr, S.oracle_predictions(tr)[1])
    assert perfect["recall"] == perfect["f1"] == perfect["accuracy"] == 1.0
    assert perfect["all_zeros_accuracy"] == pytest.approx(0.75)      # 2 of 8 positive
    wrong = predict.score(tr, {(t, 0): [6, 7] for t in range(10)})
    assert wrong["recall"] == 0 and wrong["accuracy"] == pytest.approx(0.5)
    assert wrong["accuracy"] < wrong["all_zeros_accuracy"]


def test_learned_predictor_learns_a_pattern(tmp_path):
    # each layer's first expert is the previous layer's plus one, also from a token's last layer to
    # the next token's first; the router input encodes it: the learned predictor must find the rule
    # in training traces and carry it across tokens

    def make(n, start):
        first = (start + 3 * np.arange(n)) % 16
        ex = [[[int((f + j) % 16), int((f + j + 8) % 16)] for j in range(3)] for f in first]
        tr = _trace(ex, 16)
        h = np.zeros((n, 3, 16), np.float16)
        for t in range(n):
            for j in range(3):
                h[t, j, ex[t][j][0]] = 1.0
        tr.hidden = h
        return tr
    train, test = make(400, 0), make(100, 5)
    p = predict.LearnedPredictor(16, 16, 3, depth=1, hidden=64)
    p.fit(train, epochs=40)
    sc = predict.score(test, p.predictions(test)[1])
    assert sc["recall"] > 0.9 > predict.score(test, predict.random_predictions(test)[1])["recall"]
    p.save(tmp_path / "p.pt")
    again = predict.LearnedPredictor.load(tmp_path / "p.pt").predictions(test)[1]
    assert again == p.predictions(test)[1]


# ---------------------------------------------------------------- per-layer k, the shared policies, synthetic routing

def test_k_truncation_keeps_the_highest_weight_experts():
    tr = _trace([[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2, 8)
    tr.weights = np.array([[[0.1, 0.4, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]]] * 2, np.float32)
    out = S.with_counts(tr, [2, 1])
    assert out.counts.tolist() == [2, 1] and out.experts.shape == (2, 2, 2)
    assert out.experts[0, 0].tolist() == [1, 2] and out.experts[0, 1].tolist() == [4, -1]
    assert out.weights[0, 1].tolist() == pytest.approx([0.4, 0.0])
    # equal weights (an imported trace without them): the selection order decides
    tr.weights[:] = 0.25
    assert S.with_counts(tr, [3, 4]).experts[1, 0].tolist() == [0, 1, 2, -1]
    # k per block, 0 on a dense block: MoE layers at blocks 1 and 2
    tr.moe_layers = np.array([1, 2], np.int32)
    assert S.with_counts(tr, [0, 1, 1]).counts.tolist() == [1, 1]
    with pytest.raises(LexiError, match=r"^--k asks for 5 experts in MoE layer 1 \(block 2\); the trace recorded 4"):
        S.with_counts(tr, [4, 5])
    with pytest.raises(LexiError, match="one per MoE layer"):
        S.with_counts(tr, [1, 1, 1, 1])
    # fewer experts per token, fewer misses on the same routing
    assert S.simulate(S.with_counts(tr, [1, 1]), 0.25, "lru").accesses == 4


def test_every_policy_evicts_what_victim_names():
    from lexi_gguf.runtime import policies as P
    rng = np.random.default_rng(0)
    for kind in P.EVICTION:
        pool = P.make_pools(None, 5, kind, 2, 8, [2, 2])[0]
        for i in range(200):
            t, j = divmod(i, 4)
            e = int(rng.integers(8))
            key = (j % 2) * 8 + e
            pool.on_layer(t, j % 2, [key])
            if key in pool:
                pool.touch(key, i, i + 10)
            else:
                v = pool.victim() if len(pool) >= 5 else None
                assert pool.admit(key, i, i + 10) == v and key in pool and len(pool) <= 5


def test_nextuse_keeps_the_expert_that_returns():
    """One layer, 2 slots, expert 0 back every third token between never-seen ones: LRU evicts 0 just
    before it returns (0 hits); the learned next-use estimate keeps it once it has seen the pattern."""
    seq = [e for i in range(60) for e in (0, 1 + 2 * i, 2 + 2 * i)]
    tr = _trace([[[e]] for e in seq], 128)
    lru, nu, bel = (S.simulate(tr, 2 / 128, p) for p in ("lru", "nextuse", "belady"))
    assert lru.hits == 0
    assert nu.hits >= 45 and bel.hits == 59          # of 59 returns of expert 0 (it learns in ~12)


def test_synthetic_routing_matches_the_stated_statistics():
    from lexi_gguf.caching import synthroute as R
    ds = R.synth_trace("deepseek-v2-lite", seqs=4, tokens=64)
    assert ds.meta["synthetic"] and "SYNTHETIC" in ds.meta["model"]
    assert ds.experts.shape[1:] == (26, 6) and ds.n_expert == 64 and ds.moe_layers[0] == 1
    assert 0.25 <= R.overlap(ds) <= 0.31                 # ~28 % shared with the previous token
    mx = R.synth_trace("mixtral-8x7b", seqs=8, tokens=64)
    assert mx.experts.shape[1:] == (32, 2)
    assert 0.29 <= S.simulate(mx, 0.25, "lru").hit_rate <= 0.39       # the recording: 0.34
    assert 0.57 <= S.simulate(mx, 0.25, "belady").hit_rate <= 0.68    # the recording: 0.62
    assert (np.diff(mx.weights, axis=2) <= 0).all()                     # highest weight first
    with pytest.raises(LexiError, match="unknown synthetic routing preset"):
        R.synth_trace("gpt-9")


def test_cache_sim_cli_at_per_layer_k_and_gated(tmp_path, capsys):
    import json

    from lexi_gguf import cli
    from lexi_gguf.caching import synthroute as R
    tr = R.synth_trace("mixtral-8x7b", seqs=2, tokens=16)
    path = tr.save(tmp_path / "synth.npz")
    js = tmp_path / "out.json"
    assert cli.main(["cache-sim", str(path), "--capacity", "0.25", "--policy", "lru,nextuse,previous:gated",
                     "--k", ",".join(["1"] * 32), "--clock", "nvme", "--compute-ms", "2", "--queue-depth", "32",
                     "--demand-first", "--depth", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["counts"] == [1] * 32 and [r["policy"] for r in res["rows"]] == ["lru", "nextuse"]  # gated: clock only
    assert [r["policy"] for r in res["clock"]["rows"]] == ["lru", "nextuse", "prefetch:previous:gated"]
    assert cli.main(["cache-sim", str(path), "--k", "3", "--policy", "lru"]) == 2
    assert "--k has 1 values" in capsys.readouterr().err
    assert cli.main(["cache-sim", str(path), "--k", ",".join(["3"] * 32), "--policy", "lru"]) == 2
    assert "the trace recorded 2: give 1..2 there" in capsys.readouterr().err
    assert cli.main(["cache-sim", str(path), "--policy", "previous:gated"]) == 2
    assert "give --clock LINK" in capsys.readouterr().err
    assert cli.main(["cache-sim", str(path), "--budget", "0.75", "--policy", "lru"]) == 2
    assert "give --model MODEL.gguf" in capsys.readouterr().err
