"""The patched runtime: per-layer k equals transformers with the same per-layer top-k, for every
architecture; files without lexi keys behave as before; bad metadata is an error, not an abort."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lexi_gguf import LexiError
from lexi_gguf.gguf import keys
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.testbeds.tinymodels import hf_set_top_k

from conftest import ARCHS, TOKENS, f32_logits

# 4 blocks, 8 experts, base k 4 (block 0 dense where the arch has leading dense layers). The first MoE
# layer smallest and a k above base included.
PATTERNS = {"default": [[1, 4, 2, 3], [3, 1, 4, 2], [8, 2, 6, 1]], "first_dense": [[0, 1, 4, 2], [0, 3, 1, 8]]}
FIRST_DENSE = {"deepseek_v2", "deepseek_v3", "glm4_moe"}
# ggml's CPU GELU is an fp16 lookup table (GGML_GELU_FP16): the reference uses the same table, and
# what is left (f32 vs f64 in transformers itself moves logits ~3e-3 through the table's steps) sets the bar
TOLERANCE = {"gemma4_text": 3e-3}


class GgmlCpuGelu(torch.nn.Module):
    """ggml-cpu's f32 GELU: x rounded to fp16, fp16(gelu_tanh(x)) from a table; x <= -10 -> 0, x >= 10 -> x."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


_HF_CACHE: dict = {}


def _hf_logits(path, counts, tokens=TOKENS):
    from transformers import AutoModelForCausalLM
    if path not in _HF_CACHE:
        _HF_CACHE.clear()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if model.config.model_type == "gemma4_text":
            for layer in model.model.layers:
                layer.mlp.act_fn = layer.experts.act_fn = GgmlCpuGelu()
        _HF_CACHE[path] = model
    model = _HF_CACHE[path]
    hf_set_top_k(model, counts)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _hf_vocab(path) -> int:
    import json
    return json.loads((path / "config.json").read_text())["vocab_size"]


def _with_counts(src, dst, counts):
    info = model_info(src)
    copy_with_metadata(src, dst, lexi_metadata(info, counts, "manual"), progress=False)
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_k_matches_transformers(arch, tiny_checkpoint, tiny_gguf, tmp_path, arch_detail):
    hf_dir, gguf = tiny_checkpoint(arch), tiny_gguf(arch)
    info = model_info(gguf)
    base = info.base_counts
    # the plain file runs the model's own k everywhere
    tol = TOLERANCE.get(arch, 1e-3)
    n_vocab = _hf_vocab(hf_dir)
    toks = [t % n_vocab for t in TOKENS]   # Gemma 4's tiny vocabulary is 1024 tokens
    ref = _hf_logits(hf_dir, base, toks)
    got = f32_logits(gguf, toks)
    worst = float(np.abs(got - ref).max())
    assert worst <= tol
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    for j, counts in enumerate(PATTERNS["first_dense" if arch in FIRST_DENSE else "default"]):
        # blocks the checkpoint does not carry (GLM's NextN block) keep the model's own k
        counts = counts + [info.expert_used_count if i in info.moe_layers else 0
                           for i in range(len(counts), info.block_count)]
        f = _with_counts(gguf, tmp_path / f"p{j}.gguf", counts)
        ref = _hf_logits(hf_dir, counts, toks)
        got = f32_logits(f, toks)
        worst = max(worst, float(np.abs(got - ref).max()))
        assert np.abs(got - ref).max() <= tol, (counts, float(np.abs(got - ref).max()))
        assert (got.argmax(-1) == ref.argmax(-1)).all(), counts
        # lexi.enable=false on the same file runs the model's own k, bit for bit as the plain file
        assert np.array_equal(f32_logits(f, toks, **{keys.ENABLE: False}), f32_logits(gguf, toks))
    arch_detail(arch, "runtime", f"max Δlogit {worst:.1e}")


def test_uniform_override_and_ladder_selection(tiny_checkpoint, tiny_gguf, tmp_path):
    arch = "qwen3_moe"
    hf_dir, gguf = tiny_checkpoint(arch), tiny_gguf(arch)
    info = model_info(gguf)
    rows = [{"budget": 1.0, "total": 16, "expert_used_count": [4, 4, 4, 4]},
            {"budget": 0.5, "total": 8, "expert_used_count": [1, 3, 2, 2]}]
    md = lexi_metadata(info, [2, 2, 2, 2], "manual", ladder=rows)
    f = copy_with_metadata(gguf, tmp_path / "ladder.gguf", md, progress=False)
    # what users do today: a uniform k by override, with the lexi counts switched off
    uni = f32_logits(f, **runtime.lexi_overrides(info.arch, uniform_k=3))
    assert np.abs(uni - _hf_logits(hf_dir, [3, 3, 3, 3])).max() <= 1e-3
    # a stored budget chosen at load time by a scalar override
    row1 = f32_logits(f, **runtime.lexi_overrides(info.arch, budget_index=1))
    assert np.abs(row1 - _hf_logits(hf_dir, [1, 3, 2, 2])).max() <= 1e-3
    default = f32_logits(f)
    assert np.abs(default - _hf_logits(hf_dir, [2, 2, 2, 2])).max() <= 1e-3


