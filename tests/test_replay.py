"""Routing replay (runtime.replay, the routing-replay patch) and any per-layer counts at run time
(runtime.llama.set_expert_counts, the expert-counts patch)."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.replay import fits
from lexi_gguf.runtime.trace import Trace, last_logits, record
from conftest import LADDER, TOKENS


def _scripted(like: Trace, n_tokens: int, k: int, seed: int = 0, n_expert: int | None = None) -> Trace:
    """A trace of the same layers whose experts no router would pick: random distinct ids a token, random
    weights, best first."""
    rng = np.random.default_rng(seed)
    E = n_expert or like.n_expert
    L = len(like.moe_layers)
    experts = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(n_tokens)]).astype(np.int16)
    w = np.sort(rng.random((n_tokens, L, k)).astype(np.float32), axis=-1)[..., ::-1]
    w = w / w.sum(-1, keepdims=True)
    meta = dict(like.meta, n_expert=E, model="scripted")
    return Trace(np.zeros(n_tokens, np.int32), np.zeros(n_tokens, bool), np.zeros(n_tokens, np.int32),
                 like.moe_layers.copy(), np.full(L, k, np.int32), experts, np.ascontiguousarray(w), None, meta)


@pytest.fixture(scope="module")
def router_trace(laddered_gguf):
    return record(laddered_gguf, tokens=[TOKENS], no_lexi=True, progress=False)


def test_a_replaying_run_traces_the_replayed_experts_and_weights(laddered_gguf, router_trace, tmp_path):
    T = len(TOKENS)
    script = _scripted(router_trace, 2 * T, 4)
    assert not (script.experts[:T] == router_trace.experts).all()
    got = record(laddered_gguf, tokens=[TOKENS], no_lexi=True, progress=False, replay=script.save(tmp_path / "s.npz"))
    assert (got.experts == script.experts[:T]).all()
    np.testing.assert_allclose(got.weights, script.weights[:T], rtol=1e-6)
    assert got.meta["replay"]["tokens"] == T and got.meta["replay"]["wrapped"] == 0
    # the router's own routing again once replay is removed: a new load routes as before
    again = record(laddered_gguf, tokens=[TOKENS], no_lexi=True, progress=False)
    assert (again.experts == router_trace.experts).all()


def test_replay_at_per_layer_k_keeps_each_layers_best_recorded_experts(laddered_gguf, router_trace):
    T = len(TOKENS)
    script = _scripted(router_trace, T, 4, seed=1)
    got = record(laddered_gguf, tokens=[TOKENS], budget="0.5", progress=False, replay=script)
    counts = LADDER[0.5]
    assert got.counts.tolist() == counts
    for j, k in enumerate(counts):
        assert (got.experts[:, j, :k] == script.experts[:, j, :k]).all()
        assert (got.experts[:, j, k:] == -1).all()
        if k < 4:   # the router's weights of the replayed experts, renormalised as qwen3-moe does
            np.testing.assert_allclose(got.weights[:, j, :k].sum(-1), 1.0, rtol=1e-5)
            assert not np.allclose(got.weights[:, j, :k], script.weights[:, j, :k])
        else:       # the recorded weights where the layer runs the recorded k
            np.testing.assert_allclose(got.weights[:, j], script.weights[:, j], rtol=1e-6)


def test_replay_wraps_past_the_end_of_a_short_trace(laddered_gguf, router_trace):
    script = _scripted(router_trace, 5, 4, seed=2)
    got = record(laddered_gguf, tokens=[TOKENS], no_lexi=True, progress=False, replay=script)
    rows = np.arange(len(TOKENS)) % 5
    assert (got.experts == script.experts[rows]).all()
    assert got.meta["replay"]["wrapped"] == len(TOKENS) // 5


def test_a_trace_that_does_not_fit_is_refused_in_one_line(laddered_gguf, router_trace):
    full = [4, 4, 4, 4]
    with pytest.raises(LexiError, match="routes over 16 experts a layer, the model has 8"):
        fits(_scripted(router_trace, 4, 4, n_expert=16), laddered_gguf, full)
    short = _scripted(router_trace, 4, 2)
    with pytest.raises(LexiError, match="layer 0 runs 4 experts but the trace recorded 2"):
        fits(short, laddered_gguf, full)
    fits(short, laddered_gguf, [2, 1, 2, 1])          # a lower budget fits
    three = _scripted(router_trace, 4, 4)
    three.moe_layers, three.counts = three.moe_layers[:3], three.counts[:3]
    three.experts, three.weights = three.experts[:, :3], three.weights[:, :3]
    with pytest.raises(LexiError, match="the trace has MoE layers 3 .*the model 4"):
        fits(three, laddered_gguf, full)


def test_cli_trace_and_bench_replay_an_imported_trace(laddered_gguf, router_trace, tmp_path, capsys):
    script = _scripted(router_trace, len(TOKENS), 4, seed=3)
    csv = tmp_path / "r.csv"
    csv.write_text("token,layer,experts\n" + "".join(
        f"{t},{j},{' '.join(map(str, script.experts[t, j]))}\n" for t in range(len(TOKENS)) for j in range(4)))
    imp = tmp_path / "imp.npz"
    assert cli.main(["trace", "import", str(csv), "--n-expert", "8", "--expert-bytes", "4096", "-o", str(imp)]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The river flows into the sea and the sea")
    out = tmp_path / "replayed.npz"
    assert cli.main(["trace", "run", str(laddered_gguf), "--text", str(text), "--no-lexi", "--routing-replay", str(imp),
                     "-o", str(out)]) == 0
    got = Trace.load(out)
    assert (got.experts == script.experts[np.arange(len(got.tokens)) % len(TOKENS)]).all()
    js = tmp_path / "b.json"
    assert cli.main(["bench", str(laddered_gguf), "--budgets", "0.5", "--n-prompt", "8", "--n-gen", "4", "--reps", "1",
                     "--routing-replay", str(imp), "--json", str(js)]) == 0
    import json
    res = json.loads(js.read_text())
    assert res["routing"].startswith("replayed") and all(r["replay"]["tokens"] > 0 for r in res["rows"])
    bad = _scripted(router_trace, 4, 2).save(tmp_path / "k2.npz")
    capsys.readouterr()
    assert cli.main(["bench", str(laddered_gguf), "--budgets", "0.5", "--routing-replay", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "runs 4 experts but the trace recorded 2" in err and "Traceback" not in err


def _logits(llm, tokens=TOKENS) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return last_logits(llm)


def test_any_per_layer_counts_on_a_loaded_model(laddered_gguf):
    llm = runtime.load(laddered_gguf, n_ctx=64, n_threads=1)
    loaded = _logits(llm)
    runtime.set_lexi_row(llm, 1)                        # the stored 0.625 row
    row = _logits(llm)
    runtime.set_expert_counts(llm, LADDER[0.625])       # the same counts, given by hand
    assert runtime.lexi_row(llm) == runtime.ROW_CUSTOM
    np.testing.assert_array_equal(_logits(llm), row)
    runtime.set_expert_counts(llm, [1, 1, 1, 1])        # counts no row stores
    ones = _logits(llm)
    assert not np.allclose(ones, row)
    runtime.set_expert_counts(llm, [1, 1, 1, 2])        # a new custom set rebuilds the graph
    assert not np.allclose(_logits(llm), ones)
    for bad, msg in (([1, 1, 1], "3 expert counts for a model of 4 blocks"), ([0, 1, 1, 1], "block 0: 0 experts"),
                     ([1, 9, 1, 1], r"block 1: 9 experts does not fit \(1..8")):
        with pytest.raises(LexiError, match=msg):
            runtime.set_expert_counts(llm, bad)
    runtime.set_expert_counts(llm, None)
    np.testing.assert_array_equal(_logits(llm), loaded)
    llm.close()
    uni = runtime.load(laddered_gguf, n_ctx=64, n_threads=1,
                       kv_overrides=runtime.lexi_overrides("qwen3moe", uniform_k=1))
    np.testing.assert_allclose(_logits(uni), ones, rtol=1e-5, atol=1e-5)
    uni.close()


def test_cli_runs_any_counts_without_a_row_in_the_file(laddered_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The river flows into the sea")
    out = tmp_path / "k.npz"
    assert cli.main(["trace", "run", str(laddered_gguf), "--text", str(text), "--k", "1,3,2,4", "-o", str(out)]) == 0
    got = Trace.load(out)
    assert got.counts.tolist() == [1, 3, 2, 4] and got.meta["budget"] == "k=1,3,2,4"
    assert all((got.experts[:, j, :k] >= 0).all() and (got.experts[:, j, k:] == -1).all()
               for j, k in enumerate([1, 3, 2, 4]))
    js = tmp_path / "b.json"
    assert cli.main(["bench", str(laddered_gguf), "--budgets", "0.5", "--n-prompt", "8", "--n-gen", "4", "--reps", "1",
                     "--k", "1,1,1,1", "--json", str(js)]) == 0
    import json
    rows = json.loads(js.read_text())["rows"]
    assert rows[-1]["config"] == "custom" and rows[-1]["expert_used_count"] == [1, 1, 1, 1]
    capsys.readouterr()
    assert cli.main(["trace", "run", str(laddered_gguf), "--text", str(text), "--k", "1,3,2", "-o", str(out)]) != 0
    assert "3 counts: give one per MoE layer (4)" in capsys.readouterr().err
