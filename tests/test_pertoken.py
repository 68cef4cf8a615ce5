"""Per-token expert counts through the routing hook (runtime.pertoken): SER, top-p and top-k inside each
layer's k. The reference: keeping a token's best m experts must give the logits of the layer run at k = m
(set_expert_counts), for a normalising router (qwen3_moe) and one that does not normalise (olmoe)."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.pertoken import PerToken, ProbsCapture, keep_mask, reweight, ser, top_k, top_p
from conftest import GGML_TYPE_F32, TOKENS, f32_logits


def test_keep_mask_rules_on_hand_made_weights():
    w = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.15, 0.05]])
    # SER 1,0.5: the top one, and any >= half of it
    assert keep_mask(ser(1, 0.5), w).tolist() == [[False, True, True, False], [True, False, False, False]]
    # SER 2,0.9: the top two always
    assert keep_mask(ser(2, 0.9), w).tolist() == [[False, True, True, False], [True, False, True, False]]
    # top-p on the router's probabilities of these experts (mass over all experts, so below 1 here)
    p = w * 0.8
    assert keep_mask(top_p(0.5), w, p).tolist() == [[False, True, True, False], [True, False, False, False]]
    assert keep_mask(top_p(0.7), w, p).tolist() == [[True, True, True, False], [True, True, True, False]]
    assert keep_mask(top_p(1.0), w, p).all()       # the mass never reaches 1 inside k: capped at k
    assert keep_mask(top_k(2), w).sum(1).tolist() == [2, 2]
    with pytest.raises(LexiError, match="needs the router's probabilities"):
        keep_mask(top_p(0.5), w)
    with pytest.raises(LexiError, match="threshold t in"):
        ser(1, 1.5)


def test_reweight_renormalises_only_where_the_layer_does():
    w = np.array([[0.5, 0.3, 0.2]])
    keep = np.array([[True, True, False]])
    np.testing.assert_allclose(reweight(w, keep, normalised=True), [[0.625, 0.375, 0.0]])
    np.testing.assert_allclose(reweight(w * 2.5, keep, normalised=True), [[1.5625, 0.9375, 0.0]])   # a scaled router
    np.testing.assert_allclose(reweight(w, keep, normalised=False), [[0.5, 0.3, 0.0]])


def _logits(path, counts=None, rule=None, normalised=True):
    info = model_info(path)
    cap = ProbsCapture(list(info.moe_layers))
    llm = runtime.load(path, n_ctx=64, logits_all=True, n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                       eval_callback=cap.callback, kv_overrides={"lexi.enable": False})
    if counts is not None:
        runtime.set_expert_counts(llm, counts)
    pt = PerToken(rule, list(info.moe_layers), normalised=normalised, probs=cap).install(llm) if rule else None
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    if pt is not None:
        pt.remove()
        pt.check()
    llm.close()
    return out, pt


@pytest.mark.parametrize("arch,normalised", [("qwen3_moe", True), ("olmoe", False)])
def test_keeping_the_best_m_equals_running_the_layer_at_k_m(tiny_gguf, arch, normalised):
    path = tiny_gguf(arch)
    info = model_info(path)
    kb = info.expert_used_count
    full, _ = _logits(path)
    per_block = lambda m: [m if i in info.moe_layers else 0 for i in range(info.block_count)]  # noqa: E731
    for m in (1, kb // 2):
        ref, _ = _logits(path, counts=per_block(m))
        got, pt = _logits(path, rule=top_k(m), normalised=normalised)
        assert np.abs(ref - full).max() > 1e-2          # the reference does differ from full k
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
        assert pt.active() == m and pt.tokens[info.moe_layers[0]] == len(TOKENS)
    # the wrong normalisation is caught by the same reference (it does matter)
    ref, _ = _logits(path, counts=per_block(1))
    wrong, _ = _logits(path, rule=top_k(1), normalised=not normalised)
    assert np.abs(wrong - ref).max() > 1e-3


def test_thresholds_at_their_ends_and_inside_per_layer_counts(tiny_gguf):
    path = tiny_gguf("qwen3_moe")
    info = model_info(path)
    full, _ = _logits(path)
    # the router-probabilities callback changes nothing in the outputs (measure.tokenquality mixes two loads)
    np.testing.assert_array_equal(full, f32_logits(path, **{"lexi.enable": False}))
    one = [1 if i in info.moe_layers else 0 for i in range(info.block_count)]
    top1, _ = _logits(path, counts=one)
    for rule, ref, k in ((ser(1, 0.0), full, info.expert_used_count), (top_p(1.0), full, info.expert_used_count),
                         (ser(1, 1.0), top1, 1), (top_p(1e-6), top1, 1)):
        got, pt = _logits(path, rule=rule)
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
        assert pt.active() == pytest.approx(k)
    # inside per-layer counts: top-p 1.0 keeps each layer's own k
    counts = [2 if i in info.moe_layers else 0 for i in range(info.block_count)]
    counts[info.moe_layers[0]] = 3
    ref, _ = _logits(path, counts=counts)
    got, pt = _logits(path, counts=counts, rule=top_p(1.0))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    assert pt.active_per_layer()[info.moe_layers[0]] == 3 and pt.active_per_layer()[info.moe_layers[1]] == 2
    # a threshold in between runs a count between 1 and k that varies by token
    _, pt = _logits(path, rule=top_p(0.5))
    assert 1 < pt.active() < info.expert_used_count


def test_families_are_compared_on_their_frontier_at_equal_active_experts():
    from lexi_gguf.measure.tokenquality import at_active, equal_compute, frontier
    a = [{"active": 1.0, "kld_mean": 0.5, "ppl": 9.0, "same_top1": 0.5},
         {"active": 2.0, "kld_mean": 0.1, "ppl": 7.0, "same_top1": 0.8},
         {"active": 2.5, "kld_mean": 0.2, "ppl": 8.0, "same_top1": 0.7},    # beaten by the point at 2.0
         {"active": 4.0, "kld_mean": 0.0, "ppl": 6.0, "same_top1": 1.0}]
    assert [p["active"] for p in frontier(a)] == [1.0, 2.0, 4.0]
    assert at_active(a, 2.0) == 0.1                                   # a measured point
    assert at_active(a, 3.0) == pytest.approx(0.05)                   # between 2.0 and 4.0 on the frontier
    assert at_active(a, 3.0, "ppl") == pytest.approx(6.5)
    assert at_active(a, 0.5) is None                                  # no extrapolation
    b = [{"active": 2.9, "kld_mean": 0.04, "ppl": 1, "same_top1": 1}, {"active": 3.5, "kld_mean": 0.01, "ppl": 1, "same_top1": 1}]
    rows = equal_compute({"a": a, "b": b}, [3.0, 2.0])
    assert rows[0]["best"] == "b" and rows[0]["families"]["b"]["kld_mean"] == pytest.approx(0.035)
    assert rows[1]["best"] == "a" and "b" not in rows[1]["families"]


def test_eval_scores_per_token_rules_with_their_measured_active_experts(converted, tmp_path, capsys):
    """eval --ser / --top-p: rows at the model's own k whose avg_k is measured; SER at t 0 and top-p 1 are
    the full model, SER at t 1 is k 1 (the same KLD as --k 1,1,1,1); a malformed --ser is one line."""
    import json

    from lexi_gguf import cli
    from lexi_gguf.measure.evaluate import evaluate
    text = " ".join(f"token {i} of the evaluation text, number {i * 7 % 13}." for i in range(300))
    res = evaluate(converted, text, [0.5], ctx=64, threads=2, max_chunks=2, progress=False, custom=[1, 1, 1, 1],
                   rules=[ser(1, 0.0), top_p(1.0), ser(1, 1.0)])
    rows = {r.get("rule") or r["config"]: r for r in res["rows"]}
    kb = rows["full"]["avg_k"]
    for name in ("SER 1,0", "top-p 1"):
        assert rows[name]["avg_k"] == kb and rows[name]["kld_mean"] < 1e-5
    assert rows["SER 1,1"]["avg_k"] == 1 and rows["SER 1,1"]["budget"] == pytest.approx(1 / kb)
    assert rows["SER 1,1"]["kld_mean"] == pytest.approx(rows["custom"]["kld_mean"], rel=1e-3)
    assert rows["custom"]["kld_mean"] > 1e-3
    f = tmp_path / "t.txt"
    f.write_text(text)
    js = tmp_path / "e.json"
    assert cli.main(["eval", str(converted), "--text", str(f), "--budgets", "0.5", "--ctx", "64", "--chunks", "1",
                     "--threads", "2", "--top-p", "0.5", "--ser", "2,0.3", "--json", str(js)]) == 0
    got = [r for r in json.loads(js.read_text())["rows"] if "rule" in r]
    assert [r["rule"] for r in got] == ["SER 2,0.3", "top-p 0.5"] and all(1 <= r["avg_k"] <= kb for r in got)
    capsys.readouterr()
    assert cli.main(["eval", str(converted), "--text", str(f), "--ser", "1.5,0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ser 1.5,0.3: give KMIN,T" in err and len(err.splitlines()) == 1
