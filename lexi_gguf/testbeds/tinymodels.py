"""Synthetic Hugging Face MoE checkpoints for tests, benchmarks and the default model.

Nothing is downloaded: configs come from transformers, weights are random (or trained by
scripts/train_default_model.py), and the tokenizer is GPT-2's, rebuilt from the vocabulary GGUF that
ships in the pinned llama.cpp tree (models/ggml-vocab-gpt-2.gguf), so llama.cpp's converter
recognises it by its pre-tokenizer hash.
"""
from __future__ import annotations

import copy
from pathlib import Path

from .. import LexiError
from ..gguf.reader import open_one

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
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, num_key_value_heads=4,
                        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2, topk_group=1,
                        scoring_func="sigmoid", topk_method="noaux_tc"),  # as in the released config.json
    "gpt_oss": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=4, head_dim=16,
                    sliding_window=8, swiglu_limit=7.0,
                    # plain RoPE: YaRN (the released default) differs between transformers and llama.cpp by
                    # ~2e-3 in logits at these tiny head sizes, before any MoE layer is involved
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    "glm4_moe": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=4, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16,
                     routed_scaling_factor=1.5, norm_topk_prob=True, use_qk_norm=False),
    # text-only Gemma 4 (Gemma4ForCausalLM); shapes follow gemma-4-26B-A4B (k_eq_v full layers, wider
    # global heads, proportional RoPE on full layers), no per-layer input embeddings
    "gemma4_text": dict(vocab_size=1024, num_attention_heads=2, head_dim=16, global_head_dim=32,
                        num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=96,
                        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=512,
                        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0,
                        tie_word_embeddings=True, hidden_size_per_layer_input=0, vocab_size_per_layer_input=1024,
                        num_kv_shared_layers=0, use_double_wide_mlp=False, enable_moe_block=True, num_experts=8,
                        top_k_experts=4, moe_intermediate_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2),
}
_HYBRID_QWEN = dict(head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=4,
                    layer_types=["linear_attention", "full_attention"] * 2, moe_intermediate_size=48,
                    shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=4)
# the real 151,936-token vocabulary (see save_qwen_tokenizer): tied embeddings halve the file
TINY["qwen3_5_moe_text"] = dict(_HYBRID_QWEN, vocab_size=151936, bos_token_id=None, eos_token_id=151643,
                                tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
TINY["qwen3_next"] = dict(_HYBRID_QWEN, intermediate_size=96, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                               "partial_rotary_factor": 0.25})
# archs whose converter needs another tokenizer than GPT-2's (see save_gemma4_tokenizer, save_qwen_tokenizer)
TOKENIZER = {"gemma4_text": "gemma4", "qwen3_5_moe_text": "qwen"}
# Qwen2/3.5 pre-tokenizer split (the converter recognises the vocabulary by it)
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# special tokens a converter looks up by name (GLM's vocab code reads <|endoftext|> and <|user|>)
EXTRA_TOKENS = {"glm4_moe": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]}


def gpt2_vocab_gguf(llama_cpp_dir: Path) -> Path:
    p = Path(llama_cpp_dir) / "models" / "ggml-vocab-gpt-2.gguf"
    if not p.exists():
        raise LexiError(f"{p} not found; the pinned llama.cpp tree is incomplete, rerun `make setup`")
    return p


def save_gpt2_tokenizer(out_dir: Path, llama_cpp_dir: Path, extra_special: list[str] = ()) -> int:
    """GPT-2's byte-level BPE (tokens + merges from the shipped vocab GGUF) as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = open_one(gpt2_vocab_gguf(llama_cpp_dir))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(out_dir)
    return len(fast)


def save_gemma4_tokenizer(out_dir: Path, llama_cpp_dir: Path, n_vocab: int) -> None:
    """The first n_vocab tokens of the real Gemma 4 vocabulary (models/ggml-vocab-gemma-4.gguf: control
    tokens, the 256 byte tokens, then the first merged pieces) with every merge that survives, as the
    byte-fallback BPE tokenizer.json the Gemma 4 converter (gguf.LlamaHfVocab) requires."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    p = Path(llama_cpp_dir) / "models" / "ggml-vocab-gemma-4.gguf"
    if not p.exists():
        raise LexiError(f"{p} not found; the pinned llama.cpp tree is incomplete, rerun `make setup`")
    r = open_one(p)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()[:n_vocab]
    types = r.fields["tokenizer.ggml.token_type"].contents()[:n_vocab]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>", mask_token="<mask>").save_pretrained(out_dir)


