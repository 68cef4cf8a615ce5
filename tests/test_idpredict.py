"""Predictors from expert ids alone: previous token, co-activation counted on another trace, and the
MoE-Beyond-style causal transformer over the tokens' expert sets."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import cli
from lexi_gguf.caching import idpredict, predict
from lexi_gguf.runtime.trace import Trace


def make(experts: np.ndarray, seq: np.ndarray, n_expert: int) -> Trace:
    T, L, k = experts.shape
    return Trace(np.arange(T, dtype=np.int32), np.ones(T, bool), seq.astype(np.int32), np.arange(L, dtype=np.int32),
                 np.full(L, k, np.int32), experts.astype(np.int16), np.ones(experts.shape, np.float32) / k, None,
                 {"n_expert": n_expert, "expert_bytes": [1e6] * L, "seconds": 1.0, "callback_seconds": 0.0})


def topic_trace(n_seq: int, n_tok: int, seed: int, L: int = 4, E: int = 16, k: int = 2) -> Trace:
    """Each sequence follows a slowly changing topic; a topic prefers k experts per layer (half the picks)."""
    rng, prefs = np.random.default_rng(seed), np.random.default_rng(99).integers(0, E, (6, L, k))
    ex = np.zeros((n_seq * n_tok, L, k), np.int64)
    for s in range(n_seq):
        z = rng.integers(6)
        for t in range(n_tok):
            z = rng.integers(6) if rng.random() > 0.97 else z
            for j in range(L):
                picks: list[int] = []
                while len(picks) < k:
                    e = int(rng.choice(prefs[z, j])) if rng.random() < 0.5 else int(rng.integers(E))
                    picks += [e] if e not in picks else []
                ex[s * n_tok + t, j] = picks
    return make(ex, np.repeat(np.arange(n_seq), n_tok), E)


def test_previous_and_coactivation_are_exact_where_the_routing_is():
    # layer 1's expert is a fixed function of layer 0's (k 1); every token repeats its predecessor
    rng = np.random.default_rng(0)
    l0 = rng.integers(0, 8, (220, 1))           # 200 training tokens: every expert seen
    ex = np.stack([l0, (l0 + 3) % 8], 1)
    train, test = make(ex[:200], np.zeros(200), 8), make(ex[200:], np.zeros(20), 8)
    co = idpredict.coactivation_predictions(train, test, depth=1)[1]
    assert predict.score(test, {key: v for key, v in co.items() if key[1] == 1})["recall"] == 1.0
    same = make(np.repeat(ex[:1], 10, 0), np.zeros(10), 8)
    assert predict.score(same, idpredict.previous_predictions(same, 1)[1])["recall"] == 1.0
    # a new sequence has no previous token
    assert (5, 0) not in idpredict.previous_predictions(make(ex[:10], np.r_[np.zeros(5), np.ones(5)], 8), 1)[1]


def test_sequence_predictor_is_causal_and_learns(tmp_path):
    train, test = topic_trace(8, 64, seed=1), topic_trace(4, 64, seed=2)
    m = idpredict.SequencePredictor(16, 4, depth=2, d_model=32)
    m.fit(train, steps=120)
    p = m.predictions(test)
    rec = [predict.score(test, p[d])["recall"] for d in (1, 2)]
    rnd = predict.score(test, predict.random_predictions(test, 1)[1])["recall"]
    assert min(rec) > rnd + 0.08, (rec, rnd)
    # causal: changing what comes later (token 100's layers >= 2, every token after it) changes no
    # prediction made before it (from a token < 100, or from token 100's layers 0-1)
    ex = test.experts.copy()
    ex[100, 2:] = (ex[100, 2:] + 5) % 16
    ex[101:] = (ex[101:] + 7) % 16
    q = m.predictions(make(ex, test.seq, 16))
    for d in (1, 2):
        for (tt, jj), v in p[d].items():
            src_t, src_j = (tt, jj - d) if jj - d >= 0 else (tt - 1, jj - d + 4)
            if src_t < 100 or (src_t == 100 and src_j < 2):
                assert q[d][(tt, jj)] == v, (d, tt, jj)
    # saved and loaded through the CLI, scored beside the id-only baselines
    path = tmp_path / "seq.pt"
    m.save(path)
    tr_path, te_path = train.save(tmp_path / "train.npz"), test.save(tmp_path / "test.npz")
    assert cli.main(["predictor", "eval", str(te_path), "--predictor", str(path), "--train-trace", str(tr_path),
                     "--depth", "2"]) == 0
    assert cli.main(["cache-sim", str(te_path), "--capacity", "0.25", "--policy", "lru,sequence,coactivation,previous",
                     "--predictor", str(path), "--train-trace", str(tr_path), "--phase", "all", "--depth", "2",
                     "--clock", "nvme", "--compute-ms", "0.2"]) == 0


@pytest.mark.parametrize("bad", ["other_model"])
def test_traces_of_other_models_are_refused(bad):
    from lexi_gguf import LexiError
    a, b = topic_trace(1, 8, 0), topic_trace(1, 8, 0, E=8)
    with pytest.raises(LexiError, match="different models"):
        idpredict.coactivation_predictions(a, b)
