"""The expert cache's look-ahead (runtime.lookahead, `--cache-policy learned`): the predictors it runs
online are the ones the simulators replay (one implementation); the sequence predictor run token by
token gives what it gives over a whole trace; the clock gate reads a guess only when it pays (scripted
routing, a fast and a slow disk); in the runtime, outputs stay bit-identical and memory within SIZE."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.caching import idpredict, predict
from lexi_gguf.runtime import expertmap as xm
from lexi_gguf.runtime.lookahead import Coactivation, Lookahead, Previous, make_predictor, replay
from lexi_gguf.runtime.options import LoadOptions
from lexi_gguf.runtime.policies import make_pools
from lexi_gguf.runtime.seqmodel import OnlineSequence, SequencePredictor
from lexi_gguf.runtime.tracefile import Trace
from lexi_gguf.testbeds import shapes, synth

from conftest import greedy_logits

L, E, K = 4, 16, 2


def scripted(T: int = 40, seqs: int = 1, seed: int = 0) -> Trace:
    """Layer j+1's experts are a fixed function of layer j's (e -> 3e+1 mod E); layer 0 random."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((T, L, K), np.int32)
    for t in range(T):
        ex[t, 0] = rng.choice(E, K, replace=False)
        for j in range(1, L):
            ex[t, j] = (3 * ex[t, j - 1] + 1) % E
    return Trace(np.arange(T, dtype=np.int32), np.ones(T, bool), np.repeat(np.arange(seqs), T // seqs).astype(np.int32),
                 np.arange(L, dtype=np.int32), np.full(L, K, np.int32), ex.astype(np.int16),
                 np.full((T, L, K), 1.0 / K, np.float32), meta={"n_expert": E, "expert_bytes": [1 << 20] * L})


def test_previous_replayed_is_the_previous_tokens_experts():
    tr = scripted(20, seqs=2)
    p = idpredict.previous_predictions(tr, 2)
    assert p[1][(5, 2)] == tr.experts[4, 2].tolist() and p[2][(11, 0)] == tr.experts[10, 0].tolist()
    assert (10, 1) not in p[1]                      # token 10 starts the second sequence: no previous token
    assert predict.score(tr, p[1])["recall"] < 0.5  # layer 0 is random: the previous token does not know it


def test_online_coactivation_learns_the_scripted_map():
    tr = scripted(120)
    p = idpredict.online_predictions(tr, 2)
    late = np.arange(80, 119)                        # by then every layer-0 expert has been seen
    for d in (1, 2):
        got = {key: v for key, v in p[d].items() if key[0] in late and key[1] >= d}   # source in the same token
        assert predict.score(tr, got, late)["recall"] == 1.0
    warm = idpredict.online_predictions(scripted(10, seed=3), 2, train=tr)
    assert predict.score(scripted(10, seed=3), {k: v for k, v in warm[1].items() if k[1] != 0})["recall"] == 1.0


def test_the_sequence_predictor_online_equals_its_batch_predictions():
    tr = scripted(24, seqs=2)
    m = SequencePredictor(E, L, depth=2, d_model=16, window=8)
    m.fit(tr, steps=3)
    batch = m.predictions(tr)
    online = replay(tr, OnlineSequence(m), 2)
    assert batch.keys() == online.keys()
    for d in batch:
        assert online[d] == batch[d], d


def test_make_predictor_refuses_what_the_runtime_cannot_run(tmp_path):
    assert isinstance(make_predictor(None, L, E)[0], Coactivation)
    assert isinstance(make_predictor("previous", L, E)[0], Previous)
    with pytest.raises(LexiError, match="use previous, coactivation"):
        make_predictor("nope", L, E)
    tr = scripted(8)
    with pytest.raises(LexiError, match="give a trace of this model"):
        make_predictor(str(tr.save(tmp_path / "t.npz")), L, 2 * E)
    from lexi_gguf.caching.predict import LearnedPredictor
    LearnedPredictor(8, E, L, 1).save(tmp_path / "r.pt")
    with pytest.raises(LexiError, match="router input"):
        make_predictor(str(tmp_path / "r.pt"), L, E)


class _Cache:
    """The cache's side of Lookahead on scripted routing: a pool of `slots` experts of 1 MiB."""

    def __init__(self, slots: int):
        self.lay = type("Lay", (), {"moe_layers": list(range(L)), "n_expert": E})()
        self.counts = [K] * L
        self.pol = make_pools(None, slots, "nextuse", L, E, self.counts)[0]
        self.now, self.read = 0, []

    def pool_of(self, j):
        return self.pol

    def room(self, j):
        return (self.pol.cap - len(self.pol)) << 20

    def key_bytes(self, key):
        return 1 << 20

    def prefetch(self, key, conf, drops):
        ev = self.pol.prefetched(key, self.now, conf)
        drops += [ev] if ev is not None else []
        self.read.append(key)
        return True


def _run(rate: float, tokens: int = 80):
    tr, c = scripted(tokens), _Cache(slots=40)
    look = Lookahead(c, Coactivation(L, E), 2, rate)
    for t in range(tokens):
        for j in range(L):
            keys = [j * E + int(e) for e in tr.experts[t, j]]
            c.pol.on_layer(t + 1, j, keys)
            asked = 0
            for k in keys:
                if k in c.pol:
                    c.pol.touch(k, c.now)
                else:
                    c.pol.admit(k, c.now)
                    asked += 1 << 20
            look.requested(keys)
            look.after_layer(t + 1, j, keys, asked, 1, t * 0.04 + j * 0.01)   # 10 ms between layers
    return look.stats


def test_the_gate_reads_guesses_on_a_fast_disk_and_refuses_them_on_a_slow_one():
    fast = _run(rate=10e9)               # 1 MiB in 0.1 ms, well inside the 10 ms before the next layer
    assert fast["prefetches"] > 10 and fast["prefetch_used"] >= 0.8 * fast["prefetches"]
    slow = _run(rate=20e6)               # 52 ms per expert behind this layer's own misses: nothing pays
    assert slow["prefetches"] == 0 and slow["refused"] > 100


@pytest.fixture(scope="module")
def model():
    return synth.synth(shapes.reduced(shapes.get("olmoe-1b-7b"), 2, E), "Q8_0", progress=False)["path"]


def test_learned_policy_in_the_runtime_is_bit_identical_and_within_size(model, capfd):
    size = 20 * xm.layout(model).expert_bytes[0]
    llm, ref = greedy_logits(model, LoadOptions())
    llm.close()
    llm, got = greedy_logits(model, LoadOptions(expert_cache=str(size), cache_policy="learned", cache_predictor="previous"))
    cache = llm._lexi_expert_cache
    resident, s = cache.resident_expert_bytes(), cache.summary()
    llm.close()
    err = capfd.readouterr().err
    assert np.array_equal(ref, got)
    assert resident <= 1.05 * size
    la = s["lookahead"]
    assert la["predictor"] == "previous" and la["read_rate_mb_s"] > 0 and la["layer_interval_ms"] > 0
    assert la["prefetches"] + la["refused"] + la["promoted"] > 0
    assert "look-ahead 2 layers, previous predictor" in err and "refused by the clock" in err
    with pytest.raises(LexiError, match="add --cache-policy learned"):
        LoadOptions(expert_cache="4G", cache_policy="lru", cache_predictor="previous")