def test_load_logs_per_layer_k_once(tiny_gguf, tmp_path):
    f = _with_counts(tiny_gguf("olmoe"), tmp_path / "l.gguf", [1, 4, 2, 3])
    llm = runtime.load(f, n_ctx=32)
    log = runtime.captured_log()
    del llm
    assert log.count("lexi.expert_used_count = [1,4,2,3] (sum 10, model k 4)") == 1


def _bad(src, dst, md_changes, drop=()):
    info = model_info(src)
    md = lexi_metadata(info, [1, 4, 2, 3] if 0 in info.moe_layers else [0, 4, 2, 3], "manual")
    for k in drop:
        md.pop(k)
    md.update(md_changes)
    return copy_with_metadata(src, dst, md, progress=False)


def _T():
    import gguf
    return gguf.GGUFValueType


@pytest.mark.parametrize("case", ["short", "too_many_experts", "zero_on_moe", "float_array", "scalar",
                                  "dense_nonzero", "index_out_of_range", "index_without_ladder", "enable_not_bool"])
def test_bad_metadata_is_a_python_error_with_the_loaders_message(case, tiny_gguf, tmp_path):
    T = _T()
    arch = "deepseek_v2" if case == "dense_nonzero" else "olmoe"
    src = tiny_gguf(arch)
    kv = None
    E = keys.EXPERT_USED_COUNT
    if case == "short":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: ([1, 2, 3], T.ARRAY, T.UINT32)}), "has 3 entries, expected 4"
    elif case == "too_many_experts":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: ([1, 9, 2, 3], T.ARRAY, T.UINT32)}), r"\[1\] = 9 is out of range"
    elif case == "zero_on_moe":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: ([1, 0, 2, 3], T.ARRAY, T.UINT32)}), r"\[1\] = 0 but block 1 is an MoE layer"
    elif case == "float_array":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: ([1.0, 2.0, 2.0, 3.0], T.ARRAY, T.FLOAT32)}), "must be an array of uint32"
    elif case == "scalar":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: (2, T.UINT32, None)}), "must be an array of uint32"
    elif case == "dense_nonzero":
        f, msg = _bad(src, tmp_path / "b.gguf", {E: ([2, 4, 2, 3], T.ARRAY, T.UINT32)}), r"\[0\] = 2 but block 0 is dense"
    elif case == "index_out_of_range":
        rows = {keys.LADDER_EXPERT_USED_COUNT: ([1, 1, 1, 1, 2, 2, 2, 2], T.ARRAY, T.UINT32)}
        f, msg = _bad(src, tmp_path / "b.gguf", rows), "lexi.budget_index=5 is out of range: the file stores 2 budgets"
        kv = {keys.BUDGET_INDEX: 5}
    elif case == "index_without_ladder":
        f, msg, kv = _bad(src, tmp_path / "b.gguf", {}), "has no lexi.ladder.expert_used_count", {keys.BUDGET_INDEX: 0}
    else:
        f, msg, kv = _bad(src, tmp_path / "b.gguf", {}), "lexi.enable must be a bool", {keys.ENABLE: 1}
    if kv is None:      # damaged keys in the file: lexi-gguf refuses before llama.cpp gets it, naming the rule
        py = "must be ARRAY/UINT32 or ARRAY/INT32" if case in ("float_array", "scalar") else msg
        with pytest.raises(LexiError, match=py):
            runtime.load(f, n_ctx=32)
        # and the patched loader itself (llama-server, llama-cli, any binding) refuses it in its own words
        import llama_cpp
        runtime.install_log_hook()
        runtime.clear_log()
        with pytest.raises(ValueError):
            llama_cpp.Llama(str(f), n_ctx=32, verbose=False)
        assert re.search(msg, runtime.captured_log()), runtime.captured_log()[-500:]
        return
    with pytest.raises(runtime.ModelLoadError, match=msg) as ei:      # a kv override only the loader sees
        runtime.load(f, kv_overrides=kv, n_ctx=32)
    assert any("lexi" in m for m in ei.value.loader_messages)


def test_doctor_sees_the_patched_library():
    d = runtime.doctor()
    assert d["patched"] is True
    assert d["runtime"]["patch_hash"]
