"""Every registered architecture end to end (convert, apply from the file's own table and from its weights),
and the checkpoint layouts real releases use: MXFP4 experts (gpt-oss), multimodal wrappers that keep the
text model under model.language_model (Gemma 4, Qwen3.5), and models with nothing to lower."""
from __future__ import annotations

import json

import pytest
import torch

from lexi_gguf import LexiError
from lexi_gguf.method import profile as prof
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.method.allocate import allocate
from lexi_gguf.export.apply import apply, fit_counts
from lexi_gguf.method.archs import resolve
from lexi_gguf.export.convert import convert
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.testbeds.tinymodels import make_checkpoint
from lexi_gguf.method.weights import FP4_VALUES, SafetensorsSource, dequant_mxfp4

from conftest import ARCHS

SAMPLES = 64


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_and_apply_every_arch(arch, tiny_checkpoint, tiny_gguf, tmp_path, arch_detail):
    hf_dir = tiny_checkpoint(arch)
    src = SafetensorsSource(hf_dir)
    sens = prof.profile(src, samples=SAMPLES, seed=0, progress=False)
    out = convert(hf_dir, tmp_path / "c.gguf", budget=0.5, budgets=[1.0, 0.5], quant="F32", samples=SAMPLES)
    info = model_info(out)
    want = fit_counts(allocate(sens, budget=0.5)["expert_used_count"], sens, info)
    assert [int(k) for k in info.lexi["lexi.expert_used_count"]] == want
    # re-budget from the table stored in the file, no weights read
    again = model_info(apply(out, tmp_path / "a.gguf", budget=0.75, progress=False))
    assert [int(k) for k in again.lexi["lexi.expert_used_count"]] == fit_counts(
        allocate(sens, budget=0.75)["expert_used_count"], sens, info)
    # a plain GGUF is profiled from its own tensors: the same table, so the same allocation
    plain = model_info(apply(tiny_gguf(arch), tmp_path / "p.gguf", budget=0.5, samples=SAMPLES, progress=False))
    assert [int(k) for k in plain.lexi["lexi.expert_used_count"]] == want
    llm = runtime.load(out, n_ctx=32)
    llm.eval([1, 2, 3])
    llm.close()
    arch_detail(arch, "convert", f"k at budget 0.5: {want}")


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (blocks [out, in/32, 16], scales [out, in/32]): nearest E2M1 code, shared power-of-2 scale."""
    g = w.reshape(w.shape[0], -1, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127) + 1
    q = g / torch.exp2(exp)[..., None]
    codes = (q[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def test_mxfp4_experts_profile_like_their_dequantised_weights(tmp_path, llama_cpp_dir):
    """gpt-oss releases store experts as MXFP4 *_blocks/*_scales: read them one expert at a time, the same
    numbers transformers' dequantiser gives, the same profile as the dequantised checkpoint."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # expert width 64: both matrices' inputs are whole MXFP4 blocks of 32
    src_dir = make_checkpoint("gpt_oss", tmp_path / "hf", llama_cpp_dir, seed=3, intermediate_size=64,
                              num_hidden_layers=2)
    tensors = load_file(src_dir / "model.safetensors")
    packed, deq = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = t.transpose(1, 2)                                   # HF [E, in, out] -> [E, out, in]
            b, s = zip(*(_mxfp4(rows[e]) for e in range(rows.shape[0])))
            b, s = torch.stack(b), torch.stack(s)
            packed[name + "_blocks"], packed[name + "_scales"] = b, s
            ref = convert_moe_packed_tensors(b, s, dtype=torch.float32)   # transformers: [E, in, out]
            mine = torch.stack([dequant_mxfp4(b[e], s[e]) for e in range(b.shape[0])]).transpose(1, 2)
            assert mine.dtype == torch.bfloat16 and torch.equal(mine.float(), ref)   # bf16 holds MXFP4 exactly
            deq[name] = ref.contiguous()
        else:
            packed[name] = deq[name] = t
    for sub, ts in (("mx", packed), ("deq", deq)):
        d = tmp_path / sub
        d.mkdir()
        save_file(ts, d / "model.safetensors")
        (d / "config.json").write_text((src_dir / "config.json").read_text())
    a = prof.profile(SafetensorsSource(tmp_path / "mx"), samples=SAMPLES, seed=1, progress=False, dtype="float32")
    b = prof.profile(SafetensorsSource(tmp_path / "deq"), samples=SAMPLES, seed=1, progress=False, dtype="float32")
    assert [L["deviation"] for L in a["layers"]] == [L["deviation"] for L in b["layers"]]
    assert a["layers"][0]["deviation"][0] > 0


def test_multimodal_wrapper_reads_text_config_and_language_model_prefix(tiny_checkpoint, tmp_path):
    """Released Gemma 4 / Qwen3.5 checkpoints are multimodal: config.json nests the text model in
    text_config and the weights sit under model.language_model."""
    from safetensors.torch import load_file, save_file

    src_dir = tiny_checkpoint("gemma4_text")
    text_cfg = json.loads((src_dir / "config.json").read_text())
    d = tmp_path / "mm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
                                               "text_config": text_cfg, "vision_config": {}}))
    ts = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(src_dir / "model.safetensors").items()}
    save_file(ts, d / "model.safetensors")
    a = prof.profile(SafetensorsSource(d), samples=SAMPLES, seed=2, progress=False)
    b = prof.profile(SafetensorsSource(src_dir), samples=SAMPLES, seed=2, progress=False)
    assert [L["deviation"] for L in a["layers"]] == [L["deviation"] for L in b["layers"]]


def test_one_expert_per_token_has_nothing_to_lower():
    for mt in ("qwen3_moe", "llama4_text"):   # Llama 4 Scout: 16 experts, 1 per token
        cfg = {"model_type": mt, "num_local_experts": 16, "num_experts": 16, "num_experts_per_tok": 1,
               "num_hidden_layers": 2}
        with pytest.raises(LexiError, match="1 expert.*nothing to lower"):
            resolve(cfg)
    with pytest.raises(LexiError, match="unsupported architecture 'jetmoe'.*gpt_oss"):
        resolve({"model_type": "jetmoe", "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2})
