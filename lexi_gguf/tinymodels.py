"""Synthetic Hugging Face MoE checkpoints for tests, benchmarks and the default model.

Nothing is downloaded: configs come from transformers, weights are random (or trained by
scripts/train_default_model.py), and the tokenizer is GPT-2's, rebuilt from the vocabulary GGUF that
ships in the pinned llama.cpp tree (models/ggml-vocab-gpt-2.gguf), so llama.cpp's converter
recognises it by its pre-tokenizer hash.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import LexiError

GPT2_VOCAB = 50257

# small but structurally faithful configs; every field the converter and llama.cpp need is set
BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=GPT2_VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=50256, eos_token_id=50256, pad_token_id=None)
TINY = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=4),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=4,
                      norm_topk_prob=True, head_dim=16),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=4, num_key_value_heads=4),
    "deepseek_v2": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, num_key_value_heads=4,
                        routed_scaling_factor=1.5, norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1),
    "granitemoe": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=4, num_key_value_heads=4),
}


def gpt2_vocab_gguf(llama_cpp_dir: Path) -> Path:
    p = Path(llama_cpp_dir) / "models" / "ggml-vocab-gpt-2.gguf"
    if not p.exists():
        raise LexiError(f"{p} not found; the pinned llama.cpp tree is incomplete, rerun `make setup`")
    return p


def save_gpt2_tokenizer(out_dir: Path, llama_cpp_dir: Path) -> None:
    """GPT-2's byte-level BPE (tokens + merges from the shipped vocab GGUF) as a HF fast tokenizer."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(gpt2_vocab_gguf(llama_cpp_dir))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(out_dir)


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig
    if arch not in TINY:
        raise LexiError(f"no tiny config for {arch!r}; have {', '.join(TINY)}")
    kw = {**BASE, **TINY[arch], **overrides}
    return AutoConfig.for_model(arch, **kw)


def make_checkpoint(arch: str, out_dir: str | Path, llama_cpp_dir: Path, seed: int = 0, router_scale: float = 1.0,
                    dtype: str = "float32", **overrides) -> Path:
    """A random-weight checkpoint (config, safetensors, tokenizer) that the converter accepts."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:   # wider than the default 0.02 init so experts and layers differ visibly
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            if router_scale != 1.0 and (name.endswith("gate.weight") or "router" in name) and "proj" not in name:
                p.mul_(router_scale)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    save_gpt2_tokenizer(out, llama_cpp_dir)
    return out


def convert_to_gguf(model_dir: str | Path, out: str | Path, llama_cpp_dir: Path, outtype: str = "f32") -> Path:
    """Run the pinned llama.cpp's own convert_hf_to_gguf.py."""
    script = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise LexiError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
    return Path(out)


def hf_set_top_k(model, counts: list[int]) -> None:
    """Give each MoE layer of a transformers model its own top-k (0 = dense layer, left alone)."""
    for i, layer in enumerate(model.model.layers):
        k = counts[i]
        if k == 0:
            continue
        hit = False
        for mod in layer.modules():
            for attr in ("top_k", "num_experts_per_tok"):
                if hasattr(mod, attr) and isinstance(getattr(mod, attr), int) and mod is not layer:
                    setattr(mod, attr, k)
                    hit = True
        if not hit:
            raise LexiError(f"layer {i}: no top_k attribute found in {type(layer).__name__}")
