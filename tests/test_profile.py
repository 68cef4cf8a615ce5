"""Stage 1 against a brute-force reference: transformers' own MoE module run at each top-k."""
from __future__ import annotations

import json

import pytest
import torch

from lexi_gguf import LexiError
from lexi_gguf.method import profile as prof
from lexi_gguf.testbeds.tinymodels import hf_moe_block, make_checkpoint

from conftest import ARCHS
from lexi_gguf.method.weights import SafetensorsSource


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _brute_force(block, x, k, k_base, draw_tokens):
    d = (block(x, k) - block(x, k_base)).reshape(-1, draw_tokens * x.shape[1]).norm(dim=-1)
    return d.mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_stage1_matches_transformers_moe_block(arch, tiny_checkpoint, arch_detail):
    path = tiny_checkpoint(arch)
    src = SafetensorsSource(path)
    m = src.model
    hf = _hf_model(path)
    samples, draw = 256, 16
    sens = prof.profile(src, samples=samples, seed=3, draw_tokens=draw, progress=False)
    assert [L["moe"] for L in sens["layers"]] == [i in m.moe_layers for i in range(m.n_layer)]
    worst = 0.0
    for i in m.moe_layers:
        layer = sens["layers"][i]
        assert layer["deviation"][-1] == 0.0            # D(k_base) = 0 exactly
        # the same X the profiler drew for this layer
        gen = torch.Generator().manual_seed(3 * 1_000_003 + i)
        x = torch.randn(samples, m.config["hidden_size"], generator=gen)
        block = hf_moe_block(hf, m.spec, i)
        for k in range(1, m.k_base + 1):
            ref = _brute_force(block, x, k, m.k_base, draw)
            assert layer["deviation"][k - 1] == pytest.approx(ref, rel=2e-4, abs=1e-6), (i, k)
            worst = max(worst, abs(layer["deviation"][k - 1] - ref) / max(ref, 1e-12))
        # fewer experts, more deviation: D is non-increasing in k on average over random inputs
        dev = layer["deviation"]
        assert dev[0] > dev[m.k_base - 2] > 0
    arch_detail(arch, "profile", f"max rel. error {worst:.0e}")


def test_same_seed_same_output_and_seed_matters(tiny_checkpoint):
    src = SafetensorsSource(tiny_checkpoint("olmoe"))
    a = prof.profile(src, samples=128, seed=7, progress=False)
    b = prof.profile(src, samples=128, seed=7, progress=False)
    c = prof.profile(src, samples=128, seed=8, progress=False)
    strip = lambda s: [L["deviation"] for L in s["layers"]]
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_bf16_checkpoint_profiles_close_to_f32(tmp_path, llama_cpp_dir):
    f32 = make_checkpoint("olmoe", tmp_path / "f32", llama_cpp_dir, seed=2)
    bf16 = make_checkpoint("olmoe", tmp_path / "bf16", llama_cpp_dir, seed=2, dtype="bfloat16")
    a = prof.profile(SafetensorsSource(f32), samples=512, seed=1, progress=False)
    b = prof.profile(SafetensorsSource(bf16), samples=512, seed=1, progress=False)
    assert b["settings"]["dtype"] == "bfloat16"
    for la, lb in zip(a["layers"], b["layers"]):
        assert lb["deviation"] == pytest.approx(la["deviation"], rel=0.05, abs=1e-3)


def test_sharded_checkpoint_and_missing_shard(tmp_path, llama_cpp_dir):
    from transformers import AutoModelForCausalLM
    d = make_checkpoint("qwen3_moe", tmp_path / "one", llama_cpp_dir, seed=4)
    model = AutoModelForCausalLM.from_pretrained(d)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="2MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    a = prof.profile(SafetensorsSource(d), samples=64, seed=0, progress=False)
    b = prof.profile(SafetensorsSource(sharded), samples=64, seed=0, progress=False)
    assert [L["deviation"] for L in a["layers"]] == [L["deviation"] for L in b["layers"]]
    (sharded / shards[1]).unlink()
    with pytest.raises(LexiError, match=f"missing: {shards[1]}"):
        SafetensorsSource(sharded)


def test_truncated_safetensors_is_a_clear_error(tmp_path, llama_cpp_dir):
    d = make_checkpoint("olmoe", tmp_path / "m", llama_cpp_dir, seed=0)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LexiError, match="truncated or corrupt"):
        prof.profile(SafetensorsSource(d), samples=64, progress=False)


def test_nan_weights_are_refused(tmp_path, llama_cpp_dir):
    from safetensors.torch import load_file, save_file
    d = make_checkpoint("olmoe", tmp_path / "m", llama_cpp_dir, seed=0)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.2.mlp.experts.3.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LexiError, match="layer 2: up weights \\(expert 3\\) contain NaN"):
        prof.profile(SafetensorsSource(d), samples=64, progress=False)


def test_unknown_and_dense_architectures(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    with pytest.raises(LexiError, match="unsupported architecture 'mamba'.*supports: deepseek_v2"):
        SafetensorsSource(tmp_path / "u")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_moe", "num_hidden_layers": 2, "num_experts": 0, "num_experts_per_tok": 0}))
    with pytest.raises(LexiError, match="dense model, LExI has nothing to adapt"):
        SafetensorsSource(tmp_path / "d")
    with pytest.raises(LexiError, match="is not a directory"):
        SafetensorsSource(tmp_path / "nope")