def save_qwen_tokenizer(out_dir: Path, llama_cpp_dir: Path) -> None:
    """Qwen's byte-level BPE (151,936 ids) from models/ggml-vocab-qwen35.gguf: transformers builds its own
    Qwen3.5 tokenizer for that model type, which the converter only accepts with the real vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    p = Path(llama_cpp_dir) / "models" / "ggml-vocab-qwen35.gguf"
    if not p.exists():
        raise LexiError(f"{p} not found; the pinned llama.cpp tree is incomplete, rerun `make setup`")
    r = open_one(p)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token=None).save_pretrained(out_dir)


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig
    if arch not in TINY:
        raise LexiError(f"no tiny config for {arch!r}; have {', '.join(TINY)}")
    kw = {**BASE, **TINY[arch], **overrides}
    if arch in EXTRA_TOKENS:
        kw.setdefault("vocab_size", GPT2_VOCAB)
        kw["vocab_size"] = max(kw["vocab_size"], GPT2_VOCAB + len(EXTRA_TOKENS[arch]))
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
            elif "bias" in name:  # router and expert biases: non-zero so they are tested
                p.normal_(0.0, 0.05)
            elif name.endswith(("per_expert_scale", "router.scale")) or (arch == "gemma4_text" and "norm" in name):
                p.uniform_(0.6, 1.4)   # scales and (Gemma 4's plain-weight) norms away from 1
            elif arch in ("qwen3_5_moe_text", "qwen3_next") and name.endswith("norm.weight"):
                # zero-centred (1 + w) RMSNorms, except the linear-attention output norm (plain weight)
                p.uniform_(0.7, 1.3) if name.endswith("linear_attn.norm.weight") else p.uniform_(-0.3, 0.3)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 0.5)
            if arch == "gemma4_text" and name.endswith("router.proj.weight"):
                p.normal_(0.0, 0.5)    # O(1) router logits after Gemma 4's hidden^-0.5: no near-ties
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # selection-only bias
                b.normal_(0.0, 0.05)
            elif name.endswith("layer_scalar"):
                b.uniform_(0.7, 1.3)
            if router_scale != 1.0 and (name.endswith("gate.weight") or "router" in name) and "proj" not in name:
                p.mul_(router_scale)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    if TOKENIZER.get(arch) == "gemma4":
        save_gemma4_tokenizer(out, llama_cpp_dir, cfg.vocab_size)
    elif TOKENIZER.get(arch) == "qwen":
        save_qwen_tokenizer(out, llama_cpp_dir)
    else:
        save_gpt2_tokenizer(out, llama_cpp_dir, EXTRA_TOKENS.get(arch, []))
    return out


def hf_set_top_k(model, counts: list[int]) -> None:
    """Give each MoE layer of a transformers model its own top-k (0 = dense layer, left alone)."""
    for i, layer in enumerate(model.model.layers):
        k = counts[i]
        if k == 0:
            continue
        router = getattr(layer, "router", None)
        if router is not None and hasattr(getattr(router, "config", None), "top_k_experts"):
            # Gemma 4's router reads config.top_k_experts from the one shared config: give it its own copy
            router.config = copy.copy(router.config)
            router.config.top_k_experts = int(k)
            continue
        hit = False
        for mod in layer.modules():
            for attr in ("top_k", "num_experts_per_tok"):
                if hasattr(mod, attr) and isinstance(getattr(mod, attr), int) and mod is not layer:
                    setattr(mod, attr, k)
                    hit = True
        if not hit:
            raise LexiError(f"layer {i}: no top_k attribute found in {type(layer).__name__}")


def hf_moe_block(model, spec, i: int):
    """Layer i's routed-experts function of transformers as f(x [N, H], k) -> [N, H]: the reference the
    profiler is tested against (the MoE module at top-k, or Gemma 4's router + pre-norm + experts)."""
    import torch
    layer = model.model.layers[i]

    def run(x, k):
        counts = [0] * len(model.model.layers)
        counts[i] = k
        hf_set_top_k(model, counts)
        with torch.no_grad():
            if spec.hf_moe_attr:
                y = getattr(layer, spec.hf_moe_attr)(x[None])
                return (y[0] if isinstance(y, tuple) else y)[0]
            _, w, idx = layer.router(x)
            return layer.experts(layer.pre_feedforward_layernorm_2(x), idx, w)
    return run


def fp8_checkpoint(src: str | Path, out_dir: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """A checkpoint in the DeepSeek-V3 / Kimi-K2 release layout: every projection weight float8_e4m3fn
    with a `weight_scale_inv` f32 scale per block x block tile (amax / 448), everything else as it was,
    and the `quantization_config` those releases carry."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, w in load_file(f).items():
            if not (name.endswith(".weight") and "proj" in name and w.dim() == 2):
                tensors[name] = w
                continue
            r, c = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
            pad = torch.zeros(r * block[0], c * block[1])
            pad[: w.shape[0], : w.shape[1]] = w.float()
            tiles = pad.reshape(r, block[0], c, block[1])
            scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
            q = (tiles / scale[:, None, :, None]).reshape(pad.shape)[: w.shape[0], : w.shape[1]]
            tensors[name] = q.to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json") and f.is_file():
            shutil.copy2(f, out / f.name)
    return out
