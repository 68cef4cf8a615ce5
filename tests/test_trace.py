"""Traces come from the runtime as it ran: per token and MoE layer, the experts llama.cpp selected
(per-layer k respected), the weights it applied and the router's input equal the transformers
model's router on the same tokens; the trace file round-trips; prompts are followed by generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lexi_gguf import LexiError
from lexi_gguf.runtime.trace import Trace, record
from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.method.profile import route, weights_for_k
from lexi_gguf.testbeds.tinymodels import hf_set_top_k
from lexi_gguf.method.weights import SafetensorsSource

TOKENS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 1212]
PATTERN = {"default": [1, 4, 2, 3], "deepseek_v2": [0, 3, 1, 4]}


def _hf_router_inputs(hf_dir, spec_attr: str, moe_layers, counts) -> dict[int, torch.Tensor]:
    """Each MoE block's input in transformers running the same per-layer k."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_set_top_k(model, counts)
    got = {}
    for i in moe_layers:
        block = getattr(model.model.layers[i], spec_attr)
        block.register_forward_pre_hook(lambda mod, args, i=i: got.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(torch.tensor([TOKENS]))
    return got


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v2"])
def test_trace_equals_transformers_router(arch, tiny_checkpoint, tiny_gguf, tmp_path):
    hf_dir = tiny_checkpoint(arch)
    src = tiny_gguf(arch)
    counts = PATTERN.get(arch, PATTERN["default"])
    path = copy_with_metadata(src, tmp_path / "k.gguf", lexi_metadata(model_info(src), counts, "manual"), progress=False)
    tr = record(path, tokens=[TOKENS], hidden=True, progress=False)
    hf = SafetensorsSource(hf_dir)
    moe = list(hf.model.moe_layers)
    assert tr.moe_layers.tolist() == moe and tr.counts.tolist() == [counts[i] for i in moe]
    assert tr.experts.shape == (len(TOKENS), len(moe), max(counts)) and not tr.generated.any()
    xs = _hf_router_inputs(hf_dir, hf.model.spec.hf_moe_attr, moe, counts)
    for j, il in enumerate(moe):
        k = counts[il]
        idx, p = route(xs[il], hf.layer(il), hf.model.routing, k)
        w = weights_for_k(p, hf.model.routing, k)
        assert (tr.experts[:, j, :k] == idx.numpy()).all(), f"layer {il}"
        assert (tr.experts[:, j, k:] == -1).all()
        assert np.abs(tr.weights[:, j, :k] - w.numpy()).max() < 1e-3, f"layer {il}"   # the fidelity bar
        assert np.abs(tr.hidden[:, j].astype(np.float32) - xs[il].numpy()).max() < 2e-2   # stored as f16


def test_trace_file_and_generation(tiny_gguf, tmp_path):
    gguf = tiny_gguf("olmoe")
    tr = record(gguf, prompts=["The river", "Once upon a time"], max_new_tokens=6, progress=False)
    assert tr.hidden is None
    assert tr.generated.sum() > 0 and set(tr.seq.tolist()) == {0, 1}
    for s in (0, 1):   # each prompt: its tokens, then the generated ones
        g = tr.generated[tr.seq == s]
        assert not g[0] and (np.diff(g.astype(int)) >= 0).all()
    back = Trace.load(tr.save(tmp_path / "t.npz"))
    assert (back.experts == tr.experts).all() and back.meta == tr.meta and back.n_expert == 8
    with pytest.raises(LexiError, match="not a lexi-gguf trace"):
        (tmp_path / "bad.npz").write_bytes(b"nope")
        Trace.load(tmp_path / "bad.npz")


def test_cli_trace_predict_simulate(tiny_gguf, tmp_path, capsys):
    import json

    from lexi_gguf import cli
    gguf = tiny_gguf("olmoe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The river runs\nA small house\n\nOnce upon a time\n")
    trace = tmp_path / "t.npz"
    assert cli.main(["trace", "run", str(gguf), "--prompts", str(prompts), "--max-tokens", "8", "--hidden",
                     "--uniform-k", "2", "-o", str(trace)]) == 0
    assert "x 4 MoE layers at budget uniform-k2 (k per MoE layer [2, 2, 2, 2])" in capsys.readouterr().out
    tr = Trace.load(trace)
    assert set(tr.seq.tolist()) == {0, 1, 2} and (tr.experts[:, :, 2:] == -1).all()
    pt = tmp_path / "p.pt"
    assert cli.main(["predictor", "train", str(trace), "--depth", "2", "--epochs", "3", "-o", str(pt)]) == 0
    assert cli.main(["predictor", "eval", str(trace), "--model", str(gguf), "--predictor", str(pt), "--depth", "2",
                     "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["predictor"] for r in rows] == ["router d=1", "router d=2", "learned d=1", "learned d=2",
                                              "previous d=1", "previous d=2", "online d=1", "online d=2",
                                              "random"]   # previous, online (the runtime's look-ahead): ids only, always
    assert all(r["all_zeros_accuracy"] == pytest.approx(0.75) for r in rows)
    recall = {r["predictor"]: r["recall"] for r in rows}
    # random guesses k of E experts: recall k/E = 2/8; the router look-ahead is far better one layer
    # ahead (0.78 here) and worse two layers ahead (0.66), where the residual stream has moved more
    assert recall["random"] == pytest.approx(2 / 8, abs=0.08)
    assert recall["router d=1"] > recall["router d=2"] > recall["random"] + 0.2
    js = tmp_path / "c.json"
    assert cli.main(["cache-sim", str(trace), "--model", str(gguf), "--capacity", "0.25,0.5",
                     "--policy", "lru,belady,router,learned", "--predictor", str(pt), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert [(r["capacity"], r["policy"]) for r in res["rows"]] == [
        (c, p) for c in (0.25, 0.5) for p in ("lru", "belady", "prefetch:router", "prefetch:learned")]
    assert (tmp_path / "c.png").exists()
    with pytest.raises(SystemExit):
        cli.main(["trace", "run", str(gguf), "--budget", "0.5", "--no-lexi", "-o", str(trace)])
    assert cli.main(["cache-sim", str(trace), "--policy", "router"]) == 2     # router needs --model
    assert "needs --model" in capsys.readouterr().err
